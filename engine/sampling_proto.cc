#include "engine/sampling_proto.h"

#include <algorithm>

namespace v4serve::engine {

absl::StatusOr<SamplingParams> SamplingFromProto(const v1::SamplingParams& s, int64_t room) {
  SamplingParams p;
  p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  if (s.has_top_p()) p.top_p = s.top_p();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_min_p()) p.min_p = s.min_p();
  if (s.has_repetition_penalty()) p.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) p.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) p.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) p.seed = s.seed();
  if (s.max_tokens() < 0) return absl::InvalidArgumentError("sampling.max_tokens must be >= 0");
  p.max_tokens = static_cast<int32_t>(s.max_tokens() == 0 ? room : std::min<int64_t>(s.max_tokens(), room));
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  p.n = s.n() == 0 ? 1 : s.n();
  p.top_logprobs = s.top_logprobs();
  p.logprobs = s.logprobs();
  return p;
}

}  // namespace v4serve::engine
