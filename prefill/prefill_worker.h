// `v4serve prefill`: a prefill worker (docs/ARCHITECTURE.md, request flow steps 3 and 5; the transfer in
// docs/KV_TRANSFER.md). Loads the model and serves Worker.Prefill (prefill/prefill_service.h).
#ifndef V4SERVE_PREFILL_PREFILL_WORKER_H_
#define V4SERVE_PREFILL_PREFILL_WORKER_H_

#include <string>

#include "absl/status/status.h"
#include "prefill/prefill_service.h"
#include "services/flags.h"
#include "services/shutdown.h"
#include "services/worker_options.h"

namespace v4serve::prefill {

struct PrefillWorkerOptions {
  services::WorkerOptions worker;
  PrefillServiceOptions service;
  int64_t transfer_timeout_ms = 60000;
  // "grpc": gRPC PushKv only; "nccl": also join NCCL pair communicators that decode workers offer
  // (needs a CUDA build and a GPU).
  std::string kv_transport = "grpc";
  int64_t gpu = 0;  // The GPU the NCCL transport uses.

  absl::Status Validate() const;
};

void AddPrefillWorkerFlags(services::FlagSet& flags, PrefillWorkerOptions* options);

// Serves until `shutdown` triggers, then drains. OK means a clean exit.
absl::Status RunPrefillWorker(const PrefillWorkerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::prefill

#endif  // V4SERVE_PREFILL_PREFILL_WORKER_H_
