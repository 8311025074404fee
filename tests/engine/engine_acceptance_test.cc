// The acceptance tests of issue 6 on the tiny checkpoint: batched = one by one, prefix reuse computes
// only the tail, and more requests than KV capacity all finish correctly through preemption.
#include <random>

#include "engine/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::RunToCompletion;
using testing::TinyModel;

std::unique_ptr<Engine> MakeEngine(int64_t num_blocks, int64_t step_tokens, PreemptionMode mode,
                                   int64_t swap_bytes = int64_t{1} << 30) {
  EngineOptions o;
  o.scheduler.swap_space_bytes = swap_bytes;
  o.kv.num_blocks = num_blocks;
  o.scheduler.max_step_tokens = step_tokens;
  o.scheduler.preemption = mode;
  o.model_fingerprint = 42;
  auto e = Engine::Create(&TinyModel(), o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : nullptr;
}

TEST(EngineAcceptanceTest, ThirtyTwoConcurrentMixedLengthsMatchOneByOne) {
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int32_t> max_tokens;
  for (int i = 0; i < 32; ++i) {
    prompts.push_back(RandomTokens(&rng, 3 + static_cast<int64_t>(rng() % 200)));
    max_tokens.push_back(static_cast<int32_t>(4 + rng() % 9));
  }
  std::unique_ptr<Engine> engine = MakeEngine(512, 256, PreemptionMode::kRecompute);
  Collected got;
  for (int i = 0; i < 32; ++i) {
    ASSERT_TRUE(engine->Submit(GreedyRequest("r" + std::to_string(i), prompts[i], max_tokens[i], &got)).ok());
  }
  RunToCompletion(engine.get());
  for (int i = 0; i < 32; ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_EQ(got.Tokens(id), ReferenceGreedy(prompts[i], max_tokens[i])) << id;
    ASSERT_NE(got.Final(id), nullptr);
    EXPECT_EQ(got.Final(id)->finish, FinishReason::kLength);
  }
  // Decodes really were batched (fewer decode steps than decoded tokens).
  EXPECT_LT(engine->stats().steps, engine->stats().decode_tokens_computed);
  EXPECT_EQ(engine->stats().kv_blocks_used,
            engine->stats().kv_blocks_cached);  // Only the cache holds blocks.
}

TEST(EngineAcceptanceTest, SharedPrefixComputesOnlyTheTailAndMatches) {
  std::mt19937 rng(11);
  const std::vector<int32_t> prefix = RandomTokens(&rng, 1024);
  std::vector<int32_t> a = prefix, b = prefix;
  for (int32_t t : RandomTokens(&rng, 37)) a.push_back(t);
  for (int32_t t : RandomTokens(&rng, 45)) b.push_back(t);
  std::unique_ptr<Engine> engine = MakeEngine(64, 512, PreemptionMode::kRecompute);
  Collected got;
  ASSERT_TRUE(engine->Submit(GreedyRequest("a", a, 6, &got)).ok());
  RunToCompletion(engine.get());
  const int64_t computed_before = engine->stats().prefill_tokens_computed;
  EXPECT_EQ(computed_before, static_cast<int64_t>(a.size()));
  ASSERT_TRUE(engine->Submit(GreedyRequest("b", b, 6, &got)).ok());
  RunToCompletion(engine.get());
  EXPECT_EQ(engine->stats().prefill_tokens_computed - computed_before, 45);  // Only the uncached tail.
  EXPECT_EQ(engine->stats().prefix_hit_tokens, 1024);
  EXPECT_EQ(got.Final("b")->cached_prompt_tokens, 1024);
  EXPECT_EQ(got.Tokens("b"), ReferenceGreedy(b, 6));
  EXPECT_EQ(got.Tokens("a"), ReferenceGreedy(a, 6));
  // Another tenant does not share the prefix.
  EngineRequest c = GreedyRequest("c", b, 6, &got);
  c.tenant_salt = 99;
  ASSERT_TRUE(engine->Submit(std::move(c)).ok());
  RunToCompletion(engine.get());
  EXPECT_EQ(got.Final("c")->cached_prompt_tokens, 0);
  EXPECT_EQ(got.Tokens("c"), got.Tokens("b"));
}

void RunOverCapacity(PreemptionMode mode, int64_t swap_bytes = int64_t{1} << 30) {
  std::mt19937 rng(13);
  // 12 requests of 2-3 blocks each at their end, on a pool of 8 blocks: at most ~3 fit at once.
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int32_t> max_tokens;
  for (int i = 0; i < 12; ++i) {
    prompts.push_back(RandomTokens(&rng, 100 + static_cast<int64_t>(rng() % 150)));
    max_tokens.push_back(static_cast<int32_t>(20 + rng() % 40));
  }
  std::unique_ptr<Engine> engine = MakeEngine(8, 256, mode, swap_bytes);
  Collected got;
  for (int i = 0; i < 12; ++i) {
    ASSERT_TRUE(engine->Submit(GreedyRequest("r" + std::to_string(i), prompts[i], max_tokens[i], &got)).ok());
  }
  RunToCompletion(engine.get());
  EXPECT_GT(engine->stats().preemptions, 0);
  if (mode == PreemptionMode::kSwap && swap_bytes > 0) {
    EXPECT_GT(engine->stats().swap_outs, 0);
  } else {
    EXPECT_EQ(engine->stats().swap_outs, 0);
  }
  for (int i = 0; i < 12; ++i) {
    const std::string id = "r" + std::to_string(i);
    ASSERT_NE(got.Final(id), nullptr) << id << " lost";
    EXPECT_EQ(got.Final(id)->finish, FinishReason::kLength) << id;
    EXPECT_EQ(got.Tokens(id), ReferenceGreedy(prompts[i], max_tokens[i])) << id;
  }
  EXPECT_EQ(engine->stats().running + engine->stats().waiting + engine->stats().swapped, 0);
}

TEST(EngineAcceptanceTest, MoreRequestsThanKvCapacityAllCompleteByRecompute) {
  RunOverCapacity(PreemptionMode::kRecompute);
}

TEST(EngineAcceptanceTest, MoreRequestsThanKvCapacityAllCompleteBySwap) {
  RunOverCapacity(PreemptionMode::kSwap);
}

TEST(EngineAcceptanceTest, SwapWithoutHostSpaceFallsBackToRecompute) {
  RunOverCapacity(PreemptionMode::kSwap, /*swap_bytes=*/0);
}

}  // namespace
}  // namespace v4serve::engine
