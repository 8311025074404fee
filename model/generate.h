// Offline generation and checkpoint inspection: the library side of `v4serve generate` and
// `v4serve convert --inspect`.
#ifndef V4SERVE_MODEL_GENERATE_H_
#define V4SERVE_MODEL_GENERATE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/model.h"
#include "model/sampling.h"

namespace v4serve::model {

// Prefills `prompt_ids` in one sequence and generates up to options.max_new_tokens tokens (stopping after
// a stop id). Returns only the generated ids.
absl::StatusOr<std::vector<int32_t>> Generate(const Model& model, absl::Span<const int32_t> prompt_ids,
                                              const SamplingOptions& options);

// Loads the model in `model_dir` with `model_options` (numeric mode) and runs Generate. Stop ids default to
// the config's EOS when options.stop_ids is empty.
absl::StatusOr<std::vector<int32_t>> GenerateFromDir(const std::string& model_dir,
                                                     absl::Span<const int32_t> prompt_ids,
                                                     SamplingOptions options,
                                                     const ModelOptions& model_options = ModelOptions{});

// Config, parameter counts (total, active per token), KV bytes per token, and the checkpoint's tensors
// checked against the layout the config implies (missing / unexpected names, stored bytes per dtype).
absl::StatusOr<std::string> DescribeCheckpoint(std::string_view dir);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_GENERATE_H_
