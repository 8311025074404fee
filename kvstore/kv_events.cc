#include "kvstore/kv_events.h"

#include <algorithm>
#include <utility>

namespace v4serve::kvstore {

void KvEventHub::Publish(KvEventBatch::Kind kind, absl::Span<const BlockHash> hashes) {
  if (hashes.empty()) return;
  for (Subscription* s : subscribers_) {
    if (s->resync_) continue;  // its next batch is a snapshot anyway
    if (s->pending_.size() >= max_pending_) {
      s->pending_.clear();
      s->resync_ = true;
      continue;
    }
    s->pending_.push_back({kind, false, std::vector<BlockHash>(hashes.begin(), hashes.end())});
  }
}

void KvEventHub::Stored(absl::Span<const BlockHash> hashes) {
  absl::MutexLock l(&mu_);
  std::vector<BlockHash> fresh;
  for (BlockHash h : hashes) {
    if (held_.insert(h).second) fresh.push_back(h);
  }
  Publish(KvEventBatch::Kind::kStored, fresh);
}

void KvEventHub::Evicted(absl::Span<const BlockHash> hashes) {
  absl::MutexLock l(&mu_);
  std::vector<BlockHash> gone;
  for (BlockHash h : hashes) {
    if (held_.erase(h) > 0) gone.push_back(h);
  }
  Publish(KvEventBatch::Kind::kEvicted, gone);
}

int64_t KvEventHub::held() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(held_.size());
}

std::unique_ptr<KvEventHub::Subscription> KvEventHub::Subscribe() {
  std::unique_ptr<Subscription> s(new Subscription(this));
  absl::MutexLock l(&mu_);
  subscribers_.push_back(s.get());
  return s;
}

void KvEventHub::Close() {
  absl::MutexLock l(&mu_);
  closed_ = true;
}

bool KvEventHub::closed() const {
  absl::MutexLock l(&mu_);
  return closed_;
}

KvEventHub::Subscription::~Subscription() {
  absl::MutexLock l(&hub_->mu_);
  std::erase(hub_->subscribers_, this);
}

bool KvEventHub::Subscription::Next(KvEventBatch* out, absl::Duration timeout) {
  KvEventHub* hub = hub_;
  absl::MutexLock l(&hub->mu_);
  auto ready = [this, hub]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(hub->mu_) {
    return hub->closed_ || resync_ || !pending_.empty();
  };
  hub->mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
  if (hub->closed_) return false;
  if (resync_) {
    resync_ = false;
    pending_.clear();
    *out = {KvEventBatch::Kind::kStored, true, std::vector<BlockHash>(hub->held_.begin(), hub->held_.end())};
    return true;
  }
  if (pending_.empty()) return false;
  *out = std::move(pending_.front());
  pending_.pop_front();
  return true;
}

}  // namespace v4serve::kvstore
