#include "services/json_depth.h"

#include <gtest/gtest.h>

#include <string>

namespace v4serve {
namespace {

TEST(JsonDepthTest, CountsArraysAndObjectsNotStrings) {
  EXPECT_TRUE(JsonDepthWithin("", 0));
  EXPECT_TRUE(JsonDepthWithin(R"({"a": [1, {"b": []}]})", 4));
  EXPECT_FALSE(JsonDepthWithin(R"({"a": [1, {"b": []}]})", 3));
  // Brackets inside strings, escaped quotes and backslashes do not count.
  EXPECT_TRUE(JsonDepthWithin(R"({"a": "[[[[{{{{", "b": "\"[[[", "c": "\\", "d": []})", 2));
  EXPECT_FALSE(JsonDepthWithin(R"({"c": "\\", "d": [[]]})", 2));
  // Siblings do not add up; closers without openers do not go below zero.
  EXPECT_TRUE(JsonDepthWithin("[[],[],[]]]]][]", 2));
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  EXPECT_FALSE(JsonDepthWithin(deep));
  EXPECT_TRUE(JsonDepthWithin(std::string(kMaxJsonDepth, '[') + std::string(kMaxJsonDepth, ']')));
  EXPECT_FALSE(JsonDepthWithin(std::string(kMaxJsonDepth + 1, '[')));
}

}  // namespace
}  // namespace v4serve
