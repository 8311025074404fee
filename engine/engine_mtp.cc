// MTP speculative decoding (EngineOptions::mtp). Per greedy sequence, after each forward step the MTP
// layer drafts the token after the one just emitted; the next step runs [last token, draft] as a 2-token
// chunk in the step's one batched forward (Model::DecodeChunks, next to the other sequences' decodes).
// Row 0's logits give the true next token (sampled by the sequence's own sampler, so penalties and
// logprobs are as without MTP); if it equals the draft, row 1 gives one more token (two tokens from one
// forward). Otherwise the draft's effect on the state is undone exactly (model/state_rollback.h) and
// only row 0's token is emitted. The output is identical either way.
#include <algorithm>
#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "model/state_rollback.h"
#include "services/logging.h"

namespace v4serve::engine {

bool Engine::MtpActive(const Sequence& seq) const {
  return options_.mtp && seq.params.temperature == 0.0f && !seq.prefilled_elsewhere;
}

bool Engine::CanSpeculate(const Sequence& seq) const {
  if (!MtpActive(seq) || seq.draft_for != static_cast<int64_t>(seq.tokens.size())) return false;
  if (seq.pending() != 1) return false;
  // The verify step must not cross a block boundary after the last token: the KV cache manager publishes
  // blocks at the exact boundary state, and the sequence's blocks are reserved for one more token.
  if ((seq.state.position + 1) % kv_.block_tokens() == 0) return false;
  return seq.state.position + 2 < options_.max_model_len;
}

std::optional<model::TokenUndo> Engine::PrepareVerify(Sequence* seq) {
  if (!CanSpeculate(*seq)) return std::nullopt;
  seq->draft_for = -1;  // Consumed by this step either way.
  absl::StatusOr<model::TokenUndo> undo =
      model::SaveTokenUndo(model_->config(), seq->state, seq->state.position + 1);
  if (!undo.ok()) {
    V4LOG(WARNING).With("request_id", seq->request_id).With("status", undo.status())
        << "MTP draft not verifiable; plain decode";
    return std::nullopt;
  }
  return *std::move(undo);
}

absl::Status Engine::FinishVerify(Sequence* seq, int32_t draft, const model::TokenUndo& undo,
                                  absl::Span<const float> logits, absl::Span<const float> streams) {
  const int64_t p = seq->state.position - 2;
  ++stats_.mtp_draft_tokens;
  const size_t vocab = static_cast<size_t>(model_->config().vocab_size);
  Emit(seq, logits.subspan(0, vocab));
  const bool accepted = seq->tokens[static_cast<size_t>(p + 1)] == draft;
  if (accepted) {
    ++stats_.mtp_accepted_tokens;
  } else {
    ++stats_.mtp_rejected_tokens;
  }
  if (seq->status != SequenceStatus::kRunning) return absl::OkStatus();  // Finished on its first token.
  if (accepted) {
    kv_.OnBlockBoundary(seq);
    Emit(seq, logits.subspan(vocab, vocab));
    UpdateDraft(seq, p, streams);
    return absl::OkStatus();
  }
  if (absl::Status s = model::UndoLastToken(undo, &seq->state); !s.ok()) {
    Finish(seq, FinishReason::kError, s);
    return s;
  }
  kv_.OnBlockBoundary(seq);
  UpdateDraft(seq, p, streams.subspan(0, streams.size() / 2));
  return absl::OkStatus();
}

void Engine::UpdateDraft(Sequence* seq, int64_t first, absl::Span<const float> streams) {
  if (!MtpActive(*seq) || seq->status != SequenceStatus::kRunning) return;
  pending_drafts_.push_back(PendingDraft{seq, first, streams});
}

void Engine::FlushDrafts() {
  std::vector<PendingDraft> pending = std::move(pending_drafts_);
  pending_drafts_.clear();
  const model::ModelConfig& c = model_->config();
  const int64_t row = c.hc_mult * c.hidden_size;
  std::vector<Sequence*> seqs;
  std::vector<model::SequenceState*> states;
  std::vector<int64_t> counts;
  std::vector<float> streams;
  std::vector<int32_t> next;
  for (const PendingDraft& d : pending) {
    Sequence* seq = d.seq;
    const int64_t n = static_cast<int64_t>(d.streams.size()) / row;
    if (seq->status != SequenceStatus::kRunning || n == 0 ||
        static_cast<int64_t>(seq->tokens.size()) < d.first + n + 1) {
      continue;
    }
    if (seq->state.mtp_position != d.first) {
      // The MTP window did not see the positions before `first` (restored from the prefix cache, or the
      // state was recomputed): restart it here. Only the quality of the next few drafts suffers.
      seq->state.mtp_layers = model_->NewState().mtp_layers;
      seq->state.mtp_position = d.first;
    }
    seqs.push_back(seq);
    states.push_back(&seq->state);
    counts.push_back(n);
    streams.insert(streams.end(), d.streams.begin(), d.streams.end());
    next.insert(next.end(), seq->tokens.begin() + d.first + 1, seq->tokens.begin() + d.first + n + 1);
  }
  if (seqs.empty()) return;
  absl::StatusOr<std::vector<float>> logits = model_->MtpDraftBatch(states, counts, streams, next);
  if (!logits.ok()) {
    V4LOG(WARNING).With("status", logits.status()) << "MTP draft failed; these sequences decode without one";
    for (Sequence* seq : seqs) seq->draft_for = -1;
    return;
  }
  const size_t vocab = static_cast<size_t>(c.vocab_size);
  size_t end = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Sequence* seq = seqs[i];
    end += static_cast<size_t>(counts[i]);
    const auto last = logits->begin() + static_cast<std::ptrdiff_t>((end - 1) * vocab);
    seq->draft =
        static_cast<int32_t>(std::max_element(last, last + static_cast<std::ptrdiff_t>(vocab)) - last);
    seq->draft_for = seq->state.mtp_position + 1;
    if (options_.mtp_draft_hook_for_testing)
      seq->draft = options_.mtp_draft_hook_for_testing(*seq, seq->draft);
  }
}

}  // namespace v4serve::engine
