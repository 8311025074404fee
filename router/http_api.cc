#include "router/http_api.h"

#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/logging.h"
#include "services/status_mapping.h"

namespace v4serve::router {
namespace {

constexpr char kJson[] = "application/json";

}  // namespace

HttpApi::HttpApi(RouterBackend* backend, services::MetricsRegistry* metrics)
    : backend_(backend),
      metrics_(metrics),
      requests_(&prometheus::BuildCounter()
                     .Name("v4serve_http_requests_total")
                     .Help("HTTP requests answered by the router, by route and status code.")
                     .Register(metrics->registry())) {}

void HttpApi::Reply(const HttpRequest& req, HttpResponder& responder, int status,
                    const std::string& content_type, std::string body) {
  std::string route = req.path.rfind("/v1/", 0) == 0 || req.path == "/healthz" || req.path == "/readyz" ||
                              req.path == "/metrics"
                          ? req.path
                          : "other";
  requests_->Add({{"route", route}, {"code", absl::StrCat(status)}}).Increment();
  responder.Respond(status, content_type, std::move(body));
}

void HttpApi::ReplyError(const HttpRequest& req, HttpResponder& responder, const absl::Status& status) {
  int code = services::ToHttpError(status).http_status;
  // 503 is the normal answer while nothing is served (readiness probes poll it): not a warning.
  if (code >= 500 && code != 503) {
    V4LOG(WARNING).With("request_id", req.request_id).With("path", req.path).With("status", status)
        << "request failed";
  }
  Reply(req, responder, code, kJson, services::OpenAiErrorJson(status));
}

void HttpApi::MethodNotAllowed(const HttpRequest& req, HttpResponder& responder, const char* allow) {
  responder.AddHeader("Allow", allow);
  Reply(req, responder, 405, kJson,
        services::OpenAiErrorJson(
            absl::InvalidArgumentError(absl::StrCat(req.path, " accepts ", allow, ", not ", req.method))));
}

void HttpApi::Handle(HttpRequest req, std::shared_ptr<HttpResponder> responder) {
  const bool get = req.method == "GET" || req.method == "HEAD";
  const bool get_route = req.path == "/healthz" || req.path == "/readyz" || req.path == "/metrics" ||
                         req.path == "/v1/models" || req.path.rfind("/v1/models/", 0) == 0;
  if (get_route && !get) return MethodNotAllowed(req, *responder, "GET, HEAD");  // Below: GET or HEAD.
  if (req.path == "/healthz") {
    return Reply(req, *responder, 200, kJson, R"({"status":"ok"})");
  }
  if (req.path == "/readyz") {
    absl::Status ready = backend_->Ready();
    if (!ready.ok()) return ReplyError(req, *responder, absl::UnavailableError(ready.message()));
    return Reply(req, *responder, 200, kJson, R"({"status":"ready"})");
  }
  if (req.path == "/metrics") {
    return Reply(req, *responder, 200, "text/plain; version=0.0.4", metrics_->Serialize());
  }
  absl::StatusOr<std::string> tenant;
  if (req.path.rfind("/v1/", 0) == 0) {
    tenant = backend_->Authenticate(req.Header("authorization"));
    if (!tenant.ok()) return ReplyError(req, *responder, tenant.status());
  }
  auto model_json = [](const std::string& id) {
    return nlohmann::json{{"id", id}, {"object", "model"}, {"created", 0}, {"owned_by", "v4serve"}};
  };
  if (req.path == "/v1/models") {
    nlohmann::json out = {{"object", "list"}, {"data", nlohmann::json::array()}};
    for (const std::string& id : backend_->ModelIds()) out["data"].push_back(model_json(id));
    return Reply(req, *responder, 200, kJson, out.dump());
  }
  if (constexpr std::string_view kModel = "/v1/models/"; req.path.rfind(kModel, 0) == 0) {
    const std::string id = req.path.substr(kModel.size());
    for (const std::string& known : backend_->ModelIds()) {
      if (known == id) return Reply(req, *responder, 200, kJson, model_json(id).dump());
    }
    return ReplyError(req, *responder, absl::NotFoundError(absl::StrCat("model '", id, "' does not exist")));
  }
  if (req.path == "/v1/chat/completions" || req.path == "/v1/completions") {
    if (req.method != "POST") return MethodNotAllowed(req, *responder, "POST");
    absl::Status ready = backend_->Ready();
    if (!ready.ok()) return ReplyError(req, *responder, absl::UnavailableError(ready.message()));
    Endpoint endpoint = req.path == "/v1/completions" ? Endpoint::kCompletions : Endpoint::kChatCompletions;
    absl::StatusOr<OpenAiRequest> parsed = ParseOpenAiRequest(endpoint, req.body);
    if (!parsed.ok()) return ReplyError(req, *responder, parsed.status());
    parsed->tenant = *tenant;
    std::vector<std::string> ids = backend_->ModelIds();
    std::unique_ptr<CompletionSink> sink =
        MakeHttpSink(*parsed, ids.empty() ? "" : ids.front(), req.request_id, std::move(responder));
    return backend_->Start(std::move(*parsed), req.request_id, std::move(sink));
  }
  ReplyError(req, *responder,
             absl::NotFoundError(absl::StrCat("no route for ", req.method, " ", req.path,
                                              "; see /v1/models, /v1/chat/completions, /v1/completions")));
}

}  // namespace v4serve::router
