// Offline subcommands: version, generate, bench, kv, convert.
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "model/device.h"
#include "services/build_info.h"
#include "services/cli/common.h"
#include "services/cli/subcommands.h"

namespace v4serve::cli {
namespace {

// For a subcommand whose engine is not in this build yet: full flag parsing and --help, then a clear error.
int NotInThisBuild(const std::vector<std::string>& args, services::FlagSet& flags, const std::string& what) {
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  std::fprintf(stderr, "error: %s is not in this build yet\n", what.c_str());
  return 1;
}

}  // namespace

int RunVersionCommand(const Context&, const std::vector<std::string>& args) {
  services::FlagSet flags("v4serve version", "Print version, build and accelerator information.");
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  const services::BuildInfo& b = services::GetBuildInfo();
  std::printf("v4serve %s (commit %s, %s, %s)\n%s\n", std::string(b.version).c_str(),
              std::string(b.git_commit).c_str(), std::string(b.build_type).c_str(),
              std::string(b.compiler).c_str(), model::DescribeAccelerators().c_str());
  return 0;
}

int RunGenerateCommand(const Context&, const std::vector<std::string>& args) {
  std::string model_dir, prompt_ids;
  int max_tokens = 32;
  double temperature = 0;
  services::FlagSet flags("v4serve generate", "Generate offline from a model directory on this machine.");
  flags.Add("model", &model_dir, "Checkpoint directory.");
  flags.Add("prompt_ids", &prompt_ids, "Prompt token ids, comma-separated.");
  flags.Add("max_tokens", &max_tokens, "Tokens to generate.");
  flags.Add("temperature", &temperature, "0 = greedy.");
  return NotInThisBuild(args, flags, "offline generation (it needs the model core)");
}

int RunBenchCommand(const Context&, const std::vector<std::string>& args) {
  std::string target = "http://127.0.0.1:8080";
  int concurrency = 8, requests = 100;
  services::FlagSet flags("v4serve bench", "Load generator against a running router (TTFT, TPOT, goodput).");
  flags.Add("target", &target, "Router base URL.");
  flags.Add("concurrency", &concurrency, "Concurrent streams.");
  flags.Add("requests", &requests, "Total requests.");
  return NotInThisBuild(args, flags, "the serving load generator (it needs disaggregated serving)");
}

int RunKvCommand(const Context&, const std::vector<std::string>& args) {
  std::string db_path;
  services::FlagSet flags("v4serve kv",
                          "Inspect a KV store: `v4serve kv stats|verify|compact --db_path DIR`.");
  flags.Add("db_path", &db_path, "RocksDB directory of a kvstore.");
  return NotInThisBuild(args, flags, "KV store inspection (it needs the tiered KV store)");
}

int RunConvertCommand(const Context&, const std::vector<std::string>& args) {
  std::string inspect;
  services::FlagSet flags("v4serve convert",
                          "Inspect or convert a checkpoint: `v4serve convert --inspect DIR`.");
  flags.Add("inspect", &inspect, "Print config, parameter counts and KV bytes per token of this checkpoint.");
  return NotInThisBuild(args, flags, "checkpoint inspection (it needs the model core)");
}

}  // namespace v4serve::cli
