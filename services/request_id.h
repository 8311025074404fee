// Request ids: carried in gRPC metadata ("x-request-id") and HTTP headers, and logged with every line
// about the request, so that one request can be followed through router, prefill and decode.
#ifndef V4SERVE_SERVICES_REQUEST_ID_H_
#define V4SERVE_SERVICES_REQUEST_ID_H_

#include <string>

#include "absl/strings/string_view.h"
#include "grpcpp/client_context.h"
#include "grpcpp/server_context.h"

namespace v4serve::services {

inline constexpr absl::string_view kRequestIdKey = "x-request-id";

// A new random id ("req-" + 24 hex digits). Thread-safe.
std::string NewRequestId();

// True for ids we accept from clients: 1..128 chars of [A-Za-z0-9._:-].
bool IsValidRequestId(absl::string_view id);

// The caller's id from metadata when present and valid, else a new one.
std::string RequestIdFrom(const grpc::ServerContextBase& context);

// Sends `id` with an outgoing call.
void AttachRequestId(grpc::ClientContext& context, absl::string_view id);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_REQUEST_ID_H_
