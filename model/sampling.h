// Token sampling from logits: greedy (temperature 0) or temperature / top-k / top-p sampling with a
// caller-owned random engine (deterministic for a seed).
#ifndef V4SERVE_MODEL_SAMPLING_H_
#define V4SERVE_MODEL_SAMPLING_H_

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"

namespace v4serve::model {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax, lowest id on ties).
  int32_t top_k = 0;         // 0 = no top-k cut.
  float top_p = 1.0f;        // Nucleus mass in (0, 1].
  uint64_t seed = 0;
  int32_t max_new_tokens = 64;
  std::vector<int32_t> stop_ids;  // Generation stops after emitting one of these (e.g. EOS).
};

absl::Status ValidateSamplingOptions(const SamplingOptions& options);

// Picks one token id from `logits` [vocab].
int32_t SampleToken(const float* logits, int64_t vocab, const SamplingOptions& options, std::mt19937_64* rng);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_SAMPLING_H_
