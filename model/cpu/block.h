// One transformer block of the CPU forward pass: mHC around attention and around the MoE.
#ifndef V4SERVE_MODEL_CPU_BLOCK_H_
#define V4SERVE_MODEL_CPU_BLOCK_H_

#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/cpu/attention.h"
#include "model/cpu/numerics.h"
#include "model/cpu/weights.h"

namespace v4serve::model::cpu {

// Runs block `layer` (weights `w`, hash-routed when `hash`) on `streams` [rows, hc, D] in place; `tokens`
// [rows] feed hash routing; `segments` map rows to sequences and their layer states (advanced in place).
void BlockForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, int64_t layer, bool hash,
                  const LayerRopes& ropes, const int32_t* tokens, int64_t rows,
                  const std::vector<Segment>& segments, float* streams);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_BLOCK_H_
