#include "router/routing_policy.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "router/prefix_index.h"

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

size_t PrefixAwarePolicy::Choose(absl::Span<const WorkerInfo* const> candidates,
                                 const RoutingContext& context) {
  absl::flat_hash_map<std::string, int64_t> cached;
  if (!context.prompt.empty()) {
    for (const PrefixMatch& m : index_->Match(context.prompt, context.tenant_salt)) {
      cached[m.holder] = m.cached_tokens;
    }
  }
  const int64_t prompt_tokens = std::max<int64_t>(context.prompt_tokens, context.prompt.size());
  int64_t best = std::numeric_limits<int64_t>::max();
  std::vector<size_t> tied;
  for (size_t i = 0; i < candidates.size(); ++i) {
    auto it = cached.find(candidates[i]->address);
    const int64_t hit = it == cached.end() ? 0 : std::min(it->second, prompt_tokens);
    const int64_t cost = (prompt_tokens - hit) + load_penalty_tokens_ * candidates[i]->in_flight;
    if (cost < best) {
      best = cost;
      tied.clear();
    }
    if (cost == best) tied.push_back(i);
  }
  return tied[next_.fetch_add(1, std::memory_order_relaxed) % tied.size()];
}

absl::Status ValidateRoutingPolicyName(const std::string& name) {
  if (name == "least_loaded" || name == "prefix_aware") return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("--routing_policy: '", name, "' is not one of: least_loaded, prefix_aware"));
}

absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(const RoutingPolicyOptions& options) {
  if (absl::Status st = ValidateRoutingPolicyName(options.name); !st.ok()) return st;
  if (options.name == "prefix_aware") {
    if (options.index == nullptr) return absl::InternalError("prefix_aware routing needs a prefix index");
    if (options.load_penalty_tokens < 0) {
      return absl::InvalidArgumentError("--routing_load_penalty_tokens: must be >= 0");
    }
    return std::make_unique<PrefixAwarePolicy>(options.index, options.load_penalty_tokens);
  }
  return std::make_unique<LeastLoadedPolicy>();
}

}  // namespace v4serve::router
