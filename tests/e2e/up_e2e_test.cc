// `v4serve up` end to end: router (tokenizer, OpenAI API) -> decode worker -> prefill worker (prompt KV
// pushed back over gRPC) -> decode worker (engine + CPU model) -> text.
//  * On the random-weight test checkpoint, the tokens must be the ones the PyTorch DeepSeek-style reference
//    produced in faithful mode (what the workers serve on the CPU) for the same weights and prompt
//    (tests/model/testdata/tiny_v4/golden_reference.json), so this checks every layer of the serving path
//    against an independent reference.
//  * With no --model, `up` serves the shipped trained model (models/tiny-v4): it must call the calculator
//    tool with the right arguments, answer from the tool's result and title a conversation through the
//    <｜title｜> quick instruction, and answer the README's recall question with the record asked for.
//    (tests/e2e/tiny_model_e2e_test.cc measures its accuracy.)
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "services/grpc_server.h"
#include "tests/testing/http_client.h"
#include "tests/testing/v4serve_process.h"

namespace v4serve {
namespace {

using Json = nlohmann::json;
const std::string kTiny = std::string(V4SERVE_TEST_SOURCE_DIR) + "/tests/model/testdata/tiny_v4";

Json ReadJson(const std::string& path) { return Json::parse(services::ReadFileToString(path).value()); }

TEST(UpE2eTest, ServesTheTinyModelAndMatchesTheFaithfulReference) {
  // Faithful mode (what workers serve on the CPU) against the PyTorch reference's faithful greedy tokens.
  Json fx = ReadJson(kTiny + "/golden_reference.json")["fixtures"]["short_faithful"];
  int eos = ReadJson(kTiny + "/config.json")["eos_token_id"].get<int>();
  std::vector<int32_t> want;
  for (int id : fx["greedy"].get<std::vector<int>>()) {
    if (id == eos) break;
    want.push_back(id);
    if (want.size() == 24) break;
  }
  auto tok = model::Tokenizer::LoadFromFile(kTiny + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::string want_text = (*tok)->Decode(want, /*skip_special_tokens=*/true).value();

  auto up = testing::V4serveProcess::Start({"up", "--model=" + kTiny, "--http_port=0", "--grpc_port=0"},
                                           absl::Seconds(120));
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_TRUE((*up)->ready()["model_loaded"].get<bool>());
  int port = (*up)->port("http_port");
  auto models = testing::HttpCall(port, "GET", "/v1/models");
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(Json::parse(models->body)["data"][0]["id"], "tiny_v4");
  auto one = testing::HttpCall(port, "GET", "/v1/models/tiny_v4");
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->status, 200) << one->body;
  EXPECT_EQ(Json::parse(one->body)["id"], "tiny_v4");
  auto none = testing::HttpCall(port, "GET", "/v1/models/other");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->status, 404) << none->body;
  EXPECT_EQ(Json::parse(none->body)["error"]["message"], "model 'other' does not exist");

  Json req = {
      {"model", "tiny_v4"}, {"prompt", fx["prompt"]}, {"max_tokens", want.size()}, {"temperature", 0}};
  auto r = testing::HttpCall(port, "POST", "/v1/completions", req.dump(), {}, absl::Seconds(120));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  Json body = Json::parse(r->body);
  EXPECT_EQ(body["choices"][0]["text"], want_text);
  EXPECT_EQ(body["usage"]["completion_tokens"], static_cast<int>(want.size()));
  EXPECT_EQ(body["usage"]["prompt_tokens"], static_cast<int>(fx["prompt"].size()));

  // Streaming gives the same text; a repeat of the prompt is served from the prefix cache.
  auto conn = testing::HttpConnection::Connect(port);
  ASSERT_TRUE(conn.ok());
  req["stream"] = true;
  req["stream_options"] = {{"include_usage", true}};
  ASSERT_EQ(*(*conn)->StartRequest("POST", "/v1/completions", req.dump()), 200);
  std::string sse;
  for (int i = 0; i < 10000; ++i) {
    auto chunk = (*conn)->ReadChunk(absl::Seconds(120));
    ASSERT_TRUE(chunk.ok()) << chunk.status();
    if (chunk->empty()) break;
    sse += *chunk;
  }
  std::string text;
  Json usage;
  for (absl::string_view block : absl::StrSplit(sse, "\n\n", absl::SkipEmpty())) {
    if (block == "data: [DONE]") continue;
    Json ev = Json::parse(std::string(block.substr(6)));
    if (ev.contains("usage") && !ev["usage"].is_null()) usage = ev["usage"];
    for (const Json& c : ev["choices"]) text += c["text"].get<std::string>();
  }
  EXPECT_EQ(text, want_text);
  EXPECT_GT(usage["prompt_tokens_details"]["cached_tokens"].get<int>(), 0)
      << "the repeat should hit the prefix cache";

  // Both requests were disaggregated: the prefill worker computed the prompt (the repeat only its tail)
  // and the decode worker received the KV; nothing fell back.
  const Json& workers = (*up)->ready()["workers"];
  auto metrics = [&](const char* role) {
    auto m = testing::HttpCall(workers[role]["metrics_port"].get<int>(), "GET", "/metrics");
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? m->body : std::string();
  };
  auto value = [](const std::string& text, const std::string& prefix) {
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      if (absl::StartsWith(line, prefix)) return std::stod(std::string(line.substr(line.rfind(' ') + 1)));
    }
    return -1.0;
  };
  const std::string pm = metrics("prefill"), dm = metrics("decode");
  const double prompt_len = static_cast<double>(fx["prompt"].size());
  EXPECT_EQ(value(pm, "v4serve_prefill_tokens_total "), 2 * prompt_len - 128);
  EXPECT_EQ(value(pm, "v4serve_prefill_prefix_hit_tokens_total "), 128);
  EXPECT_EQ(value(dm, "v4serve_decode_kv_transfers_total{result=\"ok\",transport=\"grpc\"} "), 2);
  EXPECT_EQ(value(dm, "v4serve_decode_kv_fallbacks_total"), -1) << "no fallback was counted";
  EXPECT_EQ((*up)->Terminate(absl::Seconds(60)), 0);
}

// The README's examples with the shipped model: calculator tool call, the answer from the tool's result, a
// title through the quick instruction, and key-value recall.
TEST(UpE2eTest, ServesTheShippedTrainedModelByDefault) {
  auto up = testing::V4serveProcess::Start({"up", "--http_port=0", "--grpc_port=0"}, absl::Seconds(120));
  ASSERT_TRUE(up.ok()) << up.status();
  ASSERT_TRUE((*up)->ready()["model_loaded"].get<bool>()) << "models/tiny-v4 should load by default";
  int port = (*up)->port("http_port");
  auto models = testing::HttpCall(port, "GET", "/v1/models");
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(Json::parse(models->body)["data"][0]["id"], "tiny-v4");

  Json tools = Json::parse(R"([{"type": "function", "function": {"name": "calculator",
      "description": "Evaluate an arithmetic expression", "parameters": {"type": "object",
      "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}])");
  Json req = {{"model", "tiny-v4"},
              {"messages", {{{"role", "user"}, {"content", "Use the calculator to compute 3141 * 59."}}}},
              {"tools", tools},
              {"max_tokens", 80},
              {"temperature", 0}};
  auto r = testing::HttpCall(port, "POST", "/v1/chat/completions", req.dump(), {}, absl::Seconds(120));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  Json choice = Json::parse(r->body)["choices"][0];
  EXPECT_EQ(choice["finish_reason"], "tool_calls") << r->body;
  ASSERT_EQ(choice["message"]["tool_calls"].size(), 1u) << r->body;
  Json call = choice["message"]["tool_calls"][0]["function"];
  EXPECT_EQ(call["name"], "calculator");
  EXPECT_EQ(Json::parse(call["arguments"].get<std::string>()), Json({{"expression", "3141 * 59"}}));

  // The tool's result goes back as a tool message; the model answers with it.
  req["messages"].push_back(choice["message"]);
  req["messages"].push_back(
      {{"role", "tool"}, {"tool_call_id", choice["message"]["tool_calls"][0]["id"]}, {"content", "185319"}});
  r = testing::HttpCall(port, "POST", "/v1/chat/completions", req.dump(), {}, absl::Seconds(120));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(Json::parse(r->body)["choices"][0]["message"]["content"], "The result is 185319.");

  // <｜title｜> (a quick instruction, docs/API.md): the conversation with v4serve.quick_instruction; the
  // router appends the task token after the assistant turn's end of sentence.
  Json title = {
      {"model", "tiny-v4"},
      {"messages", Json::array({{{"role", "user"}, {"content", "Use the calculator to compute 3141 * 59."}},
                                {{"role", "assistant"}, {"content", "The result is 185319."}}})},
      {"v4serve", {{"quick_instruction", "title"}}},
      {"max_tokens", 24},
      {"temperature", 0}};
  r = testing::HttpCall(port, "POST", "/v1/chat/completions", title.dump(), {}, absl::Seconds(120));
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(Json::parse(r->body)["choices"][0]["message"]["content"], "Product of 3141 and 59");

  // The README's recall example: the model answers with the record of the key it is asked for.
  const std::string haystack =
      "Remember the codes. the river was late nodar511 and the north house of stone. kikir743 team by the "
      "road with a small light. green water in the early year. the city after one party\nWhat is the code "
      "of ";
  for (const auto& [key, record] : {std::pair{"kikir", " kikir743"}, std::pair{"nodar", " nodar511"}}) {
    Json recall = {{"model", "tiny-v4"},
                   {"messages", {{{"role", "user"}, {"content", haystack + key + "?"}}}},
                   {"temperature", 0}};
    r = testing::HttpCall(port, "POST", "/v1/chat/completions", recall.dump(), {}, absl::Seconds(120));
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->status, 200) << r->body;
    EXPECT_EQ(Json::parse(r->body)["choices"][0]["message"]["content"], record) << key;
  }
  EXPECT_EQ((*up)->Terminate(absl::Seconds(60)), 0);
}

}  // namespace
}  // namespace v4serve
