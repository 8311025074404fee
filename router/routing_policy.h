// How the router picks a worker for a request: a small interface with policies chosen by name:
// least-loaded, and prefix-aware (cached prefix tokens against load, from the router's PrefixIndex).
#ifndef V4SERVE_ROUTER_ROUTING_POLICY_H_
#define V4SERVE_ROUTER_ROUTING_POLICY_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace v4serve::router {

enum class WorkerRole { kPrefill, kDecode };

struct WorkerInfo {
  std::string target;   // the configured name it came from
  std::string address;  // ip:port
  WorkerRole role = WorkerRole::kDecode;
  bool healthy = false;
  int in_flight = 0;  // requests this router has on it now
  std::string last_error;
};

// What the policy may look at for one request.
struct RoutingContext {
  int64_t prompt_tokens = 0;
  std::string tenant;
  absl::Span<const int32_t> prompt;  // the prompt's ids (valid during Choose)
  uint64_t tenant_salt = 0;          // kvstore::TenantSalt(tenant)
};

// Thread-safe: Choose may be called concurrently.
class RoutingPolicy {
 public:
  virtual ~RoutingPolicy() = default;
  // `candidates` are healthy workers of one role (non-empty); returns the index of the choice.
  virtual size_t Choose(absl::Span<const WorkerInfo* const> candidates, const RoutingContext& context) = 0;
};

// Fewest requests in flight; ties go round-robin so that idle workers share the load.
class LeastLoadedPolicy : public RoutingPolicy {
 public:
  size_t Choose(absl::Span<const WorkerInfo* const> candidates, const RoutingContext& context) override;

 private:
  std::atomic<uint64_t> next_{0};
};

class PrefixIndex;

// Picks the worker where the request costs least: the prompt tokens it would have to compute (those not
// in its cached prefix, per the PrefixIndex) plus `load_penalty_tokens` for each request already in
// flight on it. With nothing cached anywhere this is least-loaded (ties round-robin).
class PrefixAwarePolicy : public RoutingPolicy {
 public:
  // `index` must outlive the policy.
  PrefixAwarePolicy(const PrefixIndex* index, int64_t load_penalty_tokens)
      : index_(index), load_penalty_tokens_(load_penalty_tokens) {}
  size_t Choose(absl::Span<const WorkerInfo* const> candidates, const RoutingContext& context) override;

 private:
  const PrefixIndex* const index_;
  const int64_t load_penalty_tokens_;
  std::atomic<uint64_t> next_{0};
};

struct RoutingPolicyOptions {
  std::string name = "least_loaded";  // least_loaded | prefix_aware
  const PrefixIndex* index = nullptr;  // prefix_aware: required
  int64_t load_penalty_tokens = 1024;  // prefix_aware: cost of one in-flight request, in prompt tokens
};

// The policy `options.name` names; INVALID_ARGUMENT naming --routing_policy otherwise.
absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(const RoutingPolicyOptions& options);
// Names only (validation of flags before the index exists).
absl::Status ValidateRoutingPolicyName(const std::string& name);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_ROUTING_POLICY_H_
