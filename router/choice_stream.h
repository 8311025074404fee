// Turns one choice's generated token ids into OpenAI events: incremental detokenization (whole UTF-8
// characters only), stop strings, and V4's reasoning / content / DSML tool-call split.
//
// The router owns this (ARCHITECTURE.md): workers stream token ids, the router streams text. One object
// per choice; not thread-safe. `tokenizer` must outlive it.
#ifndef V4SERVE_ROUTER_CHOICE_STREAM_H_
#define V4SERVE_ROUTER_CHOICE_STREAM_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/dsml_parser.h"
#include "model/tokenizer.h"
#include "model/tokenizer_streaming.h"
#include "router/openai_response.h"

namespace v4serve::router {

// Holds back the tail of a text stream that could still start a stop string; reports the first match.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);
  // Returns the text that can be released now. After a match, returns the text before it and stopped().
  std::string Push(const std::string& text);
  // The held-back tail (no match can complete any more).
  std::string Flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  size_t longest_ = 0;
  std::string held_;
  bool stopped_ = false;
};

struct ChoiceStreamOptions {
  int32_t index = 0;
  bool thinking = false;  // the prompt ended with <think>: output starts as reasoning
  bool chat = true;       // chat: split reasoning / content / tool calls; completions: plain text
  std::vector<std::string> stop;
  bool logprobs = false;
  std::string tool_call_id_prefix;  // tool call ids are <prefix><choice>_<n>
  bool tool_calls = true;  // false: the request offered no tools (or tool_choice "none"): DSML is content
};

class ChoiceStream {
 public:
  ChoiceStream(const model::Tokenizer& tokenizer, ChoiceStreamOptions options);

  // One generated token (with its logprobs when asked). INVALID_ARGUMENT for an id outside the vocabulary.
  absl::StatusOr<ChoiceEvent> Push(model::TokenId id, float logprob,
                                   const std::vector<std::pair<model::TokenId, float>>& top);
  // True once a stop string matched: the caller stops generation and calls Close(Finish::kStop).
  bool stopped() const { return stop_.stopped(); }
  // Flushes held text and closes the choice with `reason` (kToolCalls replaces kStop when tool calls were
  // made).
  ChoiceEvent Close(Finish reason);

  int32_t completion_tokens() const { return completion_tokens_; }
  int32_t reasoning_tokens() const { return reasoning_tokens_; }

 private:
  void Apply(std::vector<model::ChatDelta> deltas, ChoiceEvent* event);
  void Text(const std::string& text, ChoiceEvent* event);

  const model::Tokenizer& tokenizer_;
  ChoiceStreamOptions options_;
  model::StreamingDecoder decoder_;
  model::DsmlParser parser_;
  StopMatcher stop_;
  int32_t completion_tokens_ = 0;
  int32_t reasoning_tokens_ = 0;
  int32_t tool_calls_ = 0;
  bool in_reasoning_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_CHOICE_STREAM_H_
