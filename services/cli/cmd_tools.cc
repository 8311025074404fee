// Offline subcommands: version, generate, bench, kv, convert.
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvstore/tiered_store.h"
#include "model/device.h"
#include "model/generate.h"
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
  std::string model_dir;
  std::vector<std::string> prompt_ids;
  model::SamplingOptions sampling;
  int64_t seed = 0;
  services::FlagSet flags(
      "v4serve generate",
      "Generate offline on this machine's CPU from a checkpoint directory; prints the new ids.");
  flags.Add("model", &model_dir, "Checkpoint directory (config.json + safetensors).");
  flags.Add("prompt_ids", &prompt_ids, "Prompt token ids, comma-separated.");
  flags.Add("max_tokens", &sampling.max_new_tokens, "Tokens to generate at most (stops earlier at EOS).");
  double temperature = 0, top_p = 1;
  flags.Add("temperature", &temperature, "0 = greedy.");
  flags.Add("top_k", &sampling.top_k, "Sample among the k most likely tokens; 0 = off.");
  flags.Add("top_p", &top_p, "Nucleus mass in (0, 1].");
  flags.Add("seed", &seed, "Random seed for sampling (same seed, same output).");
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (model_dir.empty())
    return ExitCode(absl::InvalidArgumentError("--model: a checkpoint directory is required"), "generate");
  std::vector<int32_t> ids;
  for (const std::string& s : prompt_ids) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(s, &id) || id < 0) {
      return ExitCode(absl::InvalidArgumentError(absl::StrCat("--prompt_ids: '", s, "' is not a token id")),
                      "generate");
    }
    ids.push_back(id);
  }
  if (ids.empty())
    return ExitCode(absl::InvalidArgumentError("--prompt_ids: at least one id is required"), "generate");
  sampling.temperature = static_cast<float>(temperature);
  sampling.top_p = static_cast<float>(top_p);
  sampling.seed = static_cast<uint64_t>(seed);
  absl::StatusOr<std::vector<int32_t>> out = model::GenerateFromDir(model_dir, ids, sampling);
  if (!out.ok()) return ExitCode(out.status(), "generate");
  std::printf("%s\n", absl::StrJoin(*out, ",").c_str());
  return 0;
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
  std::string dir;
  bool repair = false;
  services::FlagSet flags(
      "v4serve kv",
      "Inspect a KV store directory: `v4serve kv stats|verify|compact --dir DIR`.\n"
      "  stats    blocks, window-state checkpoints and bytes (per column family and model)\n"
      "  verify   read every block and window state and check its checksums; exit 1 if any\n"
      "           is bad (--repair deletes them; needs the kvstore stopped)\n"
      "  compact  compact every column family (needs the kvstore stopped)");
  flags.Add("dir", &dir, "RocksDB directory of a kvstore (its --db_path).");
  flags.Add("db_path", &dir, "Same as --dir.");
  flags.Add("repair", &repair, "verify: delete blocks that fail verification.");
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  const std::vector<std::string>& pos = flags.positional();
  if (pos.size() != 1 || (pos[0] != "stats" && pos[0] != "verify" && pos[0] != "compact")) {
    return ExitCode(absl::InvalidArgumentError("usage: v4serve kv stats|verify|compact --dir DIR"), "kv");
  }
  if (dir.empty())
    return ExitCode(absl::InvalidArgumentError("--dir: the kvstore's directory is required"), "kv");
  const std::string& cmd = pos[0];
  kvstore::DiskTierOptions o;
  o.path = dir;
  o.read_only = cmd == "stats" || (cmd == "verify" && !repair);
  absl::StatusOr<std::unique_ptr<kvstore::DiskTier>> disk = kvstore::DiskTier::Open(o);
  if (!disk.ok()) return ExitCode(disk.status(), "kv");
  if (cmd == "stats") {
    const kvstore::DiskTierStats s = (*disk)->Stats();
    std::printf(
        "blocks: %lld\nwindow_states: %lld\nblock_bytes: %lld\nwindow_state_bytes: %lld\n"
        "bytes_on_disk: %lld\n",
        static_cast<long long>(s.blocks), static_cast<long long>(s.window_states),
        static_cast<long long>(s.block_bytes), static_cast<long long>(s.state_bytes),
        static_cast<long long>(s.bytes_on_disk));
    if (s.blocks > 0) {
      std::printf("bytes_per_block: %.1f\n", static_cast<double>(s.block_bytes + s.state_bytes) / s.blocks);
    }
    for (const auto& [fp, n] : s.blocks_per_model) {
      std::printf("model %016llx: %lld blocks\n", static_cast<unsigned long long>(fp),
                  static_cast<long long>(n));
    }
    return 0;
  }
  if (cmd == "verify") {
    absl::StatusOr<std::pair<int64_t, int64_t>> r = (*disk)->Verify();
    if (!r.ok()) return ExitCode(r.status(), "kv");
    std::printf("verified: %lld good, %lld bad%s\n", static_cast<long long>(r->first),
                static_cast<long long>(r->second), repair && r->second > 0 ? " (deleted)" : "");
    return r->second == 0 ? 0 : 1;
  }
  absl::Status c = (*disk)->Compact();
  if (!c.ok()) return ExitCode(c, "kv");
  std::printf("compacted: %lld bytes on disk\n", static_cast<long long>((*disk)->Stats().bytes_on_disk));
  return 0;
}

int RunConvertCommand(const Context&, const std::vector<std::string>& args) {
  std::string inspect;
  services::FlagSet flags("v4serve convert",
                          "Inspect or convert a checkpoint: `v4serve convert --inspect DIR`.");
  flags.Add("inspect", &inspect, "Print config, parameter counts and KV bytes per token of this checkpoint.");
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (inspect.empty()) {
    return ExitCode(
        absl::InvalidArgumentError("--inspect: a checkpoint directory is required (conversion and "
                                   "quantization of checkpoints are not in this build yet)"),
        "convert");
  }
  absl::StatusOr<std::string> text = model::DescribeCheckpoint(inspect);
  if (!text.ok()) return ExitCode(text.status(), "convert");
  std::fputs(text->c_str(), stdout);
  return 0;
}

}  // namespace v4serve::cli
