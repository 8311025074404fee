// The MoE sub-block: hash (tid2eid) or score routing (sqrt-softplus + bias for selection only), routed
// experts with clamped SwiGLU, and the shared expert.
#ifndef V4SERVE_MODEL_CPU_MOE_H_
#define V4SERVE_MODEL_CPU_MOE_H_

#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/cpu/numerics.h"
#include "model/cpu/weights.h"

namespace v4serve::model::cpu {

// The routed experts of `rows` rows: k (expert, weight) pairs per row, in selection order; weights are
// normalized and scaled by routed_scaling_factor.
struct MoeRouting {
  int64_t k = 0;
  std::vector<int32_t> expert;  // [rows * k]
  std::vector<float> weight;    // [rows * k]
};
MoeRouting RouteMoe(const ModelConfig& c, const Numerics& num, const BlockWeights& w, bool hash,
                    const float* x, const int32_t* tokens, int64_t rows);

// One SwiGLU expert on `n` rows of x; `row_weight` (one per row, or null) multiplies before w2.
void ExpertForward(const ModelConfig& c, const Numerics& num, const ExpertWeights& e, const float* x,
                   int64_t n, const float* row_weight, std::vector<float>* out);

// `x` [rows, D] (ffn_norm'd), `tokens` [rows] (for hash routing); writes `out` [rows, D].
void MoeForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, bool hash, const float* x,
                const int32_t* tokens, int64_t rows, std::vector<float>* out);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_MOE_H_
