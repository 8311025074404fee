// A child process (a role started by `v4serve up`, or a binary under test): the default signal mask, and
// SIGTERM when the parent dies so that no worker outlives the cluster.
//
// Owned by one thread.
#ifndef V4SERVE_SERVICES_CHILD_PROCESS_H_
#define V4SERVE_SERVICES_CHILD_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace v4serve::services {

class ChildProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Spawn(const std::string& name,
                                                             const std::vector<std::string>& argv);
  // Kills (SIGKILL) and reaps the child if it still runs.
  ~ChildProcess();

  const std::string& name() const { return name_; }
  pid_t pid() const { return pid_; }

  // Exit status once it exited (reaped without blocking); nullopt while it runs.
  std::optional<int> Poll();
  // Waits for the child to exit on its own until `deadline`; nullopt if it still runs then.
  std::optional<int> WaitUntil(absl::Time deadline);
  // SIGTERM, then SIGKILL at `deadline`. Returns the exit status (128+signal for a signal).
  int Stop(absl::Time deadline);

 private:
  ChildProcess(std::string name, pid_t pid) : name_(std::move(name)), pid_(pid) {}
  std::string name_;
  pid_t pid_;
  std::optional<int> status_;
};

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_CHILD_PROCESS_H_
