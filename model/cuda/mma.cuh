// Warp-level tensor-core primitives for sm_80+ (used on sm_90a): ldmatrix, mma.sync m16n8k16 BF16 with FP32
// accumulation, cp.async. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"): with g = lane / 4
// and t = lane % 4, A holds rows g and g + 8 at columns 2t, 2t + 1 (+ 8); B columns g at rows 2t, 2t + 1
// (+ 8); C/D rows g and g + 8 at columns 2t, 2t + 1. A row-major [m][k] tile in shared memory gives A by
// ldmatrix.x4 (lane l addresses row l % 16, column 8 * (l / 16)); a [n][k] tile gives B for two n-tiles by
// ldmatrix.x4 (row (l % 8) + 8 * (l / 16), column 8 * ((l / 8) % 2)); a [k][n] tile gives B by
// ldmatrix.x4.trans (row l % 16, column 8 * (l / 16)).
// mma.m16n8k32 with FP8 e4m3 operands has the same shapes in bytes: A holds rows g and g + 8 at bytes
// 4t .. 4t + 3 (+ 16), B column g at bytes 4t .. 4t + 3 (+ 16) of k, so ldmatrix on byte tiles gives both
// as above (a 16-byte row chunk being eight b16 columns).
#ifndef V4SERVE_MODEL_CUDA_MMA_CUH_
#define V4SERVE_MODEL_CUDA_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace v4serve::model::cuda::kernels {
namespace {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// d += a (16x16, row) * b (16x8, col), BF16 in, FP32 accumulate.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// d += a (16x16, row) * b (16x8, col), FP16 in, FP32 accumulate.
__device__ __forceinline__ void MmaF16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// d += a (16x32, row) * b (32x8, col), FP8 e4m3 in (four values a register), FP32 accumulate.
__device__ __forceinline__ void MmaFp8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// Stores a warp's 32 x 32 part (m16n8 accumulators [2][4][4], warp (wm, wn) of a 2 x 4 layout) of a 64 x 128
// output tile: rows row0 + r (r < rows) of y (row stride ldy), columns col0 + c < out.
__device__ __forceinline__ void StoreWarpTile(const float (&tot)[2][4][4], int wm, int wn, int lane,
                                              int64_t row0, int64_t rows, int64_t col0, int64_t out,
                                              int64_t ldy, float* y) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int64_t col = col0 + wn * 32 + nt * 8 + 2 * t;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int64_t r = wm * 32 + mi * 16 + g + hf * 8;
        if (r >= rows) continue;
        float* dst = y + (row0 + r) * ldy + col;
        if (col < out) dst[0] = tot[mi][nt][2 * hf];
        if (col + 1 < out) dst[1] = tot[mi][nt][2 * hf + 1];
      }
    }
  }
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SmemAddr(smem)), "l"(gmem) : "memory");
}
// The same to a shared-memory address (SmemAddr).
__device__ __forceinline__ void CpAsync16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}
// The same, writing zeros instead when !valid (gmem must still be a valid address).
__device__ __forceinline__ void CpAsync16OrZero(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_MMA_CUH_
