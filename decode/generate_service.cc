#include "decode/generate_service.h"

#include <deque>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kvstore/prefix_cache.h"
#include "services/logging.h"
#include "services/request_id.h"
#include "services/status_mapping.h"

namespace v4serve::decode {
namespace {

class FailedStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit FailedStream(const absl::Status& status) { Finish(services::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

class GenerateStream;

// What the engine callback and the reactor share: the reactor may be gone (OnDone) while the engine
// still reports a cancelled sequence.
struct StreamLink {
  absl::Mutex mu;
  GenerateStream* stream ABSL_GUARDED_BY(mu) = nullptr;
};

class GenerateStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateStream(engine::EngineLoop* loop, std::string public_id, std::string engine_id, int32_t choices)
      : loop_(loop),
        public_id_(std::move(public_id)),
        engine_id_(std::move(engine_id)),
        choices_left_(choices),
        link_(std::make_shared<StreamLink>()) {
    absl::MutexLock l(&link_->mu);
    link_->stream = this;
  }

  // The engine's callback for this stream.
  engine::OutputCallback Callback() {
    return [link = link_](const engine::SequenceOutput& out) {
      absl::MutexLock l(&link->mu);
      GenerateStream* stream = link->stream;
      if (stream == nullptr) return;
      stream->link_->mu.AssertHeld();  // the same mutex as link->mu; tells -Wthread-safety so
      stream->OnOutputLocked(out);
    };
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&link_->mu);
    write_in_flight_ = false;
    if (!ok) {  // The client is gone: stop generating.
      loop_->Cancel(engine_id_);
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client stream closed"));
      return;
    }
    PumpLocked();
  }

  void OnCancel() override { loop_->Cancel(engine_id_); }

  void OnDone() override {
    {
      absl::MutexLock l(&link_->mu);
      link_->stream = nullptr;
    }
    delete this;
  }

 private:
  void OnOutputLocked(const engine::SequenceOutput& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finishing_) return;
    if (out.finish == engine::FinishReason::kError) {
      loop_->Cancel(engine_id_);  // Other choices of the request stop too.
      final_status_ = services::ToGrpcStatus(out.status);
      done_ = true;
      queue_.clear();
      PumpLocked();
      return;
    }
    v1::GenerateResponse msg;
    msg.set_request_id(public_id_);
    msg.set_choice_index(out.choice_index);
    if (out.token) {
      v1::GeneratedToken* t = msg.add_tokens();
      t->set_token_id(out.token->id);
      t->set_logprob(out.token->logprob);
      for (const auto& [id, lp] : out.token->top) {
        v1::TokenLogprob* top = t->add_top_logprobs();
        top->set_token_id(id);
        top->set_logprob(lp);
      }
    }
    if (out.finish != engine::FinishReason::kNone) {
      msg.set_finish_reason(ToProto(out.finish));
      usage_.set_prompt_tokens(out.prompt_tokens);
      usage_.set_completion_tokens(usage_.completion_tokens() + out.completion_tokens);
      usage_.set_cached_prompt_tokens(std::max(usage_.cached_prompt_tokens(), out.cached_prompt_tokens));
      if (--choices_left_ == 0) {
        *msg.mutable_usage() = usage_;
        done_ = true;
      }
    }
    queue_.push_back(std::move(msg));
    PumpLocked();
  }

  // Starts the next write, or finishes once everything is written.
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (write_in_flight_ || finishing_) return;
    if (!queue_.empty()) {
      // Tokens queued while a write was in flight go out together (one message per choice change).
      current_ = std::move(queue_.front());
      queue_.pop_front();
      while (!queue_.empty() && queue_.front().choice_index() == current_.choice_index() &&
             current_.finish_reason() == v1::FINISH_REASON_UNSPECIFIED) {
        v1::GenerateResponse& next = queue_.front();
        for (const v1::GeneratedToken& t : next.tokens()) *current_.add_tokens() = t;
        current_.set_finish_reason(next.finish_reason());
        if (next.has_usage()) *current_.mutable_usage() = next.usage();
        queue_.pop_front();
      }
      write_in_flight_ = true;
      StartWrite(&current_);
      return;
    }
    if (done_) FinishLocked(final_status_);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finishing_) return;
    finishing_ = true;
    Finish(status);
  }

  engine::EngineLoop* const loop_;
  const std::string public_id_;
  const std::string engine_id_;
  int32_t choices_left_;
  std::shared_ptr<StreamLink> link_;
  std::deque<v1::GenerateResponse> queue_;
  v1::GenerateResponse current_;
  v1::Usage usage_;
  bool write_in_flight_ = false;
  bool done_ = false;
  bool finishing_ = false;
  grpc::Status final_status_ = grpc::Status::OK;
};

}  // namespace

absl::StatusOr<engine::EngineRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                      const GenerateServiceOptions& options) {
  if (!request.has_token_ids()) {
    return absl::InvalidArgumentError(
        "prompt: this worker serves token_ids; text and chat_json are tokenized by the router");
  }
  if (!request.model().empty() && request.model() != options.model_id) {
    return absl::NotFoundError(
        absl::StrCat("model '", request.model(), "' is not served here (", options.model_id, ")"));
  }
  engine::EngineRequest r;
  r.prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
  if (r.prompt.empty()) return absl::InvalidArgumentError("token_ids: the prompt is empty");
  const v1::SamplingParams& s = request.sampling();
  engine::SamplingParams& p = r.sampling;
  p.temperature = s.has_temperature() ? s.temperature() : 1.0f;
  if (s.has_top_p()) p.top_p = s.top_p();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_min_p()) p.min_p = s.min_p();
  if (s.has_repetition_penalty()) p.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) p.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) p.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) p.seed = s.seed();
  const int64_t room = options.max_total_tokens - static_cast<int64_t>(r.prompt.size());
  if (room <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token_ids: prompt of ", r.prompt.size(), " tokens leaves no room under ", options.max_total_tokens));
  }
  if (s.max_tokens() < 0) return absl::InvalidArgumentError("sampling.max_tokens must be >= 0");
  p.max_tokens = static_cast<int32_t>(s.max_tokens() == 0 ? room : std::min<int64_t>(s.max_tokens(), room));
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  p.n = s.n() == 0 ? 1 : s.n();
  p.top_logprobs = s.top_logprobs();
  p.logprobs = s.logprobs();
  r.tenant_salt = kvstore::TenantSalt(request.tenant());
  return r;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerateService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  absl::StatusOr<engine::EngineRequest> r = ToEngineRequest(*request, options_);
  if (!r.ok()) return new FailedStream(r.status());
  const std::string public_id = services::RequestIdFrom(*ctx);
  // Engine ids are unique per process even when clients reuse request ids.
  std::string engine_id = absl::StrCat(public_id, "#", next_id_.fetch_add(1));
  auto* stream = new GenerateStream(loop_, public_id, engine_id, r->sampling.n);
  r->request_id = std::move(engine_id);
  r->on_output = stream->Callback();
  V4LOG(DEBUG).With("request_id", public_id).With("prompt_tokens", r->prompt.size()) << "generate";
  loop_->Submit(*std::move(r));
  return stream;
}

grpc::ServerUnaryReactor* GenerateService::ListModels(grpc::CallbackServerContext* ctx,
                                                      const v1::ListModelsRequest*,
                                                      v1::ListModelsResponse* response) {
  v1::ModelCard* card = response->add_models();
  card->set_id(options_.model_id);
  card->set_owned_by("v4serve");
  card->set_max_context_tokens(static_cast<int32_t>(std::min<int64_t>(options_.max_total_tokens, INT32_MAX)));
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace v4serve::decode
