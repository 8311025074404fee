// The kernels' view of one layer's rows in the paged device KV cache (model/cuda/device_state_cache.h).
// Host and device code use it (cuda_kernels.cuh, attention_mma.cuh, cuda_backend_impl.cuh).
#ifndef V4SERVE_MODEL_CUDA_PAGED_ROWS_H_
#define V4SERVE_MODEL_CUDA_PAGED_ROWS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace v4serve::model::cuda::kernels {

// One layer's compressed entries (or indexer keys) in the paged device KV cache (device_state_cache.h):
// a sequence's pages are listed from pages[first] on, in block order, and its row s (an entry index) is at
// pages[first + s / per_page] + offset + (s % per_page) * width, per_page = 2^shift. Pages hold kvstore
// blocks' payloads, so `offset` is where the layer's entries (or keys) start in one and per_page its entries
// per block: 128 / a compression ratio that divides 128, a power of two (KvPageLayout::For checks), so the
// kernels shift and mask (a 64-bit division for every 16 bytes they fetch cost more than the fetch).
struct PagedRows {
  const float* const* pages = nullptr;
  int64_t offset = 0;
  int shift = 0;
  __device__ __forceinline__ const float* Row(int64_t first, int64_t s, int64_t width) const {
    return pages[first + (s >> shift)] + offset + (s & ((int64_t{1} << shift) - 1)) * width;
  }
};

// log2(per_page), or -1 when per_page is not a power of two (host side).
inline int PagedRowsShift(int64_t per_page) {
  int shift = 0;
  while ((int64_t{1} << shift) < per_page && shift < 62) ++shift;
  return per_page > 0 && (int64_t{1} << shift) == per_page ? shift : -1;
}

}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_PAGED_ROWS_H_
