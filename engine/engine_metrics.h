// Prometheus metrics of an engine: running/waiting sequences, KV blocks used/free/cached, prefix hit
// tokens, computed and generated tokens, preemptions, tokens/s, TTFT and inter-token histograms, MTP
// drafted/accepted tokens and acceptance rate.
//
// Fed with EngineStats after each step by the one thread that drives the engine (EngineLoop);
// prometheus-cpp makes reading (scraping) safe from any thread. The registry must outlive it.
#ifndef V4SERVE_ENGINE_ENGINE_METRICS_H_
#define V4SERVE_ENGINE_ENGINE_METRICS_H_

#include "absl/time/time.h"
#include "engine/engine.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace v4serve::engine {

class EngineMetrics {
 public:
  explicit EngineMetrics(prometheus::Registry& registry);

  // Exports `stats` (counters advance by their change since the last call) and consumes its latency
  // observations. `now` paces the tokens/s gauge (updated at most once a second).
  void Update(EngineStats* stats, absl::Time now);

 private:
  prometheus::Gauge& running_;
  prometheus::Gauge& waiting_;
  prometheus::Gauge& swapped_;
  prometheus::Gauge& blocks_used_;
  prometheus::Gauge& blocks_free_;
  prometheus::Gauge& blocks_cached_;
  prometheus::Gauge& tokens_per_second_;
  prometheus::Counter& prefix_hit_tokens_;
  prometheus::Counter& prefill_tokens_;
  prometheus::Counter& generated_tokens_;
  prometheus::Counter& preemptions_;
  prometheus::Counter& steps_;
  prometheus::Counter& mtp_draft_tokens_;
  prometheus::Counter& mtp_accepted_tokens_;
  prometheus::Gauge& mtp_acceptance_rate_;
  prometheus::Histogram& ttft_;
  prometheus::Histogram& inter_token_;
  EngineStats last_;
  absl::Time rate_start_ = absl::InfinitePast();
  int64_t rate_start_tokens_ = 0;
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_ENGINE_METRICS_H_
