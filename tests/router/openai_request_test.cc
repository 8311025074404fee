#include "router/openai_request.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <limits>

namespace v4serve::router {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string ChatError(const std::string& body) {
  return std::string(ParseOpenAiRequest(Endpoint::kChatCompletions, body).status().message());
}

TEST(OpenAiRequestTest, ParsesAFullChatRequest) {
  auto r = ParseOpenAiRequest(Endpoint::kChatCompletions, R"({
    "model": "v4", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
    "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.5, "top_p": 0.9,
    "seed": 7, "max_completion_tokens": 64, "stop": ["\n\n", "END"], "n": 2, "logprobs": true,
    "top_logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5, "reasoning_effort": "high",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "user": "u1", "v4serve": {"cache_handle": "h1", "quick_instruction": "title"}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model, "v4");
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_FLOAT_EQ(r->sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 0.9f);
  EXPECT_EQ(r->sampling.seed, 7u);
  EXPECT_EQ(r->sampling.max_tokens, 64);
  EXPECT_THAT(r->sampling.stop, ::testing::ElementsAre("\n\n", "END"));
  EXPECT_EQ(r->sampling.n, 2);
  EXPECT_TRUE(r->sampling.logprobs);
  EXPECT_EQ(r->sampling.top_logprobs, 3);
  EXPECT_EQ(r->reasoning, ReasoningMode::kThinkHigh);
  EXPECT_EQ(r->messages.size(), 2u);
  EXPECT_EQ(r->tools.size(), 1u);
  EXPECT_EQ(r->cache_handle, "h1");
  EXPECT_EQ(r->quick_instruction, "title");
}

TEST(OpenAiRequestTest, ErrorsNameTheField) {
  EXPECT_THAT(ChatError("not json"), StartsWith("body: "));
  EXPECT_THAT(ChatError("[1]"), StartsWith("body: "));
  EXPECT_THAT(ChatError("{}"), StartsWith("messages: is required"));
  EXPECT_THAT(ChatError(R"({"messages": []})"), StartsWith("messages: "));
  EXPECT_THAT(ChatError(R"({"messages": [{"content": "x"}]})"), StartsWith("messages[0].role: "));
  const std::string m = R"("messages": [{"role": "user", "content": "x"}])";
  EXPECT_THAT(ChatError("{" + m + R"(, "temperature": 3})"), StartsWith("temperature: must be in [0, 2]"));
  EXPECT_THAT(ChatError("{" + m + R"(, "temperature": "hot"})"), StartsWith("temperature: must be a number"));
  EXPECT_THAT(ChatError("{" + m + R"(, "top_p": 0})"), StartsWith("top_p: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "max_tokens": 0})"), StartsWith("max_tokens: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "max_tokens": 1.5})"), StartsWith("max_tokens: must be an integer"));
  EXPECT_THAT(ChatError("{" + m + R"(, "n": 100})"), StartsWith("n: must be in [1, 8]"));
  EXPECT_THAT(ChatError("{" + m + R"(, "stop": [1]})"), StartsWith("stop[0]: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "stop": ["a","b","c","d","e"]})"), StartsWith("stop: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "top_logprobs": 2})"), HasSubstr("requires logprobs"));
  EXPECT_THAT(ChatError("{" + m + R"(, "stream_options": {"include_usage": true}})"),
              StartsWith("stream_options: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "stream": true, "stream_options": {"include_usage": 1}})"),
              StartsWith("stream_options.include_usage: must be a boolean"));
  EXPECT_THAT(ChatError("{" + m + R"(, "v4serve": {"quick_instruction": 5}})"),
              StartsWith("v4serve.quick_instruction: must be a string"));
  EXPECT_THAT(ChatError("{" + m + R"(, "reasoning_effort": "extreme"})"), StartsWith("reasoning_effort: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "logit_bias": {"1": 5}})"),
              StartsWith("logit_bias: is not supported"));
  EXPECT_THAT(ChatError("{" + m + R"(, "tool_choice": "sometimes"})"), StartsWith("tool_choice: "));
  EXPECT_THAT(ChatError("{" + m + R"(, "seed": "x"})"), StartsWith("seed: "));
}

// A small body nested 200k deep overflowed the parser's stack and killed the router; it is refused before
// parsing. Nesting at the limit still parses.
TEST(OpenAiRequestTest, DeepNestingIsRefusedBeforeParsing) {
  const int deep = 200000;
  const std::string body = "{\"foo\":" + std::string(deep, '[') + std::string(deep, ']') +
                           ",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
  auto r = ParseOpenAiRequest(Endpoint::kChatCompletions, body);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("body: nests deeper than 128 levels"));
  const std::string ok = "{\"foo\":" + std::string(120, '[') + std::string(120, ']') +
                         ",\"messages\":[{\"role\":\"user\",\"content\":\"[[[[\"}]}";
  EXPECT_TRUE(ParseOpenAiRequest(Endpoint::kChatCompletions, ok).ok());
}

// Fields that would need constrained decoding or are not implemented are refused by name, not ignored.
TEST(OpenAiRequestTest, UnsupportedChoicesAreRefusedByName) {
  const std::string msgs = R"("messages": [{"role": "user", "content": "hi"}])";
  EXPECT_THAT(ChatError("{" + msgs + R"(, "tool_choice": "required"})"),
              HasSubstr("tool_choice: only \"auto\" and \"none\""));
  EXPECT_THAT(ChatError("{" + msgs + R"(, "tool_choice": {"type": "function", "function": {"name": "f"}}})"),
              HasSubstr("tool_choice: only"));
  EXPECT_THAT(ChatError("{" + msgs + R"(, "response_format": {"type": "json_schema", "json_schema": {}}})"),
              HasSubstr("response_format: only {\"type\": \"text\"}"));
  EXPECT_TRUE(
      ParseOpenAiRequest(Endpoint::kChatCompletions,
                         "{" + msgs + R"(, "response_format": {"type": "text"}, "tool_choice": "none"})")
          .ok());
  auto completions = [](const std::string& body) {
    return std::string(ParseOpenAiRequest(Endpoint::kCompletions, body).status().message());
  };
  EXPECT_THAT(completions(R"({"prompt": "hi", "echo": true})"), HasSubstr("echo: is not supported"));
  EXPECT_TRUE(ParseOpenAiRequest(Endpoint::kCompletions, R"({"prompt": "hi", "echo": false})").ok());
  EXPECT_THAT(completions(R"({"prompt": "hi", "v4serve": {"quick_instruction": "title"}})"),
              HasSubstr("v4serve.quick_instruction: only /v1/chat/completions takes it"));
  EXPECT_THAT(completions(R"({"prompt": "hi", "v4serve": {"cache_handle": "x"}})"),
              HasSubstr("v4serve.cache_handle: only /v1/chat/completions takes it"));
}

// CheckSampling (gRPC's typed requests): every range, NaN included, named with the caller's prefix.
TEST(OpenAiRequestTest, CheckSamplingNamesTheFieldAndRefusesNaN) {
  EXPECT_TRUE(CheckSampling(SamplingRequest(), "sampling.").ok());
  struct Case {
    void (*set)(SamplingRequest&);
    const char* message;  // The error's start.
  };
  for (const Case& c : std::initializer_list<Case>{
           {[](SamplingRequest& s) { s.temperature = std::nanf(""); },
            "sampling.temperature: must be in [0, 2]"},
           {[](SamplingRequest& s) { s.top_p = 0; }, "sampling.top_p: must be in (0, 1]"},
           {[](SamplingRequest& s) { s.min_p = 1.5f; }, "sampling.min_p: "},
           {[](SamplingRequest& s) { s.presence_penalty = -3; }, "sampling.presence_penalty: "},
           {[](SamplingRequest& s) { s.frequency_penalty = std::numeric_limits<float>::infinity(); },
            "sampling.frequency_penalty: "},
           {[](SamplingRequest& s) { s.repetition_penalty = 0; }, "sampling.repetition_penalty: "},
           {[](SamplingRequest& s) { s.top_logprobs = 21; }, "sampling.top_logprobs: "},
           {[](SamplingRequest& s) {
              s.stop_token_ids = {5, -1};
            },
            "sampling.stop_token_ids[1]: "}}) {
    SamplingRequest s;
    c.set(s);
    EXPECT_THAT(std::string(CheckSampling(s, "sampling.").message()), StartsWith(c.message));
  }
}

// Tool calls come back only where the request offered tools and did not say tool_choice "none".
TEST(OpenAiRequestTest, OffersToolsOnlyWhereToolsWereGiven) {
  auto offers = [](const std::string& body) {
    auto r = ParseOpenAiRequest(Endpoint::kChatCompletions, body);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() && OffersTools(*r);
  };
  const std::string tools = R"("tools": [{"type": "function", "function": {"name": "f"}}])";
  EXPECT_FALSE(offers(R"({"messages": [{"role": "user", "content": "hi"}]})"));
  EXPECT_FALSE(offers(R"({"messages": [{"role": "user", "content": "hi"}], "tools": []})"));
  EXPECT_TRUE(offers(R"({"messages": [{"role": "user", "content": "hi"}], )" + tools + "}"));
  EXPECT_FALSE(
      offers(R"({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none", )" + tools + "}"));
  EXPECT_TRUE(offers(R"({"messages": [{"role": "system", "content": "", )" + tools +
                     R"(}, {"role": "user", "content": "hi"}]})"));
}

TEST(OpenAiRequestTest, ThinkingSwitchAndDefaults) {
  const std::string m = R"("messages": [{"role": "user", "content": "x"}])";
  auto def = ParseOpenAiRequest(Endpoint::kChatCompletions, "{" + m + "}");
  ASSERT_TRUE(def.ok());
  EXPECT_EQ(def->reasoning, ReasoningMode::kNonThink);
  EXPECT_FLOAT_EQ(def->sampling.temperature, 1.0f);
  EXPECT_EQ(def->sampling.n, 1);
  EXPECT_FALSE(def->sampling.max_tokens.has_value());
  auto think =
      ParseOpenAiRequest(Endpoint::kChatCompletions, "{" + m + R"(, "thinking": {"type": "enabled"}})");
  ASSERT_TRUE(think.ok());
  EXPECT_EQ(think->reasoning, ReasoningMode::kThinkHigh);
  auto max = ParseOpenAiRequest(Endpoint::kChatCompletions, "{" + m + R"(, "reasoning_effort": "max"})");
  ASSERT_TRUE(max.ok());
  EXPECT_EQ(max->reasoning, ReasoningMode::kThinkMax);
}

TEST(OpenAiRequestTest, CompletionsPromptForms) {
  auto text =
      ParseOpenAiRequest(Endpoint::kCompletions, R"({"prompt": "once", "logprobs": 2, "echo": false})");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->prompt_text, "once");
  EXPECT_EQ(text->sampling.top_logprobs, 2);
  auto ids = ParseOpenAiRequest(Endpoint::kCompletions, R"({"prompt": [0, 5, 17]})");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(*ids->prompt_ids, ::testing::ElementsAre(0, 5, 17));
  EXPECT_THAT(
      std::string(ParseOpenAiRequest(Endpoint::kCompletions, R"({"prompt": [1, -2]})").status().message()),
      StartsWith("prompt[1]: "));
  EXPECT_THAT(
      std::string(ParseOpenAiRequest(Endpoint::kCompletions, R"({"prompt": {"a": 1}})").status().message()),
      StartsWith("prompt: "));
  EXPECT_THAT(std::string(ParseOpenAiRequest(Endpoint::kCompletions, R"({})").status().message()),
              StartsWith("prompt: "));
}

}  // namespace
}  // namespace v4serve::router
