// Which accelerators this process can use.
//
// Thread-safe; every call queries the driver afresh. Builds without CUDA report that they were
// built without it, so a worker can say plainly why it runs on the CPU.
#ifndef V4SERVE_MODEL_DEVICE_H_
#define V4SERVE_MODEL_DEVICE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace v4serve::model {

struct GpuInfo {
  int index = 0;
  std::string name;
  int sm_major = 0;
  int sm_minor = 0;
  int64_t memory_bytes = 0;
  int multiprocessors = 0;
};

// True when this binary contains the CUDA backend.
bool BuiltWithCuda();

// The GPUs visible to this process. Returns an empty list where CUDA is built in but no GPU or
// driver exists, and FAILED_PRECONDITION where the binary was built without CUDA.
absl::StatusOr<std::vector<GpuInfo>> ListGpus();

// One line for logs and `v4serve version`: "cuda: 1 GPU (NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB)",
// "cuda: built in, no GPU visible (<driver message>)" or "cuda: not built in".
std::string DescribeAccelerators();

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_DEVICE_H_
