// KvEventHub: what a holder of KV blocks (a worker's prefix cache, a node store) tells routers about
// them. The cache reports blocks stored and evicted; each subscriber (one Worker.KvEvents stream) first
// gets a snapshot of every block held, then the changes in order. A subscriber that falls more than
// `max_pending` events behind gets a fresh snapshot instead of the backlog, so a slow router can never
// grow the holder's memory or see a gap.
//
// Thread-safe. Stored/Evicted are cheap (a hash-set update and a push per subscriber) and never block on
// subscribers, so the engine thread can call them.
#ifndef V4SERVE_KVSTORE_KV_EVENTS_H_
#define V4SERVE_KVSTORE_KV_EVENTS_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstore/prefix_cache.h"

namespace v4serve::kvstore {

struct KvEventBatch {
  enum class Kind { kStored, kEvicted };
  Kind kind = Kind::kStored;
  bool snapshot = false;  // kStored listing everything held: replaces what the subscriber knew
  std::vector<BlockHash> hashes;
};

class KvEventHub {
 public:
  KvEventHub(uint64_t model_fingerprint, int32_t block_tokens, size_t max_pending = 4096)
      : model_fingerprint_(model_fingerprint), block_tokens_(block_tokens), max_pending_(max_pending) {}
  KvEventHub(const KvEventHub&) = delete;
  KvEventHub& operator=(const KvEventHub&) = delete;

  uint64_t model_fingerprint() const { return model_fingerprint_; }
  int32_t block_tokens() const { return block_tokens_; }

  void Stored(absl::Span<const BlockHash> hashes);
  void Evicted(absl::Span<const BlockHash> hashes);
  int64_t held() const;

  class Subscription {
   public:
    ~Subscription();
    // The next batch (the first is the snapshot); false when none arrived within `timeout` or the hub
    // was closed. Call from one thread.
    bool Next(KvEventBatch* out, absl::Duration timeout);

   private:
    friend class KvEventHub;
    explicit Subscription(KvEventHub* hub) : hub_(hub) {}
    KvEventHub* hub_;
    std::deque<KvEventBatch> pending_;  // guarded by hub_->mu_
    bool resync_ = true;                // guarded by hub_->mu_: next batch is a snapshot
  };
  // The subscription must not outlive the hub.
  std::unique_ptr<Subscription> Subscribe();
  // Wakes every subscriber; Next returns false from now on (shutdown).
  void Close();
  bool closed() const;

 private:
  void Publish(KvEventBatch::Kind kind, absl::Span<const BlockHash> hashes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t model_fingerprint_;
  const int32_t block_tokens_;
  const size_t max_pending_;
  mutable absl::Mutex mu_;
  absl::flat_hash_set<BlockHash> held_ ABSL_GUARDED_BY(mu_);
  std::vector<Subscription*> subscribers_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KV_EVENTS_H_
