// An in-memory NcclApi for CPU tests of the NCCL KV transport: communicators of one FakeNcclWorld meet
// by unique id; Send buffers a copy, Recv is matched in order at StreamSync, with NCCL's failure modes
// made explicit: a peer that aborts (ABORTED), a receive that never matches (DEADLINE_EXCEEDED), sizes
// that differ between Send and Recv (INTERNAL; real NCCL would hang or corrupt), a unique id that cannot
// be made, and ranks that never all join (CommInitRank DEADLINE_EXCEEDED).
//
// Thread-safe.
#ifndef V4SERVE_KVSTORE_TRANSFER_FAKE_NCCL_H_
#define V4SERVE_KVSTORE_TRANSFER_FAKE_NCCL_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kvstore/transfer/nccl_api.h"

namespace v4serve::kvstore {

class FakeNcclWorld {
 public:
  // Failure injection.
  std::atomic<bool> fail_unique_id{false};
  std::atomic<int64_t> messages_sent{0};
  std::atomic<int64_t> comms_created{0};
  // Aborts every communicator (a peer process dies): pending and later operations fail with ABORTED.
  void AbortAll();

 private:
  friend class FakeNccl;
  friend class FakeNcclComm;
  struct Group {
    int nranks = 0;
    int joined = 0;
    bool aborted = false;
    std::map<std::pair<int, int>, std::deque<std::string>> queues;  // (src, dst) -> messages in order.
  };
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Group>> groups_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
};

class FakeNccl final : public NcclApi {
 public:
  explicit FakeNccl(std::shared_ptr<FakeNcclWorld> world) : world_(std::move(world)) {}
  absl::StatusOr<std::string> GetUniqueId() override;
  absl::StatusOr<std::unique_ptr<NcclComm>> CommInitRank(int nranks, const std::string& unique_id, int rank,
                                                         absl::Duration timeout) override;

 private:
  std::shared_ptr<FakeNcclWorld> world_;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TRANSFER_FAKE_NCCL_H_
