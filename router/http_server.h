// An HTTP/1.1 server on Boost.Beast for the router's OpenAI-compatible API.
//
// Asynchronous: a few I/O threads serve thousands of connections (no thread per connection); keep-alive;
// request bodies capped by max_body_bytes (413); responses are either whole or streamed (chunked
// transfer encoding, used for SSE). A client that disconnects while a response is open is reported to
// the handler through HttpResponder::OnClientGone so that its work can be cancelled.
//
// Thread-safe. The handler must outlive the server; it is called on I/O threads and must not block them
// (hand long work elsewhere and respond later through the HttpResponder, which may be used from any thread).
#ifndef V4SERVE_ROUTER_HTTP_SERVER_H_
#define V4SERVE_ROUTER_HTTP_SERVER_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/server_process.h"

namespace v4serve::router {

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  int port = 8080;  // 0 = ephemeral
  int io_threads = 2;
  int64_t max_body_bytes = 16 << 20;
  absl::Duration read_timeout = absl::Seconds(60);  // idle keep-alive and slow request bodies

  absl::Status Validate() const;
};

struct HttpRequest {
  std::string method;                          // "GET", "POST", ...
  std::string target;                          // path and query, e.g. "/v1/models?x=1"
  std::string path;                            // target without the query
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  std::string request_id;  // from X-Request-Id when valid, else new

  std::string Header(const std::string& lower_name) const;
};

// The way back to one client for one request. Exactly one of Respond() or StartStream()+...+EndStream()
// must be called; calls after the client is gone are dropped. Thread-safe.
class HttpResponder {
 public:
  virtual ~HttpResponder() = default;
  // A header line for the response about to be sent (Respond or StartStream), e.g. Allow with a 405.
  virtual void AddHeader(std::string name, std::string value) = 0;
  virtual void Respond(int status, const std::string& content_type, std::string body) = 0;
  // Starts a chunked response (e.g. text/event-stream), then Write() chunks, then EndStream().
  virtual void StartStream(int status, const std::string& content_type) = 0;
  virtual void Write(std::string chunk) = 0;
  virtual void EndStream() = 0;
  // `callback` runs once if the client disconnects before the response ends (at once if already gone).
  virtual void OnClientGone(std::function<void()> callback) = 0;
};

class HttpHandler {
 public:
  virtual ~HttpHandler() = default;
  virtual void Handle(HttpRequest request, std::shared_ptr<HttpResponder> responder) = 0;
};

class HttpServer : public services::Drainable {
 public:
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options,
                                                           HttpHandler* handler);
  ~HttpServer() override;

  int port() const;
  // Requests whose response has not ended.
  int in_flight() const;

  void StopAccepting() override;
  void FinishInFlight(absl::Time deadline) override;

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_HTTP_SERVER_H_
