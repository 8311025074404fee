// MTP speculative decoding in the engine (EngineOptions::mtp): exact rollback of a rejected draft token,
// greedy output identical with and without MTP (and to model::Generate) across chunked prefill, block
// boundaries, concurrency and preemption, consistent counters, and their Prometheus export.
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/engine_metrics.h"
#include "gtest/gtest.h"
#include "model/state_rollback.h"
#include "prometheus/registry.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::RunToCompletion;
using testing::TinyDir;
using testing::TinyModel;

const model::Model& TinyMtpModel() {
  static const model::Model* m = [] {
    model::ModelOptions o;
    o.load_mtp = true;
    auto loaded = model::Model::Load(TinyDir(), o);
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return loaded->release();
  }();
  return *m;
}

TEST(TokenUndoTest, UndoingTheLastTokenGivesTheStateThatNeverSawIt) {
  const model::Model& m = TinyModel();
  std::mt19937 rng(3);
  const std::vector<int32_t> tokens = RandomTokens(&rng, 150);
  model::SequenceState s = m.NewState();  // Consumed tokens[0, p).
  // Every position up to 149 crosses the window (16), ratio-4 and ratio-16 compressor boundaries many
  // times. As in the engine: save at p for p + 1, consume two tokens, undo one.
  for (int64_t p = 0; p + 1 < static_cast<int64_t>(tokens.size()); ++p) {
    absl::StatusOr<model::TokenUndo> undo = model::SaveTokenUndo(m.config(), s, p + 1);
    ASSERT_TRUE(undo.ok()) << undo.status();
    model::SequenceState spec = s;
    ASSERT_TRUE(m.Prefill(&spec, absl::MakeConstSpan(tokens).subspan(p, 2)).ok());
    ASSERT_TRUE(m.Prefill(&s, absl::MakeConstSpan(tokens).subspan(p, 1)).ok());
    ASSERT_TRUE(model::UndoLastToken(*undo, &spec).ok());
    ASSERT_TRUE(spec == s) << "position " << p;
  }
  // Saved for a position the state cannot reach with one token in between; applied to the wrong state.
  EXPECT_FALSE(model::SaveTokenUndo(m.config(), s, s.position + 2).ok());
  absl::StatusOr<model::TokenUndo> undo = model::SaveTokenUndo(m.config(), s, s.position);
  ASSERT_TRUE(undo.ok());
  EXPECT_FALSE(model::UndoLastToken(*undo, &s).ok());
}

TEST(DecodeChunksTest, ChunksOfSeveralSequencesMatchOneByOne) {
  const model::Model& m = TinyModel();
  std::mt19937 rng(9);
  const std::vector<int32_t> a = RandomTokens(&rng, 21), b = RandomTokens(&rng, 40),
                             next = RandomTokens(&rng, 3);
  model::SequenceState sa = m.NewState(), sb = m.NewState();
  ASSERT_TRUE(m.Prefill(&sa, a).ok());
  ASSERT_TRUE(m.Prefill(&sb, b).ok());
  model::SequenceState ra = sa, rb = sb;
  std::vector<float> streams;
  absl::StatusOr<std::vector<float>> got = m.DecodeChunks(std::vector<model::SequenceState*>{&sa, &sb},
                                                          std::vector<int64_t>{2, 1}, next, &streams);
  ASSERT_TRUE(got.ok()) << got.status();
  absl::StatusOr<std::vector<float>> want_a =
      m.Prefill(&ra, absl::MakeConstSpan(next).subspan(0, 2), /*all_logits=*/true);
  absl::StatusOr<std::vector<float>> want_b = m.Decode(std::vector<model::SequenceState*>{&rb}, {next[2]});
  ASSERT_TRUE(want_a.ok() && want_b.ok());
  std::vector<float> want = *want_a;
  want.insert(want.end(), want_b->begin(), want_b->end());
  EXPECT_EQ(*got, want);
  EXPECT_TRUE(sa == ra);
  EXPECT_TRUE(sb == rb);
  EXPECT_EQ(streams.size(), static_cast<size_t>(3 * m.config().hc_mult * m.config().hidden_size));
  EXPECT_FALSE(m.DecodeChunks(std::vector<model::SequenceState*>{&sa}, std::vector<int64_t>{2}, {1}).ok());
}

TEST(MtpDraftBatchTest, BatchedDraftsMatchOneByOne) {
  const model::Model& m = TinyMtpModel();
  std::mt19937 rng(13);
  const std::vector<int32_t> a = RandomTokens(&rng, 30), b = RandomTokens(&rng, 9);
  const int64_t row = m.config().hc_mult * m.config().hidden_size;
  model::SequenceState sa = m.NewState(), sb = m.NewState();
  std::vector<float> fa, fb;
  ASSERT_TRUE(m.Prefill(&sa, a, false, &fa).ok());
  ASSERT_TRUE(m.Prefill(&sb, b, false, &fb).ok());
  // Feed a's first 20 positions first, so the two states sit at different MTP positions.
  const std::vector<int32_t> next_a(a.begin() + 1, a.end()), next_b(b.begin() + 1, b.end());
  ASSERT_TRUE(m.MtpDraft(&sa, absl::MakeConstSpan(fa).subspan(0, 20 * row),
                         absl::MakeConstSpan(next_a).subspan(0, 20))
                  .ok());
  model::SequenceState ra = sa, rb = sb;
  auto want_a = m.MtpDraft(&ra, absl::MakeConstSpan(fa).subspan(20 * row, 9 * row),
                           absl::MakeConstSpan(next_a).subspan(20, 9));
  auto want_b = m.MtpDraft(&rb, absl::MakeConstSpan(fb).subspan(0, 8 * row), next_b);
  ASSERT_TRUE(want_a.ok() && want_b.ok());
  std::vector<float> streams(fa.begin() + 20 * row, fa.begin() + 29 * row);
  streams.insert(streams.end(), fb.begin(), fb.begin() + 8 * row);
  std::vector<int32_t> next(next_a.begin() + 20, next_a.end());
  next.insert(next.end(), next_b.begin(), next_b.end());
  auto got = m.MtpDraftBatch(std::vector<model::SequenceState*>{&sa, &sb}, std::vector<int64_t>{9, 8},
                             streams, next);
  ASSERT_TRUE(got.ok()) << got.status();
  std::vector<float> want = *want_a;
  want.insert(want.end(), want_b->begin(), want_b->end());
  EXPECT_EQ(*got, want);
  EXPECT_TRUE(sa == ra);
  EXPECT_TRUE(sb == rb);
}

struct Case {
  std::string id;
  std::vector<int32_t> prompt;
  int32_t max_tokens;
  std::vector<int32_t> want;
};

std::vector<Case> Cases() {
  std::mt19937 rng(17);
  std::vector<Case> cases;
  // 100 + 40 and 250 + 40 cross a 128-token block boundary while decoding.
  const std::vector<std::pair<int64_t, int32_t>> shapes = {
      {3, 40}, {37, 33}, {100, 40}, {200, 12}, {250, 40}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    Case c{"r" + std::to_string(i), RandomTokens(&rng, shapes[i].first), shapes[i].second, {}};
    c.want = ReferenceGreedy(c.prompt, c.max_tokens);
    cases.push_back(std::move(c));
  }
  return cases;
}

struct Outcome {
  Collected got;
  EngineStats stats;
};

// All cases at once; a 64-token step budget chunks every prompt longer than that.
Outcome RunCases(const std::vector<Case>& cases, bool mtp, EngineOptions o = EngineOptions()) {
  o.kv.num_blocks = 64;
  o.scheduler.max_step_tokens = 64;
  o.model_fingerprint = 7;
  o.mtp = mtp;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(&TinyMtpModel(), o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  Outcome run;
  if (!engine.ok()) return run;
  for (const Case& c : cases) {
    EXPECT_TRUE((*engine)->Submit(GreedyRequest(c.id, c.prompt, c.max_tokens, &run.got)).ok());
  }
  RunToCompletion(engine->get());
  run.stats = (*engine)->stats();
  return run;
}

void ExpectReference(const std::vector<Case>& cases, const Outcome& run, const std::string& what) {
  for (const Case& c : cases) {
    EXPECT_EQ(run.got.Tokens(c.id), c.want) << what << " " << c.id;
    ASSERT_NE(run.got.Final(c.id), nullptr) << what << " " << c.id;
    EXPECT_EQ(run.got.Final(c.id)->finish, FinishReason::kLength);
  }
  EXPECT_EQ(run.stats.mtp_draft_tokens, run.stats.mtp_accepted_tokens + run.stats.mtp_rejected_tokens);
}

TEST(EngineMtpTest, GreedyOutputIsTheSameWithAndWithoutMtp) {
  const std::vector<Case> cases = Cases();
  const Outcome off = RunCases(cases, false);
  const Outcome on = RunCases(cases, true);
  ExpectReference(cases, off, "mtp off");
  ExpectReference(cases, on, "mtp on");
  EXPECT_EQ(off.stats.mtp_draft_tokens, 0);
  EXPECT_GT(on.stats.mtp_draft_tokens, 100);
  EXPECT_EQ(on.stats.generated_tokens, off.stats.generated_tokens);
  std::printf("MTP on the tiny model: %lld drafts, %lld accepted (%.3f), steps %lld vs %lld without\n",
              static_cast<long long>(on.stats.mtp_draft_tokens),
              static_cast<long long>(on.stats.mtp_accepted_tokens),
              static_cast<double>(on.stats.mtp_accepted_tokens) / on.stats.mtp_draft_tokens,
              static_cast<long long>(on.stats.steps), static_cast<long long>(off.stats.steps));
}

// Drafts replaced by the reference's next token when `right(index)`, so both paths run on random weights.
EngineOptions OracleOptions(const std::vector<Case>& cases, const std::function<bool(int64_t)>& right) {
  auto want = std::make_shared<std::map<std::string, const Case*>>();
  auto owned = std::make_shared<std::vector<Case>>(cases);
  for (const Case& c : *owned) (*want)[c.id] = &c;
  EngineOptions o;
  o.mtp_draft_hook_for_testing = [want, owned, right](const Sequence& seq, int32_t draft) {
    const Case& c = *want->at(seq.request_id);
    const int64_t out = seq.draft_for - static_cast<int64_t>(c.prompt.size());
    if (out < 0 || out >= static_cast<int64_t>(c.want.size()) || !right(seq.draft_for)) return draft;
    return c.want[static_cast<size_t>(out)];
  };
  return o;
}

TEST(EngineMtpTest, AcceptedDraftsEmitTwoTokensPerStepAndStayExact) {
  const std::vector<Case> cases = Cases();
  const Outcome off = RunCases(cases, false);
  const Outcome all = RunCases(cases, true, OracleOptions(cases, [](int64_t) { return true; }));
  ExpectReference(cases, all, "all right");
  // 165 tokens, 5 of them from the prompts' logits: nearly all the rest come in accepted pairs (a draft
  // is skipped only when the verify would cross a block boundary or the sequence ends).
  EXPECT_GE(all.stats.mtp_accepted_tokens, 75);
  EXPECT_EQ(all.stats.mtp_rejected_tokens, 0);
  EXPECT_LT(all.stats.steps * 10, off.stats.steps * 7);
  // Every third draft wrong: rejections interleave with acceptances, each rolled back exactly.
  const Outcome mixed = RunCases(cases, true, OracleOptions(cases, [](int64_t i) { return i % 3 != 0; }));
  ExpectReference(cases, mixed, "mixed");
  EXPECT_GT(mixed.stats.mtp_accepted_tokens, 30);
  EXPECT_GT(mixed.stats.mtp_rejected_tokens, 10);
  std::printf(
      "all drafts right: %lld accepted, %lld steps (%lld without MTP); every third wrong: %lld "
      "accepted, %lld rejected, %lld steps\n",
      static_cast<long long>(all.stats.mtp_accepted_tokens), static_cast<long long>(all.stats.steps),
      static_cast<long long>(off.stats.steps), static_cast<long long>(mixed.stats.mtp_accepted_tokens),
      static_cast<long long>(mixed.stats.mtp_rejected_tokens), static_cast<long long>(mixed.stats.steps));
}

TEST(EngineMtpTest, PreemptionAndPrefixReuseKeepMtpOutputExact) {
  std::mt19937 rng(23);
  const std::vector<int32_t> prefix = RandomTokens(&rng, 256);
  std::vector<Case> cases;
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> p = prefix;
    const std::vector<int32_t> tail = RandomTokens(&rng, 10 + 20 * i);
    p.insert(p.end(), tail.begin(), tail.end());
    Case c{"p" + std::to_string(i), p, 30, {}};
    c.want = ReferenceGreedy(c.prompt, c.max_tokens);
    cases.push_back(std::move(c));
  }
  for (PreemptionMode mode : {PreemptionMode::kRecompute, PreemptionMode::kSwap}) {
    EngineOptions o = OracleOptions(cases, [](int64_t i) { return i % 2 == 0; });
    o.kv.num_blocks = 8;
    o.scheduler.max_step_tokens = 128;
    o.scheduler.preemption = mode;
    o.scheduler.swap_space_bytes = int64_t{1} << 30;
    o.model_fingerprint = 7;
    o.mtp = true;
    absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(&TinyMtpModel(), o);
    ASSERT_TRUE(engine.ok()) << engine.status();
    Outcome run;
    for (const Case& c : cases) {
      ASSERT_TRUE((*engine)->Submit(GreedyRequest(c.id, c.prompt, c.max_tokens, &run.got)).ok());
    }
    RunToCompletion(engine->get());
    run.stats = (*engine)->stats();
    ExpectReference(cases, run, mode == PreemptionMode::kSwap ? "swap" : "recompute");
    EXPECT_GT(run.stats.preemptions, 0);
    EXPECT_GT(run.stats.prefix_hit_tokens, 0);
    EXPECT_GT(run.stats.mtp_accepted_tokens, 0);
    EXPECT_GT(run.stats.mtp_rejected_tokens, 0);
  }
}

TEST(EngineMtpTest, SampledSequencesDecodeWithoutDrafts) {
  std::mt19937 rng(5);
  auto run = [&](bool mtp) {
    EngineOptions o;
    o.kv.num_blocks = 16;
    o.mtp = mtp;
    auto engine = Engine::Create(&TinyMtpModel(), o);
    EXPECT_TRUE(engine.ok());
    Collected got;
    EngineRequest r = GreedyRequest("s", std::vector<int32_t>{5, 6, 7, 8}, 20, &got);
    r.sampling.temperature = 0.8f;
    r.sampling.seed = 99;
    EXPECT_TRUE((*engine)->Submit(std::move(r)).ok());
    RunToCompletion(engine->get());
    EXPECT_EQ((*engine)->stats().mtp_draft_tokens, 0);
    return got.Tokens("s");
  };
  const std::vector<int32_t> off = run(false);
  EXPECT_EQ(off.size(), 20u);
  EXPECT_EQ(run(true), off);
}

TEST(EngineMtpTest, NeedsMtpWeights) {
  EngineOptions o;
  o.mtp = true;
  auto engine = Engine::Create(&TinyModel(), o);  // Loaded without load_mtp.
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition);
}

double Value(prometheus::Registry& r, const std::string& name) {
  for (const prometheus::MetricFamily& f : r.Collect()) {
    if (f.name != name) continue;
    return f.type == prometheus::MetricType::Counter ? f.metric.at(0).counter.value
                                                     : f.metric.at(0).gauge.value;
  }
  ADD_FAILURE() << "no metric " << name;
  return -1;
}

TEST(EngineMtpTest, MetricsExportDraftsAcceptanceAndRate) {
  prometheus::Registry registry;
  EngineMetrics metrics(registry);
  EngineStats s;
  metrics.Update(&s, absl::UnixEpoch());
  EXPECT_EQ(Value(registry, "v4serve_engine_mtp_acceptance_rate"), 0.0);
  s.mtp_draft_tokens = 10;
  s.mtp_accepted_tokens = 4;
  s.mtp_rejected_tokens = 6;
  metrics.Update(&s, absl::UnixEpoch());
  s.mtp_draft_tokens = 20;
  s.mtp_accepted_tokens = 5;
  metrics.Update(&s, absl::UnixEpoch());
  EXPECT_EQ(Value(registry, "v4serve_engine_mtp_draft_tokens_total"), 20.0);
  EXPECT_EQ(Value(registry, "v4serve_engine_mtp_accepted_tokens_total"), 5.0);
  EXPECT_DOUBLE_EQ(Value(registry, "v4serve_engine_mtp_acceptance_rate"), 0.25);
}

}  // namespace
}  // namespace v4serve::engine
