#include "services/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nlohmann/json.hpp"

namespace v4serve::services {
namespace {

using ::testing::HasSubstr;

TEST(LoggingTest, TextLinesQuoteValuesThatNeedIt) {
  std::string line = FormatLogLine(LogLevel::kWarning, "text", "router", "x.cc:1", "bind failed",
                                   {{"port", "8080"}, {"reason", "address in use"}}, 0);
  EXPECT_EQ(
      line,
      "1970-01-01T00:00:00.000Z warning router x.cc:1] bind failed port=8080 reason=\"address in use\"\n");
}

TEST(LoggingTest, JsonLinesAreOneObjectEach) {
  std::string line = FormatLogLine(LogLevel::kInfo, "json", "decode", "y.cc:2", "say \"hi\"\n",
                                   {{"request_id", "req-1"}}, 1500000);
  ASSERT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  auto j = nlohmann::json::parse(line);
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["role"], "decode");
  EXPECT_EQ(j["msg"], "say \"hi\"\n");
  EXPECT_EQ(j["request_id"], "req-1");
  EXPECT_EQ(j["ts"], "1970-01-01T00:00:01.500Z");
}

TEST(LoggingTest, LevelsFilterAndValidate) {
  LogOptions bad;
  bad.level = "loud";
  EXPECT_THAT(bad.Validate().message(), HasSubstr("loud"));
  bad.level = "info";
  bad.format = "xml";
  EXPECT_THAT(bad.Validate().message(), HasSubstr("xml"));
  LogLevel before = SetLogLevel(LogLevel::kError);
  EXPECT_FALSE(LogEnabled(LogLevel::kWarning));
  EXPECT_TRUE(LogEnabled(LogLevel::kError));
  SetLogLevel(before);
}

}  // namespace
}  // namespace v4serve::services
