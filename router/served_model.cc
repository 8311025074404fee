#include "router/served_model.h"

#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/config.h"
#include "services/status_macros.h"

namespace v4serve::router {

ServedModel::ServedModel(std::string id, std::unique_ptr<model::Tokenizer> tokenizer,
                         int64_t max_context_tokens, int32_t eos_id)
    : id_(std::move(id)),
      tokenizer_(std::move(tokenizer)),
      max_context_tokens_(max_context_tokens),
      eos_id_(eos_id) {}

absl::StatusOr<std::unique_ptr<ServedModel>> ServedModel::Load(const std::string& dir,
                                                               const std::string& id) {
  ASSIGN_OR_RETURN(model::ModelConfig config, model::LoadModelConfig(dir));
  std::string tok_path = (std::filesystem::path(dir) / "tokenizer.json").string();
  absl::StatusOr<std::unique_ptr<model::Tokenizer>> tok = model::Tokenizer::LoadFromFile(tok_path);
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat("--model: ", tok_path, ": ", tok.status().message()));
  }
  if ((*tok)->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("--model: tokenizer.json has ", (*tok)->vocab_size(),
                                                   " ids but config.json's vocab_size is ",
                                                   config.vocab_size));
  }
  std::string name = id.empty() ? std::filesystem::path(dir).lexically_normal().filename().string() : id;
  if (name.empty()) name = std::filesystem::path(dir).lexically_normal().parent_path().filename().string();
  return std::make_unique<ServedModel>(name, std::move(*tok), config.max_position_embeddings,
                                       static_cast<int32_t>(config.eos_token_id));
}

// Token ids a client sent (prompt, stop_token_ids) below the vocabulary's size; `field` names the list.
absl::Status IdsInVocabulary(const std::vector<int32_t>& ids, const char* field, int32_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", i, "]: token id ", ids[i], " is outside the vocabulary of ", vocab_size));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<nlohmann::ordered_json> WithQuickInstruction(const OpenAiRequest& req) {
  if (!req.cache_handle.empty()) {
    return absl::InvalidArgumentError(
        "v4serve.cache_handle: handles are not issued by this version; send the conversation's messages "
        "with v4serve.quick_instruction (its cached prefix is found from the messages)");
  }
  if (req.quick_instruction.empty()) return req.messages;
  const std::string& task = req.quick_instruction;
  const bool after_assistant = task == "title";
  const bool after_user = task == "action" || task == "query" || task == "authority" || task == "domain" ||
                          task == "read_url" || task == "extracted_url";
  if (!after_assistant && !after_user) {
    return absl::InvalidArgumentError(
        absl::StrCat("v4serve.quick_instruction: unknown task '", task,
                     "' (expected title, action, query, authority, domain, read_url or extracted_url)"));
  }
  if (req.endpoint != Endpoint::kChatCompletions) {
    return absl::InvalidArgumentError("v4serve.quick_instruction: only /v1/chat/completions takes it");
  }
  nlohmann::ordered_json messages = req.messages;
  nlohmann::ordered_json& last = messages.back();
  const std::string role = last.value("role", "");
  if (after_assistant && role != "assistant") {
    return absl::InvalidArgumentError(absl::StrCat("v4serve.quick_instruction: '", task,
                                                   "' follows an assistant turn; the last message is '", role,
                                                   "'"));
  }
  if (after_user && role != "user") {
    return absl::InvalidArgumentError(absl::StrCat(
        "v4serve.quick_instruction: '", task, "' follows a user turn; the last message is '", role, "'"));
  }
  if (last.contains("task")) {
    return absl::InvalidArgumentError("v4serve.quick_instruction: the last message already has a task");
  }
  last["task"] = task;
  return messages;
}

absl::StatusOr<EncodedPrompt> ServedModel::Encode(const OpenAiRequest& req) const {
  EncodedPrompt out;
  // Their sign was checked by CheckSampling.
  RETURN_IF_ERROR(
      IdsInVocabulary(req.sampling.stop_token_ids, "sampling.stop_token_ids", tokenizer_->vocab_size()));
  const char* field = "prompt";
  if (req.endpoint == Endpoint::kChatCompletions) {
    field = "messages";
    model::ChatEncodeOptions o;
    o.thinking_mode = req.reasoning == ReasoningMode::kNonThink ? model::ThinkingMode::kChat
                                                                : model::ThinkingMode::kThinking;
    o.reasoning_effort = req.reasoning == ReasoningMode::kThinkMax    ? model::ReasoningEffort::kMax
                         : req.reasoning == ReasoningMode::kThinkHigh ? model::ReasoningEffort::kHigh
                                                                      : model::ReasoningEffort::kDefault;
    out.thinking = o.thinking_mode == model::ThinkingMode::kThinking;
    model::ChatEncoder encoder(*tokenizer_);
    ASSIGN_OR_RETURN(nlohmann::ordered_json messages, WithQuickInstruction(req));
    // tool_choice "none": the tools stay out of the prompt (and a DSML block in the output is content).
    static const nlohmann::ordered_json kNoTools;
    ASSIGN_OR_RETURN(model::ChatEncoder::Prompt prompt,
                     encoder.Encode(messages, req.tool_choice == "none" ? kNoTools : req.tools, o));
    out.ids = std::move(prompt.ids);
  } else if (req.prompt_ids) {
    RETURN_IF_ERROR(IdsInVocabulary(*req.prompt_ids, "prompt", tokenizer_->vocab_size()));
    out.ids = *req.prompt_ids;
  } else {
    std::optional<model::TokenId> bos = tokenizer_->TokenToId("<｜begin▁of▁sentence｜>");
    if (bos) out.ids.push_back(*bos);
    std::vector<model::TokenId> text = tokenizer_->Encode(req.prompt_text.value_or(""));
    out.ids.insert(out.ids.end(), text.begin(), text.end());
  }
  if (out.ids.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": the prompt is empty"));
  int64_t room = max_context_tokens_ - static_cast<int64_t>(out.ids.size());
  if (max_context_tokens_ > 0 && room < 1) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": the prompt has ", out.ids.size(),
                                                   " tokens; this model's context is ", max_context_tokens_));
  }
  if (max_context_tokens_ > 0 && req.sampling.max_tokens && *req.sampling.max_tokens > room) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: ", *req.sampling.max_tokens,
                                                   " plus the prompt's ", out.ids.size(),
                                                   " tokens exceeds the context of ", max_context_tokens_));
  }
  return out;
}

}  // namespace v4serve::router
