// The engine's KV memory: block tables of running sequences on a refcounted BlockPool, prefix reuse
// through the PrefixCache, and publication of each completed block (entries + boundary state) so later
// requests with the same prefix (same model, same tenant) skip recomputing it.
//
// Memory accounting is by 128-token blocks: a running sequence holds ceil(tokens / 128) blocks, shared
// prefix blocks count once. The model's forward pass reads the sequence's SequenceState (its
// contiguous per-layer arrays); a completed block's encoded bytes live in its pool slot, which is what
// the prefix cache serves and what a transfer or the disk tier would carry.
//
// Reuse is exact: a block is reused only if its stored tokens equal the request's (a hash collision or a
// corrupt block is a miss), and the sliding-window state at the reuse point is either stored with the
// last reused block or recomputed exactly under the deployment's SWA policy (state_blocks.h
// RestoreWithRecompute; MODEL.md).
//
// Tiers (docs/KV_STORE.md): the pool + prefix cache are this process's device tier. With a
// KvStoreClient (options.store: the in-process TieredStore or the `v4serve kvstore` service) a prefix
// that misses here is looked up there (host memory, then disk), fetched, verified and promoted into the
// pool; every completed block is written behind to the store (never blocking the step).
//
// Externally synchronized (the engine's thread). The config must outlive it.
#ifndef V4SERVE_ENGINE_KV_CACHE_MANAGER_H_
#define V4SERVE_ENGINE_KV_CACHE_MANAGER_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/sequence.h"
#include "engine/state_blocks.h"
#include "kvstore/block_pool.h"
#include "kvstore/kv_block.h"
#include "kvstore/kv_events.h"
#include "kvstore/kv_store_client.h"
#include "kvstore/prefix_cache.h"
#include "model/config.h"
#include "model/model.h"

namespace v4serve::engine {

struct KvCacheOptions {
  int64_t num_blocks = 256;  // Pool capacity in blocks.
  bool enable_prefix_cache = true;
  // Which blocks keep their boundary window state (state_blocks.h); periodic checkpoints every
  // `swa_checkpoint_tokens` tokens (a positive multiple of the block size).
  SwaPolicy swa_policy = SwaPolicy::kFull;
  int64_t swa_checkpoint_tokens = 4096;
  // The node's tiered store (host memory + disk), shared with other workers; null = this process only.
  std::shared_ptr<kvstore::KvStoreClient> store;
  // Told of every block the prefix cache stores or evicts (Worker.KvEvents for prefix-aware routing);
  // null = nobody listens. Must outlive the manager.
  kvstore::KvEventHub* events = nullptr;

  absl::Status Validate() const;
};

class KvCacheManager {
 public:
  // `model` runs the recomputation of the periodic and zero policies; without it (tests of the pool
  // alone) reuse stops at the last block that carries window state.
  KvCacheManager(const model::ModelConfig& config, kvstore::KvLayout layout, const KvCacheOptions& options,
                 const model::Model* model = nullptr);
  ~KvCacheManager();

  int32_t block_tokens() const { return layout_.block_tokens; }
  int64_t blocks_total() const { return pool_.capacity(); }
  int64_t blocks_used() const { return pool_.blocks_used(); }
  int64_t blocks_free() const { return pool_.blocks_free(); }
  int64_t blocks_cached() const { return cache_.size(); }
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_tokens() - 1) / block_tokens(); }

  // Gives a waiting sequence its state and blocks for all its known tokens: restores the longest cached
  // prefix (leaving at least one token to compute), then allocates the rest, evicting unreferenced
  // cached blocks as needed. Returns the tokens restored from the cache. RESOURCE_EXHAUSTED when the
  // blocks do not fit; then nothing changed.
  absl::StatusOr<int64_t> Admit(Sequence* seq);

  // Gives a swapped sequence back its blocks and state. RESOURCE_EXHAUSTED (nothing changed) or
  // DATA_LOSS (the swapped bytes do not decode; the caller recomputes).
  absl::Status SwapIn(Sequence* seq);
  // Serializes the state to host memory and frees the blocks.
  void SwapOut(Sequence* seq);

  // Makes sure the block table covers `tokens` tokens. RESOURCE_EXHAUSTED when no block is free even
  // after evicting (nothing changed).
  absl::Status Grow(Sequence* seq, int64_t tokens);

  // Publishes the block that the state just completed (call when state.position is a multiple of the
  // block size). Failures are logged and leave the block uncached (correct, just slower).
  void OnBlockBoundary(Sequence* seq);

  // Makes `child` a copy of `parent` (whose state has consumed its prompt): the same state, references
  // to the parent's complete blocks, its own block for the incomplete tail. RESOURCE_EXHAUSTED
  // (nothing changed) when that block does not fit.
  absl::Status Fork(const Sequence& parent, Sequence* child);

  // Drops the sequence's block references and state (finish, cancel or recompute-preemption).
  void Release(Sequence* seq);

  // Tokens the SWA policy's exact recomputation ran through the model (periodic / zero), and prefix
  // tokens restored from the store rather than this process's pool.
  int64_t recomputed_tokens() const { return recomputed_tokens_; }
  int64_t store_hit_tokens() const { return store_hit_tokens_; }
  // Restored blocks whose payloads the model's backend took as they are (Model::AdoptKvPages: on the CUDA
  // backend, device KV pages filled with one copy each instead of an upload at the next step).
  int64_t pages_adopted() const { return pages_adopted_; }
  // Offers `state`'s first blocks as their payloads (kvstore::KvBlockPayload, blocks 0, 1, ...) to the
  // model's backend (Model::AdoptKvPages) and counts them when taken; a refusal is logged and only costs an
  // upload at the state's next step. Nothing without a model. On the engine thread (like forwards).
  void AdoptPages(model::SequenceState* state, absl::Span<const absl::string_view> payloads);

  // The pool, for fault-injection tests (corrupting stored blocks).
  kvstore::BlockPool* mutable_pool_for_testing() { return &pool_; }

 private:
  absl::StatusOr<kvstore::BlockId> AllocateEvicting();
  // Grows `blocks` to `count` blocks; on failure unrefs every block in `blocks` (the caller owns none).
  absl::Status AllocateUpTo(std::vector<kvstore::BlockId>* blocks, int64_t count);

  // A restored block's bytes as they came (pool or store), kept for its payload (kvstore::KvBlockPayload),
  // which starts `payload_at` bytes in: handed to AdoptPages without another copy.
  struct EncodedBlock {
    std::string bytes;
    size_t payload_at = 0;
  };
  // Blocks [have, want) of the chain from the store, verified and promoted into the pool (each with a
  // pool reference for the caller, and cached). Stops at the first miss or bad block. `encoded` gets each
  // restored block's bytes.
  void FetchFromStore(const Sequence& seq, absl::Span<const kvstore::BlockHash> hashes,
                      std::vector<kvstore::BlockId>* blocks, std::vector<kvstore::KvBlock>* restored,
                      std::vector<EncodedBlock>* encoded);
  // Publishes `block` (state included when the policy keeps it) to the store's write-behind queue.
  void WriteBehind(const Sequence& seq, const kvstore::KvBlock& block, bool keep_state);

  const model::ModelConfig& config_;
  const model::Model* const model_;
  int64_t recomputed_tokens_ = 0;
  int64_t store_hit_tokens_ = 0;
  int64_t pages_adopted_ = 0;
  const kvstore::KvLayout layout_;
  const KvCacheOptions options_;
  kvstore::BlockPool pool_;
  kvstore::PrefixCache cache_;
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_KV_CACHE_MANAGER_H_
