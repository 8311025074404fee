// Expert-parallel MoE (model/cpu/expert_parallel.h) against the single-rank MoeForward: N ranks as threads
// of this process over the in-process all-to-all, each with its own rows, must produce MoeForward's output
// for those rows bit for bit, in both numeric modes, with score and hash routing and any wave count.
#include "model/cpu/expert_parallel.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/config.h"
#include "model/cpu/moe.h"

namespace v4serve::model::cpu {
namespace {

ModelConfig Config() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  absl::StatusOr<ModelConfig> c =
      LoadModelConfig(std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4");
  EXPECT_TRUE(c.ok()) << c.status();
  return *c;
}

Tensor Random(std::mt19937* rng, size_t n, float scale, bool quantized) {
  std::normal_distribution<float> dist(0.0f, scale);
  Tensor t(n);
  for (float& v : t) v = dist(*rng);
  t.quantized = quantized;
  return t;
}

BlockWeights Weights(const ModelConfig& c, std::mt19937* rng) {
  const size_t d = c.hidden_size, inter = c.moe_intermediate_size, ne = c.n_routed_experts;
  BlockWeights w;
  w.gate = Random(rng, ne * d, 0.1f, false);
  w.gate_bias = Random(rng, ne, 0.05f, false);
  for (size_t e = 0; e < ne; ++e) {
    w.experts.push_back({Random(rng, inter * d, 0.06f, true), Random(rng, d * inter, 0.08f, true),
                         Random(rng, inter * d, 0.06f, true)});
  }
  w.shared = {Random(rng, inter * d, 0.06f, true), Random(rng, d * inter, 0.08f, true),
              Random(rng, inter * d, 0.06f, true)};
  w.tid2eid.resize(static_cast<size_t>(c.vocab_size) * c.num_experts_per_tok);
  for (size_t t = 0; t < static_cast<size_t>(c.vocab_size); ++t) {
    for (int j = 0; j < c.num_experts_per_tok; ++j)
      w.tid2eid[t * c.num_experts_per_tok + j] = (t * 3 + j * 5) % ne;
  }
  return w;
}

struct Case {
  int ranks;
  int waves;
  bool faithful;
  bool hash;
};

class ExpertParallelTest : public ::testing::TestWithParam<Case> {};

TEST_P(ExpertParallelTest, EqualsTheSingleRankMoe) {
  const Case p = GetParam();
  const ModelConfig c = Config();
  std::mt19937 rng(7);
  const BlockWeights w = Weights(c, &rng);
  Numerics num;
  num.faithful = p.faithful;
  absl::StatusOr<ExpertPlacement> placement = ExpertPlacement::Contiguous(c.n_routed_experts, p.ranks);
  ASSERT_TRUE(placement.ok()) << placement.status();
  const int64_t d = c.hidden_size;
  // Each rank its own rows, of different counts (one rank with none).
  std::vector<int64_t> rows = {7, 0, 13, 5};
  std::vector<std::vector<float>> x(p.ranks);
  std::vector<std::vector<int32_t>> tokens(p.ranks);
  std::uniform_int_distribution<int32_t> tok(0, c.vocab_size - 1);
  for (int r = 0; r < p.ranks; ++r) {
    x[r] = Random(&rng, static_cast<size_t>(rows[r] * d), 1.0f, false);
    for (int64_t i = 0; i < rows[r]; ++i) tokens[r].push_back(tok(rng));
  }
  InProcessAllToAll a2a(p.ranks);
  std::vector<std::vector<float>> out(p.ranks);
  std::vector<ExpertLoad> load(p.ranks);
  std::vector<absl::Status> status(p.ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < p.ranks; ++r) {
    threads.emplace_back([&, r] {
      status[r] = ExpertParallelMoeForward(c, num, w, p.hash, *placement, r, &a2a, {.waves = p.waves},
                                           x[r].data(), tokens[r].data(), rows[r], &out[r], &load[r]);
    });
  }
  for (auto& t : threads) t.join();
  int64_t routed = 0, total_rows = 0;
  for (int r = 0; r < p.ranks; ++r) {
    ASSERT_TRUE(status[r].ok()) << status[r];
    std::vector<float> want;
    MoeForward(c, num, w, p.hash, x[r].data(), tokens[r].data(), rows[r], &want);
    ASSERT_EQ(out[r].size(), want.size());
    EXPECT_EQ(std::memcmp(out[r].data(), want.data(), want.size() * sizeof(float)), 0) << "rank " << r;
    for (int64_t n : load[r].rows_per_expert) routed += n;
    // A rank counts only its own experts.
    for (int e = 0; e < c.n_routed_experts; ++e) {
      if (placement->RankOf(e) != r) {
        EXPECT_EQ(load[r].rows_per_expert[e], 0);
      }
    }
    total_rows += rows[r];
  }
  EXPECT_EQ(routed, total_rows * c.num_experts_per_tok);
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertParallelTest,
                         ::testing::Values(Case{1, 1, false, false}, Case{2, 1, false, false},
                                           Case{2, 3, false, false}, Case{4, 2, false, false},
                                           Case{2, 1, true, false}, Case{4, 3, true, false},
                                           Case{2, 2, false, true}, Case{4, 1, true, true}),
                         [](const auto& info) {
                           const Case& p = info.param;
                           return "ep" + std::to_string(p.ranks) + "_waves" + std::to_string(p.waves) +
                                  (p.faithful ? "_faithful" : "_exact") + (p.hash ? "_hash" : "_score");
                         });

TEST(ExpertPlacementTest, RanksMustDivideTheExperts) {
  EXPECT_FALSE(ExpertPlacement::Contiguous(8, 3).ok());
  EXPECT_FALSE(ExpertPlacement::Contiguous(8, 0).ok());
  absl::StatusOr<ExpertPlacement> p = ExpertPlacement::Contiguous(256, 8);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->RankOf(0), 0);
  EXPECT_EQ(p->RankOf(31), 0);
  EXPECT_EQ(p->RankOf(32), 1);
  EXPECT_EQ(p->RankOf(255), 7);
}

}  // namespace
}  // namespace v4serve::model::cpu
