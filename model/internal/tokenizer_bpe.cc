#include "model/internal/tokenizer_bpe.h"

#include <climits>
#include <queue>
#include <utility>

namespace v4serve::model::internal {
namespace {
// Below this many symbols a linear scan for the best pair beats a heap.
constexpr size_t kSmallPiece = 48;
}  // namespace

BpeMerger::BpeMerger(std::array<int32_t, 256> byte_ids, absl::flat_hash_map<uint64_t, Merge> merges,
                     absl::flat_hash_map<std::string, int32_t> whole_pieces)
    : byte_ids_(byte_ids), merges_(std::move(merges)), whole_pieces_(std::move(whole_pieces)) {}

void BpeMerger::EncodePiece(std::string_view piece, std::vector<int32_t>& out) const {
  if (!whole_pieces_.empty()) {
    auto it = whole_pieces_.find(absl::string_view(piece.data(), piece.size()));
    if (it != whole_pieces_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  thread_local std::vector<int32_t> symbols;
  symbols.clear();
  for (char ch : piece) {
    const int32_t id = byte_ids_[static_cast<unsigned char>(ch)];
    if (id >= 0) symbols.push_back(id);
  }
  if (symbols.size() > 1) {
    if (symbols.size() <= kSmallPiece) {
      MergeSmall(symbols);
    } else {
      MergeLarge(symbols);
    }
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
}

void BpeMerger::MergeSmall(std::vector<int32_t>& symbols) const {
  // ranks[i] / merged[i] describe the pair (symbols[i], symbols[i + 1]).
  int32_t ranks[kSmallPiece];
  int32_t merged[kSmallPiece];
  size_t n = symbols.size();
  int32_t* sym = symbols.data();
  auto lookup = [&](size_t i) {
    const Merge* m = Find(sym[i], sym[i + 1]);
    ranks[i] = m ? m->rank : INT32_MAX;
    merged[i] = m ? m->merged_id : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) lookup(i);
  while (n > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < n; ++i) {
      if (ranks[i] < ranks[best]) best = i;
    }
    if (ranks[best] == INT32_MAX) break;
    sym[best] = merged[best];
    for (size_t i = best + 1; i + 1 < n; ++i) {
      sym[i] = sym[i + 1];
      ranks[i] = ranks[i + 1];
      merged[i] = merged[i + 1];
    }
    --n;
    if (best > 0) lookup(best - 1);
    if (best + 1 < n) lookup(best);
  }
  symbols.resize(n);
}

void BpeMerger::MergeLarge(std::vector<int32_t>& symbols) const {
  // Linked list over the original positions; a merged-away symbol gets id -1. Heap entries are
  // (rank, position); a popped entry is stale unless the pair at `position` still merges into the
  // same id. This is HF tokenizers' Word::merge_all.
  const size_t n = symbols.size();
  std::vector<int32_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Entry {
    int32_t rank;
    int32_t pos;
    int32_t merged_id;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0 || next[pos] < 0) return;
    const Merge* m = Find(symbols[pos], symbols[next[pos]]);
    if (m) heap.push({m->rank, pos, m->merged_id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    const int32_t pos = top.pos;
    if (symbols[pos] < 0 || next[pos] < 0) continue;
    const Merge* m = Find(symbols[pos], symbols[next[pos]]);
    if (m == nullptr || m->merged_id != top.merged_id) continue;
    const int32_t right = next[pos];
    symbols[pos] = top.merged_id;
    symbols[right] = -1;
    next[pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = pos;
    push(prev[pos]);
    push(pos);
  }
  size_t w = 0;
  for (size_t i = 0; i < n; ++i) {
    if (symbols[i] >= 0) symbols[w++] = symbols[i];
  }
  symbols.resize(w);
}

}  // namespace v4serve::model::internal
