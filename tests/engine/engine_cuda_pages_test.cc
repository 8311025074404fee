// The engine hands restored KV blocks to the CUDA backend's paged device KV cache as their payloads
// (KvCacheManager::AdoptPages, Model::AdoptKvPages), and a state kept in host memory while swapped keeps its
// device copy (Sequence::swapped_device_tag). Label gpu; skips without a GPU.
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "gtest/gtest.h"
#include "model/cuda/cuda_backend.h"
#include "model/device.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

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
  std::string why;
  absl::StatusOr<model::Device> d = model::ResolveDevice(model::Device::kAuto, &why);
  if (!d.ok() || *d != model::Device::kCuda) GTEST_SKIP() << "no GPU, CUDA engine path not tested: " << why;
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

}  // namespace
}  // namespace v4serve::engine
