// Starts the real v4serve binary on ephemeral loopback ports and checks what an operator relies on:
// health, metrics, admin, clear errors, and a clean exit on SIGTERM.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "services/grpc_server.h"
#include "tests/testing/http_client.h"
#include "tests/testing/v4serve_process.h"
#include "v4serve/v1/admin.grpc.pb.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve {
namespace {

using ::testing::HasSubstr;
using testing::HttpCall;
using testing::RunV4serve;
using testing::TempDir;
using testing::V4serveProcess;

std::shared_ptr<grpc::Channel> Loopback(int port) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
}

TEST(RouterE2eTest, ServesHealthMetricsAndExitsCleanlyOnSigterm) {
  auto router = V4serveProcess::Start({"router", "--host=127.0.0.1", "--http_host=127.0.0.1", "--http_port=0",
                                       "--grpc_port=0", "--metrics_port=0", "--metrics_host=127.0.0.1"});
  ASSERT_TRUE(router.ok()) << router.status();
  V4serveProcess& p = **router;
  auto channel = Loopback(p.port("grpc_port"));
  EXPECT_TRUE(services::CheckHealth(channel, "", absl::Seconds(5)).ok());

  auto healthz = HttpCall(p.port("http_port"), "GET", "/healthz");
  ASSERT_TRUE(healthz.ok()) << healthz.status();
  EXPECT_EQ(healthz->status, 200);

  auto metrics = HttpCall(p.port("http_port"), "GET", "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(metrics->body, HasSubstr("v4serve_build_info{"));
  EXPECT_THAT(metrics->body, HasSubstr("v4serve_http_requests_total{code=\"200\",route=\"/healthz\"} 1"));
  auto exposer = HttpCall(p.port("metrics_port"), "GET", "/metrics");
  ASSERT_TRUE(exposer.ok()) << exposer.status();
  EXPECT_THAT(exposer->body, HasSubstr("process_resident_memory_bytes"));

  v1::Admin::Stub admin(channel);
  grpc::ClientContext ctx;
  v1::ProcessInfo info;
  ASSERT_TRUE(admin.GetInfo(&ctx, v1::GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.role(), "router");
  EXPECT_EQ(info.pid(), p.ready()["pid"].get<int>());

  absl::Time start = absl::Now();
  EXPECT_EQ(p.Terminate(absl::Seconds(20)), 0);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(RouterE2eTest, WithoutWorkersSaysNoModelIsLoaded) {
  auto router = V4serveProcess::Start(
      {"router", "--host=127.0.0.1", "--http_host=127.0.0.1", "--http_port=0", "--grpc_port=0"});
  ASSERT_TRUE(router.ok()) << router.status();
  int http = (*router)->port("http_port");
  for (const char* path : {"/readyz", "/v1/chat/completions"}) {
    auto r = HttpCall(http, path[1] == 'r' ? "GET" : "POST", path, "{}");
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->status, 503) << path;
    auto j = nlohmann::json::parse(r->body);
    EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr("no model is loaded")) << path;
  }
  auto models = HttpCall(http, "GET", "/v1/models");
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(nlohmann::json::parse(models->body)["object"], "list");
  auto missing = HttpCall(http, "GET", "/v2/nothing");
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ(missing->status, 404);

  v1::Inference::Stub inference(Loopback((*router)->port("grpc_port")));
  grpc::ClientContext ctx;
  v1::GenerateRequest req;
  req.set_text("hello");
  auto stream = inference.Generate(&ctx, req);
  v1::GenerateResponse resp;
  EXPECT_FALSE(stream->Read(&resp));
  grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(st.error_message(), HasSubstr("no model is loaded"));
  EXPECT_EQ((*router)->Terminate(absl::Seconds(20)), 0);
}

TEST(UpE2eTest, StartsAnswersHealthzAndStopsCleanly) {
  auto up = V4serveProcess::Start({"up", "--http_port=0", "--grpc_port=0", "--model=/nonexistent-model"});
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_FALSE((*up)->ready()["model_loaded"].get<bool>());
  auto healthz = HttpCall((*up)->port("http_port"), "GET", "/healthz");
  ASSERT_TRUE(healthz.ok()) << healthz.status();
  EXPECT_EQ(healthz->status, 200);
  EXPECT_TRUE(services::CheckHealth(Loopback((*up)->port("grpc_port")), "", absl::Seconds(5)).ok());
  EXPECT_EQ((*up)->Terminate(absl::Seconds(30)), 0);
}

TEST(KvStoreE2eTest, OpensItsDatabaseServesHealthAndDrains) {
  TempDir dir;
  auto kv = V4serveProcess::Start(
      {"kvstore", "--host=127.0.0.1", "--grpc_port=0", "--db_path=" + dir.path() + "/db"});
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_TRUE(services::CheckHealth(Loopback((*kv)->port("grpc_port")), "", absl::Seconds(5)).ok());
  EXPECT_EQ((*kv)->Terminate(absl::Seconds(20)), 0);
  EXPECT_TRUE(std::filesystem::exists(dir.path() + "/db/CURRENT"));
}

TEST(CliE2eTest, UsageErrorsAreClearAndHelpWorksForEveryCommand) {
  std::string out;
  EXPECT_EQ(RunV4serve({"decode", "--grpc_port=0"}, &out), 2);
  EXPECT_THAT(out, HasSubstr("--model: a model directory is required"));
  out.clear();
  EXPECT_EQ(RunV4serve({"decode",
                        "--model=" + std::string(V4SERVE_TEST_SOURCE_DIR) + "/tests/model/testdata/tiny_v4",
                        "--device=gpu"},
                       &out),
            2);
  EXPECT_THAT(out, HasSubstr("--device must be auto, cpu or cuda, not 'gpu'"));
  out.clear();
  EXPECT_EQ(RunV4serve({"router", "--http_port=-5"}, &out), 2);
  EXPECT_THAT(out, HasSubstr("http_port -5 out of range"));
  out.clear();
  EXPECT_EQ(RunV4serve({"frobnicate"}, &out), 2);
  EXPECT_THAT(out, HasSubstr("unknown command 'frobnicate'"));
  for (const char* cmd :
       {"up", "router", "prefill", "decode", "kvstore", "generate", "bench", "kv", "convert", "version"}) {
    out.clear();
    EXPECT_EQ(RunV4serve({cmd, "--help"}, &out), 0) << cmd;
    EXPECT_THAT(out, HasSubstr(std::string("usage: v4serve ") + cmd)) << cmd;
  }
  out.clear();
  EXPECT_EQ(RunV4serve({"version"}, &out), 0);
  EXPECT_THAT(out, HasSubstr("v4serve 0.1.0"));
  EXPECT_THAT(out, HasSubstr("cuda: "));
}

std::string TinyModelDir() { return std::string(V4SERVE_TEST_SOURCE_DIR) + "/tests/model/testdata/tiny_v4"; }

nlohmann::json ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = services::ReadFileToString(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return nlohmann::json::parse(text.value_or("null"));
}

// `v4serve generate` on the tiny checkpoint (FP8 + MXFP4 weights) continues the prompt exactly as
// transformers' DeepseekV4ForCausalLM did when the golden was made (tools/golden/make_goldens.py).
TEST(CliE2eTest, GenerateMatchesTheTransformersGolden) {
  nlohmann::json fx = ReadJson(TinyModelDir() + "/golden.json")["fixtures"]["short"];
  int eos = ReadJson(TinyModelDir() + "/config.json")["eos_token_id"].get<int>();
  std::vector<int> want;
  for (int id : fx["greedy"].get<std::vector<int>>()) {
    want.push_back(id);
    if (id == eos) break;
  }
  std::string ids;
  for (int id : fx["prompt"].get<std::vector<int>>()) absl::StrAppend(&ids, ids.empty() ? "" : ",", id);
  std::string out;
  ASSERT_EQ(RunV4serve({"generate", "--model=" + TinyModelDir(), "--prompt_ids=" + ids,
                        "--max_tokens=" + std::to_string(want.size())},
                       &out),
            0)
      << out;
  std::string want_text;
  for (int id : want) absl::StrAppend(&want_text, want_text.empty() ? "" : ",", id);
  EXPECT_THAT(out, HasSubstr(want_text + "\n"));
}

TEST(CliE2eTest, ConvertInspectDescribesTheCheckpointAndRejectsBadDirs) {
  std::string out;
  ASSERT_EQ(RunV4serve({"convert", "--inspect=" + TinyModelDir()}, &out), 0) << out;
  EXPECT_THAT(out, HasSubstr("param"));
  EXPECT_THAT(out, HasSubstr("KV"));
  out.clear();
  EXPECT_NE(RunV4serve({"convert", "--inspect=/nonexistent-dir"}, &out), 0);
  EXPECT_THAT(out, HasSubstr("/nonexistent-dir"));
  out.clear();
  EXPECT_EQ(RunV4serve({"generate", "--model=" + TinyModelDir(), "--prompt_ids=1,x"}, &out), 2);
  EXPECT_THAT(out, HasSubstr("--prompt_ids: 'x' is not a token id"));
}

}  // namespace
}  // namespace v4serve
