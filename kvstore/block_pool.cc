#include "kvstore/block_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace v4serve::kvstore {

BlockPool::BlockPool(int64_t capacity) : capacity_(capacity > 0 ? capacity : 1) {
  slots_.resize(static_cast<size_t>(capacity_));
  free_.reserve(static_cast<size_t>(capacity_));
  // Lowest ids are handed out first (free_ is a stack).
  for (int64_t i = capacity_ - 1; i >= 0; --i) free_.push_back(static_cast<BlockId>(i));
}

int64_t BlockPool::blocks_free() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(free_.size());
}

int64_t BlockPool::blocks_used() const {
  absl::MutexLock l(&mu_);
  return capacity_ - static_cast<int64_t>(free_.size());
}

bool BlockPool::Held(BlockId id) const {
  return id >= 0 && id < capacity_ && slots_[static_cast<size_t>(id)].refs > 0;
}

absl::StatusOr<BlockId> BlockPool::Allocate() {
  absl::MutexLock l(&mu_);
  if (free_.empty()) return absl::ResourceExhaustedError("KV block pool is full");
  const BlockId id = free_.back();
  free_.pop_back();
  slots_[static_cast<size_t>(id)].refs = 1;
  return id;
}

absl::Status BlockPool::Ref(BlockId id) {
  absl::MutexLock l(&mu_);
  if (!Held(id)) return absl::FailedPreconditionError(absl::StrCat("Ref of free KV block ", id));
  ++slots_[static_cast<size_t>(id)].refs;
  return absl::OkStatus();
}

absl::Status BlockPool::Unref(BlockId id) {
  absl::MutexLock l(&mu_);
  if (!Held(id)) return absl::FailedPreconditionError(absl::StrCat("Unref of free KV block ", id));
  Slot& s = slots_[static_cast<size_t>(id)];
  if (--s.refs == 0) {
    bytes_stored_ -= static_cast<int64_t>(s.bytes.size());
    std::string().swap(s.bytes);
    s.has_bytes = false;
    free_.push_back(id);
  }
  return absl::OkStatus();
}

int32_t BlockPool::refcount(BlockId id) const {
  absl::MutexLock l(&mu_);
  return (id >= 0 && id < capacity_) ? slots_[static_cast<size_t>(id)].refs : 0;
}

absl::Status BlockPool::Put(BlockId id, std::string bytes) {
  absl::MutexLock l(&mu_);
  if (!Held(id)) return absl::FailedPreconditionError(absl::StrCat("Put into free KV block ", id));
  Slot& s = slots_[static_cast<size_t>(id)];
  bytes_stored_ += static_cast<int64_t>(bytes.size()) - static_cast<int64_t>(s.bytes.size());
  s.bytes = std::move(bytes);
  s.has_bytes = true;
  return absl::OkStatus();
}

absl::StatusOr<std::string> BlockPool::Get(BlockId id) const {
  absl::MutexLock l(&mu_);
  if (!Held(id) || !slots_[static_cast<size_t>(id)].has_bytes) {
    return absl::NotFoundError(absl::StrCat("KV block ", id, " has no bytes"));
  }
  return slots_[static_cast<size_t>(id)].bytes;
}

int64_t BlockPool::bytes_stored() const {
  absl::MutexLock l(&mu_);
  return bytes_stored_;
}

}  // namespace v4serve::kvstore
