// Structured logs: one line per event on stderr, as text or JSON, with key=value fields.
//
//   V4LOG(INFO) << "listening";                        // message only
//   V4LOG(WARNING).With("port", port).With("request_id", id) << "bind failed: " << status;
//
// Thread-safe: each line is formatted privately and written with a single write(2).
// The process-wide settings (level, format, role) are set once by main via ConfigureLogging().
#ifndef V4SERVE_SERVICES_LOGGING_H_
#define V4SERVE_SERVICES_LOGGING_H_

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace v4serve::services {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

struct LogOptions {
  std::string level = "info";   // debug | info | warning | error
  std::string format = "text";  // text | json
  std::string role;             // added to every line: router, prefill, decode, kvstore, up, ...
  absl::Status Validate() const;
};

absl::Status ConfigureLogging(const LogOptions& options);
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);
absl::string_view LogLevelName(LogLevel level);
// Changes the level at run time (Admin.SetLogLevel); returns the previous level.
LogLevel SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

// One log line under construction; written when destroyed.
class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;

  template <typename T>
  LogLine& With(absl::string_view key, const T& value) {
    fields_.emplace_back(std::string(key), absl::StrCat(value));
    return *this;
  }
  LogLine& With(absl::string_view key, const absl::Status& status) {
    fields_.emplace_back(std::string(key), status.ToString());
    return *this;
  }
  template <typename T>
  LogLine& operator<<(const T& value) {
    message_ << value;
    return *this;
  }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream message_;
  std::vector<std::pair<std::string, std::string>> fields_;
};

// Formats one line without writing it (exposed for tests).
std::string FormatLogLine(LogLevel level, absl::string_view format, absl::string_view role,
                          absl::string_view src, absl::string_view message,
                          const std::vector<std::pair<std::string, std::string>>& fields,
                          int64_t unix_micros);

}  // namespace v4serve::services

#define V4LOG_LEVEL_DEBUG ::v4serve::services::LogLevel::kDebug
#define V4LOG_LEVEL_INFO ::v4serve::services::LogLevel::kInfo
#define V4LOG_LEVEL_WARNING ::v4serve::services::LogLevel::kWarning
#define V4LOG_LEVEL_ERROR ::v4serve::services::LogLevel::kError
#define V4LOG(level)                                           \
  if (!::v4serve::services::LogEnabled(V4LOG_LEVEL_##level)) { \
  } else                                                       \
    ::v4serve::services::LogLine(V4LOG_LEVEL_##level, __FILE__, __LINE__)

#endif  // V4SERVE_SERVICES_LOGGING_H_
