#include "kvstore/transfer/nccl_kv_transport.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/logging.h"

namespace v4serve::kvstore {
namespace {

constexpr uint32_t kMagic = 0x4E4B3456;  // "V4KN"
constexpr uint16_t kVersion = 3;         // 2: batches of chunk records; 3: without v1's layer/token fields.
constexpr size_t kRecordBytes = 32;
constexpr uint16_t kFlagLast = 1, kFlagWindow = 2, kFlagAbort = 4;

template <typename T>
void Put(std::string* out, size_t* off, T v) {
  std::memcpy(out->data() + *off, &v, sizeof(T));  // Little-endian hosts only (x86-64, aarch64).
  *off += sizeof(T);
}
template <typename T>
T Get(const std::string& in, size_t* off) {
  T v;
  std::memcpy(&v, in.data() + *off, sizeof(T));
  *off += sizeof(T);
  return v;
}

}  // namespace

std::string EncodeNcclKvHeader(const NcclKvHeader& h) {
  std::string out(kNcclKvHeaderBytes, '\0');
  size_t off = 0;
  Put<uint32_t>(&out, &off, kMagic);
  Put<uint16_t>(&out, &off, kVersion);
  Put<uint16_t>(&out, &off, static_cast<uint16_t>((h.last ? kFlagLast : 0) | (h.abort ? kFlagAbort : 0)));
  Put<uint64_t>(&out, &off, h.payload_bytes);
  Put<uint32_t>(&out, &off, h.piece_bytes);
  Put<uint32_t>(&out, &off, h.num_chunks);
  const size_t n = std::min(h.reservation_id.size(), kNcclKvMaxReservationId);
  Put<uint32_t>(&out, &off, static_cast<uint32_t>(n));
  std::memcpy(out.data() + off, h.reservation_id.data(), n);
  return out;
}

absl::StatusOr<NcclKvHeader> DecodeNcclKvHeader(const std::string& in) {
  if (in.size() != kNcclKvHeaderBytes) return absl::DataLossError("NCCL KV header has the wrong size");
  size_t off = 0;
  if (Get<uint32_t>(in, &off) != kMagic) return absl::DataLossError("NCCL KV header: bad magic");
  if (Get<uint16_t>(in, &off) != kVersion) return absl::DataLossError("NCCL KV header: unknown version");
  const uint16_t flags = Get<uint16_t>(in, &off);
  NcclKvHeader h;
  if ((flags & ~(kFlagLast | kFlagAbort)) != 0) return absl::DataLossError("NCCL KV header: unknown flags");
  h.last = (flags & kFlagLast) != 0;
  h.abort = (flags & kFlagAbort) != 0;
  h.payload_bytes = Get<uint64_t>(in, &off);
  h.piece_bytes = Get<uint32_t>(in, &off);
  h.num_chunks = Get<uint32_t>(in, &off);
  const uint32_t n = Get<uint32_t>(in, &off);
  if (n == 0 || n > kNcclKvMaxReservationId) return absl::DataLossError("NCCL KV header: bad reservation id");
  if (h.payload_bytes > 0 && h.piece_bytes == 0)
    return absl::DataLossError("NCCL KV header: zero piece size");
  // Every data message is a batch of at least one chunk record; only an abort carries none.
  if (!h.abort && h.num_chunks == 0)
    return absl::DataLossError("NCCL KV header: a data message without chunks");
  if (h.payload_bytes / kRecordBytes < h.num_chunks)
    return absl::DataLossError("NCCL KV header: more chunks than the payload can hold");
  h.reservation_id.assign(in.data() + off, n);
  return h;
}

void AppendNcclKvRecord(const KvTransferChunk& c, std::string* batch) {
  size_t off = batch->size();
  batch->resize(off + kRecordBytes);
  Put<uint32_t>(batch, &off, c.first_layer);
  Put<uint32_t>(batch, &off, c.num_layers);
  Put<uint32_t>(batch, &off, c.first_token);
  Put<uint32_t>(batch, &off, c.num_tokens);
  Put<uint16_t>(batch, &off,
                static_cast<uint16_t>((c.last ? kFlagLast : 0) | (c.window_state ? kFlagWindow : 0)));
  Put<uint16_t>(batch, &off, 0);
  Put<uint32_t>(batch, &off, 0);
  Put<uint64_t>(batch, &off, c.payload.size());
  batch->append(c.payload);
}

absl::StatusOr<std::vector<KvTransferChunk>> DecodeNcclKvRecords(const std::string& payload,
                                                                 uint32_t num_chunks) {
  std::vector<KvTransferChunk> out;
  out.reserve(num_chunks);
  size_t off = 0;
  for (uint32_t i = 0; i < num_chunks; ++i) {
    if (payload.size() - off < kRecordBytes) return absl::DataLossError("NCCL KV batch: truncated record");
    KvTransferChunk c;
    c.first_layer = Get<uint32_t>(payload, &off);
    c.num_layers = Get<uint32_t>(payload, &off);
    c.first_token = Get<uint32_t>(payload, &off);
    c.num_tokens = Get<uint32_t>(payload, &off);
    const uint16_t flags = Get<uint16_t>(payload, &off);
    off += 2 + 4;
    const uint64_t bytes = Get<uint64_t>(payload, &off);
    if ((flags & ~(kFlagLast | kFlagWindow)) != 0)
      return absl::DataLossError("NCCL KV batch: bad record flags");
    if (bytes > payload.size() - off)
      return absl::DataLossError("NCCL KV batch: record overruns the payload");
    c.last = (flags & kFlagLast) != 0;
    c.window_state = (flags & kFlagWindow) != 0;
    c.payload.assign(payload.data() + off, bytes);
    off += bytes;
    out.push_back(std::move(c));
  }
  if (off != payload.size()) return absl::DataLossError("NCCL KV batch: bytes after the last record");
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Receiver (decode worker).

NcclKvReceiver::NcclKvReceiver(NcclApi* nccl, KvReservations* reservations, NcclKvOptions options)
    : nccl_(nccl), reservations_(reservations), options_(options) {}

NcclKvReceiver::~NcclKvReceiver() {
  std::vector<std::shared_ptr<Pair>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [peer, p] : pairs_) all.push_back(p);
    pairs_.clear();
    for (auto& p : retired_) all.push_back(p);
    retired_.clear();
  }
  for (auto& p : all) AbortPair(p.get());
  for (auto& p : all) {
    if (p->thread.joinable()) p->thread.join();
  }
}

absl::StatusOr<std::string> NcclKvReceiver::UniqueIdFor(const std::string& prefill_worker) {
  absl::MutexLock l(&mu_);
  // Join the threads of pairs that failed since (never while they might still be joining).
  for (auto it = retired_.begin(); it != retired_.end();) {
    if ((*it)->stop.load() && (*it)->thread.joinable()) {
      (*it)->thread.join();
      it = retired_.erase(it);
    } else {
      ++it;
    }
  }
  auto it = pairs_.find(prefill_worker);
  if (it != pairs_.end()) return it->second->unique_id;
  absl::StatusOr<std::string> id = nccl_->GetUniqueId();
  if (!id.ok()) {
    return absl::Status(id.status().code(),
                        absl::StrCat("NCCL unique id for ", prefill_worker, ": ", id.status().message()));
  }
  auto pair = std::make_shared<Pair>();
  pair->peer = prefill_worker;
  pair->unique_id = *id;
  pairs_[prefill_worker] = pair;
  pair->thread = std::thread([this, p = pair.get()] { Receive(p); });
  return *id;
}

int NcclKvReceiver::live_pairs() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(pairs_.size());
}

void NcclKvReceiver::AbortPair(Pair* pair) {
  pair->stop = true;
  absl::MutexLock l(&pair->mu);
  pair->aborted = true;
  if (pair->comm) pair->comm->Abort();
}

void NcclKvReceiver::Receive(Pair* pair) {
  absl::StatusOr<std::unique_ptr<NcclComm>> comm =
      nccl_->CommInitRank(2, pair->unique_id, 1, options_.init_timeout);
  absl::Status status = comm.status();
  NcclComm* c = nullptr;
  if (comm.ok()) {
    absl::MutexLock l(&pair->mu);
    if (pair->aborted) {
      (*comm)->Abort();
      status = absl::CancelledError("receiver shutting down");
    }
    pair->comm = std::move(*comm);
    c = pair->comm.get();
  }
  absl::flat_hash_set<std::string> open;  // Reservations mid-transfer on this pair.
  while (status.ok() && !pair->stop) status = ReceiveOne(c, &open);
  if (!pair->stop) {
    V4LOG(WARNING).With("prefill_worker", pair->peer).With("status", status)
        << "NCCL KV pair failed; the next request builds a new one";
  }
  for (const std::string& id : open) {
    reservations_->Fail(
        id, absl::AbortedError(absl::StrCat("NCCL pair with ", pair->peer, " failed: ", status.message())));
  }
  {
    absl::MutexLock l(&mu_);
    auto it = pairs_.find(pair->peer);
    if (it != pairs_.end() && it->second.get() == pair) {
      retired_.push_back(it->second);
      pairs_.erase(it);
    }
  }
  AbortPair(pair);
}

absl::Status NcclKvReceiver::ReceiveOne(NcclComm* comm, absl::flat_hash_set<std::string>* open) {
  std::string hdr(kNcclKvHeaderBytes, '\0');
  if (absl::Status s = comm->Recv(hdr.data(), hdr.size(), 0); !s.ok()) return s;
  if (absl::Status s = comm->StreamSync(options_.idle_timeout); !s.ok()) return s;
  absl::StatusOr<NcclKvHeader> h = DecodeNcclKvHeader(hdr);
  if (!h.ok()) return h.status();  // The stream is out of step: the pair is unusable.
  if (h->abort) {
    reservations_->Fail(h->reservation_id, absl::AbortedError("the prefill worker abandoned the transfer"));
    open->erase(h->reservation_id);
    return absl::OkStatus();
  }
  std::string payload(h->payload_bytes, '\0');
  for (uint64_t off = 0; off < h->payload_bytes; off += h->piece_bytes) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(h->piece_bytes, h->payload_bytes - off));
    if (absl::Status s = comm->Recv(payload.data() + off, n, 0); !s.ok()) return s;
  }
  if (h->payload_bytes > 0) {
    if (absl::Status s = comm->StreamSync(options_.op_timeout); !s.ok()) {
      open->insert(h->reservation_id);
      return s;
    }
  }
  absl::StatusOr<std::vector<KvTransferChunk>> chunks = DecodeNcclKvRecords(payload, h->num_chunks);
  if (!chunks.ok()) {
    // The message arrived whole but its content is wrong: fail this transfer, keep the pair.
    reservations_->Fail(h->reservation_id, chunks.status());
    open->erase(h->reservation_id);
    return absl::OkStatus();
  }
  const std::string id = h->reservation_id;
  for (KvTransferChunk& chunk : *chunks) {
    const bool last = chunk.last;
    if (absl::Status s = reservations_->Deliver(id, std::move(chunk)); !s.ok()) {
      // The reservation expired or was released: drop its chunks, keep the pair.
      V4LOG(DEBUG).With("reservation", id).With("status", s) << "NCCL KV chunk dropped";
      open->erase(id);
      return absl::OkStatus();
    }
    if (last) {
      open->erase(id);
    } else {
      open->insert(id);
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------------
// Senders (prefill worker).

class NcclKvSender final : public KvSender {
 public:
  NcclKvSender(NcclKvSenders* owner, std::string peer, std::shared_ptr<NcclKvSenders::Pair> pair,
               std::string reservation_id, uint32_t piece_bytes, absl::Duration op_timeout,
               size_t batch_bytes)
      : owner_(owner),
        peer_(std::move(peer)),
        pair_(std::move(pair)),
        reservation_id_(std::move(reservation_id)),
        piece_bytes_(piece_bytes),
        op_timeout_(op_timeout),
        batch_bytes_(batch_bytes) {}
  ~NcclKvSender() override {
    if (!finished_) Abort(absl::CancelledError("sender destroyed"));
  }

  absl::Status Send(KvTransferChunk chunk) override {
    if (!status_.ok()) return status_;
    if (finished_) return status_ = absl::FailedPreconditionError("KV sender already finished");
    AppendNcclKvRecord(chunk, &batch_);
    ++batch_chunks_;
    batch_payload_ += chunk.payload.size();
    if (chunk.last || batch_.size() >= batch_bytes_) return Flush(chunk.last);
    return status_;
  }

  absl::Status Finish() override {
    if (!status_.ok()) return status_;
    if (batch_chunks_ > 0 && !Flush(/*last=*/false).ok()) return status_;
    finished_ = true;
    absl::MutexLock l(&pair_->mu);
    if (pair_->failed) return status_ = absl::UnavailableError("NCCL pair failed");
    status_ = pair_->comm->StreamSync(op_timeout_);
    if (!status_.ok()) FailPairLocked();
    return status_;
  }

  void Abort(const absl::Status& why) override {
    if (finished_) return;
    finished_ = true;
    batch_.clear();
    batch_chunks_ = 0;
    if (status_.ok()) {
      NcclKvHeader h;
      h.abort = true;
      h.reservation_id = reservation_id_;
      SendMessage(h, "").IgnoreError();  // Best effort: the receiver also times the reservation out.
      status_ = why.ok() ? absl::CancelledError("KV transfer aborted") : why;
    }
  }

  uint64_t bytes_sent() const override { return bytes_; }

 private:
  // Sends the gathered chunks as one message.
  absl::Status Flush(bool last) {
    NcclKvHeader h;
    h.last = last;
    h.payload_bytes = batch_.size();
    h.piece_bytes = piece_bytes_;
    h.num_chunks = batch_chunks_;
    h.reservation_id = reservation_id_;
    status_ = SendMessage(h, batch_);
    if (status_.ok()) bytes_ += batch_payload_;
    batch_.clear();
    batch_chunks_ = 0;
    batch_payload_ = 0;
    return status_;
  }

  absl::Status SendMessage(const NcclKvHeader& h, const std::string& payload) {
    absl::MutexLock l(&pair_->mu);
    if (pair_->failed) return absl::UnavailableError(absl::StrCat("NCCL pair with ", peer_, " failed"));
    NcclComm* comm = pair_->comm.get();
    const std::string hdr = EncodeNcclKvHeader(h);
    absl::Status s = comm->Send(hdr.data(), hdr.size(), 1);
    for (size_t off = 0; s.ok() && off < payload.size(); off += piece_bytes_) {
      s = comm->Send(payload.data() + off, std::min<size_t>(piece_bytes_, payload.size() - off), 1);
    }
    if (!s.ok()) FailPairLocked();
    return s;
  }

  void FailPairLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(pair_->mu) {
    pair_->failed = true;
    pair_->comm->Abort();
    owner_->Drop(peer_, pair_);
  }

  NcclKvSenders* const owner_;
  const std::string peer_;
  std::shared_ptr<NcclKvSenders::Pair> pair_;
  const std::string reservation_id_;
  const uint32_t piece_bytes_;
  const absl::Duration op_timeout_;
  const size_t batch_bytes_;
  std::string batch_;  // Records not sent yet.
  uint32_t batch_chunks_ = 0;
  uint64_t batch_payload_ = 0;
  absl::Status status_;
  uint64_t bytes_ = 0;
  bool finished_ = false;
};

NcclKvSenders::~NcclKvSenders() {
  std::vector<std::shared_ptr<Pair>> all;
  {
    absl::MutexLock l(&mu_);
    for (auto& [peer, p] : pairs_) all.push_back(p);
    pairs_.clear();
  }
  for (auto& p : all) {
    absl::MutexLock pl(&p->mu);
    if (p->comm) p->comm->Abort();
  }
}

void NcclKvSenders::Drop(const std::string& decode_worker, const std::shared_ptr<Pair>& pair) {
  absl::MutexLock l(&mu_);
  auto it = pairs_.find(decode_worker);
  if (it != pairs_.end() && it->second == pair) pairs_.erase(it);
}

int NcclKvSenders::live_pairs() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(pairs_.size());
}

absl::StatusOr<std::unique_ptr<KvSender>> NcclKvSenders::Start(const std::string& decode_worker,
                                                               const std::string& unique_id,
                                                               const std::string& reservation_id,
                                                               uint32_t piece_bytes) {
  if (reservation_id.empty() || reservation_id.size() > kNcclKvMaxReservationId) {
    return absl::InvalidArgumentError("NCCL KV transfer: reservation id empty or too long");
  }
  if (unique_id.size() != kNcclUniqueIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("KvTarget.nccl_unique_id must be ", kNcclUniqueIdBytes,
                                                   " bytes, got ", unique_id.size()));
  }
  if (piece_bytes == 0) return absl::InvalidArgumentError("NCCL KV transfer: zero chunk size");
  std::shared_ptr<Pair> pair;
  std::shared_ptr<Pair> stale;
  {
    absl::MutexLock l(&mu_);
    std::shared_ptr<Pair>& slot = pairs_[decode_worker];
    if (slot != nullptr && slot->unique_id != unique_id) {
      stale = std::move(slot);  // The decode worker rebuilt the pair (the old one failed on its side).
      slot = nullptr;
    }
    if (slot == nullptr) {
      slot = std::make_shared<Pair>();
      slot->unique_id = unique_id;
    }
    pair = slot;
  }
  if (stale != nullptr) {
    absl::MutexLock pl(&stale->mu);
    stale->failed = true;
    if (stale->comm) stale->comm->Abort();
  }
  absl::MutexLock pl(&pair->mu);
  if (!pair->failed && pair->comm == nullptr) {
    absl::StatusOr<std::unique_ptr<NcclComm>> comm =
        nccl_->CommInitRank(2, unique_id, 0, options_.init_timeout);
    if (!comm.ok()) {
      pair->failed = true;
      Drop(decode_worker, pair);
      return absl::Status(comm.status().code(),
                          absl::StrCat("NCCL pair with ", decode_worker, ": ", comm.status().message()));
    }
    pair->comm = std::move(*comm);
  }
  if (pair->failed) return absl::UnavailableError(absl::StrCat("NCCL pair with ", decode_worker, " failed"));
  return std::unique_ptr<KvSender>(new NcclKvSender(this, decode_worker, pair, reservation_id, piece_bytes,
                                                    options_.op_timeout,
                                                    std::max<size_t>(options_.batch_bytes, 1)));
}

}  // namespace v4serve::kvstore
