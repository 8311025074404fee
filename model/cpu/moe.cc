#include "model/cpu/moe.h"

#include <algorithm>
#include <cmath>

#include "model/cpu/attention.h"
#include "model/cpu/ops.h"

namespace v4serve::model::cpu {
namespace {

float Score(const Numerics& num, const std::string& func, float logit) {
  if (func == "sigmoid") return num.Sigmoid(logit);
  // softplus with the same overflow guard as torch (threshold 20); FP64 in the faithful mode.
  if (num.faithful) {
    const double x = logit;
    return static_cast<float>(std::sqrt(x > 20.0 ? x : std::log1p(std::exp(x))));
  }
  const float sp = logit > 20.0f ? logit : std::log1p(std::exp(logit));
  return std::sqrt(sp);
}

}  // namespace

// SwiGLU expert on `n` rows: out = w2(silu(min(w1 x, L)) * clamp(w3 x, -L, L)).
// The routing weight (one per row, or null) multiplies before w2, as in DeepSeek's code.
void ExpertForward(const ModelConfig& c, const Numerics& num, const ExpertWeights& e, const float* x,
                   int64_t n, const float* row_weight, std::vector<float>* out) {
  const int64_t d = c.hidden_size, inter = c.moe_intermediate_size;
  const float lim = static_cast<float>(c.swiglu_limit);
  std::vector<float> g, u;
  num.Linear(x, n, d, e.w1, inter, &g);
  num.Linear(x, n, d, e.w3, inter, &u);
  for (size_t i = 0; i < g.size(); ++i) {
    float gate = g[i], up = u[i];
    if (lim > 0) {
      gate = std::min(gate, lim);
      up = std::clamp(up, -lim, lim);
    }
    g[i] = num.Silu(gate) * up * (row_weight ? row_weight[i / inter] : 1.0f);
  }
  num.Bf(&g);
  num.Linear(g.data(), n, inter, e.w2, d, out);
}

MoeRouting RouteMoe(const ModelConfig& c, const Numerics& num, const BlockWeights& w, bool hash,
                    const float* x, const int32_t* tokens, int64_t rows) {
  const int64_t d = c.hidden_size, ne = c.n_routed_experts, k = c.num_experts_per_tok;
  std::vector<float> logits;
  num.Matmul(x, rows, d, w.gate.data(), ne, &logits);
  MoeRouting r;
  r.k = k;
  r.expert.reserve(rows * k);
  r.weight.reserve(rows * k);
  std::vector<float> scores(static_cast<size_t>(ne)), biased(static_cast<size_t>(ne));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t e = 0; e < ne; ++e) {
      scores[e] = Score(num, c.scoring_func, logits[row * ne + e]);
      biased[e] = scores[e] + (w.gate_bias.empty() ? 0.0f : w.gate_bias[e]);
    }
    std::vector<int64_t> sel;
    if (hash) {
      for (int64_t j = 0; j < k; ++j) sel.push_back(w.tid2eid[static_cast<size_t>(tokens[row]) * k + j]);
    } else {
      sel = TopKIndices(biased, k);
    }
    float sum = 0;
    if (num.faithful) {
      double s = 0;
      for (int64_t e : sel) s += scores[e];
      sum = static_cast<float>(s);
    } else {
      for (int64_t e : sel) sum += scores[e];
    }
    for (int64_t e : sel) {
      r.expert.push_back(static_cast<int32_t>(e));
      r.weight.push_back(scores[e] / sum * static_cast<float>(c.routed_scaling_factor));
    }
  }
  return r;
}

void MoeForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w, bool hash, const float* x,
                const int32_t* tokens, int64_t rows, std::vector<float>* out) {
  const int64_t d = c.hidden_size, ne = c.n_routed_experts;
  const MoeRouting routing = RouteMoe(c, num, w, hash, x, tokens, rows);
  // Per expert: the rows routed to it and their weights.
  std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(ne));
  std::vector<std::vector<float>> weight_of(static_cast<size_t>(ne));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t j = 0; j < routing.k; ++j) {
      const int32_t e = routing.expert[row * routing.k + j];
      rows_of[e].push_back(row);
      weight_of[e].push_back(routing.weight[row * routing.k + j]);
    }
  }
  ExpertForward(c, num, w.shared, x, rows, nullptr, out);
  // The faithful mode sums the shared and routed outputs in FP64 and rounds once (order-independent).
  std::vector<double> acc;
  if (num.faithful) acc.assign(out->begin(), out->end());
  std::vector<float> xin, y;
  for (int64_t e = 0; e < ne; ++e) {
    const auto& rs = rows_of[e];
    if (rs.empty()) continue;
    xin.resize(rs.size() * d);
    for (size_t i = 0; i < rs.size(); ++i) std::copy(x + rs[i] * d, x + (rs[i] + 1) * d, &xin[i * d]);
    ExpertForward(c, num, w.experts[e], xin.data(), static_cast<int64_t>(rs.size()), weight_of[e].data(), &y);
    for (size_t i = 0; i < rs.size(); ++i) {
      for (int64_t j = 0; j < d; ++j) {
        if (num.faithful) {
          acc[rs[i] * d + j] += y[i * d + j];
        } else {
          (*out)[rs[i] * d + j] += y[i * d + j];
        }
      }
    }
  }
  if (num.faithful)
    std::transform(acc.begin(), acc.end(), out->begin(), [](double v) { return static_cast<float>(v); });
  num.Bf(out);
}

}  // namespace v4serve::model::cpu
