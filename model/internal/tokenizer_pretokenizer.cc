#include "model/internal/tokenizer_pretokenizer.h"

#include "model/internal/tokenizer_unicode.h"

namespace v4serve::model::internal {
namespace {

// Extra per-code-point bits beyond UnicodeFlag.
constexpr uint16_t kCrLf = 1 << 8;         // [\r\n]
constexpr uint16_t kSpace = 1 << 9;        // U+0020
constexpr uint16_t kAsciiPunct = 1 << 10;  // [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]
constexpr uint16_t kAsciiAlpha = 1 << 11;  // [A-Za-z]
constexpr uint16_t kLetterOrMark = kLetter | kMark;
constexpr uint16_t kPunctOrSymbol = kPunct | kSymbol;

uint16_t AsciiFlags(unsigned char c) {
  uint16_t f = CodepointFlags(c);
  if (c == '\r' || c == '\n') f |= kCrLf;
  if (c == ' ') f |= kSpace;
  if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) f |= kAsciiAlpha;
  if ((c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
      (c >= 0x7B && c <= 0x7E)) {
    f |= kAsciiPunct;
  }
  return f;
}

struct AsciiTable {
  uint16_t flags[128];
  AsciiTable() {
    for (int c = 0; c < 128; ++c) flags[c] = AsciiFlags(static_cast<unsigned char>(c));
  }
};
const AsciiTable kAscii;

// Length (in code points) of the regex-3 match at `p` within a piece ending at `e`, or 0.
size_t MatchAt(const uint16_t* f, size_t p, size_t e) {
  const uint16_t c = f[p];
  // [punct][A-Za-z]+
  if ((c & kAsciiPunct) && p + 1 < e && (f[p + 1] & kAsciiAlpha)) {
    size_t q = p + 2;
    while (q < e && (f[q] & kAsciiAlpha)) ++q;
    return q - p;
  }
  // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
  const bool optional_prefix = (c & (kCrLf | kLetter | kPunct | kSymbol)) == 0;
  if ((optional_prefix && p + 1 < e && (f[p + 1] & kLetterOrMark)) || (c & kLetterOrMark)) {
    size_t q = p + 1;
    while (q < e && (f[q] & kLetterOrMark)) ++q;
    return q - p;
  }
  //  ?[\p{P}\p{S}]+[\r\n]*
  if (((c & kSpace) && p + 1 < e && (f[p + 1] & kPunctOrSymbol)) || (c & kPunctOrSymbol)) {
    size_t q = p + 1;
    while (q < e && (f[q] & kPunctOrSymbol)) ++q;
    while (q < e && (f[q] & kCrLf)) ++q;
    return q - p;
  }
  if (!(c & kWhiteSpace)) return 0;
  size_t ws_end = p + 1;
  size_t last_crlf = (c & kCrLf) ? p : SIZE_MAX;
  while (ws_end < e && (f[ws_end] & kWhiteSpace)) {
    if (f[ws_end] & kCrLf) last_crlf = ws_end;
    ++ws_end;
  }
  // \s*[\r\n]+ : backtracks to the last line break of the whitespace run.
  if (last_crlf != SIZE_MAX) return last_crlf + 1 - p;
  // \s+(?!\S) : all of the run at the end of the piece, else all but its last character.
  if (ws_end == e) return ws_end - p;
  if (ws_end - p >= 2) return ws_end - 1 - p;
  // \s+
  return ws_end - p;
}

// Regex 3 over code points [s, e) of one piece left by splits 1 and 2.
void SplitSegment(const uint16_t* f, const uint32_t* off, size_t s, size_t e, std::vector<PieceSpan>& out) {
  size_t gap = s;
  size_t p = s;
  while (p < e) {
    const size_t m = MatchAt(f, p, e);
    if (m == 0) {
      ++p;
      continue;
    }
    if (gap < p) out.push_back({off[gap], off[p]});
    out.push_back({off[p], off[p + m]});
    p += m;
    gap = p;
  }
  if (gap < e) out.push_back({off[gap], off[e]});
}

}  // namespace

void PreTokenize(std::string_view text, PreTokenizerScratch& scratch, std::vector<PieceSpan>& pieces) {
  pieces.clear();
  auto& flags = scratch.flags;
  auto& offsets = scratch.offsets;
  flags.clear();
  offsets.clear();
  flags.reserve(text.size() + 1);
  offsets.reserve(text.size() + 1);
  for (size_t pos = 0; pos < text.size();) {
    const auto b = static_cast<unsigned char>(text[pos]);
    offsets.push_back(static_cast<uint32_t>(pos));
    if (b < 0x80) {
      flags.push_back(kAscii.flags[b]);
      ++pos;
      continue;
    }
    size_t len;
    const char32_t cp = DecodeUtf8At(text, pos, len);
    flags.push_back(CodepointFlags(cp));
    pos += len;
  }
  const size_t n = flags.size();
  offsets.push_back(static_cast<uint32_t>(text.size()));
  flags.push_back(0);
  const uint16_t* f = flags.data();
  const uint32_t* off = offsets.data();
  size_t i = 0;
  while (i < n) {
    if (f[i] & kNumber) {  // \p{N}{1,3}
      size_t j = i + 1;
      while (j < n && j - i < 3 && (f[j] & kNumber)) ++j;
      pieces.push_back({off[i], off[j]});
      i = j;
    } else if (f[i] & kCjk) {  // [一-龥぀-ゟ゠-ヿ]+
      size_t j = i + 1;
      while (j < n && (f[j] & kCjk)) ++j;
      pieces.push_back({off[i], off[j]});
      i = j;
    } else {
      size_t j = i + 1;
      while (j < n && !(f[j] & (kNumber | kCjk))) ++j;
      SplitSegment(f, off, i, j, pieces);
      i = j;
    }
  }
}

}  // namespace v4serve::model::internal
