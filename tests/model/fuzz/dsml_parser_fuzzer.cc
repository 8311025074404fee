#include <cstdlib>
#include <string>
#include <string_view>

#include "model/dsml_parser.h"
#include "nlohmann/json.hpp"
#include "tests/model/fuzz/fuzz_targets.h"

namespace v4serve::model::fuzz {

int FuzzDsmlParser(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const DsmlParser::Options options{.thinking = (data[0] & 1) != 0};
  const size_t chunk = 1 + (data[0] >> 1) % 16;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);

  const ParsedAssistantMessage whole = DsmlParser::ParseCompletion(text, options);
  DsmlParser parser(options);
  ParsedAssistantMessage streamed;
  auto collect = [&](const std::vector<ChatDelta>& deltas) {
    for (const auto& d : deltas) {
      if (d.kind == ChatDelta::Kind::kReasoning) streamed.reasoning_content += d.text;
      if (d.kind == ChatDelta::Kind::kContent) streamed.content += d.text;
      if (d.kind == ChatDelta::Kind::kToolCall) {
        if (d.tool_call_index != static_cast<int>(streamed.tool_calls.size())) std::abort();
        streamed.tool_calls.push_back(d.tool_call);
      }
    }
  };
  for (size_t pos = 0; pos < text.size(); pos += chunk) collect(parser.Push(text.substr(pos, chunk)));
  collect(parser.Finish());

  if (streamed.reasoning_content != whole.reasoning_content || streamed.content != whole.content ||
      streamed.tool_calls.size() != whole.tool_calls.size()) {
    std::abort();
  }
  for (size_t i = 0; i < whole.tool_calls.size(); ++i) {
    if (streamed.tool_calls[i].arguments != whole.tool_calls[i].arguments) std::abort();
    const auto args =
        nlohmann::json::parse(whole.tool_calls[i].arguments, nullptr, /*allow_exceptions=*/false);
    if (args.is_discarded() || !args.is_object()) std::abort();
  }
  // Without markers the parser must hand the text back unchanged.
  const bool plain = text.find("｜DSML｜") == std::string_view::npos &&
                     text.find("</think>") == std::string_view::npos &&
                     text.find("<｜end▁of▁sentence｜>") == std::string_view::npos;
  if (plain) {
    const std::string& all = options.thinking ? whole.reasoning_content : whole.content;
    if (all != text) std::abort();
  }
  return 0;
}

}  // namespace v4serve::model::fuzz

#ifndef V4SERVE_FUZZ_NO_MAIN
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return v4serve::model::fuzz::FuzzDsmlParser(data, size);
}
#endif
