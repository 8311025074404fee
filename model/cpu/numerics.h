// Fake quantization of the faithful numeric mode (MODEL.md "Precision the reference simulates"), as
// DeepSeek's kernels do it: BF16 rounding between ops, FP8 e4m3 blocks with power-of-two scales
// (amax clamped at 1e-4), FP4 e2m1 blocks of 32, the 128-point Hadamard rotation of indexer vectors.
// In the exact mode every function is the identity (or a plain FP32 matmul).
//
// Order-independent accumulation (docs/MODEL_NOTES.md): in the faithful mode every dot product, sum and
// transcendental is evaluated in FP64 and rounded once to FP32, so that each result is the correctly
// rounded FP32 of (almost always) the exact value whatever the summation order; tools/golden's PyTorch
// reference does the same, and the two implementations' FP8/BF16 roundings then agree. The exact mode
// keeps plain FP32 arithmetic.
#ifndef V4SERVE_MODEL_CPU_NUMERICS_H_
#define V4SERVE_MODEL_CPU_NUMERICS_H_

#include <cstdint>
#include <vector>

#include "model/cpu/weights.h"

namespace v4serve::model::cpu {

struct Numerics {
  bool faithful = false;

  // Rounds n values to BF16 in place.
  void Bf(float* x, int64_t n) const;
  void Bf(std::vector<float>* x) const { Bf(x->data(), static_cast<int64_t>(x->size())); }
  // FP8 e4m3 quantize-dequantize of `rows` rows of `dim` values (first `width` of each row), in blocks.
  void Fp8Blocks(float* x, int64_t rows, int64_t dim, int64_t width, int64_t block) const;
  // FP4 e2m1 quantize-dequantize in blocks of `block` (rows of dim).
  void Fp4Blocks(float* x, int64_t rows, int64_t dim, int64_t block) const;
  // y = x W^T. Faithful: an FP8/FP4-stored W takes its input through FP8 blocks of 128; the output is
  // rounded to BF16.
  void Linear(const float* x, int64_t m, int64_t in, const Tensor& w, int64_t out,
              std::vector<float>* y) const;
  // y = x W^T with neither input nor output rounding (router, compressor projections, LM head): FP32
  // accumulation in the exact mode, FP64 rounded once to FP32 in the faithful mode.
  void Matmul(const float* x, int64_t m, int64_t in, const float* w, int64_t out,
              std::vector<float>* y) const;
  // Σ a[i]·b[i]: FP32 in index order (exact mode), FP64 rounded once (faithful mode).
  float Dot(const float* a, const float* b, int64_t n) const;
  // Transcendentals: FP32 libm (exact mode), evaluated in FP64 and rounded once (faithful mode).
  float Exp(float x) const;
  float Sigmoid(float x) const;
  float Silu(float x) const;
};

// Σ a[i]·b[i] in FP64 (each product of two FP32 values is exact).
inline double DotF64(const float* a, const float* b, int64_t n) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

// Normalized Walsh-Hadamard transform of each row (dim a power of two), in place: the butterflies and the
// 1/sqrt(dim) scaling in FP64 (sums of ± BF16 values are exact there), each result rounded once to FP32.
void HadamardRows(float* x, int64_t rows, int64_t dim);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_NUMERICS_H_
