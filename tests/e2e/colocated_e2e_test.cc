// The colocated worker as users run it: the real `v4serve decode --colocated` binary on loopback,
// serving Inference.Generate from the tiny checkpoint in faithful mode (the workers' default on the CPU).
// Greedy tokens are checked against the PyTorch DeepSeek-style reference's faithful golden
// (tests/model/testdata/tiny_v4/golden_reference.json, itself checked against transformers in exact mode),
// not against our own output.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "grpcpp/create_channel.h"
#include "tests/testing/http_client.h"
#include "tests/testing/v4serve_process.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve {
namespace {

using ::testing::HasSubstr;
using testing::HttpCall;
using testing::V4serveProcess;

std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

nlohmann::json Golden() {
  // Workers serve in faithful mode on the CPU (--numerics=auto): the PyTorch DeepSeek-style reference's
  // faithful greedy tokens (tools/golden/make_ref_goldens.py) for the same 150-token prompt.
  std::ifstream in(TinyDir() + "/golden_reference.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str())["fixtures"]["short_faithful"];
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::vector<v1::GenerateResponse> messages;
  v1::Usage usage;
};

StreamResult Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub.Generate(&ctx, req);
  StreamResult r;
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    for (const auto& t : msg.tokens()) r.tokens.push_back(t.token_id());
    if (msg.has_usage()) r.usage = msg.usage();
    r.messages.push_back(msg);
  }
  r.status = reader->Finish();
  return r;
}

v1::GenerateRequest GreedyRequest(const std::vector<int32_t>& prompt, int max_tokens) {
  v1::GenerateRequest req;
  for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  req.mutable_sampling()->set_ignore_eos(true);
  return req;
}

// The value of an unlabelled sample `name` in a Prometheus text exposition (-1 when absent).
double MetricValue(const std::string& text, const std::string& name) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.size() > name.size() && line.substr(0, name.size()) == name && line[name.size()] == ' ') {
      double v;
      if (absl::SimpleAtod(line.substr(name.size() + 1), &v)) return v;
    }
  }
  return -1;
}

class ColocatedE2eTest : public ::testing::Test {
 protected:
  virtual std::vector<std::string> ExtraFlags() const { return {}; }
  void SetUp() override {
    std::vector<std::string> args = {
        "decode",        "--colocated",      "--model=" + TinyDir(),     "--host=127.0.0.1",
        "--grpc_port=0", "--metrics_port=0", "--metrics_host=127.0.0.1", "--kv_blocks=64"};
    for (const std::string& f : ExtraFlags()) args.push_back(f);
    auto p = V4serveProcess::Start(args, absl::Seconds(120));
    ASSERT_TRUE(p.ok()) << p.status();
    process_ = *std::move(p);
    stub_ = v1::Inference::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(process_->port("grpc_port")), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (process_) {
      EXPECT_EQ(process_->Terminate(absl::Seconds(30)), 0);
    }
  }
  std::string Metrics() {
    auto m = HttpCall(process_->port("metrics_port"), "GET", "/metrics");
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? m->body : "";
  }

  // Metrics are exported after each engine step, which ends just after the step's last stream
  // message: wait (with a deadline) until the engine shows no running sequence.
  std::string MetricsWhenIdle() {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    std::string m;
    do {
      m = Metrics();
    } while (MetricValue(m, "v4serve_engine_running_sequences") != 0 && absl::Now() < deadline);
    return m;
  }

  std::unique_ptr<V4serveProcess> process_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};

TEST_F(ColocatedE2eTest, ConcurrentGreedyStreamsMatchTheGoldenAndReuseThePrefix) {
  nlohmann::json fx = Golden();
  const std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
  std::vector<int32_t> want = fx["greedy"].get<std::vector<int32_t>>();
  want.resize(16);
  std::vector<StreamResult> results(4);
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] { results[i] = Generate(*stub_, GreedyRequest(prompt, 16)); });
  }
  for (auto& t : threads) t.join();
  for (const StreamResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, want);
    EXPECT_EQ(r.messages.back().finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(r.usage.prompt_tokens(), 150);
    EXPECT_EQ(r.usage.completion_tokens(), 16);
  }
  // Now the first 128-token block is cached: a later request computes only its tail.
  StreamResult again = Generate(*stub_, GreedyRequest(prompt, 16));
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.tokens, want);
  EXPECT_EQ(again.usage.cached_prompt_tokens(), 128);
  const std::string metrics = MetricsWhenIdle();
  EXPECT_GE(MetricValue(metrics, "v4serve_engine_prefix_hit_tokens_total"), 128);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_generated_tokens_total"), 5 * 16);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_time_to_first_token_seconds_count"), 5);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_inter_token_seconds_count"), 5 * 15);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_running_sequences"), 0);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_kv_blocks_free") +
                MetricValue(metrics, "v4serve_engine_kv_blocks_used"),
            64);
  EXPECT_GE(MetricValue(metrics, "v4serve_engine_kv_blocks_cached"), 1);
}

TEST_F(ColocatedE2eTest, SeededSamplingIsReproducibleAndNChoicesStream) {
  std::vector<int32_t> prompt;
  prompt.reserve(40);
  for (int i = 0; i < 40; ++i) prompt.push_back(2 + (i * 37) % 500);
  v1::GenerateRequest req = GreedyRequest(prompt, 12);
  req.mutable_sampling()->set_temperature(1.0f);
  req.mutable_sampling()->set_top_p(0.9f);
  req.mutable_sampling()->set_seed(1234);
  req.mutable_sampling()->set_n(3);
  req.mutable_sampling()->set_top_logprobs(2);
  StreamResult a = Generate(*stub_, req);
  StreamResult b = Generate(*stub_, req);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_TRUE(b.status.ok());
  EXPECT_EQ(a.tokens.size(), 36u);
  EXPECT_EQ(a.usage.completion_tokens(), 36);
  // Per choice, the same seed gives the same tokens (messages may batch differently).
  auto per_choice = [](const StreamResult& r) {
    std::vector<std::vector<int32_t>> c(3);
    for (const auto& m : r.messages) {
      for (const auto& t : m.tokens()) {
        c[m.choice_index()].push_back(t.token_id());
        EXPECT_EQ(t.top_logprobs_size(), 2);
        EXPECT_LE(t.logprob(), 0.0f);
      }
    }
    return c;
  };
  EXPECT_EQ(per_choice(a), per_choice(b));
  EXPECT_NE(per_choice(a)[0], per_choice(a)[1]);  // Choices draw differently (seed + index).
}

TEST_F(ColocatedE2eTest, BadRequestsGetClearErrorsAndCancelFreesTheSequence) {
  v1::GenerateRequest text;
  text.set_text("hello");
  StreamResult r = Generate(*stub_, text);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("token_ids"));
  v1::GenerateRequest bad = GreedyRequest({5, 6, 999999}, 4);
  r = Generate(*stub_, bad);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = GreedyRequest({5, 6, 7}, 4);
  bad.mutable_sampling()->set_top_p(1.5f);
  r = Generate(*stub_, bad);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("top_p"));

  // A long generation cancelled by the client after its first message.
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, GreedyRequest({5, 6, 7, 8}, 4000));
  v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  ctx.TryCancel();
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The engine ends the sequence and frees its blocks (wait on the condition with a deadline).
  const std::string metrics = MetricsWhenIdle();
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_running_sequences"), 0);
  EXPECT_LT(MetricValue(metrics, "v4serve_engine_generated_tokens_total"), 4000);
  EXPECT_EQ(MetricValue(metrics, "v4serve_engine_kv_blocks_used"),
            MetricValue(metrics, "v4serve_engine_kv_blocks_cached"));
}

// `--mtp`: the same greedy tokens as the golden, with drafts verified and the MTP families exported.
class ColocatedMtpE2eTest : public ColocatedE2eTest {
 protected:
  std::vector<std::string> ExtraFlags() const override { return {"--mtp"}; }
};

TEST_F(ColocatedMtpE2eTest, GreedyStreamsMatchTheGoldenWithMtp) {
  nlohmann::json fx = Golden();
  const std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
  std::vector<int32_t> want = fx["greedy"].get<std::vector<int32_t>>();
  want.resize(16);
  std::vector<StreamResult> results(3);
  std::vector<std::thread> threads;
  threads.reserve(3);
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] { results[i] = Generate(*stub_, GreedyRequest(prompt, 16)); });
  }
  for (auto& t : threads) t.join();
  for (const StreamResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, want);
  }
  const std::string metrics = MetricsWhenIdle();
  const double drafts = MetricValue(metrics, "v4serve_engine_mtp_draft_tokens_total");
  const double accepted = MetricValue(metrics, "v4serve_engine_mtp_accepted_tokens_total");
  const double rate = MetricValue(metrics, "v4serve_engine_mtp_acceptance_rate");
  EXPECT_GT(drafts, 0);
  EXPECT_GE(accepted, 0);
  EXPECT_LE(accepted, drafts);
  EXPECT_NEAR(rate, accepted / drafts, 1e-9);
}

}  // namespace
}  // namespace v4serve
