// The real NcclApi on NCCL and the CUDA runtime (built only with V4SERVE_CUDA). Each communicator owns a
// non-blocking stream; host buffers are staged through device memory allocated on that stream
// (cudaMallocAsync), so Send returns once the copy and the ncclSend are enqueued and compute goes on.
// Host-side staging is pinned and reused: a send copies the caller's bytes into one of two pinned
// buffers (used in turn; one is reused once its copy to the device is done), a receive lands in a pinned
// arena and is copied to the caller's buffer when StreamSync succeeds. Copies from and to pageable memory
// go through the driver's own small staging and run at a fraction of the bus's speed.
// Communicators are created non-blocking (ncclConfig_t.blocking = 0) so that initialization and every
// wait can time out and abort instead of hanging on a dead peer.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstore/transfer/nccl_api.h"

namespace v4serve::kvstore {
namespace {

static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "ncclUniqueId size changed");

// How long enqueuing one send or receive on a non-blocking communicator may take.
constexpr absl::Duration kEnqueueTimeout = absl::Seconds(30);

absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}
absl::Status NcclError(ncclResult_t r, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", ncclGetErrorString(r)));
}

// Between polls of a pending operation: yield for the first `kSpin` (most operations take microseconds,
// and a fixed sleep per message dominated small transfers), then sleep briefly.
constexpr absl::Duration kSpin = absl::Milliseconds(2);
void PollPause(absl::Time started) {
  if (absl::Now() - started < kSpin) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Waits for a non-blocking communicator's pending operation.
absl::Status AwaitComm(ncclComm_t comm, absl::Time deadline, const char* what) {
  const absl::Time started = absl::Now();
  while (true) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return NcclError(r, what);
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return NcclError(state, what);
    if (absl::Now() >= deadline) return absl::DeadlineExceededError(absl::StrCat(what, ": timed out"));
    PollPause(started);
  }
}

class CudaNcclComm final : public NcclComm {
 public:
  CudaNcclComm(int device, ncclComm_t comm, cudaStream_t stream, int rank)
      : device_(device), comm_(comm), stream_(stream), rank_(rank) {
    for (SendStage& st : send_stage_) cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming);
  }
  ~CudaNcclComm() override {
    Abort();
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);  // After the abort nothing on it waits for the peer.
    cudaStreamDestroy(stream_);
    for (SendStage& st : send_stage_) {
      cudaEventDestroy(st.copied);
      if (st.host != nullptr) cudaFreeHost(st.host);
    }
    if (recv_host_ != nullptr) cudaFreeHost(recv_host_);
  }

  int rank() const override { return rank_; }

  absl::Status Send(const void* data, size_t bytes, int peer) override {
    if (aborted_) return absl::AbortedError("NCCL communicator aborted");
    if (bytes == 0) return absl::OkStatus();
    cudaSetDevice(device_);
    // The next pinned buffer, once its previous copy to the device is done.
    SendStage& st = send_stage_[next_stage_];
    next_stage_ ^= 1;
    if (st.in_use) {
      const absl::Time started = absl::Now();
      while (true) {
        cudaError_t e = cudaEventQuery(st.copied);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) return CudaError(e, "staging event");
        if (aborted_) return absl::AbortedError("NCCL communicator aborted");
        if (absl::Now() - started > kEnqueueTimeout) return absl::DeadlineExceededError("NCCL send staging");
        PollPause(started);
      }
      st.in_use = false;
    }
    if (st.capacity < bytes) {
      if (st.host != nullptr) cudaFreeHost(st.host);
      st.host = nullptr;
      st.capacity = 0;
      if (cudaError_t e = cudaHostAlloc(&st.host, bytes, cudaHostAllocDefault); e != cudaSuccess)
        return CudaError(e, "cudaHostAlloc");
      st.capacity = bytes;
    }
    std::memcpy(st.host, data, bytes);  // `data` may be reused once Send returns.
    void* dev = nullptr;
    if (cudaError_t e = cudaMallocAsync(&dev, bytes, stream_); e != cudaSuccess)
      return CudaError(e, "cudaMallocAsync");
    if (cudaError_t e = cudaMemcpyAsync(dev, st.host, bytes, cudaMemcpyHostToDevice, stream_);
        e != cudaSuccess) {
      return CudaError(e, "cudaMemcpyAsync H2D");
    }
    cudaEventRecord(st.copied, stream_);
    st.in_use = true;
    ncclResult_t r = ncclSend(dev, bytes, ncclUint8, peer, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclSend");
    // On a non-blocking communicator ncclInProgress means the send is not on the stream yet: work
    // enqueued after it now (the free below, the next message's copy) would overtake it.
    if (r == ncclInProgress) {
      if (absl::Status st = AwaitComm(comm_, absl::Now() + kEnqueueTimeout, "ncclSend"); !st.ok()) return st;
    }
    cudaFreeAsync(dev, stream_);
    return absl::OkStatus();
  }

  absl::Status Recv(void* data, size_t bytes, int peer) override {
    if (aborted_) return absl::AbortedError("NCCL communicator aborted");
    if (bytes == 0) return absl::OkStatus();
    cudaSetDevice(device_);
    // Grow the pinned arena between synchronizations only (pending copies point into it), to the
    // largest total one synchronization has needed so far.
    if (pending_.empty() && recv_capacity_ < std::max(bytes, recv_peak_)) {
      if (recv_host_ != nullptr) cudaFreeHost(recv_host_);
      recv_host_ = nullptr;
      recv_capacity_ = 0;
      const size_t want = std::max(bytes, recv_peak_);
      if (cudaError_t e = cudaHostAlloc(&recv_host_, want, cudaHostAllocDefault); e != cudaSuccess)
        return CudaError(e, "cudaHostAlloc");
      recv_capacity_ = want;
    }
    void* dev = nullptr;
    if (cudaError_t e = cudaMallocAsync(&dev, bytes, stream_); e != cudaSuccess)
      return CudaError(e, "cudaMallocAsync");
    ncclResult_t r = ncclRecv(dev, bytes, ncclUint8, peer, comm_, stream_);
    if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclRecv");
    // As in Send: the copy out must not be enqueued before the receive itself is.
    if (r == ncclInProgress) {
      if (absl::Status st = AwaitComm(comm_, absl::Now() + kEnqueueTimeout, "ncclRecv"); !st.ok()) return st;
    }
    void* dst = data;
    if (recv_used_ + bytes <= recv_capacity_) {
      dst = static_cast<char*>(recv_host_) + recv_used_;
      pending_.push_back({data, recv_used_, bytes});
      recv_used_ += bytes;
    }
    recv_epoch_bytes_ += bytes;
    if (cudaError_t e = cudaMemcpyAsync(dst, dev, bytes, cudaMemcpyDeviceToHost, stream_); e != cudaSuccess) {
      return CudaError(e, "cudaMemcpyAsync D2H");
    }
    cudaFreeAsync(dev, stream_);
    return absl::OkStatus();
  }

  absl::Status StreamSync(absl::Duration timeout) override {
    absl::Status s = WaitStream(timeout);
    if (s.ok()) {
      for (const PendingCopy& p : pending_)
        std::memcpy(p.dst, static_cast<const char*>(recv_host_) + p.offset, p.bytes);
    }
    recv_peak_ = std::max(recv_peak_, recv_epoch_bytes_);
    pending_.clear();
    recv_used_ = 0;
    recv_epoch_bytes_ = 0;
    return s;
  }

  void Abort() override {
    if (aborted_.exchange(true)) return;
    ncclCommAbort(comm_);
  }

 private:
  struct SendStage {
    void* host = nullptr;  // Pinned.
    size_t capacity = 0;
    cudaEvent_t copied = nullptr;  // Recorded after the copy out of `host`.
    bool in_use = false;
  };
  struct PendingCopy {
    void* dst;
    size_t offset;
    size_t bytes;
  };

  absl::Status WaitStream(absl::Duration timeout) {
    const absl::Time started = absl::Now();
    const absl::Time deadline = started + timeout;
    cudaSetDevice(device_);
    while (true) {
      if (aborted_) return absl::AbortedError("NCCL communicator aborted");
      cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaError(e, "KV stream");
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress) return NcclError(state, "NCCL communicator");
      if (absl::Now() >= deadline) return absl::DeadlineExceededError("NCCL KV operation timed out");
      PollPause(started);
    }
  }

  SendStage send_stage_[2];
  int next_stage_ = 0;
  void* recv_host_ = nullptr;  // Pinned arena for the receives of one synchronization.
  size_t recv_capacity_ = 0, recv_used_ = 0, recv_epoch_bytes_ = 0, recv_peak_ = 0;
  std::vector<PendingCopy> pending_;
  const int device_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  const int rank_;
  std::atomic<bool> aborted_{false};
};

class CudaNccl final : public NcclApi {
 public:
  explicit CudaNccl(int device) : device_(device) {}

  absl::StatusOr<std::string> GetUniqueId() override {
    ncclUniqueId id;
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) return NcclError(r, "ncclGetUniqueId");
    return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
  }

  absl::StatusOr<std::unique_ptr<NcclComm>> CommInitRank(int nranks, const std::string& unique_id, int rank,
                                                         absl::Duration timeout) override {
    if (unique_id.size() != sizeof(ncclUniqueId))
      return absl::InvalidArgumentError("NCCL unique id has the wrong size");
    ncclUniqueId id;
    std::memcpy(&id, unique_id.data(), sizeof(id));
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "cudaSetDevice");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclCommInitRankConfig(&comm, nranks, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) return NcclError(r, "ncclCommInitRankConfig");
    if (absl::Status s = AwaitComm(comm, absl::Now() + timeout, "ncclCommInitRank"); !s.ok()) {
      ncclCommAbort(comm);
      return s;
    }
    cudaStream_t stream;
    if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
      ncclCommAbort(comm);
      return CudaError(e, "cudaStreamCreate");
    }
    return std::unique_ptr<NcclComm>(new CudaNcclComm(device_, comm, stream, rank));
  }

 private:
  const int device_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<NcclApi>> MakeCudaNccl(int device) {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError("the NCCL KV transport needs a GPU; none is visible");
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("GPU ", device, " does not exist (", count, " visible)"));
  }
  return std::unique_ptr<NcclApi>(new CudaNccl(device));
}

}  // namespace v4serve::kvstore
