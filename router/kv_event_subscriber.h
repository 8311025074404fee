// Keeps the router's PrefixIndex in step with its workers: one Worker.KvEvents stream per healthy worker
// (a snapshot of what it caches, then stored/evicted events), restarted when it breaks. A worker whose
// stream ends is forgotten by the index until its next snapshot, so a dead worker never attracts
// requests through stale prefixes. Workers that do not serve KvEvents (UNIMPLEMENTED) are asked again
// only every `unimplemented_retry`.
//
// Thread-safe. Owns one thread for discovery plus one per open stream; the destructor cancels the
// streams and joins them.
#ifndef V4SERVE_ROUTER_KV_EVENT_SUBSCRIBER_H_
#define V4SERVE_ROUTER_KV_EVENT_SUBSCRIBER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/client_context.h"
#include "router/prefix_index.h"
#include "router/worker_pool.h"

namespace v4serve::router {

struct KvEventSubscriberOptions {
  absl::Duration poll_interval = absl::Seconds(1);  // how often new workers are looked for
  absl::Duration unimplemented_retry = absl::Minutes(1);
  std::string subscriber = "router";
};

class KvEventSubscriber {
 public:
  // `pool` and `index` must outlive the subscriber.
  KvEventSubscriber(WorkerPool* pool, PrefixIndex* index, KvEventSubscriberOptions options = {});
  ~KvEventSubscriber();
  KvEventSubscriber(const KvEventSubscriber&) = delete;
  KvEventSubscriber& operator=(const KvEventSubscriber&) = delete;

  int open_streams() const;

 private:
  struct Stream {
    std::shared_ptr<grpc::ClientContext> ctx;
    std::thread thread;
    bool done = false;
    absl::Time retry_after = absl::InfinitePast();
  };
  void Loop();
  void Follow(const std::string& address, std::shared_ptr<grpc::ClientContext> ctx);

  WorkerPool* const pool_;
  PrefixIndex* const index_;
  const KvEventSubscriberOptions options_;
  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<std::string, Stream> streams_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_KV_EVENT_SUBSCRIBER_H_
