#include "router/router.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "router/completion_call.h"
#include "router/http_api.h"
#include "router/inference_service.h"
#include "router/served_model.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::router {
namespace {

// What the HTTP and gRPC front ends call: the served model (tokenizer, limits) and the worker pool.
class ServingBackend : public RouterBackend {
 public:
  ServingBackend(const ServedModel* model, WorkerPool* pool, absl::Duration request_timeout)
      : model_(model), pool_(pool), completion_{model, pool, request_timeout} {}

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
    StartCompletion(completion_, std::move(req), std::move(*prompt), request_id, std::move(sink));
  }

 private:
  const ServedModel* model_;
  WorkerPool* pool_;
  CompletionContext completion_;
};

}  // namespace

absl::Status RouterOptions::Validate() const {
  RETURN_IF_ERROR(http.Validate());
  RETURN_IF_ERROR(process.Validate());
  RETURN_IF_ERROR(workers.Validate());
  if (request_timeout <= absl::ZeroDuration())
    return absl::InvalidArgumentError("request_timeout must be positive");
  return MakeRoutingPolicy(routing_policy).status();
}

absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("router");
  ASSIGN_OR_RETURN(std::unique_ptr<RoutingPolicy> policy, MakeRoutingPolicy(options.routing_policy));
  ASSIGN_OR_RETURN(std::unique_ptr<WorkerPool> pool, WorkerPool::Start(options.workers, policy.get()));
  std::unique_ptr<ServedModel> model;
  if (!options.model_dir.empty()) {
    ASSIGN_OR_RETURN(model, ServedModel::Load(options.model_dir, options.served_model_name));
  }
  ServingBackend backend(model.get(), pool.get(), options.request_timeout);
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
