// The prefix cache: complete KV blocks keyed by their block-hash chain, so a request that shares a
// prefix with an earlier one (same model, same tenant) reuses its blocks instead of recomputing them.
//
// Hash chain (docs/ARCHITECTURE.md): h_i = H(h_{i-1}, tokens of block i, model fingerprint, tenant
// salt), h_{-1} = 0. A hash names a whole prefix, not one block's tokens, so equal hashes mean equal
// prefixes (up to 64-bit collisions, which the caller rules out by comparing the block's stored tokens).
// H is a fixed function of the bytes (stable across processes and builds), so the router and every
// worker compute the same chain.
//
// The cache holds one pool reference per cached block. A block whose only reference is the cache's is
// "unreferenced" and may be evicted, least recently used first; blocks that running sequences hold are
// never evicted.
//
// Thread-safe (one mutex; lookups are O(blocks)). The pool must outlive the cache.
#ifndef V4SERVE_KVSTORE_PREFIX_CACHE_H_
#define V4SERVE_KVSTORE_PREFIX_CACHE_H_

#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstore/block_pool.h"

namespace v4serve::kvstore {

using BlockHash = uint64_t;

// One link of the chain.
BlockHash ChainBlockHash(BlockHash prev, absl::Span<const int32_t> block_tokens, uint64_t model_fingerprint,
                         uint64_t tenant_salt);
// The hashes of the complete blocks of `tokens` (tokens.size() / block_tokens of them).
std::vector<BlockHash> BlockHashChain(absl::Span<const int32_t> tokens, int32_t block_tokens,
                                      uint64_t model_fingerprint, uint64_t tenant_salt);
// A stable 64-bit hash of bytes (tenant names to salts, checkpoint files to fingerprints).
uint64_t StableHash64(const void* data, size_t n, uint64_t seed = 0);
// The salt of a tenant's hash chains: 0 for the default (empty) tenant, else StableHash64 of the name.
uint64_t TenantSalt(absl::string_view tenant);
// A hash (or a model fingerprint) as it travels in proto bytes fields (BlockId.hash): 8 bytes, big-endian,
// the order of the store keys (kvstore/store_format.h).
std::string BlockHashBytes(BlockHash hash);
// INVALID_ARGUMENT unless `bytes` is 8 bytes long.
absl::StatusOr<BlockHash> BlockHashFromBytes(absl::string_view bytes);

class KvEventHub;

class PrefixCache {
 public:
  // `events` (optional, must outlive the cache) hears of every block stored and evicted, for the routers
  // that follow this holder (Worker.KvEvents).
  explicit PrefixCache(BlockPool* pool, KvEventHub* events = nullptr) : pool_(pool), events_(events) {}
  ~PrefixCache();  // Drops the cache's references.
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // The longest run hashes[0..k) that is cached. For each returned block a pool reference is taken for
  // the caller (who must Unref it), and the blocks become most recently used.
  std::vector<BlockId> Acquire(absl::Span<const BlockHash> hashes);

  // Caches `id` (held by the caller) under `hash`; the cache takes its own reference. Returns false and
  // changes nothing when `hash` is already cached (the earlier block stays; they hold the same data).
  bool Insert(BlockHash hash, BlockId id);

  // Forgets `hash` (e.g. its block failed to decode) and drops the cache's reference.
  void Erase(BlockHash hash);

  // Evicts up to `n` unreferenced blocks, least recently used first. Returns how many were freed.
  int64_t Evict(int64_t n);
  // Blocks that Evict could free now.
  int64_t evictable() const;
  int64_t size() const;

 private:
  struct Entry {
    BlockId id;
    std::list<BlockHash>::iterator lru;  // Position in lru_ (front = least recently used).
  };
  BlockPool* const pool_;
  KvEventHub* const events_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, Entry> map_ ABSL_GUARDED_BY(mu_);
  std::list<BlockHash> lru_ ABSL_GUARDED_BY(mu_);
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_PREFIX_CACHE_H_
