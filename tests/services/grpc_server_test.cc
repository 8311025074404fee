#include "services/grpc_server.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "grpcpp/create_channel.h"
#include "services/admin_service.h"
#include "services/metrics.h"
#include "services/request_id.h"
#include "services/shutdown.h"
#include "services/status_mapping.h"
#include "v4serve/v1/admin.grpc.pb.h"

namespace v4serve::services {
namespace {

using ::testing::HasSubstr;

std::shared_ptr<grpc::Channel> Loopback(int port) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
}

GrpcServerOptions LocalOptions() {
  GrpcServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  return o;
}

TEST(GrpcServerTest, HealthFollowsServingState) {
  ShutdownSignal shutdown;
  AdminService admin("test", "none", &shutdown);
  auto server = GrpcServer::Start(LocalOptions(), {&admin});
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = Loopback((*server)->port());
  EXPECT_TRUE(CheckHealth(channel, "", absl::Seconds(5)).ok());
  (*server)->SetServing(false);
  absl::Status st = CheckHealth(channel, "", absl::Seconds(5));
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(st.message(), HasSubstr("NOT_SERVING"));
}

TEST(GrpcServerTest, AdminReportsIdentityAndTriggersDrain) {
  ShutdownSignal shutdown;
  AdminService admin("prefill", "cuda: not built in", &shutdown);
  auto server = GrpcServer::Start(LocalOptions(), {&admin});
  ASSERT_TRUE(server.ok()) << server.status();
  v1::Admin::Stub stub(Loopback((*server)->port()));
  {
    grpc::ClientContext ctx;
    AttachRequestId(ctx, "req-test-1");
    v1::ProcessInfo info;
    ASSERT_TRUE(stub.GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
    EXPECT_EQ(info.role(), "prefill");
    EXPECT_EQ(info.accelerators(), "cuda: not built in");
    EXPECT_FALSE(info.draining());
  }
  {
    grpc::ClientContext ctx;
    v1::SetLogLevelRequest req;
    req.set_level("shouting");
    v1::SetLogLevelResponse resp;
    grpc::Status st = stub.SetLogLevel(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(st.error_message(), HasSubstr("level: "));
  }
  {
    grpc::ClientContext ctx;
    v1::ShutdownResponse resp;
    ASSERT_TRUE(stub.Shutdown(&ctx, v1::ShutdownRequest(), &resp).ok());
    EXPECT_EQ(shutdown.WaitUntil(absl::Now() + absl::Seconds(5)), "Admin.Shutdown");
  }
}

TEST(GrpcServerTest, BadOptionsAreClearErrors) {
  GrpcServerOptions o = LocalOptions();
  o.port = 70000;
  EXPECT_THAT(GrpcServer::Start(o, {}).status().message(), HasSubstr("grpc_port 70000"));
  o = LocalOptions();
  o.tls.cert_file = "/nonexistent/cert.pem";
  EXPECT_THAT(GrpcServer::Start(o, {}).status().message(), HasSubstr("tls_cert and tls_key"));
  o.tls.key_file = "/nonexistent/key.pem";
  absl::Status st = GrpcServer::Start(o, {}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(st.message(), HasSubstr("/nonexistent/"));
  o = LocalOptions();
  o.tls.cert_file = "c";
  o.tls.key_file = "k";
  o.tls.require_client_cert = true;
  EXPECT_THAT(o.Validate().message(), HasSubstr("tls_ca"));
}

TEST(GrpcServerTest, SecondServerOnABusyPortFails) {
  ShutdownSignal shutdown;
  AdminService admin("test", "none", &shutdown);
  auto first = GrpcServer::Start(LocalOptions(), {&admin});
  ASSERT_TRUE(first.ok());
  GrpcServerOptions o = LocalOptions();
  o.port = (*first)->port();
  AdminService admin2("test", "none", &shutdown);
  absl::Status st = GrpcServer::Start(o, {&admin2}).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
}

TEST(RequestIdTest, NewIdsAreValidAndDistinct) {
  std::string a = NewRequestId(), b = NewRequestId();
  EXPECT_NE(a, b);
  EXPECT_TRUE(IsValidRequestId(a));
  EXPECT_FALSE(IsValidRequestId(""));
  EXPECT_FALSE(IsValidRequestId("bad id"));
  EXPECT_FALSE(IsValidRequestId(std::string(129, 'a')));
  EXPECT_TRUE(IsValidRequestId("client-7:abc.DEF_9"));
}

TEST(MetricsTest, SerializesBuildInfoAndProcessMetrics) {
  MetricsRegistry metrics("decode");
  std::string text = metrics.Serialize();
  EXPECT_THAT(text, HasSubstr("v4serve_build_info{"));
  EXPECT_THAT(text, HasSubstr("role=\"decode\""));
  EXPECT_THAT(text, HasSubstr("process_resident_memory_bytes"));
  EXPECT_THAT(text, HasSubstr("process_cpu_seconds_total"));
  EXPECT_THAT(text, HasSubstr("process_open_fds"));
  auto port = metrics.Expose("127.0.0.1", 0);
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EXPECT_EQ(metrics.Expose("127.0.0.1", 0).status().code(), absl::StatusCode::kFailedPrecondition);
}

bool AcceptsConnections(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

TEST(MetricsTest, DestroyingTheRegistryStopsItsExposer) {
  int port = 0;
  {
    MetricsRegistry metrics("prefill");
    absl::StatusOr<int> p = metrics.Expose("0.0.0.0", 0);  // a wildcard host: the stop wakes it via loopback
    ASSERT_TRUE(p.ok()) << p.status();
    port = *p;
    EXPECT_TRUE(AcceptsConnections(port));
  }
  EXPECT_FALSE(AcceptsConnections(port));
}

TEST(ShutdownSignalTest, FirstReasonWinsAndWaitTimesOut) {
  ShutdownSignal s;
  EXPECT_EQ(s.WaitUntil(absl::Now() + absl::Milliseconds(5)), "");
  EXPECT_FALSE(s.triggered());
  s.Trigger("first");
  s.Trigger("second");
  EXPECT_TRUE(s.triggered());
  EXPECT_EQ(s.Wait(), "first");
}

}  // namespace
}  // namespace v4serve::services
