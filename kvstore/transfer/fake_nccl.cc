#include "kvstore/transfer/fake_nccl.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace v4serve::kvstore {

class FakeNcclComm final : public NcclComm {
 public:
  FakeNcclComm(std::shared_ptr<FakeNcclWorld> world, std::shared_ptr<FakeNcclWorld::Group> group, int rank)
      : world_(std::move(world)), group_(std::move(group)), rank_(rank) {}
  ~FakeNcclComm() override = default;

  int rank() const override { return rank_; }

  absl::Status Send(const void* data, size_t bytes, int peer) override {
    absl::MutexLock l(&world_->mu_);
    if (group_->aborted) return absl::AbortedError("NCCL communicator aborted");
    if (peer < 0 || peer >= group_->nranks || peer == rank_)
      return absl::InvalidArgumentError("bad peer rank");
    group_->queues[{rank_, peer}].emplace_back(static_cast<const char*>(data), bytes);
    ++world_->messages_sent;
    return absl::OkStatus();
  }

  absl::Status Recv(void* data, size_t bytes, int peer) override {
    absl::MutexLock l(&world_->mu_);
    if (group_->aborted) return absl::AbortedError("NCCL communicator aborted");
    if (peer < 0 || peer >= group_->nranks || peer == rank_)
      return absl::InvalidArgumentError("bad peer rank");
    pending_.push_back(Pending{data, bytes, peer});
    return absl::OkStatus();
  }

  absl::Status StreamSync(absl::Duration timeout) override {
    const absl::Time deadline = absl::Now() + timeout;
    absl::MutexLock l(&world_->mu_);
    while (!pending_.empty()) {
      const Pending p = pending_.front();
      std::deque<std::string>* q = &group_->queues[{p.peer, rank_}];
      auto ready = [this, q]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(world_->mu_) { return group_->aborted || !q->empty(); };
      if (!world_->mu_.AwaitWithDeadline(absl::Condition(&ready), deadline)) {
        return absl::DeadlineExceededError("NCCL receive did not complete in time");
      }
      if (group_->aborted) return absl::AbortedError("NCCL communicator aborted (peer gone)");
      std::string msg = std::move(q->front());
      q->pop_front();
      pending_.pop_front();
      if (msg.size() != p.bytes) {
        group_->aborted = true;  // A real mismatch corrupts the communicator.
        return absl::InternalError(absl::StrCat("NCCL send/recv size mismatch: sent ", msg.size(),
                                                " bytes, receive posted ", p.bytes));
      }
      if (p.bytes > 0) std::memcpy(p.data, msg.data(), p.bytes);
    }
    if (group_->aborted) return absl::AbortedError("NCCL communicator aborted");
    return absl::OkStatus();
  }

  void Abort() override {
    absl::MutexLock l(&world_->mu_);
    group_->aborted = true;
  }

 private:
  struct Pending {
    void* data;
    size_t bytes;
    int peer;
  };
  std::shared_ptr<FakeNcclWorld> world_;
  std::shared_ptr<FakeNcclWorld::Group> group_;
  const int rank_;
  std::deque<Pending> pending_;
};

void FakeNcclWorld::AbortAll() {
  absl::MutexLock l(&mu_);
  for (auto& [id, g] : groups_) g->aborted = true;
}

absl::StatusOr<std::string> FakeNccl::GetUniqueId() {
  if (world_->fail_unique_id) return absl::UnavailableError("ncclGetUniqueId failed (injected)");
  absl::MutexLock l(&world_->mu_);
  std::string id = absl::StrCat("fake-nccl-", ++world_->next_id_);
  id.resize(kNcclUniqueIdBytes, '\0');
  return id;
}

absl::StatusOr<std::unique_ptr<NcclComm>> FakeNccl::CommInitRank(int nranks, const std::string& unique_id,
                                                                 int rank, absl::Duration timeout) {
  if (unique_id.size() != kNcclUniqueIdBytes)
    return absl::InvalidArgumentError("NCCL unique id has the wrong size");
  if (nranks < 1 || rank < 0 || rank >= nranks) return absl::InvalidArgumentError("bad NCCL rank");
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock l(&world_->mu_);
  std::shared_ptr<FakeNcclWorld::Group>& g = world_->groups_[unique_id];
  if (g == nullptr) {
    g = std::make_shared<FakeNcclWorld::Group>();
    g->nranks = nranks;
  }
  std::shared_ptr<FakeNcclWorld::Group> group = g;
  if (group->nranks != nranks) return absl::InvalidArgumentError("ranks disagree on the communicator size");
  ++group->joined;
  auto all = [&group]() { return group->joined >= group->nranks || group->aborted; };
  if (!world_->mu_.AwaitWithDeadline(absl::Condition(&all), deadline)) {
    group->aborted = true;
    return absl::DeadlineExceededError("ncclCommInitRank: not every rank joined in time");
  }
  if (group->aborted) return absl::AbortedError("ncclCommInitRank: communicator aborted");
  ++world_->comms_created;
  return std::unique_ptr<NcclComm>(new FakeNcclComm(world_, group, rank));
}

}  // namespace v4serve::kvstore
