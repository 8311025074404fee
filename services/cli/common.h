// Shared steps of every subcommand: parse flags (printing --help), configure logs, report errors.
#ifndef V4SERVE_SERVICES_CLI_COMMON_H_
#define V4SERVE_SERVICES_CLI_COMMON_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "services/flags.h"
#include "services/logging.h"

namespace v4serve::cli {

// Parses `args` into the flags' targets. Returns an exit code to return at once (0 after --help, 2 on a
// usage error, printed to stderr), or nullopt to go on.
std::optional<int> ParseFlags(services::FlagSet& flags, const std::vector<std::string>& args);

// Configures logging for `role`; on a bad --log_level/--log_format prints the error and returns false.
bool SetUpLogging(services::LogOptions options, const std::string& role);

// Logs `status` and turns it into the exit code: 0 OK, 2 INVALID_ARGUMENT (usage), else 1.
int ExitCode(const absl::Status& status, const std::string& what);

}  // namespace v4serve::cli

#endif  // V4SERVE_SERVICES_CLI_COMMON_H_
