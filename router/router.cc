#include "router/router.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "router/http_api.h"
#include "router/inference_service.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/status_macros.h"

namespace v4serve::router {
namespace {

// The HTTP and gRPC front ends see the workers through this.
class PoolBackend : public RouterBackend {
 public:
  explicit PoolBackend(WorkerPool* pool) : pool_(pool) {}
  absl::Status Ready() const override { return pool_->Ready(); }
  std::vector<std::string> ModelIds() const override { return {}; }

 private:
  WorkerPool* pool_;
};

}  // namespace

absl::Status RouterOptions::Validate() const {
  RETURN_IF_ERROR(http.Validate());
  RETURN_IF_ERROR(process.Validate());
  RETURN_IF_ERROR(workers.Validate());
  return MakeRoutingPolicy(routing_policy).status();
}

absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("router");
  ASSIGN_OR_RETURN(std::unique_ptr<RoutingPolicy> policy, MakeRoutingPolicy(options.routing_policy));
  ASSIGN_OR_RETURN(std::unique_ptr<WorkerPool> pool, WorkerPool::Start(options.workers, policy.get()));
  PoolBackend backend(pool.get());
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
