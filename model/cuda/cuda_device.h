// CUDA runtime access for model/: device discovery and the one place CUDA errors become Status.
// Internal to model/; other modules use model/device.h.
#ifndef V4SERVE_MODEL_CUDA_CUDA_DEVICE_H_
#define V4SERVE_MODEL_CUDA_CUDA_DEVICE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "model/device.h"

namespace v4serve::model::cuda {

#ifdef V4SERVE_WITH_CUDA
inline constexpr bool kBuiltWithCuda = true;
#else
inline constexpr bool kBuiltWithCuda = false;
#endif

// Lists visible devices; an absent driver or no device is an empty list, other errors a Status.
absl::StatusOr<std::vector<GpuInfo>> ListDevices();

// Runs a tiny kernel on device `index` that writes `n` floats and reads them back; proves that the
// compiled sm_90a code loads and runs on this GPU. UNAVAILABLE without a GPU.
absl::Status SelfTest(int index, int n);

}  // namespace v4serve::model::cuda

#endif  // V4SERVE_MODEL_CUDA_CUDA_DEVICE_H_
