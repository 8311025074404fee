#include "router/http_server.h"

#include <sys/socket.h>

#include <cerrno>
#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "boost/asio.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"
#include "services/logging.h"
#include "services/request_id.h"
#include "services/status_mapping.h"

namespace v4serve::router {

namespace beast = boost::beast;
namespace http = boost::beast::http;
namespace net = boost::asio;
using tcp = boost::asio::ip::tcp;

absl::Status HttpServerOptions::Validate() const {
  if (port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("http_port ", port, " out of range"));
  if (io_threads < 1 || io_threads > 256)
    return absl::InvalidArgumentError("http_threads must be in [1, 256]");
  if (max_body_bytes < 1024) return absl::InvalidArgumentError("max_body_bytes must be at least 1024");
  if (read_timeout <= absl::ZeroDuration())
    return absl::InvalidArgumentError("http_read_timeout must be positive");
  return absl::OkStatus();
}

std::string HttpRequest::Header(const std::string& lower_name) const {
  auto it = headers.find(lower_name);
  return it == headers.end() ? std::string() : it->second;
}

struct HttpServer::Impl {
  explicit Impl(const HttpServerOptions& o, HttpHandler* h) : options(o), handler(h), acceptor(ioc) {}

  void Accept();
  void RequestStarted() { in_flight.fetch_add(1); }
  void RequestEnded() {
    absl::MutexLock lock(&mu);
    in_flight.fetch_sub(1);
  }

  HttpServerOptions options;
  HttpHandler* handler;
  net::io_context ioc;
  // Keeps the io threads running while no socket operation is pending (a drain: the acceptor closed, a
  // departed client's stream still to be ended by its handler), until the destructor lets them go.
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work;
  tcp::acceptor acceptor;
  std::vector<std::thread> threads;
  std::atomic<int> in_flight{0};
  std::atomic<bool> draining{false};
  absl::Mutex mu;  // lets FinishInFlight wait on in_flight
  int port = 0;
};

namespace {

std::string StatusLine(int status) {
  return absl::StrCat("HTTP/1.1 ", status, " ",
                      std::string(http::obsolete_reason(static_cast<http::status>(status))), "\r\n");
}

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, HttpServer::Impl* server) : stream_(std::move(socket)), server_(server) {}

  void Start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->DoRead(); });
  }

  // --- called through Responder, always on the strand ---
  void AddHeader(const std::string& name, const std::string& value) {
    // Names and values with CR or LF would split the header: they are dropped (handlers set fixed ones).
    if (ended_ || streaming_ || name.find_first_of("\r\n") != std::string::npos ||
        value.find_first_of("\r\n") != std::string::npos) {
      return;
    }
    absl::StrAppend(&extra_headers_, name, ": ", value, "\r\n");
  }
  void Respond(int status, const std::string& content_type, const std::string& body) {
    if (ended_) return;
    ended_ = true;
    server_->RequestEnded();
    if (gone_) return Close();
    std::string out = StatusLine(status);
    absl::StrAppend(&out, "Content-Type: ", content_type, "\r\nContent-Length: ", body.size(),
                    "\r\nX-Request-Id: ", request_id_, "\r\n", extra_headers_, KeepAliveHeader(), "\r\n");
    if (!head_) out += body;  // HEAD: the headers a GET would get, no body (else it opens the next reply).
    Enqueue(std::move(out));
  }
  void StartStream(int status, const std::string& content_type) {
    if (ended_ || streaming_) return;
    streaming_ = true;
    if (gone_) return;
    std::string out = StatusLine(status);
    absl::StrAppend(&out, "Content-Type: ", content_type,
                    "\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nX-Request-Id: ",
                    request_id_, "\r\n", extra_headers_, KeepAliveHeader(), "\r\n");
    Enqueue(std::move(out));
  }
  void Write(const std::string& chunk) {
    if (ended_ || !streaming_ || gone_ || chunk.empty()) return;
    std::string out = absl::StrCat(absl::Hex(chunk.size()), "\r\n");
    out += chunk;
    out += "\r\n";
    Enqueue(std::move(out));
  }
  void EndStream() {
    if (ended_) return;
    ended_ = true;
    server_->RequestEnded();
    if (gone_) return Close();
    if (!streaming_) StartStream(200, "text/plain");
    Enqueue("0\r\n\r\n");
  }
  void OnClientGone(std::function<void()> callback) {
    if (gone_) {
      callback();
      return;
    }
    gone_callbacks_.push_back(std::move(callback));
  }
  net::any_io_executor executor() { return stream_.get_executor(); }
  uint64_t generation() const { return generation_; }  // strand only

 private:
  std::string KeepAliveHeader() const {
    return keep_alive_ && !server_->draining.load() ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  }

  void DoRead() {
    if (server_->draining.load()) return Close();
    parser_.emplace();
    parser_->body_limit(static_cast<uint64_t>(server_->options.max_body_bytes));
    parser_->header_limit(64 * 1024);
    stream_.expires_after(
        std::chrono::microseconds(absl::ToInt64Microseconds(server_->options.read_timeout)));
    reading_ = true;
    http::async_read_header(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  // The header is in: a client that sent "Expect: 100-continue" waits for the interim answer before its body
  // (curl does for large bodies, a second each otherwise); one whose body is too large gets 413 instead.
  void OnHeader(beast::error_code ec) {
    if (ec) return OnRead(ec);
    const http::request<http::string_body>& h = parser_->get();
    const auto expect = h[http::field::expect];
    if (absl::EqualsIgnoreCase(absl::string_view(expect.data(), expect.size()), "100-continue") &&
        !parser_->is_done()) {
      if (parser_->content_length() &&
          *parser_->content_length() > static_cast<uint64_t>(server_->options.max_body_bytes)) {
        return OnRead(http::error::body_limit);
      }
      Enqueue("HTTP/1.1 100 Continue\r\n\r\n");
    }
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    reading_ = false;
    if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
        ec == net::error::operation_aborted) {
      return Close();
    }
    if (ec == http::error::body_limit) {
      return FailEarly(services::PayloadTooLargeError(absl::StrCat(
          "request body is larger than the limit of ", server_->options.max_body_bytes, " bytes")));
    }
    if (ec) {
      if (ec == net::error::eof || ec == net::error::connection_reset) return Close();
      return FailEarly(absl::InvalidArgumentError(absl::StrCat("malformed HTTP request: ", ec.message())));
    }
    stream_.expires_never();
    http::request<http::string_body> msg = parser_->release();
    HttpRequest req;
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    req.path = req.target.substr(0, req.target.find('?'));
    for (const auto& field : msg) {
      req.headers[absl::AsciiStrToLower(std::string(field.name_string()))] = std::string(field.value());
    }
    req.body = std::move(msg.body());
    std::string given = req.Header("x-request-id");
    req.request_id = services::IsValidRequestId(given) ? given : services::NewRequestId();
    request_id_ = req.request_id;
    keep_alive_ = msg.keep_alive();
    head_ = msg.method() == http::verb::head;
    extra_headers_.clear();
    ended_ = streaming_ = gone_ = false;
    gone_callbacks_.clear();
    ++generation_;
    server_->RequestStarted();
    WatchForDisconnect();
    server_->handler->Handle(std::move(req), MakeResponder());
  }

  // An error found before a handler saw the request: answer it and close the connection.
  void FailEarly(const absl::Status& status) {
    request_id_ = services::NewRequestId();
    keep_alive_ = false;
    ended_ = true;
    services::HttpError e = services::ToHttpError(status);
    std::string body = services::OpenAiErrorJson(status);
    std::string out = StatusLine(e.http_status);
    absl::StrAppend(&out, "Content-Type: application/json\r\nContent-Length: ", body.size(),
                    "\r\nConnection: close\r\n\r\n", body);
    Enqueue(std::move(out));
  }

  // While a response is open the client sends nothing (no pipelining from SSE clients); the socket
  // becoming readable with no bytes means it closed.
  // A wait left over from an earlier request on this keep-alive connection must not judge the current
  // one, hence the request generation. Asio may also report readiness that is gone by the time the handler
  // runs (edge-triggered epoll), so the socket is asked directly: recv(MSG_PEEK) returning 0 is the peer's
  // close, EAGAIN a spurious wake-up (wait again), data a pipelined request (stop watching).
  void WatchForDisconnect() {
    stream_.socket().async_wait(
        tcp::socket::wait_read,
        net::bind_executor(
            stream_.get_executor(), [self = shared_from_this(), gen = generation_](beast::error_code ec) {
              if (gen != self->generation_ || (self->ended_ && self->queue_.empty())) return;
              if (ec == net::error::operation_aborted) return;  // we are closing the socket ourselves
              if (ec) return self->MarkGone();
              char byte;
              ssize_t n = ::recv(self->stream_.socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
              if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                return self->MarkGone();
              if (n < 0) self->WatchForDisconnect();
            }));
  }

  void MarkGone() {
    if (gone_) return;
    gone_ = true;
    std::vector<std::function<void()>> callbacks;
    callbacks.swap(gone_callbacks_);
    for (auto& cb : callbacks) cb();
  }

  void Enqueue(std::string data) {
    queue_.push_back(std::move(data));
    if (queue_.size() == 1) WriteFront();
  }

  void WriteFront() {
    net::async_write(stream_, net::buffer(queue_.front()),
                     [self = shared_from_this()](beast::error_code ec, size_t) { self->OnWrite(ec); });
  }

  void OnWrite(beast::error_code ec) {
    if (ec) {
      queue_.clear();
      MarkGone();
      return Close();
    }
    queue_.pop_front();
    if (!queue_.empty()) return WriteFront();
    if (reading_) return;  // an interim "100 Continue" while the request's body is read
    if (!ended_) return;   // streaming: more chunks will come
    if (keep_alive_ && !gone_) return DoRead();
    Close();
  }

  void Close() {
    MarkGone();
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  std::shared_ptr<HttpResponder> MakeResponder();

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  HttpServer::Impl* server_;
  std::deque<std::string> queue_;
  std::vector<std::function<void()>> gone_callbacks_;
  std::string request_id_;
  bool keep_alive_ = false;
  bool head_ = false;          // The request is HEAD: Respond sends no body.
  std::string extra_headers_;  // AddHeader's lines for this request's response.
  bool reading_ = false;       // A request is being read (DoRead until OnRead).
  bool ended_ = true;
  bool streaming_ = false;
  bool gone_ = false;
  uint64_t generation_ = 0;  // requests started on this connection
};

// Forwards to the Session on its strand, so handlers may respond from any thread. Bound to the request it
// was made for: on a keep-alive connection a late call (or the destructor's fallback answer) from an earlier
// request's responder must not touch the request being served now.
class SessionResponder : public HttpResponder {
 public:
  SessionResponder(std::shared_ptr<Session> s, uint64_t generation)
      : session_(std::move(s)), generation_(generation) {}
  ~SessionResponder() override {
    // A handler that dropped its responder without answering must not leak the request.
    Post([](Session& s) {
      s.Respond(500, "application/json",
                services::OpenAiErrorJson(absl::InternalError("the request was dropped without a response")));
    });
  }
  void AddHeader(std::string name, std::string value) override {
    Post([name = std::move(name), value = std::move(value)](Session& s) { s.AddHeader(name, value); });
  }
  void Respond(int status, const std::string& content_type, std::string body) override {
    Post([status, content_type, body = std::move(body)](Session& s) {
      s.Respond(status, content_type, body);
    });
  }
  void StartStream(int status, const std::string& content_type) override {
    Post([status, content_type](Session& s) { s.StartStream(status, content_type); });
  }
  void Write(std::string chunk) override {
    Post([chunk = std::move(chunk)](Session& s) { s.Write(chunk); });
  }
  void EndStream() override {
    Post([](Session& s) { s.EndStream(); });
  }
  void OnClientGone(std::function<void()> callback) override {
    Post([cb = std::move(callback)](Session& s) mutable { s.OnClientGone(std::move(cb)); });
  }

 private:
  template <typename F>
  void Post(F f) {
    net::post(session_->executor(), [s = session_, gen = generation_, f = std::move(f)]() mutable {
      if (s->generation() == gen) f(*s);
    });
  }

  std::shared_ptr<Session> session_;
  const uint64_t generation_;
};

std::shared_ptr<HttpResponder> Session::MakeResponder() {
  return std::make_shared<SessionResponder>(shared_from_this(), generation_);
}

}  // namespace

void HttpServer::Impl::Accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (ec) {
      if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
      V4LOG(WARNING).With("error", ec.message()) << "accept failed";
    } else {
      socket.set_option(tcp::no_delay(true));
      std::make_shared<Session>(std::move(socket), this)->Start();
    }
    if (!draining.load()) Accept();
  });
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              HttpHandler* handler) {
  if (absl::Status st = options.Validate(); !st.ok()) return st;
  auto impl = std::make_unique<Impl>(options, handler);
  beast::error_code ec;
  net::ip::address address = net::ip::make_address(options.host, ec);
  if (ec)
    return absl::InvalidArgumentError(absl::StrCat("http_host '", options.host, "' is not an IP address"));
  tcp::endpoint endpoint(address, static_cast<uint16_t>(options.port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen for HTTP on ", options.host, ":", options.port, ": ", ec.message()));
  }
  impl->port = impl->acceptor.local_endpoint().port();
  impl->Accept();
  impl->work.emplace(net::make_work_guard(impl->ioc));
  for (int i = 0; i < options.io_threads; ++i) {
    impl->threads.emplace_back([io = &impl->ioc] { io->run(); });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  StopAccepting();
  impl_->work.reset();
  impl_->ioc.stop();
  for (std::thread& t : impl_->threads) t.join();
}

int HttpServer::port() const { return impl_->port; }
int HttpServer::in_flight() const { return impl_->in_flight.load(); }

void HttpServer::StopAccepting() {
  if (impl_->draining.exchange(true)) return;
  net::post(impl_->acceptor.get_executor(), [impl = impl_.get()] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
  });
}

void HttpServer::FinishInFlight(absl::Time deadline) {
  absl::MutexLock lock(&impl_->mu);
  auto idle = [impl = impl_.get()] { return impl->in_flight.load() == 0; };
  impl_->mu.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

}  // namespace v4serve::router
