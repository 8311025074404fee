// The three SWA policies through the tiered KV store (docs/KV_STORE.md): the state rebuilt by each
// policy's recomputation equals the state the sequence had, and greedy output after reuse equals the
// output of a run without any cache (model::Generate) when the prefix comes from this process's pool,
// from the store's host tier, from its disk tier, and from a store reopened from disk (a restart).
#include <filesystem>
#include <random>

#include "engine/engine.h"
#include "engine/state_blocks.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstore/kvstore_service.h"
#include "kvstore/tiered_store.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::Collected;
using testing::GreedyRequest;
using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::RunToCompletion;
using testing::TinyModel;

std::string TempDir(const std::string& name) {
  const char* t = std::getenv("TEST_TMPDIR");
  std::string dir =
      std::string(t ? t : "/tmp") + "/v4serve_kv_tiers_" + name + "_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

// Blocks 0..n-1 of `tokens` as the cache would hold them under `policy` (state only where kept).
std::vector<kvstore::KvBlock> PolicyBlocks(const kvstore::KvLayout& layout,
                                           const std::vector<int32_t>& tokens, int n, SwaPolicy policy,
                                           int64_t interval, model::SequenceState* final_state) {
  const model::Model& m = TinyModel();
  model::SequenceState s = m.NewState();
  std::vector<kvstore::KvBlock> blocks;
  for (int b = 0; b < n; ++b) {
    EXPECT_TRUE(m.Prefill(&s, absl::MakeConstSpan(tokens).subspan(b * 128, 128)).ok());
    auto block = ExtractBlock(m.config(), layout, s, b, absl::MakeConstSpan(tokens).subspan(b * 128, 128), 0);
    EXPECT_TRUE(block.ok()) << block.status();
    if (!KeepsWindowState(policy, interval, b, 128)) block->boundary_state.clear();
    blocks.push_back(*kvstore::DecodeKvBlock(layout, *kvstore::EncodeKvBlock(layout, *block)));
  }
  *final_state = s;
  return blocks;
}

TEST(SwaPolicyTest, RecomputationRebuildsTheExactState) {
  const model::Model& m = TinyModel();
  auto layout = KvLayoutFor(m.config(), 9);
  ASSERT_TRUE(layout.ok());
  std::mt19937 rng(41);
  const std::vector<int32_t> tokens = RandomTokens(&rng, 640);
  struct Case {
    SwaPolicy policy;
    int64_t interval;
    int blocks;
    int64_t want_recomputed;
  };
  // Tiny model: 4 layers x window 16 -> receptive field 80 tokens, inside the last block.
  const Case cases[] = {{SwaPolicy::kFull, 0, 3, 0},
                        {SwaPolicy::kPeriodic, 256, 3, 128},  // Checkpoint after block 1, recompute block 2.
                        {SwaPolicy::kPeriodic, 256, 5, 128},  // Checkpoint after block 3.
                        {SwaPolicy::kZero, 0, 5, 128},        // Fresh window one block back.
                        {SwaPolicy::kZero, 0, 1, 128}};       // Shorter than a block + field: from 0.
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(SwaPolicyName(c.policy)) + " blocks=" + std::to_string(c.blocks));
    model::SequenceState truth;
    std::vector<kvstore::KvBlock> blocks =
        PolicyBlocks(*layout, tokens, c.blocks, c.policy, c.interval, &truth);
    int64_t recomputed = -1;
    auto restored = RestoreWithRecompute(m, *layout, blocks, &recomputed);
    ASSERT_TRUE(restored.ok()) << restored.status();
    EXPECT_EQ(recomputed, c.want_recomputed);
    EXPECT_EQ(restored->position, truth.position);
    for (size_t l = 0; l < truth.layers.size(); ++l) {
      EXPECT_EQ(restored->layers[l].window, truth.layers[l].window) << "layer " << l;
      EXPECT_EQ(restored->layers[l].entries, truth.layers[l].entries) << "layer " << l;
      EXPECT_EQ(restored->layers[l].compressor, truth.layers[l].compressor) << "layer " << l;
      EXPECT_EQ(restored->layers[l].indexer_compressor, truth.layers[l].indexer_compressor) << "layer " << l;
    }
    // And it continues exactly.
    const int32_t next[] = {5, 6, 7};
    auto a = m.Prefill(&truth, next);
    auto b = m.Prefill(&*restored, next);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
  }
  EXPECT_FALSE(ParseSwaPolicy("sometimes").ok());
}

// Greedy tokens of `prompt` from an engine with `store` and `policy`.
struct RunResult {
  std::vector<int32_t> tokens;
  EngineStats stats;
};
RunResult RunOnce(const std::vector<int32_t>& prompt, SwaPolicy policy,
                  std::shared_ptr<kvstore::KvStoreClient> store, int32_t max_tokens) {
  EngineOptions o;
  o.kv.num_blocks = 16;
  o.kv.swa_policy = policy;
  o.kv.swa_checkpoint_tokens = 256;
  o.kv.store = std::move(store);
  o.model_fingerprint = 77;
  auto engine = Engine::Create(&TinyModel(), o);
  EXPECT_TRUE(engine.ok()) << engine.status();
  Collected got;
  EXPECT_TRUE((*engine)->Submit(GreedyRequest("r", prompt, max_tokens, &got)).ok());
  RunToCompletion(engine->get());
  return {got.Tokens("r"), (*engine)->stats()};
}

class PolicyReuseTest : public ::testing::TestWithParam<SwaPolicy> {};

TEST_P(PolicyReuseTest, OutputAfterReuseEqualsOutputWithoutCache) {
  const SwaPolicy policy = GetParam();
  std::mt19937 rng(100 + static_cast<int>(policy));
  // 3 full blocks of shared prefix (periodic: checkpoint after block 1; zero: no state at all).
  const std::vector<int32_t> shared = RandomTokens(&rng, 384);
  std::vector<int32_t> first = shared, second = shared;
  for (int32_t t : RandomTokens(&rng, 40)) first.push_back(t);
  for (int32_t t : RandomTokens(&rng, 57)) second.push_back(t);
  const std::vector<int32_t> want = ReferenceGreedy(second, 6);
  ASSERT_EQ(want.size(), 6u);
  const std::string dir = TempDir(SwaPolicyName(policy));
  kvstore::TieredStoreOptions so;
  so.disk_path = dir;
  so.host_capacity_bytes = 64 << 20;
  {
    auto store = kvstore::TieredStore::Open(so);
    ASSERT_TRUE(store.ok()) << store.status();
    std::shared_ptr<kvstore::TieredStore> s = std::move(*store);
    RunResult a = RunOnce(first, policy, s, 3);
    EXPECT_EQ(a.tokens, ReferenceGreedy(first, 3));
    EXPECT_EQ(a.stats.kv_store_hit_tokens, 0);
    s->Flush();
    EXPECT_EQ(s->stats().disk_blocks, 3);
    // Host tier: a new engine (empty pool), the same store.
    RunResult b = RunOnce(second, policy, s, 6);
    EXPECT_EQ(b.tokens, want) << "from host memory";
    EXPECT_EQ(b.stats.kv_store_hit_tokens, 384);
    EXPECT_EQ(b.stats.kv_recomputed_tokens, policy == SwaPolicy::kFull ? 0 : 128);
    EXPECT_EQ(s->stats().get_hits_host, 3);
    EXPECT_EQ(s->stats().checksum_failures, 0);
  }
  // Disk tier after a restart: the store reopened from its directory (index rebuilt, host tier empty).
  {
    auto store = kvstore::TieredStore::Open(so);
    ASSERT_TRUE(store.ok()) << store.status();
    std::shared_ptr<kvstore::TieredStore> s = std::move(*store);
    EXPECT_EQ(s->stats().disk_blocks, 3);
    EXPECT_EQ(s->stats().host_blocks, 0);
    RunResult c = RunOnce(second, policy, s, 6);
    EXPECT_EQ(c.tokens, want) << "from disk after a restart";
    EXPECT_EQ(c.stats.kv_store_hit_tokens, 384);
    EXPECT_EQ(s->stats().get_hits_disk + s->stats().get_hits_host, 3);  // Prefetch may have promoted some.
    // Window-state records exactly where the policy keeps them.
    const kvstore::DiskTierStats ds = s->disk()->Stats();
    EXPECT_EQ(ds.window_states, policy == SwaPolicy::kFull ? 3 : policy == SwaPolicy::kPeriodic ? 1 : 0);
  }
  std::filesystem::remove_all(dir);
}

// The same through the `v4serve kvstore` gRPC service: two engines share one store over the network,
// and the store restarts (a new process would do the same: open the directory, rebuild the index).
TEST_P(PolicyReuseTest, ThroughTheKvstoreServiceAndAfterItsRestart) {
  const SwaPolicy policy = GetParam();
  std::mt19937 rng(200 + static_cast<int>(policy));
  const std::vector<int32_t> shared = RandomTokens(&rng, 384);
  std::vector<int32_t> first = shared, second = shared;
  for (int32_t t : RandomTokens(&rng, 33)) first.push_back(t);
  for (int32_t t : RandomTokens(&rng, 21)) second.push_back(t);
  const std::vector<int32_t> want = ReferenceGreedy(second, 5);
  const std::string dir = TempDir(std::string("svc_") + SwaPolicyName(policy));
  kvstore::TieredStoreOptions so;
  so.disk_path = dir;
  struct Node {
    std::unique_ptr<kvstore::TieredStore> store;
    std::unique_ptr<kvstore::KvStoreService> service;
    std::unique_ptr<grpc::Server> server;
    std::shared_ptr<kvstore::GrpcKvStoreClient> client;
    ~Node() {
      client.reset();
      if (server) server->Shutdown();
      server.reset();
      service.reset();
      if (store) store->Flush();
    }
  };
  auto start = [&](Node* n) {
    auto store = kvstore::TieredStore::Open(so);
    ASSERT_TRUE(store.ok()) << store.status();
    n->store = std::move(*store);
    n->service = std::make_unique<kvstore::KvStoreService>(n->store.get(), "kvstore");
    grpc::ServerBuilder b;
    int port = 0;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    b.RegisterService(n->service.get());
    n->server = b.BuildAndStart();
    ASSERT_NE(n->server, nullptr);
    n->client = std::make_shared<kvstore::GrpcKvStoreClient>(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  };
  {
    Node node;
    start(&node);
    RunResult a = RunOnce(first, policy, node.client, 2);
    EXPECT_EQ(a.tokens, ReferenceGreedy(first, 2));
    node.client->Flush();
    node.store->Flush();
    RunResult b = RunOnce(second, policy, node.client, 5);
    EXPECT_EQ(b.tokens, want) << "through the service";
    EXPECT_EQ(b.stats.kv_store_hit_tokens, 384);
  }
  {
    Node node;  // Restarted store.
    start(&node);
    EXPECT_EQ(node.store->stats().disk_blocks, 3);
    RunResult c = RunOnce(second, policy, node.client, 5);
    EXPECT_EQ(c.tokens, want) << "through the service after its restart";
    EXPECT_EQ(c.stats.kv_store_hit_tokens, 384);
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Policies, PolicyReuseTest,
                         ::testing::Values(SwaPolicy::kFull, SwaPolicy::kPeriodic, SwaPolicy::kZero),
                         [](const auto& info) { return std::string(SwaPolicyName(info.param)); });

TEST(PolicyReuseTest, InProcessPoolReuseUnderEachPolicy) {
  for (SwaPolicy policy : {SwaPolicy::kFull, SwaPolicy::kPeriodic, SwaPolicy::kZero}) {
    SCOPED_TRACE(SwaPolicyName(policy));
    std::mt19937 rng(7);
    const std::vector<int32_t> shared = RandomTokens(&rng, 520);
    std::vector<int32_t> second = shared;
    for (int32_t t : RandomTokens(&rng, 9)) second.push_back(t);
    EngineOptions o;
    o.kv.num_blocks = 24;
    o.kv.swa_policy = policy;
    o.kv.swa_checkpoint_tokens = 256;
    auto engine = Engine::Create(&TinyModel(), o);
    ASSERT_TRUE(engine.ok());
    Collected got;
    ASSERT_TRUE((*engine)->Submit(GreedyRequest("a", shared, 2, &got)).ok());
    RunToCompletion(engine->get());
    ASSERT_TRUE((*engine)->Submit(GreedyRequest("b", second, 5, &got)).ok());
    RunToCompletion(engine->get());
    EXPECT_EQ(got.Tokens("b"), ReferenceGreedy(second, 5));
    EXPECT_EQ((*engine)->stats().prefix_hit_tokens, 512);
  }
}

}  // namespace
}  // namespace v4serve::engine
