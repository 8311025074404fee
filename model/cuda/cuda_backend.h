// The CUDA implementation of ForwardBackend (model/backend.h) for sm_90a.
//
// What runs on the GPU: embedding, mHC (mixes, Sinkhorn, collapse, post/comb update, head), RMSNorm, RoPE,
// every projection (cuBLAS GEMMs, FP32 or BF16 weights with FP32 accumulation), the lightning indexer's
// scores and top-k, attention over window + selected/compressed entries + sink, MoE routing (score or
// hash), token permutation, the expert GEMMs (one grouped GEMV launch for decode-sized groups, cuBLAS per
// expert for prefill-sized groups) and the LM head; greedy sampling (ArgmaxRows) on the device.
// What stays on the host: the sequence states (model/sequence_state.h, the KV store's format) and the
// streaming compressors, which run model/cpu/compressor.cc on the projected rows copied back. The window
// rings, compressed entries and indexer keys also live on the device between calls
// (model/cuda/device_state_cache.h), so a decode step uploads only the entries the host compressor just
// emitted. docs/PERFORMANCE.md says what each costs.
//
// Thread-safety: like Model, one Forward at a time (one stream, one cuBLAS handle).
#ifndef V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_
#define V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "model/backend.h"
#include "model/config.h"

namespace v4serve::model {
namespace cpu {
struct ModelWeights;
struct RopeTable;
}  // namespace cpu

namespace cuda {

// Uploads `weights` (kept by the caller; only read here) in `format`. UNAVAILABLE without a GPU,
// FAILED_PRECONDITION in builds without CUDA.
absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeCudaBackend(const ModelConfig& config,
                                                                const cpu::ModelWeights& weights,
                                                                const cpu::RopeTable& rope_main,
                                                                const cpu::RopeTable& rope_compress,
                                                                CudaWeights format);

// A backend with random weights drawn on the device (seeded; norms 1, weights N(0, 1/in) like the CPU
// bench's random checkpoints), for benchmarks of real-sized shapes that would not fit host memory in FP32.
absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeRandomCudaBackend(const ModelConfig& config,
                                                                      CudaWeights format, uint64_t seed);

// What the last Forward of a CUDA backend moved and computed, counted from its shapes (for bench/).
struct ForwardCounters {
  int64_t weight_bytes = 0;      // Weight bytes the GEMMs read (each used matrix once; touched experts only).
  int64_t kv_bytes = 0;          // Window/entry/indexer-key bytes the attention and indexer read.
  int64_t activation_bytes = 0;  // Bytes of the layer inputs/outputs (streams) read and written.
  double gemm_flops = 0;         // 2*m*n*k over every GEMM.
  double attention_flops = 0;    // QK and PV products, indexer scores.
  int64_t experts_touched = 0;   // Distinct (layer, expert) pairs with at least one row.
  // Sequences whose device copy was still valid / that were uploaded whole (device_state_cache.h).
  int64_t states_cached = 0, states_uploaded = 0;
  // Wall seconds per phase, filled only when V4SERVE_CUDA_PROFILE=1 was set at load (the backend then
  // synchronizes at each phase boundary, which itself costs time): mHC + norms, attention projections,
  // host side of attention (compressor, key staging), attention kernels (indexer, top-k, attention, ring),
  // output projection, MoE, final head.
  double s_mhc = 0, s_attn_proj = 0, s_attn_host = 0, s_attn_kernels = 0, s_attn_out = 0, s_moe = 0,
         s_head = 0;
};
// FAILED_PRECONDITION when `backend` is not a CUDA backend.
absl::StatusOr<ForwardCounters> LastForwardCounters(const ForwardBackend& backend);

// Greedy sampling on the device: the argmax of each row of `logits` [rows, cols] (ties: lowest index).
absl::StatusOr<std::vector<int32_t>> ArgmaxRows(const std::vector<float>& logits, int64_t rows, int64_t cols);

// Single-kernel entry points on host data, for the gpu tests that compare each kernel with model/cpu.
namespace testing {
// RMSNorm of `rows` rows of `dim` in place (weight may be empty: unweighted).
absl::Status RmsNorm(std::vector<float>* x, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     double eps);
// Top-k indices of each row of `scores` [rows, n] (largest first is not promised: the set and, on ties,
// the lowest indices, as cpu::TopKIndices picks them), sorted ascending for comparison.
absl::StatusOr<std::vector<std::vector<int64_t>>> TopK(const std::vector<float>& scores, int64_t rows,
                                                       int64_t n, int64_t k);
// y = x W^T through the backend's GEMM path.
absl::StatusOr<std::vector<float>> Linear(const std::vector<float>& x, int64_t m, int64_t in,
                                          const std::vector<float>& w, int64_t out, CudaWeights format);
// Interleaved RoPE (inv_freq as cpu::RopeTable holds it) on the last `rope_dim` dims of each row of `dim`,
// row r at positions[r].
absl::Status Rope(std::vector<float>* x, int64_t rows, int64_t dim, int64_t rope_dim,
                  const std::vector<double>& inv_freq, const std::vector<int64_t>& positions, bool inverse);
}  // namespace testing

}  // namespace cuda
}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_
