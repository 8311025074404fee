// Hopper warpgroup MMA (wgmma, sm_90a) primitives: shared-memory matrix descriptors for K-major tiles in the
// 128-byte swizzle, the BF16 m64n128k16 MMA with FP32 accumulation, and the fences around it (PTX ISA,
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"; DeepGEMM and CUTLASS's SM90 GMMA use the same).
//
// Layout. A K-major tile of R rows x 64 BF16 (128 bytes a row) in the 128-byte swizzle keeps row r at bytes
// 128 r .. + 128 with its eight 16-byte chunks permuted: chunk c of row r at 16 (c ^ (r % 8)) (Swizzle128).
// The tile starts on a 1024-byte boundary (the swizzle repeats every 8 rows = 1024 bytes, the descriptor's
// stride). A descriptor addresses such a tile for m64 (A, 64 rows) or n128 (B, 128 rows); the k-th 16-wide
// slice of the 64 starts 32 k bytes in (the hardware applies the swizzle to the final address).
//
// Fragment of D (m64nNk16, FP32): warp w of the warpgroup holds rows 16 w + lane / 4 and + 8; d[4 j + q] is
// row 16 w + lane / 4 + 8 (q / 2), column 8 j + 2 (lane % 4) + q % 2 (mma.sync's m16n8 C layout, N / 8
// times).
//
// Ordering. Shared memory written by threads (st.shared, cp.async) is read by wgmma through the async proxy:
// the writers run FenceProxyAsync after their writes and before the barrier that publishes them. Issue:
// WgFence, the MMAs, WgCommit; then WgWait<N> before the accumulators are read or the tiles overwritten.
#ifndef V4SERVE_MODEL_CUDA_WGMMA_CUH_
#define V4SERVE_MODEL_CUDA_WGMMA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace v4serve::model::cuda::kernels {
namespace {

// wgmma is compiled for sm_90a only (the kernels that use it trap elsewhere; hosts check WgmmaBuilt).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define V4SERVE_WGMMA 1
#else
#define V4SERVE_WGMMA 0
#endif

// Byte offset of 16-byte chunk c of row r in a 128-byte-swizzled tile (rows of 128 bytes).
__device__ __forceinline__ uint32_t Swizzle128(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}

// Descriptor of a K-major, 128-byte-swizzled tile at shared address `addr` (1024-byte aligned, or 32 k bytes
// past such a boundary for the k-th 16-wide slice): start address >> 4 in bits 0-13, leading byte offset 1
// (unused in this mode), stride byte offset 1024 >> 4 (the next 8-row group) in bits 32-45, swizzle mode 1
// (128 bytes) in bits 62-63.
__device__ __forceinline__ uint64_t WgDesc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void WgFence() {
#if V4SERVE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgCommit() {
#if V4SERVE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void WgWait() {
#if V4SERVE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Makes this thread's generic-proxy writes to shared memory visible to the async proxy (wgmma's reads).
__device__ __forceinline__ void FenceProxyAsync() {
#if V4SERVE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses of the accumulators across an MMA's issue or wait.
template <int N>
__device__ __forceinline__ void WgFenceOperands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 128, FP32) += A (64 x 16, BF16, descriptor da) . B (128 x 16, BF16, descriptor db)^T.
__device__ __forceinline__ void WgmmaBf16N128(float (&d)[64], uint64_t da, uint64_t db) {
#if V4SERVE_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
      " %64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
        "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
        "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),
        "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
#else
  (void)d;
  (void)da;
  (void)db;
#endif
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_WGMMA_CUH_
