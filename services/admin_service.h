// v4serve.v1.Admin for any process: identity, run-time log level, and the graceful shutdown path.
//
// Thread-safe. `shutdown` must outlive the service.
#ifndef V4SERVE_SERVICES_ADMIN_SERVICE_H_
#define V4SERVE_SERVICES_ADMIN_SERVICE_H_

#include <string>

#include "absl/time/time.h"
#include "services/shutdown.h"
#include "v4serve/v1/admin.grpc.pb.h"

namespace v4serve::services {

class AdminService final : public v4serve::v1::Admin::CallbackService {
 public:
  AdminService(std::string role, std::string accelerators, ShutdownSignal* shutdown);

  grpc::ServerUnaryReactor* GetInfo(grpc::CallbackServerContext* ctx, const v1::GetInfoRequest* req,
                                    v1::ProcessInfo* resp) override;
  grpc::ServerUnaryReactor* SetLogLevel(grpc::CallbackServerContext* ctx, const v1::SetLogLevelRequest* req,
                                        v1::SetLogLevelResponse* resp) override;
  grpc::ServerUnaryReactor* Shutdown(grpc::CallbackServerContext* ctx, const v1::ShutdownRequest* req,
                                     v1::ShutdownResponse* resp) override;

 private:
  const std::string role_;
  const std::string accelerators_;
  const absl::Time start_time_;
  ShutdownSignal* const shutdown_;
};

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_ADMIN_SERVICE_H_
