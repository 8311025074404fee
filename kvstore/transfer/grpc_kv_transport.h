// The gRPC streaming KV transport (CPU, any network): the sender calls the decode worker's
// Worker.Handshake (format version, model fingerprint, transport), then streams KvChunk messages on one
// Worker.PushKv client stream and waits for the KvTransferAck. The receiver side is a reactor that the
// decode worker's Worker service returns from PushKv; it delivers every chunk into KvReservations.
//
// Thread-safety: a GrpcKvSender is used by one thread (Abort may come from any); the reactor is gRPC's.
#ifndef V4SERVE_KVSTORE_TRANSFER_GRPC_KV_TRANSPORT_H_
#define V4SERVE_KVSTORE_TRANSFER_GRPC_KV_TRANSPORT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "kvstore/transfer/kv_transfer.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::kvstore {

// The model fingerprint as handshake bytes (8, little-endian).
std::string FingerprintBytes(uint64_t fingerprint);

// What the receiving worker answers to a handshake: accepted when the reservation is live and takes
// chunks, the format version and model fingerprint are its own, and it serves `transport`.
v1::KvHandshakeReply AnswerHandshake(const KvReservations& reservations, const v1::KvHandshake& handshake,
                                     uint64_t model_fingerprint);

class GrpcKvSender final : public KvSender {
 public:
  // Handshakes with the decode worker on `channel` and opens the PushKv stream. FAILED_PRECONDITION with
  // the receiver's reason when it refuses; the gRPC error when it cannot be reached. `deadline` bounds
  // the whole transfer; `request_id` travels as x-request-id.
  static absl::StatusOr<std::unique_ptr<GrpcKvSender>> Start(const std::shared_ptr<grpc::Channel>& channel,
                                                             const v1::KvHandshake& handshake,
                                                             const std::string& request_id,
                                                             absl::Time deadline);
  ~GrpcKvSender() override;

  absl::Status Send(KvTransferChunk chunk) override;
  absl::Status Finish() override;
  void Abort(const absl::Status& why) override;
  uint64_t bytes_sent() const override { return bytes_; }

 private:
  GrpcKvSender() = default;
  absl::Status Close();  // WritesDone + Finish, once.

  std::string reservation_id_;
  std::unique_ptr<v1::Worker::Stub> stub_;
  grpc::ClientContext ctx_;
  v1::KvTransferAck ack_;
  std::unique_ptr<grpc::ClientWriter<v1::KvChunk>> writer_;
  absl::Status status_;
  bool closed_ = false;
  uint64_t bytes_ = 0;
};

// The receiving end of one PushKv stream. Create it from Worker::CallbackService::PushKv:
//   return new PushKvReactor(&reservations, ack);
class PushKvReactor final : public grpc::ServerReadReactor<v1::KvChunk> {
 public:
  PushKvReactor(KvReservations* reservations, v1::KvTransferAck* ack);
  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

 private:
  KvReservations* const reservations_;
  v1::KvTransferAck* const ack_;
  v1::KvChunk chunk_;
  std::string reservation_id_;
  uint64_t bytes_ = 0;
  uint32_t tokens_complete_ = 0;
  std::atomic<bool> last_seen_{false};
  bool finished_ = false;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TRANSFER_GRPC_KV_TRANSPORT_H_
