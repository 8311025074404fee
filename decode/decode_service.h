// Worker.Decode and the KV receive side of a decode worker (docs/KV_TRANSFER.md):
//
//   Decode: admit the request, reserve room for its KV (a reservation id), call the prefill worker's
//   Worker.Prefill with a KvTarget naming the reservation and the transport, wait for the KV (PushKv for
//   gRPC, the pair communicator for NCCL, a direct call in-process), rebuild the SequenceState and hand
//   it to the engine (EngineLoop::SubmitPrefilled), which continues from the prefill worker's first token.
//   A Prefill call or transfer that fails or times out makes this worker compute the prefill itself
//   (v4serve_decode_kv_fallbacks_total{reason}, logged with the request id). A request without a
//   prefill worker (or with n > 1) is computed here directly.
//   PushKv / Handshake: the gRPC transport's receiving end.
//   Cancel: stops a request (its remote prefill too).
// Reservations whose KV never completes are freed by their deadline (--kv_reservation_timeout_ms).
//
// Thread-safety: thread-safe. The loop and the config must outlive the service.
#ifndef V4SERVE_DECODE_DECODE_SERVICE_H_
#define V4SERVE_DECODE_DECODE_SERVICE_H_

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
#include "decode/generate_service.h"
#include "engine/engine_loop.h"
#include "kvstore/kv_block.h"
#include "kvstore/kv_events.h"
#include "kvstore/transfer/kv_transfer.h"
#include "kvstore/transfer/nccl_kv_transport.h"
#include "model/config.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "services/grpc_server.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::decode {

struct DecodeServiceOptions {
  GenerateServiceOptions generate;
  v1::KvTransport transport = v1::KV_TRANSPORT_GRPC;       // What this worker asks prefill workers to use.
  absl::Duration prefill_timeout = absl::Seconds(60);      // Prefill call + KV arrival, per request.
  absl::Duration reservation_timeout = absl::Seconds(90);  // A reservation whose KV never completes is freed.
  int64_t reservation_capacity_tokens = 0;                 // Prompt tokens reserved at once (0 = no cap).
  uint32_t max_chunk_bytes = 4u << 20;                     // KvTarget.max_chunk_bytes (NCCL pieces).
  // Remote prefills in flight at once (each holds a thread while it waits for the prefill worker and the
  // KV); past it a request prefills here, counted as a fallback with reason "busy".
  int max_remote_prefills = 256;
  services::TlsOptions peer_tls;     // To reach prefill workers.
  kvstore::NcclApi* nccl = nullptr;  // Required for KV_TRANSPORT_NCCL.
  kvstore::NcclKvOptions nccl_options;
  kvstore::KvEventHub* kv_events = nullptr;  // The engine's prefix-cache events, for Worker.KvEvents.
};

class DecodeService final : public v1::Worker::CallbackService {
 public:
  DecodeService(engine::EngineLoop* loop, const model::ModelConfig& config, kvstore::KvLayout layout,
                DecodeServiceOptions options, prometheus::Registry* metrics);
  ~DecodeService() override;  // Cancels what is in flight and joins.

  // How prefill workers reach this worker's PushKv/Handshake: "host:port", or ":port" for "the address
  // the Prefill call came from". Call once the gRPC server is bound, before serving Decode.
  void SetAdvertisedAddress(const std::string& address);

  grpc::ServerWriteReactor<v1::GenerateResponse>* Decode(grpc::CallbackServerContext* ctx,
                                                         const v1::DecodeRequest* request) override;
  grpc::ServerReadReactor<v1::KvChunk>* PushKv(grpc::CallbackServerContext* ctx,
                                               v1::KvTransferAck* ack) override;
  grpc::ServerUnaryReactor* Handshake(grpc::CallbackServerContext* ctx, const v1::KvHandshake* request,
                                      v1::KvHandshakeReply* reply) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx, const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* request,
                                  v1::WorkerStats* response) override;
  grpc::ServerWriteReactor<v1::KvEvent>* KvEvents(grpc::CallbackServerContext* ctx,
                                                  const v1::KvEventsRequest* request) override;

  kvstore::KvReservations* reservations() { return &reservations_; }

 private:
  struct Job;
  void RunJob(const std::shared_ptr<Job>& job);
  // Prefill remotely; OK when the engine has the prefilled sequence.
  absl::Status RemotePrefill(const std::shared_ptr<Job>& job);
  void Fallback(const std::shared_ptr<Job>& job, const absl::Status& why);
  void CancelJob(const std::shared_ptr<Job>& job);
  std::shared_ptr<grpc::Channel> ChannelTo(const std::string& address);
  void SweepLoop();

  engine::EngineLoop* const loop_;
  const model::ModelConfig& config_;
  const kvstore::KvLayout layout_;
  const DecodeServiceOptions options_;
  kvstore::KvReservations reservations_;
  std::unique_ptr<kvstore::NcclKvReceiver> nccl_receiver_;
  std::atomic<uint64_t> next_id_{0};

  absl::Mutex mu_;
  std::string advertised_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);  // By public request id.
  absl::flat_hash_map<uint64_t, std::thread> threads_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> finished_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int64_t expired_seen_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread sweeper_;

  prometheus::Family<prometheus::Counter>* fallbacks_;
  prometheus::Family<prometheus::Counter>* transfers_;
  prometheus::Counter* bytes_received_;
  prometheus::Counter* reservations_expired_;
  prometheus::Gauge* reservations_live_;
};

}  // namespace v4serve::decode

#endif  // V4SERVE_DECODE_DECODE_SERVICE_H_
