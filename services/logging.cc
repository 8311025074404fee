#include "services/logging.h"

#include <unistd.h>

#include <atomic>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace v4serve::services {
namespace {

struct Settings {
  absl::Mutex mu;
  std::string format ABSL_GUARDED_BY(mu) = "text";
  std::string role ABSL_GUARDED_BY(mu);
};

Settings& GetSettings() {
  static auto* settings = new Settings();
  return *settings;
}

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};

absl::string_view Basename(absl::string_view path) {
  size_t slash = path.rfind('/');
  return slash == absl::string_view::npos ? path : path.substr(slash + 1);
}

bool NeedsQuotes(absl::string_view v) {
  if (v.empty()) return true;
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || c == '\n' || c == '\t') return true;
  }
  return false;
}

void AppendQuoted(std::string* out, absl::string_view v) {
  if (!NeedsQuotes(v)) {
    out->append(v.data(), v.size());
    return;
  }
  out->push_back('"');
  for (char c : v) {
    if (c == '"' || c == '\\') out->push_back('\\');
    if (c == '\n') {
      out->append("\\n");
      continue;
    }
    out->push_back(c);
  }
  out->push_back('"');
}

}  // namespace

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "info") return LogLevel::kInfo;
  if (name == "warning" || name == "warn") return LogLevel::kWarning;
  if (name == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("log level '", name, "' is not one of debug, info, warning, error"));
}

absl::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

absl::Status LogOptions::Validate() const {
  if (absl::StatusOr<LogLevel> l = ParseLogLevel(level); !l.ok()) return l.status();
  if (format != "text" && format != "json") {
    return absl::InvalidArgumentError(absl::StrCat("log_format '", format, "' is not text or json"));
  }
  return absl::OkStatus();
}

absl::Status ConfigureLogging(const LogOptions& options) {
  if (absl::Status st = options.Validate(); !st.ok()) return st;
  SetLogLevel(*ParseLogLevel(options.level));
  Settings& s = GetSettings();
  absl::MutexLock lock(&s.mu);
  s.format = options.format;
  s.role = options.role;
  return absl::OkStatus();
}

LogLevel SetLogLevel(LogLevel level) {
  return static_cast<LogLevel>(g_level.exchange(static_cast<int>(level)));
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(std::memory_order_relaxed); }

std::string FormatLogLine(LogLevel level, absl::string_view format, absl::string_view role,
                          absl::string_view src, absl::string_view message,
                          const std::vector<std::pair<std::string, std::string>>& fields,
                          int64_t unix_micros) {
  absl::Time t = absl::FromUnixMicros(unix_micros);
  std::string ts = absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
  if (format == "json") {
    nlohmann::ordered_json j;
    j["ts"] = ts;
    j["level"] = LogLevelName(level);
    if (!role.empty()) j["role"] = role;
    j["src"] = src;
    j["msg"] = message;
    for (const auto& [k, v] : fields) j[k] = v;
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  std::string out = absl::StrCat(ts, " ", LogLevelName(level));
  if (!role.empty()) absl::StrAppend(&out, " ", role);
  absl::StrAppend(&out, " ", src, "] ", message);
  for (const auto& [k, v] : fields) {
    absl::StrAppend(&out, " ", k, "=");
    AppendQuoted(&out, v);
  }
  out.push_back('\n');
  return out;
}

LogLine::LogLine(LogLevel level, const char* file, int line) : level_(level), file_(file), line_(line) {}

LogLine::~LogLine() {
  std::string format, role;
  {
    Settings& s = GetSettings();
    absl::MutexLock lock(&s.mu);
    format = s.format;
    role = s.role;
  }
  std::string text = FormatLogLine(level_, format, role, absl::StrCat(Basename(file_), ":", line_),
                                   message_.str(), fields_, absl::ToUnixMicros(absl::Now()));
  const char* p = text.data();
  size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace v4serve::services
