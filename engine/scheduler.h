// Continuous-batching scheduler: decides, step by step, which sequences decode, which prompt chunks are
// prefilled, which waiting sequences are admitted, and which running ones are preempted.
//
// Per step, under a token budget (SchedulerOptions::max_step_tokens):
//   1. every running sequence with one pending token decodes (batched), in arrival order; when its
//      next token needs a block and none is free, the latest-arrived running sequence is preempted
//      (kRecompute: blocks freed, state dropped, recomputed on readmission, mostly from the prefix
//      cache; kSwap: state kept in host memory up to a byte budget, then recompute);
//   2. running sequences with a prompt (or a recompute) pending get chunks of it (chunked prefill);
//      chunks end at block boundaries so every completed block is published with its boundary state;
//   3. swapped, then waiting sequences are admitted in arrival order (FCFS; preempted sequences keep
//      their original arrival, so they go first) while blocks, the running cap and the budget allow.
//      Admission stops at the first sequence that does not fit (no overtaking: fair, no starvation).
// Cancel removes a sequence from wherever it is and frees its blocks at once.
//
// Externally synchronized (the engine's thread). Sequences and the KV manager must outlive it.
#ifndef V4SERVE_ENGINE_SCHEDULER_H_
#define V4SERVE_ENGINE_SCHEDULER_H_

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/status.h"
#include "engine/kv_cache_manager.h"
#include "engine/sequence.h"

namespace v4serve::engine {

enum class PreemptionMode { kRecompute, kSwap };

struct SchedulerOptions {
  int64_t max_step_tokens = 512;  // Prefill + decode tokens per step; >= max_running.
  int64_t max_running = 64;       // Running sequences (the decode batch cap).
  PreemptionMode preemption = PreemptionMode::kRecompute;
  int64_t swap_space_bytes = int64_t{1} << 30;  // kSwap: host bytes for swapped states.

  absl::Status Validate() const;
};

struct PrefillChunk {
  Sequence* seq;
  int64_t tokens;  // seq->tokens[state.position, state.position + tokens)
};

struct StepPlan {
  std::vector<Sequence*> decode;
  std::vector<PrefillChunk> prefill;  // In execution order; several chunks of one sequence are in order.
  int64_t preempted = 0;
  int64_t admitted_cached_tokens = 0;  // Prompt tokens restored from the prefix cache this step.
  bool empty() const { return decode.empty() && prefill.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerOptions& options, KvCacheManager* kv) : options_(options), kv_(kv) {}

  // Queues a new sequence (status kWaiting).
  void Add(Sequence* seq);
  // Adds a sequence that already has its state and blocks (a fork) to the running set. False (and
  // nothing changed) when the running set is full.
  bool AddRunning(Sequence* seq);
  // Queues a sequence whose state waits serialized in `swapped_state` (status kSwapped): a sequence whose
  // prompt was computed elsewhere is admitted exactly like one swapped out to host memory.
  void AddSwapped(Sequence* seq);
  // Plans one step; admits and preempts as described above.
  StepPlan Schedule();
  // Removes a sequence (finished or cancelled) and frees its blocks.
  void Remove(Sequence* seq);

  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size() + swapped_.size()); }
  int64_t num_swapped() const { return static_cast<int64_t>(swapped_.size()); }
  int64_t total_preemptions() const { return total_preemptions_; }
  int64_t total_swap_outs() const { return total_swap_outs_; }
  bool idle() const { return running_.empty() && waiting_.empty() && swapped_.empty(); }

 private:
  // Preempts the latest-arrived running sequence; returns it (nullptr if none).
  Sequence* PreemptLatest();
  void Requeue(std::deque<Sequence*>* q, Sequence* seq);
  void PlanPrefill(Sequence* seq, int64_t* budget, StepPlan* plan);

  const SchedulerOptions options_;
  KvCacheManager* const kv_;
  std::vector<Sequence*> running_;  // Ascending arrival.
  std::deque<Sequence*> waiting_;   // Ascending arrival.
  std::deque<Sequence*> swapped_;   // Ascending arrival.
  int64_t swap_bytes_ = 0;
  int64_t total_preemptions_ = 0;
  int64_t total_swap_outs_ = 0;
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_SCHEDULER_H_
