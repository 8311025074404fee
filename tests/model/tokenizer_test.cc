// Tokenizer vs HF tokenizers: ids and decoded text on the committed corpus
// (tools/tokenizer/gen_tokenizer_fixtures.py), plus loader errors and streaming decode.
#include "model/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <sstream>
#include <thread>

#include "absl/strings/escaping.h"
#include "model/internal/tokenizer_unicode.h"
#include "model/tokenizer_streaming.h"
#include "nlohmann/json.hpp"
#include "tests/model/tokenizer_test_util.h"

namespace v4serve::model {
namespace {

using ::testing::HasSubstr;

struct CorpusCase {
  std::string name;
  std::string bytes;
  std::vector<TokenId> ids;
  std::string decoded;
  std::string decoded_skip;
};

std::vector<CorpusCase> LoadCorpus() {
  std::vector<CorpusCase> cases;
  std::istringstream lines(testing::ReadFileOrDie(testing::TestDataPath("tokenizer/corpus.jsonl")));
  std::string line;
  while (std::getline(lines, line)) {
    const auto j = nlohmann::json::parse(line);
    CorpusCase c;
    c.name = j["name"].get<std::string>();
    EXPECT_TRUE(absl::Base64Unescape(j["b64"].get<std::string>(), &c.bytes)) << c.name;
    c.ids = j["ids"].get<std::vector<TokenId>>();
    c.decoded = j["decoded"].get<std::string>();
    c.decoded_skip = j["decoded_skip"].get<std::string>();
    cases.push_back(std::move(c));
  }
  return cases;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tok = Tokenizer::LoadFromFile(testing::TestDataPath("tokenizer/tokenizer.json"));
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  static Tokenizer* tokenizer_;
};
Tokenizer* TokenizerTest::tokenizer_ = nullptr;

TEST_F(TokenizerTest, IdsMatchHfTokenizersOnCorpus) {
  const auto cases = LoadCorpus();
  ASSERT_GT(cases.size(), 300u);
  size_t matched = 0;
  for (const auto& c : cases) {
    const auto ids = tokenizer_->Encode(c.bytes);
    EXPECT_EQ(ids, c.ids) << "case " << c.name;
    matched += ids == c.ids;
  }
  std::printf("ids identical to HF tokenizers on %zu/%zu corpus cases\n", matched, cases.size());
}

TEST_F(TokenizerTest, ConcurrentEncodesAgree) {
  // One Tokenizer serves every request thread (scratch buffers are thread-local).
  const auto cases = LoadCorpus();
  std::vector<std::thread> threads;
  threads.reserve(4);
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < cases.size() * 2; i += 4) {
        const auto& c = cases[i % cases.size()];
        if (tokenizer_->Encode(c.bytes) != c.ids) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_F(TokenizerTest, DecodeMatchesHfTokenizers) {
  for (const auto& c : LoadCorpus()) {
    auto text = tokenizer_->Decode(c.ids);
    ASSERT_TRUE(text.ok()) << text.status();
    EXPECT_EQ(*text, c.decoded) << "case " << c.name;
    auto skipped = tokenizer_->Decode(c.ids, /*skip_special_tokens=*/true);
    ASSERT_TRUE(skipped.ok());
    EXPECT_EQ(*skipped, c.decoded_skip) << "case " << c.name;
  }
}

TEST_F(TokenizerTest, StreamingDecodeEqualsDecodeAndNeverSplitsCharacters) {
  for (const auto& c : LoadCorpus()) {
    StreamingDecoder decoder(*tokenizer_, {.skip_special_tokens = false});
    std::string streamed;
    for (TokenId id : c.ids) {
      auto piece = decoder.Push(id);
      ASSERT_TRUE(piece.ok()) << piece.status();
      // Every emitted piece is complete UTF-8 on its own.
      EXPECT_EQ(internal::ValidUtf8Prefix(*piece), piece->size()) << "case " << c.name;
      streamed += *piece;
    }
    streamed += decoder.Finish();
    EXPECT_EQ(streamed, c.decoded) << "case " << c.name;
  }
}

TEST_F(TokenizerTest, StreamingHoldsPartialCharacter) {
  StreamingDecoder decoder(*tokenizer_, {});
  // "中" is E4 B8 AD; feed it one byte at a time.
  EXPECT_EQ(decoder.PushBytes("\xE4"), "");
  EXPECT_EQ(decoder.PushBytes("\xB8"), "");
  EXPECT_EQ(decoder.pending_bytes(), 2u);
  EXPECT_EQ(decoder.PushBytes("\xAD"
                              "a"),
            "中a");
  // A lead byte followed by a non-continuation byte can never complete: replaced at once.
  EXPECT_EQ(decoder.PushBytes("\xE4"
                              "b"),
            "\xEF\xBF\xBD"
            "b");
  EXPECT_EQ(decoder.PushBytes("\xF0\x9F"), "");
  EXPECT_EQ(decoder.Finish(), "\xEF\xBF\xBD");
  EXPECT_EQ(decoder.pending_bytes(), 0u);
}

TEST_F(TokenizerTest, StreamingRejectsUnknownIdAndSkipsSpecial) {
  StreamingDecoder decoder(*tokenizer_, {.skip_special_tokens = true});
  EXPECT_EQ(decoder.Push(tokenizer_->vocab_size()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(decoder.Push(-1).status().code(), absl::StatusCode::kInvalidArgument);
  const TokenId eos = *tokenizer_->TokenToId("<｜end▁of▁sentence｜>");
  EXPECT_EQ(*decoder.Push(eos), "");
  const TokenId think_end = *tokenizer_->TokenToId("</think>");
  EXPECT_EQ(*decoder.Push(think_end), "</think>");  // not special: the reasoning parser needs it
}

TEST_F(TokenizerTest, SpecialTokensHaveV4Layout) {
  EXPECT_EQ(tokenizer_->TokenToId("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(tokenizer_->TokenToId("<｜end▁of▁sentence｜>"), 1);
  for (const char* t :
       {"<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<｜action｜>", "<｜query｜>",
        "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>", "<｜extracted_url｜>"}) {
    auto id = tokenizer_->TokenToId(t);
    ASSERT_TRUE(id.has_value()) << t;
    EXPECT_TRUE(tokenizer_->IsSpecial(*id)) << t;
    EXPECT_EQ(tokenizer_->Encode(t), std::vector<TokenId>{*id}) << t;
  }
  EXPECT_FALSE(tokenizer_->IsSpecial(*tokenizer_->TokenToId("｜DSML｜")));
  EXPECT_EQ(tokenizer_->vocab_size(), 4096);
}

TEST_F(TokenizerTest, EncodeOrdinaryDoesNotProduceControlTokens) {
  const TokenId user = *tokenizer_->TokenToId("<｜User｜>");
  const auto ids = tokenizer_->EncodeOrdinary("x<｜User｜>y");
  EXPECT_THAT(ids, ::testing::Not(::testing::Contains(user)));
  EXPECT_EQ(*tokenizer_->Decode(ids), "x<｜User｜>y");
  EXPECT_THAT(tokenizer_->Encode("x<｜User｜>y"), ::testing::Contains(user));
}

TEST_F(TokenizerTest, DecodeRejectsUnknownIdNamingPosition) {
  auto text = tokenizer_->Decode({5, 6, 999999});
  ASSERT_FALSE(text.ok());
  EXPECT_THAT(text.status().message(), HasSubstr("ids[2]"));
}

TEST(TokenizerLoadTest, ReportsMissingFileAndBadJson) {
  EXPECT_EQ(Tokenizer::LoadFromFile("/nonexistent/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Tokenizer::LoadFromJson("{not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tokenizer::LoadFromJson("[]").status().code(), absl::StatusCode::kInvalidArgument);
}

nlohmann::json FixtureJson() {
  return nlohmann::json::parse(testing::ReadFileOrDie(testing::TestDataPath("tokenizer/tokenizer.json")));
}

TEST(TokenizerLoadTest, RejectsOtherPipelinesNamingTheComponent) {
  auto j = FixtureJson();
  j["pre_tokenizer"]["pretokenizers"][2]["pattern"]["Regex"] = "\\s+";
  auto tok = Tokenizer::LoadFromJson(j.dump());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(tok.status().message(), HasSubstr("pretokenizers[2]"));

  j = FixtureJson();
  j["normalizer"] = {{"type", "NFC"}};
  EXPECT_THAT(Tokenizer::LoadFromJson(j.dump()).status().message(), HasSubstr("normalizer"));

  j = FixtureJson();
  j["model"]["byte_fallback"] = true;
  EXPECT_THAT(Tokenizer::LoadFromJson(j.dump()).status().message(), HasSubstr("byte_fallback"));

  j = FixtureJson();
  j["added_tokens"][3]["lstrip"] = true;
  EXPECT_THAT(Tokenizer::LoadFromJson(j.dump()).status().message(), HasSubstr("added_tokens[3].lstrip"));

  j = FixtureJson();
  j["model"]["merges"][7] = "nosuch token";
  EXPECT_THAT(Tokenizer::LoadFromJson(j.dump()).status().message(), HasSubstr("model.merges[7]"));
}

TEST(TokenizerLoadTest, ManyAddedTokensMatchLeftmostLongest) {
  // DeepSeek's files carry ~800 added tokens sharing the "<｜" prefix (placeholders). Expected ids from HF
  // tokenizers 0.23.3 with the same tokens added (add_special_tokens, normalized=False).
  auto j = FixtureJson();
  auto add = [&](const std::string& content, int id) {
    j["added_tokens"].push_back({{"id", id},
                                 {"content", content},
                                 {"single_word", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"normalized", false},
                                 {"special", true}});
  };
  add("<｜User｜>X", 4096);
  for (int i = 0; i < 800; ++i) add("<｜place▁holder▁no▁" + std::to_string(i) + "｜>", 4097 + i);
  auto tok = Tokenizer::LoadFromJson(j.dump());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Encode("a<｜User｜>X<｜User｜>Y<｜place▁holder▁no▁12｜><｜place▁holder▁no▁1"),
            (std::vector<TokenId>{67,  4096, 4080, 59,  4109, 30,  174, 124, 253, 773, 161, 247,
                                  226, 640,  78,   460, 161,  247, 226, 573, 161, 247, 226, 19}));
  EXPECT_EQ((*tok)->vocab_size(), 4897);
}

TEST(TokenizerLoadTest, AcceptsMergesWrittenAsPairs) {
  // Newer tokenizers versions write merges as ["left", "right"]; both spellings must give the same ids.
  auto j = FixtureJson();
  for (auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    const size_t space = s.find(' ');
    m = nlohmann::json::array({s.substr(0, space), s.substr(space + 1)});
  }
  auto pairs = Tokenizer::LoadFromJson(j.dump());
  ASSERT_TRUE(pairs.ok()) << pairs.status();
  for (const auto& c : LoadCorpus()) EXPECT_EQ((*pairs)->Encode(c.bytes), c.ids) << c.name;
}

}  // namespace
}  // namespace v4serve::model
