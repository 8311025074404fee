#include "router/router.h"
#include "services/cli/common.h"
#include "services/cli/subcommands.h"

namespace v4serve::cli {

int RunRouterCommand(const Context& ctx, const std::vector<std::string>& args) {
  router::RouterOptions o;
  o.process.grpc.port = 50051;
  services::LogOptions log;
  services::FlagSet flags("v4serve router",
                          "The front door: OpenAI-compatible HTTP (/v1/chat/completions, /v1/completions, "
                          "/v1/models, /healthz, /readyz, /metrics) and gRPC Inference.");
  flags.Add("http_host", &o.http.host, "Address for the HTTP API.");
  flags.Add("http_port", &o.http.port, "HTTP port; 0 picks a free one (see --ready_file).");
  flags.Add("http_threads", &o.http.io_threads, "HTTP I/O threads (each serves many connections).");
  flags.Add("max_body_bytes", &o.http.max_body_bytes, "Largest HTTP request body; larger gets 413.");
  flags.Add("http_read_timeout", &o.http.read_timeout, "Idle keep-alive and slow-body timeout.");
  flags.Add(
      "prefill_workers", &o.workers.prefill_targets,
      "Prefill workers, host:port, comma-separated; a DNS name stands for every address it resolves to.");
  flags.Add(
      "decode_workers", &o.workers.decode_targets,
      "Decode workers, host:port, comma-separated; a DNS name stands for every address it resolves to.");
  flags.Add("worker_health_interval", &o.workers.health_interval,
            "How often workers are re-resolved and checked.");
  flags.Add("worker_health_timeout", &o.workers.health_timeout, "Deadline of one worker health check.");
  flags.Add("model", &o.model_dir,
            "Model directory: its config.json and tokenizer.json (the router tokenizes).");
  flags.Add("served_model_name", &o.served_model_name,
            "Model id clients use (default: the directory's name).");
  flags.Add("request_timeout", &o.request_timeout, "Deadline of one completion on the workers.");
  flags.Add("routing_policy", &o.routing_policy,
            "How a worker is chosen per request: least_loaded, or prefix_aware (where the prompt's prefix "
            "is cached, weighed against load; fed by the workers' KV events).");
  flags.Add("routing_load_penalty_tokens", &o.routing_load_penalty_tokens,
            "prefix_aware: what one request in flight on a worker costs, in prompt tokens to compute.");
  flags.Add("api_keys_file", &o.api_keys_file,
            "JSON file of API keys and their tenants and limits (docs/API.md); empty = no authentication.");
  flags.Add("requests_per_minute", &o.default_limits.requests_per_minute,
            "Per-tenant request rate limit (keys may set their own); 0 = unlimited. Over it: HTTP 429.");
  flags.Add("max_concurrent_requests", &o.default_limits.max_concurrent,
            "Per-tenant requests in flight (keys may set their own); 0 = unlimited. Over it: HTTP 429.");
  services::AddServerFlags(flags, &o.process);
  services::AddLogFlags(flags, &log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(log, "router")) return 2;
  return ExitCode(router::RunRouter(o, ctx.shutdown), "router");
}

}  // namespace v4serve::cli
