#include "engine/state_blocks.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kvstore/prefix_cache.h"
#include "services/status_macros.h"

namespace v4serve::engine {

using kvstore::KvBlock;
using kvstore::KvLayerLayout;
using kvstore::KvLayout;

absl::StatusOr<KvLayout> KvLayoutFor(const model::ModelConfig& config, uint64_t model_fingerprint) {
  KvLayout layout;
  layout.model_fingerprint = model_fingerprint;
  layout.block_tokens = kvstore::kDefaultBlockTokens;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const int64_t ratio = config.compress_ratios[static_cast<size_t>(l)];
    if (ratio == 0) continue;
    if (layout.block_tokens % ratio != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("compress ratio ", ratio, " of layer ", l, " does not divide the KV block size"));
    }
    KvLayerLayout ll;
    ll.layer = static_cast<int32_t>(l);
    ll.entries_per_block = static_cast<int32_t>(layout.block_tokens / ratio);
    ll.entry_width = static_cast<int32_t>(config.head_dim);
    ll.indexer_width =
        config.layer_kind(l) == model::LayerKind::kCsa ? static_cast<int32_t>(config.index_head_dim) : 0;
    layout.layers.push_back(ll);
  }
  RETURN_IF_ERROR(layout.Validate());
  return layout;
}

absl::StatusOr<uint64_t> ModelFingerprint(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name == "config.json" || e.path().extension() == ".safetensors") files.push_back(e.path());
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list model dir ", dir, ": ", ec.message()));
  std::sort(files.begin(), files.end());
  uint64_t h = 0;
  for (const fs::path& p : files) {
    std::ifstream in(p, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", p.string()));
    std::string head(1 << 16, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(in.gcount()));
    const uint64_t size = fs::file_size(p, ec);
    const std::string name = p.filename().string();
    h = kvstore::StableHash64(name.data(), name.size(), h);
    h = kvstore::StableHash64(&size, sizeof(size), h);
    h = kvstore::StableHash64(head.data(), head.size(), h);
  }
  if (files.empty()) return absl::NotFoundError(absl::StrCat("no config.json or safetensors in ", dir));
  return h;
}

absl::StatusOr<KvBlock> BlockEntries(const KvLayout& layout, const model::SequenceState& state,
                                     int32_t block_index, absl::Span<const int32_t> tokens) {
  KvBlock b;
  b.block_index = block_index;
  b.tokens.assign(tokens.begin(), tokens.end());
  for (const KvLayerLayout& ll : layout.layers) {
    const model::AttentionLayerState& ls = state.layers[static_cast<size_t>(ll.layer)];
    const size_t first = static_cast<size_t>(block_index) * static_cast<size_t>(ll.entries_per_block);
    const size_t end = first + static_cast<size_t>(ll.entries_per_block);
    if (ls.entries.size() < end * static_cast<size_t>(ll.entry_width) ||
        ls.indexer_keys.size() < end * static_cast<size_t>(ll.indexer_width)) {
      return absl::FailedPreconditionError(
          absl::StrCat("the state does not hold block ", block_index, " of layer ", ll.layer));
    }
    b.entries.emplace_back(ls.entries.begin() + static_cast<ptrdiff_t>(first * ll.entry_width),
                           ls.entries.begin() + static_cast<ptrdiff_t>(end * ll.entry_width));
    b.indexer_keys.emplace_back(ls.indexer_keys.begin() + static_cast<ptrdiff_t>(first * ll.indexer_width),
                                ls.indexer_keys.begin() + static_cast<ptrdiff_t>(end * ll.indexer_width));
  }
  return b;
}

absl::StatusOr<KvBlock> ExtractBlock(const model::ModelConfig& config, const KvLayout& layout,
                                     const model::SequenceState& state, int32_t block_index,
                                     absl::Span<const int32_t> tokens, kvstore::BlockHash hash) {
  const int64_t end = int64_t{block_index + 1} * layout.block_tokens;
  if (state.position != end) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", block_index, " ends at ", end, " but the state is at ", state.position));
  }
  absl::StatusOr<KvBlock> entries = BlockEntries(layout, state, block_index, tokens);
  if (!entries.ok()) {
    return absl::InternalError("sequence state holds fewer compressed entries than its position implies");
  }
  KvBlock b = *std::move(entries);
  b.block_hash = hash;
  // The boundary state without the entries (they are the blocks themselves): position 0 makes the
  // model's codec expect no entries.
  model::SequenceState boundary = state;
  boundary.position = 0;
  for (model::AttentionLayerState& ls : boundary.layers) {
    ls.entries.clear();
    ls.indexer_keys.clear();
  }
  b.boundary_state = model::SerializeSequenceState(boundary);
  return b;
}

absl::StatusOr<model::SequenceState> RestoreState(const model::ModelConfig& config, const KvLayout& layout,
                                                  absl::Span<const KvBlock> blocks) {
  if (blocks.empty()) return absl::InvalidArgumentError("RestoreState needs at least one block");
  if (blocks.back().boundary_state.empty()) return absl::DataLossError("last block has no boundary state");
  ASSIGN_OR_RETURN(model::SequenceState state,
                   model::DeserializeSequenceState(config, blocks.back().boundary_state));
  if (state.position != 0) return absl::DataLossError("boundary state carries a position");
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i].block_index != static_cast<int32_t>(i)) return absl::DataLossError("blocks out of order");
    for (size_t l = 0; l < layout.layers.size(); ++l) {
      model::AttentionLayerState& ls = state.layers[static_cast<size_t>(layout.layers[l].layer)];
      ls.entries.insert(ls.entries.end(), blocks[i].entries[l].begin(), blocks[i].entries[l].end());
      ls.indexer_keys.insert(ls.indexer_keys.end(), blocks[i].indexer_keys[l].begin(),
                             blocks[i].indexer_keys[l].end());
    }
  }
  state.position = static_cast<int64_t>(blocks.size()) * layout.block_tokens;
  return state;
}

}  // namespace v4serve::engine

namespace v4serve::engine {

absl::StatusOr<SwaPolicy> ParseSwaPolicy(absl::string_view name) {
  if (name == "full") return SwaPolicy::kFull;
  if (name == "periodic") return SwaPolicy::kPeriodic;
  if (name == "zero") return SwaPolicy::kZero;
  return absl::InvalidArgumentError(
      absl::StrCat("--swa_policy must be 'full', 'periodic' or 'zero', not '", name, "'"));
}

const char* SwaPolicyName(SwaPolicy policy) {
  switch (policy) {
    case SwaPolicy::kFull:
      return "full";
    case SwaPolicy::kPeriodic:
      return "periodic";
    case SwaPolicy::kZero:
      return "zero";
  }
  return "full";
}

bool KeepsWindowState(SwaPolicy policy, int64_t checkpoint_tokens, int32_t block_index,
                      int32_t block_tokens) {
  switch (policy) {
    case SwaPolicy::kFull:
      return true;
    case SwaPolicy::kPeriodic:
      return checkpoint_tokens > 0 && (int64_t{block_index + 1} * block_tokens) % checkpoint_tokens == 0;
    case SwaPolicy::kZero:
      return false;
  }
  return true;
}

int64_t WindowReceptiveField(const model::ModelConfig& config) {
  return (config.num_hidden_layers + 1) * config.sliding_window;
}

absl::StatusOr<model::SequenceState> RestoreWithRecompute(const model::Model& model, const KvLayout& layout,
                                                          absl::Span<const KvBlock> blocks,
                                                          int64_t* recomputed_tokens) {
  *recomputed_tokens = 0;
  if (blocks.empty()) return absl::InvalidArgumentError("RestoreWithRecompute needs at least one block");
  const model::ModelConfig& config = model.config();
  if (!blocks.back().boundary_state.empty()) return RestoreState(config, layout, blocks);
  const int64_t n = static_cast<int64_t>(blocks.size());
  const int64_t bt = layout.block_tokens;
  const int64_t end = n * bt;
  int64_t checkpoint = -1;  // Last block with window state.
  for (int64_t i = n - 1; i >= 0; --i) {
    if (!blocks[static_cast<size_t>(i)].boundary_state.empty()) {
      checkpoint = i;
      break;
    }
  }
  const int64_t fresh_start = std::max<int64_t>(0, (end - WindowReceptiveField(config)) / bt);  // In blocks.
  model::SequenceState state;
  int64_t start = 0;  // In blocks.
  if (checkpoint >= 0 && checkpoint + 1 >= fresh_start) {
    start = checkpoint + 1;
    ASSIGN_OR_RETURN(state, RestoreState(config, layout, blocks.subspan(0, static_cast<size_t>(start))));
  } else {
    start = fresh_start;
    state = model::NewSequenceState(config);
    for (int64_t i = 0; i < start; ++i) {
      if (blocks[static_cast<size_t>(i)].block_index != static_cast<int32_t>(i)) {
        return absl::DataLossError("blocks out of order");
      }
      for (size_t l = 0; l < layout.layers.size(); ++l) {
        model::AttentionLayerState& ls = state.layers[static_cast<size_t>(layout.layers[l].layer)];
        const KvBlock& b = blocks[static_cast<size_t>(i)];
        ls.entries.insert(ls.entries.end(), b.entries[l].begin(), b.entries[l].end());
        ls.indexer_keys.insert(ls.indexer_keys.end(), b.indexer_keys[l].begin(), b.indexer_keys[l].end());
      }
    }
    state.position = start * bt;  // The window ring is empty: the receptive field makes that harmless.
  }
  for (int64_t i = start; i < n; ++i) {
    if (blocks[static_cast<size_t>(i)].block_index != static_cast<int32_t>(i)) {
      return absl::DataLossError("blocks out of order");
    }
  }
  std::vector<int32_t> tokens;
  tokens.reserve(static_cast<size_t>((n - start) * bt));
  for (int64_t i = start; i < n; ++i) {
    const std::vector<int32_t>& t = blocks[static_cast<size_t>(i)].tokens;
    tokens.insert(tokens.end(), t.begin(), t.end());
  }
  // Replaces entries [from, count) of every compressed layer with the cached ones.
  std::vector<int64_t> replaced(layout.layers.size());
  for (size_t l = 0; l < layout.layers.size(); ++l) replaced[l] = start * layout.layers[l].entries_per_block;
  auto use_cached_entries = [&]() -> absl::Status {
    for (size_t l = 0; l < layout.layers.size(); ++l) {
      const kvstore::KvLayerLayout& ll = layout.layers[l];
      model::AttentionLayerState& ls = state.layers[static_cast<size_t>(ll.layer)];
      const int64_t count = static_cast<int64_t>(ls.entries.size()) / ll.entry_width;
      if (count > n * ll.entries_per_block) return absl::InternalError("recompute emitted too many entries");
      for (int64_t e = replaced[l]; e < count; ++e) {
        const KvBlock& b = blocks[static_cast<size_t>(e / ll.entries_per_block)];
        const int64_t off = e % ll.entries_per_block;
        std::copy_n(b.entries[l].begin() + off * ll.entry_width, ll.entry_width,
                    ls.entries.begin() + e * ll.entry_width);
        if (ll.indexer_width > 0) {
          std::copy_n(b.indexer_keys[l].begin() + off * ll.indexer_width, ll.indexer_width,
                      ls.indexer_keys.begin() + e * ll.indexer_width);
        }
      }
      replaced[l] = count;
    }
    model::InvalidateDeviceCopy(&state);  // Same counts, other bytes: a GPU copy would not notice.
    return absl::OkStatus();
  };
  const int64_t chunk = std::max<int64_t>(1, config.sliding_window / 2);
  for (size_t at = 0; at < tokens.size(); at += static_cast<size_t>(chunk)) {
    const size_t len = std::min(tokens.size() - at, static_cast<size_t>(chunk));
    RETURN_IF_ERROR(model.Prefill(&state, absl::MakeConstSpan(tokens).subspan(at, len)).status());
    RETURN_IF_ERROR(use_cached_entries());
  }
  for (size_t l = 0; l < layout.layers.size(); ++l) {
    if (replaced[l] != n * layout.layers[l].entries_per_block) {
      return absl::InternalError("recompute left a different number of compressed entries than cached");
    }
  }
  *recomputed_tokens = static_cast<int64_t>(tokens.size());
  return state;
}

}  // namespace v4serve::engine
