// The decoding state of one sequence: exactly what the KV store keeps for it.
//
// Per attention layer: the sliding-window ring of normalized, RoPE'd KV vectors (slot = position mod
// window), the compressed entries emitted so far (and, for CSA layers, the lightning indexer's keys), and
// each compressor's incomplete tail (for the overlapping CSA compressor also the previous complete
// window). Values are FP32 in the exact numeric mode. A fresh state (NewSequenceState) is all a new
// sequence needs; nothing is shared between sequences.
//
// Thread-safety: a plain value; one sequence's state is used by one forward call at a time.
#ifndef V4SERVE_MODEL_SEQUENCE_STATE_H_
#define V4SERVE_MODEL_SEQUENCE_STATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace v4serve::model {

struct CompressorState {
  int64_t ratio = 0;
  int64_t width = 0;         // Entry width (head_dim, or index_head_dim for the indexer).
  bool overlap = false;      // CSA: features are doubled and windows overlap.
  int64_t filled = 0;        // Slots of the current window seen so far (< ratio).
  std::vector<float> kv;     // [ratio, coff*width]: projected kv of the current window's tokens.
  std::vector<float> score;  // [ratio, coff*width]: gate scores + positional bias.
  bool has_prev = false;     // Overlap only: a previous complete window exists.
  std::vector<float> prev_kv, prev_score;  // Overlap only: the previous complete window.

  bool operator==(const CompressorState&) const = default;
};

struct AttentionLayerState {
  std::vector<float> window;           // [sliding_window, head_dim] ring; slot = position % sliding_window.
  CompressorState compressor;          // ratio > 0.
  CompressorState indexer_compressor;  // CSA only.
  std::vector<float> entries;          // [n_entries, head_dim].
  std::vector<float> indexer_keys;     // CSA: [n_entries, index_head_dim].

  bool operator==(const AttentionLayerState&) const = default;
};

struct SequenceState {
  int64_t position = 0;                     // Tokens consumed so far.
  std::vector<AttentionLayerState> layers;  // Main layers.
  // MTP blocks (window-only attention): their own window rings, fed by Model::MtpDraft.
  int64_t mtp_position = 0;
  std::vector<AttentionLayerState> mtp_layers;
  // Names the device copy a GPU backend keeps of `layers` (model/cuda/device_state_cache.h); 0: none. The
  // backend sets a fresh tag after each forward it runs and trusts its copy only while the tag, the position
  // and every layer's entry count still match. Code that rewrites `layers` in place without changing those
  // (e.g. swapping in cached entries of the same count) must call InvalidateDeviceCopy. Not part of the
  // value: operator== and the encoding ignore it.
  uint64_t device_tag = 0;

  bool operator==(const SequenceState& o) const {
    return position == o.position && layers == o.layers && mtp_position == o.mtp_position &&
           mtp_layers == o.mtp_layers;
  }
};

// Makes any device copy of `state` stale (after an in-place change to its layers).
inline void InvalidateDeviceCopy(SequenceState* state) { state->device_tag = 0; }

// A state for a new sequence of `config` (layer count, ring and tail sizes).
SequenceState NewSequenceState(const ModelConfig& config);

// Little-endian binary encoding (versioned) for transfer and storage; Deserialize checks every size
// against `config`.
std::string SerializeSequenceState(const SequenceState& state);
absl::StatusOr<SequenceState> DeserializeSequenceState(const ModelConfig& config, std::string_view bytes);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_SEQUENCE_STATE_H_
