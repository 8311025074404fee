#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nlohmann/json.hpp"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::services {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("x: odd");
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(auto q, Half(h));
  return q;
}

absl::Status Check(int x) {
  RETURN_IF_ERROR(Half(x).status());
  return absl::OkStatus();
}

TEST(StatusMacrosTest, PropagateErrorsAndValues) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Check(4).ok());
  EXPECT_EQ(Check(3).message(), "x: odd");
}

TEST(StatusMappingTest, GrpcRoundTripKeepsCodeAndMessage) {
  for (int c = 0; c <= 16; ++c) {
    absl::Status st(static_cast<absl::StatusCode>(c), c == 0 ? "" : "why");
    EXPECT_EQ(FromGrpcStatus(ToGrpcStatus(st)), st) << c;
  }
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("x")).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(StatusMappingTest, HttpCodesFollowOpenAi) {
  EXPECT_EQ(ToHttpError(absl::InvalidArgumentError("x")).http_status, 400);
  EXPECT_EQ(ToHttpError(absl::UnauthenticatedError("x")).http_status, 401);
  EXPECT_EQ(ToHttpError(absl::PermissionDeniedError("x")).http_status, 403);
  EXPECT_EQ(ToHttpError(absl::NotFoundError("x")).http_status, 404);
  EXPECT_EQ(ToHttpError(PayloadTooLargeError("x")).http_status, 413);
  EXPECT_EQ(ToHttpError(absl::ResourceExhaustedError("x")).http_status, 429);
  EXPECT_EQ(ToHttpError(absl::UnavailableError("x")).http_status, 503);
  EXPECT_EQ(ToHttpError(absl::DeadlineExceededError("x")).http_status, 504);
  EXPECT_EQ(ToHttpError(absl::InternalError("x")).http_status, 500);
  EXPECT_EQ(ToHttpError(absl::ResourceExhaustedError("x")).type, "rate_limit_error");
}

TEST(StatusMappingTest, OpenAiErrorBodyNamesTheParam) {
  auto j = nlohmann::json::parse(
      OpenAiErrorJson(absl::InvalidArgumentError("messages[0].role: unknown role 'x'")));
  EXPECT_EQ(j["error"]["message"], "messages[0].role: unknown role 'x'");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "messages[0].role");
  auto k = nlohmann::json::parse(OpenAiErrorJson(absl::UnavailableError("no healthy worker: try later")));
  EXPECT_TRUE(k["error"]["param"].is_null());
  EXPECT_EQ(k["error"]["type"], "service_unavailable_error");
}

}  // namespace
}  // namespace v4serve::services
