// Blocks for store tests without a model: a small valid KvLayout and blocks whose content is a function
// of (fingerprint, hash), so a reader can check that what it got is exactly what was written.
#ifndef V4SERVE_TESTS_KVSTORE_KV_STORE_TEST_UTIL_H_
#define V4SERVE_TESTS_KVSTORE_KV_STORE_TEST_UTIL_H_

#include <cstdint>
#include <string>

#include "kvstore/kv_block.h"
#include "kvstore/kv_store_client.h"
#include "kvstore/store_format.h"

namespace v4serve::kvstore::testing {

inline KvLayout SmallLayout(uint64_t fingerprint, int32_t entries = 32, int32_t width = 64) {
  KvLayout l;
  l.model_fingerprint = fingerprint;
  l.block_tokens = 128;
  l.layers.push_back({1, entries, width, 0, KvDtype::kF32});
  return l;
}

// A block (and, when `with_state`, a window state of `state_bytes`) determined by (fingerprint, hash).
inline StoredBlock MakeBlock(const KvLayout& layout, uint64_t hash, int32_t index, bool with_state,
                             size_t state_bytes = 4096) {
  KvBlock b;
  b.block_hash = hash;
  b.block_index = index;
  uint64_t x = hash ^ layout.model_fingerprint;
  auto next = [&x] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  for (int32_t t = 0; t < layout.block_tokens; ++t) b.tokens.push_back(static_cast<int32_t>(next() % 512));
  for (const KvLayerLayout& ll : layout.layers) {
    std::vector<float> e(static_cast<size_t>(ll.entries_per_block) * ll.entry_width);
    for (float& f : e) f = static_cast<float>(next() % 1000) / 7.0f;
    b.entries.push_back(std::move(e));
    b.indexer_keys.emplace_back(static_cast<size_t>(ll.entries_per_block) * ll.indexer_width, 0.5f);
  }
  StoredBlock out;
  out.hash = hash;
  out.index = index;
  out.block = *EncodeKvBlock(layout, b);
  if (with_state) {
    std::string s(state_bytes, '\0');
    for (char& c : s) c = static_cast<char>(next());
    out.window_state = EncodeWindowState(WindowState{layout.model_fingerprint, hash, index, std::move(s)});
  }
  return out;
}

}  // namespace v4serve::kvstore::testing

#endif  // V4SERVE_TESTS_KVSTORE_KV_STORE_TEST_UTIL_H_
