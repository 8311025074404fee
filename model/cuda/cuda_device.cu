#include <vector>

#include "model/cuda/cuda_check.h"
#include "model/cuda/cuda_device.h"

namespace v4serve::model::cuda {
namespace {

__global__ void FillIota(float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<float>(i) * 0.5f;
}

}  // namespace

absl::StatusOr<std::vector<GpuInfo>> ListDevices() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky error so later calls are not confused
    return std::vector<GpuInfo>{};
  }
  V4_CUDA_RETURN_IF_ERROR(err);
  std::vector<GpuInfo> out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    V4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, i));
    out.push_back(GpuInfo{.index = i,
                          .name = prop.name,
                          .sm_major = prop.major,
                          .sm_minor = prop.minor,
                          .memory_bytes = static_cast<int64_t>(prop.totalGlobalMem),
                          .multiprocessors = prop.multiProcessorCount});
  }
  return out;
}

absl::Status SelfTest(int index, int n) {
  absl::StatusOr<std::vector<GpuInfo>> gpus = ListDevices();
  if (!gpus.ok()) return gpus.status();
  if (index < 0 || index >= static_cast<int>(gpus->size())) {
    return absl::UnavailableError(absl::StrCat("no GPU with index ", index, " (", gpus->size(), " visible)"));
  }
  V4_CUDA_RETURN_IF_ERROR(cudaSetDevice(index));
  float* dev = nullptr;
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&dev, sizeof(float) * n));
  FillIota<<<(n + 255) / 256, 256>>>(dev, n);
  absl::Status st = CudaStatus(cudaGetLastError(), "FillIota<<<>>>", __FILE__, __LINE__);
  std::vector<float> host(n);
  if (st.ok()) {  // Update, not assignment: nvcc warns that Status::operator='s result is discarded.
    st.Update(CudaStatus(cudaMemcpy(host.data(), dev, sizeof(float) * n, cudaMemcpyDeviceToHost),
                         "cudaMemcpy", __FILE__, __LINE__));
  }
  cudaFree(dev);
  if (!st.ok()) return st;
  for (int i = 0; i < n; ++i) {
    if (host[i] != static_cast<float>(i) * 0.5f) {
      return absl::InternalError(absl::StrCat("GPU self-test read back ", host[i], " at ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace v4serve::model::cuda
