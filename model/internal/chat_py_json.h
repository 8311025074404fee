// Python-compatible JSON helpers for the chat encoding (internal to v4serve_model).
//
// DeepSeek's reference encoder serializes tool schemas and tool-call arguments with Python's
// json.dumps(value, ensure_ascii=False) and tests values with Python truthiness; byte-identical prompts
// need both reproduced exactly. Stateless and thread-safe.
#ifndef V4SERVE_MODEL_INTERNAL_CHAT_PY_JSON_H_
#define V4SERVE_MODEL_INTERNAL_CHAT_PY_JSON_H_

#include <string>

#include "nlohmann/json.hpp"

namespace v4serve::model::internal {

// json.dumps(value, ensure_ascii=False): ", " and ": " separators, non-ASCII kept, floats as Python's
// repr (shortest round-trip; exponent form below 1e-4 and from 1e16). Object keys keep their order.
std::string PyJsonDumps(const nlohmann::ordered_json& value);
void AppendPyJson(const nlohmann::ordered_json& value, std::string& out);
// json.dumps of a string (ill-formed UTF-8 is replaced by U+FFFD so the output is always valid JSON).
void AppendPyJsonString(std::string_view s, std::string& out);

// Python's bool(value): null, false, 0, 0.0, "", [] and {} are false.
bool PyTruthy(const nlohmann::ordered_json& value);

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_CHAT_PY_JSON_H_
