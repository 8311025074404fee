#include <cstdlib>
#include <string_view>

#include "model/chat_encoder.h"
#include "nlohmann/json.hpp"
#include "tests/model/fuzz/fuzz_targets.h"

namespace v4serve::model::fuzz {

int FuzzChatRender(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto body = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.is_object()) return 0;
  const nlohmann::ordered_json null_json;
  const auto& messages = body.contains("messages") ? body["messages"] : null_json;
  const auto& tools = body.contains("tools") ? body["tools"] : null_json;
  for (int mode = 0; mode < 4; ++mode) {
    ChatEncodeOptions options;
    options.thinking_mode = (mode & 1) ? ThinkingMode::kThinking : ThinkingMode::kChat;
    options.reasoning_effort = (mode & 2) ? ReasoningEffort::kMax : ReasoningEffort::kDefault;
    auto prompt = RenderChatPrompt(messages, tools, options);
    if (!prompt.ok() && prompt.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
  }
  return 0;
}

}  // namespace v4serve::model::fuzz

#ifndef V4SERVE_FUZZ_NO_MAIN
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return v4serve::model::fuzz::FuzzChatRender(data, size);
}
#endif
