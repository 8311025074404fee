#include "model/internal/chat_py_json.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>

#include "model/internal/tokenizer_unicode.h"

namespace v4serve::model::internal {
namespace {

// Python's float repr: shortest round-trip digits; fixed notation when -4 < decpt <= 16, where the value
// is 0.DIGITS x 10^decpt, else d.ddde±XX.
void AppendPyFloat(double x, std::string& out) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. "-2.5e-01"
  std::string sign;
  if (!sci.empty() && sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  const int exp10 = std::atoi(sci.c_str() + e + 1);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int decpt = exp10 + 1;
  out += sign;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0.";
      out.append(static_cast<size_t>(-decpt), '0');
      out += digits;
    } else if (static_cast<size_t>(decpt) >= digits.size()) {
      out += digits;
      out.append(static_cast<size_t>(decpt) - digits.size(), '0');
      out += ".0";
    } else {
      out += digits.substr(0, decpt);
      out += '.';
      out += digits.substr(decpt);
    }
    return;
  }
  out += digits[0];
  if (digits.size() > 1) {
    out += '.';
    out += digits.substr(1);
  }
  char exp_buf[16];
  std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
  out += exp_buf;
}

}  // namespace

void AppendPyJsonString(std::string_view s, std::string& out) {
  std::string clean;
  if (ValidUtf8Prefix(s) != s.size()) {  // never emit invalid JSON, even for text the model garbled
    AppendUtf8Lossy(s, clean);
    s = clean;
  }
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

void AppendPyJson(const nlohmann::ordered_json& value, std::string& out) {
  using Type = nlohmann::ordered_json::value_t;
  switch (value.type()) {
    case Type::null:
    case Type::discarded:
      out += "null";
      return;
    case Type::boolean:
      out += value.get<bool>() ? "true" : "false";
      return;
    case Type::number_integer:
      out += std::to_string(value.get<int64_t>());
      return;
    case Type::number_unsigned:
      out += std::to_string(value.get<uint64_t>());
      return;
    case Type::number_float:
      AppendPyFloat(value.get<double>(), out);
      return;
    case Type::string:
      AppendPyJsonString(value.get_ref<const std::string&>(), out);
      return;
    case Type::array: {
      out += '[';
      bool first = true;
      for (const auto& item : value) {
        if (!first) out += ", ";
        first = false;
        AppendPyJson(item, out);
      }
      out += ']';
      return;
    }
    case Type::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : value.items()) {
        if (!first) out += ", ";
        first = false;
        AppendPyJsonString(key, out);
        out += ": ";
        AppendPyJson(item, out);
      }
      out += '}';
      return;
    }
    case Type::binary:
      out += "null";
      return;
  }
}

std::string PyJsonDumps(const nlohmann::ordered_json& value) {
  std::string out;
  AppendPyJson(value, out);
  return out;
}

bool PyTruthy(const nlohmann::ordered_json& value) {
  using Type = nlohmann::ordered_json::value_t;
  switch (value.type()) {
    case Type::null:
    case Type::discarded:
      return false;
    case Type::boolean:
      return value.get<bool>();
    case Type::number_integer:
      return value.get<int64_t>() != 0;
    case Type::number_unsigned:
      return value.get<uint64_t>() != 0;
    case Type::number_float:
      return value.get<double>() != 0.0;
    case Type::string:
      return !value.get_ref<const std::string&>().empty();
    case Type::array:
    case Type::object:
      return !value.empty();
    case Type::binary:
      return true;
  }
  return false;
}

}  // namespace v4serve::model::internal
