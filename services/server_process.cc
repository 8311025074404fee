#include "services/server_process.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/status_macros.h"

namespace v4serve::services {

absl::Status ServerProcessOptions::Validate() const {
  RETURN_IF_ERROR(grpc.Validate());
  if (metrics_port < -1 || metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_port ", metrics_port, " out of range (-1 = off)"));
  }
  if (drain_timeout < absl::ZeroDuration()) return absl::InvalidArgumentError("drain_timeout must be >= 0");
  return absl::OkStatus();
}

void AddServerFlags(FlagSet& flags, ServerProcessOptions* o) {
  flags.Add("host", &o->grpc.host, "Address to listen on for gRPC (and metrics unless --metrics_host).");
  flags.Add("grpc_port", &o->grpc.port, "gRPC port; 0 picks a free one (see --ready_file).");
  flags.Add("metrics_host", &o->metrics_host, "Address for the Prometheus /metrics exposer.");
  flags.Add("metrics_port", &o->metrics_port, "Port for Prometheus /metrics; -1 = off, 0 = pick one.");
  flags.Add("ready_file", &o->ready_file, "Write {\"pid\",\"grpc_port\",...} here as JSON once serving.");
  flags.Add("drain_timeout", &o->drain_timeout, "On SIGTERM, how long in-flight work may take to finish.");
  flags.Add("max_message_bytes", &o->grpc.max_message_bytes, "Largest gRPC message sent or received.");
  flags.Add("keepalive_time", &o->grpc.keepalive_time, "gRPC keepalive ping interval.");
  flags.Add("keepalive_timeout", &o->grpc.keepalive_timeout, "gRPC keepalive ping timeout.");
  flags.Add("tls_cert", &o->grpc.tls.cert_file, "PEM certificate chain; enables TLS on gRPC.");
  flags.Add("tls_key", &o->grpc.tls.key_file, "PEM private key for --tls_cert.");
  flags.Add("tls_ca", &o->grpc.tls.ca_file, "PEM CA bundle that signs client certificates (mTLS).");
  flags.Add("tls_require_client_cert", &o->grpc.tls.require_client_cert,
            "Reject gRPC clients without a certificate signed by --tls_ca (mTLS).");
}

void AddLogFlags(FlagSet& flags, LogOptions* o) {
  flags.Add("log_level", &o->level, "debug, info, warning or error.");
  flags.Add("log_format", &o->format, "text (key=value) or json (one object per line).");
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
    out << contents;
    out.flush();
    if (!out) return absl::DataLossError(absl::StrCat("error writing ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::PermissionDeniedError(absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  return absl::OkStatus();
}

ServerProcess::ServerProcess(std::string role, ServerProcessOptions options, ShutdownSignal* shutdown)
    : role_(std::move(role)), options_(std::move(options)), shutdown_(shutdown) {}

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(
    const std::string& role, const ServerProcessOptions& options, const std::vector<grpc::Service*>& services,
    MetricsRegistry* metrics, ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  auto p = std::unique_ptr<ServerProcess>(new ServerProcess(role, options, shutdown));
  p->admin_ = std::make_unique<AdminService>(role, options.accelerators, shutdown);
  std::vector<grpc::Service*> all = services;
  all.push_back(p->admin_.get());
  ASSIGN_OR_RETURN(p->grpc_, GrpcServer::Start(options.grpc, all));
  if (options.metrics_port >= 0) {
    ASSIGN_OR_RETURN(p->metrics_port_, metrics->Expose(options.metrics_host, options.metrics_port));
  }
  return p;
}

absl::Status ServerProcess::Run() {
  nlohmann::ordered_json ready;
  ready["role"] = role_;
  ready["pid"] = getpid();
  ready["grpc_port"] = grpc_->port();
  ready["metrics_port"] = metrics_port_;
  for (const auto& [k, v] : ready_entries_) ready[k] = v;
  if (!options_.ready_file.empty()) {
    RETURN_IF_ERROR(WriteFileAtomically(options_.ready_file, ready.dump() + "\n"));
  }
  {
    LogLine line(LogLevel::kInfo, __FILE__, __LINE__);
    for (const auto& [k, v] : ready.items()) line.With(k, v.is_string() ? v.get<std::string>() : v.dump());
    line << "serving";
  }
  std::string reason = shutdown_->Wait();
  absl::Time deadline = absl::Now() + options_.drain_timeout;
  V4LOG(INFO).With("reason", reason).With("drain_timeout", absl::FormatDuration(options_.drain_timeout))
      << "draining: no new work; finishing in-flight work";
  grpc_->SetServing(false);
  for (Drainable* d : drainables_) d->StopAccepting();
  for (Drainable* d : drainables_) d->FinishInFlight(deadline);
  grpc_->Shutdown(deadline);
  if (!options_.ready_file.empty()) std::remove(options_.ready_file.c_str());
  V4LOG(INFO) << "drained; exiting";
  return absl::OkStatus();
}

}  // namespace v4serve::services
