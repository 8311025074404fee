// The model this router serves: its id, context limit, and the tokenizer and chat encoding that turn
// requests into prompt token ids (the router tokenizes; workers see ids only).
//
// Immutable after Load; thread-safe.
#ifndef V4SERVE_ROUTER_SERVED_MODEL_H_
#define V4SERVE_ROUTER_SERVED_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/chat_encoder.h"
#include "model/tokenizer.h"
#include "router/openai_request.h"

namespace v4serve::router {

struct EncodedPrompt {
  std::vector<int32_t> ids;
  bool thinking = false;  // the prompt ends with <think>: output starts as reasoning
};

// The request's messages with its quick instruction (v4serve.quick_instruction, docs/API.md) attached
// as the last message's task, so that the chat encoder appends the task token where V4 expects it:
// `title` after an assistant turn, the others after a user turn. INVALID_ARGUMENT naming the field for
// an unknown task, a wrong last role, or a cache handle (not issued by this version).
absl::StatusOr<nlohmann::ordered_json> WithQuickInstruction(const OpenAiRequest& request);

class ServedModel {
 public:
  // Reads `dir`/config.json and `dir`/tokenizer.json. `id` defaults to the directory's name.
  static absl::StatusOr<std::unique_ptr<ServedModel>> Load(const std::string& dir, const std::string& id);
  // For tests: a tokenizer and limits without a checkpoint directory.
  ServedModel(std::string id, std::unique_ptr<model::Tokenizer> tokenizer, int64_t max_context_tokens,
              int32_t eos_id);

  const std::string& id() const { return id_; }
  int64_t max_context_tokens() const { return max_context_tokens_; }
  int32_t eos_id() const { return eos_id_; }
  const model::Tokenizer& tokenizer() const { return *tokenizer_; }

  // Chat: V4 chat encoding of messages + tools in the request's reasoning mode. Completions: the prompt
  // text tokenized (BOS first), or the given ids checked against the vocabulary. INVALID_ARGUMENT names the
  // field; a prompt that leaves no room to generate is INVALID_ARGUMENT on "messages"/"prompt".
  absl::StatusOr<EncodedPrompt> Encode(const OpenAiRequest& request) const;

 private:
  std::string id_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  int64_t max_context_tokens_;
  int32_t eos_id_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_SERVED_MODEL_H_
