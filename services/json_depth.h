// How deeply a JSON text nests, found without parsing it. Request data goes through nlohmann::json, whose
// parser and copies recurse once a level: a 400 KB body of 200k brackets overflowed the router's stack and
// took `v4serve up` down with it. Whoever parses request data first refuses texts that nest deeper than
// kMaxJsonDepth (tool schemas, the deepest legitimate request data, use a few dozen levels).
#ifndef V4SERVE_SERVICES_JSON_DEPTH_H_
#define V4SERVE_SERVICES_JSON_DEPTH_H_

#include <string_view>

namespace v4serve {

inline constexpr int kMaxJsonDepth = 128;

// True when no point of `text` lies inside more than `max_depth` arrays and objects together. Brackets in
// strings do not count; the text need not be valid JSON (the parser says what else is wrong).
inline bool JsonDepthWithin(std::string_view text, int max_depth = kMaxJsonDepth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (const char ch : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (ch == '\\') {
        escaped = true;
      } else if (ch == '"') {
        in_string = false;
      }
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > max_depth) return false;
    } else if ((ch == ']' || ch == '}') && depth > 0) {
      --depth;
    }
  }
  return true;
}

}  // namespace v4serve

#endif  // V4SERVE_SERVICES_JSON_DEPTH_H_
