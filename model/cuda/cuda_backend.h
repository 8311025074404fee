// The CUDA implementation of ForwardBackend (model/backend.h) for sm_90a.
//
// What runs on the GPU: embedding, mHC (mixes, Sinkhorn, collapse, post/comb update, head), RMSNorm, RoPE,
// every projection (cuBLAS GEMMs, FP32 or BF16 weights with FP32 accumulation; FP8 weights with 128 x 128
// block scales on FP8 tensor cores, model/cuda/fp8_gemm.cuh), the streaming compressors,
// the lightning indexer's scores and top-k, attention over window + selected/compressed entries + sink
// (BF16 tensor cores with BF16 weights, FP32 SIMT with FP32 weights), MoE routing (score or hash), token
// permutation, the expert GEMMs (MXFP4: a grouped GEMV for decode batches with few rows an expert, a
// tensor-core grouped GEMM decoding the codes in its main loop otherwise; BF16/FP32 experts: GEMV or cuBLAS
// per expert) and the LM head; greedy sampling (ArgmaxRows) and sampling's candidates (ForwardTop) on the
// device.
// The sequence states (model/sequence_state.h, the KV store's format) stay authoritative on the host; the
// backend keeps device copies of their window rings, compressor windows, and entries and indexer keys in a
// paged device KV cache whose pages are kvstore block payloads, read in place by the kernels, between
// calls (model/cuda/device_state_cache.h) and brings the host states up to date after each forward's one
// synchronization. Decode-sized forwards (up to 128 rows) replay the work between two attention cores from
// CUDA graphs captured per row count (V4SERVE_CUDA_GRAPHS=0 turns them off). docs/PERFORMANCE.md says what
// each costs.
//
// Thread-safety: like Model, one Forward at a time (one stream, one cuBLAS handle).
#ifndef V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_
#define V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/sequence_state.h"

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
  // Sections (the work between two attention cores; CudaBackend::Section) replayed from a CUDA graph, and
  // captured into one, in this Forward; `graphs_off` when V4SERVE_CUDA_GRAPHS=0, profiling or a failed
  // capture turned the graphs off for this backend (Describe() says why).
  int64_t graph_sections = 0, graph_captures = 0;
  bool graphs_off = false;
  // Wall seconds per phase, filled only when V4SERVE_CUDA_PROFILE=1 was set at load (the backend then
  // synchronizes at each phase boundary, which itself costs time): mHC + norms, attention projections,
  // compressors and key staging, lightning indexer (scores, top-k), attention kernel (+ inverse RoPE, rings),
  // output projection, MoE, final head.
  double s_mhc = 0, s_attn_proj = 0, s_attn_host = 0, s_indexer = 0, s_attn_kernels = 0, s_attn_out = 0,
         s_moe = 0, s_head = 0;
  // Host wall seconds of this Forward, always measured (clock reads only, no synchronization): setting up
  // (uploads, state copies), enqueueing the sections (graph launches or eager launches) and the attention
  // cores, the head and outputs, waiting in the one synchronization, and taking the results after it. A
  // step whose `host_wait` is near zero was bound by the host's enqueueing, not by the GPU.
  double host_setup = 0, host_sections = 0, host_cores = 0, host_head = 0, host_wait = 0, host_finish = 0;
};
// FAILED_PRECONDITION when `backend` is not a CUDA backend.
absl::StatusOr<ForwardCounters> LastForwardCounters(const ForwardBackend& backend);

// Tokens of a device KV cache page: kvstore::kDefaultBlockTokens (model/ does not depend on kvstore;
// tests/model/cuda_kv_pages_test.cc checks that they agree).
inline constexpr int64_t kKvPageTokens = 128;
// Block `block` of `state` as the device KV cache holds it: the page's bytes, which are the kvstore block
// payload of that block (kvstore/kv_block.h: per compressed layer its entries, then its indexer keys; FP32),
// downloaded with one copy. NOT_FOUND when `backend` holds no device copy valid for `state` as it is now (it
// was not run there last, or was evicted); OUT_OF_RANGE when the state has not consumed the block's 128
// tokens; FAILED_PRECONDITION when `backend` is not a CUDA backend. Not concurrent with Forward.
absl::StatusOr<std::string> DeviceKvPage(const ForwardBackend& backend, const SequenceState& state,
                                         int64_t block);

// Greedy sampling on the device: the argmax of each row of `logits` [rows, cols] (ties: lowest index).
absl::StatusOr<std::vector<int32_t>> ArgmaxRows(const std::vector<float>& logits, int64_t rows, int64_t cols);

// The FP8 GEMM's kernels: chosen by the row count, or forced (tests, bench/): ours (model/cuda/fp8_gemm.cuh,
// SkinnyGemmFp8 and RowsGemmFp8 up to 64 rows, GemmFp8 for any) or cuBLASLt's block-scaled one (its rows a
// multiple of 4, the rest by ours).
enum class Fp8Path { kAuto, kSkinny, kTile, kLt, kRows };

// Single-kernel entry points on host data, for the gpu tests that compare each kernel with model/cpu.
namespace testing {
// RMSNorm of `rows` rows of `dim` in place (weight may be empty: unweighted).
absl::Status RmsNorm(std::vector<float>* x, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     double eps);
// Top-k indices of each row of `scores` [rows, n] (largest first is not promised: the set and, on ties,
// the lowest indices, as cpu::TopKIndices picks them), sorted ascending for comparison.
absl::StatusOr<std::vector<std::vector<int64_t>>> TopK(const std::vector<float>& scores, int64_t rows,
                                                       int64_t n, int64_t k);
// y = x W^T through the backend's GEMM path for `format` (kFp8: w stored as FP8 tiles, PutFp8, whatever its
// source; `fp8_path` forces one of its kernels). With `seconds` set, also the mean device time of `repeats`
// more calls, each after the L2 was flushed (bench/: weights read from HBM, as in a step), and the result is
// then that of one further call into an output of NaNs (tests: a kernel that only works on a fresh backend
// shows).
absl::StatusOr<std::vector<float>> Linear(const std::vector<float>& x, int64_t m, int64_t in,
                                          const std::vector<float>& w, int64_t out, CudaWeights format,
                                          int repeats = 0, double* seconds = nullptr,
                                          Fp8Path fp8_path = Fp8Path::kAuto);
// y = x W^T for FP32 weights through CudaBackend::LinearsF32 (the compressors' projections) on a backend in
// the BF16 mode: with `tf32x3` as its three TF32 tensor-core GEMMs at any row count, else cuBLAS's FP32
// SGEMM. `repeats` and `seconds` as Linear's.
absl::StatusOr<std::vector<float>> LinearF32(const std::vector<float>& x, int64_t m, int64_t in,
                                             const std::vector<float>& w, int64_t out, bool tf32x3,
                                             int repeats = 0, double* seconds = nullptr);
// Interleaved RoPE (inv_freq as cpu::RopeTable holds it) on the last `rope_dim` dims of each row of `dim`,
// row r at positions[r].
absl::Status Rope(std::vector<float>* x, int64_t rows, int64_t dim, int64_t rope_dim,
                  const std::vector<double>& inv_freq, const std::vector<int64_t>& positions, bool inverse);
// One attention launch on host data, in kernels::Attention's layout: q [n, h, hd]; window keys `wk` and
// compressed entries `ek`, rows of hd; per token row its window keys wk[win_start .. + win_cnt) and either
// its selected entries (`sel` [n, topk] indices past ent_base, `sel_cnt` [n]) or, with `sel` empty, all of
// ek[ent_base .. + vis); `sink` [h]. Keys are the values.
struct AttentionCase {
  int64_t n = 0, h = 0, hd = 0, topk = 0;
  float scale = 1.0f;
  std::vector<float> q, wk, ek, sink;
  std::vector<int64_t> win_start, win_cnt, ent_base, vis;
  std::vector<int32_t> sel, sel_cnt;
};
// A prefill-like case with N(0, 1) queries and keys: row r attends to window keys r .. r + window - 1 and,
// with topk > 0, to `topk` distinct random entries of `entries` (CSA), else to all `entries` (HCA).
AttentionCase RandomAttentionCase(int64_t n, int64_t h, int64_t hd, int64_t window, int64_t entries,
                                  int64_t topk, uint64_t seed);
// o [n, h, hd] from the FP32 SIMT kernel or, with `tensor_cores`, the BF16 tensor-core one. With `seconds`
// set, also the mean device time of `repeats` more launches (bench/).
absl::StatusOr<std::vector<float>> SparseAttention(const AttentionCase& c, bool tensor_cores, int repeats = 0,
                                                   double* seconds = nullptr);
// The lightning indexer's scores on host data: iq [n, ih, id], iw [n, ih] (already scaled), keys ik; row r
// scores ik[ent_base[r] .. + vis[r]); returns [n, max vis] (zeros past a row's vis). FP32 SIMT kernel or,
// with `tensor_cores`, the BF16 one; `seconds` as SparseAttention's.
absl::StatusOr<std::vector<float>> IndexerScores(const std::vector<float>& iq, const std::vector<float>& iw,
                                                 const std::vector<float>& ik,
                                                 const std::vector<int64_t>& ent_base,
                                                 const std::vector<int64_t>& vis, int64_t ih, int64_t id,
                                                 bool tensor_cores, int repeats = 0,
                                                 double* seconds = nullptr);
// The MXFP4 expert GEMMs on host data: `w` [experts * out, in] FP32 rows (quantized to MXFP4 as the backend
// loads experts), x [sum of rows_per_expert, in] with each expert's rows consecutive, in expert order; y
// [rows, out]. kPrefill: the prefill path (tiles listed on the host, the tensor-core GEMM: wgmma where it
// runs, CudaBackend::WgmmaExperts); kPrefillMmaSync: the same with the mma.sync GEMM; kDecodeMma /
// kDecodeGemv / kDecodeGemvSimt: the decode path (routing on the device) with the tensor-core GEMM, the GEMV
// on tensor cores (FP16 inputs with a scale per row), or the SIMT GEMV (FP32 inputs) a decode step of that
// many rows would pick. `seconds` as SparseAttention's. `fp8`: FP8 inputs (quantized per row in blocks of
// 128; the tensor-core GEMM on FP8 tensor cores with the codes converted to e4m3 in its main loop, the GEMVs
// the SIMT one on the rounded inputs), which serving does not use (slower; cuda_backend_impl.cuh,
// Fp8Experts). kDecodeGlu: the decode MoE's fused gate / up GEMV on tensor cores: `w` holds the gate stack
// then the up stack (2 * experts * out rows) and y[s, :] = SwiGLU(x[s] . W1_e, x[s] . W3_e) (gate clamped
// above at lim and up to [-lim, lim] when lim > 0) times slot_w[s] (none: 1).
// Whether the prefill's MXFP4 expert GEMM runs on wgmma here (CudaBackend::WgmmaExperts: kernels built for
// sm_90a, a GPU of compute capability 9.x, V4SERVE_CUDA_WGMMA not 0).
absl::StatusOr<bool> PrefillExpertsOnWgmma();
enum class ExpertPath { kPrefill, kPrefillMmaSync, kDecodeMma, kDecodeGemv, kDecodeGemvSimt, kDecodeGlu };
absl::StatusOr<std::vector<float>> ExpertGemmFp4(const std::vector<float>& x, int64_t in,
                                                 const std::vector<float>& w, int64_t out,
                                                 const std::vector<int32_t>& rows_per_expert,
                                                 ExpertPath path = ExpertPath::kPrefill, int repeats = 0,
                                                 double* seconds = nullptr, bool fp8 = false,
                                                 const std::vector<float>& slot_w = {}, float lim = 0.f);
// The decode MoE's token permutation on the device (kernels::Permute) for `rows` rows of k selections each
// (sel, wts [rows, k]) over `experts` experts: per-expert counts and starts, each slot's row and weight (an
// expert's slots in row order), each row's slots sorted by expert, the experts with rows in order.
// tile_rows 0 with a decode-sized batch (kernels::PermuteFits): the one-block kernel; otherwise the prefill's
// three launches, with tile_rows > 0 also the prefill GEMMs' tiles: (expert, first slot, rows) per tile of
// up to tile_rows rows, in expert order (checked: no rows after the padding, which is dropped here).
struct Permutation {
  std::vector<int32_t> count, start, perm, row_slots, active, tiles;
  std::vector<float> slot_w;
};
absl::StatusOr<Permutation> Permute(const std::vector<int32_t>& sel, const std::vector<float>& wts,
                                    int64_t rows, int64_t k, int64_t experts, int32_t tile_rows = 0);
}  // namespace testing

}  // namespace cuda
}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_CUDA_CUDA_BACKEND_H_
