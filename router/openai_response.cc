#include "router/openai_response.h"

#include <utility>

namespace v4serve::router {
namespace {

using Json = nlohmann::ordered_json;

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

Json LogprobsJson(Endpoint endpoint, const std::vector<LogprobOut>& lps) {
  if (endpoint == Endpoint::kCompletions) {
    Json tokens = Json::array(), values = Json::array(), top = Json::array();
    for (const LogprobOut& lp : lps) {
      tokens.push_back(lp.token);
      values.push_back(lp.logprob);
      Json t = Json::object();
      for (const auto& [tok, v] : lp.top) t[tok] = v;
      top.push_back(t);
    }
    return Json{{"tokens", tokens}, {"token_logprobs", values}, {"top_logprobs", top}};
  }
  Json content = Json::array();
  for (const LogprobOut& lp : lps) {
    Json top = Json::array();
    for (const auto& [tok, v] : lp.top) top.push_back({{"token", tok}, {"logprob", v}, {"bytes", nullptr}});
    content.push_back(
        {{"token", lp.token}, {"logprob", lp.logprob}, {"bytes", nullptr}, {"top_logprobs", top}});
  }
  return Json{{"content", content}};
}

Json ToolCallJson(const ToolCallOut& call, std::optional<int32_t> index) {
  Json j;
  if (index) j["index"] = *index;
  j["id"] = call.id;
  j["type"] = "function";
  j["function"] = {{"name", call.name}, {"arguments", call.arguments}};
  return j;
}

}  // namespace

const char* ResponseBuilder::FinishName(Finish f) {
  switch (f) {
    case Finish::kStop:
      return "stop";
    case Finish::kLength:
      return "length";
    case Finish::kToolCalls:
      return "tool_calls";
    case Finish::kCancelled:
      return "stop";
  }
  return "stop";
}

ResponseBuilder::ResponseBuilder(Endpoint endpoint, std::string id, std::string model, int64_t created,
                                 int32_t n_choices)
    : endpoint_(endpoint),
      id_(std::move(id)),
      model_(std::move(model)),
      created_(created),
      role_sent_(n_choices, false),
      tool_calls_sent_(n_choices, 0),
      acc_(n_choices) {}

Json ResponseBuilder::Envelope() const {
  return Json{{"id", id_}, {"object", ""}, {"created", created_}, {"model", model_}};
}

std::string ResponseBuilder::StreamChunk(const ChoiceEvent& e) {
  bool chat = endpoint_ == Endpoint::kChatCompletions;
  bool empty = e.content.empty() && e.reasoning.empty() && e.tool_calls.empty() && !e.finish;
  if (empty && (!chat || role_sent_[e.index])) return "";
  Json chunk = Envelope();
  chunk["object"] = chat ? "chat.completion.chunk" : "text_completion";
  Json choice;
  choice["index"] = e.index;
  if (chat) {
    Json delta = Json::object();
    if (!role_sent_[e.index]) {
      delta["role"] = "assistant";
      role_sent_[e.index] = true;
    }
    if (!e.reasoning.empty()) delta["reasoning_content"] = e.reasoning;
    if (!e.content.empty()) delta["content"] = e.content;
    if (!e.tool_calls.empty()) {
      Json calls = Json::array();
      for (const ToolCallOut& c : e.tool_calls) calls.push_back(ToolCallJson(c, tool_calls_sent_[e.index]++));
      delta["tool_calls"] = calls;
    }
    choice["delta"] = delta;
  } else {
    choice["text"] = e.content;
  }
  choice["logprobs"] = e.logprobs.empty() ? Json(nullptr) : LogprobsJson(endpoint_, e.logprobs);
  choice["finish_reason"] = e.finish ? Json(FinishName(*e.finish)) : Json(nullptr);
  chunk["choices"] = Json::array({choice});
  return "data: " + Dump(chunk) + "\n\n";
}

namespace {

Json UsageJson(const UsageOut& u) {
  return Json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", u.cached_prompt_tokens}}},
              {"completion_tokens_details", {{"reasoning_tokens", u.reasoning_tokens}}}};
}

}  // namespace

std::string ResponseBuilder::StreamEnd(const UsageOut& usage, bool include_usage) {
  std::string out;
  if (include_usage) {
    Json chunk = Envelope();
    chunk["object"] = endpoint_ == Endpoint::kChatCompletions ? "chat.completion.chunk" : "text_completion";
    chunk["choices"] = Json::array();
    chunk["usage"] = UsageJson(usage);
    out = "data: " + Dump(chunk) + "\n\n";
  }
  return out + "data: [DONE]\n\n";
}

void ResponseBuilder::Accumulate(const ChoiceEvent& e) {
  Acc& a = acc_[e.index];
  a.content += e.content;
  a.reasoning += e.reasoning;
  a.tool_calls.insert(a.tool_calls.end(), e.tool_calls.begin(), e.tool_calls.end());
  a.logprobs.insert(a.logprobs.end(), e.logprobs.begin(), e.logprobs.end());
  if (e.finish) a.finish = e.finish;
}

std::string ResponseBuilder::Body(const UsageOut& usage) const {
  bool chat = endpoint_ == Endpoint::kChatCompletions;
  Json out = Envelope();
  out["object"] = chat ? "chat.completion" : "text_completion";
  Json choices = Json::array();
  for (size_t i = 0; i < acc_.size(); ++i) {
    const Acc& a = acc_[i];
    Json choice;
    choice["index"] = i;
    if (chat) {
      Json msg = {{"role", "assistant"},
                  {"content", a.content.empty() && !a.tool_calls.empty() ? Json(nullptr) : Json(a.content)}};
      if (!a.reasoning.empty()) msg["reasoning_content"] = a.reasoning;
      if (!a.tool_calls.empty()) {
        Json calls = Json::array();
        for (const ToolCallOut& c : a.tool_calls) calls.push_back(ToolCallJson(c, std::nullopt));
        msg["tool_calls"] = calls;
      }
      choice["message"] = msg;
    } else {
      choice["text"] = a.content;
    }
    choice["logprobs"] = a.logprobs.empty() ? Json(nullptr) : LogprobsJson(endpoint_, a.logprobs);
    choice["finish_reason"] = FinishName(a.finish.value_or(Finish::kStop));
    choices.push_back(choice);
  }
  out["choices"] = choices;
  out["usage"] = UsageJson(usage);
  return Dump(out);
}

}  // namespace v4serve::router
