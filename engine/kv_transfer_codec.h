// What a prefill worker puts into the KV transfer and how a decode worker rebuilds the sequence state
// from it (docs/KV_TRANSFER.md "Wire format"). The transport (kvstore/transfer/) moves bytes only; this
// is the one place that knows they are a SequenceState.
//
//   * Block chunks: for every complete 128-token block of the prompt, one chunk per group of
//     `layers_per_chunk` compressed layers, each payload a KV block in the block format of
//     kvstore/kv_block.h whose layer set is that group (tokens included, so the receiver checks them
//     against the prompt; no boundary state: only the final state matters to decode).
//   * One window chunk (window_state, last): the state after the whole prompt minus the entries the
//     block chunks carried: sliding-window rings, compressor tails, and the entries of the incomplete
//     last block, in the model's SequenceState encoding with position = prompt length mod 128. It is not
//     a block because it covers a partial block and carries no token ids.
//
// Thread-safety: pure functions.
#ifndef V4SERVE_ENGINE_KV_TRANSFER_CODEC_H_
#define V4SERVE_ENGINE_KV_TRANSFER_CODEC_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvstore/kv_block.h"
#include "kvstore/transfer/kv_transfer.h"
#include "model/config.h"
#include "model/sequence_state.h"

namespace v4serve::engine {

// The chunks of block `block_index`, taken from `state` (which holds at least that block's entries).
// `tokens` are the block's token ids.
absl::StatusOr<std::vector<kvstore::KvTransferChunk>> EncodeBlockChunks(const kvstore::KvLayout& layout,
                                                                        const model::SequenceState& state,
                                                                        int32_t block_index,
                                                                        absl::Span<const int32_t> tokens,
                                                                        int32_t layers_per_chunk);

// The final window chunk of `state` (marked last).
absl::StatusOr<kvstore::KvTransferChunk> EncodeWindowChunk(const kvstore::KvLayout& layout,
                                                           const model::SequenceState& state);

// The state after `prompt`, from a transfer's chunks. DATA_LOSS when a block or layer is missing or
// repeated, a chunk does not decode, its tokens are not the prompt's, or sizes disagree;
// FAILED_PRECONDITION for blocks of another model (fingerprint). With `pages` set it also gets each
// complete block's payload in `layout` (kvstore::KvBlockPayload): the chunks' payloads joined in layer
// order, byte for byte (a chunk's layers are a contiguous range of the block's payload), for
// Model::AdoptKvPages.
absl::StatusOr<model::SequenceState> AssembleTransferredState(
    const model::ModelConfig& config, const kvstore::KvLayout& layout, absl::Span<const int32_t> prompt,
    absl::Span<const kvstore::KvTransferChunk> chunks, std::vector<std::string>* pages = nullptr);

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_KV_TRANSFER_CODEC_H_
