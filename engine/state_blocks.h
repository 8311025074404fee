// The bridge between the model's per-sequence decoding state (model/sequence_state.h) and kvstore's
// model-agnostic KV blocks (kvstore/kv_block.h): which layers a block holds, how a sequence's compressed
// entries are cut into 128-token blocks, and how a state is rebuilt from cached blocks.
//
// A block keeps its end boundary's sliding-window state (window ring + compressor tails, the "full" SWA
// policy of MODEL.md), so a state rebuilt from blocks 0..k-1 is bit-for-bit the state the sequence had
// after k·128 tokens: reuse is exact, never approximated.
//
// Thread-safety: pure functions.
#ifndef V4SERVE_ENGINE_STATE_BLOCKS_H_
#define V4SERVE_ENGINE_STATE_BLOCKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvstore/kv_block.h"
#include "kvstore/prefix_cache.h"
#include "model/config.h"
#include "model/sequence_state.h"

namespace v4serve::engine {

// The block layout of `config`: every compressed (CSA/HCA) main layer, 128 tokens per block.
// INVALID_ARGUMENT when a compression ratio does not divide the block size.
absl::StatusOr<kvstore::KvLayout> KvLayoutFor(const model::ModelConfig& config, uint64_t model_fingerprint);

// A fingerprint of the checkpoint in `dir`: config.json and the safetensors files' sizes and headers
// (which name every tensor, its dtype and offsets). Two processes serving the same files agree on it.
absl::StatusOr<uint64_t> ModelFingerprint(const std::string& dir);

// Block `block_index` of a sequence whose state has consumed exactly (block_index + 1) · block_tokens
// tokens (so the boundary state is that block's end). `tokens` are the block's ids.
absl::StatusOr<kvstore::KvBlock> ExtractBlock(const model::ModelConfig& config,
                                              const kvstore::KvLayout& layout,
                                              const model::SequenceState& state, int32_t block_index,
                                              absl::Span<const int32_t> tokens, kvstore::BlockHash hash);

// The state after blocks[0..n) (each block's index must equal its position; the last must carry its
// boundary state). DATA_LOSS when they do not fit together.
absl::StatusOr<model::SequenceState> RestoreState(const model::ModelConfig& config,
                                                  const kvstore::KvLayout& layout,
                                                  absl::Span<const kvstore::KvBlock> blocks);

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_STATE_BLOCKS_H_
