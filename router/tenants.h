// API keys, tenants and their limits: who may call the router, whose prefix cache a request belongs to,
// and how much each tenant may ask for.
//
// Keys come from a JSON file (`--api_keys_file`, e.g. a mounted Kubernetes Secret):
//   {"keys": [{"key": "sk-...", "tenant": "acme", "requests_per_minute": 600, "max_concurrent": 32}]}
// With no file, authentication is off and every request belongs to the default tenant "" (limits from
// the defaults). With a file, a /v1 request without a known `Authorization: Bearer <key>` is 401
// (UNAUTHENTICATED). The tenant reaches the workers (GenerateRequest.tenant), whose block hashes are
// salted with it: one tenant's cached prefixes are never another's.
//
// Limits per tenant: a token bucket of `requests_per_minute` (bursts up to one minute's worth) and at most
// `max_concurrent` requests in flight; over either, RESOURCE_EXHAUSTED (HTTP 429) saying which and when
// to retry. 0 = unlimited.
//
// Thread-safe.
#ifndef V4SERVE_ROUTER_TENANTS_H_
#define V4SERVE_ROUTER_TENANTS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace v4serve::router {

struct TenantLimits {
  double requests_per_minute = 0;  // 0 = unlimited
  int32_t max_concurrent = 0;      // 0 = unlimited
};

class TenantRegistry;

// A request admitted for a tenant; holds one of its concurrent slots until destroyed.
class TenantTicket {
 public:
  TenantTicket() = default;
  TenantTicket(TenantTicket&& other) noexcept { *this = std::move(other); }
  TenantTicket& operator=(TenantTicket&& other) noexcept;
  ~TenantTicket();
  const std::string& tenant() const { return tenant_; }

 private:
  friend class TenantRegistry;
  TenantRegistry* registry_ = nullptr;
  std::string tenant_;
};

class TenantRegistry {
 public:
  // `keys_file` empty: authentication off. `defaults` apply to the default tenant and to keys that set
  // no limit of their own. INVALID_ARGUMENT naming the file and entry for a malformed file.
  static absl::StatusOr<std::unique_ptr<TenantRegistry>> Create(const std::string& keys_file,
                                                                const TenantLimits& defaults,
                                                                std::function<absl::Time()> now = absl::Now);

  bool auth_enabled() const { return !keys_.empty(); }

  // The tenant of a request from its Authorization header (HTTP) or metadata (gRPC) value, e.g.
  // "Bearer sk-...". UNAUTHENTICATED when auth is on and the key is missing or unknown.
  absl::StatusOr<std::string> Authenticate(absl::string_view authorization) const;

  // Admits one request of `tenant` (rate and concurrency); RESOURCE_EXHAUSTED when over a limit.
  absl::StatusOr<TenantTicket> Admit(const std::string& tenant);

 private:
  struct Key {
    std::string tenant;
    TenantLimits limits;
  };
  struct State {
    TenantLimits limits;
    double tokens = 0;
    absl::Time refilled;
    int32_t in_flight = 0;
  };
  friend class TenantTicket;
  TenantRegistry(TenantLimits defaults, std::function<absl::Time()> now)
      : defaults_(defaults), now_(std::move(now)) {}
  void Release(const std::string& tenant);

  const TenantLimits defaults_;
  const std::function<absl::Time()> now_;
  absl::flat_hash_map<std::string, Key> keys_;             // immutable after Create
  absl::flat_hash_map<std::string, TenantLimits> limits_;  // per tenant, immutable after Create
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, State> state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_TENANTS_H_
