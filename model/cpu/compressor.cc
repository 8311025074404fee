#include "model/cpu/compressor.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace v4serve::model::cpu {

bool CompressorPush(const CompressorWeights& w, const RopeTable& rope, int64_t rope_dim, double eps,
                    const Numerics& num, bool indexer, const float* kv, const float* score, int64_t pos,
                    CompressorState* s, std::vector<float>* entries) {
  const int64_t m = s->ratio, width = s->width, coff = s->overlap ? 2 : 1, row = coff * width;
  if (!CompressorWriteRow(kv, score, &w.ape[(pos % m) * row], pos, s)) return false;

  // Pool per feature with a softmax over the window's slots. Overlap: the first half of the features of
  // the previous window's m slots, then the second half of the current window's m slots.
  std::vector<float> entry(static_cast<size_t>(width));
  std::vector<float> sc, vals;
  for (int64_t f = 0; f < width; ++f) {
    sc.clear();
    vals.clear();
    if (s->overlap && s->has_prev) {
      for (int64_t j = 0; j < m; ++j) {
        sc.push_back(s->prev_score[j * row + f]);
        vals.push_back(s->prev_kv[j * row + f]);
      }
    }
    const int64_t off = s->overlap ? width : 0;
    for (int64_t j = 0; j < m; ++j) {
      sc.push_back(s->score[j * row + off + f]);
      vals.push_back(s->kv[j * row + off + f]);
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (float v : sc) mx = std::max(mx, v);
    if (num.faithful) {  // Softmax pooling in FP64, rounded once to FP32.
      std::vector<double> e(sc.size());
      double denom = 0;
      for (size_t j = 0; j < sc.size(); ++j) denom += (e[j] = std::exp(static_cast<double>(sc[j]) - mx));
      double acc = 0;
      for (size_t j = 0; j < sc.size(); ++j) acc += (e[j] / denom) * vals[j];
      entry[f] = static_cast<float>(acc);
      continue;
    }
    float denom = 0;
    for (float& v : sc) {
      v = std::exp(v - mx);
      denom += v;
    }
    float acc = 0;
    for (size_t j = 0; j < sc.size(); ++j) acc += (sc[j] / denom) * vals[j];
    entry[f] = acc;
  }
  num.Bf(&entry);
  RmsNorm(entry.data(), 1, width, w.norm.data(), eps);
  num.Bf(&entry);
  rope.Apply(entry.data() + width - rope_dim, pos + 1 - m, /*inverse=*/false, num.faithful);
  num.Bf(&entry);
  if (indexer) {
    if (num.faithful) {
      HadamardRows(entry.data(), 1, width);
      num.Bf(&entry);
      num.Fp4Blocks(entry.data(), 1, width, 32);
    }
  } else {
    num.Fp8Blocks(entry.data(), 1, width, width - rope_dim, 64);
  }
  entries->insert(entries->end(), entry.begin(), entry.end());
  CompressorCloseWindow(s);
  return true;
}

bool CompressorWriteRow(const float* kv, const float* score, const float* bias, int64_t pos,
                        CompressorState* s) {
  const int64_t m = s->ratio, row = (s->overlap ? 2 : 1) * s->width;
  const int64_t slot = pos % m;
  std::copy(kv, kv + row, s->kv.begin() + slot * row);
  for (int64_t f = 0; f < row; ++f) s->score[slot * row + f] = bias ? score[f] + bias[f] : score[f];
  s->filled = slot + 1;
  return slot + 1 == m;
}

void CompressorCloseWindow(CompressorState* s) {
  if (s->overlap) {
    s->prev_kv = s->kv;
    s->prev_score = s->score;
    s->has_prev = true;
  }
  s->filled = 0;
}

}  // namespace v4serve::model::cpu
