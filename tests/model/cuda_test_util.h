// Helpers of the CUDA backend's gpu tests (cuda_kernels_test.cc, cuda_backend_test.cc, cuda_kv_pages_test.cc,
// tests/engine/engine_cuda_pages_test.cc): the skip without a GPU, relative L2 distances, seeded random
// vectors and prompts, the tiny checkpoint.
#ifndef V4SERVE_TESTS_MODEL_CUDA_TEST_UTIL_H_
#define V4SERVE_TESTS_MODEL_CUDA_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/device.h"

namespace v4serve::model {

inline bool HaveGpu(std::string* why) {
  absl::StatusOr<Device> d = ResolveDevice(Device::kAuto, why);
  return d.ok() && *d == Device::kCuda;
}

#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    std::string why;                                                                \
    if (!HaveGpu(&why)) GTEST_SKIP() << "no GPU, CUDA backend not tested: " << why; \
  } while (false)

// Relative L2 distance of a from b (infinite when a has a non-finite value).
inline double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// The largest RelL2 of a row of `cols` values of a from the same row of b, and that row: a row or tile a
// kernel skips or misplaces shows here, where the whole output's distance may hide it.
struct WorstRow {
  double rel = 0;
  int64_t row = -1;
};
inline WorstRow WorstRowRelL2(const std::vector<float>& a, const std::vector<float>& b, int64_t cols) {
  EXPECT_EQ(a.size(), b.size());
  WorstRow w;
  for (int64_t r = 0; cols > 0 && (r + 1) * cols <= static_cast<int64_t>(std::min(a.size(), b.size())); ++r) {
    const double d = RelL2(std::vector<float>(a.begin() + r * cols, a.begin() + (r + 1) * cols),
                           std::vector<float>(b.begin() + r * cols, b.begin() + (r + 1) * cols));
    if (w.row < 0 || d > w.rel) w = {d, r};
  }
  return w;
}

// The tiny V4 checkpoint of the tests (tests/model/testdata/tiny_v4).
inline std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

// `n` seeded token ids in 2 .. 501.
inline std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  for (auto& x : t) x = static_cast<int32_t>(2 + rng() % 500);
  return t;
}

inline std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

}  // namespace v4serve::model

#endif  // V4SERVE_TESTS_MODEL_CUDA_TEST_UTIL_H_
