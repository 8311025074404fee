// Options every worker role (prefill, decode) shares, with their flags.
#ifndef V4SERVE_SERVICES_WORKER_OPTIONS_H_
#define V4SERVE_SERVICES_WORKER_OPTIONS_H_

#include <string>

#include "absl/status/status.h"
#include "services/flags.h"
#include "services/server_process.h"

namespace v4serve::services {

struct WorkerOptions {
  std::string model_dir;          // a checkpoint directory with config.json
  std::string device = "auto";    // where the model runs: auto (CUDA when a GPU is visible), cpu or cuda
  std::string numerics = "auto";  // auto (faithful on the CPU), faithful or exact (model::SetServingNumerics)
  std::string cuda_weights =
      "fp8";  // the CUDA backend's weight precision: fp8, bf16 or fp32 (model::CudaWeights)
  ServerProcessOptions process;

  // INVALID_ARGUMENT naming --model when it is empty or has no config.json.
  absl::Status Validate() const;
};

void AddWorkerFlags(FlagSet& flags, WorkerOptions* options);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_WORKER_OPTIONS_H_
