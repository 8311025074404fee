// Dense FP32 building blocks of the CPU forward pass: a small thread pool, matrix products with weights
// stored [out, in] (as checkpoints store them), RMSNorm and interleaved RoPE tables.
//
// Thread-safety: ParallelFor may be called from one thread at a time per pool (the forward pass is
// externally synchronized); the functions below are otherwise pure.
#ifndef V4SERVE_MODEL_CPU_OPS_H_
#define V4SERVE_MODEL_CPU_OPS_H_

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "model/config.h"

namespace v4serve::model::cpu {

// Runs fn(begin, end) over [0, n) split into contiguous chunks on a process-wide pool of
// hardware_concurrency() threads (the calling thread takes a chunk too). Falls back to a plain call for
// small n.
void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

// y[m, out] = x[m, in] · W[out, in]^T, FP32 accumulation. `y` is resized.
void MatmulWt(const float* x, int64_t m, int64_t in, const float* w, int64_t out, std::vector<float>* y);

// The same product with FP64 accumulation, each result rounded once to FP32. Every product of two FP32
// values is exact in FP64 and the FP64 sum's own error (~2^-53 relative) almost never reaches the FP32
// rounding, so the result does not depend on the summation order (the faithful mode's GEMMs; see
// docs/MODEL_NOTES.md "Order-independent accumulation").
void MatmulWtF64(const float* x, int64_t m, int64_t in, const float* w, int64_t out, std::vector<float>* y);

// In place, per row of `dim`: x = x / sqrt(mean(x^2) + eps) * weight (weight may be null: unweighted).
void RmsNorm(float* x, int64_t rows, int64_t dim, const float* weight, double eps);

// Interleaved RoPE for one layer kind: inverse frequencies of the rope dims (rd / 2 of them), with YaRN
// blending when `yarn` is set.
struct RopeTable {
  std::vector<double> inv_freq;
  // Rotates the pairs (x[2i], x[2i+1]) of the `rd` dims at x by angle pos * inv_freq[i]; inverse uses -angle.
  // The angle is an FP32 product; `f64` (the faithful mode) evaluates cos, sin and the rotation in FP64 and
  // rounds each result once to FP32, otherwise they are FP32.
  void Apply(float* x, int64_t pos, bool inverse, bool f64 = false) const;
};
RopeTable MakeRopeTable(int64_t rope_dim, double base, const RopeScaling* yarn);

inline float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float Silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_OPS_H_
