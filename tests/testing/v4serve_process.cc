#include "tests/testing/v4serve_process.h"

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "services/grpc_server.h"
#include "tests/testing/http_client.h"

namespace v4serve::testing {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "v4serve-test-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) std::abort();
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string V4serveBinary() {
  const char* dir = std::getenv("V4SERVE_BINARY_DIR");
  return absl::StrCat(dir != nullptr ? dir : V4SERVE_DEFAULT_BINARY_DIR, "/v4serve");
}

absl::StatusOr<std::unique_ptr<V4serveProcess>> V4serveProcess::Start(const std::vector<std::string>& args,
                                                                      absl::Duration timeout) {
  auto p = std::unique_ptr<V4serveProcess>(new V4serveProcess());
  std::string ready = p->dir_.path() + "/ready.json";
  std::vector<std::string> argv = {V4serveBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.push_back("--ready_file=" + ready);
  absl::StatusOr<std::unique_ptr<services::ChildProcess>> child =
      services::ChildProcess::Spawn("v4serve", argv);
  if (!child.ok()) return child.status();
  p->child_ = std::move(*child);
  absl::Time deadline = absl::Now() + timeout;
  // Waits on the condition "ready file exists" with a deadline; the child writes it atomically.
  while (absl::Now() < deadline) {
    if (std::optional<int> code = p->child_->Poll()) {
      return absl::UnavailableError(
          absl::StrCat("v4serve ", absl::StrJoin(args, " "), " exited with ", *code));
    }
    std::error_code ec;
    if (fs::exists(ready, ec)) {
      absl::StatusOr<std::string> text = services::ReadFileToString(ready);
      if (!text.ok()) return text.status();
      p->ready_ = nlohmann::json::parse(*text);
      return p;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::DeadlineExceededError("v4serve did not become ready");
}

V4serveProcess::~V4serveProcess() {
  if (child_) child_->Stop(absl::Now() + absl::Seconds(5));
}

int V4serveProcess::Terminate(absl::Duration timeout) { return child_->Stop(absl::Now() + timeout); }

int RunV4serve(const std::vector<std::string>& args, std::string* output) {
  std::string cmd = V4serveBinary();
  for (const std::string& a : args) absl::StrAppend(&cmd, " '", a, "'");
  return RunCommand(cmd, output);
}

std::string MakeTestChatModelDir(const TempDir& dir) {
  const std::string source = V4SERVE_TEST_SOURCE_DIR;
  std::string model = dir.path() + "/tiny-chat";
  fs::create_directories(model);
  std::ifstream in(source + "/tests/model/testdata/tiny_v4/config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  config["vocab_size"] = 4096;
  config["max_position_embeddings"] = 512;
  std::ofstream(model + "/config.json") << config.dump();
  fs::copy_file(source + "/tests/model/testdata/tokenizer/tokenizer.json", model + "/tokenizer.json");
  return model;
}

absl::Status WaitUntilReady(int http_port, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  std::string last = "no answer";
  while (absl::Now() < deadline) {
    absl::StatusOr<HttpResult> ready = HttpCall(http_port, "GET", "/readyz");
    if (ready.ok() && ready->status == 200) return absl::OkStatus();
    last = ready.ok() ? absl::StrCat("HTTP ", ready->status, ": ", ready->body.substr(0, 300))
                      : std::string(ready.status().message());
    absl::SleepFor(absl::Milliseconds(20));
  }
  // What the last probe got, so that a slow start is told apart from a router that never sees a worker.
  return absl::DeadlineExceededError(absl::StrCat("the router on port ", http_port, " was not ready within ",
                                                  absl::FormatDuration(timeout), "; last /readyz: ", last));
}

int RunCommand(const std::string& command, std::string* output) {
  std::string cmd = command + " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return -1;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) output->append(buf, n);
  int status = pclose(f);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace v4serve::testing
