#include "services/admin_service.h"

#include <unistd.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "services/build_info.h"
#include "services/logging.h"
#include "services/request_id.h"
#include "services/status_mapping.h"

namespace v4serve::services {

AdminService::AdminService(std::string role, std::string accelerators, ShutdownSignal* shutdown)
    : role_(std::move(role)),
      accelerators_(std::move(accelerators)),
      start_time_(absl::Now()),
      shutdown_(shutdown) {}

grpc::ServerUnaryReactor* AdminService::GetInfo(grpc::CallbackServerContext* ctx, const v1::GetInfoRequest*,
                                                v1::ProcessInfo* resp) {
  const BuildInfo& info = GetBuildInfo();
  resp->set_role(role_);
  resp->set_version(std::string(info.version));
  resp->set_git_commit(std::string(info.git_commit));
  resp->set_build_type(std::string(info.build_type));
  resp->set_accelerators(accelerators_);
  resp->set_start_time_unix_ms(absl::ToUnixMillis(start_time_));
  resp->set_pid(getpid());
  resp->set_draining(shutdown_->triggered());
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::SetLogLevel(grpc::CallbackServerContext* ctx,
                                                    const v1::SetLogLevelRequest* req,
                                                    v1::SetLogLevelResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<LogLevel> level = ParseLogLevel(req->level());
  if (!level.ok()) {
    reactor->Finish(
        ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat("level: ", level.status().message()))));
    return reactor;
  }
  resp->set_previous(std::string(LogLevelName(services::SetLogLevel(*level))));
  V4LOG(INFO).With("request_id", RequestIdFrom(*ctx)).With("level", req->level()) << "log level changed";
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::Shutdown(grpc::CallbackServerContext* ctx, const v1::ShutdownRequest*,
                                                 v1::ShutdownResponse*) {
  V4LOG(INFO).With("request_id", RequestIdFrom(*ctx)).With("peer", ctx->peer())
      << "shutdown requested over Admin";
  shutdown_->Trigger("Admin.Shutdown");
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace v4serve::services
