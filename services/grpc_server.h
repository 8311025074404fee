// gRPC server bootstrap shared by every role: listening address, message-size limits, keepalive,
// TLS/mTLS from PEM files, and the standard grpc.health.v1 service.
//
// Thread-safe after Start(). The registered services must outlive the GrpcServer.
#ifndef V4SERVE_SERVICES_GRPC_SERVER_H_
#define V4SERVE_SERVICES_GRPC_SERVER_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"

namespace v4serve::services {

// PEM files for TLS. Server side: cert + key, and client_ca to verify clients (mTLS).
// Client side: ca to verify the server, cert + key to present (mTLS).
struct TlsOptions {
  std::string cert_file;
  std::string key_file;
  std::string ca_file;
  bool require_client_cert = false;  // server side: reject clients without a cert signed by ca_file

  bool enabled() const { return !cert_file.empty() || !ca_file.empty(); }
  absl::Status ValidateForServer() const;
};

struct GrpcServerOptions {
  std::string host = "0.0.0.0";
  int port = 0;  // 0 = an ephemeral port, reported by GrpcServer::port()
  int max_message_bytes = 64 << 20;
  absl::Duration keepalive_time = absl::Seconds(30);
  absl::Duration keepalive_timeout = absl::Seconds(10);
  TlsOptions tls;

  absl::Status Validate() const;
};

class GrpcServer {
 public:
  // Binds and starts serving `services` plus grpc.health.v1 (SERVING for the whole server).
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(const GrpcServerOptions& options,
                                                           const std::vector<grpc::Service*>& services);
  ~GrpcServer();

  int port() const { return port_; }

  // Health: NOT_SERVING while draining, so that routers and Kubernetes stop sending new work.
  void SetServing(bool serving);

  // Stops accepting calls, waits for in-flight calls until `deadline`, then cancels the rest. Idempotent.
  void Shutdown(absl::Time deadline);

 private:
  GrpcServer(std::unique_ptr<grpc::Server> server, int port);
  std::unique_ptr<grpc::Server> server_;
  int port_;
  bool shut_down_ = false;
};

// Reads a whole (PEM) file; NOT_FOUND / PERMISSION_DENIED name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Client credentials: insecure when tls is not enabled, else TLS with the given CA (and client cert).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsOptions& tls);

// Calls grpc.health.v1.Health/Check on `target` for `service` ("" = the whole server). OK when SERVING;
// UNAVAILABLE with the reason otherwise.
absl::Status CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                         absl::Duration timeout);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_GRPC_SERVER_H_
