#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace v4serve::model {

absl::Status ValidateSamplingOptions(const SamplingOptions& o) {
  if (!(o.temperature >= 0.0f)) return absl::InvalidArgumentError("temperature must be >= 0");
  if (o.top_k < 0) return absl::InvalidArgumentError("top_k must be >= 0");
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) return absl::InvalidArgumentError("top_p must be in (0, 1]");
  if (o.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  return absl::OkStatus();
}

int32_t SampleToken(const float* logits, int64_t vocab, const SamplingOptions& o, std::mt19937_64* rng) {
  if (o.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = ids.size();
  if (o.top_k > 0) keep = std::min(keep, static_cast<size_t>(o.top_k));
  std::vector<double> p(keep);
  const double mx = logits[ids[0]];
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((logits[ids[i]] - mx) / o.temperature));
  if (o.top_p < 1.0f) {
    double acc = 0;
    for (size_t i = 0; i < keep; ++i) {
      acc += p[i] / sum;
      if (acc >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  std::discrete_distribution<size_t> dist(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep));
  return ids[dist(*rng)];
}

}  // namespace v4serve::model
