// The engine's entry point for a sequence whose prompt was computed elsewhere (Engine::SubmitPrefilled)
// and the transfer codec (engine/kv_transfer_codec.h) that carries that state from a prefill worker:
// a state cut into block and window chunks and reassembled is the same state bit for bit, and decoding
// from it gives the reference tokens (model::Generate, no engine).
#include <algorithm>
#include <random>

#include "engine/engine.h"
#include "engine/kv_transfer_codec.h"
#include "engine/state_blocks.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::EncodeTransfer;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::RunToCompletion;
using testing::TinyModel;

constexpr uint64_t kFingerprint = 0xF00D;

kvstore::KvLayout Layout() {
  absl::StatusOr<kvstore::KvLayout> l = KvLayoutFor(TinyModel().config(), kFingerprint);
  EXPECT_TRUE(l.ok());
  return *l;
}

struct Prefilled {
  model::SequenceState state;
  std::vector<float> logits;
};

Prefilled PrefillInChunks(const std::vector<int32_t>& prompt, int64_t chunk) {
  Prefilled p{TinyModel().NewState(), {}};
  for (size_t pos = 0; pos < prompt.size(); pos += static_cast<size_t>(chunk)) {
    const size_t n = std::min(prompt.size() - pos, static_cast<size_t>(chunk));
    absl::StatusOr<std::vector<float>> l =
        TinyModel().Prefill(&p.state, absl::MakeConstSpan(prompt).subspan(pos, n), false, nullptr);
    EXPECT_TRUE(l.ok()) << l.status();
    p.logits = *l;
  }
  return p;
}

class TransferCodecTest : public ::testing::TestWithParam<int64_t> {};

TEST_P(TransferCodecTest, ReassembledStateIsTheSameState) {
  std::mt19937 rng(static_cast<uint32_t>(GetParam()));
  const std::vector<int32_t> prompt = RandomTokens(&rng, GetParam());
  const kvstore::KvLayout layout = Layout();
  const Prefilled p = PrefillInChunks(prompt, 128);
  for (int32_t lpc : {1, 2, 5}) {
    std::vector<kvstore::KvTransferChunk> chunks = EncodeTransfer(layout, p.state, prompt, lpc);
    std::shuffle(chunks.begin(), chunks.end(), rng);  // Arrival order does not matter.
    std::vector<std::string> pages;
    absl::StatusOr<model::SequenceState> got =
        AssembleTransferredState(TinyModel().config(), layout, prompt, chunks, &pages);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(*got == p.state) << "layers_per_chunk " << lpc;
    // Each complete block's page: the payload of the whole block as kvstore encodes it, whatever the
    // chunking (what the decode worker hands the backend's device KV cache).
    ASSERT_EQ(static_cast<int64_t>(pages.size()), GetParam() / layout.block_tokens);
    for (size_t b = 0; b < pages.size(); ++b) {
      absl::StatusOr<kvstore::KvBlock> blk = BlockEntries(layout, p.state, static_cast<int32_t>(b),
                                                          absl::MakeConstSpan(prompt).subspan(b * 128, 128));
      ASSERT_TRUE(blk.ok()) << blk.status();
      absl::StatusOr<std::string> bytes = kvstore::EncodeKvBlock(layout, *blk);
      ASSERT_TRUE(bytes.ok()) << bytes.status();
      EXPECT_EQ(pages[b], std::string(kvstore::KvBlockPayload(layout, *bytes, *blk)))
          << "block " << b << ", layers_per_chunk " << lpc;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(PromptLengths, TransferCodecTest, ::testing::Values(1, 5, 127, 128, 129, 300, 512));

TEST(TransferCodecTest, IncompleteWrongOrForeignTransfersAreRefused) {
  std::mt19937 rng(3);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 300);
  const kvstore::KvLayout layout = Layout();
  const Prefilled p = PrefillInChunks(prompt, 300);
  const std::vector<kvstore::KvTransferChunk> chunks = EncodeTransfer(layout, p.state, prompt, 1);
  const model::ModelConfig& c = TinyModel().config();
  auto assemble = [&](std::vector<kvstore::KvTransferChunk> v, const std::vector<int32_t>& pr) {
    return AssembleTransferredState(c, layout, pr, v).status().code();
  };
  std::vector<kvstore::KvTransferChunk> missing = chunks;
  missing.erase(missing.begin() + 1);
  EXPECT_EQ(assemble(missing, prompt), absl::StatusCode::kDataLoss);
  std::vector<kvstore::KvTransferChunk> twice = chunks;
  twice.push_back(chunks[0]);
  EXPECT_EQ(assemble(twice, prompt), absl::StatusCode::kDataLoss);
  std::vector<kvstore::KvTransferChunk> no_window(chunks.begin(), chunks.end() - 1);
  EXPECT_EQ(assemble(no_window, prompt), absl::StatusCode::kDataLoss);
  std::vector<int32_t> other = prompt;
  other[5] = other[5] == 7 ? 8 : 7;
  EXPECT_EQ(assemble(chunks, other), absl::StatusCode::kDataLoss);  // Blocks of other tokens.
  std::vector<int32_t> longer = prompt;
  longer.push_back(9);
  EXPECT_EQ(assemble(chunks, longer), absl::StatusCode::kDataLoss);  // Window ends elsewhere.
  std::vector<kvstore::KvTransferChunk> corrupt = chunks;
  corrupt[0].payload[corrupt[0].payload.size() / 2] ^= 0x40;
  EXPECT_EQ(assemble(corrupt, prompt), absl::StatusCode::kDataLoss);
  kvstore::KvLayout foreign = layout;
  foreign.model_fingerprint = kFingerprint + 1;
  EXPECT_EQ(AssembleTransferredState(c, foreign, prompt, chunks).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

std::unique_ptr<Engine> MakeEngine() {
  EngineOptions o;
  o.kv.num_blocks = 64;
  o.model_fingerprint = kFingerprint;
  absl::StatusOr<std::unique_ptr<Engine>> e = Engine::Create(&TinyModel(), o);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

TEST(SubmitPrefilledTest, GreedyDecodeFromATransferredStateMatchesTheReference) {
  std::mt19937 rng(11);
  for (int64_t len : {7, 128, 200}) {
    const std::vector<int32_t> prompt = RandomTokens(&rng, len);
    const std::vector<int32_t> want = ReferenceGreedy(prompt, 12);
    // The prefill worker's side: chunked prefill, transfer chunks, first token.
    const Prefilled p = PrefillInChunks(prompt, 128);
    Sampler sampler(SamplingParams{}, 0);
    sampler.AddPromptTokens(prompt);
    SampledToken first = sampler.Sample(p.logits);
    absl::StatusOr<model::SequenceState> state = AssembleTransferredState(
        TinyModel().config(), Layout(), prompt, EncodeTransfer(Layout(), p.state, prompt, 1));
    ASSERT_TRUE(state.ok()) << state.status();
    // The decode worker's side.
    std::unique_ptr<Engine> engine = MakeEngine();
    Collected out;
    ASSERT_TRUE(
        engine->SubmitPrefilled(GreedyRequest("r", prompt, 12, &out), *std::move(state), first, 0).ok());
    RunToCompletion(engine.get());
    EXPECT_EQ(out.Tokens("r"), want) << "prompt of " << len;
    ASSERT_NE(out.Final("r"), nullptr);
    EXPECT_EQ(out.Final("r")->finish, FinishReason::kLength);
    EXPECT_EQ(out.Final("r")->completion_tokens, 12);
    EXPECT_EQ(engine->stats().prefill_tokens_computed, 0);  // Nothing of the prompt was recomputed.
  }
}

TEST(SubmitPrefilledTest, SeededSamplingContinuesExactlyAsAColocatedRun) {
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 40);
  SamplingParams params;
  params.temperature = 0.9f;
  params.top_p = 0.95f;
  params.repetition_penalty = 1.3f;
  params.seed = 1234;
  params.max_tokens = 20;
  params.ignore_eos = true;
  // Colocated.
  std::unique_ptr<Engine> colocated = MakeEngine();
  Collected a;
  EngineRequest r = GreedyRequest("r", prompt, 20, &a);
  r.sampling = params;
  ASSERT_TRUE(colocated->Submit(r).ok());
  RunToCompletion(colocated.get());
  // Disaggregated: the first token drawn by the prefill side's sampler with the same seed.
  const Prefilled p = PrefillInChunks(prompt, 128);
  Sampler sampler(params, *params.seed);
  sampler.AddPromptTokens(prompt);
  SampledToken first = sampler.Sample(p.logits);
  std::unique_ptr<Engine> decode = MakeEngine();
  Collected b;
  EngineRequest r2 = GreedyRequest("r", prompt, 20, &b);
  r2.sampling = params;
  ASSERT_TRUE(decode->SubmitPrefilled(r2, p.state, first, 0).ok());
  RunToCompletion(decode.get());
  EXPECT_EQ(b.Tokens("r"), a.Tokens("r"));
  EXPECT_EQ(b.Tokens("r").size(), 20u);
}

TEST(SubmitPrefilledTest, FirstTokenThatEndsTheRequestFinishesAtOnce) {
  std::mt19937 rng(9);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 10);
  const Prefilled p = PrefillInChunks(prompt, 128);
  std::unique_ptr<Engine> engine = MakeEngine();
  Collected out;
  SampledToken first;
  first.id = 42;
  ASSERT_TRUE(engine->SubmitPrefilled(GreedyRequest("one", prompt, 1, &out), p.state, first, 3).ok());
  EXPECT_FALSE(engine->HasWork());
  EXPECT_EQ(out.Tokens("one"), std::vector<int32_t>{42});
  ASSERT_NE(out.Final("one"), nullptr);
  EXPECT_EQ(out.Final("one")->finish, FinishReason::kLength);
  EXPECT_EQ(out.Final("one")->cached_prompt_tokens, 3);
  // The id is free again.
  ASSERT_TRUE(engine->SubmitPrefilled(GreedyRequest("one", prompt, 1, &out), p.state, first, 0).ok());
}

TEST(SubmitPrefilledTest, BadInputsAreRefusedAndCancelFreesTheSequence) {
  std::mt19937 rng(1);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 20);
  const Prefilled p = PrefillInChunks(prompt, 128);
  std::unique_ptr<Engine> engine = MakeEngine();
  Collected out;
  SampledToken first;
  first.id = 3;
  std::vector<int32_t> longer = prompt;
  longer.push_back(5);
  EXPECT_EQ(engine->SubmitPrefilled(GreedyRequest("a", longer, 4, &out), p.state, first, 0).code(),
            absl::StatusCode::kInvalidArgument);
  EngineRequest two = GreedyRequest("b", prompt, 4, &out);
  two.sampling.n = 2;
  EXPECT_EQ(engine->SubmitPrefilled(two, p.state, first, 0).code(), absl::StatusCode::kInvalidArgument);
  first.id = 100000;
  EXPECT_EQ(engine->SubmitPrefilled(GreedyRequest("c", prompt, 4, &out), p.state, first, 0).code(),
            absl::StatusCode::kInvalidArgument);
  first.id = 3;
  ASSERT_TRUE(engine->SubmitPrefilled(GreedyRequest("d", prompt, 8, &out), p.state, first, 0).ok());
  ASSERT_TRUE(engine->Cancel("d").ok());
  EXPECT_FALSE(engine->HasWork());
  ASSERT_NE(out.Final("d"), nullptr);
  EXPECT_EQ(out.Final("d")->finish, FinishReason::kCancelled);
  EXPECT_EQ(engine->stats().kv_blocks_used, 0);
}

}  // namespace
}  // namespace v4serve::engine
