// `v4serve decode`: a decode worker (docs/ARCHITECTURE.md, request flow step 4).
#ifndef V4SERVE_DECODE_DECODE_WORKER_H_
#define V4SERVE_DECODE_DECODE_WORKER_H_

#include "absl/status/status.h"
#include "services/shutdown.h"
#include "services/worker_options.h"

namespace v4serve::decode {

// Serves until `shutdown` triggers, then drains. OK means a clean exit.
absl::Status RunDecodeWorker(const services::WorkerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::decode

#endif  // V4SERVE_DECODE_DECODE_WORKER_H_
