// The one mapping between absl::Status, grpc::Status and HTTP (status code + OpenAI error JSON).
//
// Every module that crosses a process boundary converts here, so a code means the same thing on the
// wire, in logs and to an OpenAI client: INVALID_ARGUMENT -> 400 invalid_request_error, UNAUTHENTICATED
// -> 401, PERMISSION_DENIED -> 403, NOT_FOUND -> 404, RESOURCE_EXHAUSTED -> 429 (or 413 when the payload
// is too large, see PayloadTooLargeError), UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, the rest -> 500.
#ifndef V4SERVE_SERVICES_STATUS_MAPPING_H_
#define V4SERVE_SERVICES_STATUS_MAPPING_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"

namespace v4serve::services {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// A RESOURCE_EXHAUSTED status that maps to HTTP 413 rather than 429.
absl::Status PayloadTooLargeError(absl::string_view message);

struct HttpError {
  int http_status = 500;
  std::string type;  // OpenAI error type, e.g. "invalid_request_error"
  std::string code;  // OpenAI error code, e.g. "invalid_value", "model_not_found"; may be empty
};

HttpError ToHttpError(const absl::Status& status);

// {"error":{"message":...,"type":...,"param":...,"code":...}} for a non-OK status. `param` names the
// offending field when known (INVALID_ARGUMENT messages from v4serve start with "field: ").
std::string OpenAiErrorJson(const absl::Status& status);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_STATUS_MAPPING_H_
