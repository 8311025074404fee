// Built in place of cuda_device.cu when V4SERVE_CUDA is off.
#include "model/cuda/cuda_device.h"

namespace v4serve::model::cuda {

absl::StatusOr<std::vector<GpuInfo>> ListDevices() {
  return absl::FailedPreconditionError("built without CUDA");
}

absl::Status SelfTest(int, int) { return absl::FailedPreconditionError("built without CUDA"); }

}  // namespace v4serve::model::cuda
