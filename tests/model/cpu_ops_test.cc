#include <atomic>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"

namespace v4serve::model::cpu {
namespace {

TEST(CpuOpsTest, ParallelForCoversEveryIndexOnceAndNests) {
  std::vector<std::atomic<int>> hits(10000);
  ParallelFor(100, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // A nested ParallelFor runs inline instead of deadlocking on the pool.
      ParallelFor(100, 1, [&](int64_t b2, int64_t e2) {
        for (int64_t j = b2; j < e2; ++j) hits[i * 100 + j]++;
      });
    }
  });
  for (auto& h : hits) ASSERT_EQ(h.load(), 1);
}

// Many short jobs back to back: a worker still leaving one job must never run a chunk of the next one
// (each index exactly once per job; the tsan preset checks the pool's synchronization).
TEST(CpuOpsTest, BackToBackJobsRunEveryChunkOnce) {
  std::vector<std::atomic<int>> hits(16);
  for (int job = 0; job < 3000; ++job) {
    ParallelFor(16, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
  }
  for (auto& h : hits) EXPECT_EQ(h.load(), 3000);
}

TEST(CpuOpsTest, MatmulMatchesNaive) {
  const int64_t m = 3, in = 37, out = 50;
  std::vector<float> x(m * in), w(out * in), y;
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(static_cast<float>(i));
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::cos(static_cast<float>(i) * 0.7f);
  MatmulWt(x.data(), m, in, w.data(), out, &y);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) acc += static_cast<double>(x[r * in + k]) * w[o * in + k];
      EXPECT_NEAR(y[r * out + o], acc, 1e-4);
    }
  }
}

TEST(CpuOpsTest, HadamardIsOrthonormalAndSelfInverse) {
  std::vector<float> v(128);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 7) - 3.0f;
  std::vector<float> w = v;
  HadamardRows(w.data(), 1, 128);
  double n1 = 0, n2 = 0;
  for (size_t i = 0; i < v.size(); ++i) n1 += v[i] * v[i], n2 += w[i] * w[i];
  EXPECT_NEAR(n1, n2, 1e-3);
  HadamardRows(w.data(), 1, 128);
  for (size_t i = 0; i < v.size(); ++i) EXPECT_NEAR(w[i], v[i], 1e-5);
}

TEST(CpuOpsTest, FaithfulFp8BlocksUsePowerOfTwoScales) {
  Numerics num{true};
  std::vector<float> x(64, 0.0f);
  x[0] = 448.0f * 2.0f;  // amax 896 -> scale 2: 896 / 2 = 448 exactly.
  x[1] = 3.1f;           // 3.1 / 2 = 1.55 -> FP8 1.5 -> 3.0.
  num.Fp8Blocks(x.data(), 1, 64, 64, 64);
  EXPECT_EQ(x[0], 896.0f);
  EXPECT_EQ(x[1], 3.0f);
  Numerics exact{false};
  std::vector<float> y = {3.1f};
  exact.Fp8Blocks(y.data(), 1, 1, 1, 1);
  EXPECT_EQ(y[0], 3.1f);
}

}  // namespace
}  // namespace v4serve::model::cpu
