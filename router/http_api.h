// The router's HTTP routes: OpenAI-compatible /v1/*, health (/healthz, /readyz) and /metrics.
//
// Thread-safe; called on HTTP I/O threads. `backend` and `metrics` must outlive it.
#ifndef V4SERVE_ROUTER_HTTP_API_H_
#define V4SERVE_ROUTER_HTTP_API_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "router/completion_call.h"
#include "router/http_server.h"
#include "router/openai_request.h"
#include "services/metrics.h"

namespace v4serve::router {

// What the HTTP layer needs from the rest of the router. Implemented by the worker pool.
class RouterBackend {
 public:
  virtual ~RouterBackend() = default;
  // OK when requests can be served now; otherwise the reason (e.g. no model is loaded, no healthy worker).
  virtual absl::Status Ready() const = 0;
  // The served model ids (empty when none is loaded).
  virtual std::vector<std::string> ModelIds() const = 0;
  // The tenant of a request from its Authorization value ("Bearer <key>"); UNAUTHENTICATED when keys are
  // configured and it is missing or unknown (router/tenants.h).
  virtual absl::StatusOr<std::string> Authenticate(absl::string_view authorization) const = 0;
  // Checks the model, encodes and runs one completion; its output and any error go to `sink`.
  virtual void Start(OpenAiRequest request, const std::string& request_id,
                     std::unique_ptr<CompletionSink> sink) = 0;
};

class HttpApi : public HttpHandler {
 public:
  HttpApi(RouterBackend* backend, services::MetricsRegistry* metrics);
  void Handle(HttpRequest request, std::shared_ptr<HttpResponder> responder) override;

 private:
  void Reply(const HttpRequest& req, HttpResponder& responder, int status, const std::string& content_type,
             std::string body);
  void ReplyError(const HttpRequest& req, HttpResponder& responder, const absl::Status& status);
  // 405 with an Allow header naming the methods the path takes, and an OpenAI error body.
  void MethodNotAllowed(const HttpRequest& req, HttpResponder& responder, const char* allow);

  RouterBackend* backend_;
  services::MetricsRegistry* metrics_;
  prometheus::Family<prometheus::Counter>* requests_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_HTTP_API_H_
