// Graceful shutdown: the first SIGTERM or SIGINT (or an Admin.Shutdown call) starts a drain; the process
// stops accepting work, finishes what is in flight until a deadline, and exits 0. A second signal while
// draining exits at once with status 1.
//
// Thread-safe. Install() must run in main before any other thread starts, so that every thread
// inherits the blocked signal mask and only the watcher thread receives SIGTERM/SIGINT.
#ifndef V4SERVE_SERVICES_SHUTDOWN_H_
#define V4SERVE_SERVICES_SHUTDOWN_H_

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace v4serve::services {

class ShutdownSignal {
 public:
  ShutdownSignal() = default;
  ShutdownSignal(const ShutdownSignal&) = delete;
  ShutdownSignal& operator=(const ShutdownSignal&) = delete;

  // Blocks SIGTERM/SIGINT in this thread (and threads created later) and starts a watcher thread that
  // turns them into Trigger(). Call at most once per process.
  void InstallSignalHandlers();

  // Starts the drain with `reason`; later calls are ignored (the first reason wins).
  void Trigger(const std::string& reason);

  bool triggered() const;
  // Waits until triggered or `deadline`; returns the reason, or empty on timeout.
  std::string WaitUntil(absl::Time deadline) const;
  std::string Wait() const { return WaitUntil(absl::InfiniteFuture()); }

 private:
  mutable absl::Mutex mu_;
  bool triggered_ ABSL_GUARDED_BY(mu_) = false;
  std::string reason_ ABSL_GUARDED_BY(mu_);
};

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_SHUTDOWN_H_
