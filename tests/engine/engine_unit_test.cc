// Unit tests of the engine's parts: sampling, exact block round trips of the model state, the KV cache
// manager's handling of corrupt cached blocks, chunked prefill under the step budget, stop rules,
// cancellation and request validation.
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "engine/kv_cache_manager.h"
#include "engine/sampler.h"
#include "engine/state_blocks.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::GreedyRequest;
using ::testing::HasSubstr;
using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::RunToCompletion;
using testing::TinyModel;

TEST(SamplerTest, GreedyTakesLowestIdOnTiesAndReportsLogprobs) {
  SamplingParams p;
  p.top_logprobs = 2;
  Sampler s(p, 1);
  std::vector<float> logits = {1.0f, 3.0f, 3.0f, 0.0f};
  SampledToken t = s.Sample(logits);
  EXPECT_EQ(t.id, 1);
  ASSERT_EQ(t.top.size(), 2u);
  EXPECT_EQ(t.top[0].first, 1);
  EXPECT_EQ(t.top[1].first, 2);
  double total = 0;
  for (float x : logits) total += std::exp(x - 3.0);
  EXPECT_NEAR(t.logprob, -std::log(total), 1e-5);
}

TEST(SamplerTest, SeedReproducesAndFiltersCut) {
  std::vector<float> logits = {2.0f, 1.9f, 1.8f, -5.0f, 1.7f, -9.0f};
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 3;
  Sampler a(p, 9), b(p, 9);
  std::vector<int32_t> sa, sb;
  for (int i = 0; i < 300; ++i) {
    sa.push_back(a.Sample(logits).id);
    sb.push_back(b.Sample(logits).id);
  }
  EXPECT_EQ(sa, sb);
  for (int32_t t : sa) EXPECT_LT(t, 3);
  EXPECT_GT(std::count(sa.begin(), sa.end(), 2), 0);
  // min_p 0.95 keeps only tokens within 5% of the best: just token 0.
  p.top_k = 0;
  p.min_p = 0.95f;
  Sampler m(p, 3);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(m.Sample(logits).id, 0);
  // top_p tiny keeps only the best.
  p.min_p = 0;
  p.top_p = 0.01f;
  Sampler tp(p, 3);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(tp.Sample(logits).id, 0);
}

TEST(SamplerTest, PenaltiesSteerAwayFromRepeats) {
  std::vector<float> logits = {2.0f, 1.5f, 1.0f};
  SamplingParams p;
  p.repetition_penalty = 2.0f;  // Prompt token 0: 2.0 -> 1.0, below token 1.
  Sampler r(p, 0);
  const int32_t prompt[] = {0};
  r.AddPromptTokens(prompt);
  EXPECT_EQ(r.Sample(logits).id, 1);
  p = SamplingParams();
  p.frequency_penalty = 0.3f;  // Each emission of the best lowers it by 0.3.
  Sampler f(p, 0);
  std::vector<int32_t> got;
  got.reserve(4);
  for (int i = 0; i < 4; ++i) got.push_back(f.Sample(logits).id);
  EXPECT_EQ(got, (std::vector<int32_t>{0, 0, 1, 0}));
  p = SamplingParams();
  p.presence_penalty = 0.6f;  // Once emitted, a token loses 0.6 once.
  Sampler pr(p, 0);
  got.clear();
  for (int i = 0; i < 3; ++i) got.push_back(pr.Sample(logits).id);
  EXPECT_EQ(got, (std::vector<int32_t>{0, 1, 0}));
}

// The definition Sample implements, written out plainly: sort the whole vocabulary (larger logit first,
// lower id on ties), softmax with temperature over the top-k, the smallest prefix reaching top_p, min_p
// relative to the best, one 53-bit draw over what is left. Sample sorts only as far as it walks and sums
// the uncut normalizer in id order; picks must be the same.
int32_t ReferenceDraw(const std::vector<float>& x, const SamplingParams& p, std::mt19937_64* rng) {
  std::vector<int32_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return x[a] != x[b] ? x[a] > x[b] : a < b; });
  size_t keep = p.top_k > 0 ? std::min(x.size(), static_cast<size_t>(p.top_k)) : x.size();
  std::vector<double> pr(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i)
    sum += pr[i] = std::exp(static_cast<double>((x[idx[i]] - x[idx[0]]) / p.temperature));
  if (p.top_p < 1.0f) {
    double acc = 0;
    size_t k = 0;
    while (k < keep && acc < p.top_p) acc += pr[k++] / sum;
    keep = k;
  }
  if (p.min_p > 0.0f) {
    size_t k = 1;
    while (k < keep && pr[k] >= p.min_p) ++k;
    keep = k;
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += pr[i];
  const double u = static_cast<double>((*rng)() >> 11) * 0x1.0p-53 * total;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    if (u < (acc += pr[i])) return idx[i];
  }
  return idx[keep - 1];
}

TEST(SamplerTest, PicksWhatTheFullSortDefinitionPicks) {
  std::mt19937 gen(5);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::vector<float> x(20000);
  for (float& v : x) v = std::round(nd(gen) * 8) / 8;  // Rounded: many exact ties.
  struct Case {
    float temperature, top_p, min_p;
    int32_t top_k;
  };
  for (const Case& c :
       {Case{0.7f, 1.0f, 0.0f, 0}, Case{2.5f, 1.0f, 0.0f, 0}, Case{1.0f, 0.9f, 0.0f, 0},
        Case{1.3f, 0.5f, 0.0f, 40}, Case{1.0f, 1.0f, 0.05f, 0}, Case{4.0f, 0.99f, 0.001f, 5000},
        Case{30.0f, 1.0f, 0.0f, 0}, Case{0.9f, 0.95f, 0.0f, 1}}) {
    SCOPED_TRACE(::testing::Message() << "t " << c.temperature << " top_p " << c.top_p << " min_p " << c.min_p
                                      << " top_k " << c.top_k);
    SamplingParams p;
    p.temperature = c.temperature;
    p.top_p = c.top_p;
    p.min_p = c.min_p;
    p.top_k = c.top_k;
    Sampler s(p, 77);
    std::mt19937_64 rng(77);
    std::vector<int32_t> got, want;
    for (int i = 0; i < 60; ++i) {
      got.push_back(s.Sample(x).id);
      want.push_back(ReferenceDraw(x, p, &rng));
    }
    EXPECT_EQ(got, want);
    // Not always the best token (the draw does reach down the order), except where the cut leaves one.
    if (c.top_k != 1) {
      EXPECT_GT(std::set<int32_t>(got.begin(), got.end()).size(), 1u);
    }
  }
}

// SampleTop (the row's best m logits and the softmax's sums, the whole row only when a walk goes past them)
// gives what Sample gives on the whole row: ids, logprobs, top logprobs, and the same random stream after.
// m = 4 makes most draws fall back to the whole row, 64 some, vocab none.
TEST(SamplerTest, SamplingFromTheTopLogitsEqualsSamplingTheRow) {
  std::mt19937 gen(8);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const int64_t vocab = 3000, rows = 3;
  std::vector<float> x(static_cast<size_t>(rows * vocab));
  for (float& v : x) v = std::round(nd(gen) * 4) / 4;  // Many exact ties.
  struct Case {
    float temperature, top_p, min_p;
    int32_t top_k, top_logprobs;
    bool logprobs;
  };
  for (const int64_t m : {int64_t{4}, int64_t{64}, vocab}) {
    for (const Case& c : {Case{0.0f, 1.0f, 0.0f, 0, 3, true}, Case{0.8f, 1.0f, 0.0f, 0, 0, false},
                          Case{1.5f, 0.9f, 0.0f, 0, 2, true}, Case{1.0f, 1.0f, 0.02f, 3, 0, true},
                          Case{3.0f, 0.7f, 0.0f, 0, 0, false}}) {
      SCOPED_TRACE(::testing::Message() << "m " << m << " t " << c.temperature << " top_p " << c.top_p);
      SamplingParams p;
      p.temperature = c.temperature;
      p.top_p = c.top_p;
      p.min_p = c.min_p;
      p.top_k = c.top_k;
      p.top_logprobs = c.top_logprobs;
      p.logprobs = c.logprobs;
      Sampler a(p, 41), b(p, 41);
      ASSERT_EQ(b.SamplesFromTop(m), c.top_k <= m && c.top_logprobs < m);
      if (!b.SamplesFromTop(m)) continue;
      const std::vector<float> temps(static_cast<size_t>(rows), c.temperature);
      const model::TopLogits top = model::TopOfRows(x, rows, temps, m);
      for (int i = 0; i < 30; ++i) {
        const int64_t r = i % rows;
        const SampledToken want =
            a.Sample(absl::MakeConstSpan(x).subspan(static_cast<size_t>(r * vocab), vocab));
        absl::StatusOr<SampledToken> got = b.SampleTop(top, r);
        ASSERT_TRUE(got.ok()) << got.status();
        EXPECT_EQ(got->id, want.id);
        EXPECT_EQ(got->logprob, want.logprob);
        EXPECT_EQ(got->top, want.top);
      }
    }
  }
  // Penalties move logits outside the candidates: not from the top, and SampleTop then reads the whole row
  // (same tokens as Sample, penalties applied and recorded).
  SamplingParams p;
  p.temperature = 1.0f;
  p.presence_penalty = 0.5f;
  p.repetition_penalty = 1.3f;
  Sampler a(p, 1), b(p, 1);
  EXPECT_FALSE(b.SamplesFromTop(256));
  const std::vector<int32_t> prompt = {5, 17, 2000};
  a.AddPromptTokens(prompt);
  b.AddPromptTokens(prompt);
  const model::TopLogits top =
      model::TopOfRows(x, rows, std::vector<float>(static_cast<size_t>(rows), 1.0f), 8);
  for (int i = 0; i < 12; ++i) {
    const SampledToken want = a.Sample(absl::MakeConstSpan(x).subspan(0, static_cast<size_t>(vocab)));
    absl::StatusOr<SampledToken> got = b.SampleTop(top, 0);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->id, want.id);
  }
}

TEST(SamplerTest, ValidateNamesTheField) {
  SamplingParams p;
  p.top_p = 0;
  EXPECT_THAT(p.Validate(512).message(), HasSubstr("top_p"));
  p = SamplingParams();
  p.stop_token_ids = {600};
  EXPECT_THAT(p.Validate(512).message(), HasSubstr("stop_token_ids"));
  p = SamplingParams();
  p.n = 0;
  EXPECT_THAT(p.Validate(512).message(), HasSubstr("n"));
  p = SamplingParams();
  p.repetition_penalty = std::numeric_limits<float>::infinity();
  EXPECT_THAT(p.Validate(512).message(), HasSubstr("repetition_penalty"));
  p.repetition_penalty = std::nanf("");
  EXPECT_THAT(p.Validate(512).message(), HasSubstr("repetition_penalty"));
}

TEST(StateBlocksTest, StateRestoredFromBlocksIsBitIdentical) {
  const model::Model& m = TinyModel();
  std::mt19937 rng(3);
  const std::vector<int32_t> tokens = RandomTokens(&rng, 384);
  auto layout = KvLayoutFor(m.config(), 5);
  ASSERT_TRUE(layout.ok()) << layout.status();
  std::vector<kvstore::KvBlock> blocks;
  model::SequenceState s = m.NewState();
  for (int b = 0; b < 3; ++b) {
    ASSERT_TRUE(m.Prefill(&s, absl::MakeConstSpan(tokens).subspan(b * 128, 128)).ok());
    auto block =
        ExtractBlock(m.config(), *layout, s, b, absl::MakeConstSpan(tokens).subspan(b * 128, 128), 0);
    ASSERT_TRUE(block.ok()) << block.status();
    // Through the codec, as the cache stores it.
    auto decoded = kvstore::DecodeKvBlock(*layout, *kvstore::EncodeKvBlock(*layout, *block));
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    blocks.push_back(*decoded);
  }
  auto restored = RestoreState(m.config(), *layout, blocks);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_TRUE(*restored == s);
  // And it continues exactly: the same logits for the next chunk.
  const int32_t next[] = {7, 8, 9};
  auto a = m.Prefill(&s, next);
  auto b = m.Prefill(&*restored, next);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  blocks[1].block_index = 5;
  EXPECT_FALSE(RestoreState(m.config(), *layout, blocks).ok());
}

TEST(KvCacheManagerTest, CorruptCachedBlockIsAMissNotWrongOutput) {
  std::mt19937 rng(5);
  std::vector<int32_t> prompt = RandomTokens(&rng, 300);
  EngineOptions o;
  o.kv.num_blocks = 16;
  auto engine = Engine::Create(&TinyModel(), o);
  ASSERT_TRUE(engine.ok());
  Collected got;
  ASSERT_TRUE((*engine)->Submit(GreedyRequest("a", prompt, 4, &got)).ok());
  RunToCompletion(engine->get());
  EXPECT_EQ((*engine)->stats().kv_blocks_cached, 2);

  // The same through a KvCacheManager whose stored bytes we corrupt.
  auto layout = KvLayoutFor(TinyModel().config(), 0);
  KvCacheOptions ko;
  ko.num_blocks = 8;
  KvCacheManager kv(TinyModel().config(), *layout, ko);
  Sequence first;
  first.tokens = prompt;
  ASSERT_TRUE(kv.Admit(&first).ok());
  for (int b = 0; b < 2; ++b) {
    ASSERT_TRUE(TinyModel().Prefill(&first.state, absl::MakeConstSpan(prompt).subspan(b * 128, 128)).ok());
    kv.OnBlockBoundary(&first);
  }
  EXPECT_EQ(first.cached_blocks, 2);
  EXPECT_EQ(kv.blocks_cached(), 2);
  kvstore::BlockPool* pool = kv.mutable_pool_for_testing();
  const kvstore::BlockId second_block = first.blocks[1];
  std::string bytes = *pool->Get(second_block);
  bytes[bytes.size() / 2] ^= 0x40;
  ASSERT_TRUE(pool->Put(second_block, bytes).ok());
  kv.Release(&first);

  Sequence again;
  again.tokens = prompt;
  auto cached = kv.Admit(&again);
  ASSERT_TRUE(cached.ok());
  EXPECT_EQ(*cached, 128);  // Block 0 is good, block 1 fails its checksum and is recomputed.
  EXPECT_EQ(again.state.position, 128);
  EXPECT_EQ(kv.blocks_cached(), 1);  // The corrupt block left the cache.
  kv.Release(&again);
}

TEST(EngineTest, ChoicesOfOneRequestShareOnePromptComputation) {
  std::mt19937 rng(23);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 200);
  EngineOptions o;
  o.kv.num_blocks = 16;
  auto engine = Engine::Create(&TinyModel(), o);
  ASSERT_TRUE(engine.ok());
  Collected got;
  EngineRequest greedy = GreedyRequest("g", prompt, 5, &got);
  greedy.sampling.n = 4;
  ASSERT_TRUE((*engine)->Submit(std::move(greedy)).ok());
  RunToCompletion(engine->get());
  EXPECT_EQ((*engine)->stats().prefill_tokens_computed, 200);  // Once, not four times.
  const std::vector<int32_t> ref = ReferenceGreedy(prompt, 5);
  for (int32_t c = 0; c < 4; ++c) {
    EXPECT_EQ(got.Tokens("g", c), ref) << c;
    ASSERT_NE(got.Final("g", c), nullptr);
    EXPECT_EQ(got.Final("g", c)->finish, FinishReason::kLength);
  }
  // Sampled choices differ from each other and are reproducible by seed.
  auto sampled = [&](const std::string& id) {
    EngineRequest r = GreedyRequest(id, prompt, 8, &got);
    r.sampling.n = 3;
    r.sampling.temperature = 1.5f;
    r.sampling.seed = 5;
    EXPECT_TRUE((*engine)->Submit(std::move(r)).ok());
    RunToCompletion(engine->get());
    return std::vector<std::vector<int32_t>>{got.Tokens(id, 0), got.Tokens(id, 1), got.Tokens(id, 2)};
  };
  const auto a = sampled("s1"), b = sampled("s2");
  EXPECT_EQ(a, b);
  EXPECT_NE(a[0], a[1]);
  EXPECT_NE(a[1], a[2]);
  // Cancelling before the prompt is computed ends every choice.
  EngineRequest c = GreedyRequest("c", prompt, 5, &got);
  c.sampling.n = 3;
  ASSERT_TRUE((*engine)->Submit(std::move(c)).ok());
  ASSERT_TRUE((*engine)->Cancel("c").ok());
  for (int32_t i = 0; i < 3; ++i) {
    ASSERT_NE(got.Final("c", i), nullptr) << i;
    EXPECT_EQ(got.Final("c", i)->finish, FinishReason::kCancelled);
  }
  EXPECT_FALSE((*engine)->HasWork());
  EXPECT_EQ((*engine)->stats().cancelled_sequences, 3);
}

// Argmax-only batches take token ids from the model (Model::DecodeChunksGreedy); asking for logprobs
// sends the same request through the logits and the sampler. Both give the reference's tokens.
TEST(EngineTest, GreedyBatchesWithAndWithoutLogprobsAgree) {
  std::mt19937 rng(29);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 150);
  const std::vector<int32_t> ref = ReferenceGreedy(prompt, 12);
  for (const bool logprobs : {false, true}) {
    EngineOptions o;
    o.kv.num_blocks = 16;
    auto engine = Engine::Create(&TinyModel(), o);
    ASSERT_TRUE(engine.ok());
    Collected got;
    EngineRequest r = GreedyRequest("g", prompt, 12, &got);
    r.sampling.logprobs = logprobs;
    ASSERT_TRUE((*engine)->Submit(std::move(r)).ok());
    RunToCompletion(engine->get());
    EXPECT_EQ(got.Tokens("g"), ref) << (logprobs ? "with logprobs" : "ids only");
    int with_logprob = 0, tokens = 0;
    for (const SequenceOutput& out : got.outputs[{"g", 0}]) {
      if (!out.token) continue;
      ++tokens;
      with_logprob += out.token->logprob != 0.0f;
    }
    EXPECT_EQ(tokens, 12);
    EXPECT_EQ(with_logprob, logprobs ? 12 : 0);  // Reported only when asked for.
  }
}

// Sampled batches without penalties take the candidates path (Model::DecodeChunksTop, Sampler::SampleTop);
// with a penalized sequence in the batch, the logits path (its rows drawn on the engine's thread, or on two
// threads). Either way each sequence gets exactly the tokens
// its own sampler draws from its own logits, as computed here without the engine (prefill, then one decode
// step at a time, Sampler::Sample on the whole row).
TEST(EngineTest, SampledBatchesDrawFromTheirOwnRows) {
  const model::Model& m = TinyModel();
  std::mt19937 rng(31);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back(RandomTokens(&rng, 20 + 37 * i));
  auto params = [](int i, bool penalty) {
    SamplingParams p;
    p.temperature = 0.6f + 0.3f * static_cast<float>(i);
    p.top_p = i == 2 ? 0.8f : 1.0f;
    p.top_k = i == 3 ? 20 : 0;
    p.logprobs = i == 1;
    p.seed = 100 + static_cast<uint64_t>(i);
    p.max_tokens = 10;
    if (penalty && i == 0) p.frequency_penalty = 0.5f;
    return p;
  };
  for (const int mode : {0, 1, 2}) {
    const bool penalty = mode > 0;
    SCOPED_TRACE(mode == 0   ? "candidates path"
                 : mode == 1 ? "logits path (one penalized sequence)"
                             : "logits path, rows drawn on 2 threads");
    EngineOptions o;
    o.kv.num_blocks = 32;
    if (mode == 2) {
      o.sampling_threads = 2;
      o.sampling_threads_min_vocab = 0;  // The tiny vocabulary too.
    }
    auto engine = Engine::Create(&m, o);
    ASSERT_TRUE(engine.ok());
    Collected got;
    for (int i = 0; i < 4; ++i) {
      EngineRequest r = GreedyRequest(absl::StrCat("s", i), prompts[i], 10, &got);
      r.sampling = params(i, penalty);
      r.sampling.ignore_eos = true;
      ASSERT_TRUE((*engine)->Submit(std::move(r)).ok());
    }
    RunToCompletion(engine->get());
    for (int i = 0; i < 4; ++i) {
      const SamplingParams p = params(i, penalty);
      Sampler sampler(p, *p.seed);
      sampler.AddPromptTokens(prompts[i]);
      model::SequenceState st = model::NewSequenceState(m.config());
      absl::StatusOr<std::vector<float>> logits = m.Prefill(&st, prompts[i], false, nullptr);
      ASSERT_TRUE(logits.ok());
      std::vector<int32_t> want;
      for (int t = 0; t < 10; ++t) {
        want.push_back(sampler.Sample(*logits).id);
        if (t + 1 < 10) {
          model::SequenceState* const one[] = {&st};
          const int32_t next[] = {want.back()};
          logits = m.Decode(one, next);
          ASSERT_TRUE(logits.ok());
        }
      }
      EXPECT_EQ(got.Tokens(absl::StrCat("s", i)), want) << "sequence " << i;
    }
  }
}

TEST(EngineTest, OptionsAreValidatedOnce) {
  EngineOptions o;
  o.scheduler.max_step_tokens = 8;  // Fewer than max_running (64): decoders could starve.
  EXPECT_THAT(Engine::Create(&TinyModel(), o).status().message(), HasSubstr("max_step_tokens"));
  o = EngineOptions();
  o.kv.num_blocks = 0;
  EXPECT_EQ(Engine::Create(&TinyModel(), o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(nullptr, EngineOptions()).status().code(), absl::StatusCode::kInvalidArgument);
  o = EngineOptions();
  o.sampling_threads = 0;
  EXPECT_THAT(Engine::Create(&TinyModel(), o).status().message(), HasSubstr("sampling_threads"));
}

TEST(EngineTest, ChunkedPrefillRespectsTheStepBudget) {
  std::mt19937 rng(8);
  EngineOptions o;
  o.kv.num_blocks = 16;
  o.scheduler.max_step_tokens = 64;
  auto engine = Engine::Create(&TinyModel(), o);
  ASSERT_TRUE(engine.ok());
  Collected got;
  std::vector<int32_t> p1 = RandomTokens(&rng, 300), p2 = RandomTokens(&rng, 90);
  ASSERT_TRUE((*engine)->Submit(GreedyRequest("a", p1, 5, &got)).ok());
  ASSERT_TRUE((*engine)->Submit(GreedyRequest("b", p2, 5, &got)).ok());
  int64_t steps = 0;
  while ((*engine)->HasWork()) {
    const int64_t before =
        (*engine)->stats().prefill_tokens_computed + (*engine)->stats().decode_tokens_computed;
    ASSERT_TRUE((*engine)->Step().ok());
    const int64_t after =
        (*engine)->stats().prefill_tokens_computed + (*engine)->stats().decode_tokens_computed;
    EXPECT_LE(after - before, 64);
    ASSERT_LT(++steps, 1000);
  }
  EXPECT_GE(steps, 390 / 64);
  EXPECT_EQ(got.Tokens("a"), ReferenceGreedy(p1, 5));
  EXPECT_EQ(got.Tokens("b"), ReferenceGreedy(p2, 5));
}

TEST(EngineTest, StopTokenCancelAndValidation) {
  std::mt19937 rng(21);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 60);
  const std::vector<int32_t> ref = ReferenceGreedy(prompt, 6);
  EngineOptions o;
  o.kv.num_blocks = 8;
  auto engine = Engine::Create(&TinyModel(), o);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  Collected got;
  // Stops after emitting the stop token (the reference's third token).
  EngineRequest stop = GreedyRequest("stop", prompt, 6, &got);
  stop.sampling.stop_token_ids = {ref[2]};
  ASSERT_TRUE(e.Submit(std::move(stop)).ok());
  RunToCompletion(&e);
  const size_t first = static_cast<size_t>(std::find(ref.begin(), ref.end(), ref[2]) - ref.begin());
  EXPECT_EQ(got.Tokens("stop"), std::vector<int32_t>(ref.begin(), ref.begin() + first + 1));
  EXPECT_EQ(got.Final("stop")->finish, FinishReason::kStop);

  // Cancel frees the blocks at once.
  const int64_t cached = e.stats().kv_blocks_cached;
  ASSERT_TRUE(e.Submit(GreedyRequest("long", RandomTokens(&rng, 200), 500, &got)).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(e.Step().ok());
  EXPECT_GT(e.stats().kv_blocks_used, e.stats().kv_blocks_cached);
  ASSERT_TRUE(e.Cancel("long").ok());
  EXPECT_EQ(e.stats().running, 0);
  EXPECT_EQ(e.stats().kv_blocks_used, e.stats().kv_blocks_cached);
  EXPECT_GE(e.stats().kv_blocks_cached, cached);
  EXPECT_EQ(got.Final("long")->finish, FinishReason::kCancelled);
  EXPECT_FALSE(e.HasWork());
  EXPECT_EQ(e.Cancel("long").code(), absl::StatusCode::kNotFound);

  // Requests that could never fit are refused, not left to hang.
  EXPECT_EQ(e.Submit(GreedyRequest("huge", prompt, 8 * 128, &got)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e.Submit(GreedyRequest("bad", {5, 700}, 3, &got)).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(e.Submit(GreedyRequest("dup", prompt, 3, &got)).ok());
  EXPECT_EQ(e.Submit(GreedyRequest("dup", prompt, 3, &got)).code(), absl::StatusCode::kAlreadyExists);
  RunToCompletion(&e);
}

}  // namespace
}  // namespace v4serve::engine
