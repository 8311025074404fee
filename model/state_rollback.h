// Undoing the last token a SequenceState consumed (speculative decoding: a rejected draft token).
//
// Consuming the token at position q changes, per attention layer: window row q % sliding_window; the
// compressor's row q % ratio (and `filled`); and when that token completes a compressor window, one
// appended entry (and indexer key) and, for the overlapping CSA compressor, the previous window. A
// TokenUndo saves exactly those bytes before the token is consumed, so Undo restores the state to be
// bit-identical (operator==) to one that never saw the token, without copying the whole state.
//
// Contract: SaveTokenUndo(state, q) may be taken while state.position <= q, as long as the tokens before q
// that are consumed afterwards do not touch what it saved: true when at most one token (q - 1) is consumed
// between the save and q, for sliding_window >= 2 and every ratio >= 2 (V4: 4 and 128). Checked.
//
// Thread-safety: plain values and pure functions.
#ifndef V4SERVE_MODEL_STATE_ROLLBACK_H_
#define V4SERVE_MODEL_STATE_ROLLBACK_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/sequence_state.h"

namespace v4serve::model {

struct TokenUndo {
  struct Compressor {
    std::vector<float> kv_row, score_row;  // Row q % ratio before q.
    bool has_prev = false;                 // Saved only when q completes a window of an overlap compressor.
    std::vector<float> prev_kv, prev_score;
  };
  struct Layer {
    std::vector<float> window_row;  // Row q % sliding_window before q.
    Compressor compressor, indexer_compressor;
  };
  int64_t position = -1;  // q.
  std::vector<Layer> layers;
};

// Saves what consuming the token at `position` will overwrite. INVALID_ARGUMENT when `position` is more
// than one token ahead of the state, or a window/ratio is < 2.
absl::StatusOr<TokenUndo> SaveTokenUndo(const ModelConfig& config, const SequenceState& state,
                                        int64_t position);

// Rolls `state` back by its last token, which must be the one `undo` was saved for
// (state->position == undo.position + 1). The MTP layers are not touched (the main forward never does).
absl::Status UndoLastToken(const TokenUndo& undo, SequenceState* state);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_STATE_ROLLBACK_H_
