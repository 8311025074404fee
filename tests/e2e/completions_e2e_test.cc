// The router's OpenAI API through the real `v4serve router` binary, in front of fake decode workers that
// stream scripted completions: request validation, chat encoding, streaming vs non-streaming, tool calls,
// stop strings, n > 1, retry when a worker dies, and cancellation when the client goes away.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "grpcpp/create_channel.h"
#include "model/chat_encoder.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "services/grpc_server.h"
#include "tests/testing/fake_worker.h"
#include "tests/testing/http_client.h"
#include "tests/testing/v4serve_process.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve {
namespace {

using testing::FakeWorker;
using ::testing::HasSubstr;
using testing::HttpCall;
using testing::HttpConnection;
using testing::TempDir;
using testing::V4serveProcess;
using Json = nlohmann::json;

const std::string kSource = V4SERVE_TEST_SOURCE_DIR;
const std::string kTokenizer = kSource + "/tests/model/testdata/tokenizer/tokenizer.json";

const model::Tokenizer& Tok() {
  static auto* tok = model::Tokenizer::LoadFromFile(kTokenizer).value().release();
  return *tok;
}

std::vector<int32_t> Ids(const std::string& text) { return Tok().Encode(text); }

class CompletionsE2eTest : public ::testing::Test {
 protected:
  void StartRouter(const std::vector<FakeWorker*>& workers, const std::string& health_interval = "100ms",
                   std::vector<std::string> extra_flags = {}) {
    std::string list;
    for (FakeWorker* w : workers) list += (list.empty() ? "" : ",") + w->address();
    std::vector<std::string> args = {"router",
                                     "--host=127.0.0.1",
                                     "--http_host=127.0.0.1",
                                     "--http_port=0",
                                     "--grpc_port=0",
                                     "--model=" + testing::MakeTestChatModelDir(dir_),
                                     "--decode_workers=" + list,
                                     "--worker_health_interval=" + health_interval};
    args.insert(args.end(), extra_flags.begin(), extra_flags.end());
    auto r = V4serveProcess::Start(args);
    ASSERT_TRUE(r.ok()) << r.status();
    router_ = std::move(*r);
    // 60 s: on a loaded 2-core CI machine beside the heavy e2e suites, 20 s once ran out (the cause was not
    // captured; the status now says what /readyz last answered).
    const absl::Status ready = testing::WaitUntilReady(port(), absl::Seconds(60));
    ASSERT_TRUE(ready.ok()) << ready;
  }
  int port() const { return router_->port("http_port"); }
  Json Post(const std::string& path, const Json& body, int want_status = 200) {
    auto r = HttpCall(port(), "POST", path, body.dump());
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return Json();
    EXPECT_EQ(r->status, want_status) << r->body;
    return Json::parse(r->body, nullptr, false);
  }

  TempDir dir_;
  std::unique_ptr<V4serveProcess> router_;
};

const Json kHi = Json::array({{{"role", "user"}, {"content", "Hi"}}});

TEST_F(CompletionsE2eTest, ChatNonStreamingEncodesThePromptAndReturnsTheCompletion) {
  FakeWorker worker(Ids("Hello there!\n\nHow can I help?<｜end▁of▁sentence｜>"));
  StartRouter({&worker});
  Json body = Post("/v1/chat/completions",
                   {{"model", "tiny-chat"}, {"messages", kHi}, {"temperature", 0}, {"seed", 3}});
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["model"], "tiny-chat");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "Hello there!\n\nHow can I help?");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(body["usage"]["prompt_tokens"], 7);
  EXPECT_GT(body["usage"]["completion_tokens"].get<int>(), 3);
  // The worker got exactly V4's chat encoding of the messages, and the sampling parameters.
  model::ChatEncoder encoder(Tok());
  auto prompt = encoder.Encode(nlohmann::ordered_json(kHi), nlohmann::ordered_json(), {});
  ASSERT_TRUE(prompt.ok());
  v1::GenerateRequest got = worker.last_request();
  EXPECT_EQ(std::vector<int32_t>(got.token_ids().ids().begin(), got.token_ids().ids().end()), prompt->ids);
  EXPECT_EQ(got.sampling().temperature(), 0.0f);
  EXPECT_EQ(got.sampling().seed(), 3u);
}

TEST_F(CompletionsE2eTest, StreamingAgreesWithNonStreaming) {
  FakeWorker worker(Ids("Streaming works, 中文 and emoji 🙂 too.<｜end▁of▁sentence｜>"));
  StartRouter({&worker});
  Json whole = Post("/v1/chat/completions", {{"messages", kHi}});
  auto conn = HttpConnection::Connect(port());
  ASSERT_TRUE(conn.ok());
  Json req = {{"messages", kHi}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
  ASSERT_EQ(*(*conn)->StartRequest("POST", "/v1/chat/completions", req.dump()), 200);
  std::string sse;
  for (int i = 0; i < 1000; ++i) {
    auto chunk = (*conn)->ReadChunk();
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    if (chunk->empty()) break;
    sse += *chunk;
  }
  ASSERT_TRUE(absl::EndsWith(sse, "data: [DONE]\n\n")) << sse;
  std::string content;
  Json usage;
  for (absl::string_view block : absl::StrSplit(sse, "\n\n", absl::SkipEmpty())) {
    if (block == "data: [DONE]") continue;
    Json ev = Json::parse(std::string(block.substr(6)));
    if (ev.contains("usage") && !ev["usage"].is_null()) usage = ev["usage"];
    for (const Json& c : ev["choices"]) {
      if (c["delta"].contains("content")) content += c["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(content, whole["choices"][0]["message"]["content"].get<std::string>());
  EXPECT_EQ(content, "Streaming works, 中文 and emoji 🙂 too.");
  EXPECT_EQ(usage["completion_tokens"], whole["usage"]["completion_tokens"]);
}

TEST_F(CompletionsE2eTest, ToolCallsReasoningAndSeveralChoices) {
  FakeWorker worker(
      Ids("Need weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
          "<｜DSML｜parameter name=\"city\" string=\"true\">Beijing</｜DSML｜parameter>\n"
          "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"));
  StartRouter({&worker});
  Json tools = Json::array(
      {{{"type", "function"},
        {"function",
         {{"name", "get_weather"},
          {"parameters", {{"type", "object"}, {"properties", {{"city", {{"type", "string"}}}}}}}}}}});
  Json body = Post("/v1/chat/completions",
                   {{"messages", kHi}, {"tools", tools}, {"reasoning_effort", "high"}, {"n", 2}});
  ASSERT_EQ(body["choices"].size(), 2u);
  for (const Json& choice : body["choices"]) {
    EXPECT_EQ(choice["finish_reason"], "tool_calls");
    EXPECT_EQ(choice["message"]["reasoning_content"], "Need weather.");
    const Json& call = choice["message"]["tool_calls"][0];
    EXPECT_EQ(call["type"], "function");
    EXPECT_EQ(call["function"]["name"], "get_weather");
    EXPECT_EQ(Json::parse(call["function"]["arguments"].get<std::string>()), Json({{"city", "Beijing"}}));
    EXPECT_TRUE(absl::StartsWith(call["id"].get<std::string>(), "call_"));
  }
  EXPECT_EQ(worker.last_request().sampling().n(), 2);
}

TEST_F(CompletionsE2eTest, StopStringsEndTheAnswerAndCancelTheWorker) {
  FakeWorker worker(Ids("Hello there! General Kenobi.<｜end▁of▁sentence｜>"));
  worker.HangAfter(8);  // would never finish on its own
  StartRouter({&worker});
  Json body = Post("/v1/completions", {{"prompt", "Say hello"}, {"stop", "there"}});
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["choices"][0]["text"], "Hello ");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_TRUE(worker.WaitForCancellations(1, absl::Seconds(10)));
}

TEST_F(CompletionsE2eTest, BadRequestsGetOpenAiErrors) {
  FakeWorker worker(Ids("x"));
  StartRouter({&worker});
  Json e = Post("/v1/chat/completions", {{"messages", kHi}, {"temperature", 5}}, 400);
  EXPECT_EQ(e["error"]["param"], "temperature");
  e = Post("/v1/chat/completions", {{"messages", Json::array({{{"role", "wizard"}, {"content", "x"}}})}},
           400);
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("messages[0]"));
  e = Post("/v1/chat/completions", {{"model", "gpt-4"}, {"messages", kHi}}, 404);
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("tiny-chat"));
  e = Post("/v1/chat/completions", {{"messages", kHi}, {"max_tokens", 100000}}, 400);
  EXPECT_EQ(e["error"]["param"], "max_tokens");
  e = Post("/v1/completions", {{"prompt", std::string(3000, 'a') + " end"}}, 400);
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("context"));
  auto raw = HttpCall(port(), "POST", "/v1/chat/completions", "{not json");
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw->status, 400);
  // A wrong method: 405 naming the ones the route takes, in an Allow header and an OpenAI error.
  for (const auto& [method, path, allow] :
       {std::tuple<const char*, const char*, const char*>{"GET", "/v1/chat/completions", "POST"},
        {"PUT", "/v1/completions", "POST"},
        {"POST", "/healthz", "GET, HEAD"},
        {"DELETE", "/v1/models/tiny-chat", "GET, HEAD"}}) {
    auto r = HttpCall(port(), method, path, "");
    ASSERT_TRUE(r.ok()) << method << " " << path;
    EXPECT_EQ(r->status, 405) << method << " " << path << ": " << r->body;
    EXPECT_EQ(r->headers["allow"], allow) << method << " " << path;
    EXPECT_THAT(Json::parse(r->body)["error"]["message"].get<std::string>(),
                HasSubstr(" accepts " + std::string(allow)));
  }
  EXPECT_EQ(worker.requests(), 0) << "invalid requests must not reach a worker";
}

TEST_F(CompletionsE2eTest, ADyingWorkerIsRetriedElsewhereAndDropped) {
  FakeWorker bad(Ids("never")), good(Ids("Fine.<｜end▁of▁sentence｜>"));
  bad.FailRequests(true);
  // Health checks far apart, so that the bad worker (whose health check passes) cannot come back mid-test.
  StartRouter({&bad, &good}, "60s");
  for (int i = 0; i < 4; ++i) {
    Json body = Post("/v1/chat/completions", {{"messages", kHi}});
    EXPECT_EQ(body["choices"][0]["message"]["content"], "Fine.");
  }
  EXPECT_EQ(bad.requests(), 1) << "a failed worker leaves routing until its next good health check";
  EXPECT_EQ(good.requests(), 4);
}

TEST_F(CompletionsE2eTest, ApiKeysNameTenantsAndLimitsAnswer429) {
  FakeWorker worker(Ids("Fine.<｜end▁of▁sentence｜>"));
  const std::string keys = dir_.path() + "/keys.json";
  std::ofstream(keys) << R"({"keys": [{"key": "sk-acme-0001", "tenant": "acme", "requests_per_minute": 2},
                                      {"key": "sk-beta-0001", "tenant": "beta"}]})";
  StartRouter({&worker}, "100ms", {"--api_keys_file=" + keys});
  const std::string body = Json{{"messages", kHi}}.dump();
  auto r = HttpCall(port(), "POST", "/v1/chat/completions", body);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 401) << r->body;
  EXPECT_EQ(Json::parse(r->body)["error"]["code"], "invalid_api_key");
  r = HttpCall(port(), "GET", "/v1/models", "", {{"Authorization", "Bearer wrong-key-123"}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(worker.requests(), 0);
  for (int i = 0; i < 2; ++i) {
    r = HttpCall(port(), "POST", "/v1/chat/completions", body, {{"Authorization", "Bearer sk-acme-0001"}});
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->status, 200) << r->body;
  }
  EXPECT_EQ(worker.last_request().tenant(), "acme") << "the tenant salts the workers' prefix cache";
  r = HttpCall(port(), "POST", "/v1/chat/completions", body, {{"Authorization", "Bearer sk-acme-0001"}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 429) << r->body;
  EXPECT_EQ(Json::parse(r->body)["error"]["type"], "rate_limit_error");
  // Another tenant is not limited by acme's rate.
  r = HttpCall(port(), "POST", "/v1/chat/completions", body, {{"Authorization", "Bearer sk-beta-0001"}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(worker.last_request().tenant(), "beta");
}

TEST_F(CompletionsE2eTest, QuickInstructionsAppendTheirTaskToken) {
  FakeWorker worker(Ids("A title<｜end▁of▁sentence｜>"));
  StartRouter({&worker});
  const Json convo =
      Json::array({{{"role", "user"}, {"content", "Hi"}}, {{"role", "assistant"}, {"content", "Hello!"}}});
  Json body =
      Post("/v1/chat/completions", {{"messages", convo}, {"v4serve", {{"quick_instruction", "title"}}}});
  EXPECT_EQ(body["choices"][0]["message"]["content"], "A title");
  v1::GenerateRequest sent = worker.last_request();
  std::vector<int32_t> ids(sent.token_ids().ids().begin(), sent.token_ids().ids().end());
  // The conversation's own prompt, then the assistant turn's EOS and the title token: a cached prefix.
  EXPECT_EQ(
      *Tok().Decode(ids),
      "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Hello!<｜end▁of▁sentence｜><｜title｜>");
  Json e =
      Post("/v1/chat/completions", {{"messages", kHi}, {"v4serve", {{"quick_instruction", "title"}}}}, 400);
  EXPECT_EQ(e["error"]["param"], "v4serve.quick_instruction");
  e = Post("/v1/chat/completions", {{"messages", kHi}, {"v4serve", {{"quick_instruction", "poem"}}}}, 400);
  EXPECT_THAT(e["error"]["message"].get<std::string>(), HasSubstr("unknown task"));
  Post("/v1/chat/completions", {{"messages", kHi}, {"v4serve", {{"quick_instruction", "query"}}}});
  sent = worker.last_request();
  ids.assign(sent.token_ids().ids().begin(), sent.token_ids().ids().end());
  EXPECT_EQ(*Tok().Decode(ids), "<｜begin▁of▁sentence｜><｜User｜>Hi<｜query｜>");
}

TEST_F(CompletionsE2eTest, NoHealthyWorkerIs503) {
  FakeWorker worker(Ids("x"));
  StartRouter({&worker});
  worker.FailRequests(true);
  Json e = Post("/v1/chat/completions", {{"messages", kHi}}, 503);
  EXPECT_EQ(e["error"]["type"], "service_unavailable_error");
}

TEST_F(CompletionsE2eTest, ClientDisconnectCancelsTheWorkerCall) {
  FakeWorker worker(Ids("one two three four five six seven eight nine ten<｜end▁of▁sentence｜>"));
  worker.HangAfter(3);
  StartRouter({&worker});
  auto conn = HttpConnection::Connect(port());
  ASSERT_TRUE(conn.ok());
  Json req = {{"messages", kHi}, {"stream", true}};
  ASSERT_EQ(*(*conn)->StartRequest("POST", "/v1/chat/completions", req.dump()), 200);
  auto first = (*conn)->ReadChunk();
  ASSERT_TRUE(first.ok() && !first->empty());
  (*conn)->Close();
  EXPECT_TRUE(worker.WaitForCancellations(1, absl::Seconds(10)));
  EXPECT_EQ(router_->Terminate(absl::Seconds(20)), 0) << "no request may be left hanging at shutdown";
}

}  // namespace
}  // namespace v4serve

namespace v4serve {
namespace {

// The router's public gRPC Inference.Generate runs the same pipeline: chat_json in, text and tool calls out.
TEST_F(CompletionsE2eTest, GrpcGenerateStreamsTextAndToolCalls) {
  FakeWorker worker(
      Ids("Need weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
          "<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"
          "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"));
  StartRouter({&worker});
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(router_->port("grpc_port")),
                                     grpc::InsecureChannelCredentials());
  v1::Inference::Stub stub(channel);
  v1::GenerateRequest req;
  req.set_chat_json(R"({"messages": [{"role": "user", "content": "Weather in Oslo?"}],
      "tools": [{"type": "function", "function": {"name": "get_weather"}}]})");
  req.set_reasoning_mode(v1::REASONING_MODE_THINK_HIGH);
  req.set_stream_text(true);
  grpc::ClientContext ctx;
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse msg;
  std::string reasoning;
  std::vector<v1::ToolCall> calls;
  int tokens = 0;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  v1::Usage usage;
  while (reader->Read(&msg)) {
    reasoning += msg.reasoning_delta();
    tokens += msg.tokens_size();
    for (const auto& c : msg.tool_calls()) calls.push_back(c);
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finish = msg.finish_reason();
    if (msg.has_usage()) usage = msg.usage();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(reasoning, "Need weather.");
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].name(), "get_weather");
  EXPECT_EQ(Json::parse(calls[0].arguments()), Json({{"city", "Oslo"}}));
  EXPECT_EQ(finish, v1::FINISH_REASON_TOOL_CALLS);
  EXPECT_EQ(usage.completion_tokens(), tokens);

  // The same output for a request that offered no tools: the block is content, not a call.
  grpc::ClientContext plain_ctx;
  v1::GenerateRequest plain = req;
  plain.set_chat_json(R"({"messages": [{"role": "user", "content": "Weather in Oslo?"}]})");
  auto plain_reader = stub.Generate(&plain_ctx, plain);
  std::string text;
  int plain_calls = 0;
  finish = v1::FINISH_REASON_UNSPECIFIED;
  while (plain_reader->Read(&msg)) {
    text += msg.text_delta();
    plain_calls += msg.tool_calls_size();
    if (msg.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finish = msg.finish_reason();
  }
  ASSERT_TRUE(plain_reader->Finish().ok());
  EXPECT_EQ(plain_calls, 0);
  EXPECT_THAT(text, HasSubstr("<｜DSML｜invoke name=\"get_weather\">"));
  EXPECT_EQ(finish, v1::FINISH_REASON_STOP);

  // One whole Generate call (responses read and dropped): its final status.
  auto call = [&](const v1::GenerateRequest& r) {
    grpc::ClientContext c;
    auto rd = stub.Generate(&c, r);
    while (rd->Read(&msg)) {
    }
    return rd->Finish();
  };
  v1::GenerateRequest bad;
  bad.set_text("x");
  bad.mutable_sampling()->set_temperature(7);
  grpc::Status st = call(bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("sampling.temperature"));

  // Refused before any worker runs, each naming its field; a long quoted input is cut to fit gRPC's header.
  const int before = worker.requests();
  v1::GenerateRequest r;
  r.set_text("x");
  r.mutable_sampling()->set_temperature(std::nanf(""));
  EXPECT_THAT(call(r).error_message(), HasSubstr("sampling.temperature"));
  r.mutable_sampling()->clear_temperature();
  r.mutable_sampling()->set_repetition_penalty(std::numeric_limits<float>::infinity());
  EXPECT_THAT(call(r).error_message(), HasSubstr("sampling.repetition_penalty"));
  r.mutable_sampling()->clear_repetition_penalty();
  r.set_reasoning_mode(static_cast<v1::ReasoningMode>(99));
  EXPECT_THAT(call(r).error_message(), HasSubstr("reasoning_mode: unknown value 99"));
  r.set_reasoning_mode(v1::REASONING_MODE_UNSPECIFIED);
  r.mutable_sampling()->add_stop_token_ids(1 << 30);
  EXPECT_THAT(call(r).error_message(), HasSubstr("sampling.stop_token_ids[0]"));
  r.mutable_sampling()->clear_stop_token_ids();
  r.set_text("");
  EXPECT_THAT(call(r).error_message(), HasSubstr("text: the prompt is empty"));
  r.set_text("x");
  r.set_model(std::string(20000, 'm'));
  grpc::Status long_model = call(r);
  EXPECT_EQ(long_model.error_code(), grpc::StatusCode::NOT_FOUND)
      << long_model.error_message().substr(0, 200);
  EXPECT_THAT(long_model.error_message(), HasSubstr("bytes)"));
  EXPECT_EQ(worker.requests(), before);

  // stop_token_ids reach the worker (they were dropped).
  v1::GenerateRequest with_stop;
  with_stop.set_text("x");
  with_stop.mutable_sampling()->add_stop_token_ids(7);
  ASSERT_TRUE(call(with_stop).ok());
  ASSERT_EQ(worker.last_request().sampling().stop_token_ids_size(), 1);
  EXPECT_EQ(worker.last_request().sampling().stop_token_ids(0), 7);
}

}  // namespace
}  // namespace v4serve
