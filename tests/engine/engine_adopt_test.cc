// The engine offers KV blocks to the model's backend as their payloads (Model::AdoptKvPages) wherever it
// rebuilds a state from blocks, and a swapped state keeps the tag a backend gave it. The CUDA backend's side
// is tested on the GPU (tests/model/cuda_kv_pages_test.cc, engine_cuda_pages_test.cc); here a recording
// backend around the CPU one checks the engine's side on every machine: which payloads it hands over (byte
// for byte what kvstore encodes for the state's entries), when, and that the tag reaches the forwards.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_transfer_codec.h"
#include "engine/state_blocks.h"
#include "gtest/gtest.h"
#include "kvstore/kv_block.h"
#include "model/backend.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::RunToCompletion;

// The CPU backend, plus a record of AdoptKvPages (which it takes, tagging the state as a device backend
// would) and of the tags the forwards see.
class RecordingBackend final : public model::ForwardBackend {
 public:
  struct Adoption {
    model::SequenceState state;  // As offered.
    std::vector<std::string> pages;
  };
  explicit RecordingBackend(std::unique_ptr<model::ForwardBackend> inner) : inner_(std::move(inner)) {}
  model::Device device() const override { return inner_->device(); }
  std::string Describe() const override { return "recording " + inner_->Describe(); }
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const model::ForwardSegment> segments,
                                             absl::Span<const int32_t> tokens,
                                             absl::Span<const int64_t> logit_rows,
                                             std::vector<float>* final_streams) const override {
    for (const model::ForwardSegment& s : segments) seen_tags.push_back(s.state->device_tag);
    return inner_->Forward(segments, tokens, logit_rows, final_streams);
  }
  absl::Status AdoptKvPages(model::SequenceState* state,
                            absl::Span<const absl::string_view> pages) const override {
    adoptions.push_back({*state, std::vector<std::string>(pages.begin(), pages.end())});
    state->device_tag = ++next_tag;
    return absl::OkStatus();
  }

  mutable std::vector<Adoption> adoptions;
  mutable std::vector<uint64_t> seen_tags;
  mutable uint64_t next_tag = 1000;

 private:
  std::unique_ptr<model::ForwardBackend> inner_;
};

struct Recorded {
  std::unique_ptr<model::Model> model;
  const RecordingBackend* backend = nullptr;
};

Recorded LoadRecorded() {
  Recorded r;
  auto m = model::Model::Load(testing::TinyDir(), model::ModelOptions());
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return r;
  r.model = std::move(*m);
  auto rec = std::make_unique<RecordingBackend>(r.model->ReplaceBackendForTesting(nullptr));
  r.backend = rec.get();
  r.model->ReplaceBackendForTesting(std::move(rec));
  return r;
}

// kvstore's payload of block `k` of `state`: its entries and indexer keys through EncodeKvBlock.
std::string PayloadOf(const kvstore::KvLayout& layout, const model::SequenceState& state, int32_t k) {
  const std::vector<int32_t> tokens(static_cast<size_t>(layout.block_tokens), 3);
  absl::StatusOr<kvstore::KvBlock> b = BlockEntries(layout, state, k, tokens);
  EXPECT_TRUE(b.ok()) << b.status();
  if (!b.ok()) return "";
  absl::StatusOr<std::string> bytes = kvstore::EncodeKvBlock(layout, *b);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return bytes.ok() ? std::string(kvstore::KvBlockPayload(layout, *bytes, *b)) : "";
}

bool Saw(const RecordingBackend& b, uint64_t tag) {
  return std::find(b.seen_tags.begin(), b.seen_tags.end(), tag) != b.seen_tags.end();
}

TEST(EngineAdoptTest, RestoredPrefixBlocksAreOfferedAsTheirPayloads) {
  Recorded r = LoadRecorded();
  ASSERT_NE(r.model, nullptr);
  absl::StatusOr<kvstore::KvLayout> layout = KvLayoutFor(r.model->config(), 1);
  ASSERT_TRUE(layout.ok()) << layout.status();
  auto engine = Engine::Create(r.model.get(), EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::mt19937 rng(8);
  const std::vector<int32_t> first = RandomTokens(&rng, 300);
  std::vector<int32_t> second(first.begin(), first.begin() + 256);
  const std::vector<int32_t> tail = RandomTokens(&rng, 40);
  second.insert(second.end(), tail.begin(), tail.end());
  Collected sink;
  ASSERT_TRUE((*engine)->Submit(GreedyRequest("a", first, 3, &sink)).ok());
  RunToCompletion(engine->get());
  EXPECT_TRUE(r.backend->adoptions.empty()) << "nothing was restored for the first request";
  ASSERT_TRUE((*engine)->Submit(GreedyRequest("b", second, 3, &sink)).ok());
  RunToCompletion(engine->get());
  ASSERT_EQ(r.backend->adoptions.size(), 1u);
  const RecordingBackend::Adoption& a = r.backend->adoptions[0];
  EXPECT_EQ(a.state.position, 256);
  ASSERT_EQ(a.pages.size(), 2u);
  for (int32_t k = 0; k < 2; ++k) {
    EXPECT_TRUE(a.pages[static_cast<size_t>(k)] == PayloadOf(*layout, a.state, k)) << "page " << k;
  }
  EXPECT_EQ((*engine)->stats().kv_pages_adopted, 2);
  EXPECT_TRUE(Saw(*r.backend, r.backend->next_tag)) << "the forwards ran the adopted state";
  EXPECT_EQ(sink.Tokens("b").size(), 3u);
}

TEST(EngineAdoptTest, TransferredPagesAreOfferedAndTheTagSurvivesTheSwapQueue) {
  Recorded r = LoadRecorded();
  ASSERT_NE(r.model, nullptr);
  absl::StatusOr<kvstore::KvLayout> layout = KvLayoutFor(r.model->config(), 1);
  ASSERT_TRUE(layout.ok()) << layout.status();
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 300);
  model::SequenceState sent = testing::TinyModel().NewState();
  absl::StatusOr<std::vector<float>> logits = testing::TinyModel().Prefill(&sent, prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const std::vector<kvstore::KvTransferChunk> chunks = testing::EncodeTransfer(*layout, sent, prompt, 2);
  std::vector<std::string> pages;
  absl::StatusOr<model::SequenceState> state =
      AssembleTransferredState(r.model->config(), *layout, prompt, chunks, &pages);
  ASSERT_TRUE(state.ok()) << state.status();
  auto engine = Engine::Create(r.model.get(), EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  Collected sink;
  SampledToken first;
  first.id = model::ArgmaxOfRows(*logits, 1)[0];
  ASSERT_TRUE((*engine)
                  ->SubmitPrefilled(GreedyRequest("p", prompt, 4, &sink), *std::move(state), first, 0, pages)
                  .ok());
  ASSERT_EQ(r.backend->adoptions.size(), 1u) << "offered when submitted";
  EXPECT_EQ(r.backend->adoptions[0].pages, pages);
  for (int32_t k = 0; k < 2; ++k) {
    EXPECT_TRUE(pages[static_cast<size_t>(k)] == PayloadOf(*layout, sent, k)) << "page " << k;
  }
  RunToCompletion(engine->get());
  EXPECT_TRUE(Saw(*r.backend, r.backend->next_tag)) << "the state came out of the swapped queue with its tag";
  EXPECT_EQ(sink.Tokens("p").size(), 4u);
  EXPECT_EQ((*engine)->stats().kv_pages_adopted, 2);
}

}  // namespace
}  // namespace v4serve::engine
