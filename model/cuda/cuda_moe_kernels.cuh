// MoE kernels of the CUDA forward pass (model/cuda/cuda_moe.cu): routing, the grouped expert GEMV over
// BF16/FP32 experts, the MXFP4 expert GEMMs (the MXFP4 GEMVs and code decoding are in mxfp4_gemv.cuh, the
// token permutation in permute_kernels.cuh), SwiGLU and the combine. Same conventions as cuda_kernels.cuh.
#ifndef V4SERVE_MODEL_CUDA_CUDA_MOE_KERNELS_CUH_
#define V4SERVE_MODEL_CUDA_CUDA_MOE_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/fp8_gemm.cuh"
#include "model/cuda/mma.cuh"
#include "model/cuda/mxfp4_gemv.cuh"
#include "model/cuda/permute_kernels.cuh"
#include "model/cuda/wgmma.cuh"

namespace v4serve::model::cuda::kernels {
namespace {

constexpr int kMaxGroupRows = 8;  // Rows per expert that the grouped GEMV handles in registers.

// MoE routing of one row per block: scores (sqrt-softplus or sigmoid), top-k of score + bias (ties: lower
// expert), or the token's hash experts; weights score / sum * routed_scaling.
__global__ void Route(const float* logits, int64_t ne, int64_t k, bool sigmoid, const float* bias,
                      const int32_t* tid2eid, const int32_t* tokens, float rsf, int32_t* sel, float* wts) {
  PdlEnter();
  extern __shared__ float rsh[];
  float* score = rsh;
  float* biased = rsh + ne;
  int* taken = reinterpret_cast<int*>(rsh + 2 * ne);
  __shared__ float part_v[32];
  __shared__ int part_i[32];
  const int64_t r = blockIdx.x;
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) {
    const float l = logits[r * ne + e];
    float s;
    if (sigmoid) {
      s = SigmoidF(l);
    } else {
      const float sp = l > 20.0f ? l : log1pf(expf(l));
      s = sqrtf(sp);
    }
    score[e] = s;
    biased[e] = s + (bias ? bias[e] : 0.0f);
    taken[e] = 0;
  }
  __syncthreads();
  int32_t* out = sel + r * k;
  if (tid2eid != nullptr) {
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x)
      out[j] = tid2eid[static_cast<int64_t>(tokens[r]) * k + j];
  } else {
    // k rounds of a block-wide argmax over the experts not taken yet; ties to the lowest index, as the CPU's
    // ascending scan with a strict comparison.
    const int warps = blockDim.x / 32, w = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t j = 0; j < k; ++j) {
      float bv = -INFINITY;
      int bi = -1;
      for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) {
        if (taken[e]) continue;
        if (bi < 0 || biased[e] > bv) {
          bv = biased[e];
          bi = static_cast<int>(e);
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == 0) {
        part_v[w] = bv;
        part_i[w] = bi;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float v = part_v[0];
        int i = part_i[0];
        for (int q = 1; q < warps; ++q) {
          if (part_i[q] >= 0 && (i < 0 || part_v[q] > v || (part_v[q] == v && part_i[q] < i))) {
            v = part_v[q];
            i = part_i[q];
          }
        }
        out[j] = i;
        taken[i] = 1;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  float sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += score[out[j]];
  for (int64_t j = 0; j < k; ++j) wts[r * k + j] = score[out[j]] / sum * rsf;
}

// silu(min(g, L)) * clamp(u, -L, L) * w[row] (w may be null): in place in g, or, with out, into out in
// BF16 (the prefill's w2 input, which its MXFP4 GEMM reads in BF16: no FP32 copy to convert).
__global__ void SwiGlu(float* g, const float* u, int64_t rows, int64_t inter, const float* w, float lim,
                       __nv_bfloat16* out) {
  PdlEnter();
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * inter) return;
  float gate = g[idx], up = u[idx];
  if (lim > 0) {
    gate = fminf(gate, lim);
    up = fminf(fmaxf(up, -lim), lim);
  }
  const float v = SiluF(gate) * up * (w ? w[idx / inter] : 1.0f);
  if (out != nullptr) {
    out[idx] = __float2bfloat16_rn(v);
  } else {
    g[idx] = v;
  }
}

// out[r, :] += sum_j y[row_slots[r, j], :] in j order (slots sorted by expert, the CPU's order).
// Grid (rows, any): block (r, b) takes features b * blockDim.x + thread, strided by the grid.
__global__ void CombineExperts(float* out, const float* y, const int32_t* row_slots, int64_t k, int64_t d) {
  PdlEnter();
  const int64_t r = blockIdx.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < d;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float acc = out[r * d + i];
    for (int64_t j = 0; j < k; ++j) acc += y[static_cast<int64_t>(row_slots[r * k + j]) * d + i];
    out[r * d + i] = acc;
  }
}

// Grouped GEMV for decode-sized expert groups: y[start_e + c, o] = xin[start_e + c, :] · W_e[o, :] for the
// c < count_e rows of each active expert e = active[g], g < *n_active (blocks past it return at once).
// Grid (>= n_active, ceil(out / warps)); a warp per output row, 16-byte weight loads unrolled so several are
// in flight, up to kMaxGroupRows rows accumulated in registers per pass over the weight row (more rows take
// more passes, from L2). W_e = w + e * out * in.
enum WeightKind { kF32 = 0, kBf16 = 1 };  // GroupedGemv's weight formats (MXFP4: GroupedGemvFp4).

template <int kKind>
__global__ void GroupedGemv(const float* xin, const void* w, const int32_t* active, const int32_t* n_active,
                            const int32_t* start, const int32_t* count, int64_t in, int64_t out, float* y) {
  PdlEnter();
  const int g = blockIdx.x;
  if (g >= *n_active) return;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * warps + threadIdx.x / 32;
  if (o >= out) return;
  const int64_t e = active[g], off = start[e];
  const int total = count[e];
  for (int c0 = 0; c0 < total; c0 += kMaxGroupRows) {
    const int cnt = min(kMaxGroupRows, total - c0);
    const float* xrows = xin + c0 * in;
    float* yrows = y + c0 * out;
    float acc[kMaxGroupRows];
#pragma unroll
    for (int c = 0; c < kMaxGroupRows; ++c) acc[c] = 0;
    if constexpr (kKind == kBf16) {
      const __nv_bfloat16* wr = static_cast<const __nv_bfloat16*>(w) + (e * out + o) * in;
#pragma unroll 4
      for (int64_t i = lane * 8; i < in; i += 32 * 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(wr + i);
        const __nv_bfloat162* p2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
        float wv[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 f = __bfloat1622float2(p2[q]);
          wv[2 * q] = f.x;
          wv[2 * q + 1] = f.y;
        }
#pragma unroll
        for (int c = 0; c < kMaxGroupRows; ++c) {
          if (c < cnt) {
            const float4* xv = reinterpret_cast<const float4*>(xrows + (off + c) * in + i);
            const float4 a = xv[0], b = xv[1];
            acc[c] += a.x * wv[0] + a.y * wv[1] + a.z * wv[2] + a.w * wv[3] + b.x * wv[4] + b.y * wv[5] +
                      b.z * wv[6] + b.w * wv[7];
          }
        }
      }
    } else {
      const float* wr = static_cast<const float*>(w) + (e * out + o) * in;
#pragma unroll 4
      for (int64_t i = lane * 4; i < in; i += 32 * 4) {
        const float4 wv = *reinterpret_cast<const float4*>(wr + i);
#pragma unroll
        for (int c = 0; c < kMaxGroupRows; ++c) {
          if (c < cnt) {
            const float4 a = *reinterpret_cast<const float4*>(xrows + (off + c) * in + i);
            acc[c] += a.x * wv.x + a.y * wv.y + a.z * wv.z + a.w * wv.w;
          }
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kMaxGroupRows; ++c) {
      const float s = WarpSum(acc[c]);
      if (lane == 0 && c < cnt) yrows[(off + c) * out + o] = s;
    }
  }
}

// The k loop of both MXFP4 expert GEMMs (GroupedGemmFp4, GroupedGemmFp4Fp8): x's first tile into stage 0,
// the first two k steps' weight codes into the register buffers and the first into stage 0, then
// step(k, stage) for each of `steps` k steps, unrolled by two so that the register buffers (indexed by the
// stage) stay registers.
template <class LoadA, class FetchB, class StoreB, class Step>
__device__ __forceinline__ void RunTwoStageK(int64_t steps, LoadA& load_a, FetchB& fetch_b, StoreB& store_b,
                                             Step& step) {
  load_a(0, 0);
  fetch_b(0, 0);
  fetch_b(1, 1);
  store_b(0, 0);
  for (int64_t k = 0; k < steps; k += 2) {
    step(k, 0);
    if (k + 1 < steps) step(k + 1, 1);
  }
}

// The MXFP4 grouped expert GEMM on tensor cores, the weights dequantized in its main loop: for each tile of
// up to kEgBm rows of one expert e, y[row0 + m, n] = x[row0 + m, :] . W_e[n, :] over the output columns of
// ExpertColumnBlock (kEgBn of them). Tiles come from the host (ExpertTiles::expert/row0/rows, tile
// blockIdx.y, column block blockIdx.x) or, with `active` set, from the device's routing (blockIdx.x: the
// active[] index, past *n_active nothing; blockIdx.y: the column block; blockIdx.z: the kEgBm-row tile
// within the expert's count[e] rows from start[e]), so a decode step needs no host round trip.
// x is BF16 [slots, in] (in a multiple of kEgBk), y FP32 [slots, out]; W_e = expert e's [out, in] MXFP4 rows
// (codes two per byte, one e8m0 scale per 32 values, scale bytes <= 248: see GroupedGemvFp4).
// 256 threads: 8 warps as 2 (rows) x 4 (columns), 32 x 32 each, mma.sync m16n8k16 BF16 -> FP32. Per k-step of
// kEgBk: x's tile arrives by cp.async (two stages); each thread's 16 bytes of codes and its scale are loaded
// two steps ahead into registers, then decoded (Fp4x8 times the block scale: exact in BF16) into shared
// memory. Rows past the tile read its last row and are not stored; columns past `out` read the last weight
// row and are not stored.
constexpr int kEgBm = 64, kEgBn = 128, kEgBk = 64, kEgLd = kEgBk + 8;  // kEgLd: BF16 per padded smem row.
constexpr size_t kEgSmem = 2 * (kEgBm + kEgBn) * kEgLd * 2;

struct ExpertTiles {
  const int32_t *expert = nullptr, *row0 = nullptr, *rows = nullptr;                         // Host tiles.
  const int32_t *active = nullptr, *n_active = nullptr, *start = nullptr, *count = nullptr;  // Device.
};

// Host tiles run on a grid of (column blocks, tiles): a tile's column blocks are adjacent in launch order, so
// they run together and read the tile's rows of x while L2 holds them (ncu, H100, an 8192-token prefill's
// w1 with tiles first: 8 GB from DRAM for 1 GB of weights and 0.4 GB of inputs, 51% of DRAM bandwidth, the
// SMs 39% busy). Device tiles: (active experts, column blocks, row tiles).
__device__ __forceinline__ int64_t ExpertColumnBlock(const ExpertTiles& tiles) {
  return tiles.active != nullptr ? blockIdx.y : blockIdx.x;
}

// This block's tile of ExpertTiles: expert e, rows row0 .. + rows; false when it has none.
__device__ __forceinline__ bool ExpertTile(const ExpertTiles& tiles, int64_t* e, int64_t* row0, int* rows) {
  if (tiles.active != nullptr) {
    if (static_cast<int>(blockIdx.x) >= *tiles.n_active) return false;
    *e = tiles.active[blockIdx.x];
    const int m0 = static_cast<int>(blockIdx.z) * kEgBm;
    if (m0 >= tiles.count[*e]) return false;
    *row0 = tiles.start[*e] + m0;
    *rows = min(kEgBm, tiles.count[*e] - m0);
  } else {
    *e = tiles.expert[blockIdx.y];
    *row0 = tiles.row0[blockIdx.y];
    *rows = tiles.rows[blockIdx.y];
  }
  return *rows > 0;  // PermuteScan pads its tiles with empty ones.
}

__global__ void __launch_bounds__(256)
    GroupedGemmFp4(const __nv_bfloat16* x, const uint8_t* codes, const uint8_t* scales, ExpertTiles tiles,
                   int64_t in, int64_t out, float* y) {
  PdlEnter();
  extern __shared__ __align__(16) unsigned char eg_smem[];
  __nv_bfloat16* a_sh = reinterpret_cast<__nv_bfloat16*>(eg_smem);  // [2][kEgBm][kEgLd]
  __nv_bfloat16* b_sh = a_sh + 2 * kEgBm * kEgLd;                   // [2][kEgBn][kEgLd]
  int64_t e, row0;
  int rows;
  if (!ExpertTile(tiles, &e, &row0, &rows)) return;
  const int64_t n0 = ExpertColumnBlock(tiles) * kEgBn;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  // This thread's weight slice: row n0 + tid / 2, values (tid % 2) * 32 .. + 32 of each k-step.
  const int br = tid / 2, bh = tid % 2;
  const int64_t wrow = e * out + min(n0 + br, out - 1);
  const uint8_t* wcodes = codes + wrow * (in / 2) + bh * 16;
  const uint8_t* wscales = scales + wrow * (in / 32) + bh;
  const int64_t steps = in / kEgBk;
  uint4 bcode[2];
  uint32_t bscale[2];
  auto load_a = [&](int stage, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, r = c / 8, cc = c % 8;
      CpAsync16(a_sh + (stage * kEgBm + r) * kEgLd + cc * 8,
                x + (row0 + min(r, rows - 1)) * in + k0 + cc * 8);
    }
    CpAsyncCommit();
  };
  auto fetch_b = [&](int buf, int64_t kt) {
    if (kt < steps) {
      bcode[buf] = *reinterpret_cast<const uint4*>(wcodes + kt * kEgBk / 2);
      bscale[buf] = wscales[kt * kEgBk / 32];
    }
  };
  auto store_b = [&](int stage, int buf) {
    const float sc = __int_as_float(static_cast<int>((bscale[buf] + 6u) << 23));  // Fp4x8: 2^-6 x value.
    __nv_bfloat16* dst = b_sh + (stage * kEgBn + br) * kEgLd + bh * 32;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v[8];
      Fp4x8(Word(bcode[buf], i), v);
      uint4 p;
      p.x = PackBf16(v[0] * sc, v[1] * sc);
      p.y = PackBf16(v[2] * sc, v[3] * sc);
      p.z = PackBf16(v[4] * sc, v[5] * sc);
      p.w = PackBf16(v[6] * sc, v[7] * sc);
      *reinterpret_cast<uint4*>(dst + i * 8) = p;
    }
  };
  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) acc[mi][nt][0] = acc[mi][nt][1] = acc[mi][nt][2] = acc[mi][nt][3] = 0.f;
  }
  // Step kt: its weights were stored to stage kt & 1 at the end of step kt - 1 from register buffer kt & 1;
  // step kt fetches step kt + 2 into that buffer, then stores step kt + 1 from the other.
  auto step = [&](int64_t kt, int cur) {
    const bool more = kt + 1 < steps;
    fetch_b(cur, kt + 2);
    if (more) {
      load_a(cur ^ 1, (kt + 1) * kEgBk);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();  // This stage's x (cp.async) and weights (stored last step) are visible.
    const __nv_bfloat16* as = a_sh + cur * kEgBm * kEgLd;
    const __nv_bfloat16* bs = b_sh + cur * kEgBn * kEgLd;
#pragma unroll
    for (int kk = 0; kk < kEgBk; kk += 16) {
      uint32_t a[2][4], b[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        LdMatrixX4(a[mi], SmemAddr(as + (wm * 32 + mi * 16 + (lane & 15)) * kEgLd + kk + (lane >> 4) * 8));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        LdMatrixX4(b[np], SmemAddr(bs + (wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kEgLd + kk +
                                   ((lane >> 3) & 1) * 8));
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          MmaBf16(acc[mi][2 * np], a[mi], b[np][0], b[np][1]);
          MmaBf16(acc[mi][2 * np + 1], a[mi], b[np][2], b[np][3]);
        }
      }
    }
    __syncthreads();  // Everyone is done with this stage before it is refilled.
    if (more) store_b(cur ^ 1, cur ^ 1);
  };
  RunTwoStageK(steps, load_a, fetch_b, store_b, step);
  StoreWarpTile(acc, wm, wn, lane, row0, rows, n0, out, out, y);
}

// The prefill path's MXFP4 grouped expert GEMM on Hopper's warpgroup MMA (wgmma.cuh): GroupedGemmFp4's
// contract and products (BF16 x, weights decoded to BF16 exactly, FP32 accumulation, FP32 y) over host tiles
// of up to kWgBm = 128 rows of one expert (ExpertTiles' host fields; grid (column blocks of kWgBn = 128,
// tiles)). 256 threads = two warpgroups, each the m64n128k16 MMAs of 64 of the tile's rows over its 128
// columns, accumulators in registers. A warpgroup whose rows are all past the tile still runs its MMAs (on
// shared memory nobody loaded; nothing is stored): skipping them put the MMAs on a divergent path, which
// ptxas serializes (C7518), and measured slower (H100, prefill 32768 tokens: 277-287 against 235 ms). k steps
// of 64 through kWgStages = 3 shared-memory stages in the 128-byte swizzle: x's tile arrives by cp.async two
// steps ahead; each thread's 16 bytes of codes and its scale are loaded two steps ahead into registers and
// decoded (Fp4x8Bf16, exact) into the next stage while the tensor cores run this one, so
// decoding, loads and MMAs overlap within the block and each step takes one barrier. Rows past the tile read
// its last row and are not stored; columns past `out` read the last weight row and are not stored.
// sm_90a only (V4SERVE_WGMMA; elsewhere it traps and CudaBackend keeps GroupedGemmFp4).
constexpr int kWgBm = 128, kWgBn = 128, kWgBk = 64, kWgStages = 3;
constexpr int kWgStageBytes = (kWgBm + kWgBn) * kWgBk * 2;    // x's tile, then the weights' (16 KiB each).
constexpr size_t kWgSmem = kWgStages * kWgStageBytes + 1024;  // + the alignment of the stages to 1024.

__global__ void __launch_bounds__(256, 2)
    GroupedGemmFp4Wg(const __nv_bfloat16* x, const uint8_t* codes, const uint8_t* scales, ExpertTiles tiles,
                     int64_t in, int64_t out, float* y) {
  PdlEnter();
#if V4SERVE_WGMMA
  extern __shared__ __align__(1024) unsigned char wg_smem[];
  const uint32_t base = SmemAddr(wg_smem) + ((1024u - (SmemAddr(wg_smem) & 1023u)) & 1023u);
  int64_t e, row0;
  int rows;
  if (!ExpertTile(tiles, &e, &row0, &rows)) return;  // Host tiles only (GroupedGemmFp4 picks this kernel so).
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kWgBn;
  const int tid = static_cast<int>(threadIdx.x), wg = tid / 128;
  const bool mma = wg * 64 < rows;
  const int a_rows = rows > 64 ? kWgBm : 64;  // x's rows that some warpgroup reads.
  // Addresses advance by a k step each step (the loop's address arithmetic was a fifth of its instructions):
  // this thread's four 16-byte chunks of x's tile (row c / 8, chunk c % 8 for c = tid + 256 i) ...
  const __nv_bfloat16* asrc[4];
  uint32_t adst[4];
  bool aon[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = tid + i * 256, r = c / 8, cc = c % 8;
    asrc[i] = x + (row0 + min(r, rows - 1)) * in + cc * 8;
    adst[i] = base + Swizzle128(r, cc);
    aon[i] = r < a_rows;
  }
  // ... and its weight slice: row n0 + tid / 2, values (tid % 2) * 32 .. + 32 of each k step (one scale).
  const int br = tid / 2, bh = tid % 2;
  const int64_t wrow = e * out + min(n0 + br, out - 1);
  const uint8_t* wcodes = codes + wrow * (in / 2) + bh * 16;
  const uint8_t* wscales = scales + wrow * (in / 32) + bh;
  uint32_t bdst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) bdst[i] = base + kWgBm * kWgBk * 2 + Swizzle128(br, 4 * bh + i);
  const int steps = static_cast<int>(in / kWgBk);
  auto load_a = [&](int kt, uint32_t stage_off) {
    if (kt < steps) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (aon[i]) CpAsync16(adst[i] + stage_off, asrc[i] + kt * kWgBk);
      }
    }
    CpAsyncCommit();  // Empty past the end: the wait below counts groups.
  };
  auto fetch_b = [&](int kt, uint4* code, uint32_t* sc) {
    if (kt < steps) {
      *code = *reinterpret_cast<const uint4*>(wcodes + kt * (kWgBk / 2));
      *sc = wscales[kt * (kWgBk / 32)];
    }
  };
  auto store_b = [&](uint32_t stage_off, const uint4& code, uint32_t sc_byte) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t v[4];
      Fp4x8Bf16(Word(code, i), sc_byte, v);
      asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(bdst[i] + stage_off), "r"(v[0]),
                   "r"(v[1]), "r"(v[2]), "r"(v[3])
                   : "memory");
    }
  };
  // Descriptors of stage 0's tiles (this warpgroup's 64 rows of x, the weights); a stage is kWgStageBytes
  // further, the k-th 16-wide slice 32 k bytes (descriptor addresses count 16 bytes).
  const uint64_t da0 = WgDesc(base + wg * 64 * kWgBk * 2), db0 = WgDesc(base + kWgBm * kWgBk * 2);
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  load_a(0, 0);
  load_a(1, kWgStageBytes);
  uint4 c_cur = make_uint4(0, 0, 0, 0), c_nxt = c_cur;
  uint32_t s_cur = 0, s_nxt = 0;
  fetch_b(0, &c_cur, &s_cur);
  fetch_b(1, &c_nxt, &s_nxt);
  store_b(0, c_cur, s_cur);
  c_cur = c_nxt;  // Step 1's codes.
  s_cur = s_nxt;
  uint32_t stage = 0;  // Byte offset of stage kt % kWgStages.
  constexpr uint32_t kLast = (kWgStages - 1) * kWgStageBytes;
  for (int kt = 0; kt < steps; ++kt) {
    const uint32_t next = stage == kLast ? 0 : stage + kWgStageBytes;
    const uint32_t after = next == kLast ? 0 : next + kWgStageBytes;
    fetch_b(kt + 2, &c_nxt, &s_nxt);
    CpAsyncWait<1>();   // x's tile for step kt is here (step kt + 1's may still be in flight).
    FenceProxyAsync();  // This thread's writes (cp.async, decoded weights) are visible to wgmma ...
    __syncthreads();    // ... and everyone's are; every warpgroup is past step kt - 1's MMAs.
    {  // Both warpgroups, whatever their rows: a branch here makes ptxas serialize the MMAs (C7518).
      const uint64_t da = da0 + (stage >> 4), db = db0 + (stage >> 4);
      WgFenceOperands(acc);
      WgFence();
#pragma unroll
      for (int j = 0; j < kWgBk / 16; ++j) WgmmaBf16N128(acc, da + 2 * j, db + 2 * j);
      WgCommit();
    }
    // While the MMAs run: x for step kt + 2 into the stage step kt - 1 used, step kt + 1's weights into its
    // stage (last read by step kt - 2).
    load_a(kt + 2, after);
    if (kt + 1 < steps) store_b(next, c_cur, s_cur);
    c_cur = c_nxt;
    s_cur = s_nxt;
    {
      WgWait<0>();
      WgFenceOperands(acc);
    }
    stage = next;
  }
  if (!mma) return;
  // acc[4 j + q]: row 16 w + lane / 4 + 8 (q / 2) of the warpgroup's 64, column 8 j + 2 (lane % 4) + q % 2.
  const int lane = tid % 32, w = (tid % 128) / 32;
  const bool pairs = out % 2 == 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wg * 64 + w * 16 + lane / 4 + 8 * h;
    if (r >= rows) continue;
    float* dst = y + (row0 + r) * out;
#pragma unroll
    for (int j = 0; j < kWgBn / 8; ++j) {
      const int64_t col = n0 + 8 * j + 2 * (lane % 4);
      const float a = acc[4 * j + 2 * h], b = acc[4 * j + 2 * h + 1];
      if (pairs && col + 1 < out) {
        *reinterpret_cast<float2*>(dst + col) = make_float2(a, b);
      } else {
        if (col < out) dst[col] = a;
        if (col + 1 < out) dst[col + 1] = b;
      }
    }
  }
#else
  __trap();
#endif
}

// 1 where the kernels were built with wgmma (sm_90a), 0 elsewhere: CudaBackend's check before it picks
// GroupedGemmFp4Wg.
__global__ void WgmmaBuilt(int* built) {
  PdlEnter();
  *built = V4SERVE_WGMMA;
}

// The MXFP4 grouped expert GEMM on FP8 tensor cores (the FP8 weight mode, CudaWeights::kFp8):
// GroupedGemmFp4's tiles and contract, with x quantized to FP8 per row in blocks of 128 (xq and its row-major
// scales xs, kernels::QuantizeFp8Blocks) and the weights' e2m1 codes converted to e4m3 in the main loop: a
// weight row's 128-wide k block takes the largest of its four E8M0 scales, S, and each value v x 2^s becomes
// the e4m3 of v x 2^(s - S) (exact while the block's scales span at most 2^8, as MODEL.md's FP4 -> FP8
// conversion; smaller values round), so the block's products are scaled by x's block scale x 2^S in the
// promotion (Fp8Promote). k steps of 128 as GemmFp8 (Fp8TileMma): x's tile arrives by cp.async (two stages);
// each thread's 32 bytes of codes and its row's four scales are loaded a step ahead into registers and
// converted into the other stage, the row's 2^S into `s_sh`. in a multiple of 128.
constexpr size_t kEg8Smem = kF8Smem + 2 * kF8Bn * sizeof(float);

__global__ void __launch_bounds__(256)
    GroupedGemmFp4Fp8(const uint8_t* xq, const float* xs, const uint8_t* codes, const uint8_t* scales,
                      ExpertTiles tiles, int64_t in, int64_t out, float* y) {
  PdlEnter();
  extern __shared__ __align__(128) unsigned char eg8_smem[];
  uint8_t* a_sh = eg8_smem;                                    // [2][kF8Bm][128]
  uint8_t* b_sh = eg8_smem + 2 * kF8Bm * kFp8Block;            // [2][kF8Bn][128]
  float* s_sh = reinterpret_cast<float*>(eg8_smem + kF8Smem);  // [2][kF8Bn]
  int64_t e, row0;
  int rows;
  if (!ExpertTile(tiles, &e, &row0, &rows)) return;
  const int64_t n0 = ExpertColumnBlock(tiles) * kF8Bn;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4, g = lane / 4, t = lane % 4;
  // This thread converts weight row n0 + tid / 2, values (tid % 2) * 64 .. + 64 of each k block.
  const int br = tid / 2, bh = tid % 2;
  const int64_t wrow = e * out + min(n0 + br, out - 1);
  const uint8_t* wcodes = codes + wrow * (in / 2) + bh * 32;
  const uint32_t* wscales = reinterpret_cast<const uint32_t*>(scales + wrow * (in / 32));  // 4 a k block.
  const int64_t kbs = in / kFp8Block;
  uint4 bcode[2][2];
  uint32_t bscale[2];
  auto load_a = [&](int stage, int64_t kb) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * 256, r = c / 8, cc = c % 8;
      CpAsync16(a_sh + stage * kF8Bm * kFp8Block + Fp8Swizzle(r, cc),
                xq + (row0 + min(r, rows - 1)) * in + kb * kFp8Block + cc * 16);
    }
    CpAsyncCommit();
  };
  auto fetch_b = [&](int buf, int64_t kb) {
    if (kb < kbs) {
      bcode[buf][0] = *reinterpret_cast<const uint4*>(wcodes + kb * 64);
      bcode[buf][1] = *reinterpret_cast<const uint4*>(wcodes + kb * 64 + 16);
      bscale[buf] = wscales[kb];
    }
  };
  auto store_b = [&](int stage, int buf) {
    const uint32_t sc = bscale[buf];
    const uint32_t top = max(max(sc & 0xffu, (sc >> 8) & 0xffu), max((sc >> 16) & 0xffu, sc >> 24));
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // The thread's two blocks of 32 values: scales 2 * bh + h of the four.
      const uint32_t s = (sc >> (8 * (2 * bh + h))) & 0xffu;
      // Fp4x8 gives 2^-6 x the value; a spread past 2^133 (no real checkpoint) flushes the block to zero.
      const uint32_t d = top - s;
      const float f = d <= 132u ? __uint_as_float((127u + 6u - d) << 23) : 0.0f;
      uint32_t packed[8];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float v[8];
        Fp4x8(Word(bcode[buf][h], q), v);
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * p] * f, v[4 * p + 1] * f),
                                                       __NV_SATFINITE, __NV_E4M3);
          const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(v[4 * p + 2] * f, v[4 * p + 3] * f),
                                                       __NV_SATFINITE, __NV_E4M3);
          packed[2 * q + p] = lo | hi << 16;
        }
      }
      uint8_t* row = b_sh + stage * kF8Bn * kFp8Block;
      *reinterpret_cast<uint4*>(row + Fp8Swizzle(br, 4 * bh + 2 * h)) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
      *reinterpret_cast<uint4*>(row + Fp8Swizzle(br, 4 * bh + 2 * h + 1)) =
          make_uint4(packed[4], packed[5], packed[6], packed[7]);
    }
    if (bh == 0) s_sh[stage * kF8Bn + br] = __uint_as_float(top << 23);
  };
  float tot[2][4][4] = {};
  // Step kb: its weights were stored to stage kb & 1 at the end of step kb - 1 from register buffer kb & 1;
  // step kb fetches step kb + 2 into that buffer, then stores step kb + 1 from the other.
  auto step = [&](int64_t kb, int cur) {
    const bool more = kb + 1 < kbs;
    fetch_b(cur, kb + 2);
    if (more) {
      load_a(cur ^ 1, kb + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    float sa[2][2], sb[4][2];
    Fp8RowScales(xs, row0, rows, kbs, kb, wm, g, sa);
    __syncthreads();  // This stage's x (cp.async) and weights (stored last step) are visible.
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      sb[nt][0] = s_sh[cur * kF8Bn + wn * 32 + nt * 8 + 2 * t];
      sb[nt][1] = s_sh[cur * kF8Bn + wn * 32 + nt * 8 + 2 * t + 1];
    }
    float acc[2][4][4];
    Fp8TileMma(a_sh + cur * kF8Bm * kFp8Block, b_sh + cur * kF8Bn * kFp8Block, wm, wn, lane, acc);
    Fp8Promote(acc, sa, sb, tot);
    __syncthreads();  // Everyone is done with this stage before it is refilled.
    if (more) store_b(cur ^ 1, cur ^ 1);
  };
  RunTwoStageK(kbs, load_a, fetch_b, store_b, step);
  StoreWarpTile(tot, wm, wn, lane, row0, rows, n0, out, out, y);
}

// FP8 rounding of the GEMM input for kernels that take FP32 (the MXFP4 GEMVs in the FP8 weight mode):
// QuantizeFp8Blocks's values, dequantized. `blocks` consecutive blocks of 128; a warp per block.
__global__ void RoundFp8Blocks(const float* x, int64_t blocks, float* out) {
  PdlEnter();
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= blocks) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const float4 v = reinterpret_cast<const float4*>(x + b * kFp8Block)[lane];
  const Pow2Scale s = Fp8BlockScale(v);
  auto round = [&](float a) {
    const __half_raw h =
        __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(Fp8E4m3(a * s.inv)), __NV_E4M3);
    return __half2float(__half(h)) * s.s;
  };
  reinterpret_cast<float4*>(out + b * kFp8Block)[lane] =
      make_float4(round(v.x), round(v.y), round(v.z), round(v.w));
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_CUDA_MOE_KERNELS_CUH_
