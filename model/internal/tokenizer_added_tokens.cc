#include "model/internal/tokenizer_added_tokens.h"

#include <algorithm>
#include <cstring>

namespace v4serve::model::internal {

AddedTokenMatcher::AddedTokenMatcher(std::vector<std::pair<std::string, int32_t>> tokens)
    : tokens_(std::move(tokens)) {
  tokens_.erase(std::remove_if(tokens_.begin(), tokens_.end(), [](const auto& t) { return t.first.empty(); }),
                tokens_.end());
  std::stable_sort(tokens_.begin(), tokens_.end(), [](const auto& a, const auto& b) {
    const auto fa = static_cast<unsigned char>(a.first[0]);
    const auto fb = static_cast<unsigned char>(b.first[0]);
    if (fa != fb) return fa < fb;
    return a.first.size() > b.first.size();
  });
  size_t i = 0;
  for (int b = 0; b < 256; ++b) {
    first_byte_begin_[b] = static_cast<uint32_t>(i);
    while (i < tokens_.size() && static_cast<unsigned char>(tokens_[i].first[0]) == b) ++i;
  }
  first_byte_begin_[256] = static_cast<uint32_t>(tokens_.size());
}

bool AddedTokenMatcher::FindNext(std::string_view text, size_t from, Match& match) const {
  if (tokens_.empty()) return false;
  for (size_t pos = from; pos < text.size(); ++pos) {
    const auto b = static_cast<unsigned char>(text[pos]);
    const uint32_t lo = first_byte_begin_[b];
    const uint32_t hi = first_byte_begin_[b + 1];
    for (uint32_t k = lo; k < hi; ++k) {
      const std::string& tok = tokens_[k].first;
      if (tok.size() <= text.size() - pos && std::memcmp(text.data() + pos, tok.data(), tok.size()) == 0) {
        match = {pos, pos + tok.size(), tokens_[k].second};
        return true;
      }
    }
  }
  return false;
}

}  // namespace v4serve::model::internal
