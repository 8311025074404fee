#include "services/worker_options.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "services/status_macros.h"

namespace v4serve::services {

absl::Status WorkerOptions::Validate() const {
  if (model_dir.empty()) return absl::InvalidArgumentError("--model: a model directory is required");
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--device must be auto, cpu or cuda, not '", device, "'"));
  }
  std::error_code ec;
  if (!std::filesystem::is_regular_file(std::filesystem::path(model_dir) / "config.json", ec)) {
    return absl::InvalidArgumentError(absl::StrCat("--model: no config.json in '", model_dir, "'"));
  }
  return process.Validate();
}

void AddWorkerFlags(FlagSet& flags, WorkerOptions* o) {
  flags.Add("model", &o->model_dir, "Checkpoint directory (config.json, *.safetensors, tokenizer.json).");
  flags.Add(
      "device", &o->device,
      "Where the model runs: auto (CUDA when this binary has it and a GPU is visible, else the CPU), cpu "
      "or cuda (fails without a GPU).");
  AddServerFlags(flags, &o->process);
}

}  // namespace v4serve::services
