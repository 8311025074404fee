// ChatEncoder vs DeepSeek's reference encode_messages(): byte-identical prompts and HF-identical ids on the
// fixtures from tools/chat/gen_chat_fixtures.py, plus the errors a client gets for malformed requests.
#include "model/chat_encoder.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <sstream>

#include "model/internal/chat_py_json.h"
#include "tests/model/tokenizer_test_util.h"

namespace v4serve::model {
namespace {

using Json = nlohmann::ordered_json;
using ::testing::HasSubstr;

// V4SERVE_CHAT_CASES replaces the committed chat cases, e.g. with DeepSeek's own tests converted by
// tools/chat/official_cases.py.
std::vector<Json> LoadCases(const std::string& file) {
  std::vector<Json> cases;
  const char* override_path = std::getenv("V4SERVE_CHAT_CASES");
  const bool use_override = override_path != nullptr && file == "chat/chat_cases.jsonl";
  std::istringstream lines(
      testing::ReadFileOrDie(use_override ? override_path : testing::TestDataPath(file)));
  std::string line;
  while (std::getline(lines, line)) cases.push_back(Json::parse(line));
  return cases;
}

ChatEncodeOptions OptionsOf(const Json& c) {
  ChatEncodeOptions o;
  o.thinking_mode = c["thinking_mode"] == "thinking" ? ThinkingMode::kThinking : ThinkingMode::kChat;
  if (c["reasoning_effort"] == "max") o.reasoning_effort = ReasoningEffort::kMax;
  if (c["reasoning_effort"] == "high") o.reasoning_effort = ReasoningEffort::kHigh;
  o.drop_thinking = c["drop_thinking"].get<bool>();
  return o;
}

TEST(ChatEncoderTest, PromptsAreByteIdenticalToReference) {
  const auto cases = LoadCases("chat/chat_cases.jsonl");
  ASSERT_GE(cases.size(), std::getenv("V4SERVE_CHAT_CASES") != nullptr ? 1u : 30u);
  size_t identical = 0;
  for (const Json& c : cases) {
    auto prompt = RenderChatPrompt(c["messages"], Json(), OptionsOf(c));
    ASSERT_TRUE(prompt.ok()) << c["name"] << ": " << prompt.status();
    EXPECT_EQ(*prompt, c["prompt"].get<std::string>()) << "case " << c["name"];
    identical += *prompt == c["prompt"].get<std::string>();
  }
  std::printf("chat prompts byte-identical to encoding_dsv4.py on %zu/%zu cases\n", identical, cases.size());
}

TEST(ChatEncoderTest, IdsMatchHfTokenizersOnReferencePrompts) {
  auto tok = Tokenizer::LoadFromFile(testing::TestDataPath("tokenizer/tokenizer.json"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  ChatEncoder encoder(**tok);
  for (const Json& c : LoadCases("chat/chat_cases.jsonl")) {
    auto prompt = encoder.Encode(c["messages"], Json(), OptionsOf(c));
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    EXPECT_EQ(prompt->ids, c["ids"].get<std::vector<TokenId>>()) << "case " << c["name"];
  }
}

TEST(ChatEncoderTest, TopLevelToolsAttachToSystemMessage) {
  // The OpenAI request carries tools beside messages; the reference expects them on the system message.
  for (const Json& c : LoadCases("chat/chat_cases.jsonl")) {
    if (c["name"] != "tools_thinking") continue;
    Json messages = c["messages"];
    Json tools = messages[0]["tools"];
    messages[0].erase("tools");
    auto prompt = RenderChatPrompt(messages, tools, OptionsOf(c));
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    EXPECT_EQ(*prompt, c["prompt"].get<std::string>());
    // Without a system message an empty one carries them.
    messages.erase(0);
    prompt = RenderChatPrompt(messages, tools, OptionsOf(c));
    ASSERT_TRUE(prompt.ok());
    EXPECT_THAT(*prompt, ::testing::StartsWith("<｜begin▁of▁sentence｜>\n\n## Tools\n"));
    // Tools in both places are ambiguous.
    messages = c["messages"];
    EXPECT_THAT(RenderChatPrompt(messages, tools, OptionsOf(c)).status().message(), HasSubstr("tools"));
  }
}

absl::Status RenderError(const char* messages_json, const char* tools_json = "null") {
  return RenderChatPrompt(Json::parse(messages_json), Json::parse(tools_json), {}).status();
}

TEST(ChatEncoderTest, ErrorsNameTheField) {
  struct Case {
    const char* messages;
    const char* tools;
    const char* field;
  } cases[] = {
      {R"({"role": "user"})", "null", "messages: must be an array"},
      {R"([{"role": "user", "content": "a"}, {"role": "robot", "content": "x"}])", "null",
       "messages[1].role"},
      {R"([{"content": "x"}])", "null", "messages[0].role"},
      {R"([{"role": "user", "content": 42}])", "null", "messages[0].content"},
      {R"([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])", "null",
       "messages[0].content[0].type: content parts of type \"image_url\" are not supported"},
      {R"([{"role": "user", "content": [{"type": "text", "text": 5}]}])", "null",
       "messages[0].content[0].text"},
      {R"([{"role": "user", "content": [{"text": "no type"}]}])", "null", "messages[0].content[0]"},
      {R"([{"role": "system", "content": {"a": 1}}])", "null", "messages[0].content"},
      {R"([{"role": "developer", "content": ""}])", "null", "messages[0].content"},
      {R"([{"role": "tool", "content": 3}])", "null", "messages[0].content"},
      {R"([{"role": "user", "content": "x", "task": "summarize"}])", "null", "messages[0].task"},
      {R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}])",
       "null", "messages[0].tool_calls[0].function.arguments: is not valid JSON"},
      {R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}\u0000x"}}]}])",
       "null", "messages[0].tool_calls[0].function.arguments: is not valid JSON"},
      {R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}])",
       "null", "messages[0].tool_calls[0].function.arguments: is not a JSON object"},
      {R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}])",
       "null", "messages[0].tool_calls[0].function.arguments"},
      {R"([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}])", "null",
       "messages[0].tool_calls[0].function"},
      {R"([{"role": "user", "content": "x"}])", R"([{"type": "function"}])", "tools[0].function"},
      {R"([{"role": "user", "content": "x"}])", R"([{"function": {"description": "no name"}}])",
       "tools[0].function.name"},
      {R"([{"role": "user", "content": "x"}])", R"({"not": "an array"})", "tools: must be an array"},
      {R"([{"role": "system", "content": "s", "tools": [{"function": 1}]}])", "null",
       "messages[0].tools[0].function"},
  };
  for (const Case& c : cases) {
    const absl::Status status = RenderError(c.messages, c.tools);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.messages;
    EXPECT_THAT(status.message(), HasSubstr(c.field)) << c.messages;
  }
}

// OpenAI's text content parts (what the SDKs send) render as their texts joined by newlines.
TEST(ChatEncoderTest, TextContentPartsJoinAsOneString) {
  const Json parts = Json::parse(R"([{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
      {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}])");
  const Json joined = Json::parse(R"([{"role": "system", "content": "be brief"},
      {"role": "user", "content": "hello\nworld"}])");
  absl::StatusOr<std::string> a = RenderChatPrompt(parts, Json(), {}),
                              b = RenderChatPrompt(joined, Json(), {});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*a, *b);
}

// Tool-call arguments nested past kMaxJsonDepth are refused before they are parsed (a deep enough text
// overflows the parser's stack).
TEST(ChatEncoderTest, DeeplyNestedArgumentsAreRefused) {
  Json messages = Json::array();
  messages.push_back({{"role", "user"}, {"content", "x"}});
  Json call = {{"function",
                {{"name", "f"},
                 {"arguments", "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}"}}}};
  messages.push_back({{"role", "assistant"}, {"content", ""}, {"tool_calls", Json::array({call})}});
  const absl::StatusOr<std::string> r = RenderChatPrompt(messages, Json(), {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("messages[1].tool_calls[0].function.arguments: nests deeper"));
}

TEST(ChatEncoderTest, KeyOrderOfToolSchemasIsPreserved) {
  auto prompt = RenderChatPrompt(
      Json::parse(R"([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])"),
      Json::parse(R"([{"type": "function", "function": {"name": "z", "parameters": {"b": 1, "a": 2}}}])"),
      {});
  ASSERT_TRUE(prompt.ok());
  EXPECT_THAT(*prompt, HasSubstr(R"({"name": "z", "parameters": {"b": 1, "a": 2}})"));
}

TEST(PyJsonTest, MatchesPythonJsonDumps) {
  using internal::PyJsonDumps;
  EXPECT_EQ(PyJsonDumps(Json::parse(R"({"a": [1, 2.5, -0.0, true, null], "b": "x\"\n\u0001é"})")),
            "{\"a\": [1, 2.5, -0.0, true, null], \"b\": \"x\\\"\\n\\u0001é\"}");
  // Python repr of floats: fixed between 1e-4 and 1e16, exponent form outside.
  EXPECT_EQ(PyJsonDumps(Json(1e16)), "1e+16");
  EXPECT_EQ(PyJsonDumps(Json(1e15)), "1000000000000000.0");
  EXPECT_EQ(PyJsonDumps(Json(0.0001)), "0.0001");
  EXPECT_EQ(PyJsonDumps(Json(0.00001)), "1e-05");
  EXPECT_EQ(PyJsonDumps(Json(1.5e-7)), "1.5e-07");
  EXPECT_EQ(PyJsonDumps(Json(123.456)), "123.456");
  EXPECT_EQ(PyJsonDumps(Json(1e100)), "1e+100");
  EXPECT_EQ(PyJsonDumps(Json(0.1 + 0.2)), "0.30000000000000004");
  EXPECT_EQ(PyJsonDumps(Json::parse("18446744073709551615")), "18446744073709551615");
  EXPECT_EQ(PyJsonDumps(Json::parse("{}")), "{}");
}

}  // namespace
}  // namespace v4serve::model
