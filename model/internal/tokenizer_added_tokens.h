// Finds added tokens (e.g. "<｜User｜>") in text, leftmost-longest like HF tokenizers' AddedVocabulary
// (internal to v4serve_model). Immutable after construction; thread-safe.
#ifndef V4SERVE_MODEL_INTERNAL_TOKENIZER_ADDED_TOKENS_H_
#define V4SERVE_MODEL_INTERNAL_TOKENIZER_ADDED_TOKENS_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace v4serve::model::internal {

class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin;
    size_t end;
    int32_t id;
  };

  explicit AddedTokenMatcher(std::vector<std::pair<std::string, int32_t>> tokens);

  bool empty() const { return tokens_.empty(); }
  // The leftmost match at or after `from`, the longest one at that position; false when none.
  bool FindNext(std::string_view text, size_t from, Match& match) const;

 private:
  // Sorted by first byte, then by length descending.
  std::vector<std::pair<std::string, int32_t>> tokens_;
  std::array<uint32_t, 257> first_byte_begin_{};  // tokens_ index range per first byte
};

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_TOKENIZER_ADDED_TOKENS_H_
