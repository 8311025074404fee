// The attention sub-block of one layer (window-only, CSA or HCA) over a batch of token segments, each
// segment a run of consecutive tokens of one sequence continuing that sequence's state.
#ifndef V4SERVE_MODEL_CPU_ATTENTION_H_
#define V4SERVE_MODEL_CPU_ATTENTION_H_

#include <vector>

#include "model/config.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/sequence_state.h"

namespace v4serve::model::cpu {

struct Segment {
  AttentionLayerState* state;  // Must outlive the call; updated in place.
  int64_t pos0;                // Position of the segment's first token.
  int64_t begin;               // First row in the batch.
  int64_t count;               // Rows.
};

struct LayerRopes {
  const RopeTable* main;      // Window-only layers.
  const RopeTable* compress;  // CSA/HCA layers, their compressors and the indexer.
};

// `x` [rows, D] is the attn_norm'd collapsed input; writes `out` [rows, D].
void AttentionForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, int64_t layer,
                      const LayerRopes& ropes, const float* x, int64_t rows,
                      const std::vector<Segment>& segments, std::vector<float>* out);

// Top-k of `scores` [n] (largest first); ties go to the lower index. Deterministic.
std::vector<int64_t> TopKIndices(const std::vector<float>& scores, int64_t k);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_ATTENTION_H_
