#include "services/flags.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace v4serve::services {
namespace {

absl::Status BadValue(absl::string_view name, absl::string_view value, absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat("flag --", name, ": cannot parse '", value, "' as ", expected));
}

}  // namespace

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::AddFlag(Flag flag) { flags_.push_back(std::move(flag)); }

void FlagSet::Add(const std::string& name, std::string* target, std::string help) {
  AddFlag({name, std::move(help), "string", absl::StrCat("\"", *target, "\""), false,
           [target](absl::string_view v) {
             *target = std::string(v);
             return absl::OkStatus();
           }});
}

void FlagSet::Add(const std::string& name, int* target, std::string help) {
  AddFlag({name, std::move(help), "int", absl::StrCat(*target), false, [target, name](absl::string_view v) {
             return absl::SimpleAtoi(v, target) ? absl::OkStatus() : BadValue(name, v, "an integer");
           }});
}

void FlagSet::Add(const std::string& name, int64_t* target, std::string help) {
  AddFlag({name, std::move(help), "int64", absl::StrCat(*target), false, [target, name](absl::string_view v) {
             return absl::SimpleAtoi(v, target) ? absl::OkStatus() : BadValue(name, v, "an integer");
           }});
}

void FlagSet::Add(const std::string& name, double* target, std::string help) {
  AddFlag(
      {name, std::move(help), "double", absl::StrCat(*target), false, [target, name](absl::string_view v) {
         return absl::SimpleAtod(v, target) ? absl::OkStatus() : BadValue(name, v, "a number");
       }});
}

void FlagSet::Add(const std::string& name, bool* target, std::string help) {
  AddFlag(
      {name, std::move(help), "bool", *target ? "true" : "false", true, [target, name](absl::string_view v) {
         return absl::SimpleAtob(v, target) ? absl::OkStatus() : BadValue(name, v, "true or false");
       }});
}

void FlagSet::Add(const std::string& name, absl::Duration* target, std::string help) {
  AddFlag({name, std::move(help), "duration", absl::FormatDuration(*target), false,
           [target, name](absl::string_view v) {
             return absl::ParseDuration(v, target) ? absl::OkStatus()
                                                   : BadValue(name, v, "a duration such as 30s or 500ms");
           }});
}

void FlagSet::Add(const std::string& name, std::vector<std::string>* target, std::string help) {
  AddFlag({name, std::move(help), "list", absl::StrCat("\"", absl::StrJoin(*target, ","), "\""), false,
           [target](absl::string_view v) {
             for (absl::string_view part : absl::StrSplit(v, ',', absl::SkipWhitespace())) {
               target->emplace_back(absl::StripAsciiWhitespace(part));
             }
             return absl::OkStatus();
           }});
}

const FlagSet::Flag* FlagSet::Find(absl::string_view name) const {
  auto it = std::find_if(flags_.begin(), flags_.end(), [&](const Flag& f) { return f.name == name; });
  return it == flags_.end() ? nullptr : &*it;
}

absl::Status FlagSet::Parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (arg == "--help" || arg == "-h" || arg == "--helpfull") {
      help_requested_ = true;
      continue;
    }
    if (arg == "--") {
      positional_.insert(positional_.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (!absl::StartsWith(arg, "-") || arg == "-") {
      positional_.emplace_back(arg);
      continue;
    }
    arg.remove_prefix(absl::StartsWith(arg, "--") ? 2 : 1);
    absl::string_view name = arg;
    std::optional<absl::string_view> value;
    if (size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const Flag* flag = Find(name);
    if (flag == nullptr && !value && absl::StartsWith(name, "no")) {
      const Flag* negated = Find(name.substr(2));
      if (negated != nullptr && negated->is_bool) {
        if (absl::Status st = negated->set("false"); !st.ok()) return st;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " for '", command_, "' (see --help)"));
    }
    if (!value) {
      if (flag->is_bool) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
    }
    if (absl::Status st = flag->set(*value); !st.ok()) return st;
  }
  return absl::OkStatus();
}

std::string FlagSet::Usage() const {
  std::string out = absl::StrCat("usage: ", command_, " [flags]\n\n", summary_, "\n\nflags:\n");
  for (const Flag& f : flags_) {
    absl::StrAppendFormat(&out, "  --%s (%s, default %s)\n      %s\n", f.name, f.type, f.default_value,
                          f.help);
  }
  absl::StrAppend(&out, "  --help\n      Show this help and exit.\n");
  return out;
}

}  // namespace v4serve::services
