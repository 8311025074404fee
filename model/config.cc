#include "model/config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "services/status_macros.h"

namespace v4serve::model {
namespace {

using Json = nlohmann::json;

absl::Status FieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("config field '", field, "': ", what));
}

// Finds the first present key among `names` (released spelling first, then transformers').
const Json* Find(const Json& j, std::initializer_list<const char*> names, std::string* found) {
  for (const char* name : names) {
    auto it = j.find(name);
    if (it != j.end() && !it->is_null()) {
      *found = name;
      return &*it;
    }
  }
  return nullptr;
}

absl::Status GetInt(const Json& j, std::initializer_list<const char*> names, bool required, int64_t* out) {
  std::string name;
  const Json* v = Find(j, names, &name);
  if (v == nullptr) {
    return required ? FieldError(*names.begin(), "missing") : absl::OkStatus();
  }
  if (v->is_number_integer()) {
    *out = v->get<int64_t>();
  } else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>()) {
    *out = static_cast<int64_t>(v->get<double>());
  } else {
    return FieldError(name, absl::StrCat("expected an integer, got ", v->dump()));
  }
  return absl::OkStatus();
}

absl::Status GetDouble(const Json& j, std::initializer_list<const char*> names, bool required, double* out) {
  std::string name;
  const Json* v = Find(j, names, &name);
  if (v == nullptr) return required ? FieldError(*names.begin(), "missing") : absl::OkStatus();
  if (!v->is_number()) return FieldError(name, absl::StrCat("expected a number, got ", v->dump()));
  *out = v->get<double>();
  return absl::OkStatus();
}

absl::Status GetBool(const Json& j, const char* name, bool* out) {
  std::string found;
  const Json* v = Find(j, {name}, &found);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return FieldError(name, absl::StrCat("expected a boolean, got ", v->dump()));
  *out = v->get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const Json& j, const char* name, std::string* out) {
  std::string found;
  const Json* v = Find(j, {name}, &found);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_string()) return FieldError(name, absl::StrCat("expected a string, got ", v->dump()));
  *out = v->get<std::string>();
  return absl::OkStatus();
}

// eos_token_id may be an int or a list (first entry is used).
absl::Status GetTokenId(const Json& j, const char* name, int64_t* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) {
    *out = (*it)[0].get<int64_t>();
    return absl::OkStatus();
  }
  return GetInt(j, {name}, false, out);
}

absl::Status ParseRopeScaling(const Json& rope, const std::string& field, RopeScaling* out) {
  if (!rope.is_object()) return FieldError(field, "expected an object");
  std::string type = "yarn";
  if (rope.contains("type") && rope["type"].is_string()) type = rope["type"].get<std::string>();
  if (rope.contains("rope_type") && rope["rope_type"].is_string())
    type = rope["rope_type"].get<std::string>();
  if (type == "default") {
    *out = RopeScaling{};
    return absl::OkStatus();
  }
  if (type != "yarn") return FieldError(field, absl::StrCat("unsupported rope type '", type, "'"));
  RETURN_IF_ERROR(GetDouble(rope, {"factor"}, true, &out->factor));
  RETURN_IF_ERROR(
      GetInt(rope, {"original_max_position_embeddings"}, true, &out->original_max_position_embeddings));
  RETURN_IF_ERROR(GetDouble(rope, {"beta_fast"}, false, &out->beta_fast));
  RETURN_IF_ERROR(GetDouble(rope, {"beta_slow"}, false, &out->beta_slow));
  if (rope.contains("attention_factor") && rope["attention_factor"].is_number() &&
      rope["attention_factor"].get<double>() != 1.0) {
    return FieldError(field,
                      "attention_factor other than 1.0 is not supported (V4 applies no magnitude scaling)");
  }
  return absl::OkStatus();
}

// Transformers' spelling: layer_types (names) + compress_rates (per-type ratio).
absl::Status ParseLayerTypes(const Json& j, ModelConfig* c) {
  const Json& types = j["layer_types"];
  if (!types.is_array()) return FieldError("layer_types", "expected a list");
  int64_t csa = 4, hca = 128;
  if (j.contains("compress_rates") && !j["compress_rates"].is_null()) {
    const Json& rates = j["compress_rates"];
    if (!rates.is_object()) return FieldError("compress_rates", "expected an object");
    RETURN_IF_ERROR(GetInt(rates, {"compressed_sparse_attention"}, false, &csa));
    RETURN_IF_ERROR(GetInt(rates, {"heavily_compressed_attention"}, false, &hca));
  }
  c->compress_ratios.clear();
  for (const Json& t : types) {
    std::string name = t.is_string() ? t.get<std::string>() : "";
    if (name == "sliding_attention") {
      c->compress_ratios.push_back(0);
    } else if (name == "compressed_sparse_attention") {
      c->compress_ratios.push_back(csa);
    } else if (name == "heavily_compressed_attention") {
      c->compress_ratios.push_back(hca);
    } else {
      return FieldError("layer_types", absl::StrCat("unknown layer type ", t.dump()));
    }
  }
  // Transformers does not describe the MTP layers; DeepSeek's are window-only.
  for (int64_t i = 0; i < c->num_nextn_predict_layers; ++i) c->compress_ratios.push_back(0);
  return absl::OkStatus();
}

absl::Status ParseMlpLayerTypes(const Json& j, ModelConfig* c) {
  const Json& types = j["mlp_layer_types"];
  if (!types.is_array()) return FieldError("mlp_layer_types", "expected a list");
  int64_t n_hash = 0;
  bool seen_moe = false;
  for (const Json& t : types) {
    std::string name = t.is_string() ? t.get<std::string>() : "";
    if (name == "hash_moe") {
      if (seen_moe) return FieldError("mlp_layer_types", "hash_moe layers must come before moe layers");
      ++n_hash;
    } else if (name == "moe") {
      seen_moe = true;
    } else {
      return FieldError("mlp_layer_types", absl::StrCat("unknown MLP type ", t.dump()));
    }
  }
  c->num_hash_layers = n_hash;
  return absl::OkStatus();
}

absl::Status Positive(const std::string& field, int64_t v) {
  if (v <= 0) return FieldError(field, absl::StrCat("must be positive, got ", v));
  return absl::OkStatus();
}

}  // namespace

std::string_view LayerKindName(LayerKind kind) {
  switch (kind) {
    case LayerKind::kWindow:
      return "window";
    case LayerKind::kCsa:
      return "CSA";
    case LayerKind::kHca:
      return "HCA";
  }
  return "?";
}

LayerKind ModelConfig::layer_kind(int64_t layer) const {
  int64_t r = compress_ratios.at(static_cast<size_t>(layer));
  if (r == 0) return LayerKind::kWindow;
  return r == 4 ? LayerKind::kCsa : LayerKind::kHca;
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  Json j = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json must hold a JSON object");
  if (j.contains("model_type") && j["model_type"] != "deepseek_v4") {
    return FieldError("model_type", absl::StrCat("expected \"deepseek_v4\", got ", j["model_type"].dump()));
  }
  ModelConfig c;
  RETURN_IF_ERROR(GetInt(j, {"vocab_size"}, true, &c.vocab_size));
  RETURN_IF_ERROR(GetInt(j, {"hidden_size", "dim"}, true, &c.hidden_size));
  RETURN_IF_ERROR(GetInt(j, {"num_hidden_layers", "n_layers"}, true, &c.num_hidden_layers));
  RETURN_IF_ERROR(
      GetInt(j, {"num_nextn_predict_layers", "n_mtp_layers"}, false, &c.num_nextn_predict_layers));
  RETURN_IF_ERROR(GetInt(j, {"num_attention_heads", "n_heads"}, true, &c.num_attention_heads));
  RETURN_IF_ERROR(GetInt(j, {"num_key_value_heads"}, false, &c.num_key_value_heads));
  RETURN_IF_ERROR(GetInt(j, {"head_dim"}, true, &c.head_dim));
  if (j.contains("qk_rope_head_dim") || j.contains("rope_head_dim")) {
    RETURN_IF_ERROR(GetInt(j, {"qk_rope_head_dim", "rope_head_dim"}, true, &c.qk_rope_head_dim));
  } else if (j.contains("partial_rotary_factor") && !j["partial_rotary_factor"].is_null()) {
    double f = 0;
    RETURN_IF_ERROR(GetDouble(j, {"partial_rotary_factor"}, true, &f));
    c.qk_rope_head_dim = static_cast<int64_t>(std::llround(f * static_cast<double>(c.head_dim)));
  } else {
    c.qk_rope_head_dim = 64;  // transformers' default: 64 / 512 of head_dim 512.
    if (c.head_dim != 512) return FieldError("qk_rope_head_dim", "missing");
  }
  RETURN_IF_ERROR(GetInt(j, {"q_lora_rank"}, true, &c.q_lora_rank));
  RETURN_IF_ERROR(GetInt(j, {"o_groups"}, true, &c.o_groups));
  RETURN_IF_ERROR(GetInt(j, {"o_lora_rank"}, true, &c.o_lora_rank));
  RETURN_IF_ERROR(GetInt(j, {"sliding_window", "window_size"}, true, &c.sliding_window));
  RETURN_IF_ERROR(GetDouble(j, {"rope_theta"}, false, &c.rope_theta));
  RETURN_IF_ERROR(GetDouble(j, {"compress_rope_theta"}, false, &c.compress_rope_theta));
  RETURN_IF_ERROR(GetInt(j, {"max_position_embeddings"}, false, &c.max_position_embeddings));
  RETURN_IF_ERROR(GetInt(j, {"index_n_heads"}, true, &c.index_n_heads));
  RETURN_IF_ERROR(GetInt(j, {"index_head_dim"}, true, &c.index_head_dim));
  RETURN_IF_ERROR(GetInt(j, {"index_topk"}, true, &c.index_topk));
  RETURN_IF_ERROR(GetInt(j, {"moe_intermediate_size", "moe_inter_dim"}, true, &c.moe_intermediate_size));
  RETURN_IF_ERROR(GetInt(j, {"n_routed_experts"}, true, &c.n_routed_experts));
  RETURN_IF_ERROR(GetInt(j, {"n_shared_experts"}, false, &c.n_shared_experts));
  RETURN_IF_ERROR(GetInt(j, {"num_experts_per_tok", "n_activated_experts"}, true, &c.num_experts_per_tok));
  RETURN_IF_ERROR(GetString(j, "scoring_func", &c.scoring_func));
  RETURN_IF_ERROR(GetDouble(j, {"routed_scaling_factor", "route_scale"}, false, &c.routed_scaling_factor));
  RETURN_IF_ERROR(GetBool(j, "norm_topk_prob", &c.norm_topk_prob));
  RETURN_IF_ERROR(GetDouble(j, {"swiglu_limit"}, false, &c.swiglu_limit));
  RETURN_IF_ERROR(GetInt(j, {"hc_mult"}, true, &c.hc_mult));
  RETURN_IF_ERROR(GetInt(j, {"hc_sinkhorn_iters"}, true, &c.hc_sinkhorn_iters));
  RETURN_IF_ERROR(GetDouble(j, {"hc_eps"}, false, &c.hc_eps));
  RETURN_IF_ERROR(GetDouble(j, {"rms_norm_eps", "norm_eps"}, false, &c.rms_norm_eps));
  RETURN_IF_ERROR(GetString(j, "expert_dtype", &c.expert_dtype));
  RETURN_IF_ERROR(GetTokenId(j, "bos_token_id", &c.bos_token_id));
  RETURN_IF_ERROR(GetTokenId(j, "eos_token_id", &c.eos_token_id));
  RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  std::string act = "silu";
  RETURN_IF_ERROR(GetString(j, "hidden_act", &act));
  if (act != "silu") return FieldError("hidden_act", absl::StrCat("only silu is supported, got '", act, "'"));

  // Attention layer schedule: released `compress_ratios` or transformers' `layer_types`.
  if (j.contains("compress_ratios") && !j["compress_ratios"].is_null()) {
    const Json& r = j["compress_ratios"];
    if (!r.is_array()) return FieldError("compress_ratios", "expected a list");
    for (const Json& v : r) {
      if (!v.is_number_integer()) return FieldError("compress_ratios", absl::StrCat("bad entry ", v.dump()));
      c.compress_ratios.push_back(v.get<int64_t>());
    }
  } else if (j.contains("layer_types") && !j["layer_types"].is_null()) {
    RETURN_IF_ERROR(ParseLayerTypes(j, &c));
  } else {
    return FieldError("compress_ratios", "missing (neither compress_ratios nor layer_types given)");
  }

  // Hash-routed MoE layers: released `num_hash_layers` or transformers' `mlp_layer_types`.
  if (j.contains("num_hash_layers") && !j["num_hash_layers"].is_null()) {
    RETURN_IF_ERROR(GetInt(j, {"num_hash_layers"}, true, &c.num_hash_layers));
  } else if (j.contains("mlp_layer_types") && !j["mlp_layer_types"].is_null()) {
    RETURN_IF_ERROR(ParseMlpLayerTypes(j, &c));
    if (static_cast<int64_t>(j["mlp_layer_types"].size()) != c.num_hidden_layers) {
      return FieldError("mlp_layer_types", "length must equal num_hidden_layers");
    }
  } else {
    RETURN_IF_ERROR(GetInt(j, {"n_hash_layers"}, false, &c.num_hash_layers));
  }

  // RoPE scaling of compressed layers: released `rope_scaling` or transformers' `rope_parameters`.
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    RETURN_IF_ERROR(ParseRopeScaling(j["rope_scaling"], "rope_scaling", &c.rope_scaling));
  } else if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    const Json& rp = j["rope_parameters"];
    if (rp.contains("compress")) {
      RETURN_IF_ERROR(ParseRopeScaling(rp["compress"], "rope_parameters.compress", &c.rope_scaling));
      RETURN_IF_ERROR(GetDouble(rp["compress"], {"rope_theta"}, false, &c.compress_rope_theta));
      if (rp.contains("main")) RETURN_IF_ERROR(GetDouble(rp["main"], {"rope_theta"}, false, &c.rope_theta));
    } else {
      RETURN_IF_ERROR(ParseRopeScaling(rp, "rope_parameters", &c.rope_scaling));
    }
  } else if (j.contains("rope_factor")) {  // DeepSeek's inference/config.json spelling.
    RETURN_IF_ERROR(GetDouble(j, {"rope_factor"}, true, &c.rope_scaling.factor));
    RETURN_IF_ERROR(GetInt(j, {"original_seq_len"}, true, &c.rope_scaling.original_max_position_embeddings));
    RETURN_IF_ERROR(GetDouble(j, {"beta_fast"}, false, &c.rope_scaling.beta_fast));
    RETURN_IF_ERROR(GetDouble(j, {"beta_slow"}, false, &c.rope_scaling.beta_slow));
  }

  if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
    const Json& q = j["quantization_config"];
    std::string method;
    RETURN_IF_ERROR(GetString(q, "quant_method", &method));
    if (method != "fp8") {
      return FieldError("quantization_config.quant_method", absl::StrCat("unsupported '", method, "'"));
    }
    c.fp8_weights = true;
    if (q.contains("weight_block_size")) {
      const Json& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || b[0] != b[1]) {
        return FieldError("quantization_config.weight_block_size", "expected [n, n]");
      }
      c.weight_block_size = b[0].get<int64_t>();
    }
  }
  RETURN_IF_ERROR(ValidateModelConfig(c));
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(std::string_view dir) {
  std::string path = absl::StrCat(std::string(dir), "/config.json");
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<ModelConfig> c = ParseModelConfig(ss.str());
  if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  return c;
}

absl::Status ValidateModelConfig(const ModelConfig& c) {
  RETURN_IF_ERROR(Positive("vocab_size", c.vocab_size));
  RETURN_IF_ERROR(Positive("hidden_size", c.hidden_size));
  RETURN_IF_ERROR(Positive("num_hidden_layers", c.num_hidden_layers));
  RETURN_IF_ERROR(Positive("num_attention_heads", c.num_attention_heads));
  RETURN_IF_ERROR(Positive("head_dim", c.head_dim));
  RETURN_IF_ERROR(Positive("q_lora_rank", c.q_lora_rank));
  RETURN_IF_ERROR(Positive("o_groups", c.o_groups));
  RETURN_IF_ERROR(Positive("o_lora_rank", c.o_lora_rank));
  RETURN_IF_ERROR(Positive("sliding_window", c.sliding_window));
  RETURN_IF_ERROR(Positive("index_n_heads", c.index_n_heads));
  RETURN_IF_ERROR(Positive("index_head_dim", c.index_head_dim));
  RETURN_IF_ERROR(Positive("index_topk", c.index_topk));
  RETURN_IF_ERROR(Positive("moe_intermediate_size", c.moe_intermediate_size));
  RETURN_IF_ERROR(Positive("n_routed_experts", c.n_routed_experts));
  RETURN_IF_ERROR(Positive("num_experts_per_tok", c.num_experts_per_tok));
  RETURN_IF_ERROR(Positive("hc_mult", c.hc_mult));
  if (c.num_nextn_predict_layers < 0) return FieldError("num_nextn_predict_layers", "must be >= 0");
  if (c.num_key_value_heads != 1) {
    return FieldError("num_key_value_heads",
                      absl::StrCat("V4 uses one shared KV head, got ", c.num_key_value_heads));
  }
  if (c.qk_rope_head_dim <= 0 || c.qk_rope_head_dim > c.head_dim || c.qk_rope_head_dim % 2 != 0) {
    return FieldError("qk_rope_head_dim",
                      absl::StrCat("must be even and in (0, head_dim], got ", c.qk_rope_head_dim));
  }
  if (c.qk_rope_head_dim > c.index_head_dim) {
    return FieldError("qk_rope_head_dim", "must not exceed index_head_dim (indexer keys carry RoPE too)");
  }
  if (c.num_attention_heads % c.o_groups != 0) {
    return FieldError("o_groups",
                      absl::StrCat("must divide num_attention_heads (", c.num_attention_heads, ")"));
  }
  if (c.num_experts_per_tok > c.n_routed_experts) {
    return FieldError("num_experts_per_tok", "exceeds n_routed_experts");
  }
  if (c.n_shared_experts != 1) return FieldError("n_shared_experts", "V4 has exactly one shared expert");
  if (c.num_hash_layers < 0 || c.num_hash_layers > c.num_hidden_layers) {
    return FieldError("num_hash_layers", "must be in [0, num_hidden_layers]");
  }
  if (c.scoring_func != "sqrtsoftplus" && c.scoring_func != "sigmoid" && c.scoring_func != "softmax") {
    return FieldError("scoring_func", absl::StrCat("unknown '", c.scoring_func, "'"));
  }
  if (c.hc_sinkhorn_iters < 1) return FieldError("hc_sinkhorn_iters", "must be >= 1");
  if (c.expert_dtype != "" && c.expert_dtype != "fp4" && c.expert_dtype != "fp8" &&
      c.expert_dtype != "bf16") {
    return FieldError("expert_dtype", absl::StrCat("unknown '", c.expert_dtype, "'"));
  }
  const int64_t want = c.num_hidden_layers + c.num_nextn_predict_layers;
  if (static_cast<int64_t>(c.compress_ratios.size()) != want) {
    return FieldError("compress_ratios", absl::StrCat("has ", c.compress_ratios.size(),
                                                      " entries; expected num_hidden_layers + "
                                                      "num_nextn_predict_layers = ",
                                                      want));
  }
  for (size_t i = 0; i < c.compress_ratios.size(); ++i) {
    int64_t r = c.compress_ratios[i];
    if (r < 0 || (r > 0 && r != 4 && r % 2 != 0)) {
      return FieldError("compress_ratios",
                        absl::StrCat("entry ", i, " = ", r, " is not 0, 4 or an even HCA ratio"));
    }
  }
  if (c.rope_scaling.original_max_position_embeddings < 0 || c.rope_scaling.factor <= 0) {
    return FieldError("rope_scaling", "factor must be positive and original_max_position_embeddings >= 0");
  }
  return absl::OkStatus();
}

}  // namespace v4serve::model
