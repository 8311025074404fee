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
  if (numerics != "auto" && numerics != "faithful" && numerics != "exact") {
    return absl::InvalidArgumentError(
        absl::StrCat("--numerics must be auto, faithful or exact, not '", numerics, "'"));
  }
  if (cuda_weights != "fp8" && cuda_weights != "bf16" && cuda_weights != "fp32") {
    return absl::InvalidArgumentError(
        absl::StrCat("--cuda_weights must be fp8, bf16 or fp32, not '", cuda_weights, "'"));
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
  flags.Add("numerics", &o->numerics,
            "Numeric mode: faithful (the released kernels' FP8/FP4 rounding, simulated on the CPU), exact "
            "(FP32 on the CPU; the CUDA backend's own precisions on a GPU), or auto: faithful on the CPU, "
            "the CUDA backend where a GPU is visible.");
  flags.Add(
      "cuda_weights", &o->cuda_weights,
      "Weight precision of the CUDA backend: fp8 (the checkpoint's FP8 linears stay FP8 with their 128x128 "
      "block scales and take FP8 inputs, as DeepSeek's kernels; the rest BF16), bf16, or fp32 (for "
      "comparisons with the CPU). Routed experts stay MXFP4 except in fp32. Ignored on the CPU.");
  AddServerFlags(flags, &o->process);
}

}  // namespace v4serve::services
