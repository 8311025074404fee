// Command-line flags for one `v4serve` subcommand, bound to the fields of that subcommand's Options.
//
// Each subcommand owns a FlagSet, binds its flags to an Options struct, parses argv once in main code,
// and validates the Options separately. Flags are never read deep inside a component.
// Accepted forms: --name=value, --name value, --bool_flag, --nobool_flag, --bool_flag=false.
// Not thread-safe; used from main only. Bound pointers must outlive the FlagSet.
#ifndef V4SERVE_SERVICES_FLAGS_H_
#define V4SERVE_SERVICES_FLAGS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace v4serve::services {

class FlagSet {
 public:
  // `command` is e.g. "v4serve router"; `summary` one line shown at the top of --help.
  FlagSet(std::string command, std::string summary);

  void Add(const std::string& name, std::string* target, std::string help);
  void Add(const std::string& name, int* target, std::string help);
  void Add(const std::string& name, int64_t* target, std::string help);
  void Add(const std::string& name, double* target, std::string help);
  void Add(const std::string& name, bool* target, std::string help);
  void Add(const std::string& name, absl::Duration* target, std::string help);  // e.g. 30s, 500ms, 2m
  // Comma-separated list; each occurrence appends.
  void Add(const std::string& name, std::vector<std::string>* target, std::string help);

  // Parses args (without the program and subcommand names). Unknown flags, missing or malformed values
  // are INVALID_ARGUMENT naming the flag. Non-flag arguments are collected in positional().
  absl::Status Parse(const std::vector<std::string>& args);

  // True when --help or -h was given; the caller prints Usage() and exits 0.
  bool help_requested() const { return help_requested_; }
  const std::vector<std::string>& positional() const { return positional_; }
  std::string Usage() const;

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string type;           // shown in --help
    std::string default_value;  // shown in --help
    bool is_bool = false;
    std::function<absl::Status(absl::string_view)> set;
  };
  void AddFlag(Flag flag);
  const Flag* Find(absl::string_view name) const;

  std::string command_;
  std::string summary_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
  bool help_requested_ = false;
};

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_FLAGS_H_
