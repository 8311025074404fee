#include "kvstore/kv_events_stream.h"

#include <memory>
#include <thread>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "kvstore/prefix_cache.h"

namespace v4serve::kvstore {

v1::KvEvent ToKvEventProto(const KvEventHub& hub, const KvEventBatch& batch, const std::string& holder) {
  v1::KvEvent e;
  e.set_kind(batch.kind == KvEventBatch::Kind::kStored ? v1::KvEvent::KIND_STORED : v1::KvEvent::KIND_EVICTED);
  for (BlockHash h : batch.hashes) e.add_blocks()->set_hash(BlockHashBytes(h));
  e.set_holder(holder);
  e.set_tier("device");  // the worker's own cache (host memory on CPU workers)
  e.set_model_fingerprint(hub.model_fingerprint());
  e.set_block_tokens(static_cast<uint32_t>(hub.block_tokens()));
  e.set_snapshot(batch.snapshot);
  return e;
}

namespace {

class KvEventsReactor : public grpc::ServerWriteReactor<v1::KvEvent> {
 public:
  KvEventsReactor(KvEventHub* hub, std::string holder) : hub_(hub), holder_(std::move(holder)) {
    // The thread owns everything it touches after Finish: the reactor may be deleted (OnDone) then.
    thread_ = std::thread([this] { Run(); });
    thread_.detach();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&mu_);
    writing_ = false;
    if (!ok) broken_ = true;
  }
  void OnCancel() override {
    absl::MutexLock l(&mu_);
    broken_ = true;
  }
  void OnDone() override { delete this; }

 private:
  void Run() {
    std::unique_ptr<KvEventHub::Subscription> sub = hub_->Subscribe();
    KvEventBatch batch;
    grpc::Status end = grpc::Status::OK;
    while (true) {
      {
        absl::MutexLock l(&mu_);
        mu_.Await(absl::Condition(
            +[](KvEventsReactor* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) { return !r->writing_ || r->broken_; },
            this));
        if (broken_) break;
      }
      if (!sub->Next(&batch, absl::Milliseconds(200))) {
        if (hub_->closed()) {
          end = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker is shutting down");
          break;
        }
        continue;
      }
      {
        absl::MutexLock l(&mu_);
        if (broken_) break;
        writing_ = true;
        message_ = ToKvEventProto(*hub_, batch, holder_);
      }
      StartWrite(&message_);
    }
    sub.reset();
    {
      // Wait for a write in flight to complete before finishing (gRPC allows one outstanding op pair).
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](KvEventsReactor* r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(r->mu_) { return !r->writing_; }, this));
    }
    Finish(end);  // OnDone may delete this at any point from here on.
  }

  KvEventHub* const hub_;
  const std::string holder_;
  std::thread thread_;
  absl::Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  v1::KvEvent message_;
};

class UnimplementedReactor : public grpc::ServerWriteReactor<v1::KvEvent> {
 public:
  UnimplementedReactor() {
    Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "this worker keeps no prefix cache"));
  }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<v1::KvEvent>* StreamKvEvents(KvEventHub* hub, std::string holder) {
  if (hub == nullptr) return new UnimplementedReactor();
  return new KvEventsReactor(hub, std::move(holder));
}

}  // namespace v4serve::kvstore
