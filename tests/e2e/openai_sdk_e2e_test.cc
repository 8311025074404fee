// Runs the official OpenAI Python SDK (tools/requirements-test.txt, installed into .venv by
// tools/setup.sh) against the real router binary, with a fake decode worker behind it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/testing/fake_worker.h"
#include "tests/testing/http_client.h"
#include "tests/testing/v4serve_process.h"

namespace v4serve {
namespace {

const std::string kSource = V4SERVE_TEST_SOURCE_DIR;

TEST(OpenAiSdkE2eTest, ChatStreamingToolCallsAndErrors) {
  std::string python = kSource + "/.venv/bin/python";
  if (!std::filesystem::exists(python)) {
    if (std::getenv("CI") != nullptr) FAIL() << python << " is missing: run tools/setup.sh test";
    GTEST_SKIP() << python << " is missing: run `tools/setup.sh deps` to install the openai SDK";
  }
  auto tok = model::Tokenizer::LoadFromFile(kSource + "/tests/model/testdata/tokenizer/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  const model::Tokenizer& t = **tok;
  testing::FakeWorker worker([&t](const v1::GenerateRequest& req) {
    std::vector<int32_t> prompt(req.token_ids().ids().begin(), req.token_ids().ids().end());
    std::string text = t.Decode(prompt).value_or("");
    bool offer_tool =
        text.find("get_weather") != std::string::npos && text.find("sunny") == std::string::npos;
    return t.Encode(offer_tool
                        ? "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                          "<｜DSML｜parameter name=\"city\" string=\"true\">Beijing</｜DSML｜parameter>\n"
                          "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
                        : "Hello there!\n\nHow can I help?<｜end▁of▁sentence｜>");
  });
  testing::TempDir dir;
  std::string model = testing::MakeTestChatModelDir(dir);
  auto router = testing::V4serveProcess::Start(
      {"router", "--host=127.0.0.1", "--http_host=127.0.0.1", "--http_port=0", "--grpc_port=0",
       "--model=" + model, "--decode_workers=" + worker.address(), "--worker_health_interval=100ms"});
  ASSERT_TRUE(router.ok()) << router.status();
  int port = (*router)->port("http_port");
  ASSERT_TRUE(testing::WaitUntilReady(port, absl::Seconds(20)).ok());
  std::string out;
  int status = testing::RunCommand(
      python + " " + kSource + "/tests/e2e/openai_sdk_test.py http://127.0.0.1:" + std::to_string(port) +
          "/v1",
      &out);
  EXPECT_EQ(status, 0) << out;
  EXPECT_THAT(out, ::testing::HasSubstr("all checks passed")) << out;
  EXPECT_EQ((*router)->Terminate(absl::Seconds(20)), 0);
}

}  // namespace
}  // namespace v4serve
