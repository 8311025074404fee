// Parameter counting, KV accounting and the human-readable description declared in config.h.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "model/checkpoint_layout.h"
#include "model/config.h"

namespace v4serve::model {
namespace {

// Storage precision of the KV cache (MODEL.md): RoPE dims BF16, the other dims FP8 e4m3 with one E8M0
// scale byte per 64 dims; indexer keys FP8 with one E8M0 scale byte per 128 dims.
constexpr double kKvScaleBlock = 64;
constexpr double kIndexerScaleBlock = 128;

double EntryBytes(const ModelConfig& c) {
  const double nope = static_cast<double>(c.nope_head_dim());
  return 2.0 * static_cast<double>(c.qk_rope_head_dim) + nope + std::ceil(nope / kKvScaleBlock);
}

double IndexerKeyBytes(const ModelConfig& c) {
  const double d = static_cast<double>(c.index_head_dim);
  return d + std::ceil(d / kIndexerScaleBlock);
}

}  // namespace

ParameterCounts CountParameters(const ModelConfig& c) {
  ParameterCounts p;
  int64_t routed_main = 0;
  int64_t one_expert = 3 * c.hidden_size * c.moe_intermediate_size;
  for (const TensorSpec& t : CheckpointTensors(c)) {
    if (t.is_int) continue;  // tid2eid is a lookup table, not a parameter.
    const int64_t n = t.elements();
    (t.mtp ? p.mtp : p.main_model) += n;
    if (t.routed_expert) {
      p.routed_experts += n;
      if (!t.mtp) routed_main += n;
    }
  }
  p.total = p.main_model + p.mtp;
  p.active_per_token = p.main_model - routed_main + c.num_hidden_layers * c.num_experts_per_tok * one_expert;
  return p;
}

KvBytes ComputeKvBytes(const ModelConfig& c) {
  KvBytes kv;
  const double entry = EntryBytes(c);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const double ratio = static_cast<double>(c.compress_ratios[static_cast<size_t>(l)]);
    kv.window_state_bytes += static_cast<double>(c.sliding_window) * entry;
    if (ratio == 0) continue;
    kv.compressed_per_token += entry / ratio;
    const double coff = ratio == 4 ? 2 : 1;
    // kv + score, FP32, coff*ratio slots of coff*width features.
    kv.compressor_tail_bytes += 2 * 4 * coff * ratio * coff * static_cast<double>(c.head_dim);
    if (c.layer_kind(l) == LayerKind::kCsa) {
      kv.indexer_per_token += IndexerKeyBytes(c) / ratio;
      kv.compressor_tail_bytes += 2 * 4 * coff * ratio * coff * static_cast<double>(c.index_head_dim);
    }
  }
  kv.compressed_per_token += kv.indexer_per_token;
  return kv;
}

double GqaBf16BytesPerToken(const ModelConfig& c, int64_t kv_heads, int64_t head_dim) {
  return static_cast<double>(c.num_hidden_layers) * 2.0 /*K,V*/ * static_cast<double>(kv_heads * head_dim) *
         2.0 /*BF16*/;
}

std::string DescribeConfig(const ModelConfig& c) {
  int64_t n_window = 0, n_csa = 0, n_hca = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    switch (c.layer_kind(l)) {
      case LayerKind::kWindow:
        ++n_window;
        break;
      case LayerKind::kCsa:
        ++n_csa;
        break;
      case LayerKind::kHca:
        ++n_hca;
        break;
    }
  }
  std::string s;
  absl::StrAppendFormat(&s, "vocab %d, hidden %d, layers %d (+%d MTP)\n", c.vocab_size, c.hidden_size,
                        c.num_hidden_layers, c.num_nextn_predict_layers);
  absl::StrAppendFormat(&s,
                        "attention: %d heads x %d (rope %d), q rank %d, output %d groups x %d, window %d\n",
                        c.num_attention_heads, c.head_dim, c.qk_rope_head_dim, c.q_lora_rank, c.o_groups,
                        c.o_lora_rank, c.sliding_window);
  absl::StrAppendFormat(&s, "layer kinds: %d window, %d CSA, %d HCA; compress_ratios [%s]\n", n_window, n_csa,
                        n_hca, absl::StrJoin(c.compress_ratios, ","));
  absl::StrAppendFormat(&s, "indexer: %d heads x %d, top-k %d\n", c.index_n_heads, c.index_head_dim,
                        c.index_topk);
  absl::StrAppendFormat(&s,
                        "MoE: %d routed (%d active) + %d shared, width %d, %d hash layers, %s, scale %g\n",
                        c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts,
                        c.moe_intermediate_size, c.num_hash_layers, c.scoring_func, c.routed_scaling_factor);
  absl::StrAppendFormat(&s, "mHC: %d streams, %d Sinkhorn iterations; weights %s, experts %s\n", c.hc_mult,
                        c.hc_sinkhorn_iters, c.fp8_weights ? "fp8" : "bf16",
                        c.expert_dtype.empty() ? "as stored" : c.expert_dtype);
  const ParameterCounts p = CountParameters(c);
  absl::StrAppendFormat(&s, "parameters: total %d (main %d + MTP %d), active per token %d\n", p.total,
                        p.main_model, p.mtp, p.active_per_token);
  const KvBytes kv = ComputeKvBytes(c);
  absl::StrAppendFormat(
      &s,
      "KV bytes per token: compressed %.2f (indexer keys %.2f); per sequence: window state %.0f, "
      "compressor tails %.0f\n",
      kv.compressed_per_token, kv.indexer_per_token, kv.window_state_bytes, kv.compressor_tail_bytes);
  const double gqa = GqaBf16BytesPerToken(c, 8, 128);
  absl::StrAppendFormat(&s, "vs BF16 GQA (8 KV heads x 128, same layers, %.0f B/token): %.2f%%\n", gqa,
                        100.0 * kv.compressed_per_token / gqa);
  return s;
}

}  // namespace v4serve::model
