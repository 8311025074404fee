// The KvStore gRPC service (proto/v4serve/v1/kvstore.proto) over a TieredStore, and the client that
// workers use to share one store per node (docs/KV_STORE.md "Service").
//
//   KvStoreService     Get / Put / Lookup / Events. Put verifies the block's checksum and header before
//                      queueing it (bad bytes are INVALID_ARGUMENT, never stored); Events streams every
//                      stored / evicted event (the hook for the router's prefix index); a subscriber
//                      that cannot keep up loses events (counted), it never slows the store.
//   GrpcKvStoreClient  a KvStoreClient over a channel: Lookup and Get are unary calls with a deadline
//                      (a slow or absent store is a miss, never a stall of the engine beyond it); PutAsync
//                      is write-behind on a bounded queue with one sender thread.
//
// Thread-safe.
#ifndef V4SERVE_KVSTORE_KVSTORE_SERVICE_H_
#define V4SERVE_KVSTORE_KVSTORE_SERVICE_H_

#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/kv_store_client.h"
#include "kvstore/tiered_store.h"
#include "v4serve/v1/kvstore.grpc.pb.h"

namespace v4serve::kvstore {

// Salt of a request: `salt` when non-zero, else the stable hash of `tenant`, else 0.
uint64_t TenantSalt(const std::string& tenant, uint64_t salt);

class KvStoreService final : public v1::KvStore::CallbackService {
 public:
  // `holder` is reported in events (this store's host:port). The store must outlive the service.
  KvStoreService(TieredStore* store, std::string holder) : store_(store), holder_(std::move(holder)) {}
  // The address reported in events, once the port is known (before serving).
  void set_holder(std::string holder) { holder_ = std::move(holder); }

  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* ctx, const v1::GetBlockRequest* request,
                                v1::GetBlockResponse* response) override;
  grpc::ServerUnaryReactor* Put(grpc::CallbackServerContext* ctx, const v1::PutBlockRequest* request,
                                v1::PutBlockResponse* response) override;
  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx, const v1::LookupRequest* request,
                                   v1::LookupResponse* response) override;
  grpc::ServerWriteReactor<v1::KvEvent>* Events(grpc::CallbackServerContext* ctx,
                                                const v1::KvEventsRequest* request) override;

  int64_t events_dropped() const { return events_dropped_.load(); }

 private:
  TieredStore* const store_;
  std::string holder_;
  std::atomic<int64_t> events_dropped_{0};
};

struct GrpcKvStoreClientOptions {
  absl::Duration deadline = absl::Milliseconds(500);  // Per Lookup / Get / Put call.
  // After a failed call (store down or slow), Lookups answer "nothing cached" at once for this long, so
  // that an absent store costs the engine one deadline, not one per request.
  absl::Duration backoff = absl::Seconds(5);
  int32_t write_queue_blocks = 256;
};

class GrpcKvStoreClient final : public KvStoreClient {
 public:
  GrpcKvStoreClient(std::shared_ptr<grpc::Channel> channel, GrpcKvStoreClientOptions options = {});
  ~GrpcKvStoreClient() override;  // Sends what is queued, then stops.

  absl::StatusOr<LookupResult> Lookup(const StoreScope& scope, absl::Span<const uint64_t> hashes) override;
  absl::StatusOr<StoredBlock> Get(const StoreScope& scope, uint64_t hash, bool with_state) override;
  bool PutAsync(const StoreScope& scope, StoredBlock block) override;
  void Flush() override;

  int64_t put_drops() const { return put_drops_.load(); }
  int64_t put_errors() const { return put_errors_.load(); }

 private:
  void SenderLoop();
  bool Unavailable();
  void NoteFailure(const grpc::Status& st);

  const GrpcKvStoreClientOptions options_;
  std::unique_ptr<v1::KvStore::Stub> stub_;
  absl::Mutex mu_;
  absl::CondVar cv_, idle_cv_;
  std::deque<std::pair<StoreScope, StoredBlock>> queue_ ABSL_GUARDED_BY(mu_);
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> put_drops_{0}, put_errors_{0};
  std::atomic<int64_t> unavailable_until_ns_{0};
  std::thread sender_;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KVSTORE_SERVICE_H_
