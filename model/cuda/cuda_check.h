// CUDA error -> absl::Status at the lowest layer, naming the call and file:line (DeepEP style).
#ifndef V4SERVE_MODEL_CUDA_CUDA_CHECK_H_
#define V4SERVE_MODEL_CUDA_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace v4serve::model::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* call, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  std::string msg = absl::StrCat(call, " failed at ", file, ":", line, ": ", cudaGetErrorName(err), " (",
                                 cudaGetErrorString(err), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::UnavailableError(msg);
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace v4serve::model::cuda

// Returns a Status from the enclosing function when a CUDA runtime call fails.
#define V4_CUDA_RETURN_IF_ERROR(call)                                                                       \
  do {                                                                                                      \
    ::absl::Status v4_cuda_status_ = ::v4serve::model::cuda::CudaStatus((call), #call, __FILE__, __LINE__); \
    if (!v4_cuda_status_.ok()) return v4_cuda_status_;                                                      \
  } while (false)

#endif  // V4SERVE_MODEL_CUDA_CUDA_CHECK_H_
