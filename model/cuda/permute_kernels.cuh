// The MoE's token permutation on the device (model/cuda/cuda_moe.cu): one block for decode-sized batches
// (Permute), three launches over chunks of rows for the prefill's (PermuteCount, PermuteScan,
// PermuteScatter, with the expert GEMMs' tiles). Split from cuda_moe_kernels.cuh, which includes it; the
// same internal linkage.
#ifndef V4SERVE_MODEL_CUDA_PERMUTE_KERNELS_CUH_
#define V4SERVE_MODEL_CUDA_PERMUTE_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "model/cuda/cuda_kernels.cuh"

namespace v4serve::model::cuda::kernels {
namespace {

// A row's k <= 64 slots rs (placed in the order of its selections es) sorted by expert, by insertion sort:
// stable, so an expert a row lists twice (hash routing) keeps its slots in order.
__device__ __forceinline__ void SortRowSlots(const int32_t* es, int64_t k, int32_t* rs) {
  int32_t ex[64];
  for (int64_t j = 0; j < k; ++j) ex[j] = es[j];
  for (int64_t j = 1; j < k; ++j) {
    const int32_t ke = ex[j], ks = rs[j];
    int64_t p = j - 1;
    while (p >= 0 && ex[p] > ke) {
      ex[p + 1] = ex[p];
      rs[p + 1] = rs[p];
      --p;
    }
    ex[p + 1] = ke;
    rs[p + 1] = ks;
  }
}

// Expert e's selections among `padded` ones staged in shared memory (sel4; -1 past the last), in order, into
// slots from `slot` on: each slot's row and weight, each selection's slot (selection i is base + its index
// here). Four selections a shared-memory load; the threads of a warp read the same ones (a broadcast).
__device__ __forceinline__ void PlaceExpertSlots(const int4* sel4, int64_t padded, int64_t base, int64_t k,
                                                 int32_t e, int32_t slot, const float* wts, int32_t* perm,
                                                 float* slot_w, int32_t* row_slots) {
  for (int64_t i4 = 0; i4 < padded / 4; ++i4) {
    const int4 q = sel4[i4];
    const int32_t v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (v[j] != e) continue;
      const int64_t i = base + 4 * i4 + j;
      perm[slot] = static_cast<int32_t>(i / k);
      slot_w[slot] = wts[i];
      row_slots[i] = slot;
      ++slot;
    }
  }
}

// Exclusive scan of one value a thread over the block (blockDim.x a multiple of 32, at most 1024); *total
// gets the block's sum. Every thread must call it.
__device__ __forceinline__ int32_t BlockExclusiveScan(int32_t v, int32_t* total) {
  __shared__ int32_t warp_tot[32];
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  int32_t inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t a = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += a;
  }
  __syncthreads();  // warp_tot may still be read by a previous call.
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  int32_t before = inc - v, all = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
    if (w < warp) before += warp_tot[w];
    all += warp_tot[w];
  }
  *total = all;
  return before;
}

// Token permutation on the device for decode-sized batches (one block, slots = rows * k <= kPermuteSlots):
// per-expert counts and starts, slots grouped by expert with rows in order inside an expert (the CPU's
// order), each slot's row and routing weight, and each row's slots sorted by expert.
// `touched` (may be null) receives the counts too, for the benchmark's byte accounting.
// `active` lists the experts with rows (ascending), `n_active` their number.
// Every step is parallel: a block-wide scan gives the starts and the active list, and each thread walks the
// selections (staged in shared memory) for its experts, so an expert's slots keep the rows' order. The
// first version gave those walks to one thread: 98 us a launch at batch 64 (ncu, H200).
constexpr int64_t kPermuteSlots = 2048;
__host__ __device__ constexpr int64_t PermuteSmem(int64_t slots, int64_t ne) {
  return ((slots + 3) / 4 * 4 + 2 * ne) * 4;
}
// Whether Permute takes rows x k selections over ne experts: its slot bound, its per-row sort (k <= 64) and
// the default 48 KiB of dynamic shared memory.
__host__ __device__ constexpr bool PermuteFits(int64_t rows, int64_t k, int64_t ne) {
  return rows * k <= kPermuteSlots && k <= 64 && PermuteSmem(rows * k, ne) <= 48 * 1024;
}
__global__ void Permute(const int32_t* sel, const float* wts, int64_t rows, int64_t k, int64_t ne,
                        int32_t* count, int32_t* start, int32_t* perm, float* slot_w, int32_t* row_slots,
                        int32_t* touched, int32_t* active, int32_t* n_active) {
  PdlEnter();
  extern __shared__ int4 psh[];  // PermuteSmem: the selections (padded with -1), counts, running starts.
  const int64_t slots = rows * k, padded = (slots + 3) / 4 * 4;
  int32_t* ssel = reinterpret_cast<int32_t*>(psh);
  int32_t* cnt = ssel + padded;
  int32_t* fill = cnt + ne;
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) cnt[e] = 0;
  for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) ssel[i] = i < slots ? sel[i] : -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < slots; i += blockDim.x) atomicAdd(&cnt[ssel[i]], 1);
  __syncthreads();
  // Exclusive scans of the counts (the starts) and of the experts with rows (their place in `active`):
  // thread t takes experts t * per .. + per, then the threads' totals are scanned.
  const int64_t per = (ne + blockDim.x - 1) / blockDim.x, e0 = threadIdx.x * per, e1 = min(ne, e0 + per);
  int32_t mine = 0, mine_active = 0;
  for (int64_t e = e0; e < e1; ++e) {
    mine += cnt[e];
    mine_active += cnt[e] > 0;
  }
  int32_t all = 0;
  int32_t run = BlockExclusiveScan(mine, &all);
  int32_t na = BlockExclusiveScan(mine_active, &all);
  for (int64_t e = e0; e < e1; ++e) {
    fill[e] = run;
    count[e] = cnt[e];
    start[e] = run;
    if (touched) touched[e] = cnt[e];
    run += cnt[e];
    if (cnt[e] > 0) active[na++] = static_cast<int32_t>(e);
  }
  if (threadIdx.x == blockDim.x - 1) *n_active = na;
  __syncthreads();
  // Each expert's slots in row order (PlaceExpertSlots).
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) {
    if (cnt[e] > 0)
      PlaceExpertSlots(psh, padded, 0, k, static_cast<int32_t>(e), fill[e], wts, perm, slot_w, row_slots);
  }
  __syncthreads();
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) SortRowSlots(sel + r * k, k, row_slots + r * k);
}

// The same permutation for any number of rows (the prefill's MoE), with the prefill GEMMs' tiles, in three
// launches over chunks of kPermuteChunkRows rows (no host round trip: the host permutation's synchronization
// left the GPU idle ~1 ms a layer at 8192 tokens):
//   PermuteCount (grid chunks, 256 threads, ne * 4 bytes of shared memory): chunk c's selections per expert
//     into chunk_cnt[c * ne + e].
//   PermuteScan (one block of 256): per expert its rows (count, touched) and its start, then chunk_cnt[c * ne
//     + e] becomes the first slot of expert e's rows in chunk c; the experts with rows (active, n_active);
//     the GEMM tiles of up to bm rows of one expert, in expert order (tiles[t], tiles[max_tiles + t],
//     tiles[2 * max_tiles + t]: expert, first slot, rows; the rest of max_tiles with 0 rows, which the GEMMs
//     skip).
//   PermuteScatter (grid chunks, 256 threads, PermuteChunkSmem): thread e walks chunk c's selections in
//     order and places expert e's from its first slot (perm, slot_w, row_slots), then each row's slots are
//     sorted by expert. Rows stay in order inside an expert: the host's order, bit for bit.
constexpr int64_t kPermuteChunkRows = 256;
__host__ __device__ constexpr int64_t PermuteChunks(int64_t rows) {
  return (rows + kPermuteChunkRows - 1) / kPermuteChunkRows;
}
__host__ __device__ constexpr int64_t PermuteChunkSmem(int64_t k) {
  return (kPermuteChunkRows * k + 3) / 4 * 16;
}
// Whether the three launches take k selections a row over ne experts: SortRowSlots's k, PermuteChunkSmem
// within and PermuteCount's ne counters in the default 48 KiB of dynamic shared memory.
constexpr int64_t kPermuteChunkMaxK = 16;
__host__ __device__ constexpr bool PermuteChunksFit(int64_t k, int64_t ne) {
  return k >= 1 && k <= kPermuteChunkMaxK && ne * 4 <= 48 * 1024;
}
// Tiles of at most bm rows for `slots` slots over ne experts: sum of ceil(count_e / bm) is at most this.
__host__ __device__ constexpr int64_t PermuteMaxTiles(int64_t slots, int64_t ne, int64_t bm) {
  return (slots + ne * (bm - 1)) / bm;
}
__global__ void PermuteCount(const int32_t* sel, int64_t rows, int64_t k, int64_t ne, int32_t* chunk_cnt) {
  PdlEnter();
  extern __shared__ int32_t pcount[];
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) pcount[e] = 0;
  __syncthreads();
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kPermuteChunkRows * k,
                i1 = min(rows * k, i0 + kPermuteChunkRows * k);
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) atomicAdd(&pcount[sel[i]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) chunk_cnt[blockIdx.x * ne + e] = pcount[e];
}
__global__ void PermuteScan(int64_t chunks, int64_t ne, int32_t bm, int64_t max_tiles, int32_t* chunk_cnt,
                            int32_t* count, int32_t* start, int32_t* touched, int32_t* active,
                            int32_t* n_active, int32_t* tiles) {
  PdlEnter();
  const int64_t per = (ne + blockDim.x - 1) / blockDim.x, e0 = threadIdx.x * per, e1 = min(ne, e0 + per);
  int32_t mine = 0, mine_active = 0, mine_tiles = 0;
  for (int64_t e = e0; e < e1; ++e) {
    int32_t tot = 0;
    for (int64_t c = 0; c < chunks; ++c) tot += chunk_cnt[c * ne + e];
    count[e] = tot;
    mine += tot;
    mine_active += tot > 0;
    if (bm > 0) mine_tiles += (tot + bm - 1) / bm;
  }
  int32_t all_slots = 0, all_active = 0, all_tiles = 0;
  int32_t run = BlockExclusiveScan(mine, &all_slots);
  int32_t na = BlockExclusiveScan(mine_active, &all_active);
  int32_t t = BlockExclusiveScan(mine_tiles, &all_tiles);
  for (int64_t e = e0; e < e1; ++e) {
    const int32_t tot = count[e];
    start[e] = run;
    if (touched != nullptr) touched[e] = tot;
    int32_t first = run;
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t v = chunk_cnt[c * ne + e];
      chunk_cnt[c * ne + e] = first;
      first += v;
    }
    if (tot > 0) active[na++] = static_cast<int32_t>(e);
    if (tiles != nullptr) {
      for (int32_t r = 0; r < tot; r += bm, ++t) {
        tiles[t] = static_cast<int32_t>(e);
        tiles[max_tiles + t] = run + r;
        tiles[2 * max_tiles + t] = min(bm, tot - r);
      }
    }
    run += tot;
  }
  if (threadIdx.x == 0) *n_active = all_active;
  if (tiles != nullptr) {
    for (int64_t u = all_tiles + threadIdx.x; u < max_tiles; u += blockDim.x) {
      tiles[u] = 0;
      tiles[max_tiles + u] = 0;
      tiles[2 * max_tiles + u] = 0;
    }
  }
}
__global__ void PermuteScatter(const int32_t* sel, const float* wts, int64_t rows, int64_t k, int64_t ne,
                               const int32_t* chunk_first, int32_t* perm, float* slot_w, int32_t* row_slots) {
  PdlEnter();
  extern __shared__ int4 pscatter[];  // PermuteChunkSmem: the chunk's selections, padded with -1.
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kPermuteChunkRows,
                nr = min(kPermuteChunkRows, rows - r0), n_sel = nr * k, padded = (n_sel + 3) / 4 * 4,
                base = r0 * k;
  int32_t* ssel = reinterpret_cast<int32_t*>(pscatter);
  for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) ssel[i] = i < n_sel ? sel[base + i] : -1;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < ne; e += blockDim.x) {
    PlaceExpertSlots(pscatter, padded, base, k, static_cast<int32_t>(e), chunk_first[blockIdx.x * ne + e],
                     wts, perm, slot_w, row_slots);
  }
  __syncthreads();
  for (int64_t r = r0 + threadIdx.x; r < r0 + nr; r += blockDim.x)
    SortRowSlots(sel + r * k, k, row_slots + r * k);
}

}  // namespace
}  // namespace v4serve::model::cuda::kernels

#endif  // V4SERVE_MODEL_CUDA_PERMUTE_KERNELS_CUH_
