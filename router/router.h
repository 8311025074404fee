// `v4serve router`: the front door. OpenAI-compatible HTTP and the public gRPC Inference service, in
// front of prefill and decode workers.
#ifndef V4SERVE_ROUTER_ROUTER_H_
#define V4SERVE_ROUTER_ROUTER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "router/http_server.h"
#include "services/server_process.h"
#include "services/shutdown.h"

namespace v4serve::router {

struct RouterOptions {
  HttpServerOptions http;
  services::ServerProcessOptions process;
  // Worker addresses (host:port). Empty means no model is served yet; /readyz says so.
  std::vector<std::string> prefill_workers;
  std::vector<std::string> decode_workers;

  absl::Status Validate() const;
};

// Serves until `shutdown` triggers, then drains HTTP and gRPC. OK means a clean exit.
absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_ROUTER_H_
