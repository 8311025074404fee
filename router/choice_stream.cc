#include "router/choice_stream.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace v4serve::router {

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) longest_ = std::max(longest_, s.size());
}

std::string StopMatcher::Push(const std::string& text) {
  if (stopped_) return "";
  held_ += text;
  size_t first = std::string::npos;
  for (const std::string& s : stops_) first = std::min(first, held_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, first);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k) {
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Flush() { return std::exchange(held_, std::string()); }

ChoiceStream::ChoiceStream(const model::Tokenizer& tokenizer, ChoiceStreamOptions options)
    : tokenizer_(tokenizer),
      options_(std::move(options)),
      decoder_(tokenizer, {.skip_special_tokens = true}),
      parser_({.thinking = options_.thinking, .tool_calls = options_.tool_calls}),
      stop_(options_.stop),
      in_reasoning_(options_.thinking) {}

void ChoiceStream::Apply(std::vector<model::ChatDelta> deltas, ChoiceEvent* e) {
  for (model::ChatDelta& d : deltas) {
    switch (d.kind) {
      case model::ChatDelta::Kind::kReasoning:
        e->reasoning += d.text;
        break;
      case model::ChatDelta::Kind::kContent:
        in_reasoning_ = false;
        e->content += d.text;
        break;
      case model::ChatDelta::Kind::kToolCall:
        in_reasoning_ = false;
        e->tool_calls.push_back(
            {absl::StrCat(options_.tool_call_id_prefix, options_.index, "_", tool_calls_++),
             std::move(d.tool_call.name), std::move(d.tool_call.arguments)});
        break;
    }
  }
}

void ChoiceStream::Text(const std::string& text, ChoiceEvent* e) {
  if (text.empty()) return;
  if (options_.chat) {
    Apply(parser_.Push(text), e);
  } else {
    e->content += text;
  }
}

absl::StatusOr<ChoiceEvent> ChoiceStream::Push(model::TokenId id, float logprob,
                                               const std::vector<std::pair<model::TokenId, float>>& top) {
  ChoiceEvent e;
  e.index = options_.index;
  if (stop_.stopped()) return e;
  absl::StatusOr<std::string> text = decoder_.Push(id);
  if (!text.ok()) return text.status();
  ++completion_tokens_;
  if (in_reasoning_) ++reasoning_tokens_;
  if (options_.logprobs) {
    LogprobOut lp;
    lp.token = tokenizer_.Decode({id}).value_or("");
    lp.logprob = logprob;
    for (const auto& [tid, v] : top) lp.top.emplace_back(tokenizer_.Decode({tid}).value_or(""), v);
    e.logprobs.push_back(std::move(lp));
  }
  Text(stop_.Push(*text), &e);
  return e;
}

ChoiceEvent ChoiceStream::Close(Finish reason) {
  ChoiceEvent e;
  e.index = options_.index;
  std::string tail = decoder_.Finish();
  if (!stop_.stopped()) {
    tail = stop_.Push(tail);
    if (!stop_.stopped()) tail += stop_.Flush();
  }
  Text(tail, &e);
  if (options_.chat) Apply(parser_.Finish(), &e);
  if (stop_.stopped()) reason = Finish::kStop;
  if (reason == Finish::kStop && tool_calls_ > 0) reason = Finish::kToolCalls;
  e.finish = reason;
  return e;
}

}  // namespace v4serve::router
