#include "services/cli/common.h"

#include <cstdio>

namespace v4serve::cli {

std::optional<int> ParseFlags(services::FlagSet& flags, const std::vector<std::string>& args) {
  absl::Status st = flags.Parse(args);
  if (flags.help_requested()) {
    std::fputs(flags.Usage().c_str(), stdout);
    return 0;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  return std::nullopt;
}

bool SetUpLogging(services::LogOptions options, const std::string& role) {
  options.role = role;
  absl::Status st = services::ConfigureLogging(options);
  if (!st.ok()) std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
  return st.ok();
}

int ExitCode(const absl::Status& status, const std::string& what) {
  if (status.ok()) return 0;
  V4LOG(ERROR).With("status", status) << what << " failed";
  std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace v4serve::cli
