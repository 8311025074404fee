// `v4serve router`: the front door. OpenAI-compatible HTTP and the public gRPC Inference service, in
// front of prefill and decode workers.
#ifndef V4SERVE_ROUTER_ROUTER_H_
#define V4SERVE_ROUTER_ROUTER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "router/http_server.h"
#include "router/tenants.h"
#include "router/worker_pool.h"
#include "services/server_process.h"
#include "services/shutdown.h"

namespace v4serve::router {

struct RouterOptions {
  HttpServerOptions http;
  services::ServerProcessOptions process;
  // Worker names (host:port; a DNS name may stand for every pod of a headless Service). With no decode
  // worker nothing is served; /readyz says so.
  WorkerPoolOptions workers;
  std::string routing_policy = "least_loaded";  // least_loaded | prefix_aware
  int64_t routing_load_penalty_tokens = 1024;   // prefix_aware: one in-flight request, in prompt tokens
  // API keys and tenant limits (router/tenants.h); empty file = no authentication.
  std::string api_keys_file;
  TenantLimits default_limits;
  // The served model: its config.json and tokenizer.json (the router tokenizes; workers hold the weights).
  std::string model_dir;
  std::string served_model_name;  // default: the model directory's name
  absl::Duration request_timeout = absl::Minutes(10);

  absl::Status Validate() const;
};

// Serves until `shutdown` triggers, then drains HTTP and gRPC. OK means a clean exit.
absl::Status RunRouter(const RouterOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_ROUTER_H_
