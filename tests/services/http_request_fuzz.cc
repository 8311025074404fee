// Fuzzes what strangers send the router over HTTP: the request parser configuration of
// router/http_server.cc (Beast, with our header/body limits) and the OpenAI error body built from
// whatever the parser reports, which must stay valid JSON even for invalid UTF-8.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "boost/beast/http.hpp"
#include "nlohmann/json.hpp"
#include "services/status_mapping.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace http = boost::beast::http;
  std::string input(reinterpret_cast<const char*>(data), size);
  http::request_parser<http::string_body> parser;
  parser.body_limit(1 << 16);
  parser.header_limit(1 << 14);
  parser.eager(true);
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(input), ec);
  std::string message = ec ? ec.message() : std::string(parser.get().target());
  message += input.substr(0, 64);  // arbitrary bytes in an error message
  std::string body = v4serve::services::OpenAiErrorJson(absl::InvalidArgumentError(message));
  nlohmann::json j = nlohmann::json::parse(body);  // throws (and the fuzzer reports) if not valid JSON
  if (!j["error"].contains("message")) __builtin_trap();
  return 0;
}
