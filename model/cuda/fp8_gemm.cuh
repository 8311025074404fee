// FP8 GEMMs with DeepSeek's block scales (MODEL.md "Checkpoint format" and "Precision the reference
// simulates"), for the CUDA backend's FP8 weight mode (CudaWeights::kFp8, model/cuda/cuda_linear.cu):
// - weights W [out, in]: e4m3 codes with one power-of-two scale per 128 x 128 tile (the checkpoint's format,
//   its E8M0 bytes kept as FP32 for cuBLASLt; scales [ceil(out / 128), in / 128], in a multiple of 128);
// - the GEMM input x [m, in]: quantized per row in blocks of 128 as DeepSeek's act_quant does and as the CPU
//   faithful mode's Numerics::Fp8Blocks does (scale 2^ceil(log2(amax / 448)), amax at least 1e-4; e4m3
//   round-to-nearest-even, saturating at 448), so x's values equal the CPU's bit for bit;
// - y = x W^T in FP32: each 128-wide k block is summed on the tensor cores (mma.sync m16n8k32 e4m3, FP32
//   accumulators) and added to an FP32 total times (x's block scale x W's tile scale), DeepGEMM's
//   "promotion": Hopper's FP8 MMA accumulates with reduced precision, so a block is never longer than 128.
// Same conventions as cuda_kernels.cuh (internal linkage; each .cu compiles the kernels it launches).
#ifndef V4SERVE_MODEL_CUDA_FP8_GEMM_CUH_
#define V4SERVE_MODEL_CUDA_FP8_GEMM_CUH_

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/mma.cuh"

namespace v4serve::model::cuda::kernels {
namespace {

constexpr int kFp8Block = 128;  // Scale block along k (and along out for the weights' tiles).

// 2^ceil(log2(amax / qmax)) as model/cpu/numerics.cc's Pow2CeilScale computes it (amax times the FP32
// reciprocal, rounded up to a power of two from the bits), and its exact reciprocal.
struct Pow2Scale {
  float s, inv;
};
__device__ __forceinline__ Pow2Scale Pow2CeilScale(float amax, float qmax) {
  const float x = amax * (1.0f / qmax);
  const uint32_t bits = __float_as_uint(x);
  const int e = static_cast<int>((bits >> 23) & 0xffu) - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
  return {__uint_as_float(static_cast<uint32_t>(e + 127) << 23),
          __uint_as_float(static_cast<uint32_t>(127 - e) << 23)};
}
__device__ __forceinline__ uint32_t Fp8E4m3(float v) {
  return static_cast<uint32_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}
// The GEMM inputs' quantization in pieces, so that every kernel that quantizes a block of 128 input values
// (QuantizeFp8Blocks, SkinnyGemmFp8, RoundFp8Blocks) makes the same codes and scales: a block's scale from
// its largest magnitude (Amax4 over its values) and four values' e4m3 codes (first value in the low byte).
__device__ __forceinline__ Pow2Scale Fp8InputScale(float amax) {
  return Pow2CeilScale(fmaxf(amax, 1e-4f), 448.0f);
}
__device__ __forceinline__ uint32_t Fp8E4m3x4(const float4& v, float inv) {
  return Fp8E4m3(v.x * inv) | Fp8E4m3(v.y * inv) << 8 | Fp8E4m3(v.z * inv) << 16 | Fp8E4m3(v.w * inv) << 24;
}
// A block of 128 input values' scale, from the warp's lanes' four values each (every lane gets it).
__device__ __forceinline__ Pow2Scale Fp8BlockScale(const float4& v) {
  return Fp8InputScale(WarpMax(Amax4(v)));
}

// The GEMM input's quantization: the first in_blocks blocks of 128 FP32 values of each of `rows` rows of
// row_blocks blocks (x 16-byte aligned) become e4m3 codes (at the same offsets) and one FP32 scale each, at
// scales[r * row_blocks + j] (row-major, the kernels below) or, with rows_t > 0, at scales[j * rows_t + r]
// (cuBLASLt's VEC128 layout, "M-major"). A warp per block.
__global__ void QuantizeFp8Blocks(const float* x, int64_t rows, int64_t row_blocks, int64_t in_blocks,
                                  int64_t rows_t, uint8_t* codes, float* scales) {
  PdlEnter();
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t r = b / row_blocks, j = b % row_blocks;
  if (r >= rows || j >= in_blocks) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const float4 v = reinterpret_cast<const float4*>(x + b * kFp8Block)[lane];
  const Pow2Scale s = Fp8BlockScale(v);
  reinterpret_cast<uint32_t*>(codes + b * kFp8Block)[lane] = Fp8E4m3x4(v, s.inv);
  if (lane == 0) scales[rows_t > 0 ? j * rows_t + r : b] = s.s;
}

// A weight matrix's tiles at load: w [out, in] FP32 (in a multiple of 128) to e4m3 codes and tile scales
// 2^ceil(log2(amax / 448)) [ceil(out / 128), in / 128]. A checkpoint's FP8 weights come back exactly (their
// tile's amax is at most 448 times their scale, so the new scale is at most theirs and the codes only gain
// exponent). Grid (in / 128, ceil(out / 128)), 256 threads.
__global__ void QuantizeFp8Tiles(const float* w, int64_t out, int64_t in, uint8_t* codes, float* scales) {
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kFp8Block,
                c0 = static_cast<int64_t>(blockIdx.x) * kFp8Block;
  const int rows = static_cast<int>(MinI64(kFp8Block, out - r0));
  float amax = 0;
  for (int i = static_cast<int>(threadIdx.x); i < rows * kFp8Block; i += blockDim.x) {
    amax = fmaxf(amax, fabsf(w[(r0 + i / kFp8Block) * in + c0 + i % kFp8Block]));
  }
  amax = BlockMax(amax);
  const Pow2Scale s = Pow2CeilScale(fmaxf(amax, 0x1p-100f), 448.0f);
  for (int i = static_cast<int>(threadIdx.x); i < rows * kFp8Block; i += blockDim.x) {
    const int64_t at = (r0 + i / kFp8Block) * in + c0 + i % kFp8Block;
    codes[at] = static_cast<uint8_t>(Fp8E4m3(w[at] * s.inv));
  }
  if (threadIdx.x == 0) scales[blockIdx.y * (in / kFp8Block) + blockIdx.x] = s.s;
}

// One 128-wide k block of the skinny kernels (SkinnyGemmFp8, RowsGemmFp8): lane (g, t)'s 16 + 16 bytes of
// weight rows g (a0*) and g + 8 (a1*) and of input row g (b*), in the permuted k order described below, as
// four m16n8k32 MMAs; the block's sum promoted into tot with the weight tiles' scales (sw0, sw1: features g,
// g + 8) and the input rows' block scales (sa0, sa1: rows 2t, 2t + 1).
__device__ __forceinline__ void Fp8BlockMma(const uint4& a00, const uint4& a01, const uint4& a10,
                                            const uint4& a11, const uint4& b0, const uint4& b1, float sw0,
                                            float sw1, float sa0, float sa1, float (&tot)[4]) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  MmaFp8(acc, a00.x, a10.x, a00.y, a10.y, b0.x, b0.y);
  MmaFp8(acc, a00.z, a10.z, a00.w, a10.w, b0.z, b0.w);
  MmaFp8(acc, a01.x, a11.x, a01.y, a11.y, b1.x, b1.y);
  MmaFp8(acc, a01.z, a11.z, a01.w, a11.w, b1.z, b1.w);
  tot[0] += acc[0] * (sw0 * sa0);  // Feature g, rows 2t and 2t + 1; then feature g + 8.
  tot[1] += acc[1] * (sw0 * sa1);
  tot[2] += acc[2] * (sw1 * sa0);
  tot[3] += acc[3] * (sw1 * sa1);
}

// y[r, n] (row stride ldy) = sum_k x[r, k] W[n, k] for m <= 8 * kTok rows (decode steps): the weights are the
// MMA's A operand (16 output features a warp) and the input rows its B operand (8 a tile), so a few rows
// waste no weight bandwidth. x: FP32 rows of stride ldx (a multiple of 128), quantized by the warps as they
// read them, as QuantizeFp8Blocks would (the same codes and scales: lane t of a row's four holds 32 of a
// block's 128 values and the four share their amax), which saves the decode step a launch per linear (ncu,
// H200: 15 launches, ~49 us a step). Each lane loads 16 consecutive bytes of k from its two weight rows and
// from its input row; the MMA's k order is permuted the same way on both sides (lane t's bytes 16t .. 16t +
// 15 of a 64-byte chunk stand for the fragment's k 4t .. 4t + 3 and 16 + 4t .. of two k32 steps), which a dot
// product does not see, and every load is a whole 16 bytes. The kWarps warps of a block split the 128-wide k
// blocks (warp w takes w, w + kWarps, ...) and add their totals in shared memory, in warp order: each warp
// waits out one load latency per k block it takes, so the launch picks as many warps as keep the shared
// totals within 16 KiB and have a k block each (SkinnyWarps). Grid ceil(out / 16), 32 kWarps threads.
constexpr int64_t kSkinnyMaxRows = 64;  // kTok <= 8.
__host__ __device__ constexpr int SkinnyWarps(int tok, int64_t k_blocks) {
  const int most = tok <= 2 ? 16 : tok == 4 ? 8 : 4;
  return k_blocks >= most ? most : k_blocks >= 8 && most >= 8 ? 8 : 4;
}
template <int kTok, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    SkinnyGemmFp8(const float* x, int64_t m, int64_t ldx, const uint8_t* w, const float* ws, int64_t in,
                  int64_t out, int64_t ldy, float* y, bool prefetch) {
  if (prefetch)
    PrefetchTileL2(w, in, blockIdx.x * int64_t{16}, MinI64(blockIdx.x * int64_t{16} + 16, out), 0, in);
  PdlEnter();
  static_assert(kWarps * kTok <= 32, "the shared totals stay within 16 KiB");
  __shared__ float red[kWarps][kTok][32][4];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t r0 = min(n0 + g, out - 1), r1 = min(n0 + g + 8, out - 1);
  const int64_t kbs = in / kFp8Block;
  const uint8_t* w0 = w + r0 * in + t * 16;
  const uint8_t* w1 = w + r1 * in + t * 16;
  const float* ws0 = ws + (r0 / kFp8Block) * kbs;
  const float* ws1 = ws + (r1 / kFp8Block) * kbs;
  float tot[kTok][4];
#pragma unroll
  for (int tg = 0; tg < kTok; ++tg) tot[tg][0] = tot[tg][1] = tot[tg][2] = tot[tg][3] = 0.f;
  for (int64_t kb = warp; kb < kbs; kb += kWarps) {
    const int64_t k = kb * kFp8Block;
    const uint4 a00 = *reinterpret_cast<const uint4*>(w0 + k),
                a01 = *reinterpret_cast<const uint4*>(w0 + k + 64);
    const uint4 a10 = *reinterpret_cast<const uint4*>(w1 + k),
                a11 = *reinterpret_cast<const uint4*>(w1 + k + 64);
    const float sw0 = ws0[kb], sw1 = ws1[kb];
#pragma unroll
    for (int tg = 0; tg < kTok; ++tg) {
      // Row g's values k + 16t .. + 16 and k + 64 + 16t .. + 16, quantized with the block's scale.
      const float4* xp = reinterpret_cast<const float4*>(x + MinI64(tg * 8 + g, m - 1) * ldx + k + t * 16);
      float4 v[8];
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[i] = xp[(i / 4) * 16 + i % 4];
        amax = fmaxf(amax, Amax4(v[i]));
      }
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      const Pow2Scale sc = Fp8InputScale(amax);
      uint32_t q[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = Fp8E4m3x4(v[i], sc.inv);
      const uint4 b0 = make_uint4(q[0], q[1], q[2], q[3]), b1 = make_uint4(q[4], q[5], q[6], q[7]);
      // The scales of rows 2t and 2t + 1 (the accumulator's columns), from those rows' lanes.
      const float sa0 = __shfl_sync(0xffffffffu, sc.s, 8 * t),
                  sa1 = __shfl_sync(0xffffffffu, sc.s, 8 * t + 4);
      Fp8BlockMma(a00, a01, a10, a11, b0, b1, sw0, sw1, sa0, sa1, tot[tg]);
    }
  }
#pragma unroll
  for (int tg = 0; tg < kTok; ++tg) {
#pragma unroll
    for (int j = 0; j < 4; ++j) red[warp][tg][lane][j] = tot[tg][j];
  }
  __syncthreads();
  // Warp tg % kWarps writes token group tg.
  for (int tg = warp; tg < kTok; tg += kWarps) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = red[0][tg][lane][j];
#pragma unroll
      for (int wi = 1; wi < kWarps; ++wi) v += red[wi][tg][lane][j];
      const int64_t n = n0 + g + (j >= 2 ? 8 : 0), r = tg * 8 + 2 * t + (j & 1);
      if (n < out && r < m) y[r * ldy + n] = v;
    }
  }
}

// y = x W^T for a decode batch's 9-64 rows (m <= 8 * kTok), from x's codes and row-major block scales
// (QuantizeFp8Blocks). A block is kWarps x 16 output features over the k blocks of split blockIdx.y of
// gridDim.y (k blocks [kbs * s / S, kbs * (s + 1) / S)); the weights are the MMA's A operand (16 features a
// warp) and the input rows its B operand, in the permuted k order SkinnyGemmFp8 uses (lane t's 16 bytes at
// 16t and 64 + 16t of a 128-byte block row stand for two k32 steps' fragments). Weights and inputs arrive
// in shared memory through a kRowsStages-deep cp.async pipeline, one stage a 128-wide k block (16 kWarps
// weight rows and 8 kTok input rows of 128 bytes), so a block keeps kRowsStages - 1 k blocks of weights in
// flight (session 15's version held one in registers: ~185 registers, one block an SM, and it streamed
// slower than cuBLASLt). The first stages' weights are asked for before PdlEnter (they do not depend on the
// kernel ahead), the inputs after; with `prefetch` (PDL on) the later stages' weights are asked into L2 then
// too, as SkinnyGemmFp8 does. Rows past m read row m - 1, features past out row out - 1 (neither is
// stored). With S > 1 the splits' partial sums meet in SplitKFinish (cuda_kernels.cuh: deterministic, no
// atomics on y). Grid (ceil(out / (16 kWarps)), S), 32 kWarps threads, RowsFp8Smem(kTok, kWarps) bytes of
// dynamic shared memory (above 48 KiB: the backend raises the limit at start, InitLinearKernels).
constexpr int kRowsStages = 4;
// One stage: 16 kWarps weight rows, then 8 kTok input rows, of 128 bytes each.
__host__ __device__ constexpr int RowsStageBytes(int tok, int warps) {
  return (16 * warps + 8 * tok) * kFp8Block;
}
__host__ __device__ constexpr size_t RowsFp8Smem(int tok, int warps) {
  return static_cast<size_t>(kRowsStages) * RowsStageBytes(tok, warps);
}
// Where 16-byte chunk c (0-7) of a stage's row `row` sits: rows of 128 bytes, chunks XOR 4 on odd rows, so
// the 8 lanes of a quarter warp (rows g, g + 1 of one parity each, chunks t or t + 4) hit 8 different bank
// groups.
__device__ __forceinline__ int RowsChunk(int row, int c) {
  return row * kFp8Block + ((c ^ ((row & 1) << 2)) << 4);
}

// Stage `stage` of RowsGemmFp8's shared memory (kRowsStages of them).
template <int kTok, int kWarps>
__device__ __forceinline__ unsigned char* RowsStage(int64_t stage) {
  extern __shared__ __align__(128) unsigned char rows_smem[];
  return rows_smem + stage * RowsStageBytes(kTok, kWarps);
}
// kRows rows of 128 bytes at column k of src (row stride ld, rows r0 + r clamped to rmax) into dst in the
// RowsChunk layout, as cp.async by the block's kThreads threads, a 16-byte chunk each at a time.
template <int kRows, int kThreads>
__device__ __forceinline__ void CpAsyncRows(unsigned char* dst, const uint8_t* src, int64_t ld, int64_t r0,
                                            int64_t rmax, int64_t k) {
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int j = 0; j < (kRows * 8 + kThreads - 1) / kThreads; ++j) {
    const int c = tid + j * kThreads;
    if (kRows * 8 % kThreads == 0 || c < kRows * 8)
      CpAsync16(dst + RowsChunk(c / 8, c % 8), src + MinI64(r0 + c / 8, rmax) * ld + k + (c % 8) * 16);
  }
}
// RowsGemmFp8's weights of k block kb (weight rows nb0 .. nb0 + 16 kWarps, clamped to out - 1) into stage
// `stage`. It touches only the weights and the block's own shared memory, so the kernel calls it ahead of
// PdlEnter for its first stages.
template <int kTok, int kWarps>
__device__ __forceinline__ void PrefetchRowsWeights(const uint8_t* w, int64_t in, int64_t out, int64_t nb0,
                                                    int64_t kb, int64_t stage) {
  CpAsyncRows<16 * kWarps, 32 * kWarps>(RowsStage<kTok, kWarps>(stage), w, in, nb0, out - 1, kb * kFp8Block);
}

template <int kTok, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 2)  // Two blocks an SM: 128 registers at most.
    RowsGemmFp8(const uint8_t* xq, const float* xs, int64_t m, int64_t ldx, const uint8_t* w, const float* ws,
                int64_t in, int64_t out, int64_t ldy, float* y, float* partial, unsigned* counters,
                bool prefetch) {
  constexpr int kWr = 16 * kWarps, kXr = 8 * kTok, kThreads = 32 * kWarps;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t nb0 = static_cast<int64_t>(blockIdx.x) * kWr;
  const int64_t kbs = in / kFp8Block, xbs = ldx / kFp8Block;
  const int splits = static_cast<int>(gridDim.y), s = static_cast<int>(blockIdx.y);
  const int64_t kb0 = kbs * s / splits, kb1 = kbs * (s + 1) / splits, nkb = kb1 - kb0;
  for (int i = 0; i < kRowsStages - 1 && i < nkb; ++i)
    PrefetchRowsWeights<kTok, kWarps>(w, in, out, nb0, kb0 + i, i);
  if (prefetch && nkb > kRowsStages - 1) {  // The later stages' weights into L2 (with PDL: during the wait).
    PrefetchTileL2(w, in, nb0, MinI64(nb0 + kWr, out), (kb0 + kRowsStages - 1) * kFp8Block, kb1 * kFp8Block);
  }
  PdlEnter();
  const auto load_x = [&](int64_t i) {  // k block kb0 + i's input rows into stage i % kRowsStages.
    CpAsyncRows<kXr, kThreads>(RowsStage<kTok, kWarps>(i % kRowsStages) + kWr * kFp8Block, xq, ldx, 0, m - 1,
                               (kb0 + i) * kFp8Block);
  };
  // Group i holds stage i's inputs (group 0 also the first stages' weights): group i complete = stage i
  // ready.
  for (int i = 0; i < kRowsStages - 1; ++i) {
    if (i < nkb) load_x(i);
    CpAsyncCommit();
  }
  const int wr = warp * 16;  // This warp's weight rows in a stage.
  const int64_t f0 = MinI64(nb0 + wr + g, out - 1), f1 = MinI64(nb0 + wr + g + 8, out - 1);
  const float* ws0 = ws + (f0 / kFp8Block) * kbs;
  const float* ws1 = ws + (f1 / kFp8Block) * kbs;
  // The accumulator's columns' rows (tg * 8 + 2t, + 1), clamped to m, give their block scales.
  const int last = static_cast<int>(m - 1), sxbs = static_cast<int>(xbs);  // A decode batch's, < 2^31.
  float tot[kTok][4];
#pragma unroll
  for (int tg = 0; tg < kTok; ++tg) tot[tg][0] = tot[tg][1] = tot[tg][2] = tot[tg][3] = 0.f;
  for (int64_t i = 0; i < nkb; ++i) {
    CpAsyncWait<kRowsStages - 2>();
    __syncthreads();  // Stage i is visible to every warp, and every warp is done with stage i - 1.
    if (i + kRowsStages - 1 < nkb) {
      PrefetchRowsWeights<kTok, kWarps>(w, in, out, nb0, kb0 + i + kRowsStages - 1,
                                        (i + kRowsStages - 1) % kRowsStages);
      load_x(i + kRowsStages - 1);
    }
    CpAsyncCommit();  // Empty near the end: the group count stays one a step.
    const unsigned char* st = RowsStage<kTok, kWarps>(i % kRowsStages);
    const unsigned char* xst = st + kWr * kFp8Block;
    const int64_t kb = kb0 + i;
    const uint4 a00 = *reinterpret_cast<const uint4*>(st + RowsChunk(wr + g, t)),
                a01 = *reinterpret_cast<const uint4*>(st + RowsChunk(wr + g, t + 4)),
                a10 = *reinterpret_cast<const uint4*>(st + RowsChunk(wr + g + 8, t)),
                a11 = *reinterpret_cast<const uint4*>(st + RowsChunk(wr + g + 8, t + 4));
    const float sw0 = ws0[kb], sw1 = ws1[kb];
#pragma unroll
    for (int tg = 0; tg < kTok; ++tg) {
      const uint4 b0 = *reinterpret_cast<const uint4*>(xst + RowsChunk(tg * 8 + g, t)),
                  b1 = *reinterpret_cast<const uint4*>(xst + RowsChunk(tg * 8 + g, t + 4));
      const float sa0 = xs[min(tg * 8 + 2 * t, last) * sxbs + kb],
                  sa1 = xs[min(tg * 8 + 2 * t + 1, last) * sxbs + kb];
      Fp8BlockMma(a00, a01, a10, a11, b0, b1, sw0, sw1, sa0, sa1, tot[tg]);
    }
  }
  CpAsyncWait<0>();
  const int64_t n0 = nb0 + wr;
  const SplitKOut dst = SplitKTarget(y, ldy, partial, m, out);
#pragma unroll
  for (int tg = 0; tg < kTok; ++tg) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + g + (j >= 2 ? 8 : 0), r = tg * 8 + 2 * t + (j & 1);
      if (n < out && r < m) dst.p[r * dst.ld + n] = tot[tg][j];
    }
  }
  if (splits > 1) SplitKFinish(partial, counters, m, out, nb0, MinI64(kWr, out - nb0), ldy, y);
}

// The tile GEMM for longer inputs where cuBLASLt has no algorithm: the same y for any m, 64 x 128 output
// tiles, 256 threads as 2 x 4 warps of 32 x 32, k steps of one 128 scale block through a two-stage cp.async
// pipeline. Shared-memory rows are 128 bytes with their 16-byte chunks XOR-swizzled by the row, so each
// ldmatrix's 8 rows hit 8 different bank groups. Rows past m read row m - 1 and columns past out read row
// out - 1 of W; neither is stored. Grid (ceil(m / 64), ceil(out / 128)). The pieces below are shared with the
// MXFP4 expert GEMM (cuda_moe_kernels.cuh, GroupedGemmFp4Fp8).
constexpr int kF8Bm = 64, kF8Bn = 128;
constexpr size_t kF8Smem = 2 * (kF8Bm + kF8Bn) * kFp8Block;  // 48 KiB: no opt-in needed.

__device__ __forceinline__ int Fp8Swizzle(int row, int chunk) {
  return row * kFp8Block + ((chunk ^ (row & 7)) << 4);
}

// A 64 x 128 tile's products over one 128-deep k block from shared memory (as [64][128], bs [128][128] bytes,
// swizzled), for warp (wm, wn): acc[mi][nt] = rows wm * 32 + mi * 16 .., columns wn * 32 + nt * 8 ...
__device__ __forceinline__ void Fp8TileMma(const uint8_t* as, const uint8_t* bs, int wm, int wn, int lane,
                                           float (&acc)[2][4][4]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) acc[mi][nt][0] = acc[mi][nt][1] = acc[mi][nt][2] = acc[mi][nt][3] = 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {  // k32 steps: 16-byte chunks 2kk and 2kk + 1.
    uint32_t a[2][4], b[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      LdMatrixX4(a[mi], SmemAddr(as + Fp8Swizzle(wm * 32 + mi * 16 + (lane & 15), 2 * kk + (lane >> 4))));
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      LdMatrixX4(b[np], SmemAddr(bs + Fp8Swizzle(wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                 2 * kk + ((lane >> 3) & 1))));
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        MmaFp8(acc[mi][2 * np], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[np][0], b[np][1]);
        MmaFp8(acc[mi][2 * np + 1], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[np][2], b[np][3]);
      }
    }
  }
}

// The promotion's row scales: x's block kb scale for warp wm's rows g, g + 8 of its two m16 tiles, rows
// counted from `first` (scales of row stride ld blocks) and clamped to the tile's `rows` as the loads clamp
// them.
__device__ __forceinline__ void Fp8RowScales(const float* xs, int64_t first, int64_t rows, int64_t ld,
                                             int64_t kb, int wm, int g, float (&sa)[2][2]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      sa[mi][hf] = xs[(first + MinI64(wm * 32 + mi * 16 + g + hf * 8, rows - 1)) * ld + kb];
  }
}

// The promotion: tot += acc x (row scale sa[mi][g / g + 8] x column scale sb[nt][2t / 2t + 1]).
__device__ __forceinline__ void Fp8Promote(const float (&acc)[2][4][4], const float (&sa)[2][2],
                                           const float (&sb)[4][2], float (&tot)[2][4][4]) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) tot[mi][nt][j] += acc[mi][nt][j] * (sa[mi][j >> 1] * sb[nt][j & 1]);
    }
  }
}

__global__ void __launch_bounds__(256)
    GemmFp8(const uint8_t* xq, const float* xs, int64_t m, int64_t ldx, const uint8_t* w, const float* ws,
            int64_t in, int64_t out, int64_t ldy, float* y) {
  PdlEnter();
  extern __shared__ __align__(128) unsigned char f8_smem[];
  uint8_t* a_sh = f8_smem;                          // [2][kF8Bm][128]
  uint8_t* b_sh = f8_smem + 2 * kF8Bm * kFp8Block;  // [2][kF8Bn][128]
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kF8Bm, n0 = static_cast<int64_t>(blockIdx.y) * kF8Bn;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4, g = lane / 4, t = lane % 4;
  const int64_t kbs = in / kFp8Block, xbs = ldx / kFp8Block;
  auto load = [&](int stage, int64_t kb) {
    const int64_t k0 = kb * kFp8Block;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, r = c / 8, cc = c % 8;
      CpAsync16(a_sh + stage * kF8Bm * kFp8Block + Fp8Swizzle(r, cc),
                xq + min(m0 + r, m - 1) * ldx + k0 + cc * 16);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = tid + i * 256, r = c / 8, cc = c % 8;
      CpAsync16(b_sh + stage * kF8Bn * kFp8Block + Fp8Swizzle(r, cc),
                w + min(n0 + r, out - 1) * in + k0 + cc * 16);
    }
    CpAsyncCommit();
  };
  float tot[2][4][4] = {};
  load(0, 0);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    const int cur = static_cast<int>(kb & 1);
    if (kb + 1 < kbs) {
      load(cur ^ 1, kb + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    float sa[2][2], sb[4][2];
    Fp8RowScales(xs, m0, m - m0, xbs, kb, wm, g, sa);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {  // Columns 2t and 2t + 1 share a 128-row tile.
      sb[nt][0] = sb[nt][1] = ws[(min(n0 + wn * 32 + nt * 8 + 2 * t, out - 1) / kFp8Block) * kbs + kb];
    }
    __syncthreads();  // This stage's tiles (cp.async) are visible to every warp.
    float acc[2][4][4];
    Fp8TileMma(a_sh + cur * kF8Bm * kFp8Block, b_sh + cur * kF8Bn * kFp8Block, wm, wn, lane, acc);
    Fp8Promote(acc, sa, sb, tot);
    __syncthreads();  // Everyone is done with this stage before the next step refills it.
  }
  StoreWarpTile(tot, wm, wn, lane, m0, m - m0, n0, out, ldy, y);
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_FP8_GEMM_CUH_
