#include "engine/engine.h"

#include <algorithm>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/state_blocks.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::engine {

absl::Status EngineOptions::Validate() const {
  RETURN_IF_ERROR(kv.Validate());
  RETURN_IF_ERROR(scheduler.Validate());
  if (max_model_len < 0) return absl::InvalidArgumentError("max_model_len must be >= 0");
  if (!now) return absl::InvalidArgumentError("EngineOptions.now must be set");
  if (sampling_threads < 1 || sampling_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling_threads must be in [1, 256], not ", sampling_threads));
  }
  if (sampling_threads_min_vocab < 0)
    return absl::InvalidArgumentError("sampling_threads_min_vocab must be >= 0");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const model::Model* model, EngineOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine needs a model");
  RETURN_IF_ERROR(options.Validate());
  if (options.max_model_len == 0) options.max_model_len = model->config().max_position_embeddings;
  ASSIGN_OR_RETURN(kvstore::KvLayout layout, KvLayoutFor(model->config(), options.model_fingerprint));
  if (options.mtp) {
    // A draft on a zero stream checks that the MTP layer exists and its weights are loaded.
    const model::ModelConfig& c = model->config();
    model::SequenceState probe = model->NewState();
    const std::vector<float> zeros(static_cast<size_t>(c.hc_mult * c.hidden_size), 0.0f);
    absl::StatusOr<std::vector<float>> draft = model->MtpDraft(&probe, zeros, std::vector<int32_t>{0});
    if (!draft.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "EngineOptions.mtp needs a model with MTP weights loaded: ", draft.status().message()));
    }
  }
  return std::unique_ptr<Engine>(new Engine(model, std::move(options), std::move(layout)));
}

Engine::Engine(const model::Model* model, EngineOptions options, kvstore::KvLayout layout)
    : model_(model),
      options_(std::move(options)),
      kv_(model->config(), std::move(layout), options_.kv, model),
      scheduler_(options_.scheduler, &kv_) {
  UpdateGauges();
}

Engine::~Engine() {
  for (auto& [id, seqs] : requests_) {
    for (auto& seq : seqs) {
      if (seq->status != SequenceStatus::kFinished) scheduler_.Remove(seq.get());
    }
  }
}

absl::StatusOr<int64_t> Engine::Validate(EngineRequest* request) const {
  const model::ModelConfig& c = model_->config();
  RETURN_IF_ERROR(request->sampling.Validate(c.vocab_size));
  if (request->prompt.empty()) return absl::InvalidArgumentError("prompt must not be empty");
  for (int32_t t : request->prompt) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", t, " outside [0, ", c.vocab_size, ")"));
    }
  }
  const int64_t prompt_len = static_cast<int64_t>(request->prompt.size());
  if (prompt_len >= options_.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", prompt_len, " tokens leaves no room under max_model_len ", options_.max_model_len));
  }
  const int64_t max_total =
      std::min<int64_t>(prompt_len + request->sampling.max_tokens, options_.max_model_len);
  if (kv_.BlocksFor(max_total) > kv_.blocks_total()) {
    return absl::InvalidArgumentError(absl::StrCat("prompt + max_tokens (", max_total,
                                                   " tokens) exceeds the KV pool (", kv_.blocks_total(),
                                                   " blocks of ", kv_.block_tokens(), ")"));
  }
  if (requests_.contains(request->request_id)) {
    return absl::AlreadyExistsError(absl::StrCat("request ", request->request_id, " is already running"));
  }
  return prompt_len;
}

std::unique_ptr<Sequence> Engine::NewSequence(const EngineRequest& request, int32_t choice, uint64_t seed) {
  auto seq = std::make_unique<Sequence>();
  seq->seq_id = next_seq_id_++;
  seq->request_id = request.request_id;
  seq->choice_index = choice;
  seq->arrival = next_arrival_++;
  seq->tenant_salt = request.tenant_salt;
  seq->tokens = request.prompt;
  seq->prompt_len = static_cast<int32_t>(request.prompt.size());
  seq->params = request.sampling;
  seq->sampler = std::make_unique<Sampler>(request.sampling, seed + static_cast<uint64_t>(choice));
  seq->sampler->AddPromptTokens(request.prompt);
  seq->on_output = request.on_output;
  seq->arrival_time = options_.now();
  seq->last_token_time = absl::InfinitePast();
  stats_.prompt_tokens += seq->prompt_len;
  return seq;
}

absl::Status Engine::Submit(EngineRequest request) {
  ASSIGN_OR_RETURN(const int64_t prompt_len, Validate(&request));
  (void)prompt_len;
  uint64_t seed;
  if (request.sampling.seed.has_value()) {
    seed = *request.sampling.seed;
  } else {
    seed_state_ += 0x9E3779B97F4A7C15ull;
    seed = seed_state_;
  }
  if (!request.sampling.ignore_eos)
    request.sampling.stop_token_ids.push_back(static_cast<int32_t>(model_->config().eos_token_id));
  std::vector<std::unique_ptr<Sequence>>& seqs = requests_[request.request_id];
  for (int32_t i = 0; i < request.sampling.n; ++i) {
    std::unique_ptr<Sequence> seq = NewSequence(request, i, seed);
    if (i == 0) {
      scheduler_.Add(seq.get());
    } else {
      seqs.front()->forks.push_back(seq.get());
    }
    seqs.push_back(std::move(seq));
  }
  UpdateGauges();
  return absl::OkStatus();
}

absl::Status Engine::SubmitPrefilled(EngineRequest request, model::SequenceState state, SampledToken first,
                                     int32_t cached_prompt_tokens, const std::vector<std::string>& kv_pages) {
  ASSIGN_OR_RETURN(const int64_t prompt_len, Validate(&request));
  if (request.sampling.n != 1) {
    return absl::InvalidArgumentError("a request prefilled elsewhere has one choice (n = 1)");
  }
  if (state.position != prompt_len) {
    return absl::InvalidArgumentError(absl::StrCat("the prefilled state is at position ", state.position,
                                                   ", not at the end of the ", prompt_len, "-token prompt"));
  }
  if (first.id < 0 || first.id >= model_->config().vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("first token id ", first.id, " outside the vocabulary"));
  }
  if (!request.sampling.seed.has_value()) {
    seed_state_ += 0x9E3779B97F4A7C15ull;
    request.sampling.seed = seed_state_;
  }
  if (!request.sampling.ignore_eos)
    request.sampling.stop_token_ids.push_back(static_cast<int32_t>(model_->config().eos_token_id));
  std::unique_ptr<Sequence> owned = NewSequence(request, 0, *request.sampling.seed);
  Sequence* seq = owned.get();
  seq->prefilled_elsewhere = true;
  seq->cached_prompt_tokens = cached_prompt_tokens;
  requests_[request.request_id].push_back(std::move(owned));
  seq->sampler->RecordSampled(first.id);
  seq->status = SequenceStatus::kWaiting;  // Not queued yet: EmitToken may finish it at once.
  EmitToken(seq, std::move(first));
  if (seq->status != SequenceStatus::kFinished) {
    kv_.AdoptPages(&state, std::vector<absl::string_view>(kv_pages.begin(), kv_pages.end()));
    seq->swapped_state = model::SerializeSequenceState(state);
    seq->swapped_device_tag = state.device_tag;
    scheduler_.AddSwapped(seq);
  } else {
    requests_.erase(request.request_id);
  }
  UpdateGauges();
  return absl::OkStatus();
}

absl::Status Engine::Cancel(const std::string& request_id) {
  auto it = requests_.find(request_id);
  if (it == requests_.end()) return absl::NotFoundError(absl::StrCat("no live request ", request_id));
  std::vector<std::unique_ptr<Sequence>> seqs = std::move(it->second);
  requests_.erase(it);
  for (auto& seq : seqs) {
    if (seq->status == SequenceStatus::kFinished) continue;
    Finish(seq.get(), FinishReason::kCancelled);
  }
  UpdateGauges();
  return absl::OkStatus();
}

void Engine::CancelAll() {
  std::vector<std::string> ids;
  for (const auto& [id, seqs] : requests_) ids.push_back(id);
  for (const std::string& id : ids) Cancel(id).IgnoreError();
}

void Engine::Finish(Sequence* seq, FinishReason reason, absl::Status status) {
  // Choices that never forked end with their parent (error or cancel before the prompt was computed).
  std::vector<Sequence*> forks = std::move(seq->forks);
  seq->forks.clear();
  for (Sequence* child : forks) {
    if (child->status != SequenceStatus::kFinished) Finish(child, reason, status);
  }
  scheduler_.Remove(seq);
  ++stats_.finished_sequences;
  if (reason == FinishReason::kCancelled) ++stats_.cancelled_sequences;
  SequenceOutput out;
  out.request_id = seq->request_id;
  out.choice_index = seq->choice_index;
  out.finish = reason;
  out.status = std::move(status);
  out.prompt_tokens = seq->prompt_len;
  out.completion_tokens = seq->generated();
  out.cached_prompt_tokens = std::max(seq->cached_prompt_tokens, 0);
  if (seq->on_output) seq->on_output(out);
}

void Engine::Emit(Sequence* seq, absl::Span<const float> logits) {
  if (!seq->forks.empty()) {
    // The prompt is computed: the other choices start from this state and sample their first token
    // from the same logits with their own samplers.
    std::vector<Sequence*> forks = std::move(seq->forks);
    seq->forks.clear();
    for (Sequence* child : forks) {
      if (child->status == SequenceStatus::kFinished) continue;
      child->cached_prompt_tokens = seq->cached_prompt_tokens;
      if (kv_.Fork(*seq, child).ok()) {
        if (scheduler_.AddRunning(child)) {
          Emit(child, logits);
          continue;
        }
        kv_.Release(child);
      }
      scheduler_.Add(child);  // No room to fork now: it waits and reuses the prompt's cached blocks.
    }
  }
  EmitToken(seq, seq->sampler->Sample(logits));
}

void Engine::EmitToken(Sequence* seq, SampledToken token) {
  seq->tokens.push_back(token.id);
  ++stats_.generated_tokens;
  const absl::Time now = options_.now();
  if (seq->last_token_time == absl::InfinitePast()) {
    stats_.ttft_s.push_back(absl::ToDoubleSeconds(now - seq->arrival_time));
  } else {
    stats_.inter_token_s.push_back(absl::ToDoubleSeconds(now - seq->last_token_time));
  }
  seq->last_token_time = now;
  const int32_t id = token.id;
  SequenceOutput out;
  out.request_id = seq->request_id;
  out.choice_index = seq->choice_index;
  out.token = std::move(token);
  if (seq->on_output) seq->on_output(out);
  const std::vector<int32_t>& stops = seq->params.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), id) != stops.end()) {
    Finish(seq, FinishReason::kStop);
  } else if (seq->generated() >= seq->params.max_tokens ||
             static_cast<int64_t>(seq->tokens.size()) >= options_.max_model_len) {
    Finish(seq, FinishReason::kLength);
  }
}

absl::Status Engine::FailDecode(const std::vector<Sequence*>& batch, const absl::Status& status) {
  V4LOG(ERROR).With("status", status) << "decode failed";
  for (Sequence* seq : batch) Finish(seq, FinishReason::kError, status);
  return status;
}

absl::Status Engine::DecodeGreedy(const std::vector<Sequence*>& batch,
                                  const std::vector<model::SequenceState*>& states,
                                  const std::vector<int64_t>& counts, const std::vector<int32_t>& tokens) {
  absl::StatusOr<std::vector<int32_t>> ids = model_->DecodeChunksGreedy(states, counts, tokens);
  if (!ids.ok()) return FailDecode(batch, ids.status());
  stats_.decode_tokens_computed += static_cast<int64_t>(tokens.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence* seq = batch[i];
    const int64_t pos = seq->state.position - 1;
    kv_.OnBlockBoundary(seq);
    seq->sampler->RecordSampled((*ids)[i]);  // What Sample would have recorded.
    SampledToken token;
    token.id = (*ids)[i];
    EmitToken(seq, std::move(token));
    UpdateDraft(seq, pos, {});
  }
  FlushDrafts();
  return absl::OkStatus();
}

absl::Status Engine::DecodeTop(const std::vector<Sequence*>& batch,
                               const std::vector<model::SequenceState*>& states,
                               const std::vector<int64_t>& counts, const std::vector<int32_t>& tokens) {
  std::vector<float> temperatures;
  for (const Sequence* seq : batch) temperatures.push_back(seq->params.temperature);
  absl::StatusOr<model::TopLogits> top =
      model_->DecodeChunksTop(states, counts, tokens, temperatures, kTopCandidates);
  if (!top.ok()) return FailDecode(batch, top.status());
  stats_.decode_tokens_computed += static_cast<int64_t>(tokens.size());
  absl::Status result;
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence* seq = batch[i];
    const int64_t pos = seq->state.position - 1;
    kv_.OnBlockBoundary(seq);
    absl::StatusOr<SampledToken> token = seq->sampler->SampleTop(*top, static_cast<int64_t>(i));
    if (!token.ok()) {  // The whole row could not be read back: this sequence fails, the others go on.
      V4LOG(ERROR).With("request_id", seq->request_id).With("status", token.status()) << "sampling failed";
      Finish(seq, FinishReason::kError, token.status());
      result = token.status();
      continue;
    }
    EmitToken(seq, *std::move(token));
    UpdateDraft(seq, pos, {});
  }
  FlushDrafts();
  return result;
}

std::vector<std::optional<SampledToken>> Engine::SampleRows(
    const std::vector<Sequence*>& batch, const std::vector<int64_t>& counts,
    const std::vector<std::optional<model::TokenUndo>>& undos, absl::Span<const float> logits) {
  const size_t n = batch.size(), vocab = static_cast<size_t>(model_->config().vocab_size);
  std::vector<std::optional<SampledToken>> picked(n);
  std::vector<size_t> todo, first(n);
  size_t r = 0;
  for (size_t i = 0; i < n; ++i) {
    first[i] = r;
    r += static_cast<size_t>(counts[i]);
    if (!undos[i].has_value() && batch[i]->forks.empty()) todo.push_back(i);
  }
  const size_t threads = static_cast<int64_t>(vocab) < options_.sampling_threads_min_vocab
                             ? 1
                             : std::min<size_t>({todo.size() / kRowsPerSamplingThread,
                                                 std::max(1u, std::thread::hardware_concurrency()),
                                                 static_cast<size_t>(options_.sampling_threads)});
  auto run = [&](size_t t, size_t stride) {
    for (size_t j = t; j < todo.size(); j += stride) {
      const size_t i = todo[j];
      picked[i] = batch[i]->sampler->Sample(logits.subspan(first[i] * vocab, vocab));
    }
  };
  if (threads < 2) {
    run(0, 1);
    return picked;
  }
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(run, t, threads);
  run(0, threads);
  for (std::thread& th : pool) th.join();
  return picked;
}

absl::Status Engine::Step() {
  StepPlan plan = scheduler_.Schedule();
  ++stats_.steps;
  stats_.preemptions += plan.preempted;
  stats_.prefix_hit_tokens += plan.admitted_cached_tokens;
  absl::Status result;
  for (const PrefillChunk& chunk : plan.prefill) {
    Sequence* seq = chunk.seq;
    if (seq->status != SequenceStatus::kRunning) continue;  // Finished by an earlier error.
    const int64_t pos = seq->state.position;
    std::vector<float> streams;
    absl::StatusOr<std::vector<float>> logits = model_->Prefill(
        &seq->state,
        absl::MakeConstSpan(seq->tokens).subspan(static_cast<size_t>(pos), static_cast<size_t>(chunk.tokens)),
        /*all_logits=*/false, MtpActive(*seq) ? &streams : nullptr);
    if (!logits.ok()) {
      V4LOG(ERROR).With("request_id", seq->request_id).With("status", logits.status()) << "prefill failed";
      Finish(seq, FinishReason::kError, logits.status());
      result = logits.status();
      continue;
    }
    stats_.prefill_tokens_computed += chunk.tokens;
    kv_.OnBlockBoundary(seq);
    if (seq->pending() == 0) Emit(seq, *logits);
    UpdateDraft(seq, pos, streams);
    FlushDrafts();
  }
  if (!plan.decode.empty()) {
    // One forward for the batch: [last token] per sequence, or [last token, MTP draft] for one that
    // verifies a draft this step (engine_mtp.cc).
    const size_t n = plan.decode.size();
    std::vector<model::SequenceState*> states;
    std::vector<int64_t> counts;
    std::vector<int32_t> tokens;
    std::vector<std::optional<model::TokenUndo>> undos(n);
    bool any_mtp = false;
    for (size_t i = 0; i < n; ++i) {
      Sequence* seq = plan.decode[i];
      states.push_back(&seq->state);
      tokens.push_back(seq->tokens.back());
      undos[i] = PrepareVerify(seq);
      if (undos[i].has_value()) tokens.push_back(seq->draft);
      counts.push_back(undos[i].has_value() ? 2 : 1);
      any_mtp = any_mtp || MtpActive(*seq);
    }
    // A batch that only takes argmaxes (greedy, no penalties, no logprobs, no MTP) gets token ids from the
    // model instead of [batch, vocab] logits: a GPU backend picks them on the device.
    // A batch whose samplers read only each row's best kTopCandidates logits (no penalties) gets those and
    // the softmax's sums instead: a GPU backend sorts them out on the device.
    const bool single = !any_mtp &&
                        std::all_of(counts.begin(), counts.end(), [](int64_t k) { return k == 1; }) &&
                        std::all_of(plan.decode.begin(), plan.decode.end(),
                                    [](const Sequence* s) { return s->forks.empty(); });
    const bool greedy = single && std::all_of(plan.decode.begin(), plan.decode.end(), [](const Sequence* s) {
                          return s->sampler->GreedyWithoutLogits();
                        });
    const bool top = single && std::all_of(plan.decode.begin(), plan.decode.end(), [](const Sequence* s) {
                       return s->sampler->SamplesFromTop(kTopCandidates);
                     });
    if (greedy) {
      if (absl::Status s = DecodeGreedy(plan.decode, states, counts, tokens); !s.ok()) result = s;
    } else if (top) {
      if (absl::Status s = DecodeTop(plan.decode, states, counts, tokens); !s.ok()) result = s;
    } else {
      std::vector<float> streams;
      absl::StatusOr<std::vector<float>> logits =
          model_->DecodeChunks(states, counts, tokens, any_mtp ? &streams : nullptr);
      if (!logits.ok()) {
        result = FailDecode(plan.decode, logits.status());
      } else {
        stats_.decode_tokens_computed += static_cast<int64_t>(tokens.size());
        const size_t vocab = static_cast<size_t>(model_->config().vocab_size);
        const size_t row = streams.size() / tokens.size();
        const std::vector<std::optional<SampledToken>> picked =
            SampleRows(plan.decode, counts, undos, *logits);
        size_t r = 0;
        for (size_t i = 0; i < n; ++i) {
          Sequence* seq = plan.decode[i];
          const size_t k = static_cast<size_t>(counts[i]);
          const int64_t pos = seq->state.position - counts[i];
          const absl::Span<const float> seq_logits =
              absl::MakeConstSpan(*logits).subspan(r * vocab, k * vocab);
          const absl::Span<const float> seq_streams =
              any_mtp ? absl::MakeConstSpan(streams).subspan(r * row, k * row) : absl::Span<const float>();
          r += k;
          if (undos[i].has_value()) {
            if (absl::Status s = FinishVerify(seq, tokens[r - 1], *undos[i], seq_logits, seq_streams);
                !s.ok())
              result = s;
            continue;
          }
          kv_.OnBlockBoundary(seq);
          if (picked[i].has_value()) {
            EmitToken(seq, *picked[i]);
          } else {
            Emit(seq, seq_logits);
          }
          UpdateDraft(seq, pos, seq_streams);
        }
        FlushDrafts();  // While `streams` lives.
      }
    }
  }
  // Forget requests whose every choice finished.
  for (auto it = requests_.begin(); it != requests_.end();) {
    const bool done = std::all_of(it->second.begin(), it->second.end(),
                                  [](const auto& s) { return s->status == SequenceStatus::kFinished; });
    if (done) {
      requests_.erase(it++);
    } else {
      ++it;
    }
  }
  UpdateGauges();
  return result;
}

void Engine::UpdateGauges() {
  stats_.running = scheduler_.num_running();
  stats_.waiting = scheduler_.num_waiting() - scheduler_.num_swapped();
  stats_.swapped = scheduler_.num_swapped();
  stats_.swap_outs = scheduler_.total_swap_outs();
  stats_.kv_blocks_used = kv_.blocks_used();
  stats_.kv_blocks_free = kv_.blocks_free();
  stats_.kv_blocks_cached = kv_.blocks_cached();
  stats_.kv_recomputed_tokens = kv_.recomputed_tokens();
  stats_.kv_store_hit_tokens = kv_.store_hit_tokens();
  stats_.kv_pages_adopted = kv_.pages_adopted();
}

}  // namespace v4serve::engine
