// The bridge between the model's per-sequence decoding state (model/sequence_state.h) and kvstore's
// model-agnostic KV blocks (kvstore/kv_block.h): which layers a block holds, how a sequence's compressed
// entries are cut into 128-token blocks, and how a state is rebuilt from cached blocks.
//
// A block keeps its end boundary's sliding-window state (window ring + compressor tails, the "full" SWA
// policy of MODEL.md), so a state rebuilt from blocks 0..k-1 is bit-for-bit the state the sequence had
// after k·128 tokens: reuse is exact, never approximated.
//
// SWA policies (MODEL.md "KV size and the three disk policies"; docs/KV_STORE.md): which blocks keep
// their boundary window state when published — every block (full), the blocks ending on a multiple of
// the checkpoint interval (periodic) or none (zero). RestoreWithRecompute rebuilds the exact state from
// blocks that lack it: from the last checkpoint, or, when none is near enough, from a fresh window
// one receptive field back; in both cases the recomputed tokens attend to the CACHED compressed entries.
//
// Thread-safety: pure functions.
#ifndef V4SERVE_ENGINE_STATE_BLOCKS_H_
#define V4SERVE_ENGINE_STATE_BLOCKS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvstore/kv_block.h"
#include "kvstore/prefix_cache.h"
#include "model/config.h"
#include "model/model.h"
#include "model/sequence_state.h"

namespace v4serve::engine {

// The block layout of `config`: every compressed (CSA/HCA) main layer, 128 tokens per block.
// INVALID_ARGUMENT when a compression ratio does not divide the block size.
absl::StatusOr<kvstore::KvLayout> KvLayoutFor(const model::ModelConfig& config, uint64_t model_fingerprint);

// A fingerprint of the checkpoint in `dir`: config.json and the safetensors files' sizes and headers
// (which name every tensor, its dtype and offsets). Two processes serving the same files agree on it.
absl::StatusOr<uint64_t> ModelFingerprint(const std::string& dir);

// The entries and indexer keys of block `block_index` of `state` for `layout`'s layers, with `tokens` (the
// block's ids), block hash 0 and no boundary state, whatever the state's position. FAILED_PRECONDITION
// naming the layer when the state does not hold that block's entries.
absl::StatusOr<kvstore::KvBlock> BlockEntries(const kvstore::KvLayout& layout,
                                              const model::SequenceState& state, int32_t block_index,
                                              absl::Span<const int32_t> tokens);

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

enum class SwaPolicy { kFull, kPeriodic, kZero };
// "full", "periodic", "zero"; INVALID_ARGUMENT naming --swa_policy otherwise.
absl::StatusOr<SwaPolicy> ParseSwaPolicy(absl::string_view name);
const char* SwaPolicyName(SwaPolicy policy);
// Whether block `block_index` keeps its end-boundary window state under `policy` (periodic: when the
// block ends on a multiple of `checkpoint_tokens`).
bool KeepsWindowState(SwaPolicy policy, int64_t checkpoint_tokens, int32_t block_index, int32_t block_tokens);

// Tokens a recomputation must cover to rebuild the window state exactly from a fresh window: every
// layer's window depends on the previous layer's outputs one window further back, so
// (layers + 1) x sliding_window (MODEL.md: about 128 x layers).
int64_t WindowReceptiveField(const model::ModelConfig& config);

// The state after blocks[0..n) (block i at index i, tokens verified by the caller) when the last block
// may lack its window state:
//   - the last block has it: RestoreState (nothing recomputed);
//   - else start from the last block c that has it (the checkpoint), or from a fresh window at the
//     block boundary one receptive field before the end when that is later (or no checkpoint exists);
//   - run the model over the tokens from the start to n x block_tokens in chunks of at most half a
//     window, after each chunk replacing the compressed entries (and indexer keys) the model just
//     emitted with the cached ones. Attention therefore always sees the cached entries; the window
//     and compressor tails at the end depend only on tokens inside the receptive field, so the final
//     state equals the one the sequence had (bit for bit; tests/engine/kv_tiers_test.cc checks it).
// `*recomputed_tokens` gets the tokens run through the model.
absl::StatusOr<model::SequenceState> RestoreWithRecompute(const model::Model& model,
                                                          const kvstore::KvLayout& layout,
                                                          absl::Span<const kvstore::KvBlock> blocks,
                                                          int64_t* recomputed_tokens);

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_STATE_BLOCKS_H_
