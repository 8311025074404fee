#include "services/status_mapping.h"

#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace v4serve::services {
namespace {

constexpr absl::string_view kPayloadTooLarge = "v4serve.payload_too_large";

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // The message travels in a header, which gRPC caps (16 KiB by default): an error quoting a long input
  // (a 20 KB model name) reached the client as RESOURCE_EXHAUSTED "received metadata size exceeds hard
  // limit" instead of itself. Long messages keep their start, which names the field.
  constexpr size_t kMaxMessage = 4096;
  std::string message(status.message());
  if (message.size() > kMaxMessage) {
    const size_t full = message.size();
    size_t cut = kMaxMessage;
    while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;  // Whole characters.
    message.resize(cut);
    absl::StrAppend(&message, "... (", full, " bytes)");
  }
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::move(message));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::Status PayloadTooLargeError(absl::string_view message) {
  absl::Status st = absl::ResourceExhaustedError(message);
  st.SetPayload(kPayloadTooLarge, absl::Cord("1"));
  return st;
}

HttpError ToHttpError(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return {200, "", ""};
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return {400, "invalid_request_error", "invalid_value"};
    case absl::StatusCode::kFailedPrecondition:
      return {400, "invalid_request_error", "failed_precondition"};
    case absl::StatusCode::kUnauthenticated:
      return {401, "authentication_error", "invalid_api_key"};
    case absl::StatusCode::kPermissionDenied:
      return {403, "permission_error", "permission_denied"};
    case absl::StatusCode::kNotFound:
      return {404, "invalid_request_error", "not_found"};
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return {409, "invalid_request_error", "conflict"};
    case absl::StatusCode::kResourceExhausted:
      if (status.GetPayload(kPayloadTooLarge).has_value()) return {413, "invalid_request_error", "too_large"};
      return {429, "rate_limit_error", "rate_limit_exceeded"};
    case absl::StatusCode::kCancelled:
      return {499, "invalid_request_error", "cancelled"};
    case absl::StatusCode::kUnimplemented:
      return {501, "invalid_request_error", "unsupported"};
    case absl::StatusCode::kUnavailable:
      return {503, "service_unavailable_error", "unavailable"};
    case absl::StatusCode::kDeadlineExceeded:
      return {504, "timeout_error", "timeout"};
    default:
      return {500, "server_error", "internal_error"};
  }
}

std::string OpenAiErrorJson(const absl::Status& status) {
  HttpError e = ToHttpError(status);
  nlohmann::json err;
  err["message"] = std::string(status.message());
  err["type"] = e.type;
  err["code"] = e.code.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.code);
  err["param"] = nullptr;
  if (status.code() == absl::StatusCode::kInvalidArgument) {
    absl::string_view msg = status.message();
    size_t colon = msg.find(": ");
    // "messages[0].role: unknown role 'x'" -> param "messages[0].role"
    if (colon != absl::string_view::npos && msg.substr(0, colon).find(' ') == absl::string_view::npos) {
      err["param"] = std::string(msg.substr(0, colon));
    }
  }
  nlohmann::json out;
  out["error"] = err;
  return out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace v4serve::services
