// Manifold-constrained hyper-connections: the n_hc residual streams around each sub-block.
#ifndef V4SERVE_MODEL_CPU_MHC_H_
#define V4SERVE_MODEL_CPU_MHC_H_

#include <vector>

#include "model/config.h"
#include "model/cpu/numerics.h"
#include "model/cpu/weights.h"

namespace v4serve::model::cpu {

// Mixing weights of one token at one site.
struct HcMix {
  std::vector<float> post;  // [hc]
  std::vector<float> comb;  // [hc, hc], comb[j*hc + k]: input stream j -> output stream k.
};

// For `n` tokens of streams [n, hc, D]: writes the collapsed sub-block inputs [n, D] and each token's
// post/comb mixes (Sinkhorn-Knopp projected).
void HcPre(const ModelConfig& c, const Numerics& num, const HcWeights& w, const float* streams, int64_t n,
           std::vector<float>* collapsed, std::vector<HcMix>* mixes);

// streams[k] = post_k * out + sum_j comb[j][k] * streams[j], in place, for n tokens.
void HcPost(const ModelConfig& c, const Numerics& num, const std::vector<HcMix>& mixes, const float* out,
            int64_t n, float* streams);

// Final collapse with sigmoid weights (hc_head): [n, hc, D] -> [n, D].
void HcHead(const ModelConfig& c, const Numerics& num, const HcWeights& w, const float* streams, int64_t n,
            std::vector<float>* out);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_MHC_H_
