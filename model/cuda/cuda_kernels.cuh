// Device kernels of the CUDA forward pass (model/cuda/cuda_backend.cu, cuda_attention.cu; the MoE ones are
// in cuda_moe_kernels.cuh, top-k and sampling's in select_kernels.cuh, mHC's in mhc_kernels.cuh). Each
// mirrors one function of model/cpu and keeps its arithmetic order where that is cheap (FP32 throughout;
// Sinkhorn, RoPE angles and routing exactly as the CPU computes them), so the gpu tests can compare tightly
// in the FP32 weight mode.
#ifndef V4SERVE_MODEL_CUDA_CUDA_KERNELS_CUH_
#define V4SERVE_MODEL_CUDA_CUDA_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "model/cuda/launch.cuh"
#include "model/cuda/paged_rows.h"

// Internal linkage (an anonymous namespace): every unit that includes this compiles its own copy of the
// kernels it launches (model/cuda/cuda_backend_impl.cuh).
namespace v4serve::model::cuda::kernels {

namespace {

constexpr int kMaxHc = 16;  // hc_mult bound (V4 uses 4).

__device__ __forceinline__ int64_t MinI64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double WarpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// The largest magnitude of four values.
__device__ __forceinline__ float Amax4(const float4& v) {
  return fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Block-wide sum (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ double BlockSumD(double v) {
  __shared__ double part[32];
  __syncthreads();
  v = WarpSumD(v);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) part[w] = v;
  __syncthreads();
  double t = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) t += part[i];
  return t;
}
__device__ __forceinline__ float BlockMax(float v) {
  __shared__ float part[32];
  __syncthreads();
  v = WarpMax(v);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) part[w] = v;
  __syncthreads();
  float t = part[0];
  for (int i = 1; i < static_cast<int>(blockDim.x / 32); ++i) t = fmaxf(t, part[i]);
  return t;
}
__device__ __forceinline__ float SigmoidF(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float SiluF(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float LoadW(const void* p, int64_t i, bool bf16) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]) : static_cast<const float*>(p)[i];
}

// xin[s, :] = x[perm[s], :] (MoE's permutation, the head's logit rows).
__global__ void GatherRows(const float* x, const int32_t* perm, int64_t d, float* xin) {
  PdlEnter();
  const int64_t s = blockIdx.x;
  const float* src = x + static_cast<int64_t>(perm[s]) * d;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) xin[s * d + i] = src[i];
}

// dst[0..4) = bf16(a), one 8-byte store (dst 8-byte aligned).
__device__ __forceinline__ void StoreBf16x4(const float4& a, __nv_bfloat16* dst) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(a.x, a.y), hi = __floats2bfloat162_rn(a.z, a.w);
  uint2 packed;
  packed.x = *reinterpret_cast<const unsigned*>(&lo);
  packed.y = *reinterpret_cast<const unsigned*>(&hi);
  *reinterpret_cast<uint2*>(dst) = packed;
}

// xin[s, :] = bf16(x[perm[s], :]): GatherRows and ToBf16 in one pass (the prefill MoE's expert inputs, which
// the MXFP4 GEMM reads in BF16: the FP32 copy was 805 MB at 8192 tokens, converted once for each of w1, w3).
// Grid (slots, any), 4 values a thread where d is a multiple of 4 and x 16-byte aligned.
__global__ void GatherRowsBf16(const float* x, const int32_t* perm, int64_t d, __nv_bfloat16* xin) {
  PdlEnter();
  const int64_t s = blockIdx.x;
  const float* src = x + static_cast<int64_t>(perm[s]) * d;
  __nv_bfloat16* dst = xin + s * d;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  if (d % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xin) % 8 == 0) {
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < d / 4; i += stride) {
      StoreBf16x4(reinterpret_cast<const float4*>(src)[i], dst + 4 * i);
    }
    return;
  }
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < d; i += stride) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

// Embedding rows copied into every mHC stream: streams[t, j, :] = embed[tokens[t], :], t = blockIdx.x.
// Grid (tokens, any): block (t, b) takes
// features b * blockDim.x + thread, strided by the grid (one block a token took ~10 us for a decode step's
// few tokens: 16 dependent rounds of a load and 4 stores a thread).
__global__ void Embed(const int32_t* tokens, const void* embed, bool bf16, int64_t hc, int64_t d,
                      float* streams) {
  PdlEnter();
  const int64_t t = blockIdx.x;
  const int64_t row = tokens[t];
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < d;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    const float v = LoadW(embed, row * d + i, bf16);
    for (int64_t j = 0; j < hc; ++j) streams[(t * hc + j) * d + i] = v;
  }
}

// The one-block-per-row kernels below run a decode step's few rows, so a thread's chain of loads sets their
// time (ncu, H200, batch 1: 10-24 us each with one float a load): they read 4 floats a load where the row
// is a multiple of 4 floats and 16-byte aligned (every row of the backend's buffers), the same arithmetic.
__device__ __forceinline__ bool Vec4(const void* p, int64_t n) {
  return (n & 3) == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}
// Sum over the row of double(v_i)^2, by the block (every thread gets it).
__device__ __forceinline__ double RowSumSquares(const float* v, int64_t n) {
  double ss = 0;
  if (Vec4(v, n)) {
    const float4* v4 = reinterpret_cast<const float4*>(v);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x) {
      const float4 a = v4[i];
      ss += static_cast<double>(a.x) * a.x + static_cast<double>(a.y) * a.y + static_cast<double>(a.z) * a.z +
            static_cast<double>(a.w) * a.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += static_cast<double>(v[i]) * v[i];
  }
  return BlockSumD(ss);
}

// v = v / sqrt(mean(v^2) + eps) * w over one row of `dim` (w may be null), by the block.
__device__ __forceinline__ void RmsNormRow(float* v, int64_t dim, const float* w, double eps) {
  const double ss = RowSumSquares(v, dim);
  const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(dim) + eps));
  if (Vec4(v, dim) && (w == nullptr || Vec4(w, dim))) {
    float4* v4 = reinterpret_cast<float4*>(v);
    const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      float4 a = v4[i];
      const float4 g = w4 != nullptr ? w4[i] : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
      a.x = a.x * inv * g.x;
      a.y = a.y * inv * g.y;
      a.z = a.z * inv * g.z;
      a.w = a.w * inv * g.w;
      v4[i] = a;
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) v[i] = v[i] * inv * (w ? w[i] : 1.0f);
}

// x = x / sqrt(mean(x^2) + eps) * w per row of `dim` (w may be null). One block per row.
__global__ void RmsNorm(float* x, int64_t dim, const float* w, double eps) {
  PdlEnter();
  RmsNormRow(x + blockIdx.x * dim, dim, w, eps);
}

// The interleaved RoPE of pair i of the `rd` dims at v (angle pos * inv_freq[i]; inverse: the rotation
// back), the arithmetic of cpu's RoPE.
__device__ __forceinline__ void RopePair(float* v, int64_t i, int64_t pos, const float* inv_freq,
                                         bool inverse) {
  const float ang = static_cast<float>(pos) * inv_freq[i];
  const float c = cosf(ang), s = inverse ? -sinf(ang) : sinf(ang);
  const float a = v[2 * i], b = v[2 * i + 1];
  v[2 * i] = a * c - b * s;
  v[2 * i + 1] = a * s + b * c;
}

// RmsNorm of each row of `dim` (w may be null), then RoPE on its `rd` dims at offset `off` (row r at
// positions[r / rows_per_pos]): the query heads' and the KV row's norm and rotation in one launch. One
// block per row.
__global__ void RmsNormRope(float* x, int64_t dim, const float* w, double eps, int64_t off, int64_t rd,
                            const int64_t* positions, int64_t rows_per_pos, const float* inv_freq) {
  PdlEnter();
  float* v = x + blockIdx.x * dim;
  RmsNormRow(v, dim, w, eps);
  __syncthreads();  // A pair's two values may have been normed by two threads.
  const int64_t pos = positions[blockIdx.x / rows_per_pos];
  for (int64_t i = threadIdx.x; i < rd / 2; i += blockDim.x) RopePair(v + off, i, pos, inv_freq, false);
}

// Interleaved RoPE on the `rd` dims at offset `off` of each row of `stride`; row r is at
// positions[r / rows_per_pos]. One thread per (row, pair).
__global__ void Rope(float* x, int64_t rows, int64_t stride, int64_t off, int64_t rd,
                     const int64_t* positions, int64_t rows_per_pos, const float* inv_freq, bool inverse) {
  PdlEnter();
  const int64_t half = rd / 2;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * half) return;
  const int64_t r = idx / half, i = idx % half;
  RopePair(x + r * stride + off, i, positions[r / rows_per_pos], inv_freq, inverse);
}

__global__ void Scale(float* x, int64_t n, float s) {
  PdlEnter();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= s;
}

// y = bf16(x), 4 values a thread (16-byte loads, 8-byte stores where x and y allow): launch
// Blocks(Blocks(n, 4), 256) blocks of 256.
__global__ void ToBf16(const float* x, int64_t n, __nv_bfloat16* y) {
  PdlEnter();
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  if (i + 4 <= n && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0) {
    StoreBf16x4(*reinterpret_cast<const float4*>(x + i), y + i);
    return;
  }
  for (int64_t j = i; j < n && j < i + 4; ++j) y[j] = __float2bfloat16_rn(x[j]);
}

// x rounded to TF32 (10 stored mantissa bits; to nearest, ties away from zero, as cvt.rna.tf32.f32), in an
// FP32 container whose low 13 bits are zero. Finite inputs below ~3.4e38 only (larger ones round to inf).
__device__ __forceinline__ float RoundTf32(float x) {
  return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}

// The operands of a 3xTF32 GEMM: hi = tf32(x), lo = tf32(x - hi) (x - hi is exact in FP32), so that
// x = hi + lo to ~2^-22 relative and a tensor core reads both exactly whatever its own TF32 conversion.
// 4 values a thread (n a multiple of 4, every pointer 16-byte aligned): launch Blocks(n / 4, 256) of 256.
__global__ void SplitTf32(const float* x, int64_t n, float* hi, float* lo) {
  PdlEnter();
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  const float4 v = *reinterpret_cast<const float4*>(x + i);
  const float4 h = make_float4(RoundTf32(v.x), RoundTf32(v.y), RoundTf32(v.z), RoundTf32(v.w));
  *reinterpret_cast<float4*>(hi + i) = h;
  *reinterpret_cast<float4*>(lo + i) =
      make_float4(RoundTf32(v.x - h.x), RoundTf32(v.y - h.y), RoundTf32(v.z - h.z), RoundTf32(v.w - h.w));
}

// Where a row GEMM's block (RowsGemmF32 here, RowsGemmFp8 in fp8_gemm.cuh) stores its sums: y (row stride
// ldy) when the k range is not split, else its split's partial sums partial[blockIdx.y][m][out], which
// SplitKFinish adds.
struct SplitKOut {
  float* p;
  int64_t ld;
};
__device__ __forceinline__ SplitKOut SplitKTarget(float* y, int64_t ldy, float* partial, int64_t m,
                                                  int64_t out) {
  return gridDim.y == 1 ? SplitKOut{y, ldy} : SplitKOut{partial + blockIdx.y * m * out, out};
}

// The split-k end of the row GEMMs (RowsGemmF32 here, RowsGemmFp8 in fp8_gemm.cuh), called by every thread
// of a block after it stored its partial sums of split blockIdx.y (of gridDim.y) at partial[s][m][out]: the
// last block of feature group blockIdx.x to arrive (counters[blockIdx.x], back to 0 after for the next
// launch) adds the splits' partials in split order and writes y[r, nb0 .. nb0 + cols) for r < m (row stride
// ldy). The sums and their order do not depend on which split arrives last, so results repeat bit for bit
// (no atomics on y).
__device__ __forceinline__ void SplitKFinish(const float* partial, unsigned* counters, int64_t m, int64_t out,
                                             int64_t nb0, int64_t cols, int64_t ldy, float* y) {
  __shared__ bool last;
  const unsigned splits = gridDim.y;
  __threadfence();  // This block's partials are visible before its arrival counts.
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&counters[blockIdx.x], 1u) == splits - 1;
    if (last) counters[blockIdx.x] = 0;  // Every split has arrived: ready for the next launch.
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t i = threadIdx.x; i < m * cols; i += blockDim.x) {
    const int64_t r = i / cols, n = nb0 + i % cols;
    float v = 0.f;
    for (unsigned si = 0; si < splits; ++si) v += __ldcg(partial + (si * m + r) * out + n);
    y[r * ldy + n] = v;
  }
}

// y[r, n] (row stride ldy) = sum_k x[r, k] W[n, k] in FP32 (FMA, no tensor cores) for up to 64 rows: the
// backend's FP32 weights (mHC mixes, router gate, compressor projections; their rounding decides routing and
// compression, so they stay FP32) on decode batches, where cuBLAS's SGEMM/GEMV kernels took ~240 us of a
// batch-64 step for ~70 MB of weights. A warp takes 8 features x kRows rows (row group warp / kFw of kRg)
// over its block's k range, each lane 4 consecutive k at a stride of 128 (16-byte loads of the 8 weight rows
// and of its rows, the other row groups' warps reading the same weights through L1), then sums its lanes by
// shuffles; with gridDim.y > 1 the splits meet in SplitKFinish. x, W and the row strides 16-byte aligned (in
// and ldx multiples of 4). Grid (ceil(out / (8 kFw)), splits), 256 threads, kFw = 8 / kRg.
template <int kRows, int kRg>
__global__ void __launch_bounds__(256)
    RowsGemmF32(const float* x, int64_t m, int64_t ldx, const float* w, int64_t in, int64_t out, int64_t ldy,
                float* y, float* partial, unsigned* counters, bool prefetch) {
  static_assert(kRows == 8 || kRg == 1, "row groups of 8");
  constexpr int kFw = 8 / kRg;
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int fw = warp % kFw, rg = warp / kFw;
  const int64_t nb0 = static_cast<int64_t>(blockIdx.x) * 8 * kFw, n0 = nb0 + fw * 8;
  const int64_t in4 = in / 4, splits = gridDim.y, s = blockIdx.y;
  const int64_t k0 = in4 * s / splits, k1 = in4 * (s + 1) / splits;
  if (prefetch) PrefetchTileL2(w, in * 4, nb0, MinI64(nb0 + 8 * kFw, out), k0 * 16, k1 * 16);
  PdlEnter();
  const float4* w4 = reinterpret_cast<const float4*>(w);
  const float4* x4 = reinterpret_cast<const float4*>(x);
  int64_t wo[8], xo[kRows];  // Rows clamped to out - 1 and m - 1 (read, never stored).
#pragma unroll
  for (int f = 0; f < 8; ++f) wo[f] = MinI64(n0 + f, out - 1) * in4;
#pragma unroll
  for (int r = 0; r < kRows; ++r) xo[r] = MinI64(rg * kRows + r, m - 1) * (ldx / 4);
  float acc[8][kRows] = {};
  for (int64_t k = k0 + lane; k < k1; k += 32) {
    float4 wv[8];
#pragma unroll
    for (int f = 0; f < 8; ++f) wv[f] = w4[wo[f] + k];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float4 xv = x4[xo[r] + k];
#pragma unroll
      for (int f = 0; f < 8; ++f) {
        acc[f][r] = fmaf(wv[f].x, xv.x, acc[f][r]);
        acc[f][r] = fmaf(wv[f].y, xv.y, acc[f][r]);
        acc[f][r] = fmaf(wv[f].z, xv.z, acc[f][r]);
        acc[f][r] = fmaf(wv[f].w, xv.w, acc[f][r]);
      }
    }
  }
  const SplitKOut dst = SplitKTarget(y, ldy, partial, m, out);
#pragma unroll
  for (int f = 0; f < 8; ++f) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float v = WarpSum(acc[f][r]);
      const int64_t n = n0 + f, row = rg * kRows + r;
      if (lane == (f * kRows + r) % 32 && n < out && row < m) dst.p[row * dst.ld + n] = v;
    }
  }
  if (splits > 1) SplitKFinish(partial, counters, m, out, nb0, MinI64(8 * kFw, out - nb0), ldy, y);
}

// Lightning indexer scores: sc[r, s] = sum_h relu(iq[r,h] · ik.Row(first[r], s)) * iw[r,h] for s < vis[r].
// Grid (rows, chunks); a warp per entry, its lanes over the heads (each dot product in index order), the
// row's query heads (rows padded by one against bank conflicts), head weights and each warp's key in shared
// memory: IndexerScoresSmem bytes.
__host__ __device__ inline int64_t IndexerScoresSmem(int64_t ih, int64_t id, int warps) {
  return (ih * (id + 1) + ih + warps * id) * 4;
}
__global__ void IndexerScores(const float* iq, const float* iw, PagedRows ik, const int64_t* ent_base,
                              const int64_t* vis, int64_t ih, int64_t id, int64_t ld, float* sc) {
  PdlEnter();
  extern __shared__ float q_sh[];
  const int warps = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* w_sh = q_sh + ih * (id + 1);
  float* k_sh = w_sh + ih + w * id;
  const int64_t r = blockIdx.x;
  for (int64_t i = threadIdx.x; i < ih * id; i += blockDim.x)
    q_sh[(i / id) * (id + 1) + i % id] = iq[r * ih * id + i];
  for (int64_t i = threadIdx.x; i < ih; i += blockDim.x) w_sh[i] = iw[r * ih + i];
  __syncthreads();
  const int64_t n = vis[r];
  for (int64_t s = static_cast<int64_t>(blockIdx.y) * warps + w; s < n;
       s += static_cast<int64_t>(gridDim.y) * warps) {
    const float* k = ik.Row(ent_base[r], s, id);
    for (int64_t i = lane; i < id; i += 32) k_sh[i] = k[i];
    __syncwarp();
    float acc = 0;
    for (int64_t hh = lane; hh < ih; hh += 32) {
      const float* qh = q_sh + hh * (id + 1);
      float dot = 0;
      for (int64_t i = 0; i < id; ++i) dot += qh[i] * k_sh[i];
      acc += fmaxf(dot, 0.0f) * w_sh[hh];
    }
    acc = WarpSum(acc);
    if (lane == 0) sc[r * ld + s] = acc;
    __syncwarp();
  }
}

// Attention of one (row, head) per block over: window keys wk[win_start[r] .. + win_cnt[r]), then either
// the selected entries ek.Row(ent_base[r], sel[r, j]) (j < sel_cnt[r]) when `sel` is set (CSA), or the
// first vis[r] entries ek.Row(ent_base[r], s) (HCA). K = V (MQA, one KV head); sink logit per head.
__global__ void Attention(const float* q, const float* wk, PagedRows ek, const int64_t* win_start,
                          const int64_t* win_cnt, const int64_t* ent_base, const int64_t* vis,
                          const int32_t* sel, const int32_t* sel_cnt, int64_t topk, const float* sink,
                          int64_t h, int64_t hd, float scale, float* o) {
  PdlEnter();
  extern __shared__ float sh[];
  const int64_t r = blockIdx.x / h, hh = blockIdx.x % h;
  float* q_sh = sh;
  float* logits = sh + hd;
  const float* qv = q + (r * h + hh) * hd;
  for (int64_t i = threadIdx.x; i < hd; i += blockDim.x) q_sh[i] = qv[i];
  __syncthreads();
  const int64_t nw = win_cnt[r];
  const int64_t ne = ent_base == nullptr ? 0 : (sel != nullptr ? sel_cnt[r] : vis[r]);
  const int64_t nk = nw + ne;
  auto key = [&](int64_t j) -> const float* {
    if (j < nw) return wk + (win_start[r] + j) * hd;
    const int64_t s = sel != nullptr ? sel[r * topk + (j - nw)] : (j - nw);
    return ek.Row(ent_base[r], s, hd);
  };
  const int warps = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t j = w; j < nk; j += warps) {
    const float* k = key(j);
    float dot = 0;
    for (int64_t i = lane; i < hd; i += 32) dot += q_sh[i] * k[i];
    dot = WarpSum(dot);
    if (lane == 0) logits[j] = dot * scale;
  }
  __syncthreads();
  const float sk = sink[hh];
  float mx = sk;
  for (int64_t j = threadIdx.x; j < nk; j += blockDim.x) mx = fmaxf(mx, logits[j]);
  mx = BlockMax(mx);
  double den = 0;
  for (int64_t j = threadIdx.x; j < nk; j += blockDim.x) {
    const float e = expf(logits[j] - mx);
    logits[j] = e;
    den += e;
  }
  den = BlockSumD(den);  // Synchronizes, so the exponentials are visible below.
  const float denom = static_cast<float>(den) + expf(sk - mx);
  float* ov = o + (r * h + hh) * hd;
  const float inv_denom = 1.0f / denom;
  for (int64_t i = threadIdx.x; i < hd; i += blockDim.x) {
    float acc = 0;
#pragma unroll 8
    for (int64_t j = 0; j < nk; ++j) acc += (logits[j] * inv_denom) * key(j)[i];
    ov[i] = acc;
  }
}

// The streaming compressor (model/cpu/compressor.cc) on the device. AddApe adds the positional bias of each
// row's window slot to its gate scores (score[r] += ape[pos[r] % ratio], rows of `row` values), as
// CompressorPush does when it stores a row.
__global__ void AddApe(float* score, int64_t rows, int64_t row, const int64_t* pos, int64_t ratio,
                       const float* ape) {
  PdlEnter();
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * row) return;
  const int64_t r = idx / row, f = idx % row;
  score[idx] += ape[(pos[r] % ratio) * row + f];
}

// One block per entry to emit: a softmax over the entry's source rows of each feature's gate scores pools
// its kv values (CompressorPush's exact-mode order). Entry e pools rows [begin[e], begin[e + 1]) of the
// tables, whose pointers already point at the feature half the row contributes (overlap: the previous
// window's first half, then the current window's second half). out: [entries, width].
__global__ void PoolEntries(const float* const* kv_rows, const float* const* score_rows, const int32_t* begin,
                            int64_t width, float* out) {
  PdlEnter();
  const int e = blockIdx.x;
  const int j0 = begin[e], j1 = begin[e + 1];
  for (int64_t f = threadIdx.x; f < width; f += blockDim.x) {
    float mx = -INFINITY;
    for (int j = j0; j < j1; ++j) mx = fmaxf(mx, score_rows[j][f]);
    float denom = 0;
    for (int j = j0; j < j1; ++j) denom += expf(score_rows[j][f] - mx);
    float acc = 0;
    for (int j = j0; j < j1; ++j) acc += (expf(score_rows[j][f] - mx) / denom) * kv_rows[j][f];
    out[e * width + f] = acc;
  }
}

// Deterministic pseudo-random fill (hash of seed and index -> approximately N(0,1) by the sum of four
// uniforms), times `scale`; for benchmark weights.
__device__ __forceinline__ uint32_t Hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}
__global__ void RandomFill(void* p, bool bf16, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0;
    for (int j = 0; j < 4; ++j)
      s += static_cast<float>(Hash32(seed * 0x9e3779b97f4a7c15ull + i * 4 + j)) * 2.3283064e-10f;
    const float v = (s - 2.0f) * 1.7320508f * scale;  // Sum of 4 U(0,1): mean 2, variance 1/3.
    if (bf16) {
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    } else {
      static_cast<float*>(p)[i] = v;
    }
  }
}

// Uniform random bytes (benchmark MXFP4 codes).
__global__ void RandomBytes(uint8_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<uint8_t>(Hash32(seed * 0x9e3779b97f4a7c15ull + i) >> 24);
  }
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_CUDA_KERNELS_CUH_
