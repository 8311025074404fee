// The CPU forward pass against goldens from transformers' DeepseekV4ForCausalLM (tools/golden), on the
// tiny V4 of MODEL.md stored in the released format (FP8 weights, MXFP4 routed experts).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/model.h"
#include "model/sequence_state.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

struct Fixture {
  std::string name;
  std::vector<int32_t> prompt;
  std::vector<int64_t> positions;
  std::vector<std::vector<float>> logits;
  std::vector<int32_t> greedy;
};

class ModelGoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(TinyDir(), ModelOptions{});
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
    std::ifstream in(TinyDir() + "/golden.json");
    ASSERT_TRUE(in.good());
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::json j = nlohmann::json::parse(ss.str());
    for (auto& [name, fx] : j["fixtures"].items()) {
      Fixture f;
      f.name = name;
      f.prompt = fx["prompt"].get<std::vector<int32_t>>();
      f.positions = fx["positions"].get<std::vector<int64_t>>();
      f.logits = fx["logits"].get<std::vector<std::vector<float>>>();
      f.greedy = fx["greedy"].get<std::vector<int32_t>>();
      fixtures_.push_back(f);
    }
  }
  static void TearDownTestSuite() { delete model_; }

  static Model* model_;
  static std::vector<Fixture> fixtures_;
};

Model* ModelGoldenTest::model_ = nullptr;
std::vector<Fixture> ModelGoldenTest::fixtures_;

// max |a - b| / max |b| over one row of logits.
double RelError(const float* got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(got[i]) - want[i]));
    den = std::max(den, std::fabs(static_cast<double>(want[i])));
  }
  return num / den;
}

int32_t Argmax(const float* v, int64_t n) {
  int32_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

TEST_F(ModelGoldenTest, FixturesIncludeALongPrompt) {
  ASSERT_EQ(fixtures_.size(), 2u);
  size_t longest = 0;
  for (const Fixture& f : fixtures_) longest = std::max(longest, f.prompt.size());
  EXPECT_GE(longest, 1024u);
}

TEST_F(ModelGoldenTest, ExactLogitsMatchTransformers) {
  const int64_t vocab = model_->config().vocab_size;
  for (const Fixture& f : fixtures_) {
    SequenceState st = model_->NewState();
    absl::StatusOr<std::vector<float>> logits = model_->Prefill(&st, f.prompt, /*all_logits=*/true);
    ASSERT_TRUE(logits.ok()) << logits.status();
    double worst = 0;
    for (size_t i = 0; i < f.positions.size(); ++i) {
      const double e = RelError(&(*logits)[f.positions[i] * vocab], f.logits[i]);
      worst = std::max(worst, e);
      EXPECT_LT(e, 1e-4) << f.name << " position " << f.positions[i];
    }
    std::printf("%s (%zu tokens): worst relative logit error %.3g\n", f.name.c_str(), f.prompt.size(), worst);
  }
}

// Greedy decoding of several prompts for `steps` tokens (the first is the prefill's argmax): one sequence
// at a time, or all sequences in one Decode batch per step. Keeps the logits of the decode steps listed in
// `record` (step s consumed token s - 1 and predicts token s).
struct Decoded {
  std::vector<int32_t> tokens;
  std::vector<std::vector<float>> logits;  // One row per entry of `record`.
};
std::vector<Decoded> DecodeGreedy(const Model& m, const std::vector<std::vector<int32_t>>& prompts,
                                  size_t steps, const std::vector<int64_t>& record, bool batched) {
  const int64_t vocab = m.config().vocab_size;
  std::vector<SequenceState> states;
  std::vector<int32_t> next;
  for (const auto& prompt : prompts) {
    states.push_back(m.NewState());
    absl::StatusOr<std::vector<float>> l = m.Prefill(&states.back(), prompt);
    EXPECT_TRUE(l.ok()) << l.status();
    if (!l.ok()) return {};
    next.push_back(Argmax(l->data(), vocab));
  }
  std::vector<Decoded> out(prompts.size());
  auto record_step = [&](size_t i, size_t step, const float* logits) {
    if (std::find(record.begin(), record.end(), static_cast<int64_t>(step)) != record.end()) {
      out[i].logits.emplace_back(logits, logits + vocab);
    }
    next[i] = Argmax(logits, vocab);
  };
  for (size_t step = 0; step < steps; ++step) {
    for (size_t i = 0; i < next.size(); ++i) out[i].tokens.push_back(next[i]);
    if (step + 1 == steps) break;
    if (batched) {
      std::vector<SequenceState*> ptrs;
      ptrs.reserve(states.size());
      for (SequenceState& s : states) ptrs.push_back(&s);
      absl::StatusOr<std::vector<float>> l = m.Decode(ptrs, next);
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) return {};
      for (size_t i = 0; i < next.size(); ++i) record_step(i, step + 1, &(*l)[i * vocab]);
    } else {
      for (size_t i = 0; i < next.size(); ++i) {
        SequenceState* s = &states[i];
        absl::StatusOr<std::vector<float>> l =
            m.Decode(absl::MakeConstSpan(&s, 1), absl::MakeConstSpan(&next[i], 1));
        EXPECT_TRUE(l.ok()) << l.status();
        if (!l.ok()) return {};
        record_step(i, step + 1, l->data());
      }
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(states[i].position, static_cast<int64_t>(prompts[i].size() + steps - 1));
  }
  return out;
}

TEST_F(ModelGoldenTest, GreedyDecodeMatchesTransformersOneByOneAndBatched) {
  std::vector<std::vector<int32_t>> prompts;
  size_t steps = 0;
  for (const Fixture& f : fixtures_) {
    prompts.push_back(f.prompt);
    ASSERT_GE(f.greedy.size(), 64u) << f.name;
    steps = std::max(steps, f.greedy.size());
  }
  for (const bool batched : {false, true}) {
    std::vector<Decoded> got = DecodeGreedy(*model_, prompts, steps, {}, batched);
    ASSERT_EQ(got.size(), fixtures_.size());
    for (size_t i = 0; i < fixtures_.size(); ++i) {
      got[i].tokens.resize(fixtures_[i].greedy.size());
      EXPECT_EQ(got[i].tokens, fixtures_[i].greedy)
          << fixtures_[i].name << (batched ? " batched" : " one by one");
    }
  }
}

TEST_F(ModelGoldenTest, ChunkedPrefillEqualsOneShot) {
  const Fixture& f = fixtures_[0].prompt.size() > fixtures_[1].prompt.size() ? fixtures_[1] : fixtures_[0];
  SequenceState one = model_->NewState();
  absl::StatusOr<std::vector<float>> want = model_->Prefill(&one, f.prompt);
  ASSERT_TRUE(want.ok());
  for (size_t chunk : {size_t{1}, size_t{3}, size_t{16}, size_t{37}, size_t{100}}) {
    SequenceState st = model_->NewState();
    absl::StatusOr<std::vector<float>> got;
    for (size_t b = 0; b < f.prompt.size(); b += chunk) {
      const size_t e = std::min(f.prompt.size(), b + chunk);
      got = model_->Prefill(&st, absl::MakeConstSpan(f.prompt).subspan(b, e - b));
      ASSERT_TRUE(got.ok());
    }
    EXPECT_EQ(*got, *want) << "chunk " << chunk;
    EXPECT_TRUE(st == one) << "chunk " << chunk;
  }
}

TEST_F(ModelGoldenTest, FaithfulChunkedPrefillEqualsOneShot) {
  ModelOptions options;
  options.mode = NumericMode::kFaithful;
  absl::StatusOr<std::unique_ptr<Model>> faithful = Model::Load(TinyDir(), options);
  ASSERT_TRUE(faithful.ok());
  const Fixture& f = fixtures_[0].prompt.size() > fixtures_[1].prompt.size() ? fixtures_[1] : fixtures_[0];
  SequenceState one = (*faithful)->NewState();
  absl::StatusOr<std::vector<float>> want = (*faithful)->Prefill(&one, f.prompt);
  ASSERT_TRUE(want.ok());
  for (size_t chunk : {size_t{1}, size_t{13}, size_t{37}}) {
    SequenceState st = (*faithful)->NewState();
    absl::StatusOr<std::vector<float>> got;
    for (size_t b = 0; b < f.prompt.size(); b += chunk) {
      got = (*faithful)->Prefill(
          &st, absl::MakeConstSpan(f.prompt).subspan(b, std::min(chunk, f.prompt.size() - b)));
      ASSERT_TRUE(got.ok());
    }
    EXPECT_EQ(*got, *want) << "chunk " << chunk;
    EXPECT_TRUE(st == one) << "chunk " << chunk;
  }
}

TEST_F(ModelGoldenTest, StateSurvivesSerialization) {
  const Fixture& f = fixtures_[0];
  SequenceState a = model_->NewState();
  ASSERT_TRUE(model_->Prefill(&a, absl::MakeConstSpan(f.prompt).subspan(0, 99)).ok());
  const std::string bytes = SerializeSequenceState(a);
  absl::StatusOr<SequenceState> b = DeserializeSequenceState(model_->config(), bytes);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(*b == a);
  absl::StatusOr<std::vector<float>> la = model_->Prefill(&a, absl::MakeConstSpan(f.prompt).subspan(99, 20));
  absl::StatusOr<std::vector<float>> lb = model_->Prefill(&*b, absl::MakeConstSpan(f.prompt).subspan(99, 20));
  EXPECT_EQ(*la, *lb);
  EXPECT_FALSE(DeserializeSequenceState(model_->config(), bytes.substr(0, bytes.size() - 3)).ok());
}

// Real pruning: top-k 4 of up to 27 entries. The golden keeps only positions before the first near-tie of
// indexer scores at the top-k boundary (tools/golden/make_pruning_golden.py), where tie-breaking cannot
// matter.
TEST_F(ModelGoldenTest, TopKPruningMatchesTransformers) {
  std::ifstream in(TinyDir() + "/golden_topk4.json");
  ASSERT_TRUE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json fx = nlohmann::json::parse(ss.str())["fixtures"]["pruned"];
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  ASSERT_TRUE(config.ok());
  config->index_topk = fx["index_topk"].get<int64_t>();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(ckpt.ok());
  absl::StatusOr<std::unique_ptr<Model>> pruned = Model::FromCheckpoint(*config, **ckpt, ModelOptions{});
  ASSERT_TRUE(pruned.ok()) << pruned.status();
  const std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
  const std::vector<int64_t> positions = fx["positions"].get<std::vector<int64_t>>();
  const auto want = fx["logits"].get<std::vector<std::vector<float>>>();
  ASSERT_GT(positions.back(), 4 * config->index_topk + 3);  // Some queries really prune.
  SequenceState st = (*pruned)->NewState();
  absl::StatusOr<std::vector<float>> logits = (*pruned)->Prefill(&st, prompt, /*all_logits=*/true);
  ASSERT_TRUE(logits.ok());
  const int64_t vocab = config->vocab_size;
  double worst = 0;
  for (size_t i = 0; i < positions.size(); ++i) {
    const double e = RelError(&(*logits)[positions[i] * vocab], want[i]);
    worst = std::max(worst, e);
    EXPECT_LT(e, 1e-4) << "position " << positions[i];
  }
  std::printf("top-k 4 pruning, %zu positions up to %lld: worst relative logit error %.3g\n",
              positions.size(), static_cast<long long>(positions.back()), worst);
  // With full selection the same positions differ: the pruning is real.
  SequenceState full = model_->NewState();
  absl::StatusOr<std::vector<float>> unpruned = model_->Prefill(&full, prompt, true);
  EXPECT_GT(RelError(&(*unpruned)[positions.back() * vocab], want.back()), 1e-3);
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

// ||got - want||_2 / ||want||_2 over one row of logits (printed next to RelError's max-norm version).
double NormRelError(const float* got, const std::vector<float>& want) {
  double d2 = 0, r2 = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    d2 += (got[i] - static_cast<double>(want[i])) * (got[i] - static_cast<double>(want[i]));
    r2 += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(d2 / r2);
}

// Faithful mode end to end against tools/golden/v4_reference.py (DeepSeek-style rounding: FP8 GEMM inputs,
// FP8 KV, Hadamard + FP4 indexer, BF16 between ops). Both implementations accumulate in FP64 and round once
// to FP32 (docs/MODEL_NOTES.md, "Order-independent accumulation"), so their FP8/BF16 roundings agree and
// the acceptance of issue 4 holds: at every checked prefill position and at the recorded decode steps the
// logits are within 1e-2 in the max-norm relative error (max_i |got_i - ref_i| / max_i |ref_i|, as for
// exact mode), and greedy decoding gives the same 64 tokens, one sequence at a time and both fixtures in one
// batch.
TEST_F(ModelGoldenTest, FaithfulModeMatchesTheDeepSeekStyleReference) {
  nlohmann::json j = ReadJson(TinyDir() + "/golden_reference.json");
  ModelOptions options;
  options.mode = NumericMode::kFaithful;
  absl::StatusOr<std::unique_ptr<Model>> faithful = Model::Load(TinyDir(), options);
  ASSERT_TRUE(faithful.ok()) << faithful.status();
  const int64_t vocab = (*faithful)->config().vocab_size;
  std::vector<std::string> names;
  std::vector<std::vector<int32_t>> prompts, greedy;
  std::vector<std::vector<std::vector<float>>> decode_logits;
  std::vector<int64_t> decode_steps;
  size_t longest = 0;
  for (auto& [name, fx] : j["fixtures"].items()) {
    if (name.find("_faithful") == std::string::npos) continue;
    names.push_back(name);
    prompts.push_back(fx["prompt"].get<std::vector<int32_t>>());
    longest = std::max(longest, prompts.back().size());
    const std::vector<int64_t> positions = fx["positions"].get<std::vector<int64_t>>();
    const auto want = fx["logits"].get<std::vector<std::vector<float>>>();
    greedy.push_back(fx["greedy"].get<std::vector<int32_t>>());
    ASSERT_GE(greedy.back().size(), 64u) << name;
    decode_steps = fx["decode_steps"].get<std::vector<int64_t>>();
    decode_logits.push_back(fx["decode_logits"].get<std::vector<std::vector<float>>>());
    ASSERT_EQ(decode_logits.back().size(), decode_steps.size()) << name;
    ASSERT_EQ(want.size(), positions.size()) << name;

    SequenceState st = (*faithful)->NewState(), st_exact = model_->NewState();
    absl::StatusOr<std::vector<float>> logits =
        (*faithful)->Prefill(&st, prompts.back(), /*all_logits=*/true);
    absl::StatusOr<std::vector<float>> exact =
        model_->Prefill(&st_exact, prompts.back(), /*all_logits=*/true);
    ASSERT_TRUE(logits.ok() && exact.ok());
    double worst = 0, worst_l2 = 0, exact_worst = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      const double e = RelError(&(*logits)[positions[i] * vocab], want[i]);
      worst = std::max(worst, e);
      worst_l2 = std::max(worst_l2, NormRelError(&(*logits)[positions[i] * vocab], want[i]));
      exact_worst = std::max(exact_worst, RelError(&(*exact)[positions[i] * vocab], want[i]));
      EXPECT_LT(e, 1e-2) << name << " position " << positions[i];
    }
    // The golden sees the rounding: exact mode is far from it.
    EXPECT_GT(exact_worst, 1e-2) << name;
    std::printf(
        "faithful %s (%zu tokens, %zu positions): worst relative logit error %.3g (L2 %.3g); exact mode "
        "%.3g\n",
        name.c_str(), prompts.back().size(), positions.size(), worst, worst_l2, exact_worst);
  }
  ASSERT_EQ(names.size(), 2u);
  EXPECT_GE(longest, 1024u);
  for (const bool batched : {false, true}) {
    std::vector<Decoded> got = DecodeGreedy(**faithful, prompts, greedy[0].size(), decode_steps, batched);
    ASSERT_EQ(got.size(), names.size());
    for (size_t i = 0; i < names.size(); ++i) {
      const char* how = batched ? "batched" : "one by one";
      EXPECT_EQ(got[i].tokens, greedy[i]) << names[i] << " " << how;
      size_t agree = 0;
      while (agree < got[i].tokens.size() && got[i].tokens[agree] == greedy[i][agree]) ++agree;
      ASSERT_EQ(got[i].logits.size(), decode_steps.size());
      double worst = 0;
      for (size_t k = 0; k < decode_steps.size(); ++k) {
        const double e = RelError(got[i].logits[k].data(), decode_logits[i][k]);
        worst = std::max(worst, e);
        EXPECT_LT(e, 1e-2) << names[i] << " " << how << " decode step " << decode_steps[k];
      }
      std::printf("faithful %s, %s: greedy agrees for %zu of %zu tokens; decode-step logits worst %.3g\n",
                  names[i].c_str(), how, agree, greedy[i].size(), worst);
    }
  }
}

// MTP (absent from transformers) against tools/golden/v4_reference.py: within 1e-4 in exact mode and 1e-2
// in faithful mode (max-norm relative error). Drafting in two chunks equals one.
TEST_F(ModelGoldenTest, MtpMatchesTheReference) {
  nlohmann::json j = ReadJson(TinyDir() + "/golden_reference.json");
  for (const NumericMode mode : {NumericMode::kExact, NumericMode::kFaithful}) {
    ModelOptions options;
    options.mode = mode;
    options.load_mtp = true;
    absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(TinyDir(), options);
    ASSERT_TRUE(m.ok()) << m.status();
    const int64_t vocab = (*m)->config().vocab_size;
    for (const char* fixture : {"short", "long"}) {
      const std::string name = std::string(fixture) + (mode == NumericMode::kExact ? "_exact" : "_faithful");
      const nlohmann::json& fx = j["fixtures"][name];
      const std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
      const std::vector<int64_t> positions = fx["mtp_positions"].get<std::vector<int64_t>>();
      const auto want = fx["mtp_logits"].get<std::vector<std::vector<float>>>();
      SequenceState st = (*m)->NewState();
      std::vector<float> streams;
      ASSERT_TRUE((*m)->Prefill(&st, prompt, false, &streams).ok());
      const int64_t n = static_cast<int64_t>(prompt.size()) - 1,
                    row = (*m)->config().hc_mult * (*m)->config().hidden_size;
      const std::vector<int32_t> next(prompt.begin() + 1, prompt.end());
      absl::StatusOr<std::vector<float>> draft =
          (*m)->MtpDraft(&st, absl::MakeConstSpan(streams).subspan(0, n * row), next);
      ASSERT_TRUE(draft.ok()) << draft.status();
      EXPECT_EQ(st.mtp_position, n);
      double worst = 0, worst_l2 = 0;
      for (size_t i = 0; i < positions.size(); ++i) {
        const float* got = &(*draft)[positions[i] * vocab];
        const double e = RelError(got, want[i]);
        worst = std::max(worst, e);
        worst_l2 = std::max(worst_l2, NormRelError(got, want[i]));
        EXPECT_LT(e, mode == NumericMode::kExact ? 1e-4 : 1e-2) << name << " position " << positions[i];
      }
      // Two chunks give the same drafts as one.
      SequenceState st2 = (*m)->NewState();
      ASSERT_TRUE((*m)->Prefill(&st2, prompt).ok());
      const int64_t half = n / 2;
      auto a = (*m)->MtpDraft(&st2, absl::MakeConstSpan(streams).subspan(0, half * row),
                              absl::MakeConstSpan(next).subspan(0, half));
      auto b = (*m)->MtpDraft(&st2, absl::MakeConstSpan(streams).subspan(half * row, (n - half) * row),
                              absl::MakeConstSpan(next).subspan(half));
      ASSERT_TRUE(a.ok() && b.ok());
      a->insert(a->end(), b->begin(), b->end());
      EXPECT_EQ(*a, *draft) << name;
      std::printf("MTP %s: worst relative logit error %.3g (L2 %.3g)\n", name.c_str(), worst, worst_l2);
    }
  }
  ModelOptions no_mtp;
  absl::StatusOr<std::unique_ptr<Model>> plain = Model::Load(TinyDir(), no_mtp);
  SequenceState st = (*plain)->NewState();
  std::vector<float> s(static_cast<size_t>((*plain)->config().hc_mult * (*plain)->config().hidden_size));
  EXPECT_EQ((*plain)->MtpDraft(&st, s, std::vector<int32_t>{3}).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// The greedy variant the engine uses for argmax-only batches: the argmax of DecodeChunks' logits, row by
// row (2-token chunks too), and the same states afterwards.
TEST_F(ModelGoldenTest, DecodeChunksGreedyPicksTheArgmaxOfDecodeChunks) {
  std::vector<SequenceState> a, b;
  for (size_t i = 0; i < 3 && i < fixtures_.size(); ++i) {
    SequenceState s = model_->NewState();
    ASSERT_TRUE(model_->Prefill(&s, fixtures_[i].prompt).ok());
    a.push_back(s);
    b.push_back(std::move(s));
  }
  ASSERT_GE(a.size(), 2u);
  std::vector<int32_t> next(a.size(), 7);
  for (int step = 0; step < 5; ++step) {
    std::vector<SequenceState*> pa, pb;
    std::vector<int64_t> counts;
    std::vector<int32_t> tokens;
    for (size_t i = 0; i < a.size(); ++i) {
      pa.push_back(&a[i]);
      pb.push_back(&b[i]);
      const int64_t k = (step + static_cast<int>(i)) % 2 == 0 ? 1 : 2;
      counts.push_back(k);
      for (int64_t j = 0; j < k; ++j) tokens.push_back(next[i] + static_cast<int32_t>(j));
    }
    absl::StatusOr<std::vector<float>> logits = model_->DecodeChunks(pa, counts, tokens);
    absl::StatusOr<std::vector<int32_t>> ids = model_->DecodeChunksGreedy(pb, counts, tokens);
    ASSERT_TRUE(logits.ok() && ids.ok()) << logits.status() << ids.status();
    EXPECT_EQ(*ids, ArgmaxOfRows(*logits, static_cast<int64_t>(tokens.size()))) << "step " << step;
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(a[i] == b[i]) << "state " << i << " step " << step;
    size_t r = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      r += static_cast<size_t>(counts[i]);
      next[i] = (*ids)[r - 1];
    }
  }
  SequenceState* s0 = &b[0];
  EXPECT_FALSE(model_
                   ->DecodeChunksGreedy(std::vector<SequenceState*>{s0}, std::vector<int64_t>{2},
                                        std::vector<int32_t>{1})
                   .ok());
  EXPECT_FALSE(model_
                   ->DecodeChunksGreedy(std::vector<SequenceState*>{s0, s0}, std::vector<int64_t>{1, 1},
                                        std::vector<int32_t>{1, 2})
                   .ok());
}

TEST_F(ModelGoldenTest, BadInputsAreErrors) {
  SequenceState st = model_->NewState();
  EXPECT_FALSE(model_->Prefill(&st, std::vector<int32_t>{}).ok());
  EXPECT_FALSE(model_->Prefill(&st, std::vector<int32_t>{5, 100000}).ok());
  EXPECT_EQ(st.position, 0);
  EXPECT_FALSE(model_->Decode(std::vector<SequenceState*>{&st, &st}, std::vector<int32_t>{1, 2}).ok());
}

}  // namespace
}  // namespace v4serve::model
