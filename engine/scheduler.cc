#include "engine/scheduler.h"

#include <algorithm>

#include "services/logging.h"

namespace v4serve::engine {

absl::Status SchedulerOptions::Validate() const {
  if (max_step_tokens <= 0) return absl::InvalidArgumentError("max_step_tokens must be positive");
  if (max_running <= 0) return absl::InvalidArgumentError("max_running must be positive");
  if (max_step_tokens < max_running) {
    // Otherwise the latest-arrived decoders could be skipped every step (starved).
    return absl::InvalidArgumentError(
        "max_step_tokens must be >= max_running: every running sequence decodes each step");
  }
  if (swap_space_bytes < 0) return absl::InvalidArgumentError("swap_space_bytes must be >= 0");
  return absl::OkStatus();
}

namespace {
bool Earlier(const Sequence* a, const Sequence* b) { return a->arrival < b->arrival; }
}  // namespace

void Scheduler::Add(Sequence* seq) {
  seq->status = SequenceStatus::kWaiting;
  Requeue(&waiting_, seq);
}

bool Scheduler::AddRunning(Sequence* seq) {
  if (static_cast<int64_t>(running_.size()) >= options_.max_running) return false;
  seq->status = SequenceStatus::kRunning;
  running_.insert(std::upper_bound(running_.begin(), running_.end(), seq, Earlier), seq);
  return true;
}

void Scheduler::AddSwapped(Sequence* seq) {
  seq->status = SequenceStatus::kSwapped;
  swap_bytes_ += static_cast<int64_t>(seq->swapped_state.size());
  Requeue(&swapped_, seq);
}

void Scheduler::Requeue(std::deque<Sequence*>* q, Sequence* seq) {
  q->insert(std::upper_bound(q->begin(), q->end(), seq, Earlier), seq);
}

void Scheduler::Remove(Sequence* seq) {
  auto erase = [seq](auto& c) { c.erase(std::remove(c.begin(), c.end(), seq), c.end()); };
  erase(running_);
  erase(waiting_);
  if (seq->status == SequenceStatus::kSwapped) {
    erase(swapped_);
    swap_bytes_ -= static_cast<int64_t>(seq->swapped_state.size());
    std::string().swap(seq->swapped_state);
    seq->swapped_device_tag = 0;
  }
  kv_->Release(seq);
  seq->status = SequenceStatus::kFinished;
}

Sequence* Scheduler::PreemptLatest() {
  if (running_.empty()) return nullptr;
  Sequence* victim = running_.back();
  running_.pop_back();
  ++victim->preemptions;
  ++total_preemptions_;
  // Swap keeps the computed state when host memory allows; a sequence still prefilling its prompt
  // holds little worth keeping, so it is recomputed (its completed blocks stay in the prefix cache).
  if (options_.preemption == PreemptionMode::kSwap && victim->pending() == 1) {
    kv_->SwapOut(victim);  // Serializes the state, then frees the blocks.
    const int64_t bytes = static_cast<int64_t>(victim->swapped_state.size());
    if (swap_bytes_ + bytes <= options_.swap_space_bytes) {
      swap_bytes_ += bytes;
      victim->status = SequenceStatus::kSwapped;
      ++total_swap_outs_;
      Requeue(&swapped_, victim);
      return victim;
    }
    std::string().swap(victim->swapped_state);  // Over the host budget: recompute instead.
    victim->swapped_device_tag = 0;
  } else {
    kv_->Release(victim);
  }
  victim->status = SequenceStatus::kWaiting;
  Requeue(&waiting_, victim);
  return victim;
}

void Scheduler::PlanPrefill(Sequence* seq, int64_t* budget, StepPlan* plan) {
  const int64_t b = kv_->block_tokens();
  int64_t pos = seq->state.position;
  int64_t pending = seq->pending();
  while (*budget > 0 && pending > 0) {
    const int64_t n = std::min({pending, *budget, b - pos % b});
    plan->prefill.push_back(PrefillChunk{seq, n});
    pos += n;
    pending -= n;
    *budget -= n;
  }
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  int64_t budget = options_.max_step_tokens;
  // 1. Decodes, oldest first; growth may preempt the newest.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i];
    if (!(seq->pending() == 1 && seq->state.position > 0)) {
      ++i;
      continue;
    }
    bool preempted_self = false;
    while (!kv_->Grow(seq, seq->state.position + 1).ok()) {
      Sequence* victim = PreemptLatest();
      ++plan.preempted;
      if (victim == seq || victim == nullptr) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;  // seq was the latest: everything after it is gone too.
    plan.decode.push_back(seq);
    --budget;
    ++i;
  }
  // Decode sequences that were preempted after being planned cannot happen: victims are always later
  // than the sequence being grown, and planned ones are earlier.
  // 2. Prefill chunks of running sequences.
  for (Sequence* seq : running_) {
    if (budget <= 0) break;
    if (seq->pending() == 1 && seq->state.position > 0) continue;
    PlanPrefill(seq, &budget, &plan);
  }
  // 3. Admission: swapped first, then waiting, by arrival, stopping at the first that does not fit.
  while (budget > 0 && static_cast<int64_t>(running_.size()) < options_.max_running) {
    const bool from_swap =
        !swapped_.empty() && (waiting_.empty() || swapped_.front()->arrival < waiting_.front()->arrival);
    std::deque<Sequence*>* q = from_swap ? &swapped_ : &waiting_;
    if (q->empty()) break;
    Sequence* seq = q->front();
    if (from_swap) {
      const int64_t bytes = static_cast<int64_t>(seq->swapped_state.size());
      absl::Status s = kv_->SwapIn(seq);
      if (absl::IsResourceExhausted(s)) break;
      swap_bytes_ -= bytes;
      q->pop_front();
      if (!s.ok()) {  // Undecodable swap bytes: recompute instead.
        V4LOG(WARNING).With("status", s) << "swap-in failed; recomputing";
        std::string().swap(seq->swapped_state);
        seq->swapped_device_tag = 0;
        seq->status = SequenceStatus::kWaiting;
        Requeue(&waiting_, seq);
        continue;
      }
    } else {
      absl::StatusOr<int64_t> cached = kv_->Admit(seq);
      if (!cached.ok()) break;
      q->pop_front();
      if (seq->cached_prompt_tokens < 0) {
        seq->cached_prompt_tokens = static_cast<int32_t>(std::min<int64_t>(*cached, seq->prompt_len));
      }
      plan.admitted_cached_tokens += *cached;
    }
    seq->status = SequenceStatus::kRunning;
    running_.insert(std::upper_bound(running_.begin(), running_.end(), seq, Earlier), seq);
    if (seq->pending() == 1 && seq->state.position > 0) {
      // Swapped back in mid-decode: it decodes next step (its block for the next token is reserved by
      // SwapIn covering tokens.size()).
      continue;
    }
    PlanPrefill(seq, &budget, &plan);
  }
  return plan;
}

}  // namespace v4serve::engine
