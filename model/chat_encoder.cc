#include "model/chat_encoder.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/internal/chat_preprocess.h"
#include "model/internal/chat_py_json.h"
#include "services/status_macros.h"

namespace v4serve::model {
namespace {

using internal::ChatJson;
using internal::Get;
using internal::PyJsonDumps;
using internal::PyTruthy;
using internal::RoleIs;

constexpr char kBos[] = "<｜begin▁of▁sentence｜>";
constexpr char kEos[] = "<｜end▁of▁sentence｜>";
constexpr char kThinkStart[] = "<think>";
constexpr char kThinkEnd[] = "</think>";
constexpr char kDsml[] = "｜DSML｜";
constexpr char kUser[] = "<｜User｜>";
constexpr char kAssistant[] = "<｜Assistant｜>";
constexpr char kLatestReminder[] = "<｜latest_reminder｜>";

constexpr char kReasoningEffortMax[] =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

const char* TaskToken(const std::string& task) {
  if (task == "action") return "<｜action｜>";
  if (task == "query") return "<｜query｜>";
  if (task == "authority") return "<｜authority｜>";
  if (task == "domain") return "<｜domain｜>";
  if (task == "title") return "<｜title｜>";
  if (task == "extracted_url") return "<｜extracted_url｜>";
  return "<｜read_url｜>";  // "read_url"; ValidateMessages rejected anything else
}

std::string StrOrEmpty(const ChatJson& v) { return v.is_string() ? v.get<std::string>() : std::string(); }

std::string RenderTools(const ChatJson& tools) {
  std::vector<std::string> schemas;
  for (const ChatJson& tool : tools) schemas.push_back(PyJsonDumps(tool["function"]));
  const std::string d = kDsml;
  return absl::StrCat(
      "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke "
      "tools by "
      "writing a \"<",
      d, "tool_calls>\" block like the following:\n\n<", d, "tool_calls>\n<", d,
      "invoke name=\"$TOOL_NAME\">\n<", d,
      "parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</", d, "parameter>\n...\n</",
      d, "invoke>\n<", d, "invoke name=\"$TOOL_NAME2\">\n...\n</", d, "invoke>\n</", d,
      "tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other "
      "types "
      "(numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
      "If thinking_mode is enabled (triggered by ",
      kThinkStart, "), you MUST output your complete reasoning inside ", kThinkStart, "...", kThinkEnd,
      " BEFORE any tool calls or final response.\n\nOtherwise, output directly after ", kThinkEnd,
      " with tool calls or final response.\n\n### Available Tool Schemas\n\n", absl::StrJoin(schemas, "\n"),
      "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
      "calls.\n");
}

std::string RenderResponseFormat(const ChatJson& format) {
  return absl::StrCat("## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n",
                      PyJsonDumps(format));
}

// encode_arguments_to_dsml: one parameter line per top-level argument, strings raw, others as JSON.
std::string RenderArguments(const ChatJson& function) {
  const ChatJson args = ChatJson::parse(function["arguments"].get_ref<const std::string&>(), nullptr, false);
  std::vector<std::string> lines;
  for (const auto& [key, value] : args.items()) {
    lines.push_back(absl::StrCat(
        "<", kDsml, "parameter name=\"", key, "\" string=\"", value.is_string() ? "true" : "false", "\">",
        value.is_string() ? value.get<std::string>() : PyJsonDumps(value), "</", kDsml, "parameter>"));
  }
  return absl::StrJoin(lines, "\n");
}

std::string RenderToolCalls(const ChatJson& tool_calls) {
  std::vector<std::string> invokes;
  for (const ChatJson& call : tool_calls) {
    const ChatJson& function = call["function"];
    invokes.push_back(absl::StrCat("<", kDsml, "invoke name=\"", function["name"].get<std::string>(), "\">\n",
                                   RenderArguments(function), "\n</", kDsml, "invoke>"));
  }
  return absl::StrCat("\n\n<", kDsml, "tool_calls>\n", absl::StrJoin(invokes, "\n"), "\n</", kDsml,
                      "tool_calls>");
}

std::string RenderUserBlocks(const ChatJson& blocks) {
  std::vector<std::string> parts;
  for (const ChatJson& block : blocks) {
    const ChatJson& type = Get(block, "type");
    if (type == "text") {
      parts.push_back(StrOrEmpty(Get(block, "text")));
    } else if (type == "tool_result") {
      const ChatJson& content = Get(block, "content");
      std::string text;
      if (content.is_array()) {
        std::vector<std::string> texts;
        for (const ChatJson& part : content) {
          texts.push_back(Get(part, "type") == "text"
                              ? StrOrEmpty(Get(part, "text"))
                              : absl::StrCat("[Unsupported ", StrOrEmpty(Get(part, "type")), "]"));
        }
        text = absl::StrJoin(texts, "\n\n");
      } else {
        text = StrOrEmpty(content);
      }
      parts.push_back(absl::StrCat("<tool_result>", text, "</tool_result>"));
    } else {
      parts.push_back(absl::StrCat("[Unsupported ", StrOrEmpty(type), "]"));
    }
  }
  return absl::StrJoin(parts, "\n\n");
}

// render_message of the reference for messages[index].
std::string RenderMessage(size_t index, const std::vector<ChatJson>& messages,
                          const ChatEncodeOptions& options, bool drop_thinking) {
  const bool thinking = options.thinking_mode == ThinkingMode::kThinking;
  const ChatJson& msg = messages[index];
  const int last_user = internal::FindLastUserIndex(messages);
  const std::string role = Get(msg, "role").get<std::string>();
  const ChatJson& tools = Get(msg, "tools");
  const ChatJson& response_format = Get(msg, "response_format");
  std::string prompt;
  if (index == 0 && thinking && options.reasoning_effort == ReasoningEffort::kMax)
    prompt += kReasoningEffortMax;

  if (role == "system" || role == "developer") {
    if (role == "developer") prompt += kUser;
    prompt += StrOrEmpty(Get(msg, "content"));
    if (PyTruthy(tools)) absl::StrAppend(&prompt, "\n\n", RenderTools(tools));
    if (PyTruthy(response_format)) absl::StrAppend(&prompt, "\n\n", RenderResponseFormat(response_format));
  } else if (role == "user") {
    prompt += kUser;
    const ChatJson& blocks = Get(msg, "content_blocks");
    prompt += PyTruthy(blocks) ? RenderUserBlocks(blocks) : StrOrEmpty(Get(msg, "content"));
  } else if (role == "latest_reminder") {
    absl::StrAppend(&prompt, kLatestReminder, StrOrEmpty(Get(msg, "content")));
  } else {  // assistant (tool messages were merged into user messages)
    const ChatJson& tool_calls = Get(msg, "tool_calls");
    const std::string tc_content = PyTruthy(tool_calls) ? RenderToolCalls(tool_calls) : "";
    const bool prev_has_task = index >= 1 && !Get(messages[index - 1], "task").is_null();
    std::string thinking_part;
    if (thinking && !prev_has_task && (!drop_thinking || static_cast<int>(index) > last_user)) {
      thinking_part = StrOrEmpty(Get(msg, "reasoning_content")) + kThinkEnd;
    }
    absl::StrAppend(&prompt, thinking_part, StrOrEmpty(Get(msg, "content")), tc_content);
    if (!PyTruthy(Get(msg, "wo_eos"))) prompt += kEos;
  }

  // What follows the message: nothing before a user/system/developer turn, else the generation prompt.
  if (index + 1 < messages.size() && !RoleIs(messages[index + 1], "assistant") &&
      !RoleIs(messages[index + 1], "latest_reminder")) {
    return prompt;
  }
  const ChatJson& task = Get(msg, "task");
  if (!task.is_null()) {
    const std::string t = task.get<std::string>();
    if (t != "action") {
      prompt += TaskToken(t);
    } else {
      absl::StrAppend(&prompt, kAssistant, thinking ? kThinkStart : kThinkEnd, TaskToken(t));
    }
  } else if (role == "user" || role == "developer") {
    const bool open_thinking = thinking && (!drop_thinking || static_cast<int>(index) >= last_user);
    absl::StrAppend(&prompt, kAssistant, open_thinking ? kThinkStart : kThinkEnd);
  }
  return prompt;
}

}  // namespace

absl::StatusOr<std::string> RenderChatPrompt(const ChatJson& messages, const ChatJson& tools,
                                             const ChatEncodeOptions& options) {
  ASSIGN_OR_RETURN(const std::optional<ChatJson> joined, internal::JoinTextParts(messages));
  const ChatJson& msgs = joined ? *joined : messages;
  RETURN_IF_ERROR(internal::ValidateMessages(msgs));
  RETURN_IF_ERROR(internal::ValidateTools(tools, "tools"));
  std::vector<ChatJson> list(msgs.begin(), msgs.end());
  if (PyTruthy(tools)) {
    if (!list.empty() && (RoleIs(list[0], "system") || RoleIs(list[0], "developer"))) {
      if (PyTruthy(Get(list[0], "tools"))) {
        return absl::InvalidArgumentError("tools: given both in the request and on messages[0]");
      }
      list[0]["tools"] = tools;
    } else {
      list.insert(list.begin(), ChatJson{{"role", "system"}, {"content", ""}, {"tools", tools}});
    }
  }
  list = internal::MergeToolMessages(list);
  internal::SortToolResultsByCallOrder(list);
  bool drop_thinking = options.drop_thinking;
  for (const ChatJson& m : list) {
    if (PyTruthy(Get(m, "tools"))) drop_thinking = false;
  }
  if (options.thinking_mode == ThinkingMode::kThinking && drop_thinking) {
    list = internal::DropThinkingMessages(list);
  }
  std::string prompt = options.add_bos ? kBos : "";
  for (size_t i = 0; i < list.size(); ++i) prompt += RenderMessage(i, list, options, drop_thinking);
  return prompt;
}

absl::StatusOr<ChatEncoder::Prompt> ChatEncoder::Encode(const ChatJson& messages, const ChatJson& tools,
                                                        const ChatEncodeOptions& options) const {
  Prompt prompt;
  ASSIGN_OR_RETURN(prompt.text, RenderChatPrompt(messages, tools, options));
  prompt.ids = tokenizer_.Encode(prompt.text);
  return prompt;
}

}  // namespace v4serve::model
