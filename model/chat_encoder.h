// ChatEncoder: renders an OpenAI-style conversation into DeepSeek-V4's prompt and its token ids.
//
// The prompt is byte-identical to DeepSeek's reference `encode_messages()` in encoding/encoding_dsv4.py
// (checked against fixtures generated from it by tools/chat/gen_chat_fixtures.py): BOS, system text with
// a "## Tools" section, <｜User｜>/<｜Assistant｜> turns, <think>/</think> per reasoning mode, tool calls as
// DSML blocks, tool results as <tool_result> blocks in call order, quick-instruction task tokens and the
// maximum-effort preamble. docs/TOKENIZER.md lists where we deliberately differ (errors instead of
// Python exceptions or silent fallbacks).
//
// Messages are nlohmann::ordered_json so object keys keep the client's order: tool schemas and tool-call
// arguments are re-serialized into the prompt, and a sorted map would change the bytes the model sees.
//
// Thread-safety: RenderChatPrompt is a pure function; ChatEncoder is immutable and thread-safe. The
// Tokenizer passed to ChatEncoder must outlive it.
#ifndef V4SERVE_MODEL_CHAT_ENCODER_H_
#define V4SERVE_MODEL_CHAT_ENCODER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {

enum class ThinkingMode {
  kChat,      // the prompt ends with "<｜Assistant｜></think>": the model answers directly
  kThinking,  // the prompt ends with "<｜Assistant｜><think>": the model reasons first
};

enum class ReasoningEffort {
  kDefault,  // no effort marker (the reference's None)
  kHigh,     // accepted; renders like kDefault, as in the reference
  kMax,      // thinking mode only: prepends the reference's maximum-effort paragraph
};

struct ChatEncodeOptions {
  ThinkingMode thinking_mode = ThinkingMode::kChat;
  ReasoningEffort reasoning_effort = ReasoningEffort::kDefault;
  // Drop reasoning_content of assistant turns before the last user turn (ignored when tools are
  // defined, as in the reference).
  bool drop_thinking = true;
  // Start with <｜begin▁of▁sentence｜>.
  bool add_bos = true;
};

// Renders `messages` (a JSON array of message objects) to the prompt text.
//
// Roles: system, user, assistant, tool, developer, latest_reminder. Fields read: content (string or null;
// for tool messages also an array of {"type": "text", "text": ...} parts), reasoning_content, tool_calls
// (OpenAI shape; arguments a JSON-object string), tool_call_id, tools and response_format (system or
// developer), task (action, query, authority, domain, title, read_url) and wo_eos (assistant prefill).
//
// `tools` is the request's top-level OpenAI `tools` array (or null): when non-empty it is attached to the
// leading system message, or to a new empty system message when the conversation has none.
//
// INVALID_ARGUMENT, with a message naming the offending field (e.g. "messages[3].tool_calls[0].function
// .arguments: not a JSON object"), for unknown roles, content of the wrong type, malformed tools or
// tool calls and unknown tasks.
absl::StatusOr<std::string> RenderChatPrompt(const nlohmann::ordered_json& messages,
                                             const nlohmann::ordered_json& tools,
                                             const ChatEncodeOptions& options);

class ChatEncoder {
 public:
  struct Prompt {
    std::string text;
    std::vector<TokenId> ids;
  };

  explicit ChatEncoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {}

  // RenderChatPrompt, then Tokenizer::Encode of the text (control tokens written in the text become
  // their ids, exactly as HF tokenizers does with the reference's prompt string).
  absl::StatusOr<Prompt> Encode(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                const ChatEncodeOptions& options) const;

 private:
  const Tokenizer& tokenizer_;
};

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_CHAT_ENCODER_H_
