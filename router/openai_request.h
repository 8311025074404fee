// OpenAI request bodies (/v1/chat/completions, /v1/completions) parsed and validated into one struct.
//
// Every type or range error is INVALID_ARGUMENT whose message starts with the field path
// ("temperature: must be in [0, 2]"), which services::OpenAiErrorJson turns into `param`. Fields OpenAI
// defines that v4serve does not act on are accepted and ignored only where ignoring them cannot change the
// answer (user, metadata, store); others are rejected by name. Pure functions; thread-safe.
#ifndef V4SERVE_ROUTER_OPENAI_REQUEST_H_
#define V4SERVE_ROUTER_OPENAI_REQUEST_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace v4serve::router {

enum class Endpoint { kChatCompletions, kCompletions };

// V4's reasoning modes (MODEL.md): non-think, think-high, think-max.
enum class ReasoningMode { kNonThink, kThinkHigh, kThinkMax };

struct SamplingRequest {
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;   // 0 = off (extension)
  float min_p = 0.0f;  // extension
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;  // extension
  std::optional<uint64_t> seed;
  std::optional<int32_t> max_tokens;  // max_tokens or max_completion_tokens
  std::vector<std::string> stop;      // at most 4 strings, as OpenAI
  int32_t n = 1;
  bool logprobs = false;
  int32_t top_logprobs = 0;
  bool ignore_eos = false;              // extension
  std::vector<int32_t> stop_token_ids;  // gRPC only: stop after one of these (ServedModel checks the range)
};

struct OpenAiRequest {
  Endpoint endpoint = Endpoint::kChatCompletions;
  std::string model;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  SamplingRequest sampling;
  ReasoningMode reasoning = ReasoningMode::kNonThink;
  // Chat: the body's messages and tools (key order kept: it reaches the prompt), tool_choice as given.
  nlohmann::ordered_json messages;
  nlohmann::ordered_json tools;
  nlohmann::ordered_json tool_choice;
  // Completions: the prompt, as text or token ids.
  std::optional<std::string> prompt_text;
  std::optional<std::vector<int32_t>> prompt_ids;
  // Quick instructions (docs/API.md): a cached conversation to continue and the task to append.
  std::string cache_handle;
  std::string quick_instruction;
  // Set by the front end from the API key (router/tenants.h), never from the body.
  std::string tenant;
};

// The sampling fields' ranges, for requests that arrive typed (gRPC; the HTTP parse checks the same ranges
// as it reads): temperature, top_p, min_p, the penalties, top_k, top_logprobs and stop_token_ids (their
// count and sign; the vocabulary bound is ServedModel's). `n` and the stop strings are the reader's, which
// sees them before defaults and filtering. INVALID_ARGUMENT naming `prefix` + the field; NaN fails.
absl::Status CheckSampling(const SamplingRequest& s, const std::string& prefix);

// Whether tool calls may come back: a chat request that offers tools (the body's `tools` or a message's) and
// does not say tool_choice "none". Otherwise a DSML block in the output is returned as content.
bool OffersTools(const OpenAiRequest& req);

// Parses a request body. `max_n` bounds `n` (choices per request).
absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(Endpoint endpoint, const std::string& body,
                                                 int32_t max_n = 8);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_OPENAI_REQUEST_H_
