// The CUDA backend against the CPU reference: each kernel on random inputs, then the whole tiny V4 model
// (prefill in chunks, batched decode, sequence states). Label gpu; every test skips without a GPU.
//
// Tolerances. FP32 weights (CudaWeights::kF32): the GPU computes the same FP32 function as the CPU and
// differs only in summation order (cuBLAS vs the CPU's 4-way dot products, block reductions) and in the last
// bit of expf/cosf; relative L2 errors of such differences are ~1e-6 per op and stay far below 1e-4 after 4
// layers, while a logic error (wrong key, wrong expert, wrong position) moves the logits by O(1). BF16
// weights (kBf16) round the GEMM inputs to 8 mantissa bits (tiny_v4's weights are BF16/FP8/FP4 in the
// checkpoint, so they convert exactly), and a random-weight network amplifies such rounding from layer to
// layer: there the yardstick is the CPU's faithful mode, which rounds activations to BF16 (and more) as
// DeepSeek's kernels do. BF16 logits and states must stay within max(5e-2, 2 x the faithful mode's distance
// from the exact reference) at every step; greedy tokens may flip on near-ties.
#include "model/cuda/cuda_backend.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "gtest/gtest.h"
#include "model/backend.h"
#include "model/cpu/attention.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/device.h"
#include "model/model.h"
#include "model/numeric_formats.h"
#include "model/safetensors.h"
#include "model/state_rollback.h"

namespace v4serve::model {
namespace {

bool HaveGpu(std::string* why) {
  absl::StatusOr<Device> d = ResolveDevice(Device::kAuto, why);
  return d.ok() && *d == Device::kCuda;
}

#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    std::string why;                                                                \
    if (!HaveGpu(&why)) GTEST_SKIP() << "no GPU, CUDA backend not tested: " << why; \
  } while (false)

std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

TEST(CudaKernelTest, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 37, dim = 4096;
  std::vector<float> x = Random(rows * dim, 1, 3.0f), w = Random(dim, 2), ref = x;
  cpu::RmsNorm(ref.data(), rows, dim, w.data(), 1e-6);
  ASSERT_TRUE(cuda::testing::RmsNorm(&x, rows, dim, w, 1e-6).ok());
  EXPECT_LT(RelL2(x, ref), 1e-6);
}

TEST(CudaKernelTest, RopeMatchesCpu) {
  SKIP_WITHOUT_GPU();
  ModelConfig c;
  RopeScaling yarn{};
  yarn.factor = 16;
  yarn.original_max_position_embeddings = 65536;
  yarn.beta_fast = 32;
  yarn.beta_slow = 1;
  const cpu::RopeTable t = cpu::MakeRopeTable(64, 160000, &yarn);
  const int64_t rows = 50, dim = 512;
  std::vector<float> x = Random(rows * dim, 3), ref = x;
  std::vector<int64_t> pos(rows);
  for (int64_t r = 0; r < rows; ++r) pos[r] = r * 4099 + 7;
  for (int64_t r = 0; r < rows; ++r) t.Apply(&ref[r * dim + dim - 64], pos[r], /*inverse=*/false);
  ASSERT_TRUE(cuda::testing::Rope(&x, rows, dim, 64, t.inv_freq, pos, false).ok());
  EXPECT_LT(RelL2(x, ref), 1e-5);
  ASSERT_TRUE(cuda::testing::Rope(&x, rows, dim, 64, t.inv_freq, pos, true).ok());
  for (int64_t r = 0; r < rows; ++r) t.Apply(&ref[r * dim + dim - 64], pos[r], /*inverse=*/true);
  EXPECT_LT(RelL2(x, ref), 1e-5);
}

TEST(CudaKernelTest, TopKMatchesCpuIncludingTies) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 5, n = 3000, k = 512;
  std::vector<float> sc = Random(rows * n, 4);
  // Row 1: heavy ties (values from a small set); row 2: all equal; row 3: negatives only.
  for (int64_t i = 0; i < n; ++i) sc[1 * n + i] = static_cast<float>(i % 7);
  for (int64_t i = 0; i < n; ++i) sc[2 * n + i] = 0.5f;
  for (int64_t i = 0; i < n; ++i) sc[3 * n + i] = -std::fabs(sc[3 * n + i]);
  absl::StatusOr<std::vector<std::vector<int64_t>>> got = cuda::testing::TopK(sc, rows, n, k);
  ASSERT_TRUE(got.ok()) << got.status();
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t> want =
        cpu::TopKIndices(std::vector<float>(sc.begin() + r * n, sc.begin() + (r + 1) * n), k);
    std::sort(want.begin(), want.end());
    EXPECT_EQ((*got)[r], want) << "row " << r;
  }
}

TEST(CudaKernelTest, LinearMatchesCpuInBothWeightFormats) {
  SKIP_WITHOUT_GPU();
  const int64_t m = 9, in = 1024, out = 768;
  std::vector<float> x = Random(m * in, 5), w = Random(out * in, 6, 0.03f), ref;
  cpu::MatmulWt(x.data(), m, in, w.data(), out, &ref);
  absl::StatusOr<std::vector<float>> y = cuda::testing::Linear(x, m, in, w, out, CudaWeights::kF32);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_LT(RelL2(*y, ref), 1e-6);
  // BF16: the same as the CPU on BF16-rounded operands, up to FP32 summation order.
  std::vector<float> xb = x, wb = w, refb;
  for (float& v : xb) v = RoundToBf16(v);
  for (float& v : wb) v = RoundToBf16(v);
  cpu::MatmulWt(xb.data(), m, in, wb.data(), out, &refb);
  y = cuda::testing::Linear(x, m, in, w, out, CudaWeights::kBf16);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_LT(RelL2(*y, refb), 1e-5);
  EXPECT_LT(RelL2(*y, ref), 1e-2);
}

// The FP8 weight mode's GEMM (model/cuda/fp8_gemm.cuh) against the CPU faithful mode's: the input through
// cpu::Numerics::Fp8Blocks (bit for bit the device's quantization), the weights through 128 x 128 tiles with
// E8M0 scales 2^ceil(log2(amax / 448)) (quantized here from the definition), the product in double. What is
// left is the tensor cores' summation (Hopper's FP8 MMA accumulates a 128-wide block with reduced precision,
// ~2^-14 relative, before the FP32 promotion): ~1e-4 rel. L2 over the output and up to ~1.5e-3 in a row
// (cuBLASLt's, whose accumulation is the coarser; FP8 rounding of the input itself is ~4e-2), where a wrong
// scale, tile or k order is O(1e-1) or more. Each kernel runs (SkinnyGemmFp8 at 1-8, 9-16, 17-32, 33-64 rows;
// GemmFp8; cuBLASLt on the rows up to a multiple of 4 with ours on the rest) on partial tiles (out 320 = 2.5
// tiles of 128, rows past 64); one input block is all zeros (scale from the 1e-4 floor) and one is large.
void CheckFp8Linear(int64_t in, int64_t out, std::initializer_list<int64_t> row_counts) {
  SCOPED_TRACE(testing::Message() << "in " << in << " out " << out);
  std::vector<float> w = Random(out * in, 16, 0.03f);
  for (int64_t i = 0; i < 128; ++i) w[200 * in + 256 + i] *= 1e3f;  // One tile with a much larger scale.
  std::vector<float> wq = w;
  for (int64_t r0 = 0; r0 < out; r0 += 128) {
    for (int64_t c0 = 0; c0 < in; c0 += 128) {
      float amax = 0;
      for (int64_t r = r0; r < std::min(out, r0 + 128); ++r)
        for (int64_t c = c0; c < c0 + 128; ++c) amax = std::max(amax, std::fabs(w[r * in + c]));
      const float q = std::max(amax, 0x1p-100f) * (1.0f / 448.0f);
      int e = 0;
      const float frac =
          std::frexp(q, &e);  // q = frac * 2^e, frac in [0.5, 1): ceil(log2 q) = e - (frac == .5).
      const float s = std::ldexp(1.0f, frac == 0.5f ? e - 1 : e);
      for (int64_t r = r0; r < std::min(out, r0 + 128); ++r)
        for (int64_t c = c0; c < c0 + 128; ++c) wq[r * in + c] = RoundToFp8E4m3(w[r * in + c] / s) * s;
    }
  }
  const cpu::Numerics faithful{true};
  for (int64_t m : row_counts) {
    std::vector<float> x = Random(m * in, 17 + m);
    for (int64_t i = 0; i < 128; ++i) x[(m - 1) * in + 256 + i] = 0;  // A zero block.
    for (int64_t i = 0; i < 128; ++i) x[i] *= 300.0f;                 // A large one.
    std::vector<float> xq = x, ref(static_cast<size_t>(m * out));
    faithful.Fp8Blocks(xq.data(), m, in, in, 128);
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t o = 0; o < out; ++o) {
        ref[r * out + o] = static_cast<float>(cpu::DotF64(&xq[r * in], &wq[o * in], in));
      }
    }
    // What the row count picks, and each kernel forced (cuBLASLt's part a multiple of 4 rows, ours the rest).
    for (const cuda::Fp8Path path :
         {cuda::Fp8Path::kAuto, cuda::Fp8Path::kTile, cuda::Fp8Path::kSkinny, cuda::Fp8Path::kLt}) {
      if (path == cuda::Fp8Path::kSkinny && m > 64) continue;
      absl::StatusOr<std::vector<float>> y =
          cuda::testing::Linear(x, m, in, w, out, CudaWeights::kFp8, 0, nullptr, path);
      ASSERT_TRUE(y.ok()) << y.status();
      EXPECT_LT(RelL2(*y, ref), 2e-4) << m << " rows, path " << static_cast<int>(path);
      for (int64_t r = 0; r < m;
           ++r) {  // Every row on its own too (a row or tile the kernels skip shows here).
        std::vector<float> yr(y->begin() + r * out, y->begin() + (r + 1) * out);
        std::vector<float> rr(ref.begin() + r * out, ref.begin() + (r + 1) * out);
        ASSERT_LT(RelL2(yr, rr), 5e-3) << m << " rows, row " << r << ", path " << static_cast<int>(path);
      }
    }
  }
}

TEST(CudaKernelTest, Fp8LinearMatchesTheFaithfulGemm) {
  SKIP_WITHOUT_GPU();
  CheckFp8Linear(1024, 320, {1, 5, 13, 40, 64, 65, 200});
  // cuBLASLt's other input widths that serving gives it (512: the smallest it takes; 4096: V4's hidden size).
  CheckFp8Linear(512, 256, {8, 65});
  CheckFp8Linear(4096, 256, {8, 65});
}

TEST(CudaKernelTest, ArgmaxRowsTakesTheLowestIndexOnTies) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 4, cols = 129280;
  std::vector<float> x = Random(rows * cols, 7);
  x[0 * cols + 100] = 50;
  x[1 * cols + 5] = 60;
  x[1 * cols + 99999] = 60;  // Tie: index 5 wins.
  x[2 * cols + cols - 1] = 70;
  x[3 * cols + 0] = 80;
  absl::StatusOr<std::vector<int32_t>> got = cuda::ArgmaxRows(x, rows, cols);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, (std::vector<int32_t>{100, 5, static_cast<int32_t>(cols - 1), 0}));
}

// Attention in double precision on the host, from the case's definition (cuda_backend.h): per (row, head)
// the softmax over the row's window keys, its selected (or all visible) entries and the head's sink logit,
// applied to the same keys as values. `round` first rounds q and the keys to BF16.
std::vector<float> ReferenceAttention(const cuda::testing::AttentionCase& c, bool round) {
  auto val = [&](float x) { return round ? static_cast<double>(RoundToBf16(x)) : static_cast<double>(x); };
  std::vector<float> o(static_cast<size_t>(c.n * c.h * c.hd));
  for (int64_t r = 0; r < c.n; ++r) {
    std::vector<const float*> keys;
    for (int64_t j = 0; j < c.win_cnt[r]; ++j) keys.push_back(&c.wk[(c.win_start[r] + j) * c.hd]);
    const int64_t ne = c.sel.empty() ? c.vis[r] : c.sel_cnt[r];
    for (int64_t j = 0; j < ne; ++j) {
      const int64_t e = c.sel.empty() ? j : c.sel[r * c.topk + j];
      keys.push_back(&c.ek[(c.ent_base[r] + e) * c.hd]);
    }
    for (int64_t hh = 0; hh < c.h; ++hh) {
      const float* q = &c.q[(r * c.h + hh) * c.hd];
      std::vector<double> logit(keys.size());
      double mx = c.sink[hh];
      for (size_t j = 0; j < keys.size(); ++j) {
        double dot = 0;
        for (int64_t i = 0; i < c.hd; ++i) dot += val(q[i]) * val(keys[j][i]);
        logit[j] = dot * c.scale;
        mx = std::max(mx, logit[j]);
      }
      double den = std::exp(c.sink[hh] - mx);
      for (double& l : logit) den += (l = std::exp(l - mx));
      for (int64_t i = 0; i < c.hd; ++i) {
        double acc = 0;
        for (size_t j = 0; j < keys.size(); ++j) acc += logit[j] / den * val(keys[j][i]);
        o[(r * c.h + hh) * c.hd + i] = static_cast<float>(acc);
      }
    }
  }
  return o;
}

// Both attention kernels against the host reference, at V4-Flash's shapes (64 heads x 512: CSA with top-512
// selection, HCA over every visible entry) and the tiny model's (4 heads x 128: padded head rows), with rows
// whose key counts are not multiples of the tensor-core kernel's 32-key tile, rows with only the current
// token, entries only partly visible, and a row with more keys than one tile of a few. The FP32 kernel must
// match to summation order; the BF16 tensor-core kernel must match the reference on BF16-rounded q and
// keys up to P's rounding (a wrong fragment layout or a lost tile moves the output by O(1)), and the exact
// reference to BF16's precision.
TEST(CudaKernelTest, AttentionKernelsMatchTheReference) {
  SKIP_WITHOUT_GPU();
  struct Shape {
    int64_t n, h, hd, window, entries, topk;
  };
  for (const Shape& sh : {Shape{9, 64, 512, 128, 700, 512}, Shape{7, 64, 512, 128, 64, 0},
                          Shape{11, 4, 128, 128, 300, 128}, Shape{5, 16, 256, 40, 9, 0}}) {
    SCOPED_TRACE(testing::Message() << "n " << sh.n << " h " << sh.h << " hd " << sh.hd << " topk "
                                    << sh.topk);
    cuda::testing::AttentionCase c =
        cuda::testing::RandomAttentionCase(sh.n, sh.h, sh.hd, sh.window, sh.entries, sh.topk, 11);
    c.win_cnt[0] = 1;  // Only the current token, no entries.
    c.vis[0] = 0;
    if (!c.sel.empty()) c.sel_cnt[0] = 0;
    c.win_cnt[1] = 37;  // 37 + a few: not a multiple of 32.
    c.vis[1] = std::min<int64_t>(sh.entries, 5);
    if (!c.sel.empty()) {
      c.sel_cnt[1] = static_cast<int32_t>(c.vis[1]);
      for (int64_t j = 0; j < c.vis[1]; ++j) c.sel[1 * c.topk + j] = static_cast<int32_t>(c.vis[1] - 1 - j);
    }
    const std::vector<float> exact = ReferenceAttention(c, false), rounded = ReferenceAttention(c, true);
    absl::StatusOr<std::vector<float>> simt = cuda::testing::SparseAttention(c, false);
    ASSERT_TRUE(simt.ok()) << simt.status();
    EXPECT_LT(RelL2(*simt, exact), 1e-5);
    absl::StatusOr<std::vector<float>> mma = cuda::testing::SparseAttention(c, true);
    ASSERT_TRUE(mma.ok()) << mma.status();
    EXPECT_LT(RelL2(*mma, rounded), 5e-3);
    EXPECT_LT(RelL2(*mma, exact), 2e-2);
    // Row 0 alone (its one key against the sink) is checked on its own: the whole-case error would hide it.
    std::vector<float> row0(mma->begin(), mma->begin() + sh.h * sh.hd),
        want0(exact.begin(), exact.begin() + sh.h * sh.hd);
    EXPECT_LT(RelL2(row0, want0), 2e-2);
  }
}

// Both indexer kernels against the host (double): V4-Flash's 64 heads x 128 and the tiny model's 4 heads
// (padded head rows), rows seeing 0, 1, 63, 64, 65 and a few hundred entries from different bases (decode
// batches: each row its own sequence). FP32: summation order only. BF16 tensor cores: against the reference
// on BF16-rounded q and keys to summation order, and the exact one to BF16's precision; a wrong fragment
// layout, head reduction or tile bound moves scores by O(1).
TEST(CudaKernelTest, IndexerKernelsMatchTheReference) {
  SKIP_WITHOUT_GPU();
  for (const int64_t ih : {64, 4}) {
    SCOPED_TRACE(testing::Message() << "heads " << ih);
    const int64_t id = 128, entries = 900;
    const std::vector<int64_t> vis = {0, 1, 63, 64, 65, 300, 777}, base = {0, 5, 100, 0, 800, 2, 123};
    const int64_t n = static_cast<int64_t>(vis.size());
    const std::vector<float> iq = Random(n * ih * id, 31), ik = Random(entries * id, 32);
    std::vector<float> iw = Random(n * ih, 33, 0.1f);
    auto reference = [&](bool round) {
      auto val = [&](float x) {
        return round ? static_cast<double>(RoundToBf16(x)) : static_cast<double>(x);
      };
      const int64_t ld = *std::max_element(vis.begin(), vis.end());
      std::vector<float> sc(static_cast<size_t>(n * ld), 0.0f);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t e = 0; e < vis[r]; ++e) {
          double acc = 0;
          for (int64_t h = 0; h < ih; ++h) {
            double dot = 0;
            for (int64_t i = 0; i < id; ++i)
              dot += val(iq[(r * ih + h) * id + i]) * val(ik[(base[r] + e) * id + i]);
            acc += std::max(dot, 0.0) * iw[r * ih + h];
          }
          sc[r * ld + e] = static_cast<float>(acc);
        }
      }
      return sc;
    };
    const std::vector<float> exact = reference(false), rounded = reference(true);
    absl::StatusOr<std::vector<float>> simt =
        cuda::testing::IndexerScores(iq, iw, ik, base, vis, ih, id, false);
    ASSERT_TRUE(simt.ok()) << simt.status();
    EXPECT_LT(RelL2(*simt, exact), 1e-5);
    absl::StatusOr<std::vector<float>> mma =
        cuda::testing::IndexerScores(iq, iw, ik, base, vis, ih, id, true);
    ASSERT_TRUE(mma.ok()) << mma.status();
    EXPECT_LT(RelL2(*mma, rounded), 1e-4);
    EXPECT_LT(RelL2(*mma, exact), 2e-2);
  }
}

// The MXFP4 expert GEMMs (the prefill path's tensor-core GEMM with host tiles, the decode path's with device
// routing, and the decode GEMV) against the host: weights drawn on the MXFP4 grid (so that loading them is
// exact), activations rounded to BF16 as the tensor-core kernel rounds them, products summed in double.
// Expert row counts cover an empty expert, one row, a partial tile, exactly one 64-row tile and several
// tiles; output widths cover a partial 128-column tile. Only FP32 summation order may differ; a wrong
// fragment layout, nibble, scale or tile bound moves the result by O(1).
TEST(CudaKernelTest, Mxfp4ExpertGemmMatchesTheHost) {
  SKIP_WITHOUT_GPU();
  static constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{256, 192}, {512, 128}}) {
    SCOPED_TRACE(testing::Message() << "in " << in << " out " << out);
    const std::vector<int32_t> rows = {3, 0, 1, 64, 150, 37};
    const int64_t experts = static_cast<int64_t>(rows.size());
    std::mt19937 rng(21);
    std::vector<float> w(static_cast<size_t>(experts * out * in));
    for (size_t b = 0; b < w.size() / 32; ++b) {
      const float scale = std::ldexp(1.0f, static_cast<int>(rng() % 9) - 10);
      for (size_t j = 0; j < 32; ++j) {
        w[b * 32 + j] = kGrid[rng() % 8] * scale * (rng() % 2 ? -1.0f : 1.0f);
      }
      w[b * 32 + rng() % 32] = 6.0f * scale;  // The block's scale is then exactly `scale`.
    }
    int64_t slots = 0;
    for (int32_t r : rows) slots += r;
    const std::vector<float> x = Random(static_cast<size_t>(slots * in), 22);
    // The inputs as each mode's kernels see them: BF16-rounded, or FP8 per row in blocks of 128 (the FP8
    // mode: the CPU faithful mode's rounding).
    std::vector<float> xb = x, x8 = x;
    for (float& v : xb) v = RoundToBf16(v);
    cpu::Numerics{true}.Fp8Blocks(x8.data(), slots, in, in, 128);
    std::vector<float> want, want8;
    using Io = std::pair<const std::vector<float>*, std::vector<float>*>;
    for (const auto& [xs, dst] : {Io{&xb, &want}, Io{&x8, &want8}}) {
      dst->assign(static_cast<size_t>(slots * out), 0.0f);
      int64_t row = 0;
      for (int64_t e = 0; e < experts; ++e) {
        for (int32_t i = 0; i < rows[e]; ++i, ++row) {
          for (int64_t o = 0; o < out; ++o) {
            (*dst)[row * out + o] =
                static_cast<float>(cpu::DotF64(&(*xs)[row * in], &w[(e * out + o) * in], in));
          }
        }
      }
    }
    auto compare = [&](const std::vector<float>& y, const std::vector<float>& want, double tol) {
      EXPECT_LT(RelL2(y, want), tol);
      // Every row and column is written (a missed tile would leave the allocation's garbage or zeros).
      double worst = 0;
      for (int64_t r = 0; r < slots; ++r) {
        std::vector<float> a(y.begin() + r * out, y.begin() + (r + 1) * out),
            b(want.begin() + r * out, want.begin() + (r + 1) * out);
        worst = std::max(worst, RelL2(a, b));
      }
      EXPECT_LT(worst, 10 * tol);
    };
    for (const cuda::testing::ExpertPath path :
         {cuda::testing::ExpertPath::kPrefill, cuda::testing::ExpertPath::kDecodeMma,
          cuda::testing::ExpertPath::kDecodeGemv}) {
      SCOPED_TRACE(testing::Message() << "path " << static_cast<int>(path));
      absl::StatusOr<std::vector<float>> y = cuda::testing::ExpertGemmFp4(x, in, w, out, rows, path);
      ASSERT_TRUE(y.ok()) << y.status();
      // The GEMV keeps x in FP32: against the BF16-rounded reference it is off by BF16's rounding of x.
      compare(*y, want, path == cuda::testing::ExpertPath::kDecodeGemv ? 2e-2 : 1e-5);
      // The FP8 mode: GroupedGemmFp4Fp8 converts the codes to e4m3 per 128-wide block (exact here: the
      // blocks' scales span at most 2^8) and accumulates on FP8 tensor cores (~1e-4, see
      // Fp8LinearMatchesTheFaithfulGemm); the GEMV computes in FP32 on the rounded inputs.
      y = cuda::testing::ExpertGemmFp4(x, in, w, out, rows, path, 0, nullptr, /*fp8=*/true);
      ASSERT_TRUE(y.ok()) << y.status();
      compare(*y, want8, path == cuda::testing::ExpertPath::kDecodeGemv ? 1e-5 : 2e-4);
    }
  }
}

struct Pair {
  std::unique_ptr<Model> cpu, gpu, faithful;
};

Pair LoadPair(CudaWeights format, int64_t index_topk = 0) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  EXPECT_TRUE(config.ok()) << config.status();
  if (index_topk > 0) config->index_topk = index_topk;
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  ModelOptions co, go;
  go.device = Device::kCuda;
  go.cuda_weights = format;
  ModelOptions fo;
  fo.mode = NumericMode::kFaithful;
  auto f = Model::FromCheckpoint(*config, **ckpt, fo);
  EXPECT_TRUE(f.ok()) << f.status();
  auto c = Model::FromCheckpoint(*config, **ckpt, co);
  auto g = Model::FromCheckpoint(*config, **ckpt, go);
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(g.ok()) << g.status();
  Pair p;
  if (c.ok()) p.cpu = std::move(*c);
  if (g.ok()) p.gpu = std::move(*g);
  if (f.ok()) p.faithful = std::move(*f);
  return p;
}

std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  for (auto& x : t) x = static_cast<int32_t>(2 + rng() % 500);
  return t;
}

double StateRelL2(const SequenceState& a, const SequenceState& b) {
  double worst = 0;
  EXPECT_EQ(a.position, b.position);
  EXPECT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size() && l < b.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].entries.size(), b.layers[l].entries.size()) << "layer " << l;
    worst = std::max(worst, RelL2(a.layers[l].window, b.layers[l].window));
    if (!b.layers[l].entries.empty())
      worst = std::max(worst, RelL2(a.layers[l].entries, b.layers[l].entries));
    if (!b.layers[l].indexer_keys.empty()) {
      worst = std::max(worst, RelL2(a.layers[l].indexer_keys, b.layers[l].indexer_keys));
    }
    // The compressors' windows (the GPU pools on the device and writes the same rows back to the host).
    for (int which = 0; which < 2; ++which) {
      const CompressorState& ca = which == 0 ? a.layers[l].compressor : a.layers[l].indexer_compressor;
      const CompressorState& cb = which == 0 ? b.layers[l].compressor : b.layers[l].indexer_compressor;
      EXPECT_EQ(ca.filled, cb.filled) << "layer " << l << " compressor " << which;
      EXPECT_EQ(ca.has_prev, cb.has_prev) << "layer " << l << " compressor " << which;
      if (cb.kv.empty()) continue;
      worst = std::max({worst, RelL2(ca.kv, cb.kv), RelL2(ca.score, cb.score)});
      if (cb.has_prev)
        worst = std::max({worst, RelL2(ca.prev_kv, cb.prev_kv), RelL2(ca.prev_score, cb.prev_score)});
    }
  }
  return worst;
}

// Prefill in chunks (crossing the window and both compression ratios), then batched decode of three
// sequences at different positions; logits and states against the CPU.
void CompareModel(CudaWeights format, int64_t index_topk, double tol, bool same_tokens) {
  Pair p = LoadPair(format, index_topk);
  ASSERT_TRUE(p.cpu && p.gpu);
  EXPECT_EQ(p.gpu->backend().device(), Device::kCuda) << p.gpu->backend().Describe();
  const int64_t vocab = p.cpu->config().vocab_size;
  std::vector<SequenceState> cs, gs, fs;
  // The tolerance of one comparison: `tol`, or for low-precision weights twice the faithful CPU's distance.
  double worst = 0, worst_faithful = 0;  // Largest logit distances seen, printed for docs/PERFORMANCE.md.
  auto limit = [&](double faithful_dist) { return same_tokens ? tol : std::max(tol, 2 * faithful_dist); };
  auto note = [&](const std::vector<float>& g, const std::vector<float>& c, double fd) {
    worst = std::max(worst, RelL2(g, c));
    worst_faithful = std::max(worst_faithful, fd);
  };
  // The 1100-token sequence's first chunk routes more than 2048 (token, expert) slots: the prefill path
  // (permutation on the host, cuBLAS per expert); the others take the device permutation and grouped GEMV.
  const std::vector<int64_t> lens = {70, 33, 101, 1100};
  for (size_t i = 0; i < lens.size(); ++i) {
    SequenceState c = p.cpu->NewState(), g = p.gpu->NewState(), f = p.faithful->NewState();
    const std::vector<int32_t> prompt = Prompt(lens[i], static_cast<uint32_t>(10 + i));
    // Chunks of 29 tokens (borders fall inside compression windows); 1030 + 70 for the long one.
    const int64_t step = lens[i] > 1000 ? 1030 : 29;
    for (int64_t b = 0; b < lens[i]; b += step) {
      const int64_t e = std::min<int64_t>(lens[i], b + step);
      absl::Span<const int32_t> chunk(&prompt[b], static_cast<size_t>(e - b));
      auto lc = p.cpu->Prefill(&c, chunk, /*all_logits=*/true);
      auto lg = p.gpu->Prefill(&g, chunk, /*all_logits=*/true);
      auto lf = p.faithful->Prefill(&f, chunk, /*all_logits=*/true);
      ASSERT_TRUE(lc.ok()) << lc.status();
      ASSERT_TRUE(lg.ok()) << lg.status();
      ASSERT_TRUE(lf.ok()) << lf.status();
      const double fd = RelL2(*lf, *lc);
      note(*lg, *lc, fd);
      EXPECT_LT(RelL2(*lg, *lc), limit(fd))
          << "prefill seq " << i << " chunk at " << b << " (faithful " << fd << ")";
    }
    const double fsd = StateRelL2(f, c);
    EXPECT_LT(StateRelL2(g, c), limit(fsd))
        << "state after prefill, seq " << i << " (faithful " << fsd << ")";
    cs.push_back(std::move(c));
    gs.push_back(std::move(g));
    fs.push_back(std::move(f));
  }
  std::vector<int32_t> next = {5, 77, 301, 42};
  for (int step = 0; step < 6; ++step) {
    std::vector<SequenceState*> cp, gp, fp;
    for (size_t i = 0; i < cs.size(); ++i) {
      cp.push_back(&cs[i]);
      gp.push_back(&gs[i]);
      fp.push_back(&fs[i]);
    }
    std::vector<float> cstreams, gstreams, fstreams;
    auto lc = p.cpu->Decode(cp, next, &cstreams);
    auto lg = p.gpu->Decode(gp, next, &gstreams);
    auto lf = p.faithful->Decode(fp, next, &fstreams);
    ASSERT_TRUE(lc.ok()) << lc.status();
    ASSERT_TRUE(lg.ok()) << lg.status();
    ASSERT_TRUE(lf.ok()) << lf.status();
    const double fd = RelL2(*lf, *lc), fsd = RelL2(fstreams, cstreams);
    note(*lg, *lc, fd);
    EXPECT_LT(RelL2(*lg, *lc), limit(fd)) << "decode step " << step << " (faithful " << fd << ")";
    EXPECT_LT(RelL2(gstreams, cstreams), limit(fsd)) << "final streams, decode step " << step;
    // Greedy tokens agree (sampled on the device for the GPU model).
    absl::StatusOr<std::vector<int32_t>> gtok =
        cuda::ArgmaxRows(*lg, static_cast<int64_t>(next.size()), vocab);
    ASSERT_TRUE(gtok.ok()) << gtok.status();
    for (size_t i = 0; i < next.size(); ++i) {
      const float* row = &(*lc)[i * vocab];
      const int32_t ctok = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      if (same_tokens) {
        EXPECT_EQ((*gtok)[i], ctok) << "decode step " << step << " seq " << i;
      }
      next[i] = ctok;
    }
  }
  std::printf("logits rel. L2 vs the exact CPU: largest %.3g (this backend), %.3g (CPU faithful mode)\n",
              worst, worst_faithful);
  for (size_t i = 0; i < cs.size(); ++i) {
    const double fsd = StateRelL2(fs[i], cs[i]);
    EXPECT_LT(StateRelL2(gs[i], cs[i]), limit(fsd)) << "final state " << i << " (faithful " << fsd << ")";
  }
}

TEST(CudaModelTest, Fp32WeightsMatchTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kF32, 0, 1e-4, true);
}

// index_topk 4 < visible entries: the indexer's top-k really selects (with 512 every entry is kept).
TEST(CudaModelTest, Fp32WeightsMatchWithASelectiveIndexer) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kF32, 4, 1e-4, true);
}

TEST(CudaModelTest, Bf16WeightsStayCloseToTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kBf16, 0, 5e-2, false);
}

// The FP8 mode rounds the FP8 linears' inputs as the faithful mode does (and keeps their weights exact): the
// same yardstick as BF16.
TEST(CudaModelTest, Fp8WeightsStayCloseToTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kFp8, 0, 5e-2, false);
}

// The backend keeps device copies of the states between calls (model/cuda/device_state_cache.h). Every way
// a state can change outside the backend's own forward must make it upload the state again: a copy that
// moves on separately, a rolled-back token, entries rewritten in place (with InvalidateDeviceCopy), and a
// budget of 0 (nothing kept). Each step's logits against the CPU; a stale copy moves them by O(1).
void CompareStateChanges(std::unique_ptr<Model> cpu, std::unique_ptr<Model> gpu, bool cached) {
  ASSERT_TRUE(cpu && gpu);
  SequenceState ca = cpu->NewState(), ga = gpu->NewState();
  const std::vector<int32_t> prompt = Prompt(70, 3);
  for (int64_t b = 0; b < 70; b += 29) {
    absl::Span<const int32_t> chunk(&prompt[b], static_cast<size_t>(std::min<int64_t>(70, b + 29) - b));
    auto lc = cpu->Prefill(&ca, chunk);
    auto lg = gpu->Prefill(&ga, chunk);
    ASSERT_TRUE(lc.ok() && lg.ok()) << lc.status() << lg.status();
    EXPECT_LT(RelL2(*lg, *lc), 1e-4) << "prefill chunk at " << b;
  }
  auto decode = [&](std::vector<SequenceState*> c, std::vector<SequenceState*> g, std::vector<int32_t> tok,
                    const char* what) {
    auto lc = cpu->Decode(c, tok);
    auto lg = gpu->Decode(g, tok);
    ASSERT_TRUE(lc.ok() && lg.ok()) << what << ": " << lc.status() << lg.status();
    EXPECT_LT(RelL2(*lg, *lc), 1e-4) << what;
  };
  decode({&ca}, {&ga}, {11}, "first decode");
  // A copy: both move on, one at a time, then together.
  SequenceState cb = ca, gb = ga;
  decode({&ca}, {&ga}, {12}, "original after the copy");
  decode({&cb}, {&gb}, {13}, "copy after the original moved on");
  decode({&ca, &cb}, {&ga, &gb}, {14, 15}, "both in one batch");
  // A rolled-back token (speculative decoding's rejected draft), then another token at its position.
  for (int i = 0; i < 6; ++i) {  // Crosses compressed-entry boundaries (ratio 4), so entries are dropped too.
    absl::StatusOr<TokenUndo> uc = SaveTokenUndo(cpu->config(), ca, ca.position);
    absl::StatusOr<TokenUndo> ug = SaveTokenUndo(gpu->config(), ga, ga.position);
    ASSERT_TRUE(uc.ok() && ug.ok());
    decode({&ca}, {&ga}, {static_cast<int32_t>(20 + i)}, "draft token");
    ASSERT_TRUE(UndoLastToken(*uc, &ca).ok());
    ASSERT_TRUE(UndoLastToken(*ug, &ga).ok());
    decode({&ca}, {&ga}, {static_cast<int32_t>(40 + i)}, "token after the rollback");
  }
  // Entries rewritten in place, same count.
  for (SequenceState* s : {&ca, &ga}) {
    for (AttentionLayerState& l : s->layers) {
      for (float& v : l.entries) v = -v;
    }
  }
  InvalidateDeviceCopy(&ga);
  decode({&ca}, {&ga}, {60}, "after entries were rewritten in place");
  absl::StatusOr<cuda::ForwardCounters> k = cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_uploaded, 1);
  decode({&ca, &cb}, {&ga, &gb}, {61, 62}, "batch after the rewrite");
  EXPECT_LT(StateRelL2(ga, ca), 1e-4);
  EXPECT_LT(StateRelL2(gb, cb), 1e-4);
  // Greedy on the device: the CPU's argmax, and the states move on alike.
  {
    auto lc = cpu->DecodeChunks({&ca, &cb}, std::vector<int64_t>{1, 2}, std::vector<int32_t>{63, 64, 65});
    auto ig =
        gpu->DecodeChunksGreedy({&ga, &gb}, std::vector<int64_t>{1, 2}, std::vector<int32_t>{63, 64, 65});
    ASSERT_TRUE(lc.ok() && ig.ok()) << lc.status() << ig.status();
    EXPECT_EQ(*ig, ArgmaxOfRows(*lc, 3));
    EXPECT_LT(StateRelL2(ga, ca), 1e-4);
    EXPECT_LT(StateRelL2(gb, cb), 1e-4);
  }
  k = cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  // Both copies were kept, unless nothing is (budget 0).
  EXPECT_EQ(k->states_cached, cached ? 2 : 0);
  EXPECT_EQ(k->states_uploaded, cached ? 0 : 2);
}

TEST(CudaModelTest, DeviceStateCopiesFollowEveryChangeOfTheHostState) {
  SKIP_WITHOUT_GPU();
  Pair p = LoadPair(CudaWeights::kF32);
  CompareStateChanges(std::move(p.cpu), std::move(p.gpu), true);
}

TEST(CudaModelTest, StateCacheBudgetZeroUploadsEveryCallAndABadBudgetIsAClearError) {
  SKIP_WITHOUT_GPU();
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "0", 1);
  Pair p = LoadPair(CudaWeights::kF32);
  CompareStateChanges(std::move(p.cpu), std::move(p.gpu), false);
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "lots", 1);
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(config.ok() && ckpt.ok());
  ModelOptions go;
  go.device = Device::kCuda;
  auto g = Model::FromCheckpoint(*config, **ckpt, go);
  unsetenv("V4SERVE_CUDA_STATE_CACHE_MB");
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << g.status();
  EXPECT_NE(g.status().message().find("V4SERVE_CUDA_STATE_CACHE_MB"), std::string::npos) << g.status();
}

// Two backends in one process (tests, benches): a state run by one and then by the other must be uploaded
// there, not matched with an unrelated copy that happens to carry the same tag and length.
TEST(CudaModelTest, AStateMovingToAnotherBackendIsUploadedThere) {
  SKIP_WITHOUT_GPU();
  Pair p1 = LoadPair(CudaWeights::kF32), p2 = LoadPair(CudaWeights::kF32);
  ASSERT_TRUE(p1.cpu && p1.gpu && p2.gpu);
  SequenceState a = p1.gpu->NewState(), b = p2.gpu->NewState(), ca = p1.cpu->NewState();
  const std::vector<int32_t> pa = Prompt(70, 41), pb = Prompt(70, 42);
  ASSERT_TRUE(p1.gpu->Prefill(&a, pa).ok());  // Same number of forwards on each backend: same counters.
  ASSERT_TRUE(p2.gpu->Prefill(&b, pb).ok());
  ASSERT_TRUE(p1.cpu->Prefill(&ca, pa).ok());
  auto lg = p2.gpu->Decode({&a}, std::vector<int32_t>{9});
  auto lc = p1.cpu->Decode({&ca}, std::vector<int32_t>{9});
  ASSERT_TRUE(lg.ok() && lc.ok()) << lg.status() << lc.status();
  EXPECT_LT(RelL2(*lg, *lc), 1e-4);
  absl::StatusOr<cuda::ForwardCounters> k = cuda::LastForwardCounters(p2.gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_uploaded, 1);
}

// Sampling's candidates on the device (ForwardTop: sums, TopK, bitonic sort) against the host's definition
// (TopOfRows) of the same logits: the same forward run twice from equal states (nothing cached, so both
// upload the same host states and compute the same bits). Ids and values exactly, sums to rounding, and
// full_row gives the logits back.
TEST(CudaModelTest, SamplingCandidatesOnTheDeviceMatchTheHosts) {
  SKIP_WITHOUT_GPU();
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "0", 1);
  Pair p = LoadPair(CudaWeights::kBf16);
  unsetenv("V4SERVE_CUDA_STATE_CACHE_MB");
  ASSERT_TRUE(p.gpu != nullptr);
  const ModelConfig& c = p.gpu->config();
  std::vector<SequenceState> a = {NewSequenceState(c), NewSequenceState(c), NewSequenceState(c)};
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(
        p.gpu->Prefill(&a[i], Prompt(40 + 17 * static_cast<int64_t>(i), 60 + i), false, nullptr).ok());
  }
  std::vector<SequenceState> b = a;
  const std::vector<int32_t> next = {5, 9, 300};
  const std::vector<int64_t> counts = {1, 1, 1};
  const std::vector<float> temps = {0.7f, 0.0f, 1.6f};
  absl::StatusOr<std::vector<float>> logits =
      p.gpu->DecodeChunks({&a[0], &a[1], &a[2]}, counts, next, nullptr);
  ASSERT_TRUE(logits.ok()) << logits.status();
  for (const int64_t m : {int64_t{256}, int64_t{37}}) {
    SCOPED_TRACE(testing::Message() << "m " << m);
    std::vector<SequenceState> bb = b;
    absl::StatusOr<TopLogits> top = p.gpu->DecodeChunksTop({&bb[0], &bb[1], &bb[2]}, counts, next, temps, m);
    ASSERT_TRUE(top.ok()) << top.status();
    const TopLogits want = TopOfRows(*logits, 3, temps, m);
    ASSERT_EQ(top->m, m);
    EXPECT_EQ(top->vocab, c.vocab_size);
    EXPECT_EQ(top->ids, want.ids);
    EXPECT_EQ(top->values, want.values);
    for (int r = 0; r < 3; ++r) {
      EXPECT_NEAR(top->norm[r], want.norm[r], 1e-12 * want.norm[r]);
      EXPECT_NEAR(top->norm1[r], want.norm1[r], 1e-12 * want.norm1[r]);
    }
    absl::StatusOr<std::vector<float>> row = top->full_row(2);
    ASSERT_TRUE(row.ok()) << row.status();
    EXPECT_EQ(*row,
              std::vector<float>(logits->begin() + 2 * c.vocab_size, logits->begin() + 3 * c.vocab_size));
    EXPECT_FALSE(top->full_row(3).ok());
  }
}

// MXFP4 experts whose block scale the GEMV cannot hold (it folds 2^6 into the FP32 exponent: bytes above
// 248) are refused at load with a clear error, not computed as infinities.
TEST(CudaModelTest, Mxfp4ScalesBeyondTheGemvsRangeAreRefusedAtLoad) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->expert_dtype, "fp4");
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<std::unique_ptr<cpu::ModelWeights>> w = cpu::LoadWeights(*config, **ckpt, false);
  ASSERT_TRUE(w.ok()) << w.status();
  const cpu::RopeTable main = cpu::MakeRopeTable(config->qk_rope_head_dim, config->rope_theta, nullptr);
  const cpu::RopeTable comp =
      cpu::MakeRopeTable(config->qk_rope_head_dim, config->compress_rope_theta, &config->rope_scaling);
  ASSERT_TRUE(cuda::MakeCudaBackend(*config, **w, main, comp, CudaWeights::kBf16).ok());
  (*w)->layers[1].experts[3].w2[17] = 3e38f;  // amax / 6 = 2^125.2: a block scale of 2^126.
  absl::StatusOr<std::unique_ptr<ForwardBackend>> be =
      cuda::MakeCudaBackend(*config, **w, main, comp, CudaWeights::kBf16);
  ASSERT_FALSE(be.ok());
  EXPECT_EQ(be.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(be.status().message().find("block scale of 2^126"), std::string::npos) << be.status();
}

TEST(CudaModelTest, AutoPicksCudaWithAGpuAndCudaFailsClearlyWithout) {
  std::string why;
  absl::StatusOr<Device> d = ResolveDevice(Device::kAuto, &why);
  ASSERT_TRUE(d.ok());
  absl::StatusOr<Device> forced = ResolveDevice(Device::kCuda);
  if (*d == Device::kCpu) {
    EXPECT_EQ(forced.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_NE(why.find("cpu: "), std::string::npos) << why;
  } else {
    EXPECT_TRUE(forced.ok());
  }
  EXPECT_FALSE(ParseDevice("gpu").ok());
  EXPECT_EQ(*ParseDevice("cuda"), Device::kCuda);
}

// Runs everywhere: without a GPU, asking for CUDA is a clear UNAVAILABLE (auto falls back to the CPU); with
// one, the model reports the CUDA backend.
TEST(CudaModelTest, ExplicitCudaWithoutAGpuIsUnavailableAndAutoFallsBack) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ModelOptions forced, automatic;
  forced.device = Device::kCuda;
  automatic.device = Device::kAuto;
  auto f = Model::FromCheckpoint(*config, **ckpt, forced);
  auto a = Model::FromCheckpoint(*config, **ckpt, automatic);
  ASSERT_TRUE(a.ok()) << a.status();
  std::string why;
  if (HaveGpu(&why)) {
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ((*f)->backend().device(), Device::kCuda);
    EXPECT_EQ((*a)->backend().device(), Device::kCuda);
  } else {
    EXPECT_EQ(f.status().code(), absl::StatusCode::kUnavailable) << f.status();
    EXPECT_NE(f.status().message().find("--device=cuda"), std::string::npos) << f.status();
    EXPECT_EQ((*a)->backend().device(), Device::kCpu);
    EXPECT_EQ((*a)->backend().Describe(), "cpu: fp32, exact");
  }
  // The faithful mode has no CUDA implementation: explicit CUDA refuses, auto stays on the CPU.
  forced.mode = automatic.mode = NumericMode::kFaithful;
  auto ff = Model::FromCheckpoint(*config, **ckpt, forced);
  EXPECT_FALSE(ff.ok());
  auto af = Model::FromCheckpoint(*config, **ckpt, automatic);
  ASSERT_TRUE(af.ok()) << af.status();
  EXPECT_EQ((*af)->backend().device(), Device::kCpu);
}

}  // namespace
}  // namespace v4serve::model
