#include "router/inference_service.h"

#include <deque>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "services/json_depth.h"
#include "services/request_id.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::router {
namespace {

// The client's stream. gRPC owns it (freed in OnDone); the pipeline reaches it through GrpcSink, which may
// outlive it. One write in flight; Finish only after the queue drained.
class GenerateStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  void Push(v1::GenerateResponse msg) {
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    queue_.push_back(std::move(msg));
    if (!writing_) WriteNext();
  }
  void FinishWith(const grpc::Status& status) {
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    finishing_ = true;
    final_ = status;
    if (!writing_) Finish(final_);
  }
  void SetOnCancel(std::function<void()> cb) {
    {
      absl::MutexLock lock(&mu_);
      if (!cancelled_) {
        on_cancel_ = std::move(cb);
        return;
      }
    }
    cb();  // already cancelled: run it now, outside the lock
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    queue_.pop_front();
    if (!ok) {
      queue_.clear();
      if (!finishing_) {
        finishing_ = true;
        final_ = grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      }
    }
    if (!queue_.empty() && ok) return WriteNext();
    if (finishing_) Finish(final_);
  }
  void OnCancel() override {
    std::function<void()> cb;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      cb = std::move(on_cancel_);
    }
    if (cb) cb();
  }
  void OnDone() override;
  // Set by GrpcSink; cleared in OnDone so the sink stops touching a freed stream.
  std::shared_ptr<absl::Mutex> link_mu;
  GenerateStream** link = nullptr;

 private:
  void WriteNext() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    writing_ = true;
    StartWrite(&queue_.front());
  }
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_ ABSL_GUARDED_BY(mu_);
  std::function<void()> on_cancel_ ABSL_GUARDED_BY(mu_);
};

// The pipeline's view of a gRPC client: each event becomes a GenerateResponse.
class GrpcSink : public CompletionSink {
 public:
  GrpcSink(GenerateStream* stream, std::string request_id, bool stream_text)
      : mu_(std::make_shared<absl::Mutex>()),
        stream_(stream),
        request_id_(std::move(request_id)),
        stream_text_(stream_text) {
    stream_->link_mu = mu_;
    stream_->link = &stream_;
  }
  ~GrpcSink() override {
    absl::MutexLock lock(mu_.get());
    if (stream_ != nullptr) stream_->link = nullptr;
  }
  void Event(const ChoiceEvent& e, const v1::GeneratedToken* token) override {
    v1::GenerateResponse m;
    m.set_request_id(request_id_);
    m.set_choice_index(e.index);
    if (token != nullptr) *m.add_tokens() = *token;
    if (stream_text_) {
      m.set_text_delta(e.content);
      m.set_reasoning_delta(e.reasoning);
      for (const ToolCallOut& c : e.tool_calls) {
        v1::ToolCall* t = m.add_tool_calls();
        t->set_id(c.id);
        t->set_name(c.name);
        t->set_arguments(c.arguments);
      }
    }
    if (e.finish) {
      m.set_finish_reason(*e.finish == Finish::kLength      ? v1::FINISH_REASON_LENGTH
                          : *e.finish == Finish::kToolCalls ? v1::FINISH_REASON_TOOL_CALLS
                          : *e.finish == Finish::kCancelled ? v1::FINISH_REASON_CANCELLED
                                                            : v1::FINISH_REASON_STOP);
    }
    if (m.tokens_size() == 0 && m.text_delta().empty() && m.reasoning_delta().empty() &&
        m.tool_calls_size() == 0 && !e.finish) {
      return;
    }
    sent_ = true;
    With([&](GenerateStream* s) { s->Push(std::move(m)); });
  }
  void End(const UsageOut& u) override {
    v1::GenerateResponse m;
    m.set_request_id(request_id_);
    m.mutable_usage()->set_prompt_tokens(u.prompt_tokens);
    m.mutable_usage()->set_completion_tokens(u.completion_tokens);
    m.mutable_usage()->set_cached_prompt_tokens(u.cached_prompt_tokens);
    m.mutable_usage()->set_reasoning_tokens(u.reasoning_tokens);
    With([&](GenerateStream* s) {
      s->Push(std::move(m));
      s->FinishWith(grpc::Status::OK);
    });
  }
  void Error(const absl::Status& status) override {
    With([&](GenerateStream* s) { s->FinishWith(services::ToGrpcStatus(status)); });
  }
  void OnClientGone(std::function<void()> callback) override {
    With([&](GenerateStream* s) { s->SetOnCancel(std::move(callback)); });
  }
  bool sent_anything() const override { return sent_; }

 private:
  template <typename F>
  void With(F f) {
    absl::MutexLock lock(mu_.get());
    if (stream_ != nullptr) f(stream_);
  }
  std::shared_ptr<absl::Mutex> mu_;
  GenerateStream* stream_;
  std::string request_id_;
  bool stream_text_;
  bool sent_ = false;
};

void GenerateStream::OnDone() {
  if (link_mu) {
    absl::MutexLock lock(link_mu.get());
    if (link != nullptr) *link = nullptr;
  }
  delete this;
}

}  // namespace

absl::StatusOr<OpenAiRequest> FromGenerateRequest(const v1::GenerateRequest& in) {
  OpenAiRequest r;
  r.model = in.model();
  switch (in.prompt_case()) {
    case v1::GenerateRequest::kText:
      r.endpoint = Endpoint::kCompletions;
      if (in.text().empty()) return absl::InvalidArgumentError("text: the prompt is empty");
      r.prompt_text = in.text();
      break;
    case v1::GenerateRequest::kTokenIds:
      r.endpoint = Endpoint::kCompletions;
      r.prompt_ids = std::vector<int32_t>(in.token_ids().ids().begin(), in.token_ids().ids().end());
      for (int32_t id : *r.prompt_ids) {
        if (id < 0) return absl::InvalidArgumentError("token_ids: ids must be non-negative");
      }
      break;
    case v1::GenerateRequest::kChatJson: {
      r.endpoint = Endpoint::kChatCompletions;
      if (!JsonDepthWithin(in.chat_json())) {
        return absl::InvalidArgumentError(
            absl::StrCat("chat_json: nests deeper than ", kMaxJsonDepth, " levels"));
      }
      nlohmann::ordered_json chat = nlohmann::ordered_json::parse(in.chat_json(), nullptr, false);
      if (chat.is_discarded() || !chat.is_object()) {
        return absl::InvalidArgumentError(
            "chat_json: must be a JSON object {\"messages\": [...], \"tools\": [...]}");
      }
      if (!chat.contains("messages") || !chat["messages"].is_array() || chat["messages"].empty()) {
        return absl::InvalidArgumentError("chat_json.messages: must be a non-empty array");
      }
      r.messages = chat["messages"];
      if (chat.contains("tools") && !chat["tools"].is_null()) r.tools = chat["tools"];
      break;
    }
    default:
      return absl::InvalidArgumentError("prompt: one of text, token_ids or chat_json is required");
  }
  const v1::SamplingParams& s = in.sampling();
  SamplingRequest& o = r.sampling;
  if (s.has_temperature()) o.temperature = s.temperature();
  if (s.has_top_p()) o.top_p = s.top_p();
  if (s.has_top_k()) o.top_k = s.top_k();
  if (s.has_min_p()) o.min_p = s.min_p();
  if (s.has_repetition_penalty()) o.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) o.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) o.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) o.seed = s.seed();
  if (s.max_tokens() < 0) return absl::InvalidArgumentError("sampling.max_tokens: must be >= 0");
  if (s.max_tokens() > 0) o.max_tokens = s.max_tokens();
  if (s.n() < 0 || s.n() > 8) return absl::InvalidArgumentError("sampling.n: must be in [0, 8]");
  o.n = std::max(1, s.n());
  if (s.stop_size() > 4) return absl::InvalidArgumentError("sampling.stop: at most 4 stop strings");
  for (const std::string& stop : s.stop()) {
    if (!stop.empty()) o.stop.push_back(stop);
  }
  o.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  o.logprobs = s.logprobs();
  o.top_logprobs = s.top_logprobs();
  o.ignore_eos = s.ignore_eos();
  // Before anything runs: a NaN temperature or an out-of-range penalty used to reach the workers, fail the
  // prefill there, and come back only after the decode worker's local retry.
  RETURN_IF_ERROR(CheckSampling(o, "sampling."));
  switch (in.reasoning_mode()) {
    case v1::REASONING_MODE_UNSPECIFIED:
    case v1::REASONING_MODE_NON_THINK:
      r.reasoning = ReasoningMode::kNonThink;
      break;
    case v1::REASONING_MODE_THINK_HIGH:
      r.reasoning = ReasoningMode::kThinkHigh;
      break;
    case v1::REASONING_MODE_THINK_MAX:
      r.reasoning = ReasoningMode::kThinkMax;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("reasoning_mode: unknown value ", static_cast<int>(in.reasoning_mode())));
  }
  r.cache_handle = in.cache_handle();
  r.quick_instruction = in.quick_instruction();
  return r;
}

namespace {

// The caller's tenant from its "authorization" metadata ("Bearer <key>"), as HTTP does from the header.
absl::StatusOr<std::string> AuthenticateCall(const RouterBackend& backend,
                                             const grpc::CallbackServerContext& ctx) {
  auto auth = ctx.client_metadata().find("authorization");
  return backend.Authenticate(auth == ctx.client_metadata().end()
                                  ? absl::string_view()
                                  : absl::string_view(auth->second.data(), auth->second.size()));
}

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  auto* stream = new GenerateStream();
  std::string request_id = services::RequestIdFrom(*ctx);
  auto sink = std::make_unique<GrpcSink>(stream, request_id, request->stream_text());
  absl::Status ready = backend_->Ready();
  if (!ready.ok()) {
    sink->Error(absl::UnavailableError(ready.message()));
    return stream;
  }
  absl::StatusOr<std::string> tenant = AuthenticateCall(*backend_, *ctx);
  if (!tenant.ok()) {
    sink->Error(tenant.status());
    return stream;
  }
  absl::StatusOr<OpenAiRequest> req = FromGenerateRequest(*request);
  if (!req.ok()) {
    sink->Error(req.status());
    return stream;
  }
  req->tenant = *tenant;
  backend_->Start(std::move(*req), request_id, std::move(sink));
  return stream;
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* ctx,
                                                       const v1::ListModelsRequest*,
                                                       v1::ListModelsResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<std::string> tenant = AuthenticateCall(*backend_, *ctx);
  if (!tenant.ok()) {
    reactor->Finish(services::ToGrpcStatus(tenant.status()));
    return reactor;
  }
  for (const std::string& id : backend_->ModelIds()) {
    v1::ModelCard* card = response->add_models();
    card->set_id(id);
    card->set_owned_by("v4serve");
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace v4serve::router
