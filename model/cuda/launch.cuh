// Kernel launches with Hopper's programmatic dependent launch (PDL), one place for both sides of it.
//
// A decode step is ~110 kernels (batch 1; ncu, H100), most of them a few microseconds, so each kernel's
// launch, ramp and drain are a large share of the step. Launched with the programmatic-serialization
// attribute, a kernel's blocks may be scheduled while the kernel before it in the stream is still running;
// it then waits (griddepcontrol.wait) for that kernel to complete and its writes to be visible before it
// touches anything another kernel produces or reads. Weight-streaming kernels start their weights' loads
// into L2 before that wait (PrefetchTileL2, only with PDL on), so a small latency-bound kernel (a norm, the
// router, attention at batch 1) no longer leaves HBM idle. Under stream capture the attribute becomes a
// programmatic edge of the CUDA graph, so decode graphs keep it.
//
// The rule that makes this safe: every kernel launched through LaunchKernel calls PdlEnter() before it reads
// or writes memory that another kernel writes or reads (the only work before it is reading weights). A
// kernel launched without the attribute, or whose predecessor is not a kernel, passes PdlEnter at once.
// tests/model/pdl_rule_test.cc checks the rule on the sources. On by default on sm_90 (measured 1.01-1.03x
// faster decode steps, docs/PERFORMANCE.md); V4SERVE_CUDA_PDL=0 turns it off (CudaBackend::pdl_).
#ifndef V4SERVE_MODEL_CUDA_LAUNCH_CUH_
#define V4SERVE_MODEL_CUDA_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "model/cuda/cuda_check.h"

namespace v4serve::model::cuda {
namespace kernels {
namespace {

// Waits for the kernel before this one (when launched programmatically) and then lets the next kernel's
// blocks be scheduled. Triggering after the wait keeps at most two kernels in flight: a chain of kernels
// that all trigger at once would fill the SMs with blocks waiting on each other.
__device__ __forceinline__ void PdlEnter() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Starts loading [p, p + bytes) into L2 (bulk prefetches of up to 64 KiB from the calling thread; the range
// shrunk to 16-byte bounds). A hint: nothing waits for it.
__device__ __forceinline__ void PrefetchL2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uintptr_t lo = (a + 15) & ~uintptr_t{15};
  const uintptr_t hi = (a + static_cast<uintptr_t>(bytes)) & ~uintptr_t{15};
  constexpr uintptr_t kPiece = 64 * 1024;
  for (; lo < hi; lo += kPiece) {
    const uint32_t n = static_cast<uint32_t>(hi - lo < kPiece ? hi - lo : kPiece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(n) : "memory");
  }
#endif
}

// A block's share of a row-major weight matrix (`ld` bytes a row) into L2: rows [r0, r1), bytes [c0, c1) of
// each, by the block's threads (whole rows: one contiguous range, from thread 0). Weight-streaming kernels
// call it before PdlEnter.
__device__ __forceinline__ void PrefetchTileL2(const void* base, int64_t ld, int64_t r0, int64_t r1,
                                               int64_t c0, int64_t c1) {
  const char* b = static_cast<const char*>(base);
  if (c0 == 0 && c1 == ld) {
    if (threadIdx.x == 0 && r1 > r0) PrefetchL2(b + r0 * ld, (r1 - r0) * ld);
    return;
  }
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) PrefetchL2(b + r * ld + c0, c1 - c0);
}

}  // namespace
}  // namespace kernels

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute when `pdl`;
// the launch's error as a Status (and cleared, so that no later check reports it again).
template <class... Params, class... Args>
absl::Status LaunchKernel(bool pdl, cudaStream_t stream, void (*kernel)(Params...), dim3 grid, dim3 block,
                          size_t smem, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) (void)cudaGetLastError();  // Reported here: not again by a later check.
  return CudaStatus(err, "cudaLaunchKernelEx", __FILE__, __LINE__);
}

}  // namespace v4serve::model::cuda

#endif  // V4SERVE_MODEL_CUDA_LAUNCH_CUH_
