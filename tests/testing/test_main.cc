// The main of every ctest built with v4serve_test (instead of gtest_main): gtest's usual main, plus two
// things a crash on a machine we only reach through logs needs (the GPU machine runs stripped binaries with
// their output redirected to files):
// - stdout is line-buffered, so the "[ RUN ]" line of the test that crashed is in the log (a fully
//   buffered stdout loses it with the process);
// - a fatal signal prints which test was running and a backtrace of module+offset frames (resolve them with
//   `addr2line -e <unstripped binary> <offset>`), then the signal is raised again with its default action,
//   so the exit status still says the test crashed.
#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstring>

#include "gtest/gtest.h"

namespace {

void Write(const char* s) {
  ssize_t unused = ::write(STDERR_FILENO, s, std::strlen(s));
  (void)unused;
}

void OnFatalSignal(int sig) {
  Write("\n*** ");
  Write(sig == SIGSEGV  ? "SIGSEGV"
        : sig == SIGBUS ? "SIGBUS"
        : sig == SIGFPE ? "SIGFPE"
        : sig == SIGILL ? "SIGILL"
                        : "SIGABRT");
  Write(" in ");
  // The test running, if any, from what gtest already holds (no allocation). Not async-signal-safe: gtest
  // takes its mutex here, so a crash inside gtest's own locked code would hang until ctest's timeout; the
  // death-test children that re-run main get the name this way, which a listener's copy would miss.
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (info != nullptr) {
    Write(info->test_suite_name());
    Write(".");
    Write(info->name());
  } else {
    Write("(no test running)");
  }
  Write("; backtrace (module(+offset)):\n");
  void* frames[64];
  const int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, OnFatalSignal);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
