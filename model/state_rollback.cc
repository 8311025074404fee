#include "model/state_rollback.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace v4serve::model {
namespace {

int64_t RowWidth(const CompressorState& c) { return (c.overlap ? 2 : 1) * c.width; }

absl::Status SaveCompressor(const CompressorState& c, int64_t q, TokenUndo::Compressor* out) {
  if (c.ratio == 0) return absl::OkStatus();
  if (c.ratio < 2) return absl::InvalidArgumentError("token undo needs compress ratios >= 2");
  const int64_t row = RowWidth(c), slot = q % c.ratio;
  out->kv_row.assign(c.kv.begin() + slot * row, c.kv.begin() + (slot + 1) * row);
  out->score_row.assign(c.score.begin() + slot * row, c.score.begin() + (slot + 1) * row);
  if (c.overlap && slot + 1 == c.ratio) {
    out->has_prev = c.has_prev;
    out->prev_kv = c.prev_kv;
    out->prev_score = c.prev_score;
  }
  return absl::OkStatus();
}

// Returns whether the token completed a window (its entry must be dropped).
bool UndoCompressor(const TokenUndo::Compressor& u, int64_t q, CompressorState* c) {
  if (c->ratio == 0) return false;
  const int64_t row = RowWidth(*c), slot = q % c->ratio;
  std::copy(u.kv_row.begin(), u.kv_row.end(), c->kv.begin() + slot * row);
  std::copy(u.score_row.begin(), u.score_row.end(), c->score.begin() + slot * row);
  c->filled = slot;
  if (slot + 1 < c->ratio) return false;
  if (c->overlap) {
    c->has_prev = u.has_prev;
    c->prev_kv = u.prev_kv;
    c->prev_score = u.prev_score;
  }
  return true;
}

}  // namespace

absl::StatusOr<TokenUndo> SaveTokenUndo(const ModelConfig& config, const SequenceState& state,
                                        int64_t position) {
  if (position < state.position || position > state.position + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("token undo for position ", position, " taken on a state at ", state.position));
  }
  TokenUndo undo;
  undo.position = position;
  undo.layers.resize(state.layers.size());
  for (size_t l = 0; l < state.layers.size(); ++l) {
    const AttentionLayerState& ls = state.layers[l];
    TokenUndo::Layer& u = undo.layers[l];
    if (!ls.window.empty()) {
      const int64_t hd = config.head_dim, win = config.sliding_window;
      if (win < 2) return absl::InvalidArgumentError("token undo needs a sliding window >= 2");
      const int64_t slot = position % win;
      u.window_row.assign(ls.window.begin() + slot * hd, ls.window.begin() + (slot + 1) * hd);
    }
    if (absl::Status s = SaveCompressor(ls.compressor, position, &u.compressor); !s.ok()) return s;
    if (absl::Status s = SaveCompressor(ls.indexer_compressor, position, &u.indexer_compressor); !s.ok())
      return s;
  }
  return undo;
}

absl::Status UndoLastToken(const TokenUndo& undo, SequenceState* state) {
  if (state->position != undo.position + 1 || undo.layers.size() != state->layers.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("token undo for position ", undo.position, " applied to a state at ", state->position));
  }
  for (size_t l = 0; l < state->layers.size(); ++l) {
    AttentionLayerState& ls = state->layers[l];
    const TokenUndo::Layer& u = undo.layers[l];
    if (!ls.window.empty()) {
      const int64_t hd = static_cast<int64_t>(u.window_row.size());
      const int64_t slot = undo.position % (static_cast<int64_t>(ls.window.size()) / hd);
      std::copy(u.window_row.begin(), u.window_row.end(), ls.window.begin() + slot * hd);
    }
    if (UndoCompressor(u.compressor, undo.position, &ls.compressor)) {
      ls.entries.resize(ls.entries.size() - static_cast<size_t>(ls.compressor.width));
    }
    if (UndoCompressor(u.indexer_compressor, undo.position, &ls.indexer_compressor)) {
      ls.indexer_keys.resize(ls.indexer_keys.size() - static_cast<size_t>(ls.indexer_compressor.width));
    }
  }
  --state->position;
  InvalidateDeviceCopy(state);
  return absl::OkStatus();
}

}  // namespace v4serve::model
