// The small NCCL-like interface the NCCL KV transport is written against, so that its pair-communicator
// setup, chunked sends and failure handling run in CPU unit tests on a fake (fake_nccl.h) and on GPUs on
// the real library (nccl_api_cuda.cc, built only with V4SERVE_CUDA; MakeCudaNccl).
//
// Semantics follow NCCL's point-to-point calls on one stream per communicator: Send/Recv enqueue work and
// return; StreamSync waits for everything enqueued (or fails: peer aborted, timeout, size mismatch).
// Buffers are host memory here (the CPU engine's state lives on the host); the CUDA implementation
// stages them through device buffers on its stream. A Send's buffer may be reused once Send returns; a
// Recv's buffer is filled when StreamSync returns OK.
//
// Thread-safety: a communicator is used by one thread at a time; Abort may come from any thread.
#ifndef V4SERVE_KVSTORE_TRANSFER_NCCL_API_H_
#define V4SERVE_KVSTORE_TRANSFER_NCCL_API_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace v4serve::kvstore {

inline constexpr size_t kNcclUniqueIdBytes = 128;  // sizeof(ncclUniqueId)

class NcclComm {
 public:
  virtual ~NcclComm() = default;
  virtual int rank() const = 0;
  // Enqueues sending `bytes` bytes of `data` to `peer`.
  virtual absl::Status Send(const void* data, size_t bytes, int peer) = 0;
  // Enqueues receiving exactly `bytes` bytes from `peer` into `data`.
  virtual absl::Status Recv(void* data, size_t bytes, int peer) = 0;
  // Waits for the enqueued work. DEADLINE_EXCEEDED after `timeout` (the caller then aborts);
  // ABORTED when the communicator or its peer aborted; INTERNAL for an NCCL error (mismatched sizes).
  virtual absl::Status StreamSync(absl::Duration timeout) = 0;
  // Tears the communicator down; pending and later calls fail. Idempotent.
  virtual void Abort() = 0;
};

class NcclApi {
 public:
  virtual ~NcclApi() = default;
  // A fresh unique id (kNcclUniqueIdBytes) for a new communicator.
  virtual absl::StatusOr<std::string> GetUniqueId() = 0;
  // Joins communicator `unique_id` as `rank` of `nranks`; waits for every rank up to `timeout`.
  virtual absl::StatusOr<std::unique_ptr<NcclComm>> CommInitRank(int nranks, const std::string& unique_id,
                                                                 int rank, absl::Duration timeout) = 0;
};

// The real NCCL (GPU `device`), or UNIMPLEMENTED in a build without CUDA.
absl::StatusOr<std::unique_ptr<NcclApi>> MakeCudaNccl(int device);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TRANSFER_NCCL_API_H_
