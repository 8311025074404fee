// Runs the real `v4serve` binary for e2e tests: ephemeral ports, a ready file, clean shutdown.
#ifndef V4SERVE_TESTS_TESTING_V4SERVE_PROCESS_H_
#define V4SERVE_TESTS_TESTING_V4SERVE_PROCESS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "services/child_process.h"

namespace v4serve::testing {

// A fresh temporary directory, removed with the object.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Path of the built v4serve binary (from V4SERVE_BINARY_DIR, set by ctest).
std::string V4serveBinary();

class V4serveProcess {
 public:
  // Starts `v4serve <args...> --ready_file=...` and waits for the ready file. If the process exits first,
  // the error carries its exit status.
  static absl::StatusOr<std::unique_ptr<V4serveProcess>> Start(const std::vector<std::string>& args,
                                                               absl::Duration timeout = absl::Seconds(60));
  ~V4serveProcess();

  const nlohmann::json& ready() const { return ready_; }
  int port(const std::string& key) const { return ready_.at(key).get<int>(); }
  // SIGTERM, then waits up to `timeout` (SIGKILL after). Returns the exit status (137 = had to be killed).
  int Terminate(absl::Duration timeout);

 private:
  V4serveProcess() = default;
  TempDir dir_;
  std::unique_ptr<services::ChildProcess> child_;
  nlohmann::json ready_;
};

// Runs a shell command to completion; returns its exit status, stdout+stderr in `output`.
int RunCommand(const std::string& command, std::string* output);

// Runs `v4serve <args...>` to completion; returns its exit status, stdout+stderr in `output`.
int RunV4serve(const std::vector<std::string>& args, std::string* output);

// A model directory for router tests, `dir`/tiny-chat: the tiny V4 config with its vocabulary widened to the
// 4,096-id test tokenizer (context 512), and that tokenizer. Returns its path.
std::string MakeTestChatModelDir(const TempDir& dir);

// Polls the router's GET /readyz until it answers 200 (a decode worker passed its health check) or `timeout`.
absl::Status WaitUntilReady(int http_port, absl::Duration timeout);

}  // namespace v4serve::testing

#endif  // V4SERVE_TESTS_TESTING_V4SERVE_PROCESS_H_
