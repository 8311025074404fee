#include "model/cpu/mhc.h"

#include <algorithm>
#include <cmath>

#include "model/cpu/ops.h"

namespace v4serve::model::cpu {
namespace {

// mixes[o] = (fn[o] · x) / rms(x) for the flattened streams x of one token.
void Mixes(const Numerics& num, const float* fn, int64_t outs, const float* x, int64_t len, double eps,
           float* mixes) {
  const double ss = DotF64(x, x, len);
  const float rs = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(len) + eps));
  for (int64_t o = 0; o < outs; ++o) mixes[o] = num.Dot(fn + o * len, x, len) * rs;
}

// y = Σ_j pre[j] · x[j] over the hc streams of one token (then BF16 in the faithful mode).
void Collapse(const Numerics& num, const float* pre, const float* x, int64_t hc, int64_t d, float* y) {
  if (num.faithful) {
    for (int64_t i = 0; i < d; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(pre[j]) * x[j * d + i];
      y[i] = static_cast<float>(acc);
    }
  } else {
    std::fill(y, y + d, 0.0f);
    for (int64_t j = 0; j < hc; ++j) {
      for (int64_t i = 0; i < d; ++i) y[i] += pre[j] * x[j * d + i];
    }
  }
  num.Bf(y, d);
}

// Faithful comb matrix: row softmax + eps and the Sinkhorn normalizations in FP64, rounded once to FP32.
void SinkhornF64(const float* logits, int64_t hc, int64_t iters, double eps, float* comb) {
  std::vector<double> cm(static_cast<size_t>(hc * hc));
  for (int64_t j = 0; j < hc; ++j) {
    float mx = -INFINITY;
    for (int64_t k = 0; k < hc; ++k) mx = std::max(mx, logits[j * hc + k]);
    double s = 0;
    for (int64_t k = 0; k < hc; ++k) {
      s += (cm[j * hc + k] = std::exp(static_cast<double>(logits[j * hc + k]) - mx));
    }
    for (int64_t k = 0; k < hc; ++k) cm[j * hc + k] = cm[j * hc + k] / s + eps;
  }
  auto col_norm = [&] {
    for (int64_t k = 0; k < hc; ++k) {
      double s = 0;
      for (int64_t j = 0; j < hc; ++j) s += cm[j * hc + k];
      for (int64_t j = 0; j < hc; ++j) cm[j * hc + k] /= (s + eps);
    }
  };
  auto row_norm = [&] {
    for (int64_t j = 0; j < hc; ++j) {
      double s = 0;
      for (int64_t k = 0; k < hc; ++k) s += cm[j * hc + k];
      for (int64_t k = 0; k < hc; ++k) cm[j * hc + k] /= (s + eps);
    }
  };
  col_norm();
  for (int64_t it = 1; it < iters; ++it) {
    row_norm();
    col_norm();
  }
  for (int64_t i = 0; i < hc * hc; ++i) comb[i] = static_cast<float>(cm[i]);
}

}  // namespace

void HcPre(const ModelConfig& c, const Numerics& num, const HcWeights& w, const float* streams, int64_t n,
           std::vector<float>* collapsed, std::vector<HcMix>* mixes) {
  const int64_t hc = c.hc_mult, d = c.hidden_size, mix = (2 + hc) * hc;
  const float eps = static_cast<float>(c.hc_eps);
  collapsed->assign(static_cast<size_t>(n * d), 0.0f);
  mixes->assign(static_cast<size_t>(n), HcMix{});
  ParallelFor(n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> m(static_cast<size_t>(mix));
    for (int64_t t = b; t < e; ++t) {
      const float* x = streams + t * hc * d;
      Mixes(num, w.fn.data(), mix, x, hc * d, c.rms_norm_eps, m.data());
      HcMix& hm = (*mixes)[t];
      hm.post.resize(hc);
      hm.comb.resize(hc * hc);
      std::vector<float> pre(hc);
      for (int64_t j = 0; j < hc; ++j) {
        pre[j] = num.Sigmoid(m[j] * w.scale[0] + w.base[j]) + eps;
        hm.post[j] = 2.0f * num.Sigmoid(m[hc + j] * w.scale[1] + w.base[hc + j]);
      }
      float* cm = hm.comb.data();
      if (num.faithful) {
        for (int64_t j = 0; j < hc * hc; ++j) cm[j] = m[2 * hc + j] * w.scale[2] + w.base[2 * hc + j];
        SinkhornF64(cm, hc, c.hc_sinkhorn_iters, c.hc_eps, cm);
        Collapse(num, pre.data(), x, hc, d, collapsed->data() + t * d);
        continue;
      }
      for (int64_t j = 0; j < hc; ++j) {  // Row softmax (over k) + eps.
        float mx = -INFINITY;
        for (int64_t k = 0; k < hc; ++k) {
          cm[j * hc + k] = m[2 * hc + j * hc + k] * w.scale[2] + w.base[2 * hc + j * hc + k];
          mx = std::max(mx, cm[j * hc + k]);
        }
        float s = 0;
        for (int64_t k = 0; k < hc; ++k) s += (cm[j * hc + k] = std::exp(cm[j * hc + k] - mx));
        for (int64_t k = 0; k < hc; ++k) cm[j * hc + k] = cm[j * hc + k] / s + eps;
      }
      auto col_norm = [&] {
        for (int64_t k = 0; k < hc; ++k) {
          float s = 0;
          for (int64_t j = 0; j < hc; ++j) s += cm[j * hc + k];
          for (int64_t j = 0; j < hc; ++j) cm[j * hc + k] /= (s + eps);
        }
      };
      auto row_norm = [&] {
        for (int64_t j = 0; j < hc; ++j) {
          float s = 0;
          for (int64_t k = 0; k < hc; ++k) s += cm[j * hc + k];
          for (int64_t k = 0; k < hc; ++k) cm[j * hc + k] /= (s + eps);
        }
      };
      col_norm();
      for (int64_t it = 1; it < c.hc_sinkhorn_iters; ++it) {
        row_norm();
        col_norm();
      }
      Collapse(num, pre.data(), x, hc, d, collapsed->data() + t * d);
    }
  });
}

void HcPost(const ModelConfig& c, const Numerics& num, const std::vector<HcMix>& mixes, const float* out,
            int64_t n, float* streams) {
  const int64_t hc = c.hc_mult, d = c.hidden_size;
  ParallelFor(n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> res(static_cast<size_t>(hc * d));
    for (int64_t t = b; t < e; ++t) {
      float* x = streams + t * hc * d;
      const HcMix& hm = mixes[t];
      for (int64_t k = 0; k < hc; ++k) {
        for (int64_t i = 0; i < d; ++i) {
          if (num.faithful) {
            double acc = static_cast<double>(hm.post[k]) * out[t * d + i];
            for (int64_t j = 0; j < hc; ++j) acc += static_cast<double>(hm.comb[j * hc + k]) * x[j * d + i];
            res[k * d + i] = static_cast<float>(acc);
          } else {
            float acc = hm.post[k] * out[t * d + i];
            for (int64_t j = 0; j < hc; ++j) acc += hm.comb[j * hc + k] * x[j * d + i];
            res[k * d + i] = acc;
          }
        }
      }
      num.Bf(&res);
      std::copy(res.begin(), res.end(), x);
    }
  });
}

void HcHead(const ModelConfig& c, const Numerics& num, const HcWeights& w, const float* streams, int64_t n,
            std::vector<float>* out) {
  const int64_t hc = c.hc_mult, d = c.hidden_size;
  out->assign(static_cast<size_t>(n * d), 0.0f);
  std::vector<float> m(static_cast<size_t>(hc)), pre(static_cast<size_t>(hc));
  for (int64_t t = 0; t < n; ++t) {
    const float* x = streams + t * hc * d;
    Mixes(num, w.fn.data(), hc, x, hc * d, c.rms_norm_eps, m.data());
    for (int64_t j = 0; j < hc; ++j) {
      pre[j] = num.Sigmoid(m[j] * w.scale[0] + w.base[j]) + static_cast<float>(c.hc_eps);
    }
    Collapse(num, pre.data(), x, hc, d, out->data() + t * d);
  }
}

}  // namespace v4serve::model::cpu
