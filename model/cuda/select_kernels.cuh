// Selection kernels of the CUDA forward pass: the radix top-k (the indexer's top-k entries, sampling's
// candidates), greedy argmax over a row's logits, and the softmax sums and sorting of sampling's candidates.
// Split from cuda_kernels.cuh, whose helpers they use; the same internal linkage.
#ifndef V4SERVE_MODEL_CUDA_SELECT_KERNELS_CUH_
#define V4SERVE_MODEL_CUDA_SELECT_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"

namespace v4serve::model::cuda::kernels {

namespace {

// Order-preserving map of floats to unsigned ints (larger float -> larger key).
__device__ __forceinline__ uint32_t FloatKey(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Top-k of each row's first n[r] scores (row stride ld): writes the chosen indices (any order) to
// sel[r * k ...] and their count to cnt[r]. Ties at the threshold go to the lowest indices, as
// cpu::TopKIndices. One block per row (blockDim a multiple of 32, <= 1024): a radix select over the
// order-preserving keys, a byte at a time from the top (4 passes of a 256-bin histogram, warp-aggregated
// shared-memory atomics), finds the k-th largest key; then the entries above it and the first ties in index
// order are written.
__global__ void __launch_bounds__(1024)
    TopK(const float* sc, int64_t ld, const int64_t* nvis, int64_t k, int32_t* sel, int32_t* cnt) {
  PdlEnter();
  const int64_t r = blockIdx.x, n = nvis[r];
  const float* v = sc + r * ld;
  int32_t* out = sel + r * k;
  __shared__ int shared_count;
  __shared__ int scan[1024];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t chosen[2];  // The pass's byte and the rank still wanted below it.
  if (n <= k) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = static_cast<int32_t>(i);
    if (threadIdx.x == 0) cnt[r] = static_cast<int32_t>(n);
    return;
  }
  // The k-th largest key: its bytes from the top, each from a histogram of the keys matching those above.
  uint32_t prefix = 0, mask = 0, want = static_cast<uint32_t>(k);
  const int lane = threadIdx.x % 32;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int64_t i0 = 0; i0 < n; i0 += blockDim.x) {  // Whole warps per round, for __match_any_sync.
      const int64_t i = i0 + threadIdx.x;
      const uint32_t key = i < n ? FloatKey(v[i]) : 0;
      const bool in = i < n && (key & mask) == prefix;
      const uint32_t bin = in ? (key >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t above = 0;
      int b = 255;
      for (; b > 0 && above + hist[b] < want; --b) above += hist[b];
      chosen[0] = static_cast<uint32_t>(b);
      chosen[1] = want - above;
    }
    __syncthreads();
    prefix |= chosen[0] << shift;
    mask |= 255u << shift;
    want = chosen[1];
    __syncthreads();  // chosen[] is rewritten by the next pass.
  }
  const uint32_t thr = prefix;
  if (threadIdx.x == 0) shared_count = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (FloatKey(v[i]) > thr) out[atomicAdd(&shared_count, 1)] = static_cast<int32_t>(i);
  }
  __syncthreads();
  const int above = shared_count;
  // Ties in index order: each thread takes a contiguous chunk, counts its ties, exclusive scan.
  const int64_t chunk = (n + blockDim.x - 1) / blockDim.x;
  const int64_t b = threadIdx.x * chunk, e = min(n, b + chunk);
  int mine = 0;
  for (int64_t i = b; i < e; ++i) mine += FloatKey(v[i]) == thr ? 1 : 0;
  scan[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) {
      const int c = scan[i];
      scan[i] = run;
      run += c;
    }
  }
  __syncthreads();
  int rank = scan[threadIdx.x];
  for (int64_t i = b; i < e; ++i) {
    if (FloatKey(v[i]) == thr) {
      if (above + rank < k) out[above + rank] = static_cast<int32_t>(i);
      ++rank;
    }
  }
  if (threadIdx.x == 0) cnt[r] = static_cast<int32_t>(k);
}

// Greedy sampling: the argmax of each row (ties: lowest index; NaNs never win; a row without a number gives
// 0). Two passes, so that a decode step's few rows of 129k logits are read by many blocks (one block a row
// took 104 us on an H200): ArgmaxChunks, block (r, c) over chunk c of row r into pv/pi[r * chunks + c],
// then ArgmaxOfChunks, one warp a row. LaunchArgmaxRows runs both (pv, pi: rows * kArgmaxChunks).
constexpr int kArgmaxChunks = 32;
__device__ __forceinline__ void ArgmaxStep(float ov, int64_t oi, float* v, int64_t* i) {
  if (ov > *v || (ov == *v && oi < *i)) {
    *v = ov;
    *i = oi;
  }
}
__device__ __forceinline__ void WarpArgmax(float* v, int64_t* i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, *i, o);
    ArgmaxStep(ov, oi, v, i);
  }
}
__global__ void ArgmaxChunks(const float* x, int64_t cols, float* pv, int32_t* pi) {
  PdlEnter();
  const int64_t r = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int64_t per = (cols + chunks - 1) / chunks, lo = c * per, hi = min(cols, lo + per);
  const float* v = x + r * cols;
  float best = -INFINITY;
  int64_t bi = cols;
#pragma unroll 8
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) ArgmaxStep(v[i], i, &best, &bi);
  WarpArgmax(&best, &bi);
  __shared__ float wv[32];
  __shared__ int64_t wi[32];
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l == 0) {
    wv[w] = best;
    wi[w] = bi;
  }
  __syncthreads();
  if (w == 0) {
    best = l < static_cast<int>(blockDim.x / 32) ? wv[l] : -INFINITY;
    bi = l < static_cast<int>(blockDim.x / 32) ? wi[l] : cols;
    WarpArgmax(&best, &bi);
    if (l == 0) {
      pv[r * chunks + c] = best;
      pi[r * chunks + c] = static_cast<int32_t>(bi);
    }
  }
}
__global__ void ArgmaxOfChunks(const float* pv, const int32_t* pi, int chunks, int64_t cols, int32_t* out) {
  PdlEnter();
  const int64_t r = blockIdx.x;
  const int l = threadIdx.x;
  float best = -INFINITY;
  int64_t bi = cols;
  for (int c = l; c < chunks; c += 32) ArgmaxStep(pv[r * chunks + c], pi[r * chunks + c], &best, &bi);
  WarpArgmax(&best, &bi);
  if (l == 0) out[r] = static_cast<int32_t>(bi < cols ? bi : 0);
}
inline void LaunchArgmaxRows(const float* x, int64_t rows, int64_t cols, float* pv, int32_t* pi, int32_t* out,
                             cudaStream_t s) {
  if (rows == 0) return;
  ArgmaxChunks<<<dim3(static_cast<unsigned>(rows), kArgmaxChunks), 256, 0, s>>>(x, cols, pv, pi);
  ArgmaxOfChunks<<<static_cast<unsigned>(rows), 32, 0, s>>>(pv, pi, kArgmaxChunks, cols, out);
}

// Sampling on the device (model::TopLogits): the softmax's two sums over a logit row, sum exp(double(float(x
// - max) / t)) at the row's temperature t (0 taken as 1) and sum exp(double(x - max)), max being the row's
// best candidate (top_vals[r * m], after SortTop). Grid (rows, chunks): block (r, c) sums its chunk of the
// row into partial[(r * chunks + c) * 2 + {0, 1}] in a fixed order (strided per thread, then BlockSumD); the
// host adds the chunks in order.
__global__ void RowSoftmaxPartials(const float* x, int64_t cols, const float* top_vals, int m,
                                   const float* temps, double* partial) {
  PdlEnter();
  const int64_t r = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int64_t len = (cols + chunks - 1) / chunks, b = c * len, e = min(cols, b + len);
  const float* v = x + r * cols;
  const float mx = top_vals[r * m];
  const float t = temps[r] > 0.0f ? temps[r] : 1.0f;
  double s = 0, s1 = 0;
  for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
    s += exp(static_cast<double>((v[i] - mx) / t));
    s1 += exp(static_cast<double>(v[i] - mx));
  }
  s = BlockSumD(s);
  s1 = BlockSumD(s1);
  if (threadIdx.x == 0) {
    partial[(r * chunks + c) * 2] = s;
    partial[(r * chunks + c) * 2 + 1] = s1;
  }
}

// The m chosen entries of each row (TopK's `sel`, any order) sorted into the sampling order: larger value
// first, lower id first among equals. One block per row (bitonic sort in shared memory over m padded to a
// power of two <= 1024).
__global__ void SortTop(const float* x, int64_t cols, const int32_t* sel, int m, int32_t* ids, float* vals) {
  PdlEnter();
  __shared__ float sv[1024];
  __shared__ int32_t si[1024];
  int p = 1;
  while (p < m) p <<= 1;
  const float* v = x + blockIdx.x * cols;
  for (int i = threadIdx.x; i < p; i += blockDim.x) {
    if (i < m) {
      si[i] = sel[blockIdx.x * m + i];
      sv[i] = v[si[i]];
    } else {
      si[i] = INT_MAX;
      sv[i] = -INFINITY;
    }
  }
  __syncthreads();
  auto before = [](float a, int32_t ia, float b, int32_t ib) { return a != b ? a > b : ia < ib; };
  for (int k = 2; k <= p; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < p; i += blockDim.x) {
        const int l = i ^ j;
        if (l > i) {
          const bool up = (i & k) == 0;  // This run ends up in the sampling order, else reversed.
          const bool swap = up ? before(sv[l], si[l], sv[i], si[i]) : before(sv[i], si[i], sv[l], si[l]);
          if (swap) {
            const float tv = sv[i];
            sv[i] = sv[l];
            sv[l] = tv;
            const int32_t ti = si[i];
            si[i] = si[l];
            si[l] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    ids[blockIdx.x * m + i] = si[i];
    vals[blockIdx.x * m + i] = sv[i];
  }
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_SELECT_KERNELS_CUH_
