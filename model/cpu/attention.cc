#include "model/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/cpu/compressor.h"
#include "model/numeric_formats.h"

namespace v4serve::model::cpu {

std::vector<int64_t> TopKIndices(const std::vector<float>& scores, int64_t k) {
  std::vector<int64_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::min<int64_t>(k, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

namespace {

// Attention of one query head over a key list; `keys` are pointers to head_dim vectors (K = V).
void AttendHead(const float* q, const std::vector<const float*>& keys, int64_t hd, float scale, float sink,
                float* o) {
  std::vector<float> logits(keys.size());
  float mx = sink;
  for (size_t j = 0; j < keys.size(); ++j) {
    float acc = 0;
    for (int64_t i = 0; i < hd; ++i) acc += q[i] * keys[j][i];
    logits[j] = acc * scale;
    mx = std::max(mx, logits[j]);
  }
  float denom = std::exp(sink - mx);
  for (float& l : logits) denom += (l = std::exp(l - mx));
  std::fill(o, o + hd, 0.0f);
  for (size_t j = 0; j < keys.size(); ++j) {
    const float p = logits[j] / denom;
    for (int64_t i = 0; i < hd; ++i) o[i] += p * keys[j][i];
  }
}

// The faithful mode's AttendHead: scores rounded once to FP32 from FP64 dot products (scaled in FP64);
// the softmax with the sink and the weighted sum of the keys in FP64, each output rounded once to FP32.
void AttendHeadF64(const float* q, const std::vector<const float*>& keys, int64_t hd, float sink, float* o) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  std::vector<double> e(keys.size());
  float mx = sink;
  for (size_t j = 0; j < keys.size(); ++j) {
    const float logit = static_cast<float>(DotF64(q, keys[j], hd) * scale);
    e[j] = logit;
    mx = std::max(mx, logit);
  }
  double denom = std::exp(static_cast<double>(sink) - mx);
  for (double& v : e) denom += (v = std::exp(v - mx));
  std::vector<double> acc(static_cast<size_t>(hd), 0.0);
  for (size_t j = 0; j < keys.size(); ++j) {
    for (int64_t i = 0; i < hd; ++i) acc[i] += e[j] * keys[j][i];
  }
  for (int64_t i = 0; i < hd; ++i) o[i] = static_cast<float>(acc[i] / denom);
}

}  // namespace

void AttentionForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, int64_t layer,
                      const LayerRopes& ropes, const float* x, int64_t rows,
                      const std::vector<Segment>& segments, std::vector<float>* out) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads, hd = c.head_dim, rd = c.qk_rope_head_dim;
  const int64_t win = c.sliding_window, ratio = c.compress_ratios[static_cast<size_t>(layer)];
  const bool csa = ratio == 4;
  const RopeTable& rope = ratio > 0 ? *ropes.compress : *ropes.main;
  const double eps = c.rms_norm_eps;

  // Projections for every row of the batch.
  std::vector<float> qr, q, kv;
  num.Linear(x, rows, d, w.wq_a, c.q_lora_rank, &qr);
  RmsNorm(qr.data(), rows, c.q_lora_rank, w.q_norm.data(), eps);
  num.Bf(&qr);
  num.Linear(qr.data(), rows, c.q_lora_rank, w.wq_b, h * hd, &q);
  if (num.faithful) {  // DeepSeek normalizes q in BF16: mean of squares, rsqrt and product each rounded.
    for (int64_t i = 0; i < rows * h; ++i) {
      float* v = &q[i * hd];
      double ss = 0;
      for (int64_t j = 0; j < hd; ++j) ss += RoundToBf16(v[j] * v[j]);
      const float ms = RoundToBf16(static_cast<float>(ss / static_cast<double>(hd)));
      const float r = RoundToBf16(static_cast<float>(1.0 / std::sqrt(static_cast<double>(ms) + eps)));
      for (int64_t j = 0; j < hd; ++j) v[j] = RoundToBf16(v[j] * r);
    }
  } else {
    RmsNorm(q.data(), rows * h, hd, nullptr, eps);
  }
  num.Linear(x, rows, d, w.wkv, hd, &kv);
  RmsNorm(kv.data(), rows, hd, w.kv_norm.data(), eps);
  num.Bf(&kv);
  std::vector<float> ckv, cscore, iq, iw, ikv, iscore;
  const int64_t coff = csa ? 2 : 1, ih = c.index_n_heads, id = c.index_head_dim;
  if (ratio > 0) {
    num.Matmul(x, rows, d, w.compressor.wkv.data(), coff * hd, &ckv);
    num.Matmul(x, rows, d, w.compressor.wgate.data(), coff * hd, &cscore);
  }
  if (csa) {
    num.Linear(qr.data(), rows, c.q_lora_rank, w.indexer_wq_b, ih * id, &iq);
    num.Linear(x, rows, d, w.indexer_weights, ih, &iw);
    num.Matmul(x, rows, d, w.indexer_compressor.wkv.data(), coff * id, &ikv);
    num.Matmul(x, rows, d, w.indexer_compressor.wgate.data(), coff * id, &iscore);
  }
  std::vector<float> o(static_cast<size_t>(rows * h * hd));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float iscale =
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(id)) / std::sqrt(static_cast<double>(ih)));

  for (const Segment& seg : segments) {
    AttentionLayerState& st = *seg.state;
    // RoPE at each token's position.
    for (int64_t t = 0; t < seg.count; ++t) {
      const int64_t r = seg.begin + t, pos = seg.pos0 + t;
      for (int64_t hh = 0; hh < h; ++hh)
        rope.Apply(&q[(r * h + hh) * hd + hd - rd], pos, false, num.faithful);
      rope.Apply(&kv[r * hd + hd - rd], pos, false, num.faithful);
      num.Bf(&q[r * h * hd], h * hd);
      num.Bf(&kv[r * hd], hd);
      num.Fp8Blocks(&kv[r * hd], 1, hd, hd - rd, 64);
      if (csa) {
        for (int64_t hh = 0; hh < ih; ++hh)
          rope.Apply(&iq[(r * ih + hh) * id + id - rd], pos, false, num.faithful);
        num.Bf(&iq[r * ih * id], ih * id);
        if (num.faithful) {
          HadamardRows(&iq[r * ih * id], ih, id);
          num.Bf(&iq[r * ih * id], ih * id);
          num.Fp4Blocks(&iq[r * ih * id], ih, id, 32);
        }
        for (int64_t hh = 0; hh < ih; ++hh) iw[r * ih + hh] *= iscale;
        num.Bf(&iw[r * ih], ih);
      }
    }
    // Compressors, token by token (entries become visible to queries at or after their last token).
    for (int64_t t = 0; t < seg.count && ratio > 0; ++t) {
      const int64_t r = seg.begin + t, pos = seg.pos0 + t;
      CompressorPush(w.compressor, rope, rd, eps, num, /*indexer=*/false, &ckv[r * coff * hd],
                     &cscore[r * coff * hd], pos, &st.compressor, &st.entries);
      if (csa) {
        CompressorPush(w.indexer_compressor, rope, rd, eps, num, /*indexer=*/true, &ikv[r * coff * id],
                       &iscore[r * coff * id], pos, &st.indexer_compressor, &st.indexer_keys);
      }
    }
    // Window keys: the ring's earlier tokens, then this segment's.
    const int64_t prior = std::min(seg.pos0, win - 1);
    auto key_at = [&](int64_t pos) -> const float* {
      if (pos >= seg.pos0) return &kv[(seg.begin + pos - seg.pos0) * hd];
      return &st.window[(pos % win) * hd];
    };
    ParallelFor(seg.count, 1, [&](int64_t b, int64_t e) {
      std::vector<const float*> keys;
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = seg.begin + t, pos = seg.pos0 + t;
        keys.clear();
        for (int64_t p = std::max<int64_t>(pos - win + 1, seg.pos0 - prior); p <= pos; ++p)
          keys.push_back(key_at(p));
        if (ratio > 0) {
          const int64_t visible = (pos + 1) / ratio;
          if (!csa) {
            for (int64_t s = 0; s < visible; ++s) keys.push_back(&st.entries[s * hd]);
          } else if (visible > 0) {
            std::vector<float> sc(static_cast<size_t>(visible), 0.0f);
            for (int64_t s = 0; s < visible; ++s) {
              const float* k = &st.indexer_keys[s * id];
              if (num.faithful) {  // BF16 scores from FP64 sums, each rounded once to FP32 first.
                double acc = 0;
                for (int64_t hh = 0; hh < ih; ++hh) {
                  const float dot = RoundToBf16(static_cast<float>(DotF64(&iq[(r * ih + hh) * id], k, id)));
                  acc += static_cast<double>(std::max(dot, 0.0f)) * iw[r * ih + hh];
                }
                sc[s] = RoundToBf16(static_cast<float>(acc));
                continue;
              }
              float acc = 0;
              for (int64_t hh = 0; hh < ih; ++hh) {
                const float* qi = &iq[(r * ih + hh) * id];
                float dot = 0;
                for (int64_t i = 0; i < id; ++i) dot += qi[i] * k[i];
                acc += std::max(dot, 0.0f) * iw[r * ih + hh];
              }
              sc[s] = acc;
            }
            for (int64_t s : TopKIndices(sc, c.index_topk)) keys.push_back(&st.entries[s * hd]);
          }
        }
        for (int64_t hh = 0; hh < h; ++hh) {
          float* oh = &o[(r * h + hh) * hd];
          if (num.faithful) {
            AttendHeadF64(&q[(r * h + hh) * hd], keys, hd, w.attn_sink[hh], oh);
          } else {
            AttendHead(&q[(r * h + hh) * hd], keys, hd, scale, w.attn_sink[hh], oh);
          }
          num.Bf(oh, hd);
          rope.Apply(oh + hd - rd, pos, /*inverse=*/true, num.faithful);
          num.Bf(oh, hd);
        }
      }
    });
    // Update the window ring with this segment's last `win` tokens.
    for (int64_t t = std::max<int64_t>(0, seg.count - win); t < seg.count; ++t) {
      const int64_t pos = seg.pos0 + t;
      std::copy(&kv[(seg.begin + t) * hd], &kv[(seg.begin + t) * hd] + hd, &st.window[(pos % win) * hd]);
    }
  }

  // Grouped low-rank output: group g of heads -> rank r via rows [g*r, (g+1)*r) of wo_a, then wo_b.
  const int64_t g = c.o_groups, rank = c.o_lora_rank, gin = h * hd / g;
  std::vector<float> mid(static_cast<size_t>(rows * g * rank));
  ParallelFor(rows * g, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = i / g, gi = i % g;
      const float* xin = &o[r * h * hd + gi * gin];
      for (int64_t k = 0; k < rank; ++k) {
        mid[(r * g + gi) * rank + k] = num.Dot(xin, &w.wo_a[(gi * rank + k) * gin], gin);
      }
    }
  });
  num.Bf(&mid);
  num.Linear(mid.data(), rows, g * rank, w.wo_b, d, out);
}

}  // namespace v4serve::model::cpu
