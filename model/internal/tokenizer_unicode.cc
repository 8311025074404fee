#include "model/internal/tokenizer_unicode.h"

namespace v4serve::model::internal {

Utf8Scan ScanUtf8(std::string_view s, size_t pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + pos;
  const size_t n = s.size() - pos;
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return {Utf8Scan::kValid, 1};
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // Allowed range of the second byte.
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {Utf8Scan::kInvalid, 1};
  }
  for (size_t i = 1; i < need; ++i) {
    if (i >= n) return {Utf8Scan::kTruncated, i};
    const unsigned char b = p[i];
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {Utf8Scan::kInvalid, i};
  }
  return {Utf8Scan::kValid, need};
}

size_t ValidUtf8Prefix(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    if (static_cast<unsigned char>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const Utf8Scan scan = ScanUtf8(s, pos);
    if (scan.kind != Utf8Scan::kValid) break;
    pos += scan.length;
  }
  return pos;
}

bool AppendUtf8Lossy(std::string_view s, std::string& out) {
  size_t valid = ValidUtf8Prefix(s);
  if (valid == s.size()) {
    out.append(s);
    return true;
  }
  size_t pos = 0;
  while (pos < s.size()) {
    out.append(s.substr(pos, valid));
    pos += valid;
    if (pos == s.size()) break;
    const Utf8Scan scan = ScanUtf8(s, pos);  // kInvalid or kTruncated: one replacement either way.
    out.append("\xEF\xBF\xBD");
    pos += scan.length;
    valid = ValidUtf8Prefix(s.substr(pos));
  }
  return false;
}

}  // namespace v4serve::model::internal
