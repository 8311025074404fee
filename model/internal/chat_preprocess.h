// Validation and the reference encoder's preprocessing passes (internal to v4serve_model):
// merge_tool_messages, sort_tool_results_by_call_order, _drop_thinking_messages and
// find_last_user_index of encoding_dsv4.py, on JSON message objects. Pure functions; thread-safe.
#ifndef V4SERVE_MODEL_INTERNAL_CHAT_PREPROCESS_H_
#define V4SERVE_MODEL_INTERNAL_CHAT_PREPROCESS_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace v4serve::model::internal {

using ChatJson = nlohmann::ordered_json;

// OpenAI's content parts, as the SDKs send them: each message but a tool's whose content is an array of
// {"type": "text", "text": ...} parts gets its texts joined by newlines (as vLLM's "string" content format
// does); any other part (image_url, input_audio, file, ...) is INVALID_ARGUMENT naming it (this model reads
// text only). nullopt when no message has parts (nothing to copy). Runs before ValidateMessages.
absl::StatusOr<std::optional<ChatJson>> JoinTextParts(const ChatJson& messages);
// Checks every field the encoder reads; INVALID_ARGUMENT naming the field otherwise.
absl::Status ValidateMessages(const ChatJson& messages);
// Checks an OpenAI tools array; `path` names it in errors (e.g. "tools" or "messages[0].tools").
absl::Status ValidateTools(const ChatJson& tools, const std::string& path);

// Tool messages become <tool_result> blocks of a user message; consecutive user messages merge.
std::vector<ChatJson> MergeToolMessages(const std::vector<ChatJson>& messages);
// Orders each user message's tool results by the preceding assistant's tool_calls order.
void SortToolResultsByCallOrder(std::vector<ChatJson>& messages);
// Removes reasoning_content of assistant turns before the last user turn and drops earlier developer
// messages.
std::vector<ChatJson> DropThinkingMessages(const std::vector<ChatJson>& messages);
// Index of the last user or developer message, or -1.
int FindLastUserIndex(const std::vector<ChatJson>& messages);

// Field access with Python's dict.get semantics: the value, or null when absent.
const ChatJson& Get(const ChatJson& object, const char* key);
// Python's dict.get(key) == value for strings.
bool RoleIs(const ChatJson& message, const char* role);

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_CHAT_PREPROCESS_H_
