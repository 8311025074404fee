#include "services/child_process.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include "absl/time/clock.h"

namespace v4serve::services {
namespace {

TEST(ChildProcessTest, ReportsExitCodes) {
  auto ok = ChildProcess::Spawn("true", {"/bin/sh", "-c", "exit 0"});
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ((*ok)->WaitUntil(absl::Now() + absl::Seconds(10)), 0);
  auto three = ChildProcess::Spawn("three", {"/bin/sh", "-c", "exit 3"});
  ASSERT_TRUE(three.ok());
  EXPECT_EQ((*three)->WaitUntil(absl::Now() + absl::Seconds(10)), 3);
  auto missing = ChildProcess::Spawn("missing", {"/nonexistent/binary"});
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ((*missing)->WaitUntil(absl::Now() + absl::Seconds(10)), 127);
}

TEST(ChildProcessTest, StopTerminatesThenKills) {
  auto sleeper = ChildProcess::Spawn("sleep", {"/bin/sleep", "30"});
  ASSERT_TRUE(sleeper.ok());
  EXPECT_FALSE((*sleeper)->Poll().has_value());
  EXPECT_EQ((*sleeper)->Stop(absl::Now() + absl::Seconds(10)), 128 + 15);  // SIGTERM
  // The shell writes `marker` once its trap is installed; signal it only then.
  std::string marker = ::testing::TempDir() + "/trap_ready";
  std::remove(marker.c_str());
  auto stubborn =
      ChildProcess::Spawn("stubborn", {"/bin/sh", "-c", "trap '' TERM; touch " + marker + "; exec sleep 30"});
  ASSERT_TRUE(stubborn.ok());
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!std::filesystem::exists(marker) && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(std::filesystem::exists(marker));
  EXPECT_EQ((*stubborn)->Stop(absl::Now() + absl::Milliseconds(300)), 128 + 9);  // SIGKILL
}

}  // namespace
}  // namespace v4serve::services
