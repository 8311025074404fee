#include "engine/state_blocks.h"

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

absl::StatusOr<KvBlock> ExtractBlock(const model::ModelConfig& config, const KvLayout& layout,
                                     const model::SequenceState& state, int32_t block_index,
                                     absl::Span<const int32_t> tokens, kvstore::BlockHash hash) {
  const int64_t end = int64_t{block_index + 1} * layout.block_tokens;
  if (state.position != end) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", block_index, " ends at ", end, " but the state is at ", state.position));
  }
  KvBlock b;
  b.block_hash = hash;
  b.block_index = block_index;
  b.tokens.assign(tokens.begin(), tokens.end());
  for (const KvLayerLayout& ll : layout.layers) {
    const model::AttentionLayerState& ls = state.layers[static_cast<size_t>(ll.layer)];
    const size_t first = static_cast<size_t>(block_index) * ll.entries_per_block;
    const size_t n = static_cast<size_t>(ll.entries_per_block);
    if (ls.entries.size() < (first + n) * ll.entry_width ||
        ls.indexer_keys.size() < (first + n) * ll.indexer_width) {
      return absl::InternalError("sequence state holds fewer compressed entries than its position implies");
    }
    b.entries.emplace_back(ls.entries.begin() + first * ll.entry_width,
                           ls.entries.begin() + (first + n) * ll.entry_width);
    b.indexer_keys.emplace_back(ls.indexer_keys.begin() + first * ll.indexer_width,
                                ls.indexer_keys.begin() + (first + n) * ll.indexer_width);
  }
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
