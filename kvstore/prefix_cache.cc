#include "kvstore/prefix_cache.h"

#include <cstring>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "kvstore/kv_events.h"

namespace v4serve::kvstore {
namespace {

uint64_t Mix(uint64_t x) {  // SplitMix64 finalizer.
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

}  // namespace

uint64_t StableHash64(const void* data, size_t n, uint64_t seed) {
  // Word-wise multiply-mix; byte order fixed by reading little-endian words.
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h = Mix(seed ^ 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full));
  while (n >= 8) {
    uint64_t w = 0;
    for (int i = 7; i >= 0; --i) w = (w << 8) | p[i];
    h = Mix(h ^ w) * 0x9E3779B97F4A7C15ull;
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  for (size_t i = n; i-- > 0;) w = (w << 8) | p[i];
  return Mix(h ^ w ^ (uint64_t{n} << 56));
}

BlockHash ChainBlockHash(BlockHash prev, absl::Span<const int32_t> block_tokens, uint64_t model_fingerprint,
                         uint64_t tenant_salt) {
  uint64_t head[3] = {prev, model_fingerprint, tenant_salt};
  uint64_t h = StableHash64(head, sizeof(head));
  std::vector<uint8_t> bytes(block_tokens.size() * 4);
  for (size_t i = 0; i < block_tokens.size(); ++i) {
    const uint32_t t = static_cast<uint32_t>(block_tokens[i]);
    for (int b = 0; b < 4; ++b) bytes[i * 4 + b] = static_cast<uint8_t>(t >> (8 * b));
  }
  return StableHash64(bytes.data(), bytes.size(), h);
}

std::vector<BlockHash> BlockHashChain(absl::Span<const int32_t> tokens, int32_t block_tokens,
                                      uint64_t model_fingerprint, uint64_t tenant_salt) {
  std::vector<BlockHash> out;
  BlockHash prev = 0;
  for (size_t b = 0; b + static_cast<size_t>(block_tokens) <= tokens.size(); b += block_tokens) {
    prev = ChainBlockHash(prev, tokens.subspan(b, block_tokens), model_fingerprint, tenant_salt);
    out.push_back(prev);
  }
  return out;
}

uint64_t TenantSalt(absl::string_view tenant) {
  return tenant.empty() ? 0 : StableHash64(tenant.data(), tenant.size());
}

std::string BlockHashBytes(BlockHash hash) {
  std::string out(8, '\0');
  for (int b = 0; b < 8; ++b) out[b] = static_cast<char>(static_cast<uint8_t>(hash >> (8 * (7 - b))));
  return out;
}

absl::StatusOr<BlockHash> BlockHashFromBytes(absl::string_view bytes) {
  if (bytes.size() != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("block hash: expected 8 bytes, got ", bytes.size()));
  }
  BlockHash h = 0;
  for (int b = 0; b < 8; ++b) h = (h << 8) | static_cast<uint8_t>(bytes[b]);
  return h;
}

PrefixCache::~PrefixCache() {
  absl::MutexLock l(&mu_);
  for (const auto& [hash, e] : map_) pool_->Unref(e.id).IgnoreError();
}

std::vector<BlockId> PrefixCache::Acquire(absl::Span<const BlockHash> hashes) {
  absl::MutexLock l(&mu_);
  std::vector<BlockId> out;
  for (BlockHash h : hashes) {
    auto it = map_.find(h);
    if (it == map_.end()) break;
    if (!pool_->Ref(it->second.id).ok()) break;  // Cannot happen while the cache holds it.
    lru_.splice(lru_.end(), lru_, it->second.lru);
    out.push_back(it->second.id);
  }
  return out;
}

bool PrefixCache::Insert(BlockHash hash, BlockId id) {
  {
    absl::MutexLock l(&mu_);
    if (map_.contains(hash)) return false;
    if (!pool_->Ref(id).ok()) return false;
    lru_.push_back(hash);
    map_.emplace(hash, Entry{id, std::prev(lru_.end())});
  }
  if (events_ != nullptr) events_->Stored(absl::MakeConstSpan(&hash, 1));
  return true;
}

void PrefixCache::Erase(BlockHash hash) {
  {
    absl::MutexLock l(&mu_);
    auto it = map_.find(hash);
    if (it == map_.end()) return;
    pool_->Unref(it->second.id).IgnoreError();
    lru_.erase(it->second.lru);
    map_.erase(it);
  }
  if (events_ != nullptr) events_->Evicted(absl::MakeConstSpan(&hash, 1));
}

int64_t PrefixCache::Evict(int64_t n) {
  std::vector<BlockHash> evicted;
  {
    absl::MutexLock l(&mu_);
    for (auto it = lru_.begin(); it != lru_.end() && static_cast<int64_t>(evicted.size()) < n;) {
      auto m = map_.find(*it);
      if (pool_->refcount(m->second.id) == 1) {
        pool_->Unref(m->second.id).IgnoreError();
        evicted.push_back(*it);
        map_.erase(m);
        it = lru_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (events_ != nullptr) events_->Evicted(evicted);
  return static_cast<int64_t>(evicted.size());
}

int64_t PrefixCache::evictable() const {
  absl::MutexLock l(&mu_);
  int64_t n = 0;
  for (const auto& [hash, e] : map_) n += pool_->refcount(e.id) == 1 ? 1 : 0;
  return n;
}

int64_t PrefixCache::size() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(map_.size());
}

}  // namespace v4serve::kvstore
