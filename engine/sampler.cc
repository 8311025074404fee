#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace v4serve::engine {

absl::Status SamplingParams::Validate(int64_t vocab_size) const {
  auto bad = [](const char* field, auto value) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.", field, " out of range: ", value));
  };
  if (!(temperature >= 0.0f) || temperature > 100.0f) return bad("temperature", temperature);
  if (top_k < 0) return bad("top_k", top_k);
  if (!(top_p > 0.0f && top_p <= 1.0f)) return bad("top_p", top_p);
  if (!(min_p >= 0.0f && min_p < 1.0f)) return bad("min_p", min_p);
  if (!(repetition_penalty > 0.0f)) return bad("repetition_penalty", repetition_penalty);
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f))
    return bad("presence_penalty", presence_penalty);
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f))
    return bad("frequency_penalty", frequency_penalty);
  if (max_tokens <= 0) return bad("max_tokens", max_tokens);
  if (n < 1 || n > 16) return bad("n", n);
  if (top_logprobs < 0 || top_logprobs > 20) return bad("top_logprobs", top_logprobs);
  for (int32_t id : stop_token_ids) {
    if (id < 0 || id >= vocab_size) return bad("stop_token_ids", id);
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params, uint64_t seed) : params_(params), rng_(seed) {}

void Sampler::RecordSampled(int32_t id) {
  if (params_.temperature > 0.0f) rng_.discard(1);  // Sample draws exactly once when not greedy.
  ++output_counts_[id];
  if (params_.repetition_penalty != 1.0f) seen_[id] = true;
}

void Sampler::AddPromptTokens(absl::Span<const int32_t> tokens) {
  if (params_.repetition_penalty == 1.0f) return;
  for (int32_t t : tokens) seen_[t] = true;
}

namespace {
// The sampling order: larger logit first, lower id first among equals (a total order).
struct ByLogit {
  const std::vector<float>* w;
  bool operator()(int32_t a, int32_t b) const {
    const float x = (*w)[static_cast<size_t>(a)], y = (*w)[static_cast<size_t>(b)];
    return x != y ? x > y : a < b;
  }
};
}  // namespace

// Makes order_[0 .. m) the first m tokens of the sampling order (sorted); order_[sorted_ ..) holds the rest.
void Sampler::EnsureSorted(size_t m) {
  m = std::min(m, order_.size());
  if (m <= sorted_) return;
  // Grow geometrically, so that a walk far down the order costs O(vocab log vocab) at most overall.
  m = std::min(order_.size(), std::max(m, 4 * sorted_));
  const ByLogit by{&work_};
  const auto first = order_.begin() + static_cast<ptrdiff_t>(sorted_),
             mid = order_.begin() + static_cast<ptrdiff_t>(m);
  if (mid != order_.end()) std::nth_element(first, mid, order_.end(), by);
  std::sort(first, mid, by);
  sorted_ = m;
}

int32_t Sampler::Draw() {
  const size_t vocab = work_.size();
  order_.resize(vocab);
  std::iota(order_.begin(), order_.end(), 0);
  sorted_ = 0;
  EnsureSorted(64);
  const float mx = work_[static_cast<size_t>(order_[0])];
  const float temp = params_.temperature;
  auto prob = [&](size_t i) {  // Of the i-th token in the sampling order.
    return std::exp(static_cast<double>((work_[static_cast<size_t>(order_[i])] - mx) / temp));
  };
  size_t keep = vocab;
  if (params_.top_k > 0) keep = std::min(keep, static_cast<size_t>(params_.top_k));
  // The softmax's normalizer over the kept tokens: in the sampling order under a top-k cut, over the whole
  // vocabulary in token-id order otherwise (no sort needed).
  double sum = 0;
  if (keep < vocab) {
    EnsureSorted(keep);
    for (size_t i = 0; i < keep; ++i) sum += prob(i);
  } else {
    for (float x : work_) sum += std::exp(static_cast<double>((x - mx) / temp));
  }
  double total = sum;
  bool cut = false;
  if (params_.top_p < 1.0f) {
    double acc = 0;
    size_t k = 0;
    while (k < keep) {
      EnsureSorted(k + 1);
      acc += prob(k) / sum;
      ++k;
      if (acc >= params_.top_p) break;
    }
    cut = cut || k < keep;
    keep = k;
  }
  if (params_.min_p > 0.0f) {
    const double floor = params_.min_p;  // prob(0) = 1 is the largest.
    size_t k = 1;
    while (k < keep) {
      EnsureSorted(k + 1);
      if (prob(k) < floor) break;
      ++k;
    }
    cut = cut || k < keep;
    keep = k;
  }
  if (cut) {  // Renormalize over what is left, in the sampling order.
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += prob(i);
  }
  // Uniform in [0, total) from the top 53 bits: the same draw on every platform (std::uniform_real
  // distribution is implementation-defined).
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    EnsureSorted(i + 1);
    acc += prob(i);
    if (u < acc) return order_[i];
  }
  EnsureSorted(keep);  // Rounding left u at the end: the last kept token.
  return order_[keep - 1];
}

SampledToken Sampler::Sample(absl::Span<const float> logits) {
  const size_t vocab = logits.size();
  work_.assign(logits.begin(), logits.end());
  // Penalties.
  if (params_.repetition_penalty != 1.0f) {
    for (const auto& [t, unused] : seen_) {
      float& x = work_[static_cast<size_t>(t)];
      x = x > 0 ? x / params_.repetition_penalty : x * params_.repetition_penalty;
    }
  }
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) {
    for (const auto& [t, count] : output_counts_) {
      work_[static_cast<size_t>(t)] -=
          params_.frequency_penalty * static_cast<float>(count) + params_.presence_penalty;
    }
  }
  SampledToken out;
  // Log-softmax of the penalized logits, for reporting.
  std::vector<float> logprobs;
  if (params_.logprobs || params_.top_logprobs > 0) {
    const float mx = *std::max_element(work_.begin(), work_.end());
    double sum = 0;
    for (float x : work_) sum += std::exp(static_cast<double>(x - mx));
    const float lse = mx + static_cast<float>(std::log(sum));
    logprobs.resize(vocab);
    for (size_t i = 0; i < vocab; ++i) logprobs[i] = work_[i] - lse;
  }
  if (params_.temperature == 0.0f) {
    out.id = static_cast<int32_t>(std::max_element(work_.begin(), work_.end()) - work_.begin());
  } else {
    out.id = Draw();
  }
  if (!logprobs.empty()) {
    out.logprob = logprobs[static_cast<size_t>(out.id)];
    if (params_.top_logprobs > 0) {
      std::vector<int32_t> idx(vocab);
      std::iota(idx.begin(), idx.end(), 0);
      const size_t n = std::min(vocab, static_cast<size_t>(params_.top_logprobs));
      std::partial_sort(idx.begin(), idx.begin() + static_cast<ptrdiff_t>(n), idx.end(),
                        [&](int32_t a, int32_t b) {
                          return logprobs[a] != logprobs[b] ? logprobs[a] > logprobs[b] : a < b;
                        });
      for (size_t i = 0; i < n; ++i) out.top.emplace_back(idx[i], logprobs[static_cast<size_t>(idx[i])]);
    }
  }
  ++output_counts_[out.id];
  if (params_.repetition_penalty != 1.0f) seen_[out.id] = true;
  return out;
}

}  // namespace v4serve::engine
