#include "model/cpu/weights.h"

#include "absl/strings/str_cat.h"
#include "services/status_macros.h"

namespace v4serve::model::cpu {
namespace {

class Reader {
 public:
  Reader(const ModelConfig& c, const Checkpoint& ckpt) : c_(c), ckpt_(ckpt) {}

  absl::Status Read(const std::string& name, const std::vector<int64_t>& shape, Tensor* out) {
    ASSIGN_OR_RETURN(std::vector<float> v, ckpt_.ReadFloat(name, shape));
    *out = Tensor(std::move(v));
    ASSIGN_OR_RETURN(TensorView view, ckpt_.Get(name));
    out->quantized = view.info->dtype == DType::kF8E4M3 || view.info->dtype == DType::kI8 ||
                     view.info->dtype == DType::kU8;
    return absl::OkStatus();
  }

  absl::Status Hc(const std::string& p, const std::string& part, HcWeights* hc) {
    const int64_t h = c_.hc_mult, mix = (2 + h) * h, d = c_.hidden_size;
    RETURN_IF_ERROR(Read(absl::StrCat(p, "hc_", part, "_fn"), {mix, h * d}, &hc->fn));
    RETURN_IF_ERROR(Read(absl::StrCat(p, "hc_", part, "_base"), {mix}, &hc->base));
    return Read(absl::StrCat(p, "hc_", part, "_scale"), {3}, &hc->scale);
  }

  absl::Status HcHead(const std::string& p, HcWeights* hc) {
    const int64_t h = c_.hc_mult, d = c_.hidden_size;
    RETURN_IF_ERROR(Read(p + "hc_head_fn", {h, h * d}, &hc->fn));
    RETURN_IF_ERROR(Read(p + "hc_head_base", {h}, &hc->base));
    return Read(p + "hc_head_scale", {1}, &hc->scale);
  }

  absl::Status Compressor(const std::string& p, int64_t ratio, int64_t width, CompressorWeights* w) {
    const int64_t coff = ratio == 4 ? 2 : 1, d = c_.hidden_size;
    RETURN_IF_ERROR(Read(p + "wkv.weight", {coff * width, d}, &w->wkv));
    RETURN_IF_ERROR(Read(p + "wgate.weight", {coff * width, d}, &w->wgate));
    RETURN_IF_ERROR(Read(p + "ape", {ratio, coff * width}, &w->ape));
    return Read(p + "norm.weight", {width}, &w->norm);
  }

  absl::Status Expert(const std::string& p, ExpertWeights* e) {
    const int64_t d = c_.hidden_size, i = c_.moe_intermediate_size;
    RETURN_IF_ERROR(Read(p + "w1.weight", {i, d}, &e->w1));
    RETURN_IF_ERROR(Read(p + "w2.weight", {d, i}, &e->w2));
    return Read(p + "w3.weight", {i, d}, &e->w3);
  }

  absl::Status Block(const std::string& p, int64_t layer, bool mtp, BlockWeights* b) {
    const int64_t d = c_.hidden_size, h = c_.num_attention_heads, hd = c_.head_dim;
    RETURN_IF_ERROR(Read(p + "attn_norm.weight", {d}, &b->attn_norm));
    RETURN_IF_ERROR(Read(p + "ffn_norm.weight", {d}, &b->ffn_norm));
    RETURN_IF_ERROR(Hc(p, "attn", &b->hc_attn));
    RETURN_IF_ERROR(Hc(p, "ffn", &b->hc_ffn));
    const std::string a = p + "attn.";
    RETURN_IF_ERROR(Read(a + "attn_sink", {h}, &b->attn_sink));
    RETURN_IF_ERROR(Read(a + "wq_a.weight", {c_.q_lora_rank, d}, &b->wq_a));
    RETURN_IF_ERROR(Read(a + "q_norm.weight", {c_.q_lora_rank}, &b->q_norm));
    RETURN_IF_ERROR(Read(a + "wq_b.weight", {h * hd, c_.q_lora_rank}, &b->wq_b));
    RETURN_IF_ERROR(Read(a + "wkv.weight", {hd, d}, &b->wkv));
    RETURN_IF_ERROR(Read(a + "kv_norm.weight", {hd}, &b->kv_norm));
    RETURN_IF_ERROR(Read(a + "wo_a.weight", {c_.o_groups * c_.o_lora_rank, h * hd / c_.o_groups}, &b->wo_a));
    RETURN_IF_ERROR(Read(a + "wo_b.weight", {d, c_.o_groups * c_.o_lora_rank}, &b->wo_b));
    const int64_t ratio = c_.compress_ratios[static_cast<size_t>(layer)];
    if (ratio > 0) RETURN_IF_ERROR(Compressor(a + "compressor.", ratio, hd, &b->compressor));
    if (ratio == 4) {
      RETURN_IF_ERROR(Read(a + "indexer.wq_b.weight", {c_.index_n_heads * c_.index_head_dim, c_.q_lora_rank},
                           &b->indexer_wq_b));
      RETURN_IF_ERROR(Read(a + "indexer.weights_proj.weight", {c_.index_n_heads, d}, &b->indexer_weights));
      RETURN_IF_ERROR(
          Compressor(a + "indexer.compressor.", ratio, c_.index_head_dim, &b->indexer_compressor));
    }
    const std::string f = p + "ffn.";
    RETURN_IF_ERROR(Read(f + "gate.weight", {c_.n_routed_experts, d}, &b->gate));
    if (!mtp && c_.is_hash_layer(layer)) {
      ASSIGN_OR_RETURN(b->tid2eid,
                       ckpt_.ReadInt(f + "gate.tid2eid", {c_.vocab_size, c_.num_experts_per_tok}));
      for (int32_t e : b->tid2eid) {
        if (e < 0 || e >= c_.n_routed_experts) {
          return absl::InvalidArgumentError(
              absl::StrCat(f, "gate.tid2eid holds expert ", e, " out of range"));
        }
      }
    } else {
      RETURN_IF_ERROR(Read(f + "gate.bias", {c_.n_routed_experts}, &b->gate_bias));
    }
    b->experts.resize(static_cast<size_t>(c_.n_routed_experts));
    for (int64_t e = 0; e < c_.n_routed_experts; ++e) {
      RETURN_IF_ERROR(Expert(absl::StrCat(f, "experts.", e, "."), &b->experts[e]));
    }
    return Expert(f + "shared_experts.", &b->shared);
  }

 private:
  const ModelConfig& c_;
  const Checkpoint& ckpt_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadWeights(const ModelConfig& c, const Checkpoint& ckpt,
                                                          bool load_mtp) {
  auto w = std::make_unique<ModelWeights>();
  Reader r(c, ckpt);
  const int64_t d = c.hidden_size;
  RETURN_IF_ERROR(r.Read("embed.weight", {c.vocab_size, d}, &w->embed));
  if (c.tie_word_embeddings) {
    w->head = w->embed;
  } else {
    RETURN_IF_ERROR(r.Read("head.weight", {c.vocab_size, d}, &w->head));
  }
  RETURN_IF_ERROR(r.Read("norm.weight", {d}, &w->norm));
  RETURN_IF_ERROR(r.HcHead("", &w->hc_head));
  w->layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    RETURN_IF_ERROR(r.Block(absl::StrCat("layers.", l, "."), l, false, &w->layers[l]));
  }
  if (load_mtp) {
    w->mtp.resize(static_cast<size_t>(c.num_nextn_predict_layers));
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
      const std::string p = absl::StrCat("mtp.", k, ".");
      MtpWeights& m = w->mtp[k];
      RETURN_IF_ERROR(r.Block(p, c.num_hidden_layers + k, true, &m.block));
      RETURN_IF_ERROR(r.Read(p + "e_proj.weight", {d, d}, &m.e_proj));
      RETURN_IF_ERROR(r.Read(p + "h_proj.weight", {d, d}, &m.h_proj));
      RETURN_IF_ERROR(r.Read(p + "enorm.weight", {d}, &m.enorm));
      RETURN_IF_ERROR(r.Read(p + "hnorm.weight", {d}, &m.hnorm));
      RETURN_IF_ERROR(r.Read(p + "norm.weight", {d}, &m.norm));
      RETURN_IF_ERROR(r.HcHead(p, &m.hc_head));
    }
  }
  return w;
}

}  // namespace v4serve::model::cpu
