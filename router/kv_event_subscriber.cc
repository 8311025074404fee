#include "router/kv_event_subscriber.h"

#include <utility>
#include <vector>

#include "services/logging.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::router {

KvEventSubscriber::KvEventSubscriber(WorkerPool* pool, PrefixIndex* index, KvEventSubscriberOptions options)
    : pool_(pool), index_(index), options_(std::move(options)) {
  thread_ = std::thread([this] { Loop(); });
}

KvEventSubscriber::~KvEventSubscriber() {
  std::vector<std::thread> threads;
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    for (auto& [address, s] : streams_) {
      if (s.ctx) s.ctx->TryCancel();
      if (s.thread.joinable()) threads.push_back(std::move(s.thread));
    }
  }
  if (thread_.joinable()) thread_.join();
  for (std::thread& t : threads) t.join();
}

int KvEventSubscriber::open_streams() const {
  absl::MutexLock l(&mu_);
  int n = 0;
  for (const auto& [address, s] : streams_) n += s.thread.joinable() && !s.done ? 1 : 0;
  return n;
}

void KvEventSubscriber::Loop() {
  while (true) {
    std::vector<std::thread> finished;
    {
      absl::MutexLock l(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.poll_interval)) return;
      // Reap ended streams (their threads have returned).
      for (auto& [address, s] : streams_) {
        if (s.done && s.thread.joinable()) finished.push_back(std::move(s.thread));
      }
    }
    for (std::thread& t : finished) t.join();
    for (const WorkerInfo& w : pool_->Snapshot()) {
      if (!w.healthy) continue;
      absl::MutexLock l(&mu_);
      if (stop_) return;
      Stream& s = streams_[w.address];
      if (s.thread.joinable() || absl::Now() < s.retry_after) continue;
      s.done = false;
      s.ctx = std::make_shared<grpc::ClientContext>();
      s.thread = std::thread([this, address = w.address, ctx = s.ctx] { Follow(address, ctx); });
    }
  }
}

void KvEventSubscriber::Follow(const std::string& address, std::shared_ptr<grpc::ClientContext> ctx) {
  grpc::Status status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker is not in the pool");
  if (std::shared_ptr<grpc::Channel> channel = pool_->Channel(address)) {
    auto stub = v1::Worker::NewStub(channel);
    v1::KvEventsRequest req;
    req.set_subscriber(options_.subscriber);
    std::unique_ptr<grpc::ClientReader<v1::KvEvent>> reader = stub->KvEvents(ctx.get(), req);
    v1::KvEvent event;
    while (reader->Read(&event)) index_->Apply(address, event);
    status = reader->Finish();
  }
  index_->Forget(address);
  absl::MutexLock l(&mu_);
  Stream& s = streams_[address];
  s.done = true;
  if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    s.retry_after = absl::Now() + options_.unimplemented_retry;
  } else if (!stop_) {
    V4LOG(INFO).With("worker", address).With("status", status.error_message())
        << "KV event stream ended; it is reopened while the worker is healthy";
    s.retry_after = absl::Now() + options_.poll_interval;
  }
}

}  // namespace v4serve::router
