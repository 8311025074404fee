// Helpers shared by the CUDA bench's files.
#ifndef V4SERVE_BENCH_CUDA_BENCH_UTIL_H_
#define V4SERVE_BENCH_CUDA_BENCH_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace v4serve::bench {

// Sets an environment variable for its lifetime and puts back what was there (the backends read their
// switches at construction).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name); old != nullptr) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_.has_value()) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// ||y - ref|| / ||ref|| over two outputs of one shape.
inline double RelL2(const std::vector<float>& y, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (y[i] - ref[i]) * static_cast<double>(y[i] - ref[i]);
    den += ref[i] * static_cast<double>(ref[i]);
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace v4serve::bench

#endif  // V4SERVE_BENCH_CUDA_BENCH_UTIL_H_
