#include "decode/decode_worker.h"
#include "kvstore/kvstore_server.h"
#include "prefill/prefill_worker.h"
#include "services/cli/common.h"
#include "services/cli/subcommands.h"
#include "services/worker_options.h"

namespace v4serve::cli {
int RunPrefillCommand(const Context& ctx, const std::vector<std::string>& args) {
  prefill::PrefillWorkerOptions o;
  o.worker.process.grpc.port = 50061;
  services::LogOptions log;
  services::FlagSet flags("v4serve prefill",
                          "A prefill worker: computes prompt KV in chunks and pushes it to a decode worker.");
  prefill::AddPrefillWorkerFlags(flags, &o);
  services::AddLogFlags(flags, &log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(log, "prefill")) return 2;
  return ExitCode(prefill::RunPrefillWorker(o, ctx.shutdown), "prefill");
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
