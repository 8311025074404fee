// A small blocking HTTP/1.1 client for tests (Boost.Beast), with chunked/SSE reading.
#ifndef V4SERVE_TESTS_TESTING_HTTP_CLIENT_H_
#define V4SERVE_TESTS_TESTING_HTTP_CLIENT_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace v4serve::testing {

struct HttpResult {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-cased names
  std::string body;
};

// One request on a fresh connection.
absl::StatusOr<HttpResult> HttpCall(int port, const std::string& method, const std::string& target,
                                    const std::string& body = "",
                                    const std::map<std::string, std::string>& headers = {},
                                    absl::Duration timeout = absl::Seconds(10));

// A kept-alive connection for several requests, or a raw socket for tests that misbehave on purpose.
class HttpConnection {
 public:
  static absl::StatusOr<std::unique_ptr<HttpConnection>> Connect(int port);
  ~HttpConnection();
  absl::StatusOr<HttpResult> Call(const std::string& method, const std::string& target,
                                  const std::string& body = "", absl::Duration timeout = absl::Seconds(10));
  // Sends raw bytes (e.g. a malformed request) and reads until the peer closes or `timeout`.
  absl::StatusOr<std::string> SendRaw(const std::string& bytes, absl::Duration timeout = absl::Seconds(10));
  // Sends a request and reads only the response header; the body is left unread (streaming tests).
  absl::StatusOr<int> StartRequest(const std::string& method, const std::string& target,
                                   const std::string& body);
  // Reads the next piece of a chunked body; empty at its end.
  absl::StatusOr<std::string> ReadChunk(absl::Duration timeout = absl::Seconds(10));
  void Close();

  struct Impl;

 private:
  explicit HttpConnection(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace v4serve::testing

#endif  // V4SERVE_TESTS_TESTING_HTTP_CLIENT_H_
