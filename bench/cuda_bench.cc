// The CUDA backend on a V4-Flash-shaped stack of a few layers (real shapes: hidden 4096, 64 heads of 512,
// 256 experts of 2048, top-6, CSA and HCA layers, vocab 129280; random weights drawn on the device), with
// every figure a ratio to a ceiling measured in the same run on the same GPU:
//   decode step (batch 1, 8, 64; greedy: token ids back, as the engine runs argmax-only batches; then the
//     same with sampling's 256 candidates a row and softmax sums back (ForwardTop, the engine's path for
//     sampled batches without penalties), and with the whole logits copied to the host (penalties, MTP)):
//     achieved bytes/s (weights the step's
//     GEMMs read, touched experts only, plus the KV they attend over) / device-to-device copy bandwidth
//     (bytes read + written);
//   prefill (8k, 32k tokens): achieved FLOP/s (GEMMs + attention + indexer) / cuBLASLt's best dense FP8
//     GEMM (and BF16 GEMM) over a few large square shapes.
//   the attention kernels alone (--attention=1, V4-Flash's 64 heads x 512 over window 128 + top-512 of 2048
//     entries (CSA) or + 64 entries (HCA), 1 to 1024 token rows; the indexer's 64 heads x 128 over 2048 or
//     8192 entries): the BF16 tensor-core kernels against the FP32 SIMT ones, time ratio and achieved
//     FLOP/s / cuBLASLt's best BF16 GEMM; the decode path's MXFP4 expert kernels, tensor cores against the
//     GEMV, on the rows decode batches of 8 to 256 give;
//   the same decode steps with the device state cache off (V4SERVE_CUDA_STATE_CACHE_MB=0: every call
//     uploads the window rings and compressed entries from the host states, as before the cache), on a
//     second backend in the same process (--compare-state-cache=0 skips it), and with CUDA graphs off
//     (V4SERVE_CUDA_GRAPHS=0: every kernel launched from the host, as before graphs; --compare-graphs=0
//     skips it), and with each row GEMM on (V4SERVE_CUDA_ROWS_GEMM=fp8: RowsGemmFp8 for the FP8 linears of
//     9-64 rows; =f32: RowsGemmF32 for FP32 weights up to 64 rows; off by default; --compare-rows-gemm=0
//     skips them; FP8 mode only), and with programmatic dependent launch off (V4SERVE_CUDA_PDL=0,
//     model/cuda/launch.cuh: each kernel's blocks start while the one ahead finishes, weight GEMMs prefetch
//     their weights into L2 first; on by default on sm_90; --compare-pdl=0 skips it).
// Usage: v4serve_cuda_bench [--layers=2] [--context=512] [--prefill=8192,32768] [--batches=1,8,64]
//                           [--weights=fp8|bf16|fp32] [--experts=fp4|bf16] [--steps=10]
//                           [--compare-state-cache=1] [--compare-graphs=1] [--compare-rows-gemm=1]
//                           [--compare-pdl=1]
//                           [--ceilings=1] [--attention=1] [--linear=wq_b:64] [--expert-kernels=0]
//                           [--trace=0]
// (--experts=fp4: MXFP4 routed experts, as V4 ships them; other weights BF16 except the FP32 ones the
// backend keeps: mHC mixes, router gate, compressor projections; --weights=fp8: the linears V4 ships in FP8
// stay FP8, with 128 x 128 block scales. --attention=1 also times the attention, expert and linear kernels
// side by side; --linear=NAME:ROWS (wq_b, wo_b, shared w1) times that one FP8 linear's kernels alone, 3 calls
// each, and exits: the run to put under ncu; --expert-kernels=1 times the MXFP4 expert kernels alone (decode
// GEMVs and GEMMs, the prefill GEMM on wgmma and on mma.sync) and exits. --trace=N: after each greedy batch's
// timed steps, N more steps recorded by CUPTI (bench/kernel_trace.h; not in the medians: tracing slows
// launches), and each prefill once more, traced: where the wall time goes (host before and after the GPU, GPU
// busy, GPU idle between kernels), the largest idle gaps and the kernels by time, at the GPU's own clocks
// with graphs on.) Prints a Markdown table (docs/PERFORMANCE.md holds the last one).
#include <cublasLt.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/cuda_bench_util.h"
#include "bench/cuda_kernel_tables.h"
#include "bench/kernel_trace.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/cuda/cuda_backend.h"
#include "model/sequence_state.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

using bench::AttentionKernels;
using bench::ExpertKernels;
using bench::LinearKernels;
using bench::RelL2;
using bench::ScopedEnv;

#define CK(call)                                                                                          \
  do {                                                                                                    \
    cudaError_t e_ = (call);                                                                              \
    if (e_ != cudaSuccess) {                                                                              \
      std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)
#define CKL(call)                                                                                          \
  do {                                                                                                     \
    cublasStatus_t s_ = (call);                                                                            \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                                     \
      std::fprintf(stderr, "%s failed: cuBLAS status %d (%s:%d)\n", #call, static_cast<int>(s_), __FILE__, \
                   __LINE__);                                                                              \
      return -1.0;                                                                                         \
    }                                                                                                      \
  } while (0)

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device-to-device copy of `bytes`, counting bytes read plus written; median of 20 after warm-up.
double CopyBandwidth(size_t bytes) {
  void *a = nullptr, *b = nullptr;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int i = 0; i < 23; ++i) {
    CK(cudaEventRecord(e0));
    CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) t.push_back(ms * 1e-3);
  }
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * static_cast<double>(bytes) / Median(t);
}

// FLOP/s of cuBLASLt's heuristic-best algorithm for D[m,n] = A[m,k] B[k,n] in FP8 e4m3 (TN, BF16 out) or
// BF16; inputs random (never zeros). Median of 10 after 3 warm-ups. -1 when the library refuses.
double GemmFlops(int m, int n, int k, bool fp8) {
  cublasLtHandle_t lt;
  CKL(cublasLtCreate(&lt));
  const size_t ea = fp8 ? 1 : 2;
  void *A, *B, *D, *ws;
  const size_t ws_bytes = 64 << 20;
  CK(cudaMalloc(&A, static_cast<size_t>(m) * k * ea));
  CK(cudaMalloc(&B, static_cast<size_t>(k) * n * ea));
  CK(cudaMalloc(&D, static_cast<size_t>(m) * n * 2));
  CK(cudaMalloc(&ws, ws_bytes));
  {  // Random bytes: small finite values in both formats (FP8 0x00-0x3f / BF16 with a bounded exponent).
    std::vector<uint8_t> h(static_cast<size_t>(std::max<int64_t>(int64_t{m} * k, int64_t{k} * n) * ea));
    uint32_t x = 12345;
    for (size_t i = 0; i < h.size(); ++i) {
      x = x * 1664525u + 1013904223u;
      h[i] = fp8 ? static_cast<uint8_t>((x >> 24) & 0xbf)
                 : static_cast<uint8_t>(i % 2 ? 0x3c | ((x >> 31) << 7) : x >> 24);
    }
    CK(cudaMemcpy(A, h.data(), static_cast<size_t>(m) * k * ea, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(B, h.data(), static_cast<size_t>(k) * n * ea, cudaMemcpyHostToDevice));
  }
  const cudaDataType_t in_t = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  cublasLtMatmulDesc_t op;
  CKL(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CKL(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtMatrixLayout_t la, lb, ld;
  CKL(cublasLtMatrixLayoutCreate(&la, in_t, k, m, k));  // A^T stored k x m (TN).
  CKL(cublasLtMatrixLayoutCreate(&lb, in_t, k, n, k));
  CKL(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, m, n, m));
  cublasLtMatmulPreference_t pref;
  CKL(cublasLtMatmulPreferenceCreate(&pref));
  CKL(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                           sizeof(ws_bytes)));
  cublasLtMatmulHeuristicResult_t heur[8];
  int found = 0;
  CKL(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 8, heur, &found));
  double best = -1;
  const float alpha = 1.0f, beta = 0.0f;
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int a = 0; a < found; ++a) {
    std::vector<double> t;
    bool ok = true;
    for (int i = 0; i < 13 && ok; ++i) {
      CK(cudaEventRecord(e0));
      ok = cublasLtMatmul(lt, op, &alpha, A, la, B, lb, &beta, D, ld, D, ld, &heur[a].algo, ws, ws_bytes,
                          nullptr) == CUBLAS_STATUS_SUCCESS;
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) t.push_back(ms * 1e-3);
    }
    if (ok) best = std::max(best, 2.0 * m * n * static_cast<double>(k) / Median(t));
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(lt);
  CK(cudaFree(A));
  CK(cudaFree(B));
  CK(cudaFree(D));
  CK(cudaFree(ws));
  return best;
}

std::vector<int64_t> Ints(const std::string& s) {
  std::vector<int64_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',')) {
    int64_t v;
    if (absl::SimpleAtoi(p, &v)) out.push_back(v);
  }
  return out;
}

std::vector<int32_t> Tokens(int64_t n, int64_t vocab, int64_t salt) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(2 + ((i + salt * 131) * 7919) % (vocab - 2));
  return t;
}

// Stops `tracer` (if any) and prints its report over `windows`.
void PrintTrace(std::unique_ptr<bench::KernelTrace> tracer,
                const std::vector<std::pair<uint64_t, uint64_t>>& windows) {
  if (tracer == nullptr) return;
  absl::StatusOr<std::vector<bench::TraceRecord>> recs = tracer->Stop();
  if (!recs.ok()) {
    std::printf("    trace: %s\n", std::string(recs.status().message()).c_str());
    return;
  }
  std::printf("%s", bench::SummarizeTrace(*recs, windows, 30).c_str());
}

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

// With V4SERVE_CUDA_PROFILE=1: where the last Forward's wall time went.
void PrintPhases(const ForwardBackend& be) {
  auto c = cuda::LastForwardCounters(be);
  if (!c.ok()) return;
  const double total = c->s_mhc + c->s_attn_proj + c->s_attn_host + c->s_indexer + c->s_attn_kernels +
                       c->s_attn_out + c->s_moe + c->s_head;
  if (total <= 0) return;
  std::printf(
      "    phases (ms): mhc+norm %.2f, attn proj %.2f, compressors+staging %.2f, indexer %.2f, attention "
      "%.2f, "
      "attn out %.2f, moe %.2f, head %.2f; states cached %lld, uploaded %lld\n",
      c->s_mhc * 1e3, c->s_attn_proj * 1e3, c->s_attn_host * 1e3, c->s_indexer * 1e3, c->s_attn_kernels * 1e3,
      c->s_attn_out * 1e3, c->s_moe * 1e3, c->s_head * 1e3, static_cast<long long>(c->states_cached),
      static_cast<long long>(c->states_uploaded));
}

// Where the last forward's host time went (no synchronization: the host enqueues ahead of the GPU, and
// `wait` is what was left for the GPU to finish once everything was queued).
void PrintHostTimes(const cuda::ForwardCounters& c) {
  std::printf(
      "    host (us): setup %.0f, sections %.0f, attention cores %.0f, head %.0f, wait %.0f, after %.0f\n",
      c.host_setup * 1e6, c.host_sections * 1e6, c.host_cores * 1e6, c.host_head * 1e6, c.host_wait * 1e6,
      c.host_finish * 1e6);
}

int Main(int argc, char** argv) {
  int64_t layers = 2, context = 512, steps = 10, trace = 0;
  std::string prefill = "8192,32768", batches = "1,8,64", weights = "fp8", experts = "fp4", linear_only;
  bool compare_cache = true, compare_graphs = true, compare_rows = true, compare_pdl = true, ceilings = true,
       attention = true, experts_only = false;
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  std::string config_path =
      std::string(src ? src : V4SERVE_SOURCE_DIR_DEFAULT) + "/tests/model/testdata/v4_flash_config.json";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const std::string p = std::string("--") + name + "=";
      return a.rfind(p, 0) == 0 ? argv[i] + p.size() : nullptr;
    };
    if (const char* v = val("layers")) {
      layers = std::atoll(v);
    } else if (const char* v = val("context")) {
      context = std::atoll(v);
    } else if (const char* v = val("steps")) {
      steps = std::atoll(v);
    } else if (const char* v = val("prefill")) {
      prefill = v;
    } else if (const char* v = val("batches")) {
      batches = v;
    } else if (const char* v = val("weights")) {
      weights = v;
    } else if (const char* v = val("experts")) {
      experts = v;
    } else if (const char* v = val("config")) {
      config_path = v;
    } else if (const char* v = val("compare-state-cache")) {
      compare_cache = std::string(v) != "0";
    } else if (const char* v = val("compare-graphs")) {
      compare_graphs = std::string(v) != "0";
    } else if (const char* v = val("compare-rows-gemm")) {
      compare_rows = std::string(v) != "0";
    } else if (const char* v = val("compare-pdl")) {
      compare_pdl = std::string(v) != "0";
    } else if (const char* v = val("expert-kernels")) {
      experts_only = std::string(v) == "1";
    } else if (const char* v = val("linear")) {
      linear_only = v;
      const size_t colon = linear_only.rfind(':');
      if (colon == std::string::npos || std::atoll(v + colon + 1) <= 0) {
        std::fprintf(stderr, "--linear takes NAME:ROWS (wq_b, wo_b or shared w1, rows > 0), got %s\n", v);
        return 2;
      }
    } else if (const char* v = val("trace")) {
      if (!absl::SimpleAtoi(v, &trace) || trace < 0) {
        std::fprintf(stderr, "--trace takes a step count >= 0, got %s\n", v);
        return 2;
      }
    } else if (const char* v = val("attention")) {
      attention = std::string(v) != "0";
    } else if (const char* v = val("ceilings")) {  // 0: skip them (profiling runs); ratios then print as 0.
      ceilings = std::string(v) != "0";
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  std::ifstream in(config_path);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", config_path.c_str());
    return 2;
  }
  nlohmann::json j = nlohmann::json::parse(in);
  j["num_hidden_layers"] = layers;
  j["num_nextn_predict_layers"] = 0;
  std::vector<int> ratios;
  for (int64_t l = 0; l < layers; ++l) ratios.push_back(l % 2 == 0 ? 4 : 128);  // CSA, HCA, CSA, ...
  j["compress_ratios"] = ratios;
  j["num_hash_layers"] = 0;
  j["expert_dtype"] = experts == "fp4" ? "fp4" : "bf16";  // V4 ships MXFP4 routed experts.
  absl::StatusOr<ModelConfig> config = ParseModelConfig(j.dump());
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  if (weights != "bf16" && weights != "fp8" && weights != "fp32") {
    std::fprintf(stderr, "--weights must be bf16, fp8 or fp32\n");
    return 2;
  }
  const CudaWeights format = weights == "fp32"  ? CudaWeights::kF32
                             : weights == "fp8" ? CudaWeights::kFp8
                                                : CudaWeights::kBf16;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));

  // Ceilings, measured first.
  const double copy_bw = ceilings ? CopyBandwidth(size_t{2} << 30) : INFINITY;
  double fp8 = ceilings ? -1 : INFINITY, bf16 = fp8;
  for (int s : {4096, 8192, 16384}) {
    if (!ceilings) break;
    fp8 = std::max(fp8, GemmFlops(s, s, s, true));
    bf16 = std::max(bf16, GemmFlops(s, s, s, false));
  }
  std::printf(
      "GPU: %s; device copy %.0f GB/s (read + write); cuBLASLt best dense FP8 %.0f TFLOP/s, BF16 %.0f "
      "TFLOP/s\n",
      prop.name, copy_bw / 1e9, fp8 / 1e12, bf16 / 1e12);
  std::fflush(stdout);

  std::vector<std::string> rows;
  if (!linear_only.empty()) {  // One linear's kernels alone (ncu), nothing else.
    LinearKernels(*config, copy_bw, fp8, &rows, linear_only);
    if (rows.empty())
      std::fprintf(stderr, "--linear=%s: no such linear, or it failed\n", linear_only.c_str());
    return rows.empty() ? 1 : 0;
  }
  if (experts_only) {  // The MXFP4 expert kernels alone (ncu, A/B of the expert GEMMs), nothing else.
    ExpertKernels(*config, fp8, &rows);
    return rows.empty() ? 1 : 0;
  }
  if (attention) {
    AttentionKernels(*config, bf16, &rows);
    ExpertKernels(*config, fp8, &rows);
    LinearKernels(*config, copy_bw, fp8, &rows);
  }

  auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<ForwardBackend>> be = cuda::MakeRandomCudaBackend(*config, format, 1);
  if (!be.ok()) {
    std::fprintf(stderr, "%s\n", std::string(be.status().message()).c_str());
    return 1;
  }
  std::printf("stack: %lld layers (CSA/HCA alternating, score routing), %s experts, %s; built in %.1f s\n",
              static_cast<long long>(layers), experts == "fp4" ? "MXFP4" : "BF16", (*be)->Describe().c_str(),
              Seconds(t0));
  std::fflush(stdout);
  const int64_t vocab = config->vocab_size;

  // Decode: B sequences of `context` tokens (prefilled in one batched call), then `steps` timed steps.
  // Returns the median step time (0 after an error, which is printed).
  // `mode`: ForwardGreedy (the engine's path for argmax-only batches: token ids back), ForwardTop (sampled
  // batches without penalties) or Forward with the logits copied to the host (penalties, MTP).
  // kTop: ForwardTop (what sampling with a temperature reads: 256 candidates a row and the softmax's sums).
  enum Mode { kGreedy, kLogits, kTop };
  auto decode = [&](const ForwardBackend& backend, int64_t b, const char* label, Mode mode) -> double {
    std::vector<SequenceState> states(static_cast<size_t>(b), NewSequenceState(*config));
    std::vector<ForwardSegment> segs;
    std::vector<int32_t> toks;
    for (int64_t i = 0; i < b; ++i) {
      segs.push_back({&states[i], i * context, context});
      std::vector<int32_t> t = Tokens(context, vocab, i);
      toks.insert(toks.end(), t.begin(), t.end());
    }
    std::vector<int64_t> last;
    for (int64_t i = 0; i < b; ++i) last.push_back((i + 1) * context - 1);
    auto r = backend.Forward(segs, toks, last, nullptr);
    if (!r.ok()) {
      std::fprintf(stderr, "context prefill: %s\n", std::string(r.status().message()).c_str());
      return 0;
    }
    std::vector<double> times;
    double bytes = 0;
    int64_t experts = 0;
    std::vector<int32_t> next(static_cast<size_t>(b), 7);
    std::vector<int64_t> rows_idx(static_cast<size_t>(b));
    for (int64_t i = 0; i < b; ++i) rows_idx[i] = i;
    // Greedy batches: `trace` more steps under CUPTI after the timed ones.
    const int64_t traced = mode == kGreedy ? trace : 0;
    std::unique_ptr<bench::KernelTrace> tracer;
    std::vector<std::pair<uint64_t, uint64_t>> windows;
    for (int64_t s = 0; s < steps + 2 + traced; ++s) {
      segs.clear();
      for (int64_t i = 0; i < b; ++i) segs.push_back({&states[i], i, 1});
      CK(cudaDeviceSynchronize());
      if (s == steps + 2) {
        absl::StatusOr<std::unique_ptr<bench::KernelTrace>> t = bench::KernelTrace::Start();
        if (!t.ok()) {
          std::printf("    trace: %s\n", std::string(t.status().message()).c_str());
          break;
        }
        tracer = *std::move(t);
      }
      const uint64_t trace_begin = bench::KernelTrace::Now();
      auto ts = std::chrono::steady_clock::now();
      absl::StatusOr<std::vector<int32_t>> tok;
      absl::StatusOr<std::vector<float>> lg;
      absl::StatusOr<TopLogits> top;
      if (mode == kGreedy) {
        tok = backend.ForwardGreedy(segs, next, rows_idx);
      } else if (mode == kLogits) {
        lg = backend.Forward(segs, next, rows_idx, nullptr);
      } else {
        top = backend.ForwardTop(segs, next, rows_idx, std::vector<float>(static_cast<size_t>(b), 0.8f), 256);
      }
      const double dt = Seconds(ts);
      const absl::Status st = mode == kGreedy ? tok.status() : mode == kLogits ? lg.status() : top.status();
      if (!st.ok()) {
        std::fprintf(stderr, "decode: %s\n", std::string(st.message()).c_str());
        return 0;
      }
      if (mode == kLogits) tok = cuda::ArgmaxRows(*lg, b, vocab);
      if (mode == kTop) {  // The best candidate of each row (what the next token is does not matter here).
        tok = std::vector<int32_t>(static_cast<size_t>(b));
        for (int64_t i = 0; i < b; ++i) (*tok)[i] = top->ids[i * top->m];
      }
      if (tok.ok()) next = *tok;
      if (tracer != nullptr) windows.emplace_back(trace_begin, bench::KernelTrace::Now());
      if (s >= 2 && s < steps + 2) {
        times.push_back(dt);
        auto c = cuda::LastForwardCounters(backend);
        bytes = static_cast<double>(c->weight_bytes + c->kv_bytes);
        experts = c->experts_touched;
      }
    }
    const double t = Median(times);
    char line[512];
    std::snprintf(
        line, sizeof(line),
        "| decode step, batch %lld, context %lld%s | %.2f ms | %.0f tok/s | %.2f GB (%lld experts) | "
        "%.0f GB/s | **%.1f%%** of copy bw |",
        static_cast<long long>(b), static_cast<long long>(context), label, t * 1e3, b / t, bytes / 1e9,
        static_cast<long long>(experts), bytes / t / 1e9, 100.0 * bytes / t / copy_bw);
    rows.emplace_back(line);
    PrintPhases(backend);
    std::printf("%s\n", line);
    if (auto c = cuda::LastForwardCounters(backend); c.ok()) {
      std::printf("    last step: %lld sections replayed from CUDA graphs%s\n",
                  static_cast<long long>(c->graph_sections), c->graphs_off ? " (graphs off)" : "");
      PrintHostTimes(*c);
    }
    PrintTrace(std::move(tracer), windows);
    std::fflush(stdout);
    return t;
  };
  std::vector<std::pair<int64_t, double>> greedy;
  for (int64_t b : Ints(batches)) greedy.emplace_back(b, decode(**be, b, "", kGreedy));
  for (int64_t b : Ints(batches)) decode(**be, b, ", sampled (256 candidates a row)", kTop);
  for (int64_t b : Ints(batches)) decode(**be, b, ", logits to the host", kLogits);
  // The greedy steps again on a second backend built with `env`=0 (`what` off), side by side in this run.
  auto compare_off = [&](const char* env, const std::string& what, const char* value = "0") -> bool {
    absl::StatusOr<std::unique_ptr<ForwardBackend>> off;
    {
      ScopedEnv set(env, value);
      off = cuda::MakeRandomCudaBackend(*config, format, 1);
    }
    if (!off.ok()) {
      std::fprintf(stderr, "%s\n", std::string(off.status().message()).c_str());
      return false;
    }
    for (const auto& [b, t] : greedy) {
      const std::string other = std::string(env) + "=" + value;
      const double t_off = decode(**off, b, (", " + other).c_str(), kGreedy);
      if (t > 0 && t_off > 0) {
        std::printf("    batch %lld: %s: default / %s step time %.3f (default %.2fx faster)\n",
                    static_cast<long long>(b), what.c_str(), other.c_str(), t / t_off, t_off / t);
      }
    }
    return true;
  };
  if (compare_cache && !compare_off("V4SERVE_CUDA_STATE_CACHE_MB", "state cache")) return 1;
  if (compare_graphs && !compare_off("V4SERVE_CUDA_GRAPHS", "CUDA graphs")) return 1;
  if (compare_rows && format == CudaWeights::kFp8 &&
      (!compare_off("V4SERVE_CUDA_ROWS_GEMM", "FP8 row GEMMs", "fp8") ||
       !compare_off("V4SERVE_CUDA_ROWS_GEMM", "FP32 row GEMMs", "f32"))) {
    return 1;
  }
  if (compare_pdl && !compare_off("V4SERVE_CUDA_PDL", "programmatic launch")) return 1;
  // Prefill: one sequence, one chunk, timed after an untimed one of the same length (the first forward of a
  // size grows the scratch and plans cuBLASLt: 223-270 ms instead of 55-69 for 8192 tokens when no decode
  // ran before it, session 18).
  for (int64_t n : Ints(prefill)) {
    std::vector<int32_t> toks = Tokens(n, vocab, 99);
    std::vector<int64_t> last = {n - 1};
    {
      SequenceState warm = NewSequenceState(*config);
      std::vector<ForwardSegment> warm_segs = {{&warm, 0, n}};
      (void)(*be)->Forward(warm_segs, toks, last, nullptr);
    }
    SequenceState st = NewSequenceState(*config);
    std::vector<ForwardSegment> segs = {{&st, 0, n}};
    CK(cudaDeviceSynchronize());
    auto ts = std::chrono::steady_clock::now();
    auto r = (*be)->Forward(segs, toks, last, nullptr);
    const double t = Seconds(ts);
    if (r.ok() && trace > 0) {  // The same prefill again (a fresh sequence), traced.
      absl::StatusOr<std::unique_ptr<bench::KernelTrace>> tr = bench::KernelTrace::Start();
      if (tr.ok()) {
        SequenceState again = NewSequenceState(*config);
        std::vector<ForwardSegment> segs2 = {{&again, 0, n}};
        const uint64_t a = bench::KernelTrace::Now();
        const bool ok = (*be)->Forward(segs2, toks, last, nullptr).ok();
        const uint64_t e = bench::KernelTrace::Now();
        std::printf("    traced prefill of %lld tokens%s:\n", static_cast<long long>(n),
                    ok ? "" : " (failed)");
        PrintTrace(*std::move(tr), {{a, e}});
      } else {
        std::printf("    trace: %s\n", std::string(tr.status().message()).c_str());
      }
    }
    if (!r.ok()) {
      std::fprintf(stderr, "prefill %lld: %s\n", static_cast<long long>(n),
                   std::string(r.status().message()).c_str());
      continue;
    }
    auto c = cuda::LastForwardCounters(**be);
    const double flops = c->gemm_flops + c->attention_flops;
    char line[512];
    std::snprintf(line, sizeof(line),
                  "| prefill %lld tokens | %.1f ms | %.0f tok/s | %.1f TFLOP | %.1f TFLOP/s | **%.1f%%** of "
                  "FP8 GEMM (%.1f%% of BF16) |",
                  static_cast<long long>(n), t * 1e3, n / t, flops / 1e12, flops / t / 1e12,
                  100.0 * flops / t / fp8, 100.0 * flops / t / bf16);
    rows.emplace_back(line);
    std::printf("%s\n", line);
    PrintPhases(**be);
    std::fflush(stdout);
  }
  std::printf(
      "\n| what | time | throughput | moved / computed | achieved | ratio |\n|---|---|---|---|---|---|\n");
  for (const std::string& r : rows) std::printf("%s\n", r.c_str());
  return 0;
}

}  // namespace
}  // namespace v4serve::model

int main(int argc, char** argv) { return v4serve::model::Main(argc, argv); }
