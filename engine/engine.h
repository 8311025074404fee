// The inference engine: serves many concurrent sequences on one model::Model with continuous batching,
// chunked prefill, prefix reuse and preemption. Both worker roles are built from it; the colocated
// decode worker (decode/) serves Inference.Generate straight from it.
//
// Composition (one reason to change each): Scheduler (what runs this step), KvCacheManager (blocks,
// prefix cache), Sampler (per-sequence token choice), EngineStats (counters), and this class, which
// runs a plan on the model and applies stop rules.
//
// Engine is externally synchronized: one thread calls Submit/Cancel/Step (EngineLoop, engine_loop.h,
// owns that thread in servers; tests call Step directly). Output callbacks run inside Submit/Cancel/Step.
// The model must outlive the engine.
#ifndef V4SERVE_ENGINE_ENGINE_H_
#define V4SERVE_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/kv_cache_manager.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "engine/sequence.h"
#include "model/model.h"
#include "model/state_rollback.h"

namespace v4serve::engine {

struct EngineOptions {
  KvCacheOptions kv;
  SchedulerOptions scheduler;
  uint64_t model_fingerprint = 0;  // Part of every block hash (engine/state_blocks.h ModelFingerprint).
  int64_t max_model_len = 0;       // Prompt + output tokens; 0 = the model's max_position_embeddings.
  std::function<absl::Time()> now = absl::Now;  // Clock (tests inject one).
  // MTP speculative decoding (engine/engine_mtp.cc): greedy sequences draft one token with the model's
  // MTP layer after each step and verify it in the next (a 2-token Prefill); output is unchanged. Needs
  // a model loaded with ModelOptions::load_mtp. Sampled sequences (temperature > 0) decode normally.
  bool mtp = false;
  // Tests only: sees each MTP draft (`seq.draft_for` is the index it predicts) and returns the draft to
  // verify, e.g. the known next token, so that acceptance paths are exercised on random weights.
  std::function<int32_t(const Sequence& seq, int32_t draft)> mtp_draft_hook_for_testing;
  // A decode batch that takes whole logit rows (penalties, MTP) draws them on up to this many threads when
  // the vocabulary has at least sampling_threads_min_vocab tokens (a draw of 129k costs milliseconds of CPU,
  // one of a few thousand microseconds: threads would cost more there). 1 = on the engine's thread.
  int32_t sampling_threads = 16;
  int64_t sampling_threads_min_vocab = 16384;

  absl::Status Validate() const;
};

struct EngineRequest {
  std::string request_id;  // Unique among live requests.
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  uint64_t tenant_salt = 0;  // Prefixes are shared only within a tenant.
  OutputCallback on_output;  // One call per new token and one finishing call per choice.
};

// Monotonic counters and the latest gauges, for metrics and tests.
struct EngineStats {
  int64_t steps = 0;
  int64_t prompt_tokens = 0;            // Prompt tokens of admitted requests (each choice counts).
  int64_t prefix_hit_tokens = 0;        // Tokens restored from the prefix cache instead of computed.
  int64_t prefill_tokens_computed = 0;  // Tokens run through Model::Prefill.
  int64_t decode_tokens_computed = 0;   // Tokens run through Model::Decode.
  int64_t generated_tokens = 0;
  int64_t preemptions = 0;
  int64_t swap_outs = 0;  // Preemptions that kept the state in host memory.
  // MTP: drafts verified = accepted + rejected (a draft whose sequence ends first is not counted).
  int64_t mtp_draft_tokens = 0, mtp_accepted_tokens = 0, mtp_rejected_tokens = 0;
  int64_t finished_sequences = 0;
  int64_t cancelled_sequences = 0;
  int64_t running = 0, waiting = 0, swapped = 0;
  int64_t kv_blocks_used = 0, kv_blocks_free = 0, kv_blocks_cached = 0;
  // Tiered store (kv_cache_manager.h): prefix tokens fetched from the store (host or disk), and tokens
  // the SWA policy's exact recomputation ran (periodic / zero). Both monotonic.
  int64_t kv_store_hit_tokens = 0, kv_recomputed_tokens = 0;
  // Restored or transferred blocks whose payloads the model's backend took as they are (its device KV
  // cache's pages, Model::AdoptKvPages; 0 on the CPU backend, which reads the host state). Monotonic.
  int64_t kv_pages_adopted = 0;
  // Observations since the last TakeLatencies(): time to first token and between tokens, seconds.
  std::vector<double> ttft_s, inter_token_s;
};

class Engine {
 public:
  // `model` must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const model::Model* model, EngineOptions options);
  ~Engine();

  // Validates and queues a request. INVALID_ARGUMENT (bad sampling, empty prompt, token ids out of
  // range, too long for the model or for the whole KV pool); ALREADY_EXISTS for a live request id.
  absl::Status Submit(EngineRequest request);
  // Queues a request whose prompt was computed elsewhere (a prefill worker): `state` has consumed exactly
  // the prompt and `first` is the first output token, sampled there with the request's params and seed.
  // The sequence reports `first` at once, then decodes from it; it is admitted like a swapped-out
  // sequence (blocks allocated when they fit, FCFS). n must be 1. Errors as Submit, plus
  // INVALID_ARGUMENT for a state that does not end the prompt or a bad first token. `kv_pages`: the payloads
  // of the state's complete blocks as they arrived (AssembleTransferredState), which the backend may take as
  // they are (Model::AdoptKvPages; a refusal only costs an upload at the first step).
  absl::Status SubmitPrefilled(EngineRequest request, model::SequenceState state, SampledToken first,
                               int32_t cached_prompt_tokens, const std::vector<std::string>& kv_pages = {});
  // Cancels a request: its sequences leave the queues and free their blocks now, each reporting
  // kCancelled. NOT_FOUND when no such live request.
  absl::Status Cancel(const std::string& request_id);
  // Cancels every live request (shutdown).
  void CancelAll();
  // Runs one scheduling step (prefill chunks + one batched decode). Returns an error only if the model
  // fails (then the step's sequences finish with kError).
  absl::Status Step();
  bool HasWork() const { return !scheduler_.idle(); }

  const EngineStats& stats() const { return stats_; }
  EngineStats* mutable_stats() { return &stats_; }
  const model::ModelConfig& config() const { return model_->config(); }

 private:
  Engine(const model::Model* model, EngineOptions options, kvstore::KvLayout layout);
  // A failed decode forward: logs it, finishes every sequence of the batch with the error, returns it.
  absl::Status FailDecode(const std::vector<Sequence*>& batch, const absl::Status& status);
  // A decode batch whose every sequence takes the argmax without logprobs: token ids from the model
  // (Model::DecodeChunksGreedy), recorded with each sampler as Sample would have.
  absl::Status DecodeGreedy(const std::vector<Sequence*>& batch,
                            const std::vector<model::SequenceState*>& states,
                            const std::vector<int64_t>& counts, const std::vector<int32_t>& tokens);
  // The logits path's draws: every sequence of the batch that samples one plain row (no MTP verify, no
  // choices to fork) draws from its row, on several threads when the batch is large (each Sampler belongs to
  // its sequence; a draw of a 129k vocabulary costs milliseconds of CPU). Empty where Emit must run.
  std::vector<std::optional<SampledToken>> SampleRows(
      const std::vector<Sequence*>& batch, const std::vector<int64_t>& counts,
      const std::vector<std::optional<model::TokenUndo>>& undos, absl::Span<const float> logits);
  static constexpr size_t kRowsPerSamplingThread = 2;
  // A decode batch whose samplers read only each row's best kTopCandidates logits (Model::DecodeChunksTop,
  // Sampler::SampleTop).
  absl::Status DecodeTop(const std::vector<Sequence*>& batch,
                         const std::vector<model::SequenceState*>& states, const std::vector<int64_t>& counts,
                         const std::vector<int32_t>& tokens);
  // Candidates a row for DecodeTop: a draw walking past them reads the whole row back (rare but allowed).
  static constexpr int64_t kTopCandidates = 256;
  // Samples from `logits` for `seq`, emits the token and finishes the sequence on a stop rule.
  void Emit(Sequence* seq, absl::Span<const float> logits);
  // Appends a sampled token, reports it, and finishes the sequence on a stop rule.
  void EmitToken(Sequence* seq, SampledToken token);
  // Submit's checks; returns the prompt length.
  absl::StatusOr<int64_t> Validate(EngineRequest* request) const;
  // A new sequence (choice `choice` of `request`), counted in the stats.
  std::unique_ptr<Sequence> NewSequence(const EngineRequest& request, int32_t choice, uint64_t seed);
  void Finish(Sequence* seq, FinishReason reason, absl::Status status = absl::OkStatus());
  void UpdateGauges();
  // MTP (engine_mtp.cc). When `seq` verifies its draft this step: consumes the draft and returns what
  // undoes the draft token in the state; nullopt for a plain decode.
  std::optional<model::TokenUndo> PrepareVerify(Sequence* seq);
  // After the forward ran [last token, `draft`] (2 rows of logits and streams): emits 1 or 2 tokens and
  // rolls a rejected draft back.
  absl::Status FinishVerify(Sequence* seq, int32_t draft, const model::TokenUndo& undo,
                            absl::Span<const float> logits, absl::Span<const float> streams);
  bool CanSpeculate(const Sequence& seq) const;
  // Queues feeding the MTP layer the main model's final streams of positions [first, first + n)
  // (`streams`, n rows, which must stay alive until FlushDrafts) with the tokens that follow them.
  void UpdateDraft(Sequence* seq, int64_t first, absl::Span<const float> streams);
  // Runs the queued drafts in one MtpDraftBatch; each sequence's last row's argmax is its next draft.
  void FlushDrafts();
  struct PendingDraft {
    Sequence* seq;
    int64_t first;
    absl::Span<const float> streams;
  };
  std::vector<PendingDraft> pending_drafts_;
  bool MtpActive(const Sequence& seq) const;

  const model::Model* const model_;
  const EngineOptions options_;
  KvCacheManager kv_;
  Scheduler scheduler_;
  absl::flat_hash_map<std::string, std::vector<std::unique_ptr<Sequence>>> requests_;
  uint64_t next_arrival_ = 0;
  int64_t next_seq_id_ = 0;
  uint64_t seed_state_ = 0x853C49E6748FEA9Bull;
  EngineStats stats_;
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_ENGINE_H_
