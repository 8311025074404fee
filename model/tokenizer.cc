#include "model/tokenizer.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "model/internal/tokenizer_added_tokens.h"
#include "model/internal/tokenizer_bpe.h"
#include "model/internal/tokenizer_pretokenizer.h"
#include "model/internal/tokenizer_unicode.h"

namespace v4serve::model {
namespace {
constexpr uint8_t kExists = 1;
constexpr uint8_t kSpecial = 2;
}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

void Tokenizer::EncodeOrdinaryValid(std::string_view text, std::vector<TokenId>& out) const {
  if (text.empty()) return;
  // Piece offsets are 32-bit: cut (far) oversized input at character boundaries so it stays memory-safe.
  constexpr size_t kMaxChunk = size_t{1} << 30;
  while (text.size() > kMaxChunk) {
    size_t cut = kMaxChunk;
    while ((static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
    EncodeOrdinaryValid(text.substr(0, cut), out);
    text.remove_prefix(cut);
  }
  thread_local internal::PreTokenizerScratch scratch;
  thread_local std::vector<internal::PieceSpan> pieces;
  internal::PreTokenize(text, scratch, pieces);
  for (const internal::PieceSpan& piece : pieces) {
    bpe_->EncodePiece(text.substr(piece.begin, piece.end - piece.begin), out);
  }
}

void Tokenizer::EncodeValid(std::string_view text, std::vector<TokenId>& out) const {
  // HF splits on added tokens with normalized=false first, then on the normalized ones in what is left.
  auto split_normalized = [&](std::string_view part) {
    size_t pos = 0;
    internal::AddedTokenMatcher::Match m;
    while (normalized_matcher_->FindNext(part, pos, m)) {
      EncodeOrdinaryValid(part.substr(pos, m.begin - pos), out);
      out.push_back(m.id);
      pos = m.end;
    }
    EncodeOrdinaryValid(part.substr(pos), out);
  };
  size_t pos = 0;
  internal::AddedTokenMatcher::Match m;
  while (non_normalized_matcher_->FindNext(text, pos, m)) {
    split_normalized(text.substr(pos, m.begin - pos));
    out.push_back(m.id);
    pos = m.end;
  }
  split_normalized(text.substr(pos));
}

std::vector<TokenId> Tokenizer::Encode(std::string_view text) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 4);
  if (internal::ValidUtf8Prefix(text) == text.size()) {
    EncodeValid(text, out);
  } else {
    std::string clean;
    internal::AppendUtf8Lossy(text, clean);
    EncodeValid(clean, out);
  }
  return out;
}

std::vector<TokenId> Tokenizer::EncodeOrdinary(std::string_view text) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 4);
  if (internal::ValidUtf8Prefix(text) == text.size()) {
    EncodeOrdinaryValid(text, out);
  } else {
    std::string clean;
    internal::AppendUtf8Lossy(text, clean);
    EncodeOrdinaryValid(clean, out);
  }
  return out;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const TokenId> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (size_t i = 0; i < ids.size(); ++i) {
    const TokenId id = ids[i];
    if (id < 0 || id >= vocab_size() || !(id_flags_[id] & kExists)) {
      return absl::InvalidArgumentError(absl::StrCat("ids[", i, "]: unknown token id ", id));
    }
    if (skip_special_tokens && (id_flags_[id] & kSpecial)) continue;
    bytes += token_bytes_[id];
  }
  std::string text;
  internal::AppendUtf8Lossy(bytes, text);
  return text;
}

const std::string* Tokenizer::TokenBytes(TokenId id) const {
  if (id < 0 || id >= vocab_size() || !(id_flags_[id] & kExists)) return nullptr;
  return &token_bytes_[id];
}

std::optional<TokenId> Tokenizer::TokenToId(std::string_view token) const {
  auto it = token_to_id_.find(absl::string_view(token.data(), token.size()));
  if (it == token_to_id_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(TokenId id) const {
  return id >= 0 && id < vocab_size() && (id_flags_[id] & kSpecial);
}

}  // namespace v4serve::model
