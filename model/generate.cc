#include "model/generate.h"

#include <map>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/checkpoint_layout.h"
#include "model/safetensors.h"
#include "services/status_macros.h"

namespace v4serve::model {

absl::StatusOr<std::vector<int32_t>> Generate(const Model& model, absl::Span<const int32_t> prompt_ids,
                                              const SamplingOptions& options) {
  RETURN_IF_ERROR(ValidateSamplingOptions(options));
  if (prompt_ids.empty()) return absl::InvalidArgumentError("empty prompt");
  std::mt19937_64 rng(options.seed);
  const int64_t vocab = model.config().vocab_size;
  SequenceState state = model.NewState();
  std::vector<int32_t> out;
  if (options.max_new_tokens == 0) return out;
  ASSIGN_OR_RETURN(std::vector<float> logits, model.Prefill(&state, prompt_ids));
  for (;;) {
    const int32_t next = SampleToken(logits.data(), vocab, options, &rng);
    out.push_back(next);
    if (static_cast<int32_t>(out.size()) >= options.max_new_tokens) break;
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) break;
    SequenceState* s = &state;
    ASSIGN_OR_RETURN(logits, model.Decode(absl::MakeConstSpan(&s, 1), absl::MakeConstSpan(&next, 1)));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> GenerateFromDir(const std::string& model_dir,
                                                     absl::Span<const int32_t> prompt_ids,
                                                     SamplingOptions options,
                                                     const ModelOptions& model_options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, model_options));
  if (options.stop_ids.empty())
    options.stop_ids.push_back(static_cast<int32_t>(model->config().eos_token_id));
  return Generate(*model, prompt_ids, options);
}

absl::StatusOr<std::string> DescribeCheckpoint(std::string_view dir_view) {
  const std::string dir(dir_view);
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  std::string s = DescribeConfig(config);
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
  std::set<std::string> expected;
  for (const TensorSpec& t : CheckpointTensors(config)) expected.insert(t.name);
  std::map<std::string, int64_t> bytes_by_dtype;
  int64_t unexpected = 0, total_bytes = 0;
  std::string first_unexpected;
  for (const std::string& name : ckpt->Names()) {
    ASSIGN_OR_RETURN(TensorView v, ckpt->Get(name));
    const int64_t b = static_cast<int64_t>(v.info->end - v.info->begin);
    bytes_by_dtype[std::string(DTypeName(v.info->dtype))] += b;
    total_bytes += b;
    const bool is_scale = name.size() > 6 && name.substr(name.size() - 6) == ".scale";
    if (!expected.count(name) && !is_scale) {
      if (unexpected++ == 0) first_unexpected = name;
    }
  }
  int64_t missing = 0;
  std::string first_missing;
  for (const std::string& name : expected) {
    if (!ckpt->Contains(name)) {
      if (missing++ == 0) first_missing = name;
    }
  }
  absl::StrAppendFormat(&s, "checkpoint: %d tensors, %.3f GB stored (", ckpt->Names().size(),
                        total_bytes / 1e9);
  bool first = true;
  for (const auto& [dtype, b] : bytes_by_dtype) {
    absl::StrAppendFormat(&s, "%s%s %.3f GB", first ? "" : ", ", dtype, b / 1e9);
    first = false;
  }
  absl::StrAppend(&s, ")\n");
  absl::StrAppendFormat(&s, "layout check: %d missing%s, %d unexpected%s\n", missing,
                        missing ? absl::StrCat(" (first: ", first_missing, ")") : "", unexpected,
                        unexpected ? absl::StrCat(" (first: ", first_unexpected, ")") : "");
  return s;
}

}  // namespace v4serve::model
