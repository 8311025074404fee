#include "decode/decode_worker.h"

#include "model/device.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/server_process.h"
#include "services/status_macros.h"

namespace v4serve::decode {

absl::Status RunDecodeWorker(const services::WorkerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("decode");
  services::ServerProcessOptions process = options.process;
  process.accelerators = model::DescribeAccelerators();
  ASSIGN_OR_RETURN(std::unique_ptr<services::ServerProcess> server,
                   services::ServerProcess::Start("decode", process, {}, &metrics, shutdown));
  V4LOG(INFO).With("model", options.model_dir).With("accelerators", process.accelerators)
      << "decode worker up (health and admin only: the decode engine arrives with the inference engine)";
  return server->Run();
}

}  // namespace v4serve::decode
