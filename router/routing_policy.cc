#include "router/routing_policy.h"

#include "absl/strings/str_cat.h"

namespace v4serve::router {

size_t LeastLoadedPolicy::Choose(absl::Span<const WorkerInfo* const> candidates, const RoutingContext&) {
  int best = candidates[0]->in_flight;
  for (const WorkerInfo* w : candidates) best = std::min(best, w->in_flight);
  std::vector<size_t> tied;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (candidates[i]->in_flight == best) tied.push_back(i);
  }
  return tied[next_.fetch_add(1, std::memory_order_relaxed) % tied.size()];
}

absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(const std::string& name) {
  if (name == "least_loaded") return std::make_unique<LeastLoadedPolicy>();
  return absl::InvalidArgumentError(
      absl::StrCat("--routing_policy: '", name, "' is not one of: least_loaded"));
}

}  // namespace v4serve::router
