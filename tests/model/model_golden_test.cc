// The CPU forward pass against goldens from transformers' DeepseekV4ForCausalLM (tools/golden), on the
// tiny V4 of MODEL.md stored in the released format (FP8 weights, MXFP4 routed experts).
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

TEST_F(ModelGoldenTest, GreedyDecodeMatchesTransformersForBothFixturesInOneBatch) {
  const int64_t vocab = model_->config().vocab_size;
  std::vector<SequenceState> states;
  std::vector<int32_t> next;
  for (const Fixture& f : fixtures_) {
    states.push_back(model_->NewState());
    absl::StatusOr<std::vector<float>> l = model_->Prefill(&states.back(), f.prompt);
    ASSERT_TRUE(l.ok()) << l.status();
    next.push_back(Argmax(l->data(), vocab));
  }
  std::vector<SequenceState*> ptrs;
  ptrs.reserve(states.size());
  for (SequenceState& s : states) ptrs.push_back(&s);
  std::vector<std::vector<int32_t>> got(fixtures_.size());
  size_t steps = 0;
  for (const Fixture& f : fixtures_) steps = std::max(steps, f.greedy.size());
  for (size_t step = 0; step < steps; ++step) {
    for (size_t i = 0; i < next.size(); ++i) got[i].push_back(next[i]);
    if (step + 1 == steps) break;
    absl::StatusOr<std::vector<float>> l = model_->Decode(ptrs, next);
    ASSERT_TRUE(l.ok()) << l.status();
    for (size_t i = 0; i < next.size(); ++i) next[i] = Argmax(&(*l)[i * vocab], vocab);
  }
  for (size_t i = 0; i < fixtures_.size(); ++i) {
    ASSERT_GE(fixtures_[i].greedy.size(), 64u) << fixtures_[i].name;
    got[i].resize(fixtures_[i].greedy.size());
    EXPECT_EQ(got[i], fixtures_[i].greedy) << fixtures_[i].name;
    EXPECT_EQ(states[i].position, static_cast<int64_t>(fixtures_[i].prompt.size() + steps - 1));
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
  std::vector<int32_t> prompt(fixtures_[0].prompt.begin(), fixtures_[0].prompt.begin() + 90);
  SequenceState one = (*faithful)->NewState();
  absl::StatusOr<std::vector<float>> want = (*faithful)->Prefill(&one, prompt);
  ASSERT_TRUE(want.ok());
  SequenceState st = (*faithful)->NewState();
  absl::StatusOr<std::vector<float>> got;
  for (size_t b = 0; b < prompt.size(); b += 13) {
    got = (*faithful)->Prefill(
        &st, absl::MakeConstSpan(prompt).subspan(b, std::min<size_t>(13, prompt.size() - b)));
    ASSERT_TRUE(got.ok());
  }
  EXPECT_EQ(*got, *want);
  EXPECT_TRUE(st == one);
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

// Faithful mode end to end against tools/golden/v4_reference.py. Block by block the two agree within
// 2e-3 (faithful_block_test); end to end, rounding flips compound (an FP32 last-bit difference becomes a
// whole FP8 step of an element), so the bound here is relative: the faithful mode must be
// closer to the faithful reference than the exact mode is, and the first greedy tokens must agree. How long
// greedy decoding agrees is chaotic: 26 and 12 tokens with the current summation order in HcPost, 7 and 2
// with another equally valid order.
TEST_F(ModelGoldenTest, FaithfulModeTracksTheDeepSeekStyleReference) {
  std::ifstream in(TinyDir() + "/golden_reference.json");
  ASSERT_TRUE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str());
  ModelOptions options;
  options.mode = NumericMode::kFaithful;
  absl::StatusOr<std::unique_ptr<Model>> faithful = Model::Load(TinyDir(), options);
  ASSERT_TRUE(faithful.ok()) << faithful.status();
  const int64_t vocab = (*faithful)->config().vocab_size;
  int checked = 0;
  for (auto& [name, fx] : j["fixtures"].items()) {
    if (name.find("_faithful") == std::string::npos) continue;
    ++checked;
    const std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
    const std::vector<int64_t> positions = fx["positions"].get<std::vector<int64_t>>();
    const auto want = fx["logits"].get<std::vector<std::vector<float>>>();
    const std::vector<int32_t> greedy = fx["greedy"].get<std::vector<int32_t>>();
    ASSERT_GE(greedy.size(), 64u);
    SequenceState st = (*faithful)->NewState(), st_exact = model_->NewState();
    absl::StatusOr<std::vector<float>> logits = (*faithful)->Prefill(&st, prompt, /*all_logits=*/true);
    absl::StatusOr<std::vector<float>> exact = model_->Prefill(&st_exact, prompt, /*all_logits=*/true);
    ASSERT_TRUE(logits.ok() && exact.ok());
    // Norm-relative errors over all checked positions.
    double d_faithful = 0, d_exact = 0, ref = 0, worst_max = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      const float* f = &(*logits)[positions[i] * vocab];
      const float* e = &(*exact)[positions[i] * vocab];
      for (int64_t v = 0; v < vocab; ++v) {
        d_faithful += (f[v] - want[i][v]) * (f[v] - want[i][v]);
        d_exact += (e[v] - want[i][v]) * (e[v] - want[i][v]);
        ref += want[i][v] * want[i][v];
      }
      worst_max = std::max(worst_max, RelError(f, want[i]));
    }
    const double rel_faithful = std::sqrt(d_faithful / ref), rel_exact = std::sqrt(d_exact / ref);
    EXPECT_LT(rel_faithful, rel_exact) << name;
    std::vector<int32_t> got;
    int32_t next = Argmax(&(*logits)[(prompt.size() - 1) * vocab], vocab);
    for (size_t step = 0; step < greedy.size(); ++step) {
      got.push_back(next);
      if (step + 1 == greedy.size()) break;
      SequenceState* s = &st;
      absl::StatusOr<std::vector<float>> l =
          (*faithful)->Decode(absl::MakeConstSpan(&s, 1), absl::MakeConstSpan(&next, 1));
      ASSERT_TRUE(l.ok());
      next = Argmax(l->data(), vocab);
    }
    size_t agree = 0;
    while (agree < got.size() && got[agree] == greedy[agree]) ++agree;
    EXPECT_GE(agree, 2u) << name;
    std::printf(
        "faithful %s: logits relative error %.3g (max element %.3g), exact mode %.3g; greedy agrees for %zu "
        "of "
        "%zu tokens\n",
        name.c_str(), rel_faithful, worst_max, rel_exact, agree, greedy.size());
  }
  EXPECT_EQ(checked, 2);
}

// MTP (absent from transformers) against tools/golden/v4_reference.py: exact mode within 1e-4; the
// faithful mode closer to the faithful reference than the exact mode is. Drafting in two chunks equals one.
TEST_F(ModelGoldenTest, MtpMatchesTheReference) {
  std::ifstream in(TinyDir() + "/golden_reference.json");
  ASSERT_TRUE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str());
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
      double worst = 0, d2 = 0, r2 = 0;
      for (size_t i = 0; i < positions.size(); ++i) {
        const float* got = &(*draft)[positions[i] * vocab];
        worst = std::max(worst, RelError(got, want[i]));
        for (int64_t v = 0; v < vocab; ++v) {
          d2 += (got[v] - want[i][v]) * (got[v] - want[i][v]);
          r2 += want[i][v] * want[i][v];
        }
      }
      if (mode == NumericMode::kExact) {
        EXPECT_LT(worst, 1e-4) << name;
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
        EXPECT_EQ(*a, *draft);
      } else {
        EXPECT_LT(std::sqrt(d2 / r2), 0.2) << name;
      }
      std::printf("MTP %s: worst relative logit error %.3g (norm-relative %.3g)\n", name.c_str(), worst,
                  std::sqrt(d2 / r2));
    }
  }
  ModelOptions no_mtp;
  absl::StatusOr<std::unique_ptr<Model>> plain = Model::Load(TinyDir(), no_mtp);
  SequenceState st = (*plain)->NewState();
  std::vector<float> s(static_cast<size_t>((*plain)->config().hc_mult * (*plain)->config().hidden_size));
  EXPECT_EQ((*plain)->MtpDraft(&st, s, std::vector<int32_t>{3}).status().code(),
            absl::StatusCode::kFailedPrecondition);
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
