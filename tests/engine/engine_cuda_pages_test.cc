// The engine hands KV blocks to the CUDA backend's paged device KV cache as their payloads: blocks restored
// from the prefix cache (KvCacheManager::AdoptPages) and blocks a prefill worker sent (Engine::
// SubmitPrefilled, which then keeps the state serialized in the swapped queue: the state's device tag must
// survive that, Sequence::swapped_device_tag). Label gpu; skips without a GPU.
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_transfer_codec.h"
#include "engine/state_blocks.h"
#include "gtest/gtest.h"
#include "model/cuda/cuda_backend.h"
#include "model/device.h"
#include "tests/engine/engine_test_util.h"
#include "tests/model/cuda_test_util.h"

namespace v4serve::engine {
namespace {

using model::HaveGpu;  // SKIP_WITHOUT_GPU (tests/model/cuda_test_util.h).
using testing::Collected;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::RunToCompletion;

std::unique_ptr<model::Model> LoadCuda() {
  model::ModelOptions o;
  o.device = model::Device::kCuda;
  o.cuda_weights = model::CudaWeights::kF32;
  auto m = model::Model::Load(testing::TinyDir(), o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// Greedy tokens of `prompt` on `model` through an engine, and the engine's stats after it.
std::vector<int32_t> RunEngine(const model::Model& model, bool prefix_cache,
                               const std::vector<std::vector<int32_t>>& prompts, EngineStats* stats) {
  EngineOptions o;
  o.kv.enable_prefix_cache = prefix_cache;
  auto engine = Engine::Create(&model, o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  Collected sink;
  std::vector<int32_t> last;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string id = "r" + std::to_string(i);
    EXPECT_TRUE((*engine)->Submit(GreedyRequest(id, prompts[i], 6, &sink)).ok());
    RunToCompletion(engine->get());
    last = sink.Tokens(id);
  }
  *stats = (*engine)->stats();
  return last;
}

TEST(EngineCudaPagesTest, RestoredPrefixBlocksAreAdoptedAndDecodeTheSame) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<model::Model> gpu = LoadCuda();
  ASSERT_NE(gpu, nullptr);
  std::mt19937 rng(21);
  const std::vector<int32_t> first = RandomTokens(&rng, 300);
  std::vector<int32_t> second(first.begin(), first.begin() + 256);  // Two shared blocks, then its own.
  const std::vector<int32_t> tail = RandomTokens(&rng, 40);
  second.insert(second.end(), tail.begin(), tail.end());
  EngineStats cached, plain;
  const std::vector<int32_t> with_cache = RunEngine(*gpu, true, {first, second}, &cached);
  const std::vector<int32_t> without = RunEngine(*gpu, false, {second}, &plain);
  EXPECT_EQ(cached.prefix_hit_tokens, 256);
  EXPECT_EQ(cached.kv_pages_adopted, 2) << "the two restored blocks went to the device as they are";
  EXPECT_EQ(plain.kv_pages_adopted, 0);
  ASSERT_EQ(with_cache.size(), 6u);
  EXPECT_EQ(with_cache, without) << "adopted pages decode as the computed prompt does";
}

// A prompt computed "elsewhere" (the same model, as a prefill worker would), sent as transfer chunks of one
// layer each, assembled with its pages and submitted: the first step after swap-in finds the adopted device
// copy (nothing uploaded), and the tokens equal those of the same request computed here.
TEST(EngineCudaPagesTest, TransferredBlocksAreAdoptedAndSurviveTheSwapQueue) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<model::Model> gpu = LoadCuda();
  ASSERT_NE(gpu, nullptr);
  absl::StatusOr<kvstore::KvLayout> layout = KvLayoutFor(gpu->config(), 1);
  ASSERT_TRUE(layout.ok()) << layout.status();
  std::mt19937 rng(5);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 300);
  model::SequenceState sent = gpu->NewState();
  absl::StatusOr<std::vector<float>> logits = gpu->Prefill(&sent, prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  SampledToken first;
  first.id = model::ArgmaxOfRows(*logits, 1)[0];
  const std::vector<kvstore::KvTransferChunk> chunks = testing::EncodeTransfer(*layout, sent, prompt, 1);
  std::vector<std::string> pages;
  absl::StatusOr<model::SequenceState> state =
      AssembleTransferredState(gpu->config(), *layout, prompt, chunks, &pages);
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_EQ(pages.size(), 2u);

  auto engine = Engine::Create(gpu.get(), EngineOptions());
  ASSERT_TRUE(engine.ok()) << engine.status();
  Collected sink;
  ASSERT_TRUE((*engine)
                  ->SubmitPrefilled(GreedyRequest("p", prompt, 6, &sink), *std::move(state), first, 0, pages)
                  .ok());
  // Step until the first decode forward (the second token): swap-in may take a step of its own.
  for (int i = 0; i < 10 && sink.Tokens("p").size() < 2; ++i) ASSERT_TRUE((*engine)->Step().ok());
  ASSERT_EQ(sink.Tokens("p").size(), 2u);
  absl::StatusOr<model::cuda::ForwardCounters> k = model::cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_cached, 1) << "the adopted copy kept its tag through the swapped queue";
  EXPECT_EQ(k->states_uploaded, 0);
  RunToCompletion(engine->get());
  EXPECT_EQ((*engine)->stats().kv_pages_adopted, 2);
  EngineStats plain;
  const std::vector<int32_t> here = RunEngine(*gpu, false, {prompt}, &plain);
  EXPECT_EQ(sink.Tokens("p"), here);
}

}  // namespace
}  // namespace v4serve::engine
