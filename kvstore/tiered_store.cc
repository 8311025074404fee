#include "kvstore/tiered_store.h"

#include <algorithm>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/store_format.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::kvstore {

// ---------------------------------------------------------------------------------------------- memory

bool MemoryTier::Contains(const std::string& key, bool* has_state) const {
  absl::MutexLock l(&mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return false;
  if (has_state != nullptr) *has_state = !it->second.block->window_state.empty();
  return true;
}

BlockRef MemoryTier::Get(const std::string& key) {
  absl::MutexLock l(&mu_);
  auto it = map_.find(key);
  if (it == map_.end()) return nullptr;
  lru_.splice(lru_.end(), lru_, it->second.lru);
  return it->second.block;
}

std::vector<std::string> MemoryTier::Put(const std::string& key, BlockRef block, bool* inserted) {
  std::vector<std::string> evicted;
  const int64_t size = block->bytes();
  absl::MutexLock l(&mu_);
  *inserted = false;
  auto existing = map_.find(key);
  int64_t old = existing == map_.end() ? 0 : existing->second.size;
  if (size > capacity_) return evicted;
  // Make room, least recently used first, skipping pinned blocks and the key itself.
  for (auto it = lru_.begin(); bytes_ - old + size > capacity_ && it != lru_.end();) {
    auto m = map_.find(*it);
    if (m->second.pins > 0 || *it == key) {
      ++it;
      continue;
    }
    bytes_ -= m->second.size;
    evicted.push_back(*it);
    map_.erase(m);
    it = lru_.erase(it);
  }
  if (bytes_ - old + size > capacity_) return evicted;  // Everything left is pinned.
  existing = map_.find(key);
  if (existing != map_.end()) {
    bytes_ += size - existing->second.size;
    existing->second.block = std::move(block);
    existing->second.size = size;
    lru_.splice(lru_.end(), lru_, existing->second.lru);
  } else {
    lru_.push_back(key);
    map_.emplace(key, Entry{std::move(block), size, 0, std::prev(lru_.end())});
    bytes_ += size;
  }
  *inserted = true;
  return evicted;
}

void MemoryTier::Pin(const std::string& key) {
  absl::MutexLock l(&mu_);
  auto it = map_.find(key);
  if (it != map_.end()) ++it->second.pins;
}

void MemoryTier::Unpin(const std::string& key) {
  absl::MutexLock l(&mu_);
  auto it = map_.find(key);
  if (it != map_.end() && it->second.pins > 0) --it->second.pins;
}

int64_t MemoryTier::bytes() const {
  absl::MutexLock l(&mu_);
  return bytes_;
}

int64_t MemoryTier::blocks() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(map_.size());
}

std::vector<std::string> MemoryTier::Keys() const {
  absl::MutexLock l(&mu_);
  return std::vector<std::string>(lru_.begin(), lru_.end());
}

// ----------------------------------------------------------------------------------------------- tiers

absl::Status TieredStoreOptions::Validate() const {
  if (device_capacity_bytes < 0) return absl::InvalidArgumentError("device tier capacity must be >= 0");
  if (host_capacity_bytes <= 0) return absl::InvalidArgumentError("--kv_host_mb must be positive");
  if (!disk_path.empty() && disk_capacity_bytes <= 0) {
    return absl::InvalidArgumentError("--kv_disk_mb must be positive");
  }
  if (write_queue_blocks <= 0) return absl::InvalidArgumentError("write queue bound must be positive");
  if (prefetch_blocks < 0) return absl::InvalidArgumentError("prefetch blocks must be >= 0");
  if (prefetch_threads < 1) return absl::InvalidArgumentError("prefetch threads must be >= 1");
  return absl::OkStatus();
}

TieredStore::TieredStore(const TieredStoreOptions& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<TieredStore>> TieredStore::Open(const TieredStoreOptions& options) {
  RETURN_IF_ERROR(options.Validate());
  std::unique_ptr<TieredStore> s(new TieredStore(options));
  if (options.device_capacity_bytes > 0) {
    s->device_ = std::make_unique<MemoryTier>(Tier::kDevice, options.device_capacity_bytes);
  }
  s->host_ = std::make_unique<MemoryTier>(Tier::kHost, options.host_capacity_bytes);
  if (!options.disk_path.empty()) {
    DiskTierOptions d;
    d.path = options.disk_path;
    d.capacity_bytes = options.disk_capacity_bytes;
    d.blob_files = options.blob_files;
    ASSIGN_OR_RETURN(s->disk_, DiskTier::Open(d));
  }
  s->writer_ = std::thread([p = s.get()] { p->WriterLoop(); });
  for (int32_t i = 0; i < options.prefetch_threads; ++i) {
    s->prefetchers_.emplace_back([p = s.get()] { p->PrefetchLoop(); });
  }
  return s;
}

TieredStore::~TieredStore() {
  {
    absl::MutexLock l(&qmu_);
    stop_ = true;
    qcv_.SignalAll();
  }
  writer_.join();
  for (std::thread& t : prefetchers_) t.join();
}

void TieredStore::Emit(StoreEvent::Kind kind, const StoreScope& scope, const std::vector<std::string>& keys,
                       Tier tier) {
  if (keys.empty()) return;
  absl::MutexLock l(&sub_mu_);
  if (subscribers_.empty()) return;
  // Evictions can mix scopes; group them.
  absl::flat_hash_map<std::pair<uint64_t, uint64_t>, StoreEvent> by_scope;
  for (const std::string& k : keys) {
    StoreScope s = scope;
    uint64_t hash = 0;
    if (!DecodeStoreKey(k, &s, &hash).ok()) continue;
    StoreEvent& e = by_scope[{s.model_fingerprint, s.tenant_salt}];
    e.kind = kind;
    e.scope = s;
    e.tier = tier;
    e.hashes.push_back(hash);
  }
  for (const auto& [unused, e] : by_scope) {
    for (const auto& [id, fn] : subscribers_) fn(e);
  }
}

void TieredStore::PutMemory(BlockTier* tier, const std::string& key, const BlockRef& block) {
  bool inserted = false;
  std::vector<std::string> evicted = tier->Put(key, block, &inserted);
  if (tier->tier() == Tier::kHost) evicted_host_.fetch_add(static_cast<int64_t>(evicted.size()));
  Emit(StoreEvent::Kind::kEvicted, StoreScope(), evicted, tier->tier());
}

absl::StatusOr<LookupResult> TieredStore::Lookup(const StoreScope& scope, absl::Span<const uint64_t> hashes) {
  lookups_.fetch_add(1);
  LookupResult r;
  std::vector<std::pair<std::string, uint64_t>> to_prefetch;
  for (uint64_t h : hashes) {
    const std::string key = EncodeStoreKey(scope, h);
    bool state = false;
    Tier where = Tier::kNone;
    if (device_ != nullptr && device_->Contains(key, &state)) {
      where = Tier::kDevice;
    } else if (host_->Contains(key, &state)) {
      where = Tier::kHost;
    } else if (disk_ != nullptr && disk_->Contains(key, &state)) {
      where = Tier::kDisk;
      if (static_cast<int32_t>(to_prefetch.size()) < options_.prefetch_blocks)
        to_prefetch.emplace_back(key, h);
    } else {
      break;
    }
    r.tiers.push_back(where);
    r.has_window_state.push_back(state);
    ++r.matched;
  }
  lookup_hit_blocks_.fetch_add(r.matched);
  if (!to_prefetch.empty()) {
    absl::MutexLock l(&qmu_);
    for (auto& [key, h] : to_prefetch) {
      if (!prefetching_.insert(key).second) continue;  // Already on its way.
      Job j;
      j.kind = Job::Kind::kPrefetch;
      j.key = std::move(key);
      j.scope = scope;
      j.hash = h;
      prefetches_.push_back(std::move(j));
      ++in_flight_;
    }
    qcv_.SignalAll();
  }
  return r;
}

absl::StatusOr<StoredBlock> TieredStore::Get(const StoreScope& scope, uint64_t hash, bool with_state) {
  gets_.fetch_add(1);
  const std::string key = EncodeStoreKey(scope, hash);
  auto from_memory = [&](const BlockRef& b) -> std::optional<StoredBlock> {
    // Memory tiers verify too: a flipped bit in RAM is a miss, never served.
    if (!VerifyBlockBytes(b->block, scope.model_fingerprint, hash).ok() ||
        (!b->window_state.empty() && !DecodeWindowState(b->window_state).ok())) {
      checksum_failures_.fetch_add(1);
      return std::nullopt;
    }
    StoredBlock out = *b;
    if (!with_state) out.window_state.clear();
    return out;
  };
  if (device_ != nullptr) {
    if (BlockRef b = device_->Get(key)) {
      if (auto out = from_memory(b)) {
        get_hits_device_.fetch_add(1);
        return *std::move(out);
      }
    }
  }
  if (BlockRef b = host_->Get(key)) {
    if (auto out = from_memory(b)) {
      get_hits_host_.fetch_add(1);
      return *std::move(out);
    }
  }
  bool waited = false;
  {
    absl::MutexLock l(&qmu_);
    while (prefetching_.contains(key)) {
      waited = true;
      prefetch_cv_.Wait(&qmu_);
    }
  }
  if (waited) {
    if (BlockRef b = host_->Get(key)) {
      if (auto out = from_memory(b)) {
        get_hits_host_.fetch_add(1);
        return *std::move(out);
      }
    }
  }
  if (disk_ != nullptr) {
    absl::StatusOr<StoredBlock> b = disk_->Get(key, /*with_state=*/true);
    if (b.ok()) {
      get_hits_disk_.fetch_add(1);
      PutMemory(host_.get(), key, std::make_shared<const StoredBlock>(*b));  // Read-through promotion.
      if (!with_state) b->window_state.clear();
      return b;
    }
    if (b.status().code() != absl::StatusCode::kNotFound) return b.status();
  }
  get_misses_.fetch_add(1);
  return absl::NotFoundError("KV block not in the store");
}

bool TieredStore::PutAsync(const StoreScope& scope, StoredBlock block) {
  puts_.fetch_add(1);
  const std::string key = EncodeStoreKey(scope, block.hash);
  auto shared = std::make_shared<StoredBlock>(std::move(block));
  // Memory tiers at once (a copy-free insert), so the very next request finds the block.
  if (device_ != nullptr) PutMemory(device_.get(), key, shared);
  PutMemory(host_.get(), key, shared);
  bool queued = true;
  {
    absl::MutexLock l(&qmu_);
    if (static_cast<int32_t>(writes_.size()) >= options_.write_queue_blocks) {
      queued = false;
    } else {
      Job j;
      j.kind = Job::Kind::kPut;
      j.key = key;
      j.scope = scope;
      j.block = shared;
      writes_.push_back(std::move(j));
      ++in_flight_;
      qcv_.SignalAll();
    }
  }
  if (!queued) {
    put_drops_.fetch_add(1);
    if (disk_ == nullptr) Emit(StoreEvent::Kind::kStored, scope, {key}, Tier::kHost);
    return disk_ == nullptr;  // Without a disk tier the memory insert was the whole write.
  }
  return true;
}

void TieredStore::WriterLoop() {
  for (;;) {
    Job job;
    {
      absl::MutexLock l(&qmu_);
      while (!stop_ && writes_.empty()) qcv_.Wait(&qmu_);
      if (writes_.empty()) return;  // stop_ and drained.
      job = std::move(writes_.front());
      writes_.pop_front();
    }
    Tier stored_in = Tier::kHost;
    bool on_disk_state = false;
    if (disk_ != nullptr && disk_->Contains(job.key, &on_disk_state) &&
        (on_disk_state || job.block->window_state.empty())) {
      stored_in = Tier::kDisk;  // Another writer stored the same prefix already: nothing to add.
    } else if (disk_ != nullptr) {
      absl::StatusOr<std::vector<std::string>> evicted = disk_->Put(job.key, *job.block);
      if (evicted.ok()) {
        stored_in = Tier::kDisk;
        evicted_disk_.fetch_add(static_cast<int64_t>(evicted->size()));
        Emit(StoreEvent::Kind::kEvicted, job.scope, *evicted, Tier::kDisk);
      } else {
        put_errors_.fetch_add(1);
        V4LOG(WARNING).With("status", evicted.status().ToString()) << "KV store: disk write failed";
      }
    }
    Emit(StoreEvent::Kind::kStored, job.scope, {job.key}, stored_in);
    absl::MutexLock l(&qmu_);
    if (--in_flight_ == 0) idle_cv_.SignalAll();
  }
}

void TieredStore::PrefetchLoop() {
  for (;;) {
    Job job;
    {
      absl::MutexLock l(&qmu_);
      while (!stop_ && prefetches_.empty()) qcv_.Wait(&qmu_);
      if (stop_) {
        in_flight_ -= static_cast<int64_t>(prefetches_.size());
        for (const Job& j : prefetches_) prefetching_.erase(j.key);
        prefetches_.clear();
        idle_cv_.SignalAll();
        prefetch_cv_.SignalAll();
        return;
      }
      job = std::move(prefetches_.front());
      prefetches_.pop_front();
    }
    if (!host_->Contains(job.key, nullptr)) {
      absl::StatusOr<StoredBlock> b = disk_->Get(job.key, /*with_state=*/true);
      if (b.ok()) {
        PutMemory(host_.get(), job.key, std::make_shared<const StoredBlock>(*std::move(b)));
        prefetched_.fetch_add(1);
      }
    }
    absl::MutexLock l(&qmu_);
    prefetching_.erase(job.key);
    prefetch_cv_.SignalAll();
    if (--in_flight_ == 0) idle_cv_.SignalAll();
  }
}

void TieredStore::Flush() {
  absl::MutexLock l(&qmu_);
  while (in_flight_ > 0) idle_cv_.Wait(&qmu_);
}

void TieredStore::Pin(const StoreScope& scope, uint64_t hash) {
  const std::string key = EncodeStoreKey(scope, hash);
  if (device_ != nullptr) device_->Pin(key);
  host_->Pin(key);
}

void TieredStore::Unpin(const StoreScope& scope, uint64_t hash) {
  const std::string key = EncodeStoreKey(scope, hash);
  if (device_ != nullptr) device_->Unpin(key);
  host_->Unpin(key);
}

int64_t TieredStore::Subscribe(std::function<void(const StoreEvent&)> fn) {
  absl::MutexLock l(&sub_mu_);
  subscribers_.emplace_back(next_sub_, std::move(fn));
  return next_sub_++;
}

void TieredStore::Unsubscribe(int64_t id) {
  absl::MutexLock l(&sub_mu_);
  std::erase_if(subscribers_, [id](const auto& s) { return s.first == id; });
}

std::vector<StoreEvent> TieredStore::Snapshot() const {
  absl::flat_hash_map<std::string, Tier> where;
  if (device_ != nullptr) {
    for (std::string& k : device_->Keys()) where[std::move(k)] = Tier::kDevice;
  }
  for (std::string& k : host_->Keys()) where[std::move(k)] = Tier::kHost;
  if (disk_ != nullptr) {
    for (std::string& k : disk_->Keys()) where[std::move(k)] = Tier::kDisk;
  }
  std::vector<StoreEvent> out;
  absl::flat_hash_map<std::tuple<uint64_t, uint64_t, int>, size_t> index;
  for (const auto& [key, tier] : where) {
    StoreScope scope;
    uint64_t hash = 0;
    if (!DecodeStoreKey(key, &scope, &hash).ok()) continue;
    auto [it, fresh] = index.try_emplace(
        std::make_tuple(scope.model_fingerprint, scope.tenant_salt, static_cast<int>(tier)), out.size());
    if (fresh) {
      StoreEvent e;
      e.kind = StoreEvent::Kind::kStored;
      e.scope = scope;
      e.tier = tier;
      out.push_back(std::move(e));
    }
    out[it->second].hashes.push_back(hash);
  }
  return out;
}

TieredStoreStats TieredStore::stats() const {
  TieredStoreStats s;
  if (device_ != nullptr) {
    s.device_blocks = device_->blocks();
    s.device_bytes = device_->bytes();
  }
  s.host_blocks = host_->blocks();
  s.host_bytes = host_->bytes();
  s.disk_blocks = disk_ != nullptr ? disk_->blocks() : 0;
  s.lookups = lookups_.load();
  s.lookup_hit_blocks = lookup_hit_blocks_.load();
  s.gets = gets_.load();
  s.get_hits_device = get_hits_device_.load();
  s.get_hits_host = get_hits_host_.load();
  s.get_hits_disk = get_hits_disk_.load();
  s.get_misses = get_misses_.load();
  s.puts = puts_.load();
  s.put_drops = put_drops_.load();
  s.put_errors = put_errors_.load();
  s.prefetched = prefetched_.load();
  s.checksum_failures = checksum_failures_.load() + (disk_ != nullptr ? disk_->checksum_failures() : 0);
  s.evicted_host = evicted_host_.load();
  s.evicted_disk = evicted_disk_.load();
  {
    absl::MutexLock l(&qmu_);
    s.write_queue_depth = static_cast<int64_t>(writes_.size());
  }
  return s;
}

}  // namespace v4serve::kvstore
