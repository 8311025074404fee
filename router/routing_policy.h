// How the router picks a worker for a request: a small interface with policies chosen by name.
// Least-loaded today; prefix-aware (cached prefix tokens against load) arrives with the tiered KV store.
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

// "least_loaded" -> LeastLoadedPolicy; INVALID_ARGUMENT naming --routing_policy otherwise.
absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(const std::string& name);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_ROUTING_POLICY_H_
