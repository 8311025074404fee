#include "router/openai_response.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace v4serve::router {
namespace {

using Json = nlohmann::json;

// The JSON objects of an SSE text, and whether it ended with [DONE].
std::vector<Json> Events(const std::string& sse, bool* done) {
  std::vector<Json> out;
  *done = false;
  for (absl::string_view block : absl::StrSplit(sse, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(block, "data: ")) << block;
    absl::string_view payload = block.substr(6);
    if (payload == "[DONE]") {
      *done = true;
      continue;
    }
    out.push_back(Json::parse(std::string(payload)));
  }
  return out;
}

std::vector<ChoiceEvent> Script() {
  ChoiceEvent think{.index = 0, .reasoning = "Let me add. "};
  ChoiceEvent text{.index = 0, .content = "It is "};
  ChoiceEvent more{.index = 0, .content = "42."};
  ChoiceEvent call{.index = 0, .tool_calls = {{"call_1", "calc", R"({"expr":"40+2"})"}}};
  ChoiceEvent end{.index = 0, .finish = Finish::kToolCalls};
  return {think, text, more, call, end};
}

TEST(OpenAiResponseTest, StreamChunksFollowOpenAiShapes) {
  ResponseBuilder b(Endpoint::kChatCompletions, "chatcmpl-1", "v4", 100, 1);
  std::string sse;
  for (const ChoiceEvent& e : Script()) sse += b.StreamChunk(e);
  sse += b.StreamEnd({.prompt_tokens = 10, .completion_tokens = 7, .cached_prompt_tokens = 4}, true);
  bool done = false;
  std::vector<Json> events = Events(sse, &done);
  EXPECT_TRUE(done);
  ASSERT_EQ(events.size(), 6u);
  EXPECT_EQ(events[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(events[0]["choices"][0]["delta"]["reasoning_content"], "Let me add. ");
  EXPECT_FALSE(events[1]["choices"][0]["delta"].contains("role"));
  EXPECT_EQ(events[3]["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
  EXPECT_EQ(events[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "calc");
  EXPECT_EQ(events[4]["choices"][0]["finish_reason"], "tool_calls");
  EXPECT_TRUE(events[5]["choices"].empty());
  EXPECT_EQ(events[5]["usage"]["total_tokens"], 17);
  EXPECT_EQ(events[5]["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
}

TEST(OpenAiResponseTest, StreamingAndNonStreamingAgree) {
  ResponseBuilder streamed(Endpoint::kChatCompletions, "id", "v4", 1, 1);
  ResponseBuilder whole(Endpoint::kChatCompletions, "id", "v4", 1, 1);
  std::string sse;
  for (const ChoiceEvent& e : Script()) {
    sse += streamed.StreamChunk(e);
    whole.Accumulate(e);
  }
  bool done;
  std::string content, reasoning;
  Json calls = Json::array();
  for (const Json& ev : Events(sse, &done)) {
    const Json& d = ev["choices"][0]["delta"];
    if (d.contains("content")) content += d["content"].get<std::string>();
    if (d.contains("reasoning_content")) reasoning += d["reasoning_content"].get<std::string>();
    if (d.contains("tool_calls")) calls.push_back(d["tool_calls"][0]["function"]);
  }
  Json body = Json::parse(whole.Body({}));
  EXPECT_EQ(body["object"], "chat.completion");
  const Json& msg = body["choices"][0]["message"];
  EXPECT_EQ(msg["content"], content);
  EXPECT_EQ(msg["reasoning_content"], reasoning);
  EXPECT_EQ(msg["tool_calls"][0]["function"], calls[0]);
  EXPECT_EQ(body["choices"][0]["finish_reason"], "tool_calls");
}

TEST(OpenAiResponseTest, CompletionsAndSeveralChoices) {
  ResponseBuilder b(Endpoint::kCompletions, "cmpl-1", "v4", 1, 2);
  b.Accumulate({.index = 1, .content = "b", .logprobs = {{"b", -0.5f, {{"b", -0.5f}, {"c", -1.5f}}}}});
  b.Accumulate({.index = 0, .content = "a", .finish = Finish::kLength});
  Json body = Json::parse(b.Body({.prompt_tokens = 3, .completion_tokens = 2}));
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_EQ(body["choices"][0]["text"], "a");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(body["choices"][1]["logprobs"]["token_logprobs"][0], -0.5);
  EXPECT_EQ(body["choices"][1]["logprobs"]["top_logprobs"][0]["c"], -1.5);
  EXPECT_EQ(b.StreamChunk({.index = 0}), "");  // nothing to say: no chunk
}

}  // namespace
}  // namespace v4serve::router
