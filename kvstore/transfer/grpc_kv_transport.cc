#include "kvstore/transfer/grpc_kv_transport.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/kv_block.h"
#include "services/request_id.h"
#include "services/status_mapping.h"

namespace v4serve::kvstore {

std::string FingerprintBytes(uint64_t fingerprint) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((fingerprint >> (8 * i)) & 0xFF);
  return out;
}

v1::KvHandshakeReply AnswerHandshake(const KvReservations& reservations, const v1::KvHandshake& handshake,
                                     uint64_t model_fingerprint) {
  v1::KvHandshakeReply reply;
  auto refuse = [&reply](std::string reason) {
    reply.set_accepted(false);
    reply.set_reason(std::move(reason));
    return reply;
  };
  if (handshake.format_version() != kKvBlockFormatVersion) {
    return refuse(absl::StrCat("KV block format version ", handshake.format_version(),
                               " is not this worker's (", kKvBlockFormatVersion, ")"));
  }
  if (handshake.model_fingerprint() != FingerprintBytes(model_fingerprint)) {
    return refuse("model fingerprint differs: the prefill and decode workers serve different checkpoints");
  }
  if (handshake.transport() != v1::KV_TRANSPORT_GRPC && handshake.transport() != v1::KV_TRANSPORT_NCCL &&
      handshake.transport() != v1::KV_TRANSPORT_IN_PROCESS) {
    return refuse("unknown KV transport");
  }
  if (absl::Status s = reservations.Check(handshake.reservation_id()); !s.ok()) {
    return refuse(std::string(s.message()));
  }
  reply.set_accepted(true);
  return reply;
}

absl::StatusOr<std::unique_ptr<GrpcKvSender>> GrpcKvSender::Start(
    const std::shared_ptr<grpc::Channel>& channel, const v1::KvHandshake& handshake,
    const std::string& request_id, absl::Time deadline) {
  std::unique_ptr<GrpcKvSender> s(new GrpcKvSender());
  s->reservation_id_ = handshake.reservation_id();
  s->stub_ = v1::Worker::NewStub(channel);
  {
    grpc::ClientContext hs_ctx;
    services::AttachRequestId(hs_ctx, request_id);
    hs_ctx.set_deadline(absl::ToChronoTime(deadline));
    v1::KvHandshakeReply reply;
    grpc::Status st = s->stub_->Handshake(&hs_ctx, handshake, &reply);
    if (!st.ok()) {
      absl::Status as = services::FromGrpcStatus(st);
      return absl::Status(as.code(), absl::StrCat("KV handshake with the decode worker: ", as.message()));
    }
    if (!reply.accepted()) {
      return absl::FailedPreconditionError(
          absl::StrCat("decode worker refused the KV transfer: ", reply.reason()));
    }
  }
  services::AttachRequestId(s->ctx_, request_id);
  s->ctx_.set_deadline(absl::ToChronoTime(deadline));
  s->writer_ = s->stub_->PushKv(&s->ctx_, &s->ack_);
  return s;
}

GrpcKvSender::~GrpcKvSender() {
  if (writer_ != nullptr && !closed_) Abort(absl::CancelledError("sender destroyed"));
}

absl::Status GrpcKvSender::Send(KvTransferChunk chunk) {
  if (!status_.ok()) return status_;
  if (closed_) return absl::FailedPreconditionError("KV transfer already finished");
  v1::KvChunk m;
  m.set_reservation_id(reservation_id_);
  m.set_first_layer(chunk.first_layer);
  m.set_num_layers(chunk.num_layers);
  m.set_first_token(chunk.first_token);
  m.set_num_tokens(chunk.num_tokens);
  m.set_window_state(chunk.window_state);
  m.set_last(chunk.last);
  const uint64_t n = chunk.payload.size();
  *m.mutable_payload() = std::move(chunk.payload);
  if (!writer_->Write(m)) {
    // The stream broke: the receiver's status says why.
    status_ = Close();
    if (status_.ok()) status_ = absl::UnavailableError("KV stream closed by the decode worker");
    return status_;
  }
  bytes_ += n;
  return absl::OkStatus();
}

absl::Status GrpcKvSender::Close() {
  if (closed_) return status_;
  closed_ = true;
  writer_->WritesDone();
  grpc::Status st = writer_->Finish();
  if (!st.ok()) {
    absl::Status as = services::FromGrpcStatus(st);
    return absl::Status(as.code(), absl::StrCat("KV push to the decode worker: ", as.message()));
  }
  return absl::OkStatus();
}

absl::Status GrpcKvSender::Finish() {
  if (!status_.ok()) return status_;
  status_ = Close();
  if (!status_.ok()) return status_;
  if (ack_.bytes_received() != bytes_) {
    status_ = absl::DataLossError(
        absl::StrCat("decode worker acknowledged ", ack_.bytes_received(), " of ", bytes_, " KV bytes"));
  }
  return status_;
}

void GrpcKvSender::Abort(const absl::Status& why) {
  if (closed_) return;
  ctx_.TryCancel();  // The receiver's OnCancel fails the reservation.
  closed_ = true;
  writer_->Finish().ok();  // Reaps the call; its status is CANCELLED.
  if (status_.ok()) status_ = why.ok() ? absl::CancelledError("KV transfer aborted") : why;
}

PushKvReactor::PushKvReactor(KvReservations* reservations, v1::KvTransferAck* ack)
    : reservations_(reservations), ack_(ack) {
  StartRead(&chunk_);
}

void PushKvReactor::OnReadDone(bool ok) {
  if (finished_) return;
  if (!ok) {  // The sender closed its side.
    ack_->set_reservation_id(reservation_id_);
    ack_->set_bytes_received(bytes_);
    ack_->set_tokens_complete(tokens_complete_);
    finished_ = true;
    if (!last_seen_ && !reservation_id_.empty()) {
      reservations_->Fail(reservation_id_, absl::AbortedError("KV stream ended before its last chunk"));
    }
    Finish(last_seen_ || reservation_id_.empty()
               ? grpc::Status::OK
               : grpc::Status(grpc::StatusCode::ABORTED, "KV stream ended before its last chunk"));
    return;
  }
  if (reservation_id_.empty()) reservation_id_ = chunk_.reservation_id();
  if (chunk_.reservation_id() != reservation_id_) {
    finished_ = true;
    reservations_->Fail(reservation_id_,
                        absl::InvalidArgumentError("one PushKv stream carried two reservations"));
    Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "one PushKv stream must carry one reservation"));
    return;
  }
  KvTransferChunk c;
  c.first_layer = chunk_.first_layer();
  c.num_layers = chunk_.num_layers();
  c.first_token = chunk_.first_token();
  c.num_tokens = chunk_.num_tokens();
  c.window_state = chunk_.window_state();
  c.last = chunk_.last();
  const uint64_t n = chunk_.payload().size();
  c.payload = std::move(*chunk_.mutable_payload());
  const uint32_t end = c.first_token + c.num_tokens;
  if (absl::Status s = reservations_->Deliver(reservation_id_, std::move(c)); !s.ok()) {
    finished_ = true;
    Finish(services::ToGrpcStatus(s));
    return;
  }
  bytes_ += n;
  if (!chunk_.window_state() && end > tokens_complete_) tokens_complete_ = end;
  last_seen_ = last_seen_ || chunk_.last();
  StartRead(&chunk_);
}

void PushKvReactor::OnCancel() {
  if (!last_seen_ && !reservation_id_.empty()) {
    reservations_->Fail(reservation_id_, absl::CancelledError("the prefill worker cancelled the KV stream"));
  }
}

}  // namespace v4serve::kvstore
