#include "model/device.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "model/cuda/cuda_device.h"

namespace v4serve::model {

bool BuiltWithCuda() { return cuda::kBuiltWithCuda; }

absl::StatusOr<std::vector<GpuInfo>> ListGpus() {
  if (!BuiltWithCuda()) {
    return absl::FailedPreconditionError("this v4serve binary was built without CUDA (V4SERVE_CUDA=OFF)");
  }
  return cuda::ListDevices();
}

std::string DescribeAccelerators() {
  if (!BuiltWithCuda()) return "cuda: not built in";
  absl::StatusOr<std::vector<GpuInfo>> gpus = cuda::ListDevices();
  if (!gpus.ok()) return absl::StrCat("cuda: built in, no GPU usable (", gpus.status().message(), ")");
  if (gpus->empty()) return "cuda: built in, no GPU visible";
  std::vector<std::string> parts;
  for (const GpuInfo& g : *gpus) {
    parts.push_back(absl::StrFormat("%s, sm_%d%d, %.1f GiB", g.name, g.sm_major, g.sm_minor,
                                    static_cast<double>(g.memory_bytes) / (1ull << 30)));
  }
  return absl::StrCat("cuda: ", gpus->size(), " GPU", gpus->size() == 1 ? "" : "s", " (",
                      absl::StrJoin(parts, "; "), ")");
}

}  // namespace v4serve::model
