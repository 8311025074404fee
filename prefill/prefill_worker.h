// `v4serve prefill`: a prefill worker (docs/ARCHITECTURE.md, request flow steps 3 and 5).
#ifndef V4SERVE_PREFILL_PREFILL_WORKER_H_
#define V4SERVE_PREFILL_PREFILL_WORKER_H_

#include "absl/status/status.h"
#include "services/shutdown.h"
#include "services/worker_options.h"

namespace v4serve::prefill {

// Serves until `shutdown` triggers, then drains. OK means a clean exit.
absl::Status RunPrefillWorker(const services::WorkerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::prefill

#endif  // V4SERVE_PREFILL_PREFILL_WORKER_H_
