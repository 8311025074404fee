// Shared fixtures for engine tests: the tiny checkpoint, a reference generator that does not use the
// engine (model::Generate: one prefill, then single-sequence decode), and a driver that runs an engine
// to completion with a step cap (a hang is a failure, not a timeout).
#ifndef V4SERVE_TESTS_ENGINE_ENGINE_TEST_UTIL_H_
#define V4SERVE_TESTS_ENGINE_ENGINE_TEST_UTIL_H_

#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_transfer_codec.h"
#include "gtest/gtest.h"
#include "model/generate.h"
#include "model/model.h"

namespace v4serve::engine::testing {

inline std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

inline const model::Model& TinyModel() {
  static const model::Model* m = [] {
    auto loaded = model::Model::Load(TinyDir(), model::ModelOptions());
    if (!loaded.ok()) {
      ADD_FAILURE() << loaded.status();
      std::abort();
    }
    return loaded->release();
  }();
  return *m;
}

inline std::vector<int32_t> RandomTokens(std::mt19937* rng, int64_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  // Ids 2.. (0 = BOS, 1 = EOS) so prompts do not contain the stop token.
  for (int32_t& x : t) x = static_cast<int32_t>(2 + (*rng)() % 510);
  return t;
}

// Greedy reference without the engine; no stop token, exactly max_tokens tokens.
inline std::vector<int32_t> ReferenceGreedy(const std::vector<int32_t>& prompt, int32_t max_tokens) {
  model::SamplingOptions o;
  o.max_new_tokens = max_tokens;
  o.stop_ids = {-1};
  auto got = model::Generate(TinyModel(), prompt, o);
  EXPECT_TRUE(got.ok()) << got.status();
  return got.ok() ? *got : std::vector<int32_t>();
}

struct Collected {
  std::map<std::pair<std::string, int32_t>, std::vector<SequenceOutput>> outputs;
  std::vector<int32_t> Tokens(const std::string& id, int32_t choice = 0) const {
    std::vector<int32_t> t;
    auto it = outputs.find({id, choice});
    if (it == outputs.end()) return t;
    for (const SequenceOutput& o : it->second) {
      if (o.token) t.push_back(o.token->id);
    }
    return t;
  }
  const SequenceOutput* Final(const std::string& id, int32_t choice = 0) const {
    auto it = outputs.find({id, choice});
    if (it == outputs.end() || it->second.empty() || it->second.back().finish == FinishReason::kNone)
      return nullptr;
    return &it->second.back();
  }
  OutputCallback Callback() {
    return [this](const SequenceOutput& o) { outputs[{o.request_id, o.choice_index}].push_back(o); };
  }
};

inline EngineRequest GreedyRequest(const std::string& id, std::vector<int32_t> prompt, int32_t max_tokens,
                                   Collected* sink) {
  EngineRequest r;
  r.request_id = id;
  r.prompt = std::move(prompt);
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  r.on_output = sink->Callback();
  return r;
}

// A prefill worker's transfer of `state` (which has consumed `prompt`): each complete block's chunks of
// `layers_per_chunk` layers, then the window chunk.
inline std::vector<kvstore::KvTransferChunk> EncodeTransfer(const kvstore::KvLayout& layout,
                                                            const model::SequenceState& state,
                                                            const std::vector<int32_t>& prompt,
                                                            int32_t layers_per_chunk) {
  std::vector<kvstore::KvTransferChunk> out;
  const size_t bt = static_cast<size_t>(layout.block_tokens);
  for (int32_t b = 0; b < static_cast<int32_t>(prompt.size() / bt); ++b) {
    absl::StatusOr<std::vector<kvstore::KvTransferChunk>> c = EncodeBlockChunks(
        layout, state, b, absl::MakeConstSpan(prompt).subspan(static_cast<size_t>(b) * bt, bt),
        layers_per_chunk);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return out;
    out.insert(out.end(), c->begin(), c->end());
  }
  absl::StatusOr<kvstore::KvTransferChunk> w = EncodeWindowChunk(layout, state);
  EXPECT_TRUE(w.ok()) << w.status();
  if (w.ok()) out.push_back(*w);
  return out;
}

// Steps until idle; fails the test after `max_steps` (a hang).
inline void RunToCompletion(Engine* engine, int64_t max_steps = 100000) {
  int64_t steps = 0;
  while (engine->HasWork()) {
    absl::Status s = engine->Step();
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_LT(++steps, max_steps) << "engine did not finish";
  }
}

}  // namespace v4serve::engine::testing

#endif  // V4SERVE_TESTS_ENGINE_ENGINE_TEST_UTIL_H_
