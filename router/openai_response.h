// OpenAI response bodies: SSE chunks while streaming, or one JSON object at the end, built from the same
// per-choice events so that streaming and non-streaming responses always agree.
//
// One ResponseBuilder per request; not thread-safe (owned by the request's stream).
#ifndef V4SERVE_ROUTER_OPENAI_RESPONSE_H_
#define V4SERVE_ROUTER_OPENAI_RESPONSE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "router/openai_request.h"

namespace v4serve::router {

struct ToolCallOut {
  std::string id;  // "call_..." assigned by the router
  std::string name;
  std::string arguments;  // a JSON object as text
};

struct LogprobOut {
  std::string token;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};

enum class Finish { kStop, kLength, kToolCalls, kCancelled };

struct UsageOut {
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_prompt_tokens = 0;
  int32_t reasoning_tokens = 0;
};

// What one step produced for one choice.
struct ChoiceEvent {
  int32_t index = 0;
  std::string content;
  std::string reasoning;
  std::vector<ToolCallOut> tool_calls;
  std::vector<LogprobOut> logprobs;
  std::optional<Finish> finish;
};

class ResponseBuilder {
 public:
  // `id` e.g. "chatcmpl-<request id>"; `created` unix seconds.
  ResponseBuilder(Endpoint endpoint, std::string id, std::string model, int64_t created, int32_t n_choices);

  // Streaming: the SSE text ("data: {...}\n\n") for this event; empty when it carries nothing to send.
  std::string StreamChunk(const ChoiceEvent& event);
  // Streaming end: the usage chunk (when `include_usage`) and "data: [DONE]\n\n".
  std::string StreamEnd(const UsageOut& usage, bool include_usage);

  // Non-streaming: fold the event in; Body() gives the whole response.
  void Accumulate(const ChoiceEvent& event);
  std::string Body(const UsageOut& usage) const;

  static const char* FinishName(Finish f);

 private:
  nlohmann::ordered_json Envelope() const;

  Endpoint endpoint_;
  std::string id_, model_;
  int64_t created_;
  std::vector<bool> role_sent_;
  std::vector<int32_t> tool_calls_sent_;
  struct Acc {
    std::string content, reasoning;
    std::vector<ToolCallOut> tool_calls;
    std::vector<LogprobOut> logprobs;
    std::optional<Finish> finish;
  };
  std::vector<Acc> acc_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_OPENAI_RESPONSE_H_
