#include "router/completion_call.h"

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "kvstore/prefix_cache.h"
#include "router/choice_stream.h"
#include "router/openai_response.h"
#include "services/logging.h"
#include "services/request_id.h"
#include "services/status_mapping.h"
#include "v4serve/v1/inference.grpc.pb.h"
#include "v4serve/v1/worker.grpc.pb.h"

namespace v4serve::router {
namespace {

v1::GenerateRequest ToWorkerRequest(const OpenAiRequest& req, const EncodedPrompt& prompt,
                                    const std::string& model) {
  v1::GenerateRequest out;
  out.set_model(model);
  out.set_tenant(req.tenant);
  out.mutable_token_ids()->mutable_ids()->Add(prompt.ids.begin(), prompt.ids.end());
  v1::SamplingParams* s = out.mutable_sampling();
  const SamplingRequest& in = req.sampling;
  s->set_temperature(in.temperature);
  s->set_top_p(in.top_p);
  s->set_top_k(in.top_k);
  s->set_min_p(in.min_p);
  s->set_presence_penalty(in.presence_penalty);
  s->set_frequency_penalty(in.frequency_penalty);
  s->set_repetition_penalty(in.repetition_penalty);
  if (in.seed) s->set_seed(*in.seed);
  if (in.max_tokens) s->set_max_tokens(*in.max_tokens);
  s->set_n(in.n);
  s->set_logprobs(in.logprobs);
  s->set_top_logprobs(in.top_logprobs);
  s->set_ignore_eos(in.ignore_eos);
  s->mutable_stop_token_ids()->Add(in.stop_token_ids.begin(), in.stop_token_ids.end());
  // Stop strings are matched here on text; the worker stops on EOS and on token ids.
  return out;
}

class Call;

// One attempt on one worker: a gRPC client stream reactor that frees itself in OnDone.
class Attempt : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  // With a `prefill` lease the attempt is disaggregated: Worker.Decode on the decode worker, naming the
  // prefill worker; without one the decode worker prefills itself (Inference.Generate).
  Attempt(std::shared_ptr<Call> call, WorkerLease lease, WorkerLease prefill)
      : call_(std::move(call)), lease_(std::move(lease)), prefill_(std::move(prefill)) {}
  void Begin(const v1::GenerateRequest& request, const std::string& request_id, absl::Time deadline);
  // Shared so that a cancel from another thread never touches a freed context (the attempt deletes itself).
  const std::shared_ptr<grpc::ClientContext>& context() const { return ctx_; }
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  std::shared_ptr<Call> call_;
  WorkerLease lease_;
  WorkerLease prefill_;
  std::shared_ptr<grpc::ClientContext> ctx_ = std::make_shared<grpc::ClientContext>();
  v1::GenerateRequest request_;
  v1::DecodeRequest decode_request_;
  v1::GenerateResponse response_;
  std::unique_ptr<v1::Inference::Stub> stub_;
  std::unique_ptr<v1::Worker::Stub> worker_stub_;
};

class Call : public std::enable_shared_from_this<Call> {
 public:
  Call(const CompletionContext& ctx, OpenAiRequest req, EncodedPrompt prompt, std::string request_id,
       std::unique_ptr<CompletionSink> sink)
      : ctx_(ctx),
        req_(std::move(req)),
        prompt_(std::move(prompt)),
        request_id_(std::move(request_id)),
        sink_(std::move(sink)),
        deadline_(absl::Now() + ctx.request_timeout) {
    for (int32_t i = 0; i < req_.sampling.n; ++i) {
      choices_.push_back(std::make_unique<ChoiceStream>(
          ctx.model->tokenizer(),
          ChoiceStreamOptions{.index = i,
                              .thinking = prompt_.thinking,
                              .chat = req_.endpoint == Endpoint::kChatCompletions,
                              .stop = req_.sampling.stop,
                              .logprobs = req_.sampling.logprobs,
                              .tool_call_id_prefix = "call_" + services::NewRequestId().substr(4, 12) + "_",
                              .tool_calls = OffersTools(req_)}));
      done_.push_back(false);
    }
    worker_request_ = ToWorkerRequest(req_, prompt_, ctx.model->id());
  }

  void Start() {
    std::weak_ptr<Call> weak = shared_from_this();
    sink_->OnClientGone([weak] {
      if (auto self = weak.lock()) self->ClientGone();
    });
    NextAttempt(absl::OkStatus());
  }

  // --- from the attempt's reactor (serialized per attempt; attempts never overlap) ---
  void OnMessage(const v1::GenerateResponse& m) {
    if (m.has_usage()) usage_ = m.usage();
    if (m.choice_index() < 0 || m.choice_index() >= static_cast<int>(choices_.size())) return;
    int i = m.choice_index();
    ChoiceStream& choice = *choices_[i];
    for (const v1::GeneratedToken& t : m.tokens()) {
      if (done_[i]) break;
      std::vector<std::pair<model::TokenId, float>> top;
      for (const v1::TokenLogprob& lp : t.top_logprobs()) top.emplace_back(lp.token_id(), lp.logprob());
      absl::StatusOr<ChoiceEvent> e = choice.Push(t.token_id(), t.logprob(), top);
      if (!e.ok()) {
        Fail(absl::InternalError(absl::StrCat("worker sent a bad token: ", e.status().message())));
        return;
      }
      sink_->Event(*e, &t);
      if (choice.stopped()) {
        CloseChoice(i, Finish::kStop);
        stopped_here_ = true;
      }
    }
    if (!done_[i] && m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      CloseChoice(i, m.finish_reason() == v1::FINISH_REASON_LENGTH ? Finish::kLength : Finish::kStop);
    }
    // A stop string matched here: once no choice wants more, stop the worker's generation.
    if (stopped_here_ && AllDone()) CancelAttempt();
  }

  void OnAttemptDone(const std::string& worker, const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      attempt_ctx_ = nullptr;
    }
    if (AllDone() || failed_) return Complete();
    if (status.ok()) {
      for (size_t i = 0; i < choices_.size(); ++i) CloseChoice(static_cast<int>(i), Finish::kStop);
      return Complete();
    }
    bool client_gone;
    {
      absl::MutexLock lock(&mu_);
      client_gone = client_gone_;
    }
    if (client_gone) return Complete();
    bool worker_gone = status.code() == absl::StatusCode::kUnavailable;
    if (worker_gone) ctx_.pool->ReportFailure(WorkerRole::kDecode, worker, status);
    if (worker_gone && !sink_->sent_anything() && attempts_ < ctx_.max_attempts) {
      V4LOG(WARNING).With("request_id", request_id_).With("worker", worker).With("status", status)
          << "retrying on another worker";
      return NextAttempt(status);
    }
    Fail(status);
    Complete();
  }

 private:
  void NextAttempt(const absl::Status& previous) {
    ++attempts_;
    RoutingContext rc{.prompt_tokens = static_cast<int64_t>(prompt_.ids.size()),
                      .tenant = worker_request_.tenant(),
                      .prompt = prompt_.ids,
                      .tenant_salt = kvstore::TenantSalt(worker_request_.tenant())};
    absl::StatusOr<WorkerLease> lease = ctx_.pool->Pick(WorkerRole::kDecode, rc);
    if (!lease.ok()) {
      Fail(previous.ok() ? lease.status()
                         : absl::UnavailableError(
                               absl::StrCat(lease.status().message(), " (after: ", previous.message(), ")")));
      return Complete();
    }
    // Disaggregated when a prefill worker is healthy; otherwise the decode worker prefills itself.
    WorkerLease prefill;
    if (ctx_.pool->has_prefill_targets()) {
      absl::StatusOr<WorkerLease> p = ctx_.pool->Pick(WorkerRole::kPrefill, rc);
      if (p.ok()) prefill = std::move(*p);
    }
    auto* attempt = new Attempt(shared_from_this(), std::move(*lease), std::move(prefill));
    bool cancel_now;
    {
      absl::MutexLock lock(&mu_);
      attempt_ctx_ = attempt->context();
      cancel_now = client_gone_;
    }
    if (cancel_now) attempt->context()->TryCancel();  // TryCancel before the call starts cancels it at start
    attempt->Begin(worker_request_, request_id_, deadline_);
  }

  // TryCancel may run the attempt's OnDone inline, which takes mu_: never call it with mu_ held.
  void ClientGone() {
    std::shared_ptr<grpc::ClientContext> ctx;
    {
      absl::MutexLock lock(&mu_);
      client_gone_ = true;
      ctx = attempt_ctx_;
    }
    if (ctx) ctx->TryCancel();
  }

  void CancelAttempt() {
    std::shared_ptr<grpc::ClientContext> ctx;
    {
      absl::MutexLock lock(&mu_);
      ctx = attempt_ctx_;
    }
    if (ctx) ctx->TryCancel();
  }

  bool AllDone() const {
    for (bool d : done_) {
      if (!d) return false;
    }
    return true;
  }

  void CloseChoice(int i, Finish reason) {
    if (done_[i]) return;
    done_[i] = true;
    sink_->Event(choices_[i]->Close(reason), nullptr);
  }

  void Fail(const absl::Status& status) {
    if (failed_) return;
    failed_ = true;
    error_ = status;
  }

  UsageOut Usage() const {
    UsageOut u;
    u.prompt_tokens =
        usage_.prompt_tokens() > 0 ? usage_.prompt_tokens() : static_cast<int32_t>(prompt_.ids.size());
    u.cached_prompt_tokens = usage_.cached_prompt_tokens();
    for (const auto& c : choices_) {
      u.completion_tokens += c->completion_tokens();
      u.reasoning_tokens += c->reasoning_tokens();
    }
    return u;
  }

  // Sends what is owed to the client exactly once.
  void Complete() {
    if (completed_) return;
    completed_ = true;
    if (failed_) {
      V4LOG(WARNING).With("request_id", request_id_).With("status", error_) << "completion failed";
      sink_->Error(error_);
    } else {
      sink_->End(Usage());
    }
  }

  const CompletionContext ctx_;
  const OpenAiRequest req_;
  const EncodedPrompt prompt_;
  const std::string request_id_;
  std::unique_ptr<CompletionSink> sink_;
  const absl::Time deadline_;
  v1::GenerateRequest worker_request_;
  std::vector<std::unique_ptr<ChoiceStream>> choices_;
  std::vector<bool> done_;
  v1::Usage usage_;
  int attempts_ = 0;
  bool stopped_here_ = false;
  bool failed_ = false;
  bool completed_ = false;
  absl::Status error_;
  absl::Mutex mu_;  // guards the attempt in flight against ClientGone from an HTTP thread
  std::shared_ptr<grpc::ClientContext> attempt_ctx_ ABSL_GUARDED_BY(mu_);  // of the attempt in flight
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
};

void Attempt::Begin(const v1::GenerateRequest& request, const std::string& request_id, absl::Time deadline) {
  request_ = request;
  services::AttachRequestId(*ctx_, request_id);
  ctx_->set_deadline(absl::ToChronoTime(deadline));
  if (prefill_) {
    decode_request_.set_request_id(request_id);
    decode_request_.mutable_token_ids()->CopyFrom(request_.token_ids().ids());
    decode_request_.set_tenant(request_.tenant());
    *decode_request_.mutable_sampling() = request_.sampling();
    decode_request_.set_prefill_worker(prefill_.address());
    worker_stub_ = v1::Worker::NewStub(lease_.channel());
    worker_stub_->async()->Decode(ctx_.get(), &decode_request_, this);
  } else {
    stub_ = v1::Inference::NewStub(lease_.channel());
    stub_->async()->Generate(ctx_.get(), &request_, this);
  }
  StartRead(&response_);
  StartCall();
}

void Attempt::OnReadDone(bool ok) {
  if (!ok) return;  // the stream ended; OnDone follows
  call_->OnMessage(response_);
  StartRead(&response_);
}

void Attempt::OnDone(const grpc::Status& status) {
  std::shared_ptr<Call> call = std::move(call_);
  std::string worker = lease_.address();
  lease_ = WorkerLease();
  prefill_ = WorkerLease();
  absl::Status st = services::FromGrpcStatus(status);
  delete this;
  call->OnAttemptDone(worker, st);
}

// OpenAI over HTTP: SSE chunks while streaming, else one JSON body at the end.
class HttpSink : public CompletionSink {
 public:
  HttpSink(const OpenAiRequest& req, const std::string& model_id, const std::string& request_id,
           std::shared_ptr<HttpResponder> responder)
      : stream_(req.stream),
        include_usage_(req.include_usage),
        responder_(std::move(responder)),
        builder_(req.endpoint,
                 absl::StrCat(req.endpoint == Endpoint::kChatCompletions ? "chatcmpl-" : "cmpl-", request_id),
                 model_id, absl::ToUnixSeconds(absl::Now()), req.sampling.n) {}

  void Event(const ChoiceEvent& e, const v1::GeneratedToken*) override {
    if (!stream_) {
      builder_.Accumulate(e);
      return;
    }
    std::string chunk = builder_.StreamChunk(e);
    if (chunk.empty()) return;
    StartOnce();
    responder_->Write(std::move(chunk));
  }
  void End(const UsageOut& usage) override {
    if (!stream_) {
      responder_->Respond(200, "application/json", builder_.Body(usage));
      return;
    }
    StartOnce();
    responder_->Write(builder_.StreamEnd(usage, include_usage_));
    responder_->EndStream();
  }
  void Error(const absl::Status& status) override {
    if (sent_) {
      responder_->Write("data: " + services::OpenAiErrorJson(status) + "\n\n");
      responder_->EndStream();
    } else {
      responder_->Respond(services::ToHttpError(status).http_status, "application/json",
                          services::OpenAiErrorJson(status));
    }
  }
  void OnClientGone(std::function<void()> callback) override {
    responder_->OnClientGone(std::move(callback));
  }
  bool sent_anything() const override { return sent_; }

 private:
  void StartOnce() {
    if (!sent_) responder_->StartStream(200, "text/event-stream");
    sent_ = true;
  }

  const bool stream_;
  const bool include_usage_;
  std::shared_ptr<HttpResponder> responder_;
  ResponseBuilder builder_;
  bool sent_ = false;
};

}  // namespace

std::unique_ptr<CompletionSink> MakeHttpSink(const OpenAiRequest& request, const std::string& model_id,
                                             const std::string& request_id,
                                             std::shared_ptr<HttpResponder> responder) {
  return std::make_unique<HttpSink>(request, model_id, request_id, std::move(responder));
}

void StartCompletion(const CompletionContext& context, OpenAiRequest request, EncodedPrompt prompt,
                     std::string request_id, std::unique_ptr<CompletionSink> sink) {
  std::make_shared<Call>(context, std::move(request), std::move(prompt), std::move(request_id),
                         std::move(sink))
      ->Start();
}

}  // namespace v4serve::router
