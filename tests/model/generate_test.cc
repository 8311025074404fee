#include "model/generate.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

using ::testing::HasSubstr;

std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

TEST(GenerateTest, GreedyFromDirMatchesTheGolden) {
  std::ifstream in(TinyDir() + "/golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json fx = nlohmann::json::parse(ss.str())["fixtures"]["short"];
  std::vector<int32_t> prompt = fx["prompt"].get<std::vector<int32_t>>();
  std::vector<int32_t> want = fx["greedy"].get<std::vector<int32_t>>();
  SamplingOptions o;
  o.max_new_tokens = static_cast<int32_t>(want.size());
  o.stop_ids = {-1};  // No stop id: the golden runs all steps.
  absl::StatusOr<std::vector<int32_t>> got = GenerateFromDir(TinyDir(), prompt, o);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, want);
}

TEST(GenerateTest, FaithfulGenerationFromDirRunsAndStopsAtTheStopId) {
  SamplingOptions o;
  o.max_new_tokens = 8;
  ModelOptions faithful;
  faithful.mode = NumericMode::kFaithful;
  absl::StatusOr<std::vector<int32_t>> all =
      GenerateFromDir(TinyDir(), std::vector<int32_t>{0, 17, 99, 3}, o, faithful);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 8u);
  o.stop_ids = {(*all)[2]};
  absl::StatusOr<std::vector<int32_t>> stopped =
      GenerateFromDir(TinyDir(), std::vector<int32_t>{0, 17, 99, 3}, o, faithful);
  ASSERT_TRUE(stopped.ok());
  ASSERT_LE(stopped->size(), 3u);
  EXPECT_EQ(stopped->back(), (*all)[2]);
}

TEST(GenerateTest, SamplingIsDeterministicPerSeedAndRespectsTopK) {
  std::vector<float> logits = {0.0f, 3.0f, 2.9f, -1.0f, 2.8f};
  SamplingOptions o;
  EXPECT_EQ(SampleToken(logits.data(), 5, o, nullptr), 1);
  o.temperature = 1.0f;
  o.top_k = 2;
  std::mt19937_64 a(5), b(5);
  std::vector<int32_t> sa, sb;
  for (int i = 0; i < 200; ++i) {
    sa.push_back(SampleToken(logits.data(), 5, o, &a));
    sb.push_back(SampleToken(logits.data(), 5, o, &b));
  }
  EXPECT_EQ(sa, sb);
  for (int32_t t : sa) EXPECT_TRUE(t == 1 || t == 2) << t;
  EXPECT_NE(std::count(sa.begin(), sa.end(), 2), 0);
  o.top_p = 0.0f;
  EXPECT_FALSE(ValidateSamplingOptions(o).ok());
}

TEST(GenerateTest, DescribeCheckpointReportsLayoutAndCounts) {
  absl::StatusOr<std::string> d = DescribeCheckpoint(TinyDir());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_THAT(*d, HasSubstr("layout check: 0 missing, 0 unexpected"));
  EXPECT_THAT(*d, HasSubstr("F8_E4M3"));
  EXPECT_THAT(*d, HasSubstr("I8"));
  EXPECT_THAT(*d, HasSubstr("active per token"));
  std::printf("%s", d->c_str());
  EXPECT_FALSE(DescribeCheckpoint("/nonexistent").ok());
}

}  // namespace
}  // namespace v4serve::model
