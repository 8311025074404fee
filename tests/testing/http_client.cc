#include "tests/testing/http_client.h"

#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "boost/asio.hpp"
#include "boost/beast/core.hpp"
#include "boost/beast/http.hpp"

namespace v4serve::testing {

namespace beast = boost::beast;
namespace http = boost::beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

struct HttpConnection::Impl {
  net::io_context ioc;
  beast::tcp_stream stream{ioc};
  beast::flat_buffer buffer;
  std::optional<http::response_parser<http::buffer_body>> stream_parser;
};

namespace {

std::chrono::steady_clock::duration Chrono(absl::Duration d) {
  return std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

absl::Status Err(const char* what, const beast::error_code& ec) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ec.message()));
}

}  // namespace

HttpConnection::HttpConnection(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpConnection::~HttpConnection() { Close(); }

absl::StatusOr<std::unique_ptr<HttpConnection>> HttpConnection::Connect(int port) {
  auto impl = std::make_unique<Impl>();
  beast::error_code ec;
  impl->stream.expires_after(std::chrono::seconds(10));
  impl->stream.socket().connect(
      tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)), ec);
  if (ec) return Err("connect", ec);
  return std::unique_ptr<HttpConnection>(new HttpConnection(std::move(impl)));
}

void HttpConnection::Close() {
  beast::error_code ignored;
  impl_->stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  impl_->stream.socket().close(ignored);
}

absl::StatusOr<HttpResult> HttpConnection::Call(const std::string& method, const std::string& target,
                                                const std::string& body, absl::Duration timeout) {
  http::request<http::string_body> req(http::string_to_verb(method), target, 11);
  req.set(http::field::host, "127.0.0.1");
  req.keep_alive(true);
  if (!body.empty() || method == "POST") {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  beast::error_code ec;
  impl_->stream.expires_after(Chrono(timeout));
  http::write(impl_->stream, req, ec);
  if (ec) return Err("write", ec);
  http::response<http::string_body> resp;
  http::read(impl_->stream, impl_->buffer, resp, ec);
  if (ec) return Err("read", ec);
  HttpResult out;
  out.status = resp.result_int();
  for (const auto& f : resp)
    out.headers[absl::AsciiStrToLower(std::string(f.name_string()))] = std::string(f.value());
  out.body = std::move(resp.body());
  return out;
}

absl::StatusOr<std::string> HttpConnection::SendRaw(const std::string& bytes, absl::Duration timeout) {
  beast::error_code ec;
  impl_->stream.expires_after(Chrono(timeout));
  net::write(impl_->stream.socket(), net::buffer(bytes), ec);
  if (ec) return Err("write", ec);
  std::string out;
  char buf[4096];
  while (true) {
    size_t n = impl_->stream.read_some(net::buffer(buf), ec);
    out.append(buf, n);
    if (ec) break;
  }
  if (ec != net::error::eof && ec != net::error::connection_reset && out.empty()) return Err("read", ec);
  return out;
}

absl::StatusOr<int> HttpConnection::StartRequest(const std::string& method, const std::string& target,
                                                 const std::string& body) {
  http::request<http::string_body> req(http::string_to_verb(method), target, 11);
  req.set(http::field::host, "127.0.0.1");
  req.set(http::field::content_type, "application/json");
  req.body() = body;
  req.prepare_payload();
  beast::error_code ec;
  impl_->stream.expires_after(std::chrono::seconds(10));
  http::write(impl_->stream, req, ec);
  if (ec) return Err("write", ec);
  impl_->stream_parser.emplace();
  impl_->stream_parser->body_limit(boost::none);
  http::read_header(impl_->stream, impl_->buffer, *impl_->stream_parser, ec);
  if (ec) return Err("read header", ec);
  return impl_->stream_parser->get().result_int();
}

absl::StatusOr<std::string> HttpConnection::ReadChunk(absl::Duration timeout) {
  if (!impl_->stream_parser) return absl::FailedPreconditionError("no request started");
  auto& p = *impl_->stream_parser;
  char buf[8192];
  impl_->stream.expires_after(Chrono(timeout));
  // Chunk headers parse without yielding body bytes: read until bytes arrive or the body ends.
  while (!p.is_done()) {
    p.get().body().data = buf;
    p.get().body().size = sizeof(buf);
    beast::error_code ec;
    http::read_some(impl_->stream, impl_->buffer, p, ec);
    if (ec && ec != http::error::need_buffer) return Err("read body", ec);
    size_t n = sizeof(buf) - p.get().body().size;
    if (n > 0) return std::string(buf, n);
  }
  return std::string();
}

absl::StatusOr<HttpResult> HttpCall(int port, const std::string& method, const std::string& target,
                                    const std::string& body,
                                    const std::map<std::string, std::string>& headers,
                                    absl::Duration timeout) {
  auto conn = HttpConnection::Connect(port);
  if (!conn.ok()) return conn.status();
  if (headers.empty()) return (*conn)->Call(method, target, body, timeout);
  std::string raw =
      absl::StrCat(method, " ", target, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
  for (const auto& [k, v] : headers) absl::StrAppend(&raw, k, ": ", v, "\r\n");
  absl::StrAppend(&raw, "Content-Length: ", body.size(), "\r\n\r\n", body);
  auto text = (*conn)->SendRaw(raw, timeout);
  if (!text.ok()) return text.status();
  HttpResult out;
  http::response_parser<http::string_body> parser;
  beast::error_code ec;
  parser.eager(true);
  parser.put(net::buffer(*text), ec);
  if (ec && ec != http::error::need_more) return absl::DataLossError(absl::StrCat("parse: ", ec.message()));
  out.status = parser.get().result_int();
  for (const auto& f : parser.get())
    out.headers[absl::AsciiStrToLower(std::string(f.name_string()))] = std::string(f.value());
  out.body = parser.get().body();
  return out;
}

}  // namespace v4serve::testing
