// Per-sequence token sampling with OpenAI's controls: greedy, temperature, top-k, top-p, min-p,
// repetition / presence / frequency penalties, a per-request seed, and top-n logprobs.
//
// Order of operations (as vLLM and transformers): penalties on the raw logits (repetition over prompt
// and output tokens, presence and frequency over output tokens), then temperature 0 → argmax (lowest id
// on ties) or temperature scaling, softmax, top-k, top-p (smallest set whose mass reaches p), min-p
// (drop tokens below min_p × the largest probability), renormalize, draw. Reported logprobs are
// log-softmax of the penalized logits before temperature (the model's distribution for that step).
//
// The random engine is per sequence and seeded from the request, so a sequence's tokens depend on its
// seed and its logits only: the same request gives the same tokens whatever it is batched with.
// A draw sorts the vocabulary only as far as its walk goes (top-k, top-p, min-p, the draw itself); the
// softmax's normalizer without a top-k cut is summed in token-id order, over the sorted order otherwise.
//
// Thread-safety: a Sampler belongs to one sequence; externally synchronized.
#ifndef V4SERVE_ENGINE_SAMPLER_H_
#define V4SERVE_ENGINE_SAMPLER_H_

#include <cstdint>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/backend.h"

namespace v4serve::engine {

struct SamplingParams {
  float temperature = 0.0f;             // 0 = greedy.
  int32_t top_k = 0;                    // 0 = off.
  float top_p = 1.0f;                   // (0, 1].
  float min_p = 0.0f;                   // [0, 1).
  float repetition_penalty = 1.0f;      // > 0; 1 = off.
  float presence_penalty = 0.0f;        // [-2, 2].
  float frequency_penalty = 0.0f;       // [-2, 2].
  std::optional<uint64_t> seed;         // Unset: the engine draws one.
  int32_t max_tokens = 16;              // > 0.
  std::vector<int32_t> stop_token_ids;  // Stop after emitting one of these (EOS is added unless ignore_eos).
  bool ignore_eos = false;
  int32_t n = 1;             // Choices per request (1..16).
  int32_t top_logprobs = 0;  // 0..20.
  bool logprobs = false;

  // INVALID_ARGUMENT naming the field.
  absl::Status Validate(int64_t vocab_size) const;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;                        // Filled when logprobs or top_logprobs.
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs best (id, logprob), best first.
};

class Sampler {
 public:
  // `params` must be valid; `seed` is the sequence's (request seed + choice index).
  Sampler(const SamplingParams& params, uint64_t seed);

  // Records prompt tokens (repetition penalty applies to them).
  void AddPromptTokens(absl::Span<const int32_t> tokens);
  // Picks the next token from `logits` [vocab] and records it as an output token.
  SampledToken Sample(absl::Span<const float> logits);
  // Whether Sample is an argmax of the logits as given that reports nothing else (temperature 0, no
  // penalties, no logprobs): then the model may pick the token itself (Model::DecodeChunksGreedy) and
  // RecordSampled takes it.
  bool GreedyWithoutLogits() const {
    return params_.temperature == 0.0f && params_.repetition_penalty == 1.0f &&
           params_.presence_penalty == 0.0f && params_.frequency_penalty == 0.0f && !params_.logprobs &&
           params_.top_logprobs == 0;
  }
  // Whether Sample needs no more of a row than model::TopLogits with m candidates gives: no penalties (they
  // move logits), top_k <= m, top_logprobs < m.
  bool SamplesFromTop(int64_t m) const;
  // Sample from row r of `top`: the same token and report as Sample on the whole row (with the CPU's sums;
  // a GPU's normalizer can differ in its last bits). Reads the whole row (top.full_row) only when the walk
  // goes past the candidates, equal top logprobs reach the last one, or the settings need more than them
  // (!SamplesFromTop(top.m): penalties, a larger top-k).
  absl::StatusOr<SampledToken> SampleTop(const model::TopLogits& top, int64_t r);
  // Records a token that another worker's Sampler with the same params and seed picked as this
  // sequence's next output (disaggregated prefill samples the first token): counts it for penalties and
  // advances the random engine as Sample would have, so later draws equal a colocated run's.
  void RecordSampled(int32_t id);

 private:
  // Sample with the engine's draw already taken (`raw`: its output, unused at temperature 0).
  SampledToken SampleRow(absl::Span<const float> logits, uint64_t raw);

  SamplingParams params_;
  std::mt19937_64 rng_;
  absl::flat_hash_map<int32_t, int32_t> output_counts_;
  absl::flat_hash_map<int32_t, bool> seen_;  // Prompt or output.
  std::vector<float> work_;
  std::vector<int32_t> order_;  // Token ids in the sampling order, as far as a draw sorted them.
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_SAMPLER_H_
