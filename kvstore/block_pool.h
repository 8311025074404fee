// A paged pool of KV blocks with reference counts: the allocator behind every tier's memory (host today;
// device memory plugs in behind the same ids later).
//
// The pool has a fixed number of block slots. A slot is free, or held by one or more owners (running
// sequences, the prefix cache); each owner holds one reference. Sequences that share a prefix hold
// references to the same slots, so a shared block costs memory once. A slot whose last reference goes
// returns to the free list at once and its bytes are released.
//
// A slot's bytes are the encoded block (kv_block.h), set once the block is complete; a block still being
// filled by its sequence has no bytes yet but is counted as used (admission reserves it).
//
// Thread-safe (one mutex; every call is O(1) except Put/Get, which copy the block's bytes).
#ifndef V4SERVE_KVSTORE_BLOCK_POOL_H_
#define V4SERVE_KVSTORE_BLOCK_POOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace v4serve::kvstore {

using BlockId = int32_t;

class BlockPool {
 public:
  // `capacity` slots (> 0).
  explicit BlockPool(int64_t capacity);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  int64_t capacity() const { return capacity_; }
  int64_t blocks_free() const;
  int64_t blocks_used() const;

  // Takes a free slot with one reference. RESOURCE_EXHAUSTED when none is free (the caller evicts or
  // preempts and retries). Nothing changes on failure.
  absl::StatusOr<BlockId> Allocate();
  // Adds a reference to a held slot. FAILED_PRECONDITION for a free or unknown id.
  absl::Status Ref(BlockId id);
  // Drops a reference; the last one frees the slot and its bytes. FAILED_PRECONDITION for a free or
  // unknown id (the pool is unchanged).
  absl::Status Unref(BlockId id);
  // References on `id` (0 when free or unknown).
  int32_t refcount(BlockId id) const;

  // Stores the encoded block of a held slot (replacing earlier bytes).
  absl::Status Put(BlockId id, std::string bytes);
  // A copy of the slot's bytes; NOT_FOUND when none were put.
  absl::StatusOr<std::string> Get(BlockId id) const;
  // Bytes held by all slots (encoded blocks).
  int64_t bytes_stored() const;

 private:
  struct Slot {
    int32_t refs = 0;
    bool has_bytes = false;
    std::string bytes;
  };
  bool Held(BlockId id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t capacity_;
  mutable absl::Mutex mu_;
  std::vector<Slot> slots_ ABSL_GUARDED_BY(mu_);
  std::vector<BlockId> free_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_stored_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_BLOCK_POOL_H_
