// Worker.Prefill served by a prefill worker (docs/KV_TRANSFER.md): computes a prompt chunk by chunk with
// model::Model::Prefill (one 128-token block per call, so every block ends on its exact boundary state),
// sends each completed block's compressed entries (per layer group) to the decode worker's reservation as
// soon as it is computed, then the final sliding-window/compressor state, and answers with the first
// token sampled with the request's params and seed.
//
// Prefix reuse: completed blocks (with their boundary state) go into a prefix cache (kvstore's block pool
// and hash-chain cache, as in the engine); a prompt that shares whole blocks with an earlier one of the
// same tenant restores them instead of computing them, and reports them as cached_prompt_tokens.
//
// Concurrency: at most `max_concurrent` requests compute at once (their chunks interleave on the one
// model, whose forward calls are serialized); up to `max_queued` more wait; beyond that Prefill answers
// RESOURCE_EXHAUSTED at once. A request stops between chunks when its caller cancels (the decode worker
// cancels the RPC when its client goes away) or Worker.Cancel names it; its transfer is aborted.
//
// Thread-safety: thread-safe. The model must outlive the service.
#ifndef V4SERVE_PREFILL_PREFILL_SERVICE_H_
#define V4SERVE_PREFILL_PREFILL_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstore/block_pool.h"
#include "kvstore/kv_block.h"
#include "kvstore/kv_events.h"
#include "kvstore/prefix_cache.h"
#include "kvstore/transfer/nccl_kv_transport.h"
#include "model/model.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "services/grpc_server.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::prefill {

struct PrefillServiceOptions {
  int32_t max_concurrent = 4;   // Requests computing at once.
  int32_t max_queued = 16;      // Requests waiting for a slot; more are refused (RESOURCE_EXHAUSTED).
  int64_t prefix_cache_blocks = 256;  // Blocks kept for prefix reuse; 0 = off.
  int32_t layers_per_chunk = 1;  // Compressed layers per KV chunk.
  absl::Duration transfer_timeout = absl::Seconds(60);  // Handshake + KV push, per request.
  services::TlsOptions peer_tls;  // To reach decode workers (PushKv, Handshake).
  kvstore::NcclKvSenders* nccl = nullptr;  // Null: KV_TRANSPORT_NCCL targets are refused.
  kvstore::KvEventHub* kv_events = nullptr;  // Told what the prefix cache holds (Worker.KvEvents).

  absl::Status Validate() const;
};

class PrefillService final : public v1::Worker::CallbackService {
 public:
  PrefillService(const model::Model* model, kvstore::KvLayout layout, PrefillServiceOptions options,
                 prometheus::Registry* metrics);
  ~PrefillService() override;  // Cancels running requests and joins their threads.

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx, const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* request,
                                  v1::WorkerStats* response) override;
  grpc::ServerWriteReactor<v1::KvEvent>* KvEvents(grpc::CallbackServerContext* ctx,
                                                  const v1::KvEventsRequest* request) override;

 private:
  struct Job;
  void Run(const std::shared_ptr<Job>& job);
  absl::Status Compute(Job* job);
  absl::StatusOr<std::unique_ptr<kvstore::KvSender>> StartSender(Job* job);
  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& address);

  // Restores the longest cached prefix of `prompt` (leaving >= 1 token to compute); the state and the
  // number of blocks restored.
  int64_t RestorePrefix(absl::Span<const int32_t> prompt, absl::Span<const kvstore::BlockHash> hashes,
                        model::SequenceState* state);
  void CacheBlock(const model::SequenceState& state, int32_t index, absl::Span<const int32_t> tokens,
                  kvstore::BlockHash hash);

  const model::Model* const model_;
  const kvstore::KvLayout layout_;
  const PrefillServiceOptions options_;
  absl::Mutex model_mu_;  // Forward calls on the model are serialized.
  std::unique_ptr<kvstore::BlockPool> pool_;      // Null when prefix reuse is off.
  std::unique_ptr<kvstore::PrefixCache> cache_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);  // By request id.
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
  int32_t running_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint64_t, std::thread> threads_ ABSL_GUARDED_BY(mu_);  // One per request.
  std::vector<uint64_t> finished_ ABSL_GUARDED_BY(mu_);  // Threads that are done, to join.

  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Counter* kv_bytes_;
  prometheus::Counter* tokens_;
  prometheus::Counter* cached_tokens_;
  prometheus::Gauge* in_flight_;
};

// "ipv4:10.0.0.5:1234" / "ipv6:[::1]:1234" -> "10.0.0.5" / "[::1]"; empty when it is neither.
std::string PeerHost(const std::string& grpc_peer);

}  // namespace v4serve::prefill

#endif  // V4SERVE_PREFILL_PREFILL_SERVICE_H_
