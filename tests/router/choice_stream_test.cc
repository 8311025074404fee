#include "router/choice_stream.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <utility>

#include "nlohmann/json.hpp"

namespace v4serve::router {
namespace {

std::string TestData(const std::string& rel) {
  return std::string(V4SERVE_TEST_SOURCE_DIR) + "/tests/model/testdata/" + rel;
}

const model::Tokenizer& TestTokenizer() {
  static auto* tok = model::Tokenizer::LoadFromFile(TestData("tokenizer/tokenizer.json")).value().release();
  return *tok;
}

struct Collected {
  std::string reasoning, content;
  std::vector<ToolCallOut> calls;
  std::optional<Finish> finish;
  int events = 0;
};

Collected RunStream(const std::string& completion, ChoiceStreamOptions options) {
  const model::Tokenizer& tok = TestTokenizer();
  ChoiceStream stream(tok, std::move(options));
  Collected c;
  auto add = [&](const ChoiceEvent& e) {
    c.reasoning += e.reasoning;
    c.content += e.content;
    c.calls.insert(c.calls.end(), e.tool_calls.begin(), e.tool_calls.end());
    if (e.finish) c.finish = e.finish;
    ++c.events;
  };
  for (model::TokenId id : tok.Encode(completion)) {
    absl::StatusOr<ChoiceEvent> e = stream.Push(id, -0.1f, {});
    EXPECT_TRUE(e.ok()) << e.status();
    add(*e);
    if (stream.stopped()) break;
  }
  add(stream.Close(Finish::kStop));
  return c;
}

// Token by token through the router's pipeline gives what DeepSeek's reference parser gives for the whole
// text (tests/model/testdata/chat/parse_cases.jsonl, produced by encoding_dsv4.py).
TEST(ChoiceStreamTest, TokenByTokenMatchesTheReferenceParser) {
  std::ifstream in(TestData("chat/parse_cases.jsonl"));
  ASSERT_TRUE(in) << "missing parse fixtures";
  int cases = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    nlohmann::json c = nlohmann::json::parse(line);
    Collected got = RunStream(c["completion"],
                              {.thinking = c["thinking_mode"] == "thinking", .tool_call_id_prefix = "call_"});
    EXPECT_EQ(got.reasoning, c["reasoning_content"].get<std::string>()) << c["name"];
    EXPECT_EQ(got.content, c["content"].get<std::string>()) << c["name"];
    ASSERT_EQ(got.calls.size(), c["tool_calls"].size()) << c["name"];
    for (size_t i = 0; i < got.calls.size(); ++i) {
      EXPECT_EQ(got.calls[i].name, c["tool_calls"][i]["name"]) << c["name"];
      EXPECT_EQ(nlohmann::json::parse(got.calls[i].arguments),
                nlohmann::json::parse(c["tool_calls"][i]["arguments"].get<std::string>()))
          << c["name"];
      EXPECT_EQ(got.calls[i].id, "call_0_" + std::to_string(i));
    }
    EXPECT_EQ(got.finish, got.calls.empty() ? Finish::kStop : Finish::kToolCalls) << c["name"];
    ++cases;
  }
  EXPECT_GE(cases, 5);
}

TEST(ChoiceStreamTest, StopStringsCutTheTextAndEndTheChoice) {
  Collected c = RunStream("The answer is 42. END of story", {.stop = {"END", "never"}});
  EXPECT_EQ(c.content, "The answer is 42. ");
  EXPECT_EQ(c.finish, Finish::kStop);
  Collected plain = RunStream("no stop here at all", {.chat = false, .stop = {"zzz"}});
  EXPECT_EQ(plain.content, "no stop here at all");
}

TEST(StopMatcherTest, HoldsBackOnlyPossiblePrefixes) {
  StopMatcher m({"</s>", "xyz"});
  EXPECT_EQ(m.Push("abc<"), "abc");
  EXPECT_EQ(m.Push("/"), "");
  EXPECT_EQ(m.Push("p>"), "</p>");
  EXPECT_EQ(m.Push("hello x"), "hello ");
  EXPECT_EQ(m.Push("y"), "");
  EXPECT_EQ(m.Push("z tail"), "");
  EXPECT_TRUE(m.stopped());
  StopMatcher none({});
  EXPECT_EQ(none.Push("anything"), "anything");
}

TEST(ChoiceStreamTest, LogprobsCarryTokenText) {
  const model::Tokenizer& tok = TestTokenizer();
  ChoiceStream s(tok, {.chat = false, .logprobs = true});
  std::vector<model::TokenId> ids = tok.Encode("Hi");
  auto e = s.Push(ids[0], -0.25f, {{ids[0], -0.25f}});
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->logprobs.size(), 1u);
  EXPECT_EQ(e->logprobs[0].logprob, -0.25f);
  EXPECT_FALSE(e->logprobs[0].token.empty());
  EXPECT_EQ(s.Push(1 << 30, 0, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace v4serve::router
