#include "engine/kv_transfer_codec.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/state_blocks.h"
#include "services/status_macros.h"

namespace v4serve::engine {
namespace {

using kvstore::KvBlock;
using kvstore::KvLayout;
using kvstore::KvTransferChunk;

KvLayout SubLayout(const KvLayout& layout, size_t first, size_t count) {
  KvLayout sub;
  sub.model_fingerprint = layout.model_fingerprint;
  sub.block_tokens = layout.block_tokens;
  sub.layers.assign(layout.layers.begin() + static_cast<ptrdiff_t>(first),
                    layout.layers.begin() + static_cast<ptrdiff_t>(first + count));
  return sub;
}

}  // namespace

absl::StatusOr<std::vector<KvTransferChunk>> EncodeBlockChunks(const KvLayout& layout,
                                                               const model::SequenceState& state,
                                                               int32_t block_index,
                                                               absl::Span<const int32_t> tokens,
                                                               int32_t layers_per_chunk) {
  if (layers_per_chunk <= 0) return absl::InvalidArgumentError("layers_per_chunk must be positive");
  if (static_cast<int32_t>(tokens.size()) != layout.block_tokens) {
    return absl::InvalidArgumentError("a block chunk needs exactly one block of tokens");
  }
  std::vector<KvTransferChunk> out;
  const size_t n_layers = layout.layers.size();
  for (size_t first = 0; first < n_layers; first += static_cast<size_t>(layers_per_chunk)) {
    const size_t count = std::min(n_layers - first, static_cast<size_t>(layers_per_chunk));
    const KvLayout sub = SubLayout(layout, first, count);
    ASSIGN_OR_RETURN(const KvBlock b, BlockEntries(sub, state, block_index, tokens));
    KvTransferChunk c;
    c.first_layer = static_cast<uint32_t>(first);
    c.num_layers = static_cast<uint32_t>(count);
    c.first_token = static_cast<uint32_t>(block_index) * static_cast<uint32_t>(layout.block_tokens);
    c.num_tokens = static_cast<uint32_t>(layout.block_tokens);
    ASSIGN_OR_RETURN(c.payload, kvstore::EncodeKvBlock(sub, b));
    out.push_back(std::move(c));
  }
  return out;
}

absl::StatusOr<KvTransferChunk> EncodeWindowChunk(const KvLayout& layout, const model::SequenceState& state) {
  const int64_t blocks = state.position / layout.block_tokens;
  model::SequenceState tail = state;
  tail.position = state.position - blocks * layout.block_tokens;
  for (const kvstore::KvLayerLayout& ll : layout.layers) {
    model::AttentionLayerState& ls = tail.layers[static_cast<size_t>(ll.layer)];
    const size_t n = static_cast<size_t>(blocks) * static_cast<size_t>(ll.entries_per_block);
    if (ls.entries.size() < n * ll.entry_width || ls.indexer_keys.size() < n * ll.indexer_width) {
      return absl::InternalError("state holds fewer compressed entries than its position implies");
    }
    ls.entries.erase(ls.entries.begin(), ls.entries.begin() + static_cast<ptrdiff_t>(n * ll.entry_width));
    ls.indexer_keys.erase(ls.indexer_keys.begin(),
                          ls.indexer_keys.begin() + static_cast<ptrdiff_t>(n * ll.indexer_width));
  }
  KvTransferChunk c;
  c.first_layer = 0;
  c.num_layers = static_cast<uint32_t>(layout.layers.size());
  c.first_token = static_cast<uint32_t>(blocks * layout.block_tokens);
  c.num_tokens = static_cast<uint32_t>(tail.position);
  c.window_state = true;
  c.last = true;
  c.payload = model::SerializeSequenceState(tail);
  return c;
}

absl::StatusOr<model::SequenceState> AssembleTransferredState(const model::ModelConfig& config,
                                                              const KvLayout& layout,
                                                              absl::Span<const int32_t> prompt,
                                                              absl::Span<const KvTransferChunk> chunks,
                                                              std::vector<std::string>* pages) {
  const int64_t bt = layout.block_tokens;
  const int64_t n_blocks = static_cast<int64_t>(prompt.size()) / bt;
  const size_t n_layers = layout.layers.size();
  // got[block][layer]: the layer's entries of that block.
  std::vector<std::vector<bool>> got(static_cast<size_t>(n_blocks), std::vector<bool>(n_layers, false));
  std::vector<std::vector<std::vector<float>>> entries(static_cast<size_t>(n_blocks),
                                                       std::vector<std::vector<float>>(n_layers));
  std::vector<std::vector<std::vector<float>>> keys = entries;
  // part[block][first layer]: that chunk's payload, a view into the chunk (pages set).
  std::vector<std::vector<absl::string_view>> part(static_cast<size_t>(pages != nullptr ? n_blocks : 0),
                                                   std::vector<absl::string_view>(n_layers));
  const KvTransferChunk* window = nullptr;
  for (const KvTransferChunk& c : chunks) {
    if (c.window_state) {
      if (window != nullptr) return absl::DataLossError("two window-state chunks in one transfer");
      window = &c;
      continue;
    }
    if (c.num_tokens != bt || c.first_token % bt != 0 || c.num_layers == 0 ||
        c.first_layer + static_cast<uint64_t>(c.num_layers) > n_layers) {
      return absl::DataLossError(absl::StrCat("KV chunk with a bad range: tokens ", c.first_token, "+",
                                              c.num_tokens, ", layers ", c.first_layer, "+", c.num_layers));
    }
    const int64_t block = c.first_token / bt;
    if (block >= n_blocks)
      return absl::DataLossError(absl::StrCat("KV chunk for block ", block, " past the prompt"));
    const KvLayout sub = SubLayout(layout, c.first_layer, c.num_layers);
    ASSIGN_OR_RETURN(KvBlock b, kvstore::DecodeKvBlock(sub, c.payload));
    if (b.block_index != block) return absl::DataLossError("KV chunk's block index disagrees with its range");
    if (!std::equal(b.tokens.begin(), b.tokens.end(), prompt.begin() + block * bt)) {
      return absl::DataLossError(absl::StrCat("KV block ", block, " was computed for other tokens"));
    }
    if (pages != nullptr) {
      part[static_cast<size_t>(block)][c.first_layer] = kvstore::KvBlockPayload(sub, c.payload, b);
    }
    for (size_t i = 0; i < c.num_layers; ++i) {
      const size_t l = c.first_layer + i;
      if (got[static_cast<size_t>(block)][l]) {
        return absl::DataLossError(absl::StrCat("KV block ", block, " layer ", l, " arrived twice"));
      }
      got[static_cast<size_t>(block)][l] = true;
      entries[static_cast<size_t>(block)][l] = std::move(b.entries[i]);
      keys[static_cast<size_t>(block)][l] = std::move(b.indexer_keys[i]);
    }
  }
  if (window == nullptr) return absl::DataLossError("the transfer has no window-state chunk");
  for (int64_t b = 0; b < n_blocks; ++b) {
    for (size_t l = 0; l < n_layers; ++l) {
      if (!got[static_cast<size_t>(b)][l]) {
        return absl::DataLossError(absl::StrCat("KV block ", b, " layer ", l, " never arrived"));
      }
    }
  }
  ASSIGN_OR_RETURN(model::SequenceState state, model::DeserializeSequenceState(config, window->payload));
  if (state.position != static_cast<int64_t>(prompt.size()) - n_blocks * bt) {
    return absl::DataLossError(absl::StrCat("window state at position ", state.position, " does not end the ",
                                            prompt.size(), "-token prompt"));
  }
  for (size_t l = 0; l < n_layers; ++l) {
    model::AttentionLayerState& ls = state.layers[static_cast<size_t>(layout.layers[l].layer)];
    std::vector<float> e, k;
    for (int64_t b = 0; b < n_blocks; ++b) {
      e.insert(e.end(), entries[static_cast<size_t>(b)][l].begin(), entries[static_cast<size_t>(b)][l].end());
      k.insert(k.end(), keys[static_cast<size_t>(b)][l].begin(), keys[static_cast<size_t>(b)][l].end());
    }
    e.insert(e.end(), ls.entries.begin(), ls.entries.end());
    k.insert(k.end(), ls.indexer_keys.begin(), ls.indexer_keys.end());
    ls.entries = std::move(e);
    ls.indexer_keys = std::move(k);
  }
  state.position = static_cast<int64_t>(prompt.size());
  if (pages != nullptr) {  // Every (block, layer) arrived once, so each block's parts tile its layers.
    pages->clear();
    for (const std::vector<absl::string_view>& layers : part) pages->push_back(absl::StrJoin(layers, ""));
  }
  return state;
}

}  // namespace v4serve::engine
