// The router's prefix index, the prefix-aware policy, and the KV event subscription that feeds them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "kvstore/prefix_cache.h"
#include "router/kv_event_subscriber.h"
#include "router/prefix_index.h"
#include "router/routing_policy.h"
#include "router/worker_pool.h"
#include "services/admin_service.h"
#include "services/grpc_server.h"
#include "services/shutdown.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::router {
namespace {

constexpr uint64_t kFingerprint = 0xF00D;
constexpr int32_t kBlock = 4;

std::vector<int32_t> Tokens(int n, int32_t first = 1) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

// The event a worker would publish for the complete blocks of `tokens`.
v1::KvEvent Stored(const std::vector<int32_t>& tokens, uint64_t salt = 0, bool snapshot = false) {
  v1::KvEvent e;
  e.set_kind(v1::KvEvent::KIND_STORED);
  e.set_model_fingerprint(kFingerprint);
  e.set_block_tokens(kBlock);
  e.set_snapshot(snapshot);
  for (kvstore::BlockHash h : kvstore::BlockHashChain(tokens, kBlock, kFingerprint, salt)) {
    e.add_blocks()->set_hash(kvstore::BlockHashBytes(h));
  }
  return e;
}

TEST(PrefixIndexTest, MatchesWholeBlocksOfTheLongestCachedPrefixPerHolder) {
  PrefixIndex index;
  index.Apply("a:1", Stored(Tokens(12)));  // 3 blocks
  index.Apply("b:1", Stored(Tokens(8)));   // 2 blocks
  std::vector<int32_t> prompt = Tokens(14);
  std::vector<PrefixMatch> m = index.Match(prompt, 0);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0].holder, "a:1");
  EXPECT_EQ(m[0].cached_tokens, 12);
  EXPECT_EQ(m[1].holder, "b:1");
  EXPECT_EQ(m[1].cached_tokens, 8);
  // A prompt that differs in its first block matches nothing, wherever the later tokens agree.
  std::vector<int32_t> other = prompt;
  other[0] = 999;
  EXPECT_TRUE(index.Match(other, 0).empty());
}

TEST(PrefixIndexTest, TenantsNeverShareAPrefix) {
  PrefixIndex index;
  index.Apply("a:1", Stored(Tokens(8), kvstore::TenantSalt("acme")));
  EXPECT_EQ(index.Match(Tokens(8), kvstore::TenantSalt("acme")).size(), 1u);
  EXPECT_TRUE(index.Match(Tokens(8), kvstore::TenantSalt("other")).empty());
  EXPECT_TRUE(index.Match(Tokens(8), 0).empty());
}

TEST(PrefixIndexTest, EvictionsSnapshotsAndForgettingUpdateTheIndex) {
  PrefixIndex index;
  index.Apply("a:1", Stored(Tokens(12)));
  EXPECT_EQ(index.size(), 3);
  // Evicting the middle block cuts the matched prefix there.
  v1::KvEvent ev;
  ev.set_kind(v1::KvEvent::KIND_EVICTED);
  ev.set_model_fingerprint(kFingerprint);
  ev.set_block_tokens(kBlock);
  auto chain = kvstore::BlockHashChain(Tokens(12), kBlock, kFingerprint, 0);
  ev.add_blocks()->set_hash(kvstore::BlockHashBytes(chain[1]));
  index.Apply("a:1", ev);
  EXPECT_EQ(index.Match(Tokens(12), 0).at(0).cached_tokens, 4);
  // A snapshot replaces what was known.
  index.Apply("a:1", Stored(Tokens(8, 100), 0, /*snapshot=*/true));
  EXPECT_TRUE(index.Match(Tokens(12), 0).empty());
  EXPECT_EQ(index.size(), 2);
  index.Forget("a:1");
  EXPECT_EQ(index.size(), 0);
  // Malformed hashes are skipped and counted, never fatal.
  v1::KvEvent bad = Stored(Tokens(4));
  bad.add_blocks()->set_hash("short");
  index.Apply("b:1", bad);
  EXPECT_EQ(index.skipped(), 1);
  EXPECT_EQ(index.size(), 1);
}

TEST(PrefixIndexTest, SizeIsBounded) {
  PrefixIndex index(/*max_blocks=*/5);
  index.Apply("a:1", Stored(Tokens(40)));  // 10 blocks
  EXPECT_EQ(index.size(), 5);
}

TEST(PrefixAwarePolicyTest, WeighsCachedTokensAgainstLoad) {
  PrefixIndex index;
  index.Apply("a:1", Stored(Tokens(400)));  // 100 blocks of 4 = 400 cached tokens
  PrefixAwarePolicy policy(&index, /*load_penalty_tokens=*/100);
  WorkerInfo a{"a", "a:1"}, b{"b", "b:1"};
  std::vector<int32_t> prompt = Tokens(402);
  RoutingContext rc{.prompt_tokens = 402, .prompt = prompt};
  std::vector<const WorkerInfo*> both = {&b, &a};
  EXPECT_EQ(policy.Choose(both, rc), 1u) << "a holds the prefix";
  a.in_flight = 3;  // cost 2 + 300 < 402
  EXPECT_EQ(policy.Choose(both, rc), 1u);
  a.in_flight = 5;  // cost 2 + 500 > 402: the idle worker wins
  EXPECT_EQ(policy.Choose(both, rc), 0u);
  // Nothing cached: least loaded, ties shared.
  a.in_flight = 0;
  std::vector<int32_t> fresh = Tokens(50, 7000);
  RoutingContext cold{.prompt_tokens = 50, .prompt = fresh};
  size_t first = policy.Choose(both, cold), second = policy.Choose(both, cold);
  EXPECT_NE(first, second);
}

// A worker that serves only health and Worker.KvEvents: a snapshot, then events pushed by the test.
class EventWorker : public v1::Worker::Service {
 public:
  EventWorker() : admin_("decode", "", &shutdown_) {
    services::GrpcServerOptions o;
    o.host = "127.0.0.1";
    server_ = *services::GrpcServer::Start(o, {&admin_, this});
  }
  ~EventWorker() override { Close(); }
  std::string address() const { return "127.0.0.1:" + std::to_string(server_->port()); }
  void Push(v1::KvEvent e) {
    absl::MutexLock l(&mu_);
    queue_.push_back(std::move(e));
  }
  void Close() {
    absl::MutexLock l(&mu_);
    closed_ = true;
  }
  grpc::Status KvEvents(grpc::ServerContext* ctx, const v1::KvEventsRequest*,
                        grpc::ServerWriter<v1::KvEvent>* writer) override {
    writer->Write(Stored(Tokens(8), 0, /*snapshot=*/true));
    while (!ctx->IsCancelled()) {
      std::vector<v1::KvEvent> batch;
      {
        absl::MutexLock l(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(
                                 +[](EventWorker* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
                                   return w->closed_ || !w->queue_.empty();
                                 },
                                 this),
                             absl::Milliseconds(50));
        if (closed_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "closed");
        batch.swap(queue_);
      }
      for (const v1::KvEvent& e : batch) writer->Write(e);
    }
    return grpc::Status::OK;
  }

 private:
  services::ShutdownSignal shutdown_;
  services::AdminService admin_;
  std::unique_ptr<services::GrpcServer> server_;
  absl::Mutex mu_;
  std::vector<v1::KvEvent> queue_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

template <typename Pred>
bool Eventually(Pred pred) {
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

TEST(KvEventSubscriberTest, FollowsWorkersAndForgetsThoseWhoseStreamEnds) {
  EventWorker worker;
  LeastLoadedPolicy policy;
  WorkerPoolOptions po;
  po.decode_targets = {worker.address()};
  po.health_interval = absl::Milliseconds(50);
  auto pool = WorkerPool::Start(po, &policy);
  ASSERT_TRUE(pool.ok()) << pool.status();
  PrefixIndex index;
  KvEventSubscriber sub(pool->get(), &index, {.poll_interval = absl::Milliseconds(20)});
  ASSERT_TRUE(Eventually([&] { return index.Match(Tokens(8), 0).size() == 1; })) << "snapshot not applied";
  worker.Push(Stored(Tokens(16)));
  ASSERT_TRUE(Eventually([&] {
    auto m = index.Match(Tokens(16), 0);
    return m.size() == 1 && m[0].cached_tokens == 16;
  }));
  worker.Close();  // the stream breaks: what the worker held is forgotten
  EXPECT_TRUE(Eventually([&] { return index.size() == 0; }));
}

}  // namespace
}  // namespace v4serve::router
