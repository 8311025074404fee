#include "router/worker_pool.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "services/admin_service.h"
#include "services/grpc_server.h"
#include "services/shutdown.h"

namespace v4serve::router {
namespace {

using ::testing::HasSubstr;

// A process-less worker: a gRPC server with health (and Admin, so it has a service to serve).
struct FakeWorker {
  FakeWorker() : admin("decode", "", &shutdown) {
    services::GrpcServerOptions o;
    o.host = "127.0.0.1";
    server = *services::GrpcServer::Start(o, {&admin});
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }
  services::ShutdownSignal shutdown;
  services::AdminService admin;
  std::unique_ptr<services::GrpcServer> server;
};

WorkerPoolOptions Options(std::vector<std::string> decode, std::vector<std::string> prefill = {}) {
  WorkerPoolOptions o;
  o.decode_targets = std::move(decode);
  o.prefill_targets = std::move(prefill);
  o.health_interval = absl::Milliseconds(50);
  o.health_timeout = absl::Seconds(1);
  return o;
}

// Waits (with a deadline) until `pred(snapshot)` holds.
template <typename Pred>
bool Eventually(WorkerPool& pool, Pred pred) {
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline) {
    if (pred(pool.Snapshot())) return true;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return false;
}

TEST(WorkerPoolTest, HealthyWorkersAreReadyAndLoadIsSpread) {
  FakeWorker a, b;
  LeastLoadedPolicy policy;
  auto pool = WorkerPool::Start(Options({a.address(), b.address()}), &policy);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_TRUE((*pool)->AwaitReady(absl::Now() + absl::Seconds(10)).ok());
  auto first = (*pool)->Pick(WorkerRole::kDecode, {});
  auto second = (*pool)->Pick(WorkerRole::kDecode, {});
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_NE(first->address(), second->address()) << "least-loaded must not stack requests on one worker";
  for (const WorkerInfo& w : (*pool)->Snapshot()) EXPECT_EQ(w.in_flight, 1) << w.address;
  *first = WorkerLease();
  int total = 0;
  for (const WorkerInfo& w : (*pool)->Snapshot()) total += w.in_flight;
  EXPECT_EQ(total, 1);
  EXPECT_EQ((*pool)->Pick(WorkerRole::kPrefill, {}).status().code(), absl::StatusCode::kUnavailable);
}

TEST(WorkerPoolTest, DrainingOrFailedWorkersLeaveRouting) {
  FakeWorker a, b;
  LeastLoadedPolicy policy;
  auto pool = WorkerPool::Start(Options({a.address(), b.address()}), &policy);
  ASSERT_TRUE(pool.ok());
  a.server->SetServing(false);  // what a draining worker reports
  ASSERT_TRUE(Eventually(**pool, [&](const std::vector<WorkerInfo>& ws) {
    for (const WorkerInfo& w : ws) {
      if (w.address == a.address()) return !w.healthy;
    }
    return false;
  }));
  for (int i = 0; i < 5; ++i) EXPECT_EQ((*pool)->Pick(WorkerRole::kDecode, {})->address(), b.address());
  (*pool)->ReportFailure(WorkerRole::kDecode, b.address(), absl::UnavailableError("connection refused"));
  absl::Status st = (*pool)->Pick(WorkerRole::kDecode, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr("no healthy decode worker"));
  EXPECT_FALSE((*pool)->Ready().ok());
  a.server->SetServing(true);  // comes back through its health check
  EXPECT_TRUE((*pool)->AwaitReady(absl::Now() + absl::Seconds(10)).ok());
}

TEST(WorkerPoolTest, DeadWorkerIsNotReadyAndSaysWhy) {
  std::string address;
  {
    FakeWorker gone;
    address = gone.address();
  }
  LeastLoadedPolicy policy;
  auto pool = WorkerPool::Start(Options({address}), &policy);
  ASSERT_TRUE(pool.ok());
  absl::Status ready = (*pool)->Ready();
  EXPECT_EQ(ready.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(ready.message(), HasSubstr(address));
}

TEST(WorkerPoolTest, NamesResolveToEveryAddress) {
  FakeWorker a;
  std::string port = std::to_string(a.server->port());
  auto addrs = ResolveTarget("localhost:" + port);
  ASSERT_TRUE(addrs.ok()) << addrs.status();
  EXPECT_THAT(*addrs, ::testing::Contains("127.0.0.1:" + port));
  LeastLoadedPolicy policy;
  auto pool = WorkerPool::Start(Options({"localhost:" + port}), &policy);
  ASSERT_TRUE(pool.ok());
  EXPECT_TRUE((*pool)->AwaitReady(absl::Now() + absl::Seconds(10)).ok());
  EXPECT_EQ(ResolveTarget("no-such-host.invalid:1").status().code(), absl::StatusCode::kUnavailable);
}

TEST(WorkerPoolTest, BadTargetsAreRejected) {
  LeastLoadedPolicy policy;
  EXPECT_THAT(WorkerPool::Start(Options({"nohostport"}), &policy).status().message(),
              HasSubstr("decode_workers: 'nohostport' is not host:port"));
  EXPECT_THAT(WorkerPool::Start(Options({}, {"h:99999"}), &policy).status().message(),
              HasSubstr("prefill_workers"));
  EXPECT_THAT(MakeRoutingPolicy({.name = "random"}).status().message(), HasSubstr("--routing_policy"));
  EXPECT_THAT(MakeRoutingPolicy({.name = "prefix_aware"}).status().message(), HasSubstr("prefix index"));
}

}  // namespace
}  // namespace v4serve::router
