// One sequence the engine serves: a choice of a request (a request with n > 1 has n sequences).
//
// The engine owns every Sequence; the scheduler and the KV cache manager hold raw pointers to them
// while they are queued or running. Externally synchronized (the engine loop's thread).
#ifndef V4SERVE_ENGINE_SEQUENCE_H_
#define V4SERVE_ENGINE_SEQUENCE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/sampler.h"
#include "kvstore/block_pool.h"
#include "model/sequence_state.h"

namespace v4serve::engine {

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };

// What the engine reports for a sequence after a step: one new token, and/or the end.
struct SequenceOutput {
  std::string request_id;
  int32_t choice_index = 0;
  std::optional<SampledToken> token;
  FinishReason finish = FinishReason::kNone;
  absl::Status status;  // Set with kError.
  // Filled on the finishing output.
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_prompt_tokens = 0;  // Prompt tokens restored from the prefix cache at first admission.
};

// Called on the engine's thread; must not block (queue and return).
using OutputCallback = std::function<void(const SequenceOutput&)>;

enum class SequenceStatus { kWaiting, kRunning, kSwapped, kFinished };

struct Sequence {
  int64_t seq_id = 0;
  std::string request_id;
  int32_t choice_index = 0;
  uint64_t arrival = 0;  // Admission order: smaller = earlier (fair FCFS; preempted keep theirs).
  uint64_t tenant_salt = 0;
  std::vector<int32_t> tokens;  // Prompt, then generated tokens.
  int32_t prompt_len = 0;
  SamplingParams params;
  std::unique_ptr<Sampler> sampler;
  OutputCallback on_output;
  SequenceStatus status = SequenceStatus::kWaiting;

  // Model state; `state.position` tokens of `tokens` are consumed. Only meaningful while running.
  model::SequenceState state;
  // Block table: blocks[i] holds tokens [i·B, (i+1)·B) (B = block tokens). Held references.
  std::vector<kvstore::BlockId> blocks;
  // Blocks [0, cached_blocks) are in the prefix cache (restored from it or published by this sequence).
  int32_t cached_blocks = 0;
  std::string swapped_state;  // kSwapped: the serialized state.
  // kSwapped: the state's device_tag when it was serialized (the serialization drops it), given back on
  // swap-in so that a backend copy still valid for the unchanged state is used rather than re-uploaded.
  uint64_t swapped_device_tag = 0;
  // MTP: the drafted id of tokens[draft_for] (used only while draft_for == tokens.size()).
  int32_t draft = -1;
  int64_t draft_for = -1;
  // n > 1: the other choices of the request, not yet scheduled. They fork from this sequence once its
  // prompt is computed (sharing its complete blocks and copying its state), so the prompt is computed
  // once per request, not once per choice.
  std::vector<Sequence*> forks;

  int32_t cached_prompt_tokens = -1;  // Set at the first admission.
  // The prompt state came from a prefill worker (Engine::SubmitPrefilled): no MTP drafts (the MTP layer's
  // state was not computed for the prompt).
  bool prefilled_elsewhere = false;
  int32_t preemptions = 0;
  absl::Time arrival_time;
  absl::Time last_token_time;  // InfinitePast until the first token.

  int32_t generated() const { return static_cast<int32_t>(tokens.size()) - prompt_len; }
  // Tokens known but not yet consumed by the model.
  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - state.position; }
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_SEQUENCE_H_
