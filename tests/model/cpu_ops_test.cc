#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "model/cpu/compressor.h"
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

// The CUDA backend pools entries on the device and brings the host compressor state up to date by replaying
// only the last 2 * ratio rows of a chunk (overlap; ratio without) through CompressorWriteRow and
// CompressorCloseWindow, with scores already biased. That must leave exactly CompressorPush's state.
TEST(CompressorTest, ReplayingAChunksLastRowsLeavesPushsState) {
  const int64_t width = 16, rope_dim = 4;
  const RopeTable rope = MakeRopeTable(rope_dim, 10000.0, nullptr);
  const Numerics num{false};
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (const int64_t ratio : {4, 8}) {
    const bool overlap = ratio == 4;
    const int64_t row = (overlap ? 2 : 1) * width;
    CompressorWeights w;
    w.ape.resize(static_cast<size_t>(ratio * row));
    for (float& v : w.ape) v = nd(rng);
    w.norm.assign(static_cast<size_t>(width), 1.0f);
    for (const int64_t pos0 : {0, 3, 13, 16}) {
      for (const int64_t count : {1, 2, 5, 9, 30}) {
        CompressorState fresh;
        fresh.ratio = ratio;
        fresh.width = width;
        fresh.overlap = overlap;
        fresh.kv.assign(static_cast<size_t>(ratio * row), 0.0f);
        fresh.score = fresh.kv;
        if (overlap) fresh.prev_kv = fresh.prev_score = fresh.kv;
        std::vector<float> kv(static_cast<size_t>((pos0 + count) * row)), sc(kv.size());
        for (float& v : kv) v = nd(rng);
        for (float& v : sc) v = nd(rng);
        CompressorState pushed = fresh;
        std::vector<float> entries;
        for (int64_t p = 0; p < pos0; ++p) {
          CompressorPush(w, rope, rope_dim, 1e-6, num, false, &kv[p * row], &sc[p * row], p, &pushed,
                         &entries);
        }
        CompressorState replayed = pushed;
        for (int64_t p = pos0; p < pos0 + count; ++p) {
          CompressorPush(w, rope, rope_dim, 1e-6, num, false, &kv[p * row], &sc[p * row], p, &pushed,
                         &entries);
        }
        const int64_t keep = std::min(count, overlap ? 2 * ratio : ratio);
        for (int64_t p = pos0 + count - keep; p < pos0 + count; ++p) {
          std::vector<float> biased(static_cast<size_t>(row));
          for (int64_t f = 0; f < row; ++f) biased[f] = sc[p * row + f] + w.ape[(p % ratio) * row + f];
          if (CompressorWriteRow(&kv[p * row], biased.data(), nullptr, p, &replayed)) {
            CompressorCloseWindow(&replayed);
          }
        }
        EXPECT_TRUE(replayed == pushed) << "ratio " << ratio << " pos0 " << pos0 << " count " << count;
      }
    }
  }
}

}  // namespace
}  // namespace v4serve::model::cpu
