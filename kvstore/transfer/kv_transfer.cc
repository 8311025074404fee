#include "kvstore/transfer/kv_transfer.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace v4serve::kvstore {

absl::StatusOr<std::string> KvReservations::Reserve(const std::string& request_id, int64_t tokens,
                                                    absl::Time deadline) {
  if (tokens <= 0) return absl::InvalidArgumentError("a KV reservation needs at least one token");
  absl::MutexLock l(&mu_);
  SweepLocked();
  if (options_.capacity_tokens > 0 && stats_.tokens_reserved + tokens > options_.capacity_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat("KV reservations full: ", stats_.tokens_reserved, " of ",
                                                     options_.capacity_tokens, " tokens reserved, ", tokens,
                                                     " more asked for request ", request_id));
  }
  std::string id = absl::StrCat("kvr-", ++next_id_, "-", request_id);
  Reservation& r = live_[id];
  r.request_id = request_id;
  r.tokens = tokens;
  r.deadline = deadline;
  ++stats_.reserved;
  ++stats_.live;
  stats_.tokens_reserved += tokens;
  return id;
}

absl::Status KvReservations::Deliver(const std::string& reservation_id, KvTransferChunk chunk) {
  if (static_cast<int64_t>(chunk.payload.size()) > options_.max_chunk_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("KV chunk of ", chunk.payload.size(),
                                                   " bytes exceeds the limit of ", options_.max_chunk_bytes));
  }
  absl::MutexLock l(&mu_);
  SweepLocked();
  auto it = live_.find(reservation_id);
  if (it == live_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no live KV reservation ", reservation_id, " (expired, cancelled or unknown)"));
  }
  Reservation& r = it->second;
  if (!r.failure.ok())
    return absl::FailedPreconditionError(absl::StrCat("transfer failed: ", r.failure.message()));
  if (r.complete) return absl::FailedPreconditionError("chunk after the transfer's last chunk");
  r.result.bytes += chunk.payload.size();
  stats_.bytes_received += chunk.payload.size();
  r.complete = chunk.last;
  ++changes_;
  if (r.complete) ++stats_.completed;
  r.result.chunks.push_back(std::move(chunk));
  return absl::OkStatus();
}

void KvReservations::Fail(const std::string& reservation_id, const absl::Status& why) {
  absl::MutexLock l(&mu_);
  auto it = live_.find(reservation_id);
  if (it == live_.end() || it->second.complete || !it->second.failure.ok()) return;
  it->second.failure = why.ok() ? absl::AbortedError("transfer failed") : why;
  ++changes_;
  ++stats_.failed;
}

absl::Status KvReservations::Check(const std::string& reservation_id) const {
  absl::MutexLock l(&mu_);
  auto it = live_.find(reservation_id);
  if (it == live_.end() || now_() >= it->second.deadline) {
    return absl::NotFoundError(absl::StrCat("no live KV reservation ", reservation_id));
  }
  if (!it->second.failure.ok() || it->second.complete) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV reservation ", reservation_id, " takes no more chunks"));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvTransferResult> KvReservations::Await(const std::string& reservation_id,
                                                       absl::Time deadline) {
  absl::MutexLock l(&mu_);
  while (true) {
    auto it = live_.find(reservation_id);
    if (it == live_.end()) {
      return absl::DeadlineExceededError(
          absl::StrCat("KV reservation ", reservation_id, " expired or was released before its KV arrived"));
    }
    Reservation& r = it->second;
    if (!r.failure.ok()) {
      absl::Status s = r.failure;
      EraseLocked(reservation_id);
      return s;
    }
    if (r.complete) {
      KvTransferResult result = std::move(r.result);
      EraseLocked(reservation_id);
      return result;
    }
    const absl::Time now = now_();
    if (now >= r.deadline) {
      ++stats_.expired;
      EraseLocked(reservation_id);
      return absl::DeadlineExceededError(
          absl::StrCat("KV for reservation ", reservation_id, " did not arrive before its deadline"));
    }
    if (now >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("still waiting for the KV of ", reservation_id));
    }
    // Wake on any change, or at the earlier deadline (a short poll keeps injected test clocks honest).
    const uint64_t seen = changes_;
    auto changed = [this, seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return changes_ != seen; };
    mu_.AwaitWithTimeout(absl::Condition(&changed),
                         std::min(std::min(r.deadline, deadline) - now, absl::Milliseconds(20)));
  }
}

void KvReservations::Release(const std::string& reservation_id) {
  absl::MutexLock l(&mu_);
  auto it = live_.find(reservation_id);
  if (it == live_.end()) return;
  if (!it->second.complete) ++stats_.cancelled;
  EraseLocked(reservation_id);
}

int KvReservations::Sweep() {
  absl::MutexLock l(&mu_);
  return SweepLocked();
}

int KvReservations::SweepLocked() {
  const absl::Time now = now_();
  std::vector<std::string> expired;
  for (const auto& [id, r] : live_) {
    if (now >= r.deadline) expired.push_back(id);
  }
  for (const std::string& id : expired) {
    ++stats_.expired;
    EraseLocked(id);
  }
  return static_cast<int>(expired.size());
}

void KvReservations::EraseLocked(const std::string& id) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  stats_.tokens_reserved -= it->second.tokens;
  ++changes_;
  --stats_.live;
  live_.erase(it);
}

KvReservationStats KvReservations::stats() const {
  absl::MutexLock l(&mu_);
  return stats_;
}

absl::Status InProcessKvSender::Send(KvTransferChunk chunk) {
  if (aborted_) return absl::CancelledError("transfer aborted");
  if (!status_.ok()) return status_;
  const uint64_t n = chunk.payload.size();
  status_ = reservations_->Deliver(reservation_id_, std::move(chunk));
  if (status_.ok()) bytes_ += n;
  return status_;
}

void InProcessKvSender::Abort(const absl::Status& why) {
  if (aborted_) return;
  aborted_ = true;
  reservations_->Fail(reservation_id_, why);
}

InProcessKvHub& InProcessKvHub::Get() {
  static InProcessKvHub* hub = new InProcessKvHub();
  return *hub;
}

void InProcessKvHub::Register(const std::string& address, KvReservations* reservations) {
  absl::MutexLock l(&mu_);
  receivers_[address] = reservations;
}

void InProcessKvHub::Unregister(const std::string& address) {
  absl::MutexLock l(&mu_);
  receivers_.erase(address);
}

KvReservations* InProcessKvHub::Find(const std::string& address) const {
  absl::MutexLock l(&mu_);
  auto it = receivers_.find(address);
  return it == receivers_.end() ? nullptr : it->second;
}

}  // namespace v4serve::kvstore
