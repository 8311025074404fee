#include "model/internal/chat_preprocess.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "model/internal/chat_py_json.h"
#include "services/json_depth.h"
#include "services/status_macros.h"

namespace v4serve::model::internal {
namespace {

const char* const kRoles[] = {"system", "user", "assistant", "tool", "developer", "latest_reminder"};
// The reference's tasks plus extracted_url, whose token V4's tokenizer has (docs/TOKENIZER.md).
const char* const kTasks[] = {"action", "query", "authority", "domain", "title", "read_url", "extracted_url"};

absl::Status Invalid(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

bool IsNullOrString(const ChatJson& v) { return v.is_null() || v.is_string(); }

absl::Status ValidateToolCalls(const ChatJson& calls, const std::string& path) {
  if (calls.is_null()) return absl::OkStatus();
  if (!calls.is_array()) return Invalid(path, "must be an array");
  for (size_t j = 0; j < calls.size(); ++j) {
    const ChatJson& call = calls[j];
    const std::string at = absl::StrCat(path, "[", j, "]");
    if (!call.is_object()) return Invalid(at, "must be an object");
    if (!IsNullOrString(Get(call, "id"))) return Invalid(at + ".id", "must be a string");
    const ChatJson& function = Get(call, "function");
    if (!function.is_object()) return Invalid(at + ".function", "must be an object with name and arguments");
    if (!Get(function, "name").is_string()) return Invalid(at + ".function.name", "must be a string");
    const ChatJson& arguments = Get(function, "arguments");
    if (!arguments.is_string())
      return Invalid(at + ".function.arguments", "must be a string holding a JSON object");
    const std::string& text = arguments.get_ref<const std::string&>();
    if (!JsonDepthWithin(text)) {
      return Invalid(at + ".function.arguments",
                     absl::StrCat("nests deeper than ", kMaxJsonDepth, " levels"));
    }
    const ChatJson parsed = ChatJson::parse(text, nullptr, false);
    // nlohmann stops at a NUL byte; a JSON text never contains one.
    if (parsed.is_discarded() || text.find('\0') != std::string::npos) {
      return Invalid(at + ".function.arguments", "is not valid JSON");
    }
    if (!parsed.is_object()) return Invalid(at + ".function.arguments", "is not a JSON object");
  }
  return absl::OkStatus();
}

absl::Status ValidateToolContent(const ChatJson& content, const std::string& path) {
  if (content.is_string()) return absl::OkStatus();
  if (!content.is_array()) return Invalid(path, "must be a string or an array of content parts");
  for (size_t j = 0; j < content.size(); ++j) {
    const ChatJson& part = content[j];
    const std::string at = absl::StrCat(path, "[", j, "]");
    if (!part.is_object() || !Get(part, "type").is_string())
      return Invalid(at, "must be an object with a type");
    if (Get(part, "type") == "text" && !IsNullOrString(Get(part, "text"))) {
      return Invalid(at + ".text", "must be a string");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateMessage(const ChatJson& msg, const std::string& at) {
  if (!msg.is_object()) return Invalid(at, "must be an object");
  const ChatJson& role = Get(msg, "role");
  if (!role.is_string()) return Invalid(at + ".role", "missing or not a string");
  const std::string& r = role.get_ref<const std::string&>();
  if (std::find(std::begin(kRoles), std::end(kRoles), r) == std::end(kRoles)) {
    return Invalid(at + ".role",
                   absl::StrCat("unknown role '", r,
                                "' (expected system, user, assistant, tool, developer or latest_reminder)"));
  }
  const ChatJson& content = Get(msg, "content");
  if (r == "tool") {
    RETURN_IF_ERROR(ValidateToolContent(content, at + ".content"));
  } else if (r == "user" || r == "latest_reminder") {
    if (!content.is_string())
      return Invalid(at + ".content", absl::StrCat("must be a string for role '", r, "'"));
  } else if (r == "developer") {
    if (!content.is_string() || content.get_ref<const std::string&>().empty())
      return Invalid(at + ".content", "must be a non-empty string");
  } else if (!IsNullOrString(content)) {
    return Invalid(at + ".content", absl::StrCat("must be a string or null for role '", r, "'"));
  }
  if (!IsNullOrString(Get(msg, "reasoning_content")))
    return Invalid(at + ".reasoning_content", "must be a string");
  if (!IsNullOrString(Get(msg, "tool_call_id"))) return Invalid(at + ".tool_call_id", "must be a string");
  const ChatJson& wo_eos = Get(msg, "wo_eos");
  if (!wo_eos.is_null() && !wo_eos.is_boolean()) return Invalid(at + ".wo_eos", "must be a boolean");
  const ChatJson& task = Get(msg, "task");
  if (!task.is_null()) {
    if (!task.is_string() ||
        std::find(std::begin(kTasks), std::end(kTasks), task.get<std::string>()) == std::end(kTasks)) {
      return Invalid(
          at + ".task",
          absl::StrCat("unknown task ", task.dump(),
                       " (expected action, query, authority, domain, title, read_url or extracted_url)"));
    }
  }
  RETURN_IF_ERROR(ValidateTools(Get(msg, "tools"), at + ".tools"));
  return ValidateToolCalls(Get(msg, "tool_calls"), at + ".tool_calls");
}

}  // namespace

const ChatJson& Get(const ChatJson& object, const char* key) {
  static const ChatJson kNull;
  if (!object.is_object()) return kNull;
  auto it = object.find(key);
  return it == object.end() ? kNull : *it;
}

bool RoleIs(const ChatJson& message, const char* role) {
  const ChatJson& r = Get(message, "role");
  return r.is_string() && r.get_ref<const std::string&>() == role;
}

absl::Status ValidateTools(const ChatJson& tools, const std::string& path) {
  if (tools.is_null()) return absl::OkStatus();
  if (!tools.is_array()) return Invalid(path, "must be an array");
  for (size_t j = 0; j < tools.size(); ++j) {
    const std::string at = absl::StrCat(path, "[", j, "]");
    if (!tools[j].is_object()) return Invalid(at, "must be an object");
    const ChatJson& function = Get(tools[j], "function");
    if (!function.is_object()) return Invalid(at + ".function", "missing or not an object");
    if (!Get(function, "name").is_string()) return Invalid(at + ".function.name", "missing or not a string");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<ChatJson>> JoinTextParts(const ChatJson& messages) {
  auto has_parts = [](const ChatJson& m) { return !RoleIs(m, "tool") && Get(m, "content").is_array(); };
  if (!messages.is_array() || std::none_of(messages.begin(), messages.end(), has_parts)) return std::nullopt;
  ChatJson out = messages;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!has_parts(out[i])) continue;
    const ChatJson& parts = out[i]["content"];
    std::string text;
    for (size_t j = 0; j < parts.size(); ++j) {
      const std::string at = absl::StrCat("messages[", i, "].content[", j, "]");
      const ChatJson& type = Get(parts[j], "type");
      if (!type.is_string()) return Invalid(at, "must be an object with a type");
      if (type != "text") {
        return Invalid(at + ".type", absl::StrCat("content parts of type ", type.dump(),
                                                  " are not supported (this model reads text only)"));
      }
      const ChatJson& part_text = Get(parts[j], "text");
      if (!part_text.is_string()) return Invalid(at + ".text", "must be a string");
      if (j > 0) text += "\n";
      text += part_text.get_ref<const std::string&>();
    }
    out[i]["content"] = std::move(text);
  }
  return out;
}

absl::Status ValidateMessages(const ChatJson& messages) {
  if (!messages.is_array()) return Invalid("messages", "must be an array");
  for (size_t i = 0; i < messages.size(); ++i) {
    RETURN_IF_ERROR(ValidateMessage(messages[i], absl::StrCat("messages[", i, "]")));
  }
  return absl::OkStatus();
}

std::vector<ChatJson> MergeToolMessages(const std::vector<ChatJson>& messages) {
  std::vector<ChatJson> merged;
  auto last_is_user_with_blocks = [&] {
    return !merged.empty() && RoleIs(merged.back(), "user") && merged.back().contains("content_blocks");
  };
  for (const ChatJson& msg : messages) {
    if (RoleIs(msg, "tool")) {
      ChatJson block = {{"type", "tool_result"}};
      const ChatJson& id = Get(msg, "tool_call_id");
      block["tool_use_id"] = id.is_null() ? ChatJson("") : id;
      block["content"] = Get(msg, "content");
      if (last_is_user_with_blocks()) {
        merged.back()["content_blocks"].push_back(std::move(block));
      } else {
        merged.push_back({{"role", "user"}, {"content_blocks", ChatJson::array({std::move(block)})}});
      }
    } else if (RoleIs(msg, "user")) {
      const ChatJson text_block = {{"type", "text"}, {"text", Get(msg, "content")}};
      if (last_is_user_with_blocks() && Get(merged.back(), "task").is_null()) {
        merged.back()["content_blocks"].push_back(text_block);
      } else {
        ChatJson new_msg = {{"role", "user"}, {"content", Get(msg, "content")}};
        new_msg["content_blocks"] = ChatJson::array({text_block});
        for (const char* key : {"task", "wo_eos", "mask"}) {
          if (msg.contains(key)) new_msg[key] = msg[key];
        }
        merged.push_back(std::move(new_msg));
      }
    } else {
      merged.push_back(msg);
    }
  }
  return merged;
}

void SortToolResultsByCallOrder(std::vector<ChatJson>& messages) {
  absl::flat_hash_map<std::string, int> order;
  for (ChatJson& msg : messages) {
    if (RoleIs(msg, "assistant") && PyTruthy(Get(msg, "tool_calls"))) {
      order.clear();
      int idx = 0;
      for (const ChatJson& call : msg["tool_calls"]) {
        ChatJson id = Get(call, "id");
        if (!PyTruthy(id)) id = Get(Get(call, "function"), "id");
        if (id.is_string() && !id.empty()) order[id.get<std::string>()] = idx;
        ++idx;
      }
    } else if (RoleIs(msg, "user") && PyTruthy(Get(msg, "content_blocks"))) {
      ChatJson& blocks = msg["content_blocks"];
      std::vector<ChatJson> tool_blocks;
      for (const ChatJson& b : blocks) {
        if (Get(b, "type") == "tool_result") tool_blocks.push_back(b);
      }
      if (tool_blocks.size() <= 1 || order.empty()) continue;
      auto rank = [&](const ChatJson& b) {
        const ChatJson& id = Get(b, "tool_use_id");
        if (!id.is_string()) return 0;
        auto it = order.find(id.get<std::string>());
        return it == order.end() ? 0 : it->second;
      };
      std::stable_sort(tool_blocks.begin(), tool_blocks.end(),
                       [&](const ChatJson& a, const ChatJson& b) { return rank(a) < rank(b); });
      size_t next = 0;
      for (ChatJson& b : blocks) {
        if (Get(b, "type") == "tool_result") b = tool_blocks[next++];
      }
    }
  }
}

int FindLastUserIndex(const std::vector<ChatJson>& messages) {
  for (int i = static_cast<int>(messages.size()) - 1; i >= 0; --i) {
    if (RoleIs(messages[i], "user") || RoleIs(messages[i], "developer")) return i;
  }
  return -1;
}

std::vector<ChatJson> DropThinkingMessages(const std::vector<ChatJson>& messages) {
  const int last_user = FindLastUserIndex(messages);
  std::vector<ChatJson> result;
  for (int i = 0; i < static_cast<int>(messages.size()); ++i) {
    const ChatJson& msg = messages[i];
    const bool keep_role =
        RoleIs(msg, "user") || RoleIs(msg, "system") || RoleIs(msg, "tool") || RoleIs(msg, "latest_reminder");
    if (keep_role || i >= last_user) {
      result.push_back(msg);
    } else if (RoleIs(msg, "assistant")) {
      ChatJson copy = msg;
      copy.erase("reasoning_content");
      result.push_back(std::move(copy));
    }
  }
  return result;
}

}  // namespace v4serve::model::internal
