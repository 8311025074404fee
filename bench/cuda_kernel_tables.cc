// The CUDA bench's kernel tables (cuda_kernel_tables.h).
#include "bench/cuda_kernel_tables.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/cuda_bench_util.h"
#include "model/cuda/cuda_backend.h"

namespace v4serve::bench {

namespace cuda = model::cuda;

// The two attention kernels on the same random cases (cuda::testing::SparseAttention), at the config's head
// shapes: mean device time of 20 launches each, QK + PV FLOP/s of the tensor-core one against `bf16_gemm`.
void AttentionKernels(const model::ModelConfig& c, double bf16_gemm, std::vector<std::string>* rows) {
  const int64_t window = c.sliding_window;
  for (const bool csa : {true, false}) {
    for (const int64_t n : {1, 8, 64, 1024}) {
      const int64_t entries = csa ? 2048 : 64, topk = csa ? c.index_topk : 0;
      const cuda::testing::AttentionCase ac =
          cuda::testing::RandomAttentionCase(n, c.num_attention_heads, c.head_dim, window, entries, topk, 5);
      double simt = 0, mma = 0;
      auto a = cuda::testing::SparseAttention(ac, false, 20, &simt);
      auto b = cuda::testing::SparseAttention(ac, true, 20, &mma);
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "attention kernels: %s\n",
                     std::string((a.ok() ? b.status() : a.status()).message()).c_str());
        return;
      }
      const double keys = static_cast<double>(window + (csa ? std::min(topk, entries) : entries));
      const double flops = 4.0 * keys * static_cast<double>(n * c.num_attention_heads * c.head_dim);
      char line[512];
      std::snprintf(
          line, sizeof(line),
          "| attention kernel, %s, %lld rows x %lld keys | %.1f us (FP32 SIMT %.1f us) | | %.2f GFLOP | "
          "%.1f TFLOP/s | **%.1fx** faster; %.1f%% of BF16 GEMM |",
          csa ? "CSA" : "HCA", static_cast<long long>(n), static_cast<long long>(keys), mma * 1e6, simt * 1e6,
          flops / 1e9, flops / mma / 1e12, simt / mma, 100.0 * flops / mma / bf16_gemm);
      rows->push_back(line);
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }
  // The indexer: `n` rows each scoring `entries` compressed keys (prefill at 4 x entries tokens of context).
  const int64_t ih = c.index_n_heads, id = c.index_head_dim;
  for (const auto& [n, entries] :
       {std::pair<int64_t, int64_t>{1, 2048}, {64, 2048}, {1024, 2048}, {1024, 8192}}) {
    std::mt19937_64 rng(9);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> iq(static_cast<size_t>(n * ih * id)), iw(static_cast<size_t>(n * ih)),
        ik(static_cast<size_t>(entries * id));
    for (std::vector<float>* v : {&iq, &iw, &ik}) {
      for (float& x : *v) x = nd(rng);
    }
    const std::vector<int64_t> base(static_cast<size_t>(n), 0), vis(static_cast<size_t>(n), entries);
    double simt = 0, mma = 0;
    auto a = cuda::testing::IndexerScores(iq, iw, ik, base, vis, ih, id, false, 10, &simt);
    auto b = cuda::testing::IndexerScores(iq, iw, ik, base, vis, ih, id, true, 10, &mma);
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "indexer kernels: %s\n",
                   std::string((a.ok() ? b.status() : a.status()).message()).c_str());
      return;
    }
    const double flops = 2.0 * static_cast<double>(n * entries * ih * id);
    char line[512];
    std::snprintf(line, sizeof(line),
                  "| indexer scores, %lld rows x %lld entries | %.1f us (FP32 SIMT %.1f us) | | %.2f GFLOP | "
                  "%.1f TFLOP/s | **%.1fx** faster; %.1f%% of BF16 GEMM |",
                  static_cast<long long>(n), static_cast<long long>(entries), mma * 1e6, simt * 1e6,
                  flops / 1e9, flops / mma / 1e12, simt / mma, 100.0 * flops / mma / bf16_gemm);
    rows->push_back(line);
    std::printf("%s\n", line);
    std::fflush(stdout);
  }
}

// The decode path's MXFP4 expert kernels side by side (cuda::testing::ExpertGemmFp4) on V4-Flash's w1
// shape (in = hidden, out = expert inter) for the rows a decode batch gives: 16 experts stand for the 256
// (host time), each batch's slots (batch x top-k) scaled by 16/256 and spread at random; first, the same for
// a prefill of 8192 tokens.
void ExpertKernels(const model::ModelConfig& c, double fp8_gemm, std::vector<std::string>* rows) {
  const int64_t experts = 16, in = c.hidden_size, out = c.moe_intermediate_size;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(experts * out * in));
  for (float& v : w) v = nd(rng);
  // Prefill-sized (first: the decode rows take most of the table's time): 8192 tokens' 6 slots each over
  // the 256 experts, 16 of them here (3072 rows).
  {
    const int64_t slots = 8192 * c.num_experts_per_tok * experts / c.n_routed_experts;
    std::vector<int32_t> per(static_cast<size_t>(experts), 0);
    for (int64_t i = 0; i < slots; ++i) ++per[rng() % experts];
    std::vector<float> x(static_cast<size_t>(slots * in));
    for (float& v : x) v = nd(rng);
    // The serving kernel (BF16 inputs; wgmma where it runs), the mma.sync one, and FP8 inputs (mma.sync).
    double b16 = 0, sync = 0, f8 = 0;
    using P = cuda::testing::ExpertPath;
    auto a = cuda::testing::ExpertGemmFp4(x, in, w, out, per, P::kPrefill, 10, &b16);
    auto s = cuda::testing::ExpertGemmFp4(x, in, w, out, per, P::kPrefillMmaSync, 10, &sync);
    auto b = cuda::testing::ExpertGemmFp4(x, in, w, out, per, P::kPrefill, 10, &f8, /*fp8=*/true);
    const absl::StatusOr<bool> wg = cuda::testing::PrefillExpertsOnWgmma();
    if (a.ok() && s.ok() && b.ok()) {
      const double flops = 2.0 * static_cast<double>(slots * out * in);
      char line[640];
      std::snprintf(
          line, sizeof(line),
          "| MXFP4 experts (prefill 8192 tokens): %lld rows over 16 experts | BF16 inputs on %s %.1f us, "
          "on mma.sync %.1f us, FP8 inputs (mma.sync) %.1f us | %.1f GFLOP | %.0f / %.0f / %.0f TFLOP/s | "
          "serving kernel %.1f%% of FP8 GEMM; **%.2fx** mma.sync |",
          static_cast<long long>(slots), wg.ok() && *wg ? "wgmma" : "mma.sync", b16 * 1e6, sync * 1e6,
          f8 * 1e6, flops / 1e9, flops / b16 / 1e12, flops / sync / 1e12, flops / f8 / 1e12,
          100.0 * flops / b16 / fp8_gemm, sync / b16);
      rows->push_back(line);
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }
  for (const int64_t batch : {8, 32, 64, 128, 256}) {
    const int64_t slots = std::max<int64_t>(1, batch * c.num_experts_per_tok * experts / c.n_routed_experts);
    std::vector<int32_t> per(static_cast<size_t>(experts), 0);
    for (int64_t i = 0; i < slots; ++i) ++per[rng() % experts];
    std::vector<float> x(static_cast<size_t>(slots * in));
    for (float& v : x) v = nd(rng);
    double gemv = 0, mma = 0, simt = 0;
    auto a =
        cuda::testing::ExpertGemmFp4(x, in, w, out, per, cuda::testing::ExpertPath::kDecodeGemv, 20, &gemv);
    if (!cuda::testing::ExpertGemmFp4(x, in, w, out, per, cuda::testing::ExpertPath::kDecodeGemvSimt, 20,
                                      &simt)
             .ok()) {
      simt = 0;
    }
    auto b =
        cuda::testing::ExpertGemmFp4(x, in, w, out, per, cuda::testing::ExpertPath::kDecodeMma, 20, &mma);
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "expert kernels: %s\n",
                   std::string((a.ok() ? b.status() : a.status()).message()).c_str());
      return;
    }
    // The decode MoE's gate and up projections in one GEMV with SwiGLU (the same matrix twice here).
    double glu = 0;
    std::vector<float> w13 = w;
    w13.insert(w13.end(), w.begin(), w.end());
    if (!cuda::testing::ExpertGemmFp4(x, in, w13, out, per, cuda::testing::ExpertPath::kDecodeGlu, 20, &glu)
             .ok()) {
      glu = 0;
    }
    double mma8 = 0;  // The FP8 mode's tensor-core kernel (GroupedGemmFp4Fp8) on the same rows.
    if (!cuda::testing::ExpertGemmFp4(x, in, w, out, per, cuda::testing::ExpertPath::kDecodeMma, 20, &mma8,
                                      /*fp8=*/true)
             .ok()) {
      mma8 = 0;
    }
    int64_t active = 0;
    for (int32_t p : per) active += p > 0;
    const double bytes = static_cast<double>(active * out * in) * (0.5 + 1.0 / 32);
    char line[640];
    std::snprintf(
        line, sizeof(line),
        "| MXFP4 experts (decode), batch %lld: %lld rows over %lld of 16 experts | tensor-core GEMM %.1f us "
        "(FP8 inputs %.1f us), GEMV on tensor cores %.1f us, SIMT GEMV %.1f us; gate + up + SwiGLU in one "
        "GEMV %.1f us | | %.0f MB | %.0f / %.0f / %.0f GB/s | GEMM / GEMV **%.2fx**, SIMT / tensor-core GEMV "
        "**%.2fx**, two GEMVs / fused **%.2fx** |",
        static_cast<long long>(batch), static_cast<long long>(slots), static_cast<long long>(active),
        mma * 1e6, mma8 * 1e6, gemv * 1e6, simt * 1e6, glu * 1e6, bytes / 1e6, bytes / mma / 1e9,
        bytes / gemv / 1e9, bytes / simt / 1e9, mma / gemv, simt / gemv, 2 * gemv / glu);
    rows->push_back(line);
    std::printf("%s\n", line);
    std::fflush(stdout);
  }
}

// The dense GEMM in both low-precision formats side by side (cuda::testing::Linear): cuBLAS with BF16 weights
// and inputs, and the FP8 kernels (fp8_gemm.cuh: inputs quantized per 128, weights in 128 x 128 tiles) on
// V4-Flash's FP8 linears (wq_b, wo_b, shared w1) at decode and prefill row counts. Decode sizes report weight
// bytes per second (against `copy_bw`), prefill sizes FLOP/s (against cuBLASLt's best FP8 GEMM `fp8_gemm`).
// Each timed call reads its weights from HBM, as in a step (cuda::testing::Linear flushes the L2 before
// each); until session 15 the calls ran back to back and matrices of a few MB were read from L2.
// `only` ("NAME:ROWS", --linear=): that FP8 shape at that row count alone, 3 calls a kernel (for ncu), no
// FP32 table.
void LinearKernels(const model::ModelConfig& c, double copy_bw, double fp8_gemm,
                   std::vector<std::string>* rows, const std::string& only) {
  struct Shape {
    const char* name;
    int64_t out, in;
  };
  const Shape shapes[] = {{"wq_b", c.num_attention_heads * c.head_dim, c.q_lora_rank},
                          {"wo_b", c.hidden_size, c.o_groups * c.o_lora_rank},
                          {"shared w1", c.moe_intermediate_size, c.hidden_size}};
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  const size_t colon = only.rfind(':');  // Main checked NAME:ROWS.
  const std::string only_name = only.substr(0, colon);
  const int64_t only_rows = only.empty() ? 0 : std::atoll(only.c_str() + colon + 1);
  const int repeats = only.empty() ? 20 : 3;
  for (const Shape& sh : shapes) {
    if (!only.empty() && only_name != sh.name) continue;
    std::vector<float> w(static_cast<size_t>(sh.out * sh.in));
    for (float& v : w) v = nd(rng);
    const std::vector<int64_t> row_counts =
        only.empty() ? std::vector<int64_t>{1, 8, 16, 32, 64, 256, 8192} : std::vector<int64_t>{only_rows};
    for (const int64_t m : row_counts) {
      std::vector<float> x(static_cast<size_t>(m * sh.in));
      for (float& v : x) v = nd(rng);
      double tb = 0, t8 = 0;
      auto a = cuda::testing::Linear(x, m, sh.in, w, sh.out, model::CudaWeights::kBf16, repeats, &tb);
      auto b = cuda::testing::Linear(x, m, sh.in, w, sh.out, model::CudaWeights::kFp8, repeats, &t8);
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "linear kernels: %s\n",
                     std::string((a.ok() ? b.status() : a.status()).message()).c_str());
        return;
      }
      const double rel = RelL2(*b, *a);  // FP8 against BF16: the two roundings' distance, for the record.
      // Each FP8 kernel forced (0 where it does not take this row count).
      double ts = 0, tt = 0, tl = 0, tr = 0;
      for (const auto& [path, t] : {std::pair<cuda::Fp8Path, double*>{cuda::Fp8Path::kSkinny, &ts},
                                    {cuda::Fp8Path::kTile, &tt},
                                    {cuda::Fp8Path::kLt, &tl},
                                    {cuda::Fp8Path::kRows, &tr}}) {
        if (((path == cuda::Fp8Path::kSkinny || path == cuda::Fp8Path::kRows) && m > 64) ||
            (path == cuda::Fp8Path::kLt && m < 4)) {
          continue;
        }
        if (!cuda::testing::Linear(x, m, sh.in, w, sh.out, model::CudaWeights::kFp8, repeats, t, path).ok())
          *t = 0;
      }
      const double flops = 2.0 * static_cast<double>(m * sh.out * sh.in);
      const double b16 = 2.0 * sh.out * sh.in, b8 = 1.0 * sh.out * sh.in;
      char line[640];
      if (m <= 64) {
        std::snprintf(
            line, sizeof(line),
            "| linear %s %lld x %lld, %lld rows | FP8 %.1f us (skinny %.1f, rows %.1f, cuBLASLt %.1f, tile "
            "%.1f), BF16 cuBLAS %.1f us | | FP8 %.0f / BF16 %.0f GB/s of weights | FP8 %.1f%% of copy bw | "
            "FP8 "
            "**%.2fx** faster; rel. L2 to BF16 %.1e |",
            sh.name, static_cast<long long>(sh.out), static_cast<long long>(sh.in), static_cast<long long>(m),
            t8 * 1e6, ts * 1e6, tr * 1e6, tl * 1e6, tt * 1e6, tb * 1e6, b8 / t8 / 1e9, b16 / tb / 1e9,
            100.0 * b8 / t8 / copy_bw, tb / t8, rel);
      } else {
        std::snprintf(
            line, sizeof(line),
            "| linear %s %lld x %lld, %lld rows | FP8 %.1f us (cuBLASLt %.1f, tile %.1f), BF16 cuBLAS %.1f "
            "us | %.1f GFLOP | FP8 %.0f / BF16 %.0f TFLOP/s | FP8 %.1f%% of FP8 GEMM | FP8 **%.2fx** faster; "
            "rel. L2 to BF16 %.1e |",
            sh.name, static_cast<long long>(sh.out), static_cast<long long>(sh.in), static_cast<long long>(m),
            t8 * 1e6, tl * 1e6, tt * 1e6, tb * 1e6, flops / 1e9, flops / t8 / 1e12, flops / tb / 1e12,
            100.0 * flops / t8 / fp8_gemm, tb / t8, rel);
      }
      rows->push_back(line);
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }
  if (!only.empty()) return;
  // The FP32 weights the backend keeps (an mHC mix, a CSA compressor projection, the router gate) at decode
  // rows: RowsGemmF32 against cuBLAS's FP32 GEMM (V4SERVE_CUDA_ROWS_GEMM=0), both exact FP32 FMA sums.
  const int64_t hc = c.hc_mult, d = c.hidden_size;
  const Shape f32_shapes[] = {{"mHC mix", (2 + hc) * hc, hc * d},
                              {"CSA compressor", 2 * c.head_dim, d},
                              {"router gate", c.n_routed_experts, d}};
  for (const Shape& sh : f32_shapes) {
    std::vector<float> w(static_cast<size_t>(sh.out * sh.in));
    for (float& v : w) v = nd(rng);
    for (const int64_t m : {1, 8, 16, 64}) {
      std::vector<float> x(static_cast<size_t>(m * sh.in));
      for (float& v : x) v = nd(rng);
      double tr = 0, tc = 0;
      absl::StatusOr<std::vector<float>> a, b;
      {
        ScopedEnv on("V4SERVE_CUDA_ROWS_GEMM", "1");
        a = cuda::testing::Linear(x, m, sh.in, w, sh.out, model::CudaWeights::kF32, 20, &tr);
      }
      {
        ScopedEnv off("V4SERVE_CUDA_ROWS_GEMM", "0");
        b = cuda::testing::Linear(x, m, sh.in, w, sh.out, model::CudaWeights::kF32, 20, &tc);
      }
      if (!a.ok() || !b.ok()) {
        std::fprintf(stderr, "FP32 linear kernels: %s\n",
                     std::string((a.ok() ? b.status() : a.status()).message()).c_str());
        return;
      }
      const double rel = RelL2(*a, *b);
      const double bytes = 4.0 * sh.out * sh.in;
      char line[512];
      std::snprintf(
          line, sizeof(line),
          "| linear FP32 %s %lld x %lld, %lld rows | RowsGemmF32 %.1f us, cuBLAS FP32 %.1f us | | "
          "%.0f / %.0f GB/s of weights | %.1f%% of copy bw | **%.2fx** faster; rel. L2 between them "
          "%.1e |",
          sh.name, static_cast<long long>(sh.out), static_cast<long long>(sh.in), static_cast<long long>(m),
          tr * 1e6, tc * 1e6, bytes / tr / 1e9, bytes / tc / 1e9, 100.0 * bytes / tr / copy_bw, tc / tr, rel);
      rows->push_back(line);
      std::printf("%s\n", line);
      std::fflush(stdout);
    }
  }
}

}  // namespace v4serve::bench
