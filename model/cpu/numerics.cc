#include "model/cpu/numerics.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/cpu/ops.h"
#include "model/numeric_formats.h"

namespace v4serve::model::cpu {
namespace {

// 2^ceil(log2(amax * (1/qmax))) by the kernels' bit trick: the exponent plus one unless a power of two.
float Pow2CeilScale(float amax, float qmax) {
  const float x = amax * (1.0f / qmax);
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const int e = static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffff) != 0 ? 1 : 0);
  return std::ldexp(1.0f, e);
}

}  // namespace

void Numerics::Bf(float* x, int64_t n) const {
  if (!faithful) return;
  for (int64_t i = 0; i < n; ++i) x[i] = RoundToBf16(x[i]);
}

void Numerics::Fp8Blocks(float* x, int64_t rows, int64_t dim, int64_t width, int64_t block) const {
  if (!faithful) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < width; b += block) {
      float* v = x + r * dim + b;
      float amax = 0;
      for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float s = Pow2CeilScale(std::max(amax, 1e-4f), 448.0f);
      for (int64_t i = 0; i < block; ++i) v[i] = RoundToFp8E4m3(std::clamp(v[i] / s, -448.0f, 448.0f)) * s;
    }
  }
}

void Numerics::Fp4Blocks(float* x, int64_t rows, int64_t dim, int64_t block) const {
  if (!faithful) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < dim; b += block) {
      float* v = x + r * dim + b;
      float amax = 0;
      for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float s = Pow2CeilScale(std::max(amax, 6.0f * std::ldexp(1.0f, -126)), 6.0f);
      for (int64_t i = 0; i < block; ++i) v[i] = RoundToFp4E2m1(std::clamp(v[i] / s, -6.0f, 6.0f)) * s;
    }
  }
}

void Numerics::Linear(const float* x, int64_t m, int64_t in, const Tensor& w, int64_t out,
                      std::vector<float>* y) const {
  if (faithful && w.quantized) {
    std::vector<float> xq(x, x + m * in);
    Fp8Blocks(xq.data(), m, in, in, 128);
    Matmul(xq.data(), m, in, w.data(), out, y);
  } else {
    Matmul(x, m, in, w.data(), out, y);
  }
  Bf(y);
}

void Numerics::Matmul(const float* x, int64_t m, int64_t in, const float* w, int64_t out,
                      std::vector<float>* y) const {
  if (faithful) {
    MatmulWtF64(x, m, in, w, out, y);
  } else {
    MatmulWt(x, m, in, w, out, y);
  }
}

float Numerics::Dot(const float* a, const float* b, int64_t n) const {
  if (faithful) return static_cast<float>(DotF64(a, b, n));
  float acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

float Numerics::Exp(float x) const {
  return faithful ? static_cast<float>(std::exp(static_cast<double>(x))) : std::exp(x);
}

float Numerics::Sigmoid(float x) const {
  if (!faithful) return cpu::Sigmoid(x);
  return static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(x))));
}

float Numerics::Silu(float x) const {
  if (!faithful) return cpu::Silu(x);
  const double v = x;
  return static_cast<float>(v / (1.0 + std::exp(-v)));
}

void HadamardRows(float* x, int64_t rows, int64_t dim) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> v(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * dim;
    std::copy(row, row + dim, v.begin());
    for (int64_t h = 1; h < dim; h *= 2) {
      for (int64_t i = 0; i < dim; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const double a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    for (int64_t i = 0; i < dim; ++i) row[i] = static_cast<float>(v[i] * scale);
  }
}

}  // namespace v4serve::model::cpu
