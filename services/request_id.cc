#include "services/request_id.h"

#include "absl/random/random.h"
#include "absl/strings/str_format.h"

namespace v4serve::services {

std::string NewRequestId() {
  thread_local absl::BitGen gen;
  return absl::StrFormat("req-%08x%016x", absl::Uniform<uint32_t>(gen), absl::Uniform<uint64_t>(gen));
}

bool IsValidRequestId(absl::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
              c == '_' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string RequestIdFrom(const grpc::ServerContextBase& context) {
  const auto& md = context.client_metadata();
  auto it = md.find(grpc::string_ref(kRequestIdKey.data(), kRequestIdKey.size()));
  if (it != md.end()) {
    absl::string_view id(it->second.data(), it->second.size());
    if (IsValidRequestId(id)) return std::string(id);
  }
  return NewRequestId();
}

void AttachRequestId(grpc::ClientContext& context, absl::string_view id) {
  context.AddMetadata(std::string(kRequestIdKey), std::string(id));
}

}  // namespace v4serve::services
