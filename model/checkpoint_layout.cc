#include "model/checkpoint_layout.h"

#include "absl/strings/str_cat.h"

namespace v4serve::model {

int64_t TensorSpec::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void AppendBlockTensors(const ModelConfig& c, const std::string& prefix, int64_t layer, bool mtp,
                        std::vector<TensorSpec>* out) {
  const int64_t d = c.hidden_size, hc = c.hc_mult, h = c.num_attention_heads, hd = c.head_dim;
  const int64_t mix = (2 + hc) * hc;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool routed = false,
                 bool is_int = false) {
    out->push_back(TensorSpec{prefix + name, std::move(shape), routed, mtp, is_int});
  };
  add("attn_norm.weight", {d});
  add("ffn_norm.weight", {d});
  for (const char* part : {"attn", "ffn"}) {
    add(absl::StrCat("hc_", part, "_fn"), {mix, hc * d});
    add(absl::StrCat("hc_", part, "_base"), {mix});
    add(absl::StrCat("hc_", part, "_scale"), {3});
  }
  add("attn.attn_sink", {h});
  add("attn.wq_a.weight", {c.q_lora_rank, d});
  add("attn.q_norm.weight", {c.q_lora_rank});
  add("attn.wq_b.weight", {h * hd, c.q_lora_rank});
  add("attn.wkv.weight", {hd, d});
  add("attn.kv_norm.weight", {hd});
  add("attn.wo_a.weight", {c.o_groups * c.o_lora_rank, h * hd / c.o_groups});
  add("attn.wo_b.weight", {d, c.o_groups * c.o_lora_rank});
  const int64_t ratio = c.compress_ratios[static_cast<size_t>(layer)];
  if (ratio > 0) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    auto compressor = [&](const std::string& p, int64_t width) {
      add(p + "wkv.weight", {coff * width, d});
      add(p + "wgate.weight", {coff * width, d});
      add(p + "ape", {ratio, coff * width});
      add(p + "norm.weight", {width});
    };
    compressor("attn.compressor.", hd);
    if (ratio == 4) {
      add("attn.indexer.wq_b.weight", {c.index_n_heads * c.index_head_dim, c.q_lora_rank});
      add("attn.indexer.weights_proj.weight", {c.index_n_heads, d});
      compressor("attn.indexer.compressor.", c.index_head_dim);
    }
  }
  const int64_t e = c.n_routed_experts, inter = c.moe_intermediate_size;
  add("ffn.gate.weight", {e, d});
  if (!mtp && c.is_hash_layer(layer)) {
    add("ffn.gate.tid2eid", {c.vocab_size, c.num_experts_per_tok}, false, true);
  } else {
    add("ffn.gate.bias", {e});
  }
  for (int64_t i = 0; i < e; ++i) {
    std::string p = absl::StrCat("ffn.experts.", i, ".");
    add(p + "w1.weight", {inter, d}, true);
    add(p + "w2.weight", {d, inter}, true);
    add(p + "w3.weight", {inter, d}, true);
  }
  add("ffn.shared_experts.w1.weight", {inter, d});
  add("ffn.shared_experts.w2.weight", {d, inter});
  add("ffn.shared_experts.w3.weight", {inter, d});
}

std::vector<TensorSpec> CheckpointTensors(const ModelConfig& c) {
  std::vector<TensorSpec> out;
  const int64_t d = c.hidden_size, hc = c.hc_mult;
  out.push_back({"embed.weight", {c.vocab_size, d}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    AppendBlockTensors(c, absl::StrCat("layers.", l, "."), l, false, &out);
  }
  out.push_back({"norm.weight", {d}});
  if (!c.tie_word_embeddings) out.push_back({"head.weight", {c.vocab_size, d}});
  out.push_back({"hc_head_fn", {hc, hc * d}});
  out.push_back({"hc_head_base", {hc}});
  out.push_back({"hc_head_scale", {1}});
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
    std::string p = absl::StrCat("mtp.", k, ".");
    AppendBlockTensors(c, p, c.num_hidden_layers + k, true, &out);
    for (const char* n : {"e_proj.weight", "h_proj.weight"}) out.push_back({p + n, {d, d}, false, true});
    for (const char* n : {"enorm.weight", "hnorm.weight", "norm.weight"})
      out.push_back({p + n, {d}, false, true});
    out.push_back({p + "hc_head_fn", {hc, hc * d}, false, true});
    out.push_back({p + "hc_head_base", {hc}, false, true});
    out.push_back({p + "hc_head_scale", {1}, false, true});
  }
  return out;
}

}  // namespace v4serve::model
