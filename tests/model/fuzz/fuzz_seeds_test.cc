// Runs every fuzz entry point over its committed seed corpus (tests/model/fuzz/corpus/<target>/), so the
// invariants the fuzzers check hold in every ordinary build. Long runs: docs/FUZZING_TOKENIZER.md.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "tests/model/fuzz/fuzz_targets.h"
#include "tests/model/tokenizer_test_util.h"

namespace v4serve::model::fuzz {
namespace {

size_t RunCorpus(const std::string& target, int (*fn)(const uint8_t*, size_t)) {
  const std::filesystem::path dir =
      std::filesystem::path(testing::TestDataPath("")).parent_path().parent_path() / "fuzz" / "corpus" /
      target;
  size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string bytes = testing::ReadFileOrDie(entry.path().string());
    fn(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());  // aborts on a violated invariant
    ++n;
  }
  return n;
}

TEST(FuzzSeedsTest, DsmlParser) { EXPECT_GE(RunCorpus("dsml_parser", FuzzDsmlParser), 10u); }
TEST(FuzzSeedsTest, StreamingDecode) { EXPECT_GE(RunCorpus("streaming_decode", FuzzStreamingDecode), 10u); }
TEST(FuzzSeedsTest, ChatRender) { EXPECT_GE(RunCorpus("chat_render", FuzzChatRender), 10u); }

}  // namespace
}  // namespace v4serve::model::fuzz
