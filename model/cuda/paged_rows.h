// The kernels' view of one layer's rows in the paged device KV cache (model/cuda/device_state_cache.h).
// Host and device code use it (cuda_kernels.cuh, attention_mma.cuh, cuda_backend_impl.cuh).
#ifndef V4SERVE_MODEL_CUDA_PAGED_ROWS_H_
#define V4SERVE_MODEL_CUDA_PAGED_ROWS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace v4serve::model::cuda::kernels {

// One layer's compressed entries (or indexer keys) in the paged device KV cache (device_state_cache.h):
// a sequence's pages are listed from pages[first] on, in block order, and its row s (an entry index) is at
// pages[first + s / per_page] + offset + (s % per_page) * width. Pages hold kvstore blocks' payloads, so
// `offset` is where the layer's entries (or keys) start in one and `per_page` its entries per block.
struct PagedRows {
  const float* const* pages = nullptr;
  int64_t offset = 0;
  int64_t per_page = 1;
  __device__ __forceinline__ const float* Row(int64_t first, int64_t s, int64_t width) const {
    return pages[first + s / per_page] + offset + (s % per_page) * width;
  }
};

}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_PAGED_ROWS_H_
