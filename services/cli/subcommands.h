// The `v4serve` subcommands. Each parses its own flags into its component's Options, validates them,
// and runs. This folder is the only code that links every module: it is the executable, not a library.
#ifndef V4SERVE_SERVICES_CLI_SUBCOMMANDS_H_
#define V4SERVE_SERVICES_CLI_SUBCOMMANDS_H_

#include <string>
#include <vector>

#include "services/shutdown.h"

namespace v4serve::cli {

// Process-wide context handed to every subcommand.
struct Context {
  std::string program;                 // argv[0]
  std::string self_exe;                // absolute path of this binary (for `up` to start children)
  services::ShutdownSignal* shutdown;  // SIGTERM/SIGINT already routed here
};

// Each returns the process exit code: 0 success (and --help), 1 runtime failure, 2 usage error.
int RunRouterCommand(const Context& ctx, const std::vector<std::string>& args);
int RunPrefillCommand(const Context& ctx, const std::vector<std::string>& args);
int RunDecodeCommand(const Context& ctx, const std::vector<std::string>& args);
int RunKvStoreCommand(const Context& ctx, const std::vector<std::string>& args);
int RunUpCommand(const Context& ctx, const std::vector<std::string>& args);
int RunGenerateCommand(const Context& ctx, const std::vector<std::string>& args);
int RunBenchCommand(const Context& ctx, const std::vector<std::string>& args);
int RunKvCommand(const Context& ctx, const std::vector<std::string>& args);
int RunConvertCommand(const Context& ctx, const std::vector<std::string>& args);
int RunVersionCommand(const Context& ctx, const std::vector<std::string>& args);

}  // namespace v4serve::cli

#endif  // V4SERVE_SERVICES_CLI_SUBCOMMANDS_H_
