// Sparse/dense attention on tensor cores (BF16 mma.sync, FP32 accumulation), for the BF16 weight mode:
// the same function as kernels::Attention (cuda_kernels.cuh: window keys + selected or all compressed
// entries + the per-head sink; V4's keys are its values, one KV head shared by every query head), computed
// the way FlashMLA does it: one block per token holds all its query heads, so each key is read once per
// token for every head (kernels::Attention reads it once per (token, head)), and the two products run as
// mma.sync with an online softmax (FlashAttention-2).
//
// Layout: warp w takes heads (w % groups) * 16 .. + 16 (rows past `h` are zeros and are not written) and the
// output dims (w / groups) * HD/2 .. + HD/2; both warps of a head group compute the same scores (QK^T is
// done twice so that P never leaves registers). Keys arrive FP32 (the device copies of the states): a tile of
// 32 is fetched by cp.async while the previous one computes, then rounded to BF16 in shared memory; queries
// are rounded once per block; P is rounded to BF16 for the second product. Rows of shared memory are padded
// by 16 bytes so that ldmatrix's eight row addresses fall in distinct banks.
//
// Split over keys (flash-decoding), for the few rows of a decode step, where one block a row would leave most
// SMs idle (H200: 88 us for one CSA row of 640 keys): grid (rows, splits), block (r, sp) takes keys
// [sp * split_keys, + split_keys) of row r and writes its unnormalized output, running max and denominator
// to `part` / `ml` (the sink only in split 0); AttentionCombine merges the splits. split_keys 0: one block a
// row, normalized output straight to `o`.
//
// Numerics against kernels::Attention (FP32): BF16 rounding of q, k and p gives ~4e-3 relative error per
// element; the gpu test (CudaKernelTest.AttentionKernelsMatchTheReference) bounds the output's relative L2
// error against a double-precision host reference.
#ifndef V4SERVE_MODEL_CUDA_ATTENTION_MMA_CUH_
#define V4SERVE_MODEL_CUDA_ATTENTION_MMA_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/launch.cuh"
#include "model/cuda/mma.cuh"
#include "model/cuda/paged_rows.h"

namespace v4serve::model::cuda::kernels {
namespace {

constexpr int kMmaKeyTile = 32;          // Keys staged per step.
constexpr int kMaxAttentionSplits = 64;  // Key splits a row (AttentionCombine's shared weights).

__host__ __device__ constexpr int MmaRowStride(int hd) { return hd + 8; }  // BF16 elements; +16 bytes.
// Dynamic shared memory of AttentionMma<hd> for `h` heads.
__host__ __device__ constexpr size_t AttentionMmaSmem(int h, int hd) {
  return static_cast<size_t>(((h + 15) / 16 * 16 + kMmaKeyTile) * MmaRowStride(hd)) * 2 +
         static_cast<size_t>(kMmaKeyTile * hd) * 4;
}
__host__ __device__ constexpr int AttentionMmaThreads(int h) { return (h + 15) / 16 * 2 * 32; }

// Four floats to four BF16 in shared memory (8-byte aligned).
__device__ __forceinline__ void StoreBf16x4(__nv_bfloat16* dst, float4 v) {
  uint2 u;
  u.x = PackBf16(v.x, v.y);
  u.y = PackBf16(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = u;
}

// Rows [0, padded) of kCols floats (rows past `valid` as zeros) from `src` into BF16 rows `ld` apart in
// shared memory, by the block: eight 16-byte loads in flight a thread before their stores (a loop of one
// load, convert and store waits out a global load's latency each time: 32 times for 64 heads x 512).
template <int kCols>
__device__ __forceinline__ void LoadRowsBf16(const float* src, int valid, int padded, __nv_bfloat16* dst,
                                             int ld) {
  constexpr int kVec = kCols / 4, kBatch = 8;
  const int total = padded * kVec, step = static_cast<int>(blockDim.x);
  for (int i0 = threadIdx.x; i0 < total; i0 += step * kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = i0 + u * step, row = idx / kVec;
      v[u] =
          idx < total && row < valid
              ? *reinterpret_cast<const float4*>(src + static_cast<int64_t>(row) * kCols + (idx % kVec) * 4)
              : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = i0 + u * step;
      if (idx < total) StoreBf16x4(dst + (idx / kVec) * ld + (idx % kVec) * 4, v[u]);
    }
  }
}

// One block per token row r and key split (AttentionMmaThreads(h) threads, AttentionMmaSmem(h, HD) bytes).
// Arguments as kernels::Attention's; q [n, h, HD] and the key rows must be 16-byte aligned. With
// split_keys > 0 (a multiple of kMmaKeyTile): part [n, splits, h, HD], ml [n, splits, h, 2] instead of o.
template <int HD>
__global__ void __launch_bounds__(256, 1)
    AttentionMma(const float* q, const float* wk, PagedRows ek, const int64_t* win_start,
                 const int64_t* win_cnt, const int64_t* ent_base, const int64_t* vis, const int32_t* sel,
                 const int32_t* sel_cnt, int64_t topk, const float* sink, int h, float scale, float* o,
                 int64_t split_keys, float* part, float* ml) {
  PdlEnter();
  static_assert(HD % 32 == 0, "each warp takes HD/2 output dims in pairs of 8-wide tiles");
  constexpr int kLd = MmaRowStride(HD), kVec = HD / 4, kHalf = HD / 2, kNt = kHalf / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int groups = (h + 15) / 16, hp = groups * 16;
  __nv_bfloat16* q_sh = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* k_sh = q_sh + hp * kLd;
  float* stage = reinterpret_cast<float*>(k_sh + kMmaKeyTile * kLd);  // [kMmaKeyTile][HD] FP32.
  const int64_t r = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int hg = warp % groups, vh = warp / groups;
  const int g = lane / 4, t = lane % 4;

  const int64_t nw = win_cnt[r];
  const int64_t ne = ent_base == nullptr ? 0 : (sel != nullptr ? sel_cnt[r] : vis[r]);
  const int64_t nk_row = nw + ne, sp = blockIdx.y;
  const int64_t lo = split_keys > 0 ? min(nk_row, sp * split_keys) : 0;
  // This block's keys: [lo, nk); the last split takes the row's rest whatever split_keys says.
  const int64_t nk = split_keys > 0 && sp + 1 < gridDim.y ? min(nk_row, lo + split_keys) : nk_row;
  auto key = [&](int64_t j) -> const float* {
    if (j < nw) return wk + (win_start[r] + j) * HD;
    const int64_t s = sel != nullptr ? sel[r * topk + (j - nw)] : (j - nw);
    return ek.Row(ent_base[r], s, HD);
  };

  // Rows g and g + 8 of this warp's 16 heads. The sink is a logit without a value: start the running max
  // at it with its exp(0) = 1 in the denominator (split 0; the others start empty).
  const int h0 = hg * 16 + g, h1 = h0 + 8;
  float m[2] = {h0 < h ? sink[h0] : 0.f, h1 < h ? sink[h1] : 0.f};
  float l[2] = {1.f, 1.f};
  if (sp > 0) m[0] = m[1] = -INFINITY, l[0] = l[1] = 0.f;
  float acc[kNt][4];
#pragma unroll
  for (int i = 0; i < kNt; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  // Key tiles arrive FP32 by cp.async into `stage` while the previous tile computes, then are rounded to
  // BF16 into k_sh.
  auto fetch = [&](int64_t j0) {
    for (int idx = threadIdx.x; idx < kMmaKeyTile * kVec; idx += blockDim.x) {
      const int kr = idx / kVec, c = (idx % kVec) * 4;
      const int64_t j = j0 + kr;
      // Past the last key: zeros, so that P (0 there) times V stays 0.
      CpAsync16OrZero(stage + kr * HD + c, (j < nk ? key(j) : wk) + c, j < nk);
    }
    CpAsyncCommit();
  };
  if (lo < nk) fetch(lo);  // The first key tile is in flight while the queries load.
  LoadRowsBf16<HD>(q + r * h * HD, h, hp, q_sh, kLd);
  for (int64_t j0 = lo; j0 < nk; j0 += kMmaKeyTile) {
    CpAsyncWait<0>();
    __syncthreads();  // The tile is in `stage`; every warp is done with k_sh (and q is stored).
    for (int idx = threadIdx.x; idx < kMmaKeyTile * kVec; idx += blockDim.x) {
      const int kr = idx / kVec, c = (idx % kVec) * 4;
      StoreBf16x4(k_sh + kr * kLd + c, *reinterpret_cast<const float4*>(stage + kr * HD + c));
    }
    __syncthreads();
    if (j0 + kMmaKeyTile < nk) fetch(j0 + kMmaKeyTile);
    // S = Q K^T: 16 heads x 32 keys.
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll 4
    for (int k0 = 0; k0 < HD; k0 += 16) {
      uint32_t a[4];
      LdMatrixX4(a, SmemAddr(q_sh + (hg * 16 + (lane & 15)) * kLd + k0 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        LdMatrixX4(b, SmemAddr(k_sh + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + k0 +
                               ((lane >> 3) & 1) * 8));
        MmaBf16(s[2 * np], a, b[0], b[1]);
        MmaBf16(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    // Online softmax over the tile (the 4 lanes of a quad share rows g and g + 8).
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = j0 + nt * 8 + 2 * t + (e & 1);
        const float v = j < nk ? s[nt][e] * scale : -INFINITY;
        s[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float corr[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      corr[i] = expf(m[i] - mx[i]);
      m[i] = mx[i];
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = expf(s[nt][e] - m[e >> 1]);
        sum[e >> 1] += s[nt][e];
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
      l[i] = l[i] * corr[i] + sum[i];
    }
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      acc[nt][0] *= corr[0];
      acc[nt][1] *= corr[0];
      acc[nt][2] *= corr[1];
      acc[nt][3] *= corr[1];
    }
    // O += P V over this warp's half of the dims; P's accumulator layout is the A operand's.
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const uint32_t a[4] = {PackBf16(s[2 * kk][0], s[2 * kk][1]), PackBf16(s[2 * kk][2], s[2 * kk][3]),
                             PackBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             PackBf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < kNt / 2; ++np) {
        uint32_t b[4];
        LdMatrixX4Trans(
            b, SmemAddr(k_sh + (kk * 16 + (lane & 15)) * kLd + vh * kHalf + np * 16 + (lane >> 4) * 8));
        MmaBf16(acc[2 * np], a, b[0], b[1]);
        MmaBf16(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
  if (part != nullptr) {  // This split's unnormalized output, max and denominator.
    const int64_t base = (r * gridDim.y + sp) * h;
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
      const int d = vh * kHalf + nt * 8 + 2 * t;
      if (h0 < h)
        *reinterpret_cast<float2*>(part + (base + h0) * HD + d) = make_float2(acc[nt][0], acc[nt][1]);
      if (h1 < h)
        *reinterpret_cast<float2*>(part + (base + h1) * HD + d) = make_float2(acc[nt][2], acc[nt][3]);
    }
    if (t == 0 && vh == 0) {
      if (h0 < h) *reinterpret_cast<float2*>(ml + (base + h0) * 2) = make_float2(m[0], l[0]);
      if (h1 < h) *reinterpret_cast<float2*>(ml + (base + h1) * 2) = make_float2(m[1], l[1]);
    }
    return;
  }
  const float inv0 = 1.f / l[0], inv1 = 1.f / l[1];
#pragma unroll
  for (int nt = 0; nt < kNt; ++nt) {
    const int d = vh * kHalf + nt * 8 + 2 * t;
    if (h0 < h) {
      *reinterpret_cast<float2*>(o + (r * h + h0) * HD + d) =
          make_float2(acc[nt][0] * inv0, acc[nt][1] * inv0);
    }
    if (h1 < h) {
      *reinterpret_cast<float2*>(o + (r * h + h1) * HD + d) =
          make_float2(acc[nt][2] * inv1, acc[nt][3] * inv1);
    }
  }
}

// Merges AttentionMma's key splits: block (r, head), o = sum_sp part_sp e^(m_sp - M) / sum_sp l_sp e^(m_sp -
// M) with M the largest m_sp (split 0 holds the sink, so M is finite).
template <int HD>
__global__ void AttentionCombine(const float* part, const float* ml, int splits, int h, float* o) {
  PdlEnter();
  const int64_t r = blockIdx.x, hh = blockIdx.y;
  __shared__ float wsp[kMaxAttentionSplits];
  __shared__ float inv_l;
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int sp = 0; sp < splits; ++sp) mx = fmaxf(mx, ml[((r * splits + sp) * h + hh) * 2]);
    float l = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const float* e = ml + ((r * splits + sp) * h + hh) * 2;
      wsp[sp] = e[1] > 0.f ? expf(e[0] - mx) : 0.f;  // An empty split (no keys, no sink) adds nothing.
      l += e[1] * wsp[sp];
    }
    inv_l = 1.f / l;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < HD; d += blockDim.x) {
    float y = 0.f;
    for (int sp = 0; sp < splits; ++sp) y += part[((r * splits + sp) * h + hh) * HD + d] * wsp[sp];
    o[(r * h + hh) * HD + d] = y * inv_l;
  }
}

// The lightning indexer's scores on tensor cores (BF16 weight mode): the same function as
// kernels::IndexerScores (sc[r, s] = sum_h relu(iq[r, h] . ik[base_r + s]) * iw[r, h], s < vis[r]) with q and
// the keys rounded to BF16 (DeepSeek's indexer runs in FP8). Grid (rows, chunks): block (r, c) takes row r's
// entry tiles c, c + chunks, ...; ceil(ih / 16) warps, warp w the heads 16w .. 16w + 15 against the tile's
// 64 entries (mma m16n8k16), then relu, the head weights and the sum over heads (lanes, then warps through
// shared memory). Key tiles arrive FP32 by cp.async while the previous tile computes.
constexpr int kIdxTile = 64;
__host__ __device__ constexpr size_t IndexerMmaSmem(int ih, int id) {
  return static_cast<size_t>(((ih + 15) / 16 * 16 + kIdxTile) * MmaRowStride(id)) * 2 +
         static_cast<size_t>(kIdxTile * id) * 4 + static_cast<size_t>((ih + 15) / 16 * kIdxTile) * 4;
}

template <int ID>
__global__ void __launch_bounds__(128)
    IndexerScoresMma(const float* iq, const float* iw, PagedRows ik, const int64_t* ent_base,
                     const int64_t* vis, int ih, int64_t ld, float* sc) {
  PdlEnter();
  constexpr int kLd = MmaRowStride(ID), kVec = ID / 4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int groups = (ih + 15) / 16, hp = groups * 16;
  __nv_bfloat16* q_sh = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* k_sh = q_sh + hp * kLd;
  float* stage = reinterpret_cast<float*>(k_sh + kIdxTile * kLd);  // [kIdxTile][ID]
  float* red = stage + kIdxTile * ID;                              // [groups][kIdxTile]
  const int64_t r = blockIdx.x;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  const int h0 = warp * 16 + g, h1 = h0 + 8;
  const float w0 = h0 < ih ? iw[r * ih + h0] : 0.f, w1 = h1 < ih ? iw[r * ih + h1] : 0.f;
  const int64_t n = vis[r], tiles = (n + kIdxTile - 1) / kIdxTile;
  const int64_t first = ent_base[r];
  auto fetch = [&](int64_t s0) {
    for (int idx = threadIdx.x; idx < kIdxTile * kVec; idx += blockDim.x) {
      const int kr = idx / kVec, c = (idx % kVec) * 4;
      const int64_t s = s0 + kr;
      // Past the row's last entry: no page to name (a row may have none); zeros from any valid address.
      CpAsync16OrZero(stage + kr * ID + c, (s < n ? ik.Row(first, s, ID) : iq) + c, s < n);
    }
    CpAsyncCommit();
  };
  int64_t tile = blockIdx.y;
  if (tile < tiles) fetch(tile * kIdxTile);  // In flight while the queries load.
  LoadRowsBf16<ID>(iq + r * ih * ID, ih, hp, q_sh, kLd);
  for (; tile < tiles; tile += gridDim.y) {
    CpAsyncWait<0>();
    __syncthreads();  // The tile is staged; k_sh and red are free (and q is stored).
    for (int idx = threadIdx.x; idx < kIdxTile * kVec; idx += blockDim.x) {
      const int kr = idx / kVec, c = (idx % kVec) * 4;
      StoreBf16x4(k_sh + kr * kLd + c, *reinterpret_cast<const float4*>(stage + kr * ID + c));
    }
    __syncthreads();
    if (tile + gridDim.y < tiles) fetch((tile + gridDim.y) * kIdxTile);
    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < ID; k0 += 16) {
      uint32_t a[4];
      LdMatrixX4(a, SmemAddr(q_sh + (warp * 16 + (lane & 15)) * kLd + k0 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        LdMatrixX4(b, SmemAddr(k_sh + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kLd + k0 +
                               ((lane >> 3) & 1) * 8));
        MmaBf16(acc[2 * np], a, b[0], b[1]);
        MmaBf16(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    // relu x head weight, summed over this warp's 16 heads: the 8 lanes sharing t hold its rows.
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float p = fmaxf(acc[nt][j], 0.f) * w0 + fmaxf(acc[nt][2 + j], 0.f) * w1;
        p += __shfl_xor_sync(0xffffffffu, p, 4);
        p += __shfl_xor_sync(0xffffffffu, p, 8);
        p += __shfl_xor_sync(0xffffffffu, p, 16);
        if (g == 0) red[warp * kIdxTile + nt * 8 + 2 * t + j] = p;
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < kIdxTile; c += blockDim.x) {
      const int64_t s = tile * kIdxTile + c;
      if (s < n) {
        float v = 0.f;
        for (int w = 0; w < groups; ++w) v += red[w * kIdxTile + c];
        sc[r * ld + s] = v;
      }
    }
  }
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_ATTENTION_MMA_CUH_
