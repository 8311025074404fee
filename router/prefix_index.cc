#include "router/prefix_index.h"

#include <algorithm>
#include <utility>

namespace v4serve::router {

void PrefixIndex::StoreLocked(Holder& h, kvstore::BlockHash hash) {
  if (h.hashes.contains(hash)) return;
  h.order.push_back(hash);
  h.hashes.emplace(hash, std::prev(h.order.end()));
  ++pairs_;
}

void PrefixIndex::EvictLocked(Holder& h, kvstore::BlockHash hash) {
  auto it = h.hashes.find(hash);
  if (it == h.hashes.end()) return;
  h.order.erase(it->second);
  h.hashes.erase(it);
  --pairs_;
}

void PrefixIndex::ClearLocked(Holder& h) {
  pairs_ -= static_cast<int64_t>(h.hashes.size());
  h.hashes.clear();
  h.order.clear();
}

void PrefixIndex::TrimLocked() {
  while (pairs_ > max_blocks_) {
    // The holder with the most entries gives up its oldest.
    auto largest = std::max_element(holders_.begin(), holders_.end(), [](const auto& a, const auto& b) {
      return a.second.hashes.size() < b.second.hashes.size();
    });
    if (largest == holders_.end() || largest->second.order.empty()) return;
    EvictLocked(largest->second, largest->second.order.front());
  }
}

void PrefixIndex::Apply(const std::string& holder, const v1::KvEvent& event) {
  absl::MutexLock l(&mu_);
  const ChainParams params{event.model_fingerprint(), static_cast<int32_t>(event.block_tokens())};
  Holder& h = holders_[holder];
  // A snapshot restarts the holder's list; so does a change of model (its old hashes mean nothing now).
  if (event.snapshot() || !(h.params == params)) {
    ClearLocked(h);
    h.params = params;
  }
  for (const v1::BlockId& id : event.blocks()) {
    absl::StatusOr<kvstore::BlockHash> hash = kvstore::BlockHashFromBytes(id.hash());
    if (!hash.ok()) {
      ++skipped_;
      continue;
    }
    if (event.kind() == v1::KvEvent::KIND_STORED) {
      StoreLocked(h, *hash);
    } else if (event.kind() == v1::KvEvent::KIND_EVICTED) {
      EvictLocked(h, *hash);
    }
  }
  TrimLocked();
}

void PrefixIndex::Forget(const std::string& holder) {
  absl::MutexLock l(&mu_);
  auto it = holders_.find(holder);
  if (it == holders_.end()) return;
  ClearLocked(it->second);
  holders_.erase(it);
}

std::vector<PrefixMatch> PrefixIndex::Match(absl::Span<const int32_t> prompt, uint64_t tenant_salt) const {
  absl::MutexLock l(&mu_);
  // One chain per distinct model (normally one); each holder is matched against its own model's chain.
  absl::flat_hash_map<ChainParams, std::vector<std::string>> by_params;
  for (const auto& [name, h] : holders_) {
    if (h.params.block_tokens > 0 && !h.hashes.empty()) by_params[h.params].push_back(name);
  }
  std::vector<PrefixMatch> out;
  for (const auto& [params, names] : by_params) {
    const std::vector<kvstore::BlockHash> chain =
        kvstore::BlockHashChain(prompt, params.block_tokens, params.model_fingerprint, tenant_salt);
    for (const std::string& name : names) {
      const Holder& h = holders_.at(name);
      size_t n = 0;
      while (n < chain.size() && h.hashes.contains(chain[n])) ++n;
      if (n > 0) out.push_back({name, static_cast<int64_t>(n) * params.block_tokens});
    }
  }
  std::sort(out.begin(), out.end(), [](const PrefixMatch& a, const PrefixMatch& b) {
    return a.cached_tokens != b.cached_tokens ? a.cached_tokens > b.cached_tokens : a.holder < b.holder;
  });
  return out;
}

int64_t PrefixIndex::size() const {
  absl::MutexLock l(&mu_);
  return pairs_;
}

int64_t PrefixIndex::skipped() const {
  absl::MutexLock l(&mu_);
  return skipped_;
}

}  // namespace v4serve::router
