#include "decode/decode_worker.h"
#include "kvstore/kvstore_server.h"
#include "prefill/prefill_worker.h"
#include "services/cli/common.h"
#include "services/cli/subcommands.h"
#include "services/worker_options.h"

namespace v4serve::cli {
namespace {

template <typename RunFn>
int RunWorker(const Context& ctx, const std::vector<std::string>& args, const std::string& role,
              int default_port, const std::string& summary, RunFn run) {
  services::WorkerOptions o;
  o.process.grpc.port = default_port;
  services::LogOptions log;
  services::FlagSet flags("v4serve " + role, summary);
  services::AddWorkerFlags(flags, &o);
  services::AddLogFlags(flags, &log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(log, role)) return 2;
  return ExitCode(run(o, ctx.shutdown), role);
}

}  // namespace

int RunPrefillCommand(const Context& ctx, const std::vector<std::string>& args) {
  return RunWorker(ctx, args, "prefill", 50061,
                   "A prefill worker: computes prompt KV in chunks and pushes it to a decode worker.",
                   prefill::RunPrefillWorker);
}

int RunDecodeCommand(const Context& ctx, const std::vector<std::string>& args) {
  decode::DecodeWorkerOptions o;
  o.worker.process.grpc.port = 50071;
  services::LogOptions log;
  services::FlagSet flags("v4serve decode",
                          "A decode worker: continuous batching, sampling and streaming of generated tokens "
                          "(--colocated: prefill too, serving Inference.Generate).");
  decode::AddDecodeWorkerFlags(flags, &o);
  services::AddLogFlags(flags, &log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(log, "decode")) return 2;
  return ExitCode(decode::RunDecodeWorker(o, ctx.shutdown), "decode");
}

int RunKvStoreCommand(const Context& ctx, const std::vector<std::string>& args) {
  kvstore::KvStoreServerOptions o;
  o.process.grpc.port = 50081;
  services::LogOptions log;
  services::FlagSet flags(
      "v4serve kvstore",
      "A node's tiered KV store (host memory + RocksDB on local disk), shared by its workers over gRPC "
      "(Get, Put, Lookup, Events).");
  flags.Add("db_path", &o.db_path, "RocksDB directory (created when missing).");
  kvstore::AddKvStoreTierFlags(flags, &o);
  services::AddServerFlags(flags, &o.process);
  services::AddLogFlags(flags, &log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(log, "kvstore")) return 2;
  return ExitCode(kvstore::RunKvStoreServer(o, ctx.shutdown), "kvstore");
}

}  // namespace v4serve::cli
