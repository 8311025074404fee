#include "engine/engine_metrics.h"

#include "services/metrics.h"

namespace v4serve::engine {
namespace {

using services::MakeCounter;
using services::MakeGauge;

prometheus::Histogram& MakeHistogram(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add(
      {}, prometheus::Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                  2.5, 5, 10, 30});
}

}  // namespace

EngineMetrics::EngineMetrics(prometheus::Registry& r)
    : running_(MakeGauge(r, "v4serve_engine_running_sequences", "Sequences being prefilled or decoded.")),
      waiting_(MakeGauge(r, "v4serve_engine_waiting_sequences", "Sequences waiting for admission.")),
      swapped_(MakeGauge(r, "v4serve_engine_swapped_sequences",
                         "Preempted sequences whose state is in host memory.")),
      blocks_used_(
          MakeGauge(r, "v4serve_engine_kv_blocks_used", "KV blocks held (sequences or prefix cache).")),
      blocks_free_(MakeGauge(r, "v4serve_engine_kv_blocks_free", "KV blocks free.")),
      blocks_cached_(MakeGauge(r, "v4serve_engine_kv_blocks_cached", "KV blocks in the prefix cache.")),
      tokens_per_second_(MakeGauge(r, "v4serve_engine_generated_tokens_per_second",
                                   "Generated tokens per second over the last interval (>= 1 s).")),
      prefix_hit_tokens_(MakeCounter(r, "v4serve_engine_prefix_hit_tokens_total",
                                     "Prompt tokens restored from the prefix cache instead of computed.")),
      prefill_tokens_(
          MakeCounter(r, "v4serve_engine_prefill_tokens_computed_total", "Tokens run through prefill.")),
      generated_tokens_(MakeCounter(r, "v4serve_engine_generated_tokens_total", "Tokens generated.")),
      preemptions_(MakeCounter(r, "v4serve_engine_preemptions_total", "Sequences preempted for KV memory.")),
      steps_(MakeCounter(r, "v4serve_engine_steps_total", "Engine scheduling steps.")),
      mtp_draft_tokens_(MakeCounter(r, "v4serve_engine_mtp_draft_tokens_total",
                                    "MTP draft tokens verified (accepted + rejected).")),
      mtp_accepted_tokens_(MakeCounter(r, "v4serve_engine_mtp_accepted_tokens_total",
                                       "MTP draft tokens the model's own choice confirmed.")),
      mtp_acceptance_rate_(MakeGauge(r, "v4serve_engine_mtp_acceptance_rate",
                                     "Accepted / verified MTP drafts since start (0 before the first).")),
      ttft_(MakeHistogram(r, "v4serve_engine_time_to_first_token_seconds", "Arrival to first token.")),
      inter_token_(
          MakeHistogram(r, "v4serve_engine_inter_token_seconds", "Time between a sequence's tokens.")) {}

void EngineMetrics::Update(EngineStats* s, absl::Time now) {
  waiting_.Set(static_cast<double>(s->waiting));
  swapped_.Set(static_cast<double>(s->swapped));
  blocks_used_.Set(static_cast<double>(s->kv_blocks_used));
  blocks_free_.Set(static_cast<double>(s->kv_blocks_free));
  blocks_cached_.Set(static_cast<double>(s->kv_blocks_cached));
  prefix_hit_tokens_.Increment(static_cast<double>(s->prefix_hit_tokens - last_.prefix_hit_tokens));
  prefill_tokens_.Increment(static_cast<double>(s->prefill_tokens_computed - last_.prefill_tokens_computed));
  generated_tokens_.Increment(static_cast<double>(s->generated_tokens - last_.generated_tokens));
  preemptions_.Increment(static_cast<double>(s->preemptions - last_.preemptions));
  steps_.Increment(static_cast<double>(s->steps - last_.steps));
  mtp_draft_tokens_.Increment(static_cast<double>(s->mtp_draft_tokens - last_.mtp_draft_tokens));
  mtp_accepted_tokens_.Increment(static_cast<double>(s->mtp_accepted_tokens - last_.mtp_accepted_tokens));
  if (s->mtp_draft_tokens > 0) {
    mtp_acceptance_rate_.Set(static_cast<double>(s->mtp_accepted_tokens) /
                             static_cast<double>(s->mtp_draft_tokens));
  }
  for (double v : s->ttft_s) ttft_.Observe(v);
  for (double v : s->inter_token_s) inter_token_.Observe(v);
  s->ttft_s.clear();
  s->inter_token_s.clear();
  if (rate_start_ == absl::InfinitePast()) {
    rate_start_ = now;
    rate_start_tokens_ = s->generated_tokens;
  } else if (now - rate_start_ >= absl::Seconds(1)) {
    tokens_per_second_.Set(static_cast<double>(s->generated_tokens - rate_start_tokens_) /
                           absl::ToDoubleSeconds(now - rate_start_));
    rate_start_ = now;
    rate_start_tokens_ = s->generated_tokens;
  }
  last_ = *s;
  // Last, so that a scrape that sees the engine idle also sees the counters of the step that made it so.
  running_.Set(static_cast<double>(s->running));
}

}  // namespace v4serve::engine
