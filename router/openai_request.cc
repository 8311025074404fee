#include "router/openai_request.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "services/json_depth.h"
#include "services/status_macros.h"

namespace v4serve::router {
namespace {

using Json = nlohmann::ordered_json;

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

const char* TypeName(const Json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  return "an object";
}

// The sampling fields' ranges, for the HTTP parse (as it reads) and CheckSampling (gRPC's typed requests).
struct Range {
  const char* name;
  double lo, hi;
};
constexpr Range kTemperature{"temperature", 0, 2}, kTopP{"top_p", 0, 1}, kMinP{"min_p", 0, 1},
    kPresence{"presence_penalty", -2, 2}, kFrequency{"frequency_penalty", -2, 2},
    kRepetition{"repetition_penalty", 0.01, 10};
constexpr int64_t kMaxTopK = 1 << 20, kMaxTopLogprobs = 20, kMaxStops = 4;

// Reads an optional number field into `out`, checking [lo, hi].
absl::Status Number(const Json& body, const char* key, double lo, double hi, float* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Bad(key, absl::StrCat("must be a number, not ", TypeName(*it)));
  double v = it->get<double>();
  if (!std::isfinite(v) || v < lo || v > hi) return Bad(key, absl::StrCat("must be in [", lo, ", ", hi, "]"));
  *out = static_cast<float>(v);
  return absl::OkStatus();
}

absl::StatusOr<std::optional<int64_t>> Integer(const Json& body, const char* key, int64_t lo, int64_t hi) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::optional<int64_t>();
  bool integral = it->is_number_integer() ||
                  (it->is_number_float() && std::floor(it->get<double>()) == it->get<double>());
  if (!integral) return Bad(key, absl::StrCat("must be an integer, not ", TypeName(*it)));
  double d = it->get<double>();
  if (d < static_cast<double>(lo) || d > static_cast<double>(hi)) {
    return Bad(key, absl::StrCat("must be in [", lo, ", ", hi, "]"));
  }
  return std::optional<int64_t>(it->is_number_unsigned() ? static_cast<int64_t>(it->get<uint64_t>())
                                                         : it->get<int64_t>());
}

// `parent`: the object's own field name, for errors about a nested field ("stream_options.include_usage").
std::string FieldName(const char* parent, const char* key) {
  return parent == nullptr ? std::string(key) : absl::StrCat(parent, ".", key);
}

absl::Status Bool(const Json& body, const char* key, bool* out, const char* parent = nullptr) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return Bad(FieldName(parent, key), absl::StrCat("must be a boolean, not ", TypeName(*it)));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status String(const Json& body, const char* key, std::string* out, const char* parent = nullptr) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_string()) {
    return Bad(FieldName(parent, key), absl::StrCat("must be a string, not ", TypeName(*it)));
  }
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status ParseStop(const Json& body, std::vector<std::string>* out) {
  auto it = body.find("stop");
  if (it == body.end() || it->is_null()) return absl::OkStatus();
  if (it->is_string()) {
    if (!it->get<std::string>().empty()) out->push_back(it->get<std::string>());
    return absl::OkStatus();
  }
  if (!it->is_array()) return Bad("stop", "must be a string or an array of strings");
  if (static_cast<int64_t>(it->size()) > kMaxStops) {
    return Bad("stop", absl::StrCat("at most ", kMaxStops, " stop sequences"));
  }
  for (size_t i = 0; i < it->size(); ++i) {
    if (!(*it)[i].is_string()) return Bad(absl::StrCat("stop[", i, "]"), "must be a string");
    if (!(*it)[i].get<std::string>().empty()) out->push_back((*it)[i].get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status ParseReasoning(const Json& body, ReasoningMode* out) {
  // OpenAI's `reasoning_effort` ("none" | "minimal" | "low" | "medium" | "high" | "max") or DeepSeek-style
  // `thinking: {"type": "enabled"|"disabled"}`.
  std::string effort;
  RETURN_IF_ERROR(String(body, "reasoning_effort", &effort));
  if (!effort.empty()) {
    if (effort == "none" || effort == "minimal") {
      *out = ReasoningMode::kNonThink;
    } else if (effort == "low" || effort == "medium" || effort == "high") {
      *out = ReasoningMode::kThinkHigh;
    } else if (effort == "max" || effort == "xhigh") {
      *out = ReasoningMode::kThinkMax;
    } else {
      return Bad("reasoning_effort", "must be one of none, minimal, low, medium, high, max");
    }
  }
  auto it = body.find("thinking");
  if (it != body.end() && !it->is_null()) {
    if (!it->is_object() || !it->contains("type") || !(*it)["type"].is_string()) {
      return Bad("thinking", "must be an object {\"type\": \"enabled\" | \"disabled\"}");
    }
    std::string type = (*it)["type"].get<std::string>();
    if (type == "enabled") {
      if (*out == ReasoningMode::kNonThink) *out = ReasoningMode::kThinkHigh;
    } else if (type == "disabled") {
      *out = ReasoningMode::kNonThink;
    } else {
      return Bad("thinking.type", "must be \"enabled\" or \"disabled\"");
    }
  }
  return absl::OkStatus();
}

absl::Status ParseSampling(const Json& body, int32_t max_n, SamplingRequest* s) {
  auto number = [&](const Range& r, float* out) { return Number(body, r.name, r.lo, r.hi, out); };
  RETURN_IF_ERROR(number(kTemperature, &s->temperature));
  RETURN_IF_ERROR(number(kTopP, &s->top_p));
  if (s->top_p <= 0) return Bad("top_p", "must be in (0, 1]");
  RETURN_IF_ERROR(number(kMinP, &s->min_p));
  RETURN_IF_ERROR(number(kPresence, &s->presence_penalty));
  RETURN_IF_ERROR(number(kFrequency, &s->frequency_penalty));
  RETURN_IF_ERROR(number(kRepetition, &s->repetition_penalty));
  ASSIGN_OR_RETURN(std::optional<int64_t> top_k, Integer(body, "top_k", 0, kMaxTopK));
  if (top_k) s->top_k = static_cast<int32_t>(*top_k);
  auto seed_it = body.find("seed");
  if (seed_it != body.end() && !seed_it->is_null()) {
    if (!seed_it->is_number_integer()) return Bad("seed", "must be an integer");
    s->seed = seed_it->is_number_unsigned() ? seed_it->get<uint64_t>()
                                            : static_cast<uint64_t>(seed_it->get<int64_t>());
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens, Integer(body, "max_tokens", 1, 1 << 24));
  ASSIGN_OR_RETURN(std::optional<int64_t> max_completion, Integer(body, "max_completion_tokens", 1, 1 << 24));
  if (max_completion) max_tokens = max_completion;
  if (max_tokens) s->max_tokens = static_cast<int32_t>(*max_tokens);
  ASSIGN_OR_RETURN(std::optional<int64_t> n, Integer(body, "n", 1, max_n));
  if (n) s->n = static_cast<int32_t>(*n);
  RETURN_IF_ERROR(ParseStop(body, &s->stop));
  RETURN_IF_ERROR(Bool(body, "ignore_eos", &s->ignore_eos));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(Endpoint endpoint, const std::string& body_text,
                                                 int32_t max_n) {
  if (!JsonDepthWithin(body_text)) {
    return absl::InvalidArgumentError(absl::StrCat("body: nests deeper than ", kMaxJsonDepth, " levels"));
  }
  Json body = Json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return absl::InvalidArgumentError("body: is not valid JSON");
  if (!body.is_object()) return absl::InvalidArgumentError("body: must be a JSON object");
  OpenAiRequest req;
  req.endpoint = endpoint;
  RETURN_IF_ERROR(String(body, "model", &req.model));
  RETURN_IF_ERROR(Bool(body, "stream", &req.stream));
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("stream_options", "must be an object");
    if (!req.stream) return Bad("stream_options", "is only allowed with stream: true");
    RETURN_IF_ERROR(Bool(*it, "include_usage", &req.include_usage, "stream_options"));
  }
  RETURN_IF_ERROR(ParseSampling(body, max_n, &req.sampling));
  if (endpoint == Endpoint::kChatCompletions) {
    RETURN_IF_ERROR(Bool(body, "logprobs", &req.sampling.logprobs));
    ASSIGN_OR_RETURN(std::optional<int64_t> top, Integer(body, "top_logprobs", 0, kMaxTopLogprobs));
    if (top) {
      if (!req.sampling.logprobs && *top > 0) return Bad("top_logprobs", "requires logprobs: true");
      req.sampling.top_logprobs = static_cast<int32_t>(*top);
    }
  } else {
    ASSIGN_OR_RETURN(std::optional<int64_t> lp, Integer(body, "logprobs", 0, 5));
    if (lp) {
      req.sampling.logprobs = true;
      req.sampling.top_logprobs = static_cast<int32_t>(*lp);
    }
  }
  RETURN_IF_ERROR(ParseReasoning(body, &req.reasoning));
  if (auto it = body.find("v4serve"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("v4serve", "must be an object");
    RETURN_IF_ERROR(String(*it, "cache_handle", &req.cache_handle, "v4serve"));
    RETURN_IF_ERROR(String(*it, "quick_instruction", &req.quick_instruction, "v4serve"));
  }
  for (const char* unsupported : {"functions", "function_call", "audio", "modalities", "prediction",
                                  "logit_bias", "web_search_options", "best_of", "suffix"}) {
    if (auto it = body.find(unsupported); it != body.end() && !it->is_null()) {
      return Bad(unsupported, "is not supported by this server");
    }
  }
  if (endpoint == Endpoint::kChatCompletions) {
    auto m = body.find("messages");
    if (m == body.end()) return Bad("messages", "is required");
    if (!m->is_array() || m->empty()) return Bad("messages", "must be a non-empty array");
    for (size_t i = 0; i < m->size(); ++i) {
      const Json& msg = (*m)[i];
      if (!msg.is_object()) return Bad(absl::StrCat("messages[", i, "]"), "must be an object");
      if (!msg.contains("role") || !msg["role"].is_string()) {
        return Bad(absl::StrCat("messages[", i, "].role"), "is required and must be a string");
      }
    }
    req.messages = *m;
    if (auto t = body.find("tools"); t != body.end() && !t->is_null()) {
      if (!t->is_array()) return Bad("tools", "must be an array");
      req.tools = *t;
    }
    if (auto tc = body.find("tool_choice"); tc != body.end() && !tc->is_null()) {
      bool ok = (tc->is_string() && (*tc == "none" || *tc == "auto" || *tc == "required")) ||
                (tc->is_object() && tc->contains("function"));
      if (!ok)
        return Bad("tool_choice", "must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",...}");
      // Forcing a call (one at all, or a named one) needs constrained decoding, which this server does
      // not do: refused rather than ignored.
      if (!tc->is_string() || *tc == "required") {
        return Bad("tool_choice", "only \"auto\" and \"none\" are supported (no constrained decoding)");
      }
      req.tool_choice = *tc;
    }
    if (auto rf = body.find("response_format"); rf != body.end() && !rf->is_null()) {
      if (!rf->is_object() || !rf->contains("type") || (*rf)["type"] != "text") {
        return Bad("response_format", "only {\"type\": \"text\"} is supported (no constrained decoding)");
      }
    }
  } else {
    auto p = body.find("prompt");
    if (p == body.end() || p->is_null()) return Bad("prompt", "is required");
    if (p->is_string()) {
      req.prompt_text = p->get<std::string>();
    } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
      std::vector<int32_t> ids;
      for (size_t i = 0; i < p->size(); ++i) {
        if (!(*p)[i].is_number_integer() || (*p)[i].get<int64_t>() < 0 ||
            (*p)[i].get<int64_t>() > std::numeric_limits<int32_t>::max()) {
          return Bad(absl::StrCat("prompt[", i, "]"), "must be a token id (a non-negative integer)");
        }
        ids.push_back((*p)[i].get<int32_t>());
      }
      req.prompt_ids = std::move(ids);
    } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
      req.prompt_text = (*p)[0].get<std::string>();
    } else {
      return Bad("prompt", "must be a string, an array of one string, or an array of token ids");
    }
    bool echo = false;  // Accepted as false only: echoing the prompt is not implemented.
    RETURN_IF_ERROR(Bool(body, "echo", &echo));
    if (echo) return Bad("echo", "is not supported by this server");
    if (!req.cache_handle.empty() || !req.quick_instruction.empty()) {
      return Bad(req.cache_handle.empty() ? "v4serve.quick_instruction" : "v4serve.cache_handle",
                 "only /v1/chat/completions takes it");
    }
  }
  return req;
}

absl::Status CheckSampling(const SamplingRequest& s, const std::string& prefix) {
  auto in = [&](const Range& r, float v, bool open_low = false) -> absl::Status {
    if (v >= r.lo && v <= r.hi && !(open_low && v == r.lo)) return absl::OkStatus();  // NaN fails both.
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, r.name, ": must be in ", open_low ? "(" : "[", r.lo, ", ", r.hi, "], got ", v));
  };
  RETURN_IF_ERROR(in(kTemperature, s.temperature));
  RETURN_IF_ERROR(in(kTopP, s.top_p, /*open_low=*/true));
  RETURN_IF_ERROR(in(kMinP, s.min_p));
  RETURN_IF_ERROR(in(kPresence, s.presence_penalty));
  RETURN_IF_ERROR(in(kFrequency, s.frequency_penalty));
  RETURN_IF_ERROR(in(kRepetition, s.repetition_penalty));
  auto count = [&](const char* name, int64_t v, int64_t lo, int64_t hi) -> absl::Status {
    if (v >= lo && v <= hi) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, name, ": must be in [", lo, ", ", hi, "], got ", v));
  };
  RETURN_IF_ERROR(count("top_k", s.top_k, 0, kMaxTopK));
  RETURN_IF_ERROR(count("top_logprobs", s.top_logprobs, 0, kMaxTopLogprobs));
  RETURN_IF_ERROR(count("stop_token_ids (ids)", static_cast<int64_t>(s.stop_token_ids.size()), 0, 64));
  for (size_t i = 0; i < s.stop_token_ids.size(); ++i) {
    if (s.stop_token_ids[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "stop_token_ids[", i, "]: must be a token id (non-negative)"));
    }
  }
  return absl::OkStatus();
}

bool OffersTools(const OpenAiRequest& req) {
  if (req.endpoint != Endpoint::kChatCompletions || req.tool_choice == "none") return false;
  if (req.tools.is_array() && !req.tools.empty()) return true;
  if (!req.messages.is_array()) return false;
  for (const nlohmann::ordered_json& m : req.messages) {
    if (m.is_object()) {
      auto t = m.find("tools");
      if (t != m.end() && t->is_array() && !t->empty()) return true;
    }
  }
  return false;
}

}  // namespace v4serve::router
