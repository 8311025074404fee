#include "model/cpu/block.h"

#include "model/cpu/mhc.h"
#include "model/cpu/moe.h"
#include "model/cpu/ops.h"

namespace v4serve::model::cpu {

void BlockForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, int64_t layer, bool hash,
                  const LayerRopes& ropes, const int32_t* tokens, int64_t rows,
                  const std::vector<Segment>& segments, float* streams) {
  const int64_t d = c.hidden_size;
  std::vector<float> collapsed, sub_out;
  std::vector<HcMix> mixes;
  HcPre(c, num, w.hc_attn, streams, rows, &collapsed, &mixes);
  RmsNorm(collapsed.data(), rows, d, w.attn_norm.data(), c.rms_norm_eps);
  num.Bf(&collapsed);
  AttentionForward(c, num, w, layer, ropes, collapsed.data(), rows, segments, &sub_out);
  HcPost(c, num, mixes, sub_out.data(), rows, streams);

  HcPre(c, num, w.hc_ffn, streams, rows, &collapsed, &mixes);
  RmsNorm(collapsed.data(), rows, d, w.ffn_norm.data(), c.rms_norm_eps);
  num.Bf(&collapsed);
  MoeForward(c, num, w, hash, collapsed.data(), tokens, rows, &sub_out);
  HcPost(c, num, mixes, sub_out.data(), rows, streams);
}

}  // namespace v4serve::model::cpu
