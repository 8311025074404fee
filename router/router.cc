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

// Until worker discovery and health checking land (disaggregated serving), the router knows its workers
// only from flags and reports that nothing is served without them.
class StaticWorkers : public RouterBackend {
 public:
  explicit StaticWorkers(const RouterOptions& o) : options_(o) {}
  absl::Status Ready() const override {
    if (options_.decode_workers.empty()) {
      return absl::UnavailableError(
          "no model is loaded: this router has no decode workers (start `v4serve decode --model DIR` and "
          "pass "
          "--decode_workers, or run `v4serve up`)");
    }
    return absl::UnavailableError("worker health checking is not available in this build");
  }
  std::vector<std::string> ModelIds() const override { return {}; }

 private:
  const RouterOptions& options_;
};

}  // namespace

absl::Status RouterOptions::Validate() const {
  RETURN_IF_ERROR(http.Validate());
  RETURN_IF_ERROR(process.Validate());
  for (const std::string& w : prefill_workers) {
    if (w.find(':') == std::string::npos)
      return absl::InvalidArgumentError(absl::StrCat("prefill_workers: '", w, "' is not host:port"));
  }
  for (const std::string& w : decode_workers) {
    if (w.find(':') == std::string::npos)
      return absl::InvalidArgumentError(absl::StrCat("decode_workers: '", w, "' is not host:port"));
  }
  return absl::OkStatus();
}

absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("router");
  StaticWorkers backend(options);
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
