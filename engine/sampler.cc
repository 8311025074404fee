#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

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
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty))
    return bad("repetition_penalty", repetition_penalty);
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

// The sampling order of a row (larger logit first, lower id first among equals), as far as a draw reads it.
// FullOrder: the whole (penalized) row, sorted only as far as asked.
class FullOrder {
 public:
  FullOrder(const std::vector<float>& w, std::vector<int32_t>* order) : w_(w), order_(*order) {
    order_.resize(w_.size());
    std::iota(order_.begin(), order_.end(), 0);
  }
  size_t vocab() const { return w_.size(); }
  // Makes positions [0, m) known; always possible here.
  bool Ensure(size_t m) {
    m = std::min(m, order_.size());
    if (m <= sorted_) return true;
    // Grow geometrically, so that a walk far down the order costs O(vocab log vocab) at most overall.
    m = std::min(order_.size(), std::max(m, 4 * sorted_));
    auto by = [this](int32_t a, int32_t b) {
      return model::SamplingOrderBefore(w_[static_cast<size_t>(a)], a, w_[static_cast<size_t>(b)], b);
    };
    const auto first = order_.begin() + static_cast<ptrdiff_t>(sorted_),
               mid = order_.begin() + static_cast<ptrdiff_t>(m);
    if (mid != order_.end()) std::nth_element(first, mid, order_.end(), by);
    std::sort(first, mid, by);
    sorted_ = m;
    return true;
  }
  float value(size_t i) const { return w_[static_cast<size_t>(order_[i])]; }
  int32_t id(size_t i) const { return order_[i]; }
  // Sum over the row of exp((x - mx) / temp), in token-id order (no sort needed).
  double Norm(float mx, float temp) const { return model::SoftmaxNormalizer(w_, mx, temp); }

 private:
  const std::vector<float>& w_;
  std::vector<int32_t>& order_;
  size_t sorted_ = 0;
};

// TopOrder: row r of a model::TopLogits, whose first m positions are known.
class TopOrder {
 public:
  TopOrder(const model::TopLogits& top, int64_t r)
      : top_(top), base_(static_cast<size_t>(r * top.m)), r_(r) {}
  size_t vocab() const { return static_cast<size_t>(top_.vocab); }
  bool Ensure(size_t m) const { return m <= static_cast<size_t>(top_.m); }
  float value(size_t i) const { return top_.values[base_ + i]; }
  int32_t id(size_t i) const { return top_.ids[base_ + i]; }
  double Norm(float, float) const { return top_.norm[static_cast<size_t>(r_)]; }

 private:
  const model::TopLogits& top_;
  size_t base_;
  int64_t r_;
};

// Temperature, top-k, top-p and min-p over `order`, then the draw from `raw` (one engine output): the token,
// or nothing when the walk needs positions `order` does not know.
template <class Order>
std::optional<int32_t> Draw(Order& order, const SamplingParams& params, uint64_t raw) {
  const size_t vocab = order.vocab();
  if (!order.Ensure(1)) return std::nullopt;
  const float mx = order.value(0);
  const float temp = params.temperature;
  auto prob = [&](size_t i) {  // Of the i-th token in the sampling order.
    return std::exp(static_cast<double>((order.value(i) - mx) / temp));
  };
  size_t keep = vocab;
  if (params.top_k > 0) keep = std::min(keep, static_cast<size_t>(params.top_k));
  // The softmax's normalizer over the kept tokens: in the sampling order under a top-k cut, over the whole
  // vocabulary in token-id order otherwise (no sort needed).
  double sum = 0;
  if (keep < vocab) {
    if (!order.Ensure(keep)) return std::nullopt;
    for (size_t i = 0; i < keep; ++i) sum += prob(i);
  } else {
    sum = order.Norm(mx, temp);
  }
  double total = sum;
  bool cut = false;
  if (params.top_p < 1.0f) {
    double acc = 0;
    size_t k = 0;
    while (k < keep) {
      if (!order.Ensure(k + 1)) return std::nullopt;
      acc += prob(k) / sum;
      ++k;
      if (acc >= params.top_p) break;
    }
    cut = cut || k < keep;
    keep = k;
  }
  if (params.min_p > 0.0f) {
    const double floor = params.min_p;  // prob(0) = 1 is the largest.
    size_t k = 1;
    while (k < keep) {
      if (!order.Ensure(k + 1)) return std::nullopt;
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
  const double u = static_cast<double>(raw >> 11) * 0x1.0p-53 * total;
  double acc = 0;
  size_t last = 0;  // The last token walked with a probability above zero.
  for (size_t i = 0; i < keep; ++i) {
    if (!order.Ensure(i + 1)) return std::nullopt;
    const double p = prob(i);
    acc += p;
    if (u < acc) return order.id(i);
    if (p > 0) last = i;
  }
  // Rounding left u at the end (the uncut normalizer is summed in another order than this walk): the last
  // kept token that can be drawn at all.
  return order.id(last);
}

}  // namespace

bool Sampler::SamplesFromTop(int64_t m) const {
  return params_.repetition_penalty == 1.0f && params_.presence_penalty == 0.0f &&
         params_.frequency_penalty == 0.0f && params_.top_k <= m && params_.top_logprobs < m;
}

absl::StatusOr<SampledToken> Sampler::SampleTop(const model::TopLogits& top, int64_t r) {
  if (r < 0 || r >= top.rows || top.m < 1) return absl::OutOfRangeError("SampleTop: no such row");
  const TopOrder order(top, r);
  SampledToken out;
  uint64_t raw = 0;
  std::optional<int32_t> id;
  if (!SamplesFromTop(top.m)) {  // Penalties or cuts the candidates cannot serve: the whole row.
    if (params_.temperature > 0.0f) raw = rng_();
  } else if (params_.temperature == 0.0f) {
    id = order.id(0);  // The argmax, lowest id among equals.
  } else {
    raw = rng_();
    id = Draw(order, params_, raw);
  }
  // Log-probabilities as Sample reports them; the best top_logprobs by (logprob, then lower id) are the
  // first candidates unless equal logprobs reach past the last one.
  bool need_row = !id.has_value();
  const size_t n = static_cast<size_t>(params_.top_logprobs);
  if (!need_row && (params_.logprobs || n > 0)) {
    const float lse = order.value(0) + static_cast<float>(std::log(top.norm1[static_cast<size_t>(r)]));
    std::vector<std::pair<int32_t, float>> best;
    bool found = false;
    for (size_t i = 0; i < static_cast<size_t>(top.m); ++i) {
      const float lp = order.value(i) - lse;
      if (order.id(i) == *id) {
        out.logprob = lp;
        found = true;
      }
      if (best.size() < n || (!best.empty() && lp == best.back().second)) best.emplace_back(order.id(i), lp);
    }
    if (n > 0) {
      const float last = order.value(static_cast<size_t>(top.m) - 1) - lse;
      // A token past the candidates could tie with the n-th best (its logprob <= the last candidate's).
      need_row = static_cast<int64_t>(best.size()) < std::min<int64_t>(top.vocab, static_cast<int64_t>(n)) ||
                 (top.m < top.vocab && best.back().second <= last);
      std::sort(best.begin(), best.end(), [](const auto& a, const auto& b) {
        return a.second != b.second ? a.second > b.second : a.first < b.first;
      });
      best.resize(std::min(best.size(), n));
      out.top = std::move(best);
    }
    need_row = need_row || !found;
  }
  if (need_row) {  // The candidates did not suffice: the whole row, and the same draw.
    if (!top.full_row)
      return absl::InternalError("SampleTop: the walk needs the whole row, which is not kept");
    absl::StatusOr<std::vector<float>> row = top.full_row(r);
    if (!row.ok()) return row.status();
    return SampleRow(*row, raw);
  }
  out.id = *id;
  ++output_counts_[out.id];
  return out;
}

SampledToken Sampler::Sample(absl::Span<const float> logits) {
  return SampleRow(logits, params_.temperature > 0.0f ? rng_() : 0);
}

SampledToken Sampler::SampleRow(absl::Span<const float> logits, uint64_t raw) {
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
    const float lse = mx + static_cast<float>(std::log(model::SoftmaxNormalizer(work_, mx, 1.0f)));
    logprobs.resize(vocab);
    for (size_t i = 0; i < vocab; ++i) logprobs[i] = work_[i] - lse;
  }
  if (params_.temperature == 0.0f) {
    out.id = static_cast<int32_t>(std::max_element(work_.begin(), work_.end()) - work_.begin());
  } else {
    FullOrder order(work_, &order_);
    out.id = *Draw(order, params_, raw);
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
