// The MXFP4 expert GEMVs of the decode MoE (model/cuda/cuda_moe.cu) and the e2m1 decoding they share with the
// MXFP4 expert GEMMs (cuda_moe_kernels.cuh): the SIMT GEMV (GroupedGemvFp4), the GEMV on tensor cores
// (GroupedGemvFp4Mma) and its FP16 input rows (ToF16Rows). Same conventions as cuda_kernels.cuh.
#ifndef V4SERVE_MODEL_CUDA_MXFP4_GEMV_CUH_
#define V4SERVE_MODEL_CUDA_MXFP4_GEMV_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/mma.cuh"

namespace v4serve::model::cuda::kernels {
namespace {

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// An e4m3 pair (low byte first) as an FP16 pair (exact).
__device__ __forceinline__ uint32_t Fp8x2ToHalf2(uint32_t two) {
  uint32_t r;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(r) : "h"(static_cast<uint16_t>(two)));
  return r;
}

// Eight e2m1 values of a word (element 2i in the low nibble of byte i) as FP16 pairs times 2^-6, in a few
// instructions: each nibble (sign, exponent e, mantissa m) becomes the e4m3 byte with the same sign,
// exponent field e and mantissa m00, which is exactly 2^-6 times its value (subnormal 0.5 included), and
// the hardware converts FP8 pairs to FP16 pairs (exact). The low nibbles' bytes give h[0] = elements (0, 2)
// and h[2] = (4, 6), the high nibbles' h[1] = (1, 3) and h[3] = (5, 7) (low half first).
__device__ __forceinline__ void Fp4x8Half(uint32_t w, uint32_t (&h)[4]) {
  const uint32_t flo = ((w << 2) & 0x1C1C1C1Cu) | ((w << 4) & 0x80808080u);  // Elements 0, 2, 4, 6.
  const uint32_t fhi = ((w >> 2) & 0x1C1C1C1Cu) | (w & 0x80808080u);         // Elements 1, 3, 5, 7.
  h[0] = Fp8x2ToHalf2(flo);
  h[1] = Fp8x2ToHalf2(fhi);
  h[2] = Fp8x2ToHalf2(flo >> 16);
  h[3] = Fp8x2ToHalf2(fhi >> 16);
}

// Eight e2m1 values of a word as BF16 pairs out[p] = (element 2p, element 2p + 1) (low half first), times
// 2^(s - 127) for the e8m0 scale byte s: exact. Each nibble's exponent and mantissa bits go to a BF16's
// exponent low bits and top mantissa bit, its sign to the sign: that BF16 is exactly 2^-126 times the value
// (the subnormal 0.5 becomes BF16's subnormal 2^-127), then one BF16 multiply by 2^(s - 1) (two past s =
// 128, where 2^(s - 1) leaves BF16's range). A byte permute puts nibbles 2p and 2p + 1 at bits 0 and 16;
// about 6 instructions a pair against ~9 through FP16 and FP32 (Fp4x8).
__device__ __forceinline__ void Fp4x8Bf16(uint32_t w, uint32_t s, uint32_t (&out)[4]) {
  const uint32_t hi = w >> 4;
  const bool big = s > 128u;
  const uint32_t f = (big ? s - 1u : s + 126u) << 7, m = f | f << 16;  // BF16 pairs 2^(s - 128), 2^(s - 1).
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t xb = __byte_perm(w, hi, static_cast<uint32_t>(p | p << 4 | (4 + p) << 8 | (4 + p) << 12));
    uint32_t v = ((xb << 6) & 0x01C001C0u) | ((xb << 12) & 0x80008000u);
    if (big) asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(v) : "r"(v), "r"(0x7F007F00u));  // x 2^127.
    asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(out[p]) : "r"(v), "r"(m));
  }
}

// The same eight values as FP32 (times 2^-6), in element order. The SIMT GEMV was bound by decoding
// instructions, hence the trick.
__device__ __forceinline__ void Fp4x8(uint32_t w, float v[8]) {
  uint32_t h[4];
  Fp4x8Half(w, h);
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const float2 even = __half22float2(*reinterpret_cast<const __half2*>(&h[2 * q]));
    const float2 odd = __half22float2(*reinterpret_cast<const __half2*>(&h[2 * q + 1]));
    v[4 * q] = even.x;
    v[4 * q + 1] = odd.x;
    v[4 * q + 2] = even.y;
    v[4 * q + 3] = odd.y;
  }
}

// The MXFP4 grouped GEMV (same contract as GroupedGemv, but kCols rows of an expert per pass over its
// weights: 2 when decode batches give experts one or two rows each, which halves the registers and so
// doubles the warps in flight, 8 otherwise): a warp computes kRows consecutive output rows, so
// each activation float4 it loads serves kRows weight rows (the one-row version re-read the activations from
// L1 for every 16 bytes of weights), and kRows independent 16-byte weight loads are in flight per lane. The
// narrow variant takes 8 rows a warp: the activations' loads from L1/L2 (every warp reads the expert's whole
// input rows), not the weights, bounded it at 4 (H200, decode batch 64: 7.8 -> 6.0 ms a step). A lane takes
// whole 32-value blocks; values are decoded eight at a time (Fp4x8), each word's products scaled once.
template <int kRows, int kCols>
__global__ void __launch_bounds__(128, kCols <= 2 ? (kRows <= 4 ? 6 : 4) : 3)
    GroupedGemvFp4(const float* xin, const uint8_t* w, const uint8_t* scales, const int32_t* active,
                   const int32_t* n_active, const int32_t* start, const int32_t* count, int64_t in,
                   int64_t out, float* y) {
  PdlEnter();
  const int g = blockIdx.x;
  if (g >= *n_active) return;
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.y) * warps + threadIdx.x / 32) * kRows;
  if (o0 >= out) return;
  const int64_t e = active[g], off = start[e], bpr = in / 32;
  const int total = count[e];
  for (int c0 = 0; c0 < total; c0 += kCols) {
    const int cnt = min(kCols, total - c0);
    const float* xr = xin + (off + c0) * in;
    float acc[kRows][kCols];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[r][c] = 0;
    }
    for (int64_t b = lane; b < bpr; b += 32) {
      uint4 raw[kRows];
      float sc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = e * out + min(o0 + r, out - 1);  // Rows past the end are computed, not stored.
        raw[r] = *reinterpret_cast<const uint4*>(w + row * (in / 2) + b * 16);
        // The block scale times 2^6, which Fp4x8's values lack.
        sc[r] = __int_as_float(static_cast<int>((static_cast<uint32_t>(scales[row * bpr + b]) + 6u) << 23));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // Eight values per 32-bit word: the rows' activations, then row by row.
        float4 xa[kCols][2];
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          if (c < cnt) {
            const float4* xv = reinterpret_cast<const float4*>(xr + c * in + b * 32 + i * 8);
            xa[c][0] = xv[0];
            xa[c][1] = xv[1];
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float wv[8];
          Fp4x8(Word(raw[r], i), wv);
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
            if (c < cnt) {
              const float4 a = xa[c][0], a2 = xa[c][1];
              const float part = a.x * wv[0] + a.y * wv[1] + a.z * wv[2] + a.w * wv[3] + a2.x * wv[4] +
                                 a2.y * wv[5] + a2.z * wv[6] + a2.w * wv[7];
              acc[r][c] = fmaf(part, sc[r], acc[r][c]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float v = WarpSum(acc[r][c]);
        if (lane == 0 && c < cnt && o0 + r < out) y[(off + c0 + c) * out + o0 + r] = v;
      }
    }
  }
}

// The MXFP4 grouped GEMV on tensor cores (serving's decode path; same contract as GroupedGemv, x given as
// ToF16Rows gives it): the weights are the A operand of mma.sync m16n8k16 FP16 (kTiles tiles of 16 output
// rows a block, their e2m1 codes turned into FP16 pairs by Fp4x8Half, exact; the tiles share each load of x)
// and up to 8 of the expert's rows the B operand, so a warp does 16 x 128 x 8 multiply-adds in eight MMAs
// per 128-wide k chunk where the SIMT GEMV (GroupedGemvFp4) spent ~10 instructions per weight value and row.
// Lane (g, t) loads 32-value block t of the chunk of weight rows g and g + 8 (16 bytes each) and the 64 bytes
// of x that ToF16Rows ordered to match, so the MMA's k order is the same permutation on both sides (which a
// dot product does not see). The MMAs of a chunk mix its four blocks, so each block's e8m0 scale relative to
// the largest of the four, 2^-d, multiplies its FP16 weights first (exact down to FP16's smallest subnormal:
// d <= 17 for every e2m1 value; a block 2^25 below the chunk's largest counts as zero), and the largest
// scales the chunk's sum into FP32 totals; x's row scale is applied at the end. The kWarps warps of a block
// split the chunks (warp w takes w, w + kWarps, ...) and add their totals in shared memory. Experts with
// more than 8 rows take more passes (the weights then come from L2). kGlu (kTiles 2): tile 0 is 16 rows of
// the gate projection `w`, tile 1 the same rows of the up projection `w3`, and the block writes SwiGLU(gate,
// up) times the slot's routing weight, the MoE's first half in one launch. kMinBlocks (launch bounds): with
// no register bound ptxas kept ~80 registers by moving each chunk's loads next to the MMAs that use them (a
// memory latency per 32-value block instead of one per chunk); a bound of 24 warps an SM (80 registers) keeps
// them together with none spilled. Grid (>= n_active, ceil(out / (16 * (kGlu ? 1 : kTiles)))); in a multiple
// of 128.
struct GemvFp4Args {
  const __half* xh;  // ToF16Rows's rows and their scales.
  const float* xinv;
  const uint8_t* w;  // All experts' [out, in] codes and scales.
  const uint8_t* scales;
  const uint8_t* w3;  // kGlu: the up projection's, same shape.
  const uint8_t* scales3;
  const int32_t *active, *n_active, *start, *count;  // The device's routing (see GroupedGemvFp4).
  int64_t in, out;
  float* y;             // [slots, out].
  const float* slot_w;  // kGlu: each slot's routing weight (nullptr: 1).
  float lim;            // kGlu: SwiGLU's clamp (0: none).
};

// The scale of a 32-value block relative to its 128-value chunk's largest, 2^-d with d = top - s, as an
// FP16 pair: exact down to FP16's smallest subnormal 2^-24, zero below (see GroupedGemvFp4Mma).
__device__ __forceinline__ uint32_t RelScaleHalf2(uint32_t d) {
  const uint32_t bits = d <= 14u ? (15u - d) << 10 : d <= 24u ? 1u << (24u - d) : 0u;
  return bits | bits << 16;
}

__device__ __forceinline__ uint32_t Hmul2(uint32_t a, uint32_t b) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <int kWarps, int kTiles, bool kGlu, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) GroupedGemvFp4Mma(GemvFp4Args a) {
  PdlEnter();
  static_assert(!kGlu || kTiles == 2, "the fused gate / up GEMV has one tile of each");
  __shared__ float red[kWarps][32][4 * kTiles];
  if (static_cast<int>(blockIdx.x) >= *a.n_active) return;
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const int64_t in = a.in, out = a.out;
  const int64_t e = a.active[blockIdx.x], off = a.start[e];
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * 16 * (kGlu ? 1 : kTiles);
  const int total = a.count[e];
  const int chunks = static_cast<int>(in / 128);
  // Each tile's codes and scales from the expert's first row (32-bit words: an expert's codes are far below
  // 2^32 words), and this lane's rows g and g + 8 of each tile.
  const uint32_t* wb[kTiles];
  const uint32_t* sb[kTiles];
  uint32_t ro[kTiles][2];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const bool up = kGlu && i == 1;
    wb[i] = reinterpret_cast<const uint32_t*>((up ? a.w3 : a.w) + e * out * (in / 2));
    sb[i] = reinterpret_cast<const uint32_t*>((up ? a.scales3 : a.scales) + e * out * (in / 32));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ro[i][h] = static_cast<uint32_t>(min(n0 + (kGlu ? 0 : 16 * i) + 8 * h + g, out - 1));
    }
  }
  const uint32_t wstride = static_cast<uint32_t>(in / 8), sstride = static_cast<uint32_t>(chunks);
  // One 128-wide k chunk's operands in registers.
  struct Chunk {
    uint32_t q[kTiles][2][4];  // Codes of rows g and g + 8 of each tile.
    uint4 xb[4];               // x's values that match them.
    uint32_t sc[kTiles][2];    // The four scale bytes of each row's chunk.
  };
  for (int c0 = 0; c0 < total; c0 += 8) {
    const int cnt = min(8, total - c0);
    // x's row g (rows past the expert's read its last and are not stored).
    const uint4* xr = reinterpret_cast<const uint4*>(a.xh + (off + c0 + min(g, cnt - 1)) * in);
    auto load = [&](int ch, Chunk& c) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Block t of the chunk: 16 contiguous bytes.
          const uint4 v = __ldg(reinterpret_cast<const uint4*>(wb[i] + ro[i][h] * wstride + ch * 16 + t * 4));
          c.q[i][h][0] = v.x;
          c.q[i][h][1] = v.y;
          c.q[i][h][2] = v.z;
          c.q[i][h][3] = v.w;
          c.sc[i][h] = __ldg(sb[i] + ro[i][h] * sstride + ch);
        }
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) c.xb[b] = __ldg(xr + ch * 16 + t * 4 + b);
    };
    float tot[kTiles][4] = {};
    auto compute = [&](const Chunk& c) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        // Each lane's block scaled relative to the chunk's largest scale, so one set of MMAs covers the
        // chunk.
        uint32_t fac[2];
        float f[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t s4 = c.sc[i][h];
          const uint32_t top = max(max(s4 & 0xffu, (s4 >> 8) & 0xffu), max((s4 >> 16) & 0xffu, s4 >> 24));
          fac[h] = RelScaleHalf2(top - ((s4 >> (8 * t)) & 0xffu));
          f[h] = __uint_as_float((top + 6u) << 23);  // Fp4x8Half gives 2^-6 x the value.
        }
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          uint32_t h0[4], h1[4];
          Fp4x8Half(c.q[i][0][b], h0);
          Fp4x8Half(c.q[i][1][b], h1);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            h0[j] = Hmul2(h0[j], fac[0]);
            h1[j] = Hmul2(h1[j], fac[1]);
          }
          MmaF16(acc, h0[0], h1[0], h0[1], h1[1], c.xb[b].x, c.xb[b].y);
          MmaF16(acc, h0[2], h1[2], h0[3], h1[3], c.xb[b].z, c.xb[b].w);
        }
        tot[i][0] = fmaf(acc[0], f[0], tot[i][0]);
        tot[i][1] = fmaf(acc[1], f[0], tot[i][1]);
        tot[i][2] = fmaf(acc[2], f[1], tot[i][2]);
        tot[i][3] = fmaf(acc[3], f[1], tot[i][3]);
      }
    };
    for (int ch = warp; ch < chunks; ch += kWarps) {
      Chunk cur;
      load(ch, cur);
      compute(cur);
    }
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) red[warp][lane][4 * i + j] = tot[i][j];
    }
    __syncthreads();
    // Warp w adds up value w (w + kWarps, ...) of each lane's 4 per tile (kGlu: a gate and its up).
    for (int j = warp; j < (kGlu ? 4 : 4 * kTiles); j += kWarps) {
      float v = 0.f, u = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) {
        v += red[wi][lane][j];
        if constexpr (kGlu) u += red[wi][lane][4 + j];
      }
      const int64_t n = n0 + (kGlu ? 0 : 16 * (j / 4)) + g + ((j & 3) >= 2 ? 8 : 0);
      const int c = 2 * t + (j & 1);
      if (n >= out || c >= cnt) continue;
      const int64_t slot = off + c0 + c;
      v *= a.xinv[slot];
      if constexpr (kGlu) {
        u *= a.xinv[slot];
        if (a.lim > 0) {
          v = fminf(v, a.lim);
          u = fminf(fmaxf(u, -a.lim), a.lim);
        }
        v = SiluF(v) * u * (a.slot_w != nullptr ? a.slot_w[slot] : 1.0f);
      }
      a.y[slot * out + n] = v;
    }
    __syncthreads();  // Before the next pass refills `red`.
  }
}

// GroupedGemvFp4Mma's input: x [rows, in] FP32 (in a multiple of 8) as FP16 times 2^k per row, k such that
// the row's largest magnitude is below 2^15 (FP16's largest finite value is 65504; its 11-bit precision then
// reaches down to 2^-29 of that), and xinv[r] = 2^-k. Each 8 values are stored in the order 0, 2, 1, 3, 4, 6,
// 5, 7, Fp4x8Half's pairs. One block of 256 threads per row; row r reads x's row rows[r] (r without `rows`:
// the decode MoE gathers its slots' rows this way).
__global__ void ToF16Rows(const float* x, const int32_t* rows, int64_t in, __half* xh, float* xinv) {
  PdlEnter();
  const int64_t r = blockIdx.x;
  const float4* xr = reinterpret_cast<const float4*>(x + (rows != nullptr ? rows[r] : r) * in);
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < in / 4; i += blockDim.x) {
    const float4 v = xr[i];
    amax = fmaxf(amax, Amax4(v));
  }
  amax = BlockMax(amax);
  int ex = 0;
  frexpf(amax, &ex);  // amax < 2^ex (0 for 0).
  ex = max(-100, min(100, ex));
  const float s = ldexpf(1.f, 15 - ex);
  uint4* dst = reinterpret_cast<uint4*>(xh + r * in);
  for (int64_t i = threadIdx.x; i < in / 8; i += blockDim.x) {
    const float4 a = xr[2 * i], b = xr[2 * i + 1];
    const __half2 p[4] = {__floats2half2_rn(a.x * s, a.z * s), __floats2half2_rn(a.y * s, a.w * s),
                          __floats2half2_rn(b.x * s, b.z * s), __floats2half2_rn(b.y * s, b.w * s)};
    dst[i] = *reinterpret_cast<const uint4*>(p);
  }
  if (threadIdx.x == 0) xinv[r] = ldexpf(1.f, ex - 15);
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_MXFP4_GEMV_CUH_
