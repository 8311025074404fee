// v4serve: one binary, one subcommand per role (docs/ARCHITECTURE.md).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "services/cli/subcommands.h"
#include "services/shutdown.h"

namespace {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(const v4serve::cli::Context&, const std::vector<std::string>&);
};

constexpr Command kCommands[] = {
    {"up", "Start router + prefill + decode + kvstore on this machine with the embedded model.",
     v4serve::cli::RunUpCommand},
    {"router", "Serve the OpenAI-compatible HTTP API and gRPC Inference in front of workers.",
     v4serve::cli::RunRouterCommand},
    {"prefill", "Run a prefill worker: compute prompt KV and push it to a decode worker.",
     v4serve::cli::RunPrefillCommand},
    {"decode", "Run a decode worker: continuous batching, sampling, streaming tokens.",
     v4serve::cli::RunDecodeCommand},
    {"kvstore", "Run a node's persistent KV store (RocksDB on local disk).", v4serve::cli::RunKvStoreCommand},
    {"generate", "Generate offline from a model directory (no servers).", v4serve::cli::RunGenerateCommand},
    {"bench", "Load generator against a running router.", v4serve::cli::RunBenchCommand},
    {"kv", "Inspect a KV store: stats, verify, compact.", v4serve::cli::RunKvCommand},
    {"convert", "Inspect or convert a checkpoint.", v4serve::cli::RunConvertCommand},
    {"version", "Print version, build and accelerator information.", v4serve::cli::RunVersionCommand},
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: v4serve <command> [flags]   (v4serve <command> --help for its flags)\n\ncommands:\n");
  for (const Command& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return 2;
  }
  std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    PrintUsage(stdout);
    return 0;
  }
  if (name == "--version") name = "version";
  for (const Command& c : kCommands) {
    if (name != c.name) continue;
    // Before any thread exists, so that only the watcher thread receives SIGTERM/SIGINT.
    static v4serve::services::ShutdownSignal shutdown;
    shutdown.InstallSignalHandlers();
    std::error_code ec;
    std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
    v4serve::cli::Context ctx{argv[0], ec ? std::string(argv[0]) : self.string(), &shutdown};
    return c.run(ctx, std::vector<std::string>(argv + 2, argv + argc));
  }
  std::fprintf(stderr, "v4serve: unknown command '%s'\n\n", name.c_str());
  PrintUsage(stderr);
  return 2;
}
