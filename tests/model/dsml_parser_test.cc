// DsmlParser vs the reference parse_message_from_completion_text() (fixtures from
// tools/chat/gen_chat_fixtures.py), streamed at every split point, and our handling of malformed DSML.
#include "model/dsml_parser.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <sstream>

#include "nlohmann/json.hpp"
#include "tests/model/tokenizer_test_util.h"

namespace v4serve::model {
namespace {

using Json = nlohmann::ordered_json;

std::vector<Json> LoadParseCases() {
  std::vector<Json> cases;
  std::istringstream lines(testing::ReadFileOrDie(testing::TestDataPath("chat/parse_cases.jsonl")));
  std::string line;
  while (std::getline(lines, line)) cases.push_back(Json::parse(line));
  return cases;
}

void ExpectMatchesReference(const ParsedAssistantMessage& got, const Json& c) {
  EXPECT_EQ(got.reasoning_content, c["reasoning_content"].get<std::string>()) << c["name"];
  EXPECT_EQ(got.content, c["content"].get<std::string>()) << c["name"];
  ASSERT_EQ(got.tool_calls.size(), c["tool_calls"].size()) << c["name"];
  for (size_t i = 0; i < got.tool_calls.size(); ++i) {
    EXPECT_EQ(got.tool_calls[i].name, c["tool_calls"][i]["name"].get<std::string>()) << c["name"];
    // Byte-identical to the reference's arguments string, and valid JSON for the OpenAI response.
    EXPECT_EQ(got.tool_calls[i].arguments, c["tool_calls"][i]["arguments"].get<std::string>()) << c["name"];
    EXPECT_TRUE(Json::accept(got.tool_calls[i].arguments)) << c["name"];
  }
}

DsmlParser::Options OptionsOf(const Json& c) { return {.thinking = c["thinking_mode"] == "thinking"}; }

// Feeds `text` in the given chunks and collects the deltas into a message.
ParsedAssistantMessage ParseChunked(const std::vector<std::string>& chunks, DsmlParser::Options options,
                                    std::vector<ChatDelta>* all = nullptr) {
  DsmlParser parser(options);
  std::vector<ChatDelta> deltas;
  for (const auto& chunk : chunks) {
    for (auto& d : parser.Push(chunk)) deltas.push_back(std::move(d));
  }
  for (auto& d : parser.Finish()) deltas.push_back(std::move(d));
  ParsedAssistantMessage m;
  for (const auto& d : deltas) {
    if (d.kind == ChatDelta::Kind::kReasoning) m.reasoning_content += d.text;
    if (d.kind == ChatDelta::Kind::kContent) m.content += d.text;
    if (d.kind == ChatDelta::Kind::kToolCall) {
      EXPECT_EQ(d.tool_call_index, static_cast<int>(m.tool_calls.size()));
      m.tool_calls.push_back(d.tool_call);
    }
  }
  if (all != nullptr) *all = std::move(deltas);
  return m;
}

TEST(DsmlParserTest, WholeCompletionsMatchReference) {
  const auto cases = LoadParseCases();
  ASSERT_GE(cases.size(), 7u);
  for (const Json& c : cases) {
    ExpectMatchesReference(DsmlParser::ParseCompletion(c["completion"].get<std::string>(), OptionsOf(c)), c);
  }
}

TEST(DsmlParserTest, StreamingAtEverySplitPointMatchesReference) {
  for (const Json& c : LoadParseCases()) {
    const std::string text = c["completion"].get<std::string>();
    for (size_t cut = 0; cut <= text.size(); ++cut) {
      std::vector<ChatDelta> deltas;
      ExpectMatchesReference(ParseChunked({text.substr(0, cut), text.substr(cut)}, OptionsOf(c), &deltas), c);
      for (const auto& d : deltas) {
        // Markers are never leaked into text deltas of well-formed output.
        EXPECT_THAT(d.text, ::testing::Not(::testing::HasSubstr("｜DSML｜"))) << c["name"] << " cut " << cut;
        EXPECT_THAT(d.text, ::testing::Not(::testing::HasSubstr("</think>"))) << c["name"] << " cut " << cut;
      }
    }
  }
}

TEST(DsmlParserTest, StreamingInRandomChunksMatchesReference) {
  std::mt19937 rng(5);
  for (const Json& c : LoadParseCases()) {
    const std::string text = c["completion"].get<std::string>();
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<std::string> chunks;
      for (size_t pos = 0; pos < text.size();) {
        const size_t n = std::min<size_t>(text.size() - pos, 1 + rng() % 7);
        chunks.push_back(text.substr(pos, n));
        pos += n;
      }
      ExpectMatchesReference(ParseChunked(chunks, OptionsOf(c)), c);
    }
  }
}

TEST(DsmlParserTest, ContentIsReleasedAsSoonAsNoMarkerCanStart) {
  DsmlParser parser({.thinking = true});
  auto d = parser.Push("Let me think");
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].kind, ChatDelta::Kind::kReasoning);
  EXPECT_EQ(d[0].text, "Let me think");
  d = parser.Push(" more</thi");  // "</thi" may start "</think>": held
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].text, " more");
  d = parser.Push("nk>Answer\n");
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].kind, ChatDelta::Kind::kContent);
  EXPECT_EQ(d[0].text, "Answer");
  d = parser.Push("x");  // the held "\n" was not a DSML block
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].text, "\nx");
}

// A request that offered no tools gets a well-formed DSML block back as the text the model wrote, whole
// and at every split point, never as a tool call.
TEST(DsmlParserTest, WithoutToolsAWellFormedBlockIsContent) {
  const std::string text =
      "Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"calculator\">\n"
      "<｜DSML｜parameter name=\"expression\" string=\"true\">3141 * 59</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  const auto with = DsmlParser::ParseCompletion(text, {.thinking = false});
  ASSERT_EQ(with.tool_calls.size(), 1u);  // The same text is a tool call where tools were offered.
  const auto m = DsmlParser::ParseCompletion(text, {.thinking = false, .tool_calls = false});
  EXPECT_TRUE(m.tool_calls.empty());
  EXPECT_EQ(m.content, text);
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    const auto s =
        ParseChunked({text.substr(0, cut), text.substr(cut)}, {.thinking = false, .tool_calls = false});
    EXPECT_EQ(s.content, text) << "cut " << cut;
    EXPECT_TRUE(s.tool_calls.empty());
  }
}

TEST(DsmlParserTest, MalformedDsmlIsReturnedAsContent) {
  // Each case is one std::string (parenthesized so the literal pieces are not taken for a missing comma).
  const std::string bad[] = {
      // misspelled attribute
      ("Hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),
      // not the tool_calls tag
      ("Hi\n\n<｜DSML｜tool_callsX>\n</｜DSML｜tool_calls>"),
      // duplicate parameter
      ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
       "<｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n"
       "<｜DSML｜parameter name=\"a\" "
       "string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),
      // string attribute neither true nor false
      ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
       "<｜DSML｜parameter name=\"a\" "
       "string=\"yes\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),
      // never closed (e.g. max_tokens reached)
      ("Partial\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
       "string=\"true\">1"),
  };
  for (const std::string& text : bad) {
    const auto m = DsmlParser::ParseCompletion(text, {.thinking = false});
    EXPECT_TRUE(m.tool_calls.empty()) << text;
    EXPECT_EQ(m.content, text);
    for (size_t cut = 0; cut <= text.size(); ++cut) {
      const auto s = ParseChunked({text.substr(0, cut), text.substr(cut)}, {.thinking = false});
      EXPECT_EQ(s.content, text) << "cut " << cut;
      EXPECT_TRUE(s.tool_calls.empty());
    }
  }
}

TEST(DsmlParserTest, LongToolArgumentStreamedInSmallPieces) {
  // A tool call writing a 1 MB file, fed 4 bytes at a time, must parse (and in linear time).
  const std::string value(1 << 20, 'x');
  const std::string text =
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"write\">\n<｜DSML｜parameter name=\"data\" "
      "string=\"true\">" +
      value + "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
  std::vector<std::string> chunks;
  for (size_t pos = 0; pos < text.size(); pos += 4) chunks.push_back(text.substr(pos, 4));
  const auto m = ParseChunked(chunks, {});
  ASSERT_EQ(m.tool_calls.size(), 1u);
  EXPECT_EQ(m.tool_calls[0].arguments, "{\"data\": \"" + value + "\"}");
  EXPECT_EQ(m.content, "");
}

TEST(DsmlParserTest, NonJsonValueOfNonStringParameterIsQuoted) {
  const auto m = DsmlParser::ParseCompletion(
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"n\" "
      "string=\"false\">not json"
      "</｜DSML｜parameter>\n<｜DSML｜parameter name=\"m\" string=\"false\">[1, "
      "2]</｜DSML｜parameter>\n</｜DSML｜invoke>"
      "\n</｜DSML｜tool_calls>",
      {});
  ASSERT_EQ(m.tool_calls.size(), 1u);
  EXPECT_EQ(m.tool_calls[0].arguments, R"({"n": "not json", "m": [1, 2]})");
}

TEST(DsmlParserTest, EndOfSentenceStopsAndTrailingTextIsContent) {
  auto m = DsmlParser::ParseCompletion("abc<｜end▁of▁sentence｜>ignored", {});
  EXPECT_EQ(m.content, "abc");
  m = DsmlParser::ParseCompletion("reasoning only, cut off", {.thinking = true});
  EXPECT_EQ(m.reasoning_content, "reasoning only, cut off");
  EXPECT_EQ(m.content, "");
  m = DsmlParser::ParseCompletion(
      "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls> after",
      {});
  ASSERT_EQ(m.tool_calls.size(), 1u);
  EXPECT_EQ(m.tool_calls[0].arguments, "{}");
  EXPECT_EQ(m.content, " after");
}

}  // namespace
}  // namespace v4serve::model
