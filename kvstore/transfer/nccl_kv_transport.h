// The NCCL KV transport (GPU to GPU): one communicator per (prefill worker, decode worker) pair, created
// on demand. The decode worker makes the unique id (NcclKvReceiver::UniqueIdFor) and sends it to the
// prefill worker inside KvTarget.nccl_unique_id (the Prefill RPC is the gRPC exchange); both join as
// rank 0 (prefill, sender) and rank 1 (decode, receiver). The pair's communicator then carries every
// transfer between the two workers as messages:
//   a fixed 256-byte header (magic, version, flags last/abort, payload bytes, piece bytes, number of
//   chunks, reservation id), then the payload in pieces of at most `piece bytes`
//   (KvTarget.max_chunk_bytes), so a large payload never needs one large staging buffer.
// A sender batches chunks: the chunks of a transfer are gathered until they reach
// NcclKvOptions.batch_bytes (or the last chunk comes), then go as one message whose payload is the
// chunks as records (a 32-byte record header: layer and token range, flags, bytes; then the bytes).
// Every message costs a header, a stream synchronization on the receiver and a few enqueues, so one
// message per layer chunk (2,625 for an 8k-token V4-Flash prompt) cost far more than the bytes did.
// Sends are enqueued on the communicator's stream and return, so the prefill thread computes its next
// block while the previous batch is on the wire; Finish waits for the stream.
//
// Failure handling: a pair whose communicator fails (peer aborted, timeout, mismatched sizes) is torn
// down on both sides and rebuilt with a new unique id by the next request; the receiver fails every
// reservation that was mid-transfer on it (decode then falls back to computing the prefill itself).
//
// Thread-safety: NcclKvReceiver and NcclKvSenders are thread-safe; a sender they make is used by one
// thread.
#ifndef V4SERVE_KVSTORE_TRANSFER_NCCL_KV_TRANSPORT_H_
#define V4SERVE_KVSTORE_TRANSFER_NCCL_KV_TRANSPORT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstore/transfer/kv_transfer.h"
#include "kvstore/transfer/nccl_api.h"

namespace v4serve::kvstore {

inline constexpr size_t kNcclKvHeaderBytes = 256;
inline constexpr size_t kNcclKvMaxReservationId = 200;

// What a message is; where each chunk belongs (layers, tokens, window state) is in its record.
struct NcclKvHeader {
  bool last = false;   // The transfer's last message.
  bool abort = false;  // The sender abandoned the reservation's transfer; no payload.
  uint64_t payload_bytes = 0;
  uint32_t piece_bytes = 0;
  uint32_t num_chunks = 0;  // Chunk records in the payload (a batch); 0 only in an abort.
  std::string reservation_id;
};
std::string EncodeNcclKvHeader(const NcclKvHeader& h);
// DATA_LOSS for a header that is not one (wrong magic, version, sizes).
absl::StatusOr<NcclKvHeader> DecodeNcclKvHeader(const std::string& bytes);

struct NcclKvOptions {
  absl::Duration init_timeout = absl::Seconds(30);  // Both ranks must join within this.
  absl::Duration op_timeout = absl::Seconds(30);    // A message (header + payload) completes within this.
  absl::Duration idle_timeout = absl::Minutes(10);  // A pair idle this long is torn down.
  size_t batch_bytes = 8u << 20;                    // A sender's batch is sent once it holds this much.
};

// The payload of a batch message: each chunk as a 32-byte record header and its bytes.
void AppendNcclKvRecord(const KvTransferChunk& chunk, std::string* batch);
// DATA_LOSS when the payload does not hold exactly `num_chunks` well-formed records.
absl::StatusOr<std::vector<KvTransferChunk>> DecodeNcclKvRecords(const std::string& payload,
                                                                 uint32_t num_chunks);

// Decode side: one receiving thread per prefill worker.
class NcclKvReceiver {
 public:
  NcclKvReceiver(NcclApi* nccl, KvReservations* reservations, NcclKvOptions options);
  ~NcclKvReceiver();  // Aborts every pair and joins their threads.

  // The unique id of the pair with `prefill_worker`, creating it (and its receiving thread, which joins
  // as rank 1) on first use or after the previous one failed.
  absl::StatusOr<std::string> UniqueIdFor(const std::string& prefill_worker);
  int live_pairs() const;

 private:
  struct Pair {
    std::string peer;
    std::string unique_id;
    std::atomic<bool> stop{false};
    absl::Mutex mu;
    std::unique_ptr<NcclComm> comm ABSL_GUARDED_BY(mu);
    bool aborted ABSL_GUARDED_BY(mu) = false;
    std::thread thread;
  };
  void Receive(Pair* pair);
  absl::Status ReceiveOne(NcclComm* comm, absl::flat_hash_set<std::string>* open);
  void AbortPair(Pair* pair);

  NcclApi* const nccl_;
  KvReservations* const reservations_;
  const NcclKvOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Pair>> pairs_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Pair>> retired_ ABSL_GUARDED_BY(mu_);  // Failed pairs, joined later.
};

// Prefill side: the communicators to decode workers, and a sender per transfer.
class NcclKvSenders {
 public:
  NcclKvSenders(NcclApi* nccl, NcclKvOptions options) : nccl_(nccl), options_(options) {}
  ~NcclKvSenders();

  // A sender for `reservation_id` on the pair with `decode_worker` whose unique id is `unique_id`
  // (joining it as rank 0 when the id is new: this waits for the decode worker's rank 1).
  absl::StatusOr<std::unique_ptr<KvSender>> Start(const std::string& decode_worker,
                                                  const std::string& unique_id,
                                                  const std::string& reservation_id, uint32_t piece_bytes);
  int live_pairs() const;

 private:
  friend class NcclKvSender;
  struct Pair {
    std::string unique_id;
    absl::Mutex mu;  // Held for one whole message.
    std::unique_ptr<NcclComm> comm ABSL_GUARDED_BY(mu);
    bool failed ABSL_GUARDED_BY(mu) = false;
  };
  void Drop(const std::string& decode_worker, const std::shared_ptr<Pair>& pair);

  NcclApi* const nccl_;
  const NcclKvOptions options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Pair>> pairs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TRANSFER_NCCL_KV_TRANSPORT_H_
