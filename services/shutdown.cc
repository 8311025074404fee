#include "services/shutdown.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "services/logging.h"

namespace v4serve::services {

void ShutdownSignal::InstallSignalHandlers() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a peer closing a socket must not kill the process
  std::thread([this, set] {
    int received = 0;
    while (true) {
      if (sigwait(&set, &received) != 0) continue;
      if (!triggered()) {
        Trigger(absl::StrCat("signal ", received == SIGTERM ? "SIGTERM" : "SIGINT"));
        continue;
      }
      V4LOG(WARNING) << "second signal while draining; exiting now";
      _exit(1);
    }
  }).detach();
}

void ShutdownSignal::Trigger(const std::string& reason) {
  absl::MutexLock lock(&mu_);
  if (triggered_) return;
  triggered_ = true;
  reason_ = reason;
}

bool ShutdownSignal::triggered() const {
  absl::MutexLock lock(&mu_);
  return triggered_;
}

std::string ShutdownSignal::WaitUntil(absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithDeadline(absl::Condition(&triggered_), deadline);
  return reason_;
}

}  // namespace v4serve::services
