// The KV-transfer interface between a prefill worker (sender) and a decode worker (receiver), with its
// transports (docs/KV_TRANSFER.md): in-process (kv_transfer.h, this file), gRPC streaming
// (grpc_kv_transport.h) and NCCL (nccl_kv_transport.h).
//
// What moves is bytes: kvstore never interprets a payload (it does not depend on model/). The engine
// (engine/kv_transfer_codec.h) fills chunks with the one block format of kvstore/kv_block.h: one chunk per
// (128-token block, layer range), then one final chunk with the sliding-window/compressor state.
//
// Receiver side: the decode worker reserves room for a request's KV (Reserve, a reservation id), hands
// the id to the prefill worker inside a KvTarget, and waits (Await) until the chunk marked `last` has
// arrived, the transfer fails, or a deadline passes. Every transport delivers into the same
// KvReservations. A reservation whose KV never completes is freed by its deadline (Sweep), and later
// chunks for it are refused with NOT_FOUND, so a slow or dead prefill worker never pins decode memory.
//
// Sender side: a KvSender carries the chunks of one request in order and reports the first failure.
//
// Thread-safety: KvReservations is thread-safe. A KvSender is used by one thread.
#ifndef V4SERVE_KVSTORE_TRANSFER_KV_TRANSFER_H_
#define V4SERVE_KVSTORE_TRANSFER_KV_TRANSFER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace v4serve::kvstore {

// One unit of a transfer (mirrors v4serve.v1.KvChunk).
struct KvTransferChunk {
  uint32_t first_layer = 0;  // Index into the KV layout's layer set.
  uint32_t num_layers = 0;
  uint32_t first_token = 0;  // Sequence position of the first token the entries cover.
  uint32_t num_tokens = 0;
  bool window_state = false;  // The payload is the final window/compressor state, not block entries.
  bool last = false;          // The final chunk of the transfer.
  std::string payload;

  bool operator==(const KvTransferChunk&) const = default;
};

// Carries one request's chunks to its reservation, in order.
class KvSender {
 public:
  virtual ~KvSender() = default;
  // Queues or sends one chunk. An error ends the transfer (later calls return it again).
  virtual absl::Status Send(KvTransferChunk chunk) = 0;
  // Waits until every chunk is delivered (the receiver acknowledged the last one) or fails.
  virtual absl::Status Finish() = 0;
  // Abandons the transfer (the request was cancelled or the prefill failed); the receiver is told where
  // the transport can tell it. Idempotent.
  virtual void Abort(const absl::Status& why) = 0;
  // Payload bytes sent so far.
  virtual uint64_t bytes_sent() const = 0;
};

struct KvReservationsOptions {
  int64_t capacity_tokens = 0;                  // The most prompt tokens reserved at once (0 = unlimited).
  int64_t max_chunk_bytes = int64_t{64} << 20;  // A bigger chunk is refused (INVALID_ARGUMENT).
};

// What a completed transfer holds, in arrival order.
struct KvTransferResult {
  std::vector<KvTransferChunk> chunks;
  uint64_t bytes = 0;
};

// Counters for metrics and tests.
struct KvReservationStats {
  int64_t reserved = 0;   // Reserve calls that succeeded.
  int64_t completed = 0;  // Transfers whose last chunk arrived.
  int64_t expired = 0;    // Freed by their deadline before completing.
  int64_t failed = 0;     // Failed by the sender or a transport (Fail).
  int64_t cancelled = 0;  // Released before completing.
  int64_t live = 0;
  int64_t tokens_reserved = 0;
  uint64_t bytes_received = 0;
};

class KvReservations {
 public:
  explicit KvReservations(KvReservationsOptions options, std::function<absl::Time()> now = absl::Now)
      : options_(options), now_(std::move(now)) {}

  // Reserves room for `tokens` prompt tokens until `deadline`; returns the reservation id (unique in
  // this process). RESOURCE_EXHAUSTED when it does not fit; INVALID_ARGUMENT for tokens <= 0.
  absl::StatusOr<std::string> Reserve(const std::string& request_id, int64_t tokens, absl::Time deadline);
  // Adds a chunk. NOT_FOUND for an unknown, expired or released reservation; FAILED_PRECONDITION after
  // its last chunk or after a failure; INVALID_ARGUMENT for an oversized chunk.
  absl::Status Deliver(const std::string& reservation_id, KvTransferChunk chunk);
  // Marks the transfer failed (a transport saw its sender go away); Await returns `why`.
  void Fail(const std::string& reservation_id, const absl::Status& why);
  // Whether the reservation exists and can still take chunks.
  absl::Status Check(const std::string& reservation_id) const;
  // Waits until the last chunk arrived (returns the chunks and releases the reservation), the transfer
  // failed (its error), the reservation's deadline passed (DEADLINE_EXCEEDED; released), or `deadline`
  // passed (DEADLINE_EXCEEDED; the reservation is left to its own deadline).
  absl::StatusOr<KvTransferResult> Await(const std::string& reservation_id, absl::Time deadline);
  // Frees a reservation now (cancelled request). No-op when unknown.
  void Release(const std::string& reservation_id);
  // Frees every reservation past its deadline; returns how many. Await and Deliver sweep too; a server
  // calls this periodically so that abandoned reservations never outlive their deadline by much.
  int Sweep();

  KvReservationStats stats() const;

 private:
  struct Reservation {
    std::string request_id;
    int64_t tokens = 0;
    absl::Time deadline;
    KvTransferResult result;
    bool complete = false;
    absl::Status failure;
  };
  int SweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EraseLocked(const std::string& id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const KvReservationsOptions options_;
  const std::function<absl::Time()> now_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Reservation> live_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t changes_ ABSL_GUARDED_BY(mu_) = 0;  // Bumped by every delivery, failure and release (Await).
  KvReservationStats stats_ ABSL_GUARDED_BY(mu_);
};

// The in-process transport: the sender delivers straight into the receiver's reservations (a prefill
// and a decode service in one process). The reservations must outlive the sender.
class InProcessKvSender final : public KvSender {
 public:
  InProcessKvSender(KvReservations* reservations, std::string reservation_id)
      : reservations_(reservations), reservation_id_(std::move(reservation_id)) {}
  absl::Status Send(KvTransferChunk chunk) override;
  absl::Status Finish() override { return status_; }
  void Abort(const absl::Status& why) override;
  uint64_t bytes_sent() const override { return bytes_; }

 private:
  KvReservations* const reservations_;
  const std::string reservation_id_;
  absl::Status status_;
  uint64_t bytes_ = 0;
  bool aborted_ = false;
};

// Where in-process senders find a receiver: decode services register their reservations under their
// gRPC address, so that a prefill service in the same process delivers without a network hop.
// Thread-safe; a process-wide singleton.
class InProcessKvHub {
 public:
  static InProcessKvHub& Get();
  void Register(const std::string& address, KvReservations* reservations);
  void Unregister(const std::string& address);
  // Null when no receiver in this process serves `address`.
  KvReservations* Find(const std::string& address) const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, KvReservations*> receivers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TRANSFER_KV_TRANSFER_H_
