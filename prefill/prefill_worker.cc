#include "prefill/prefill_worker.h"

#include "model/device.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/server_process.h"
#include "services/status_macros.h"

namespace v4serve::prefill {

absl::Status RunPrefillWorker(const services::WorkerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("prefill");
  services::ServerProcessOptions process = options.process;
  process.accelerators = model::DescribeAccelerators();
  ASSIGN_OR_RETURN(std::unique_ptr<services::ServerProcess> server,
                   services::ServerProcess::Start("prefill", process, {}, &metrics, shutdown));
  V4LOG(INFO).With("model", options.model_dir).With("accelerators", process.accelerators)
      << "prefill worker up (health and admin only: the prefill engine arrives with disaggregated serving)";
  return server->Run();
}

}  // namespace v4serve::prefill
