#include "model/internal/tokenizer_added_tokens.h"

namespace v4serve::model::internal {

AddedTokenMatcher::AddedTokenMatcher(const std::vector<std::pair<std::string, int32_t>>& tokens) {
  root_child_.fill(-1);
  nodes_.emplace_back();
  for (const auto& [content, id] : tokens) {
    if (content.empty()) continue;
    ++token_count_;
    int32_t node = 0;
    for (size_t i = 0; i < content.size(); ++i) {
      const auto b = static_cast<unsigned char>(content[i]);
      int32_t next = i == 0 ? root_child_[b] : Child(node, b);
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        if (i == 0) {
          root_child_[b] = next;
        } else {
          nodes_[node].children.emplace_back(b, next);
        }
      }
      node = next;
    }
    nodes_[node].token_id = id;  // a later duplicate spelling wins, as in HF's vocabulary map
  }
}

int32_t AddedTokenMatcher::Child(int32_t node, unsigned char byte) const {
  for (const auto& [b, child] : nodes_[node].children) {
    if (b == byte) return child;
  }
  return -1;
}

bool AddedTokenMatcher::FindNext(std::string_view text, size_t from, Match& match) const {
  if (token_count_ == 0) return false;
  for (size_t pos = from; pos < text.size(); ++pos) {
    int32_t node = root_child_[static_cast<unsigned char>(text[pos])];
    size_t best_end = 0;
    int32_t best_id = -1;
    for (size_t i = pos + 1; node >= 0; ++i) {
      if (nodes_[node].token_id >= 0) {
        best_end = i;
        best_id = nodes_[node].token_id;
      }
      if (i == text.size()) break;
      node = Child(node, static_cast<unsigned char>(text[i]));
    }
    if (best_id >= 0) {
      match = {pos, best_end, best_id};
      return true;
    }
  }
  return false;
}

}  // namespace v4serve::model::internal
