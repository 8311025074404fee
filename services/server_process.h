// The life of a v4serve server process, shared by every role: start the gRPC server (role services +
// health + Admin) and the metrics exposer, write the ready file, wait for SIGTERM/SIGINT/Admin.Shutdown,
// then drain: health goes NOT_SERVING, other front ends stop accepting, in-flight work finishes until
// the drain deadline, and Run() returns OK so main exits 0.
//
// Owned and driven by one thread (the role's main); the registered objects must outlive it.
#ifndef V4SERVE_SERVICES_SERVER_PROCESS_H_
#define V4SERVE_SERVICES_SERVER_PROCESS_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/admin_service.h"
#include "services/flags.h"
#include "services/grpc_server.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/shutdown.h"

namespace v4serve::services {

struct ServerProcessOptions {
  GrpcServerOptions grpc;
  std::string metrics_host = "0.0.0.0";
  int metrics_port = -1;  // -1 = no separate exposer; 0 = ephemeral
  // When set, a JSON object {"pid":..,"grpc_port":..,"metrics_port":..,...} is written here once the
  // process serves (atomically, via rename), so scripts and tests can find ephemeral ports.
  std::string ready_file;
  absl::Duration drain_timeout = absl::Seconds(30);
  std::string accelerators;  // reported by Admin.GetInfo (workers fill it from model/device.h)

  absl::Status Validate() const;
};

// Binds the flags every server role shares (ports, TLS, limits, drain, ready file) to `options`.
void AddServerFlags(FlagSet& flags, ServerProcessOptions* options);
// Binds --log_level and --log_format.
void AddLogFlags(FlagSet& flags, LogOptions* options);

// A front end other than gRPC that takes work and must drain (the router's HTTP server).
class Drainable {
 public:
  virtual ~Drainable() = default;
  // Stops taking new work; returns at once.
  virtual void StopAccepting() = 0;
  // Waits until in-flight work is done or `deadline` passes, then abandons what is left.
  virtual void FinishInFlight(absl::Time deadline) = 0;
};

// A Drainable that runs `stop` when draining begins (e.g. to end infinite server streams, which would
// otherwise hold the gRPC shutdown until its deadline).
class CloseOnDrain : public Drainable {
 public:
  explicit CloseOnDrain(std::function<void()> stop) : stop_(std::move(stop)) {}
  void StopAccepting() override { stop_(); }
  void FinishInFlight(absl::Time) override {}

 private:
  std::function<void()> stop_;
};

class ServerProcess {
 public:
  // Starts gRPC (services + health + Admin) and, when asked, the metrics exposer.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const std::string& role,
                                                              const ServerProcessOptions& options,
                                                              const std::vector<grpc::Service*>& services,
                                                              MetricsRegistry* metrics,
                                                              ShutdownSignal* shutdown);

  int grpc_port() const { return grpc_->port(); }
  int metrics_port() const { return metrics_port_; }

  // Extra entries for the ready file (e.g. "http_port").
  void AddReadyEntry(const std::string& key, int value) { ready_entries_[key] = value; }
  // Drained before the gRPC server, in the order added.
  void AddDrainable(Drainable* d) { drainables_.push_back(d); }

  // Writes the ready file, logs the listening ports, waits for shutdown, drains. OK = clean exit.
  absl::Status Run();

 private:
  ServerProcess(std::string role, ServerProcessOptions options, ShutdownSignal* shutdown);

  std::string role_;
  ServerProcessOptions options_;
  ShutdownSignal* shutdown_;
  std::unique_ptr<AdminService> admin_;
  std::unique_ptr<GrpcServer> grpc_;
  int metrics_port_ = -1;
  std::map<std::string, int> ready_entries_;
  std::vector<Drainable*> drainables_;
};

// Writes `contents` to `path` atomically (temp file + rename).
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_SERVER_PROCESS_H_
