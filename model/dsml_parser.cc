#include "model/dsml_parser.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "model/internal/chat_py_json.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

constexpr std::string_view kThinkEnd = "</think>";
constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";
constexpr std::string_view kBlockStart = "\n\n<｜DSML｜tool_calls";
constexpr std::string_view kBlockEnd = "</｜DSML｜tool_calls>";
constexpr std::string_view kInvoke = "<｜DSML｜invoke";
constexpr std::string_view kInvokeEnd = "</｜DSML｜invoke";
constexpr std::string_view kParam = "<｜DSML｜parameter";
constexpr std::string_view kParamEnd = "/｜DSML｜parameter";

// _read_until_stop of the reference: the text from `pos` to the earliest stop, and which stop (or
// nullptr when none occurs; then the rest of the text is returned).
struct ReadResult {
  std::string_view before;
  const std::string_view* stop;
};
template <size_t N>
ReadResult ReadUntil(std::string_view text, size_t& pos, const std::string_view* const (&stops)[N]) {
  size_t best = std::string_view::npos;
  const std::string_view* found = nullptr;
  for (const std::string_view* s : stops) {
    const size_t at = text.find(*s, pos);
    if (at != std::string_view::npos && at < best) {
      best = at;
      found = s;
    }
  }
  ReadResult r;
  if (found == nullptr) {
    r = {text.substr(pos), nullptr};
    pos = text.size();
  } else {
    r = {text.substr(pos, best - pos), found};
    pos = best + found->size();
  }
  return r;
}

bool IsPySpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// ^\s*name="(.*?)">\n$ (Python's $ also matches before one final newline).
bool ParseInvokeName(std::string_view s, std::string& name) {
  size_t i = 0;
  while (i < s.size() && IsPySpace(s[i])) ++i;
  s.remove_prefix(i);
  if (!s.starts_with("name=\"")) return false;
  s.remove_prefix(6);
  if (s.ends_with("\">\n\n")) {
    s.remove_suffix(4);
  } else if (s.ends_with("\">\n")) {
    s.remove_suffix(3);
  } else {
    return false;
  }
  name = std::string(s);
  return true;
}

// ^ name="(.*?)" string="(true|false)">(.*?)<$ with DOTALL.
bool ParseParameter(std::string_view s, std::string& name, bool& is_string, std::string& value) {
  if (!s.starts_with(" name=\"")) return false;
  s.remove_prefix(7);
  const size_t t = s.find("\" string=\"true\">");
  const size_t f = s.find("\" string=\"false\">");
  if (t == std::string_view::npos && f == std::string_view::npos) return false;
  is_string = t != std::string_view::npos && (f == std::string_view::npos || t < f);
  const size_t at = is_string ? t : f;
  name = std::string(s.substr(0, at));
  s.remove_prefix(at + (is_string ? 16 : 17));
  if (s.ends_with("<\n")) {
    s.remove_suffix(2);
  } else if (s.ends_with("<")) {
    s.remove_suffix(1);
  } else {
    return false;
  }
  value = std::string(s);
  return true;
}

// decode_dsml_to_arguments; a string="false" value that is not JSON is quoted as a string so the
// arguments stay a JSON object.
std::string ArgumentsJson(const std::vector<std::pair<std::string, std::pair<std::string, bool>>>& args) {
  std::string out = "{";
  for (size_t i = 0; i < args.size(); ++i) {
    if (i > 0) out += ", ";
    internal::AppendPyJsonString(args[i].first, out);
    out += ": ";
    const auto& [value, is_string] = args[i].second;
    // nlohmann stops at a NUL byte, so "true\0junk" would pass accept(); no JSON text contains one.
    if (!is_string && value.find('\0') == std::string::npos && nlohmann::json::accept(value)) {
      out += value;
    } else {
      internal::AppendPyJsonString(value, out);
    }
  }
  out += "}";
  return out;
}

// Length of the longest suffix of `text` that is a proper prefix of `marker`.
size_t PartialMarkerSuffix(std::string_view text, std::string_view marker) {
  for (size_t k = std::min(text.size(), marker.size() - 1); k > 0; --k) {
    if (text.substr(text.size() - k) == marker.substr(0, k)) return k;
  }
  return 0;
}

}  // namespace

bool ParseDsmlToolCallBlock(std::string_view text, std::vector<DsmlToolCall>& calls) {
  static const std::string_view* const kTop[] = {&kInvoke, &kBlockEnd};
  static const std::string_view* const kInInvoke[] = {&kParam, &kInvokeEnd};
  static const std::string_view* const kInParam[] = {&kParamEnd};
  calls.clear();
  size_t pos = 0;
  while (pos < text.size()) {
    ReadResult r = ReadUntil(text, pos, kTop);
    if (r.before != ">\n" || r.stop == nullptr) return false;
    if (r.stop == &kBlockEnd) return pos == text.size();
    r = ReadUntil(text, pos, kInInvoke);
    DsmlToolCall call;
    if (!ParseInvokeName(r.before, call.name)) return false;
    std::vector<std::pair<std::string, std::pair<std::string, bool>>> args;
    while (r.stop == &kParam) {
      r = ReadUntil(text, pos, kInParam);
      std::string name, value;
      bool is_string;
      if (r.stop == nullptr || !ParseParameter(r.before, name, is_string, value)) return false;
      for (const auto& a : args) {
        if (a.first == name) return false;  // duplicate parameter
      }
      args.emplace_back(std::move(name), std::make_pair(std::move(value), is_string));
      r = ReadUntil(text, pos, kInInvoke);
      if (r.before != ">\n") return false;
    }
    if (r.stop != &kInvokeEnd) return false;
    call.arguments = ArgumentsJson(args);
    calls.push_back(std::move(call));
  }
  return false;  // no closing tag
}

DsmlParser::DsmlParser(Options options)
    : state_(options.thinking ? State::kReasoning : State::kContent), tool_calls_(options.tool_calls) {}

void DsmlParser::Emit(ChatDelta::Kind kind, std::string_view text, std::vector<ChatDelta>& out) {
  if (text.empty()) return;
  if (!out.empty() && out.back().kind == kind && kind != ChatDelta::Kind::kToolCall) {
    out.back().text.append(text);
    return;
  }
  ChatDelta d{kind, std::string(text), {}, -1};
  out.push_back(std::move(d));
}

void DsmlParser::Step(bool final, std::vector<ChatDelta>& out) {
  while (true) {
    std::string_view buf = buffer_;
    if (state_ == State::kDone) {
      buffer_.clear();
      return;
    }
    if (state_ == State::kToolBlock && !tool_calls_) {  // No tools offered: the block is content.
      Emit(ChatDelta::Kind::kContent, kBlockStart, out);
      state_ = State::kContent;
      continue;
    }
    if (state_ == State::kToolBlock) {
      // The block must open with ">\n"; anything else is not DSML.
      const bool bad_start = (buf.size() >= 1 && buf[0] != '>') || (buf.size() >= 2 && buf[1] != '\n');
      // Resume the search where the last one stopped, so a long block fed token by token stays linear.
      const size_t from = block_scanned_ > kBlockEnd.size() ? block_scanned_ - kBlockEnd.size() : 0;
      const size_t end = buf.find(kBlockEnd, from);
      block_scanned_ = buf.size();
      if (!bad_start && end == std::string_view::npos && !final) return;
      std::vector<DsmlToolCall> calls;
      const size_t block_len = end == std::string_view::npos ? buf.size() : end + kBlockEnd.size();
      if (!bad_start && end != std::string_view::npos &&
          ParseDsmlToolCallBlock(buf.substr(0, block_len), calls)) {
        for (DsmlToolCall& call : calls) {
          ChatDelta d{ChatDelta::Kind::kToolCall, "", std::move(call), tool_calls_emitted_++};
          out.push_back(std::move(d));
        }
        buffer_.erase(0, block_len);
        state_ = State::kContent;
        continue;
      }
      // Not DSML: the marker and the text so far are content; rescan what follows the marker.
      Emit(ChatDelta::Kind::kContent, kBlockStart, out);
      state_ = State::kContent;
      continue;
    }
    const bool reasoning = state_ == State::kReasoning;
    const ChatDelta::Kind kind = reasoning ? ChatDelta::Kind::kReasoning : ChatDelta::Kind::kContent;
    const std::string_view marker = reasoning ? kThinkEnd : kBlockStart;
    const size_t at_marker = buf.find(marker);
    const size_t at_eos = buf.find(kEos);
    if (at_eos != std::string_view::npos && (at_marker == std::string_view::npos || at_eos < at_marker)) {
      Emit(kind, buf.substr(0, at_eos), out);
      state_ = State::kDone;
      continue;
    }
    if (at_marker != std::string_view::npos) {
      Emit(kind, buf.substr(0, at_marker), out);
      buffer_.erase(0, at_marker + marker.size());
      state_ = reasoning ? State::kContent : State::kToolBlock;
      block_scanned_ = 0;
      continue;
    }
    const size_t hold =
        final ? 0 : std::max(PartialMarkerSuffix(buf, marker), PartialMarkerSuffix(buf, kEos));
    Emit(kind, buf.substr(0, buf.size() - hold), out);
    buffer_.erase(0, buf.size() - hold);
    return;
  }
}

std::vector<ChatDelta> DsmlParser::Push(std::string_view text) {
  std::vector<ChatDelta> out;
  if (state_ == State::kDone) return out;
  buffer_.append(text);
  Step(/*final=*/false, out);
  return out;
}

std::vector<ChatDelta> DsmlParser::Finish() {
  std::vector<ChatDelta> out;
  Step(/*final=*/true, out);
  state_ = State::kDone;
  buffer_.clear();
  return out;
}

ParsedAssistantMessage DsmlParser::ParseCompletion(std::string_view text, Options options) {
  DsmlParser parser(options);
  std::vector<ChatDelta> deltas = parser.Push(text);
  for (ChatDelta& d : parser.Finish()) deltas.push_back(std::move(d));
  ParsedAssistantMessage message;
  for (ChatDelta& d : deltas) {
    switch (d.kind) {
      case ChatDelta::Kind::kReasoning:
        message.reasoning_content += d.text;
        break;
      case ChatDelta::Kind::kContent:
        message.content += d.text;
        break;
      case ChatDelta::Kind::kToolCall:
        message.tool_calls.push_back(std::move(d.tool_call));
        break;
    }
  }
  return message;
}

}  // namespace v4serve::model
