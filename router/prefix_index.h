// The router's prefix index: which worker holds which cached KV blocks, learned from the workers' KV
// event streams (Worker.KvEvents: a snapshot, then stored/evicted as they happen), so that a request can
// be routed where the longest part of its prompt is already cached.
//
// Blocks are named by their chain hash h_i = H(h_{i-1}, tokens_i, model fingerprint, tenant salt)
// (kvstore/prefix_cache.h), which the router computes from the request's prompt with the fingerprint and
// block size the events announced. A hash names a whole prefix, and the tenant salt is inside it, so one
// tenant's prefix never matches another's. The index is a hint: a stale entry costs a cache miss on the
// worker, never a wrong answer (the worker checks each block's tokens).
//
// Thread-safe (one mutex). Bounded: at most `max_blocks` (hash, holder) pairs; when full, the holder's
// oldest entries go first.
#ifndef V4SERVE_ROUTER_PREFIX_INDEX_H_
#define V4SERVE_ROUTER_PREFIX_INDEX_H_

#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstore/prefix_cache.h"
#include "v4serve/v1/kvstore.pb.h"

namespace v4serve::router {

// How the chains of one model are formed.
struct ChainParams {
  uint64_t model_fingerprint = 0;
  int32_t block_tokens = 0;
  bool operator==(const ChainParams&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const ChainParams& p) {
    return H::combine(std::move(h), p.model_fingerprint, p.block_tokens);
  }
};

// A holder's cached prefix of one prompt.
struct PrefixMatch {
  std::string holder;
  int64_t cached_tokens = 0;
};

class PrefixIndex {
 public:
  explicit PrefixIndex(int64_t max_blocks = 1 << 22) : max_blocks_(max_blocks) {}

  // Applies one event from `holder` (the address the router reaches it at). An event with `snapshot`
  // set replaces everything known of the holder. Malformed hashes are skipped (counted in skipped()).
  void Apply(const std::string& holder, const v1::KvEvent& event);
  // The holder is gone or its stream broke: forget what it held.
  void Forget(const std::string& holder);

  // For each holder with a non-empty match, the tokens of `prompt` it holds as a cached prefix (whole
  // blocks), best first.
  std::vector<PrefixMatch> Match(absl::Span<const int32_t> prompt, uint64_t tenant_salt) const;

  int64_t size() const;     // (hash, holder) pairs
  int64_t skipped() const;  // malformed hashes seen

 private:
  struct Holder {
    ChainParams params;
    std::list<kvstore::BlockHash> order;  // insertion order, oldest first (for the size bound)
    absl::flat_hash_map<kvstore::BlockHash, std::list<kvstore::BlockHash>::iterator> hashes;
  };
  void StoreLocked(Holder& h, kvstore::BlockHash hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EvictLocked(Holder& h, kvstore::BlockHash hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ClearLocked(Holder& h) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TrimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t max_blocks_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Holder> holders_ ABSL_GUARDED_BY(mu_);
  int64_t pairs_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t skipped_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_PREFIX_INDEX_H_
