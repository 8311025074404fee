// The mHC kernels of the CUDA forward pass (cpu::HcPre, cpu::HcPost and the head's collapse): the pre-mix's
// weights, Sinkhorn and collapse with its norm (HcMix at decode sizes; HcCollapseRows and HcPostCombRows at
// prefill sizes; HcHeadMix), and the post-mix (HcPost). Split from cuda_kernels.cuh, whose helpers they use;
// the same internal linkage.
#ifndef V4SERVE_MODEL_CUDA_MHC_KERNELS_CUH_
#define V4SERVE_MODEL_CUDA_MHC_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"

namespace v4serve::model::cuda::kernels {

namespace {

// 1 / sqrt(mean(x^2) + eps) over the `len` values of one row, by the block (every thread gets it): the mHC
// mixes' row scale (cpu::HcPre's rs), computed where it is used rather than by a kernel of its own.
__device__ __forceinline__ float RowRsqrt(const float* x, int64_t len, double eps) {
  const double ss = RowSumSquares(x, len);
  return static_cast<float>(1.0 / sqrt(ss / static_cast<double>(len) + eps));
}

// The mHC collapse of one token's hc streams at 4 consecutive features (x4[j * d4 + i]: feature 4i of
// stream j), and at one feature.
__device__ __forceinline__ float4 Collapse4(const float* pre, int hc, const float4* x4, int64_t d4,
                                            int64_t i) {
  float4 y = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int j = 0; j < hc; ++j) {
    const float4 a = x4[j * d4 + i];
    y.x += pre[j] * a.x;
    y.y += pre[j] * a.y;
    y.z += pre[j] * a.z;
    y.w += pre[j] * a.w;
  }
  return y;
}
__device__ __forceinline__ float Collapse1(const float* pre, int hc, const float* x, int64_t d, int64_t i) {
  float y = 0;
  for (int j = 0; j < hc; ++j) y += pre[j] * x[j * d + i];
  return y;
}

// out[i] = RmsNorm(sum_j pre[j] * x[j * d + i]) * w[i] for lo <= i < hi (w may be null: no weight), by the
// block: the mHC collapse of one token's hc streams and the norm after it (attn_norm, ffn_norm, the final
// norm) in one kernel. The norm needs the whole collapsed row, so a block that writes a slice computes the
// row's sum of squares itself (the row is re-collapsed in registers; it is in L2); the collapsed values and
// the sum's order are those of a collapse followed by RmsNorm's kernel on 256 threads. lo a multiple of 4.
__device__ __forceinline__ void CollapseNorm(const float* pre, int hc, const float* x, int64_t d,
                                             const float* w, double eps, float* out, int64_t lo, int64_t hi) {
  const bool vec = Vec4(x, d) && Vec4(out, d) && (w == nullptr || Vec4(w, d)) && lo % 4 == 0;
  double ss = 0;
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < d / 4; i += blockDim.x) {
      const float4 a = Collapse4(pre, hc, x4, d / 4, i);
      ss += static_cast<double>(a.x) * a.x + static_cast<double>(a.y) * a.y + static_cast<double>(a.z) * a.z +
            static_cast<double>(a.w) * a.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
      const float a = Collapse1(pre, hc, x, d, i);
      ss += static_cast<double>(a) * a;
    }
  }
  const float inv = static_cast<float>(1.0 / sqrt(BlockSumD(ss) / static_cast<double>(d) + eps));
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    for (int64_t i = lo / 4 + threadIdx.x; i < hi / 4; i += blockDim.x) {
      float4 a = Collapse4(pre, hc, x4, d / 4, i);
      const float4 g = w4 != nullptr ? w4[i] : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
      a.x = a.x * inv * g.x;
      a.y = a.y * inv * g.y;
      a.z = a.z * inv * g.z;
      a.w = a.w * inv * g.w;
      reinterpret_cast<float4*>(out)[i] = a;
    }
    return;
  }
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    out[i] = Collapse1(pre, hc, x, d, i) * inv * (w ? w[i] : 1.0f);
  }
}

// CollapseNorm of slice `part` of `parts` (multiples of 4 values) of a token's d features: the collapse
// blocks of HcMix and HcHeadMix, each computing the whole norm and writing its slice.
__device__ __forceinline__ void CollapseNormSlice(const float* pre, int hc, const float* x, int64_t d,
                                                  const float* w, double eps, float* out, int64_t part,
                                                  int64_t parts) {
  const int64_t chunk = (d + 4 * parts - 1) / (4 * parts) * 4, lo = part * chunk;
  CollapseNorm(pre, hc, x, d, w, eps, out, min(lo, d), min(lo + chunk, d));
}

// The mHC pre weight of stream j from a token's raw mixes m and its streams' rsqrt r (cpu::HcPre).
__device__ __forceinline__ float HcPreWeight(const float* m, float r, const float* base, const float* scale,
                                             int j, float eps) {
  return SigmoidF((m[j] * r) * scale[0] + base[j]) + eps;
}

// The collapse blocks of HcMix, HcCollapseRows and HcHeadMix: the pre weights into shared memory, then
// CollapseNormSlice's slice `part` of `parts`. Every thread of the block must call it.
__device__ __forceinline__ void HcPreCollapse(const float* m, float r, const float* base, const float* scale,
                                              int hc, float eps, const float* x, int64_t d, const float* w,
                                              double norm_eps, float* out, int64_t part, int64_t parts) {
  __shared__ float pre[kMaxHc];
  if (static_cast<int>(threadIdx.x) < hc) pre[threadIdx.x] = HcPreWeight(m, r, base, scale, threadIdx.x, eps);
  __syncthreads();
  CollapseNormSlice(pre, hc, x, d, w, norm_eps, out, part, parts);
}

// CollapseNorm of a whole row for HcCollapseRows (prefill sizes), with the token's hc streams
// read from memory once: thread i keeps features i + q * blockDim.x (q < kPer) of each stream in registers
// (zeros past d), and the streams' sum of squares (r), the collapse and its norm come from them. Where
// blockDim.x divides d / 4 the sums run in RowSumSquares's and CollapseNorm's order (the same bits as
// RowRsqrt then CollapseNorm, which read the streams three times). For hc <= kHcRegStreams, kPer the
// smallest of 1, 2, 4 with kPer * 4 * blockDim.x >= d (HcRegsPer: 0 where none is). *r_out: the rsqrt.
constexpr int kHcRegStreams = 4;
__device__ __forceinline__ int HcRegsPer(int hc, const float* x, int64_t d, const float* w,
                                         const float* out) {
  const int64_t d4 = d / 4, b = blockDim.x;
  if (hc > kHcRegStreams || d % 4 != 0 || !Vec4(x, hc * d) || !Vec4(out, d) || (w != nullptr && !Vec4(w, d)))
    return 0;
  return d4 <= b ? 1 : d4 <= 2 * b ? 2 : d4 <= 4 * b ? 4 : 0;
}
template <int kPer>
__device__ __forceinline__ void HcCollapseInRegisters(const float* m, double norm_eps, const float* base,
                                                      const float* scale, int hc, float eps, const float* x,
                                                      int64_t d, const float* w, float* out, float* r_out) {
  const int64_t b = blockDim.x, i = threadIdx.x, d4 = d / 4;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float4 v[kHcRegStreams][kPer];
  double ss = 0;
#pragma unroll
  for (int j = 0; j < kHcRegStreams; ++j) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int64_t f = i + q * b;
      v[j][q] = j < hc && f < d4 ? x4[j * d4 + f] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      ss += static_cast<double>(v[j][q].x) * v[j][q].x + static_cast<double>(v[j][q].y) * v[j][q].y +
            static_cast<double>(v[j][q].z) * v[j][q].z + static_cast<double>(v[j][q].w) * v[j][q].w;
    }
  }
  const float r = static_cast<float>(1.0 / sqrt(BlockSumD(ss) / static_cast<double>(hc * d) + norm_eps));
  __shared__ float pre[kHcRegStreams];
  if (i < hc) pre[i] = HcPreWeight(m, r, base, scale, static_cast<int>(i), eps);
  if (i == 0) *r_out = r;
  __syncthreads();
  float4 a[kPer];
  double ss2 = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    a[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int j = 0; j < kHcRegStreams; ++j) {
      if (j < hc) {
        a[q].x += pre[j] * v[j][q].x;
        a[q].y += pre[j] * v[j][q].y;
        a[q].z += pre[j] * v[j][q].z;
        a[q].w += pre[j] * v[j][q].w;
      }
    }
    ss2 += static_cast<double>(a[q].x) * a[q].x + static_cast<double>(a[q].y) * a[q].y +
           static_cast<double>(a[q].z) * a[q].z + static_cast<double>(a[q].w) * a[q].w;
  }
  const float inv = static_cast<float>(1.0 / sqrt(BlockSumD(ss2) / static_cast<double>(d) + norm_eps));
  const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t f = i + q * b;
    if (f < d4) {
      const float4 g = w4 != nullptr ? w4[f] : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
      reinterpret_cast<float4*>(out)[f] =
          make_float4(a[q].x * inv * g.x, a[q].y * inv * g.y, a[q].z * inv * g.z, a[q].w * inv * g.w);
    }
  }
}

// The mHC pre-mix's post weights and Sinkhorn-projected comb matrix of one token (cpu::HcPre) from its raw
// mixes m and its streams' rsqrt r, by one warp: lanes < hc write post; the comb a lane per element (j, k) =
// (lane / hc, lane % hc) where hc * hc <= 32 (the serial version's operations in its order, sums read lane by
// lane through shuffles), else lane 0 serially in `cm` (kMaxHc * kMaxHc floats of shared memory).
__device__ __forceinline__ void HcPostComb(const float* m, float r, const float* base, const float* scale,
                                           int hc, int iters, float eps, float* post_out, float* comb_out,
                                           float* cm) {
  const unsigned full = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane < hc) post_out[lane] = 2.0f * SigmoidF((m[hc + lane] * r) * scale[1] + base[hc + lane]);
  if (hc * hc <= 32) {
    const int j = lane / hc, kc = lane % hc;
    const bool on = lane < hc * hc;
    float v = on ? (m[2 * hc + lane] * r) * scale[2] + base[2 * hc + lane] : 0.0f;
    auto row_at = [&](float x, int q) { return __shfl_sync(full, x, (j * hc + q) & 31); };
    auto col_at = [&](float x, int q) { return __shfl_sync(full, x, (q * hc + kc) & 31); };
    float mx = -INFINITY;
    for (int q = 0; q < hc; ++q) mx = fmaxf(mx, row_at(v, q));
    v = expf(v - mx);
    float sum = 0;
    for (int q = 0; q < hc; ++q) sum += row_at(v, q);
    v = v / sum + eps;
    for (int it = 0; it < iters; ++it) {
      if (it > 0) {
        sum = 0;
        for (int q = 0; q < hc; ++q) sum += row_at(v, q);
        v /= (sum + eps);
      }
      sum = 0;
      for (int q = 0; q < hc; ++q) sum += col_at(v, q);
      v /= (sum + eps);
    }
    if (on) comb_out[lane] = v;
    return;
  }
  if (lane != 0) return;
  for (int j = 0; j < hc; ++j) {
    float mx = -INFINITY;
    for (int k = 0; k < hc; ++k) {
      cm[j * hc + k] = (m[2 * hc + j * hc + k] * r) * scale[2] + base[2 * hc + j * hc + k];
      mx = fmaxf(mx, cm[j * hc + k]);
    }
    float s = 0;
    for (int k = 0; k < hc; ++k) s += (cm[j * hc + k] = expf(cm[j * hc + k] - mx));
    for (int k = 0; k < hc; ++k) cm[j * hc + k] = cm[j * hc + k] / s + eps;
  }
  for (int it = 0; it < iters; ++it) {
    if (it > 0) {  // Row normalization from the second iteration on, as cpu::HcPre.
      for (int j = 0; j < hc; ++j) {
        float s = 0;
        for (int k = 0; k < hc; ++k) s += cm[j * hc + k];
        for (int k = 0; k < hc; ++k) cm[j * hc + k] /= (s + eps);
      }
    }
    for (int k = 0; k < hc; ++k) {
      float s = 0;
      for (int j = 0; j < hc; ++j) s += cm[j * hc + k];
      for (int j = 0; j < hc; ++j) cm[j * hc + k] /= (s + eps);
    }
  }
  for (int i = 0; i < hc * hc; ++i) comb_out[i] = cm[i];
}

// mHC pre-mix of a token: from the raw mixes (fn · x) and the streams' rms, the pre/post weights and the
// Sinkhorn-projected comb matrix (cpu::HcPre), then collapsed = RmsNorm(sum_j pre_j * x_j) * norm_w (the
// block's attn_norm or ffn_norm). Grid n * (parts + 1), a token's blocks consecutive (launched together, so
// that the Sinkhorn block's read of the streams comes from L2): blocks p < parts of token t each write a
// slice of d of the collapse (each computes pre and the norm); block p == parts computes post and the
// Sinkhorn comb (HcPostComb, its first warp), in parallel with the collapse (20 dependent iterations: in
// series with it they were a third of the kernel). One block a token left most SMs idle at decode batches;
// with one slice a token (prefill sizes) HcCollapseRows and HcPostCombRows take over. 256 threads (the
// norm's sum in RmsNorm's order).
__global__ void HcMix(const float* mixes, double norm_eps, const float* base, const float* scale, int hc,
                      int iters, float eps, const float* streams, int64_t d, const float* norm_w,
                      float* collapsed, float* post_out, float* comb_out, int parts) {
  PdlEnter();
  const int64_t t = blockIdx.x / (parts + 1);
  const int part = static_cast<int>(blockIdx.x % (parts + 1));
  const float* m = mixes + t * (2 + hc) * hc;
  const float* x = streams + t * hc * d;
  const float r = RowRsqrt(x, hc * d, norm_eps);
  if (part < parts)
    return HcPreCollapse(m, r, base, scale, hc, eps, x, d, norm_w, norm_eps, collapsed + t * d, part, parts);
  __shared__ float cm[kMaxHc * kMaxHc];
  if (threadIdx.x < 32)
    HcPostComb(m, r, base, scale, hc, iters, eps, post_out + t * hc, comb_out + t * hc * hc, cm);
}

// HcMix's collapse for prefill-sized launches, a block (256 threads) a token: from the streams in registers
// where HcRegsPer allows (one read of them), else as HcMix's collapse blocks; also the streams' rsqrt into
// rs[t], for HcPostCombRows.
__global__ void HcCollapseRows(const float* mixes, double norm_eps, const float* base, const float* scale,
                               int hc, float eps, const float* streams, int64_t d, const float* norm_w,
                               float* collapsed, float* rs) {
  PdlEnter();
  const int64_t t = blockIdx.x;
  const float* m = mixes + t * (2 + hc) * hc;
  const float* x = streams + t * hc * d;
  float* out = collapsed + t * d;
  switch (HcRegsPer(hc, x, d, norm_w, out)) {
    case 1:
      return HcCollapseInRegisters<1>(m, norm_eps, base, scale, hc, eps, x, d, norm_w, out, rs + t);
    case 2:
      return HcCollapseInRegisters<2>(m, norm_eps, base, scale, hc, eps, x, d, norm_w, out, rs + t);
    case 4:
      return HcCollapseInRegisters<4>(m, norm_eps, base, scale, hc, eps, x, d, norm_w, out, rs + t);
    default:
      break;
  }
  const float r = RowRsqrt(x, hc * d, norm_eps);
  if (threadIdx.x == 0) rs[t] = r;
  HcPreCollapse(m, r, base, scale, hc, eps, x, d, norm_w, norm_eps, out, 0, 1);
}

// HcMix's post weights and comb for prefill-sized launches: a warp a token (HcPostComb) from the rsqrt that
// HcCollapseRows wrote, 8 tokens a block of 256 (the Sinkhorn's 20 dependent iterations no longer hold a
// block of HcMix's registers a token).
__global__ void HcPostCombRows(const float* mixes, const float* rs, const float* base, const float* scale,
                               int hc, int iters, float eps, int64_t n, float* post_out, float* comb_out) {
  PdlEnter();
  __shared__ float cm[8][kMaxHc * kMaxHc];
  const int w = static_cast<int>(threadIdx.x / 32);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 8 + w;
  if (t >= n) return;
  HcPostComb(mixes + t * (2 + hc) * hc, rs[t], base, scale, hc, iters, eps, post_out + t * hc,
             comb_out + t * hc * hc, cm[w]);
}

// The final collapse (hc_head: sigmoid weights only) and the final norm (norm_w). 256 threads.
// Grid (tokens, parts): block y writes slice y of d, as HcMix's collapse blocks.
__global__ void HcHeadMix(const float* mixes, double norm_eps, const float* base, const float* scale, int hc,
                          float eps, const float* streams, int64_t d, const float* norm_w, float* out) {
  PdlEnter();
  const int64_t t = blockIdx.x;
  const float* x = streams + t * hc * d;
  HcPreCollapse(mixes + t * hc, RowRsqrt(x, hc * d, norm_eps), base, scale, hc, eps, x, d, norm_w, norm_eps,
                out + t * d, blockIdx.y, gridDim.y);
}

// streams[k] = post_k * out + sum_j comb[j][k] * streams[j]: token blockIdx.x, four features a thread from
// 4 * (blockIdx.y * blockDim.x + threadIdx.x), 16-byte accesses (d a multiple of 4: Init checks). Launch with
// HcPostGrid. Each value's operations in the order of one thread a (token, feature), as before (that version
// spent most of its time on the 64-bit division of its index: 2.9 ms of an 8192-token prefill, H100).
// kHc: hc's bound, the loops' unrolled length (xs in registers): HcPostKernel picks 4 (V4's hc) or kMaxHc.
constexpr int kHcPostThreads = 128;
template <int kHc>
__global__ void __launch_bounds__(kHcPostThreads)
    HcPost(float* streams, const float* out, const float* post, const float* comb, int hc, int64_t d) {
  PdlEnter();
  const int64_t t = blockIdx.x, i0 = 4 * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
  if (i0 >= d) return;
  float* x = streams + t * hc * d;
  const float* o = out + t * d;
  const float* cm = comb + t * hc * hc;
  const float* pk = post + t * hc;
  float4 xs[kHc];
#pragma unroll
  for (int j = 0; j < kHc; ++j) {
    if (j < hc) xs[j] = *reinterpret_cast<const float4*>(x + j * d + i0);
  }
  const float4 ov = *reinterpret_cast<const float4*>(o + i0);
#pragma unroll
  for (int k = 0; k < kHc; ++k) {
    if (k >= hc) break;
    const float p = pk[k];
    float4 acc = make_float4(p * ov.x, p * ov.y, p * ov.z, p * ov.w);
#pragma unroll
    for (int j = 0; j < kHc; ++j) {
      if (j >= hc) break;
      const float c = cm[j * hc + k];
      acc.x += c * xs[j].x;
      acc.y += c * xs[j].y;
      acc.z += c * xs[j].z;
      acc.w += c * xs[j].w;
    }
    *reinterpret_cast<float4*>(x + k * d + i0) = acc;
  }
}
inline dim3 HcPostGrid(int64_t n, int64_t d) {
  return dim3(static_cast<unsigned>(n),
              static_cast<unsigned>((d + 4 * kHcPostThreads - 1) / (4 * kHcPostThreads)));
}
inline auto HcPostKernel(int hc) { return hc <= 4 ? HcPost<4> : HcPost<kMaxHc>; }

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_MHC_KERNELS_CUH_
