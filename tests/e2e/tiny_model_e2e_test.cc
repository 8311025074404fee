// Accuracy of the shipped trained model (models/tiny-v4) through the whole serving path of `v4serve up`
// (router -> prefill worker -> KV over gRPC -> decode worker):
// tools/eval/eval_api.py (standard-library Python) starts `v4serve up`, sends a small held-out set of
// generated tasks concurrently through the OpenAI chat API (arithmetic, recall, the calculator tool, and
// <｜title｜> through v4serve.quick_instruction) and fails below the accuracy the trained model reaches
// (docs/TINY_MODEL.md). Another serving path is one flag away: eval_api.py's --serve-arg passes flags to
// `v4serve up`.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "tests/testing/v4serve_process.h"

namespace v4serve {
namespace {

const std::string kSource = V4SERVE_TEST_SOURCE_DIR;

TEST(TinyModelE2eTest, HeldOutAccuracyThroughUp) {
  std::string out;
  int status = testing::RunCommand(
      "python3 " + kSource + "/tools/eval/eval_api.py --serve " + V4SERVE_BINARY + " --model " + kSource +
          "/models/tiny-v4 --n 12 --n-recall 3 --lengths 1024 --concurrency 2 --label up"
          " --require tool_call=0.9 --require tool_answer=0.9 --require title=0.3 --require arith=0.5 2>&1",
      &out);
  std::printf("%s\n", out.c_str());
  EXPECT_EQ(status, 0) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("requirements met")) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("| tool_call |")) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("| recall | 1024 |")) << out;
}

}  // namespace
}  // namespace v4serve
