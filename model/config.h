// DeepSeek-V4 model configuration: parsed from a Hugging Face `config.json`, validated once.
//
// Accepts the field names of the released checkpoints (`compress_ratios`, `rope_scaling`, ...) and the
// spellings of Hugging Face transformers (`layer_types`, `compress_rates`, `mlp_layer_types`,
// `rope_parameters`, `partial_rotary_factor`). Validation errors name the offending field.
//
// Thread-safety: ModelConfig is a plain value; const access from any thread is safe.
#ifndef V4SERVE_MODEL_CONFIG_H_
#define V4SERVE_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace v4serve::model {

// The attention kind of a layer, from its compression ratio: 0 = sliding window only, 4 = CSA
// (overlapping compressor + lightning indexer), anything else > 0 = HCA (non-overlapping, dense).
enum class LayerKind { kWindow, kCsa, kHca };

std::string_view LayerKindName(LayerKind kind);

struct RopeScaling {
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;  // 0 disables YaRN.
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct ModelConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_nextn_predict_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 1;
  int64_t head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t q_lora_rank = 0;
  int64_t o_groups = 0;
  int64_t o_lora_rank = 0;
  int64_t sliding_window = 0;
  // One ratio per main layer followed by one per MTP layer (size num_hidden_layers +
  // num_nextn_predict_layers). 0 = window only, 4 = CSA, other > 0 = HCA.
  std::vector<int64_t> compress_ratios;
  double rope_theta = 10000.0;
  double compress_rope_theta = 160000.0;
  RopeScaling rope_scaling;  // Applies to compressed (CSA/HCA) layers only.
  int64_t max_position_embeddings = 0;
  int64_t index_n_heads = 0;
  int64_t index_head_dim = 0;
  int64_t index_topk = 0;
  int64_t moe_intermediate_size = 0;
  int64_t n_routed_experts = 0;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 0;
  int64_t num_hash_layers = 0;
  std::string scoring_func = "sqrtsoftplus";
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  double swiglu_limit = 0.0;  // 0 disables the clamp.
  int64_t hc_mult = 1;
  int64_t hc_sinkhorn_iters = 0;
  double hc_eps = 1e-6;
  double rms_norm_eps = 1e-6;
  std::string expert_dtype;         // "fp4" for MXFP4 routed experts, empty otherwise.
  bool fp8_weights = false;         // quantization_config.quant_method == "fp8".
  int64_t weight_block_size = 128;  // FP8 tile edge (quantization_config.weight_block_size).
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  bool tie_word_embeddings = false;

  LayerKind layer_kind(int64_t layer) const;
  int64_t nope_head_dim() const { return head_dim - qk_rope_head_dim; }
  bool is_hash_layer(int64_t layer) const { return layer < num_hash_layers; }
};

// Parses config.json text. Unknown fields are ignored; missing required fields and inconsistent values
// are an InvalidArgument error whose message names the field.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);

// Reads and parses `dir`/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(std::string_view dir);

// Checks internal consistency (positive sizes, divisibility, ratio list length, ...).
absl::Status ValidateModelConfig(const ModelConfig& config);

// Parameter counts (elements, not bytes). `active_per_token` counts what one token touches in the main
// model: everything except the routed experts, plus num_experts_per_tok of them per MoE layer; the
// embedding table counts once (one row is read, but the figure follows the usual convention).
struct ParameterCounts {
  int64_t total = 0;       // Main model + MTP layers.
  int64_t main_model = 0;  // Without MTP.
  int64_t mtp = 0;
  int64_t active_per_token = 0;  // Main model only.
  int64_t routed_experts = 0;    // Part of main_model + mtp held by routed experts.
};
ParameterCounts CountParameters(const ModelConfig& config);

// KV accounting in the storage precision (RoPE dims BF16, the rest FP8 with one FP32 scale per 64 dims,
// indexer keys FP8 with one FP32 scale per 128 dims), main layers only (the MTP layer is not cached).
struct KvBytes {
  // Average bytes of compressed entries added per token, summed over layers.
  double compressed_per_token = 0;
  // Bytes of indexer keys per token (included in compressed_per_token).
  double indexer_per_token = 0;
  // Bytes of the sliding-window state of one sequence (window × head_dim per layer), independent of
  // length once the window is full.
  double window_state_bytes = 0;
  // Bytes of the incomplete compressor tails (FP32 kv + score per slot), per sequence.
  double compressor_tail_bytes = 0;
};
KvBytes ComputeKvBytes(const ModelConfig& config);

// Bytes of a BF16 GQA cache with `kv_heads` heads of `head_dim` over the same number of main layers, per
// token (K and V).
double GqaBf16BytesPerToken(const ModelConfig& config, int64_t kv_heads, int64_t head_dim);

// Multi-line human-readable summary: config, parameter counts, KV bytes (for `v4serve convert --inspect`).
std::string DescribeConfig(const ModelConfig& config);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_CONFIG_H_
