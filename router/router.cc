#include "router/router.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "router/completion_call.h"
#include "router/http_api.h"
#include "router/inference_service.h"
#include "router/kv_event_subscriber.h"
#include "router/prefix_index.h"
#include "router/served_model.h"
#include "router/tenants.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::router {
namespace {

// A sink that holds the request's tenant ticket (a concurrent slot) until the completion is over.
class TicketSink : public CompletionSink {
 public:
  TicketSink(std::unique_ptr<CompletionSink> inner, TenantTicket ticket)
      : inner_(std::move(inner)), ticket_(std::move(ticket)) {}
  void Event(const ChoiceEvent& event, const v1::GeneratedToken* token) override { inner_->Event(event, token); }
  void End(const UsageOut& usage) override { inner_->End(usage); }
  void Error(const absl::Status& status) override { inner_->Error(status); }
  void OnClientGone(std::function<void()> callback) override { inner_->OnClientGone(std::move(callback)); }
  bool sent_anything() const override { return inner_->sent_anything(); }

 private:
  std::unique_ptr<CompletionSink> inner_;
  TenantTicket ticket_;
};

// What the HTTP and gRPC front ends call: the served model (tokenizer, limits), tenants and the pool.
class ServingBackend : public RouterBackend {
 public:
  ServingBackend(const ServedModel* model, WorkerPool* pool, TenantRegistry* tenants,
                 absl::Duration request_timeout)
      : model_(model), pool_(pool), tenants_(tenants), completion_{model, pool, request_timeout} {}

  absl::StatusOr<std::string> Authenticate(absl::string_view authorization) const override {
    return tenants_->Authenticate(authorization);
  }

  absl::Status Ready() const override {
    if (model_ == nullptr) {
      return absl::UnavailableError(
          "no model is loaded: start the router with --model DIR (or run `v4serve up`)");
    }
    return pool_->Ready();
  }
  std::vector<std::string> ModelIds() const override {
    if (model_ == nullptr) return {};
    return {model_->id()};
  }

  void Start(OpenAiRequest req, const std::string& request_id,
             std::unique_ptr<CompletionSink> sink) override {
    absl::Status st;
    if (!req.model.empty() && req.model != model_->id()) {
      st = absl::NotFoundError(absl::StrCat("model: '", req.model,
                                            "' is not served here; this router serves '", model_->id(),
                                            "' (see /v1/models)"));
    }
    absl::StatusOr<EncodedPrompt> prompt = st.ok() ? model_->Encode(req) : absl::StatusOr<EncodedPrompt>(st);
    if (!prompt.ok()) return sink->Error(prompt.status());
    absl::StatusOr<TenantTicket> ticket = tenants_->Admit(req.tenant);
    if (!ticket.ok()) return sink->Error(ticket.status());
    StartCompletion(completion_, std::move(req), std::move(*prompt), request_id,
                    std::make_unique<TicketSink>(std::move(sink), std::move(*ticket)));
  }

 private:
  const ServedModel* model_;
  WorkerPool* pool_;
  TenantRegistry* tenants_;
  CompletionContext completion_;
};

}  // namespace

absl::Status RouterOptions::Validate() const {
  RETURN_IF_ERROR(http.Validate());
  RETURN_IF_ERROR(process.Validate());
  RETURN_IF_ERROR(workers.Validate());
  if (request_timeout <= absl::ZeroDuration())
    return absl::InvalidArgumentError("request_timeout must be positive");
  if (routing_load_penalty_tokens < 0) {
    return absl::InvalidArgumentError("routing_load_penalty_tokens: must be >= 0");
  }
  if (default_limits.requests_per_minute < 0 || default_limits.max_concurrent < 0) {
    return absl::InvalidArgumentError("requests_per_minute and max_concurrent_requests: must be >= 0");
  }
  return ValidateRoutingPolicyName(routing_policy);
}

absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("router");
  ASSIGN_OR_RETURN(std::unique_ptr<TenantRegistry> tenants,
                   TenantRegistry::Create(options.api_keys_file, options.default_limits));
  PrefixIndex prefix_index;
  ASSIGN_OR_RETURN(std::unique_ptr<RoutingPolicy> policy,
                   MakeRoutingPolicy({.name = options.routing_policy,
                                      .index = &prefix_index,
                                      .load_penalty_tokens = options.routing_load_penalty_tokens}));
  ASSIGN_OR_RETURN(std::unique_ptr<WorkerPool> pool, WorkerPool::Start(options.workers, policy.get()));
  // The prefix index follows the workers' KV events only when a policy reads it.
  std::unique_ptr<KvEventSubscriber> kv_events;
  if (options.routing_policy == "prefix_aware") {
    kv_events = std::make_unique<KvEventSubscriber>(pool.get(), &prefix_index);
  }
  std::unique_ptr<ServedModel> model;
  if (!options.model_dir.empty()) {
    ASSIGN_OR_RETURN(model, ServedModel::Load(options.model_dir, options.served_model_name));
  }
  ServingBackend backend(model.get(), pool.get(), tenants.get(), options.request_timeout);
  HttpApi api(&backend, &metrics);
  InferenceService inference(&backend);
  ASSIGN_OR_RETURN(
      std::unique_ptr<services::ServerProcess> process,
      services::ServerProcess::Start("router", options.process, {&inference}, &metrics, shutdown));
  ASSIGN_OR_RETURN(std::unique_ptr<HttpServer> http, HttpServer::Start(options.http, &api));
  process->AddReadyEntry("http_port", http->port());
  process->AddDrainable(http.get());
  if (absl::Status ready = backend.Ready(); !ready.ok()) {
    V4LOG(WARNING) << ready.message();
  }
  return process->Run();
}

}  // namespace v4serve::router
