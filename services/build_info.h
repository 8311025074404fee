// What this binary is: version, git commit and build type, fixed at configure time.
#ifndef V4SERVE_SERVICES_BUILD_INFO_H_
#define V4SERVE_SERVICES_BUILD_INFO_H_

#include "absl/strings/string_view.h"

namespace v4serve::services {

struct BuildInfo {
  absl::string_view version;
  absl::string_view git_commit;
  absl::string_view build_type;
  absl::string_view compiler;
};

const BuildInfo& GetBuildInfo();

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_BUILD_INFO_H_
