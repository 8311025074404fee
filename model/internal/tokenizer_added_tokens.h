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

  explicit AddedTokenMatcher(const std::vector<std::pair<std::string, int32_t>>& tokens);

  bool empty() const { return token_count_ == 0; }
  // The leftmost match at or after `from`, the longest one at that position; false when none.
  bool FindNext(std::string_view text, size_t from, Match& match) const;

 private:
  // A byte trie: DeepSeek's files hold hundreds of added tokens sharing the prefix "<｜", so comparing each
  // candidate at every '<' would cost hundreds of memcmp calls; the trie walk stops at the first mismatch.
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;  // (byte, node index), few per node
    int32_t token_id = -1;                                    // >= 0 when a token ends here
  };
  int32_t Child(int32_t node, unsigned char byte) const;

  std::vector<Node> nodes_;                // nodes_[0] is the root
  std::array<int32_t, 256> root_child_{};  // child of the root per first byte, -1 if none
  size_t token_count_ = 0;
};

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_TOKENIZER_ADDED_TOKENS_H_
