// The tests' main (test_main.cc) names the crashing test and prints a backtrace on a fatal signal.
#include <csignal>

#include "gtest/gtest.h"

namespace {

TEST(TestMainTest, ACrashNamesTheRunningTestAndPrintsABacktrace) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // The child re-runs main: the handler is its own.
  EXPECT_EXIT(std::raise(SIGSEGV), ::testing::KilledBySignal(SIGSEGV),
              "SIGSEGV in TestMainTest\\.ACrashNamesTheRunningTestAndPrintsABacktrace; backtrace");
  EXPECT_EXIT(std::abort(), ::testing::KilledBySignal(SIGABRT), "SIGABRT in TestMainTest\\.");
}

}  // namespace
