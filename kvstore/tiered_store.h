// The tiered KV store (docs/KV_STORE.md): device -> host memory -> RocksDB on local disk, behind the
// KvStoreClient interface (kv_store_client.h), so an engine uses it in-process or through the
// `v4serve kvstore` gRPC service (kvstore_service.h).
//
//   MemoryTier  one in-memory tier with a byte capacity, LRU eviction and pinning. The host tier is one;
//               the device tier is a BlockTier too (the CUDA backend will implement it over device
//               memory; a MemoryTier stands in for it in host memory).
//   DiskTier    RocksDB with column families "blocks" (block bytes, large values in BlobDB files),
//               "window_state" (window-state checkpoints) and "meta" (per-block sizes and write order,
//               the store's format record). Every read verifies checksums; a block that fails is
//               deleted, counted and reported as a miss. The in-memory index is rebuilt from "meta" at
//               open, so a restarted store serves what it held.
//   TieredStore read-through lookups (device, host, disk; a disk hit is promoted to host), prefetch
//               of the matched blocks from disk into host on Lookup, write-behind of Puts to disk on a
//               bounded queue (a full queue drops the disk write and counts it; the caller never
//               waits), and stored/evicted events for subscribers (the router's prefix index).
//
// Eviction is LRU per tier by bytes: a Get or Lookup hit makes a block most recently used; pinned
// blocks are never evicted. Evicting from host does not evict from disk (the disk tier is larger and
// keeps its own LRU); evicting from disk forgets the block.
//
// Thread-safe.
#ifndef V4SERVE_KVSTORE_TIERED_STORE_H_
#define V4SERVE_KVSTORE_TIERED_STORE_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstore/kv_store_client.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace v4serve::kvstore {

// A stored block as the tiers hold it, keyed by EncodeStoreKey.
using BlockRef = std::shared_ptr<const StoredBlock>;

// One memory tier (host, or the device stand-in).
class BlockTier {
 public:
  virtual ~BlockTier() = default;
  virtual Tier tier() const = 0;
  virtual bool Contains(const std::string& key, bool* has_state) const = 0;
  // nullptr on a miss; a hit becomes most recently used.
  virtual BlockRef Get(const std::string& key) = 0;
  // Inserts (or replaces) the block; evicts least recently used unpinned blocks to make room and returns
  // their keys. A block that cannot fit (larger than the capacity, or everything else pinned) is not
  // inserted (`*inserted` false).
  virtual std::vector<std::string> Put(const std::string& key, BlockRef block, bool* inserted) = 0;
  virtual void Pin(const std::string& key) = 0;    // No-op for an absent key.
  virtual void Unpin(const std::string& key) = 0;  // Drops one pin.
  virtual int64_t bytes() const = 0;
  virtual int64_t blocks() const = 0;
};

class MemoryTier final : public BlockTier {
 public:
  MemoryTier(Tier tier, int64_t capacity_bytes) : tier_(tier), capacity_(capacity_bytes) {}
  Tier tier() const override { return tier_; }
  bool Contains(const std::string& key, bool* has_state) const override;
  BlockRef Get(const std::string& key) override;
  std::vector<std::string> Put(const std::string& key, BlockRef block, bool* inserted) override;
  void Pin(const std::string& key) override;
  void Unpin(const std::string& key) override;
  int64_t bytes() const override;
  int64_t blocks() const override;
  int64_t capacity() const { return capacity_; }

 private:
  struct Entry {
    BlockRef block;
    int64_t size = 0;
    int32_t pins = 0;
    std::list<std::string>::iterator lru;
  };
  const Tier tier_;
  const int64_t capacity_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> map_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);  // Front = least recently used.
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

struct DiskTierOptions {
  std::string path;  // RocksDB directory (created when missing unless read_only).
  int64_t capacity_bytes = 64LL << 30;
  bool read_only = false;          // `v4serve kv stats|verify` on a store another process may hold.
  bool blob_files = true;          // Block values in BlobDB files (enable_blob_files).
  uint64_t min_blob_bytes = 4096;  // Values at least this large go to blob files.
};

struct DiskTierStats {
  int64_t blocks = 0;
  int64_t window_states = 0;
  int64_t block_bytes = 0;    // Sum of block values (uncompressed sizes as stored).
  int64_t state_bytes = 0;    // Sum of window-state values.
  int64_t bytes_on_disk = 0;  // SST + blob + WAL files in the directory.
  std::vector<std::pair<uint64_t, int64_t>> blocks_per_model;  // (fingerprint, blocks).
};

class DiskTier {
 public:
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(const DiskTierOptions& options);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  bool Contains(const std::string& key, bool* has_state) const;
  // Verified bytes; NOT_FOUND on a miss or a block that failed verification (then deleted and counted).
  absl::StatusOr<StoredBlock> Get(const std::string& key, bool with_state);
  // Writes block + state + meta in one atomic batch, then evicts LRU blocks over capacity (returned).
  absl::StatusOr<std::vector<std::string>> Put(const std::string& key, const StoredBlock& block);

  // Reads and verifies every block and state. Returns (good, bad); deletes bad ones unless read-only.
  absl::StatusOr<std::pair<int64_t, int64_t>> Verify();
  absl::Status Compact();
  DiskTierStats Stats() const;
  int64_t checksum_failures() const { return checksum_failures_.load(); }
  int64_t blocks() const;
  int64_t index_bytes() const;

 private:
  explicit DiskTier(DiskTierOptions options);
  absl::Status RebuildIndex();
  void DropLocked(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status DeleteFromDb(const std::string& key);

  struct IndexEntry {
    int64_t block_bytes = 0;
    int64_t state_bytes = 0;
    std::list<std::string>::iterator lru;
  };
  const DiskTierOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, blocks, window_state, meta.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, IndexEntry> index_ ABSL_GUARDED_BY(mu_);
  std::list<std::string> lru_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int64_t> checksum_failures_{0};
};

struct TieredStoreOptions {
  int64_t device_capacity_bytes = 0;  // 0 = no device tier (the engine's own pool is it).
  int64_t host_capacity_bytes = 4LL << 30;
  std::string disk_path;  // Empty = no disk tier.
  int64_t disk_capacity_bytes = 64LL << 30;
  int32_t write_queue_blocks = 1024;  // Write-behind queue bound.
  int32_t prefetch_blocks = 256;      // Most blocks one Lookup prefetches from disk (32k tokens).
  int32_t prefetch_threads = 4;       // Parallel disk reads of prefetches (queue depth).
  bool blob_files = true;

  absl::Status Validate() const;
};

struct StoreEvent {
  enum class Kind { kStored, kEvicted } kind = Kind::kStored;
  StoreScope scope;
  std::vector<uint64_t> hashes;
  Tier tier = Tier::kNone;
};

struct TieredStoreStats {
  int64_t device_blocks = 0, device_bytes = 0;
  int64_t host_blocks = 0, host_bytes = 0;
  int64_t disk_blocks = 0;
  int64_t lookups = 0, lookup_hit_blocks = 0;
  int64_t gets = 0, get_hits_device = 0, get_hits_host = 0, get_hits_disk = 0, get_misses = 0;
  int64_t puts = 0, put_drops = 0, put_errors = 0, write_queue_depth = 0;
  int64_t prefetched = 0, checksum_failures = 0;
  int64_t evicted_host = 0, evicted_disk = 0;
};

class TieredStore final : public KvStoreClient {
 public:
  static absl::StatusOr<std::unique_ptr<TieredStore>> Open(const TieredStoreOptions& options);
  ~TieredStore() override;  // Drains the write-behind queue.

  absl::StatusOr<LookupResult> Lookup(const StoreScope& scope, absl::Span<const uint64_t> hashes) override;
  absl::StatusOr<StoredBlock> Get(const StoreScope& scope, uint64_t hash, bool with_state) override;
  bool PutAsync(const StoreScope& scope, StoredBlock block) override;
  void Flush() override;

  // Pinned blocks stay in the memory tiers until unpinned (one Unpin per Pin).
  void Pin(const StoreScope& scope, uint64_t hash);
  void Unpin(const StoreScope& scope, uint64_t hash);

  // Events of every later Put and eviction, delivered on the store's writer thread (keep it short).
  // Returns an id for Unsubscribe.
  int64_t Subscribe(std::function<void(const StoreEvent&)> fn);
  void Unsubscribe(int64_t id);

  TieredStoreStats stats() const;
  DiskTier* disk() { return disk_.get(); }

 private:
  explicit TieredStore(const TieredStoreOptions& options);
  struct Job {
    enum class Kind { kPut, kPrefetch } kind;
    std::string key;
    StoreScope scope;
    std::shared_ptr<StoredBlock> block;  // kPut.
    uint64_t hash = 0;
  };
  void WriterLoop();
  void PrefetchLoop();
  void Emit(StoreEvent::Kind kind, const StoreScope& scope, const std::vector<std::string>& keys, Tier tier);
  void PutMemory(BlockTier* tier, const std::string& key, const BlockRef& block);

  const TieredStoreOptions options_;
  std::unique_ptr<BlockTier> device_;
  std::unique_ptr<MemoryTier> host_;
  std::unique_ptr<DiskTier> disk_;

  mutable absl::Mutex qmu_;
  absl::CondVar qcv_, idle_cv_;
  std::deque<Job> writes_ ABSL_GUARDED_BY(qmu_);
  std::deque<Job> prefetches_ ABSL_GUARDED_BY(qmu_);
  // Keys queued or being read by a prefetcher: a Get of one waits for it instead of reading it twice.
  absl::flat_hash_set<std::string> prefetching_ ABSL_GUARDED_BY(qmu_);
  absl::CondVar prefetch_cv_;
  int64_t in_flight_ ABSL_GUARDED_BY(qmu_) = 0;
  bool stop_ ABSL_GUARDED_BY(qmu_) = false;
  std::thread writer_;
  std::vector<std::thread> prefetchers_;

  absl::Mutex sub_mu_;
  std::vector<std::pair<int64_t, std::function<void(const StoreEvent&)>>> subscribers_
      ABSL_GUARDED_BY(sub_mu_);
  int64_t next_sub_ ABSL_GUARDED_BY(sub_mu_) = 0;

  mutable std::atomic<int64_t> lookups_{0}, lookup_hit_blocks_{0}, gets_{0}, get_hits_device_{0},
      get_hits_host_{0}, get_hits_disk_{0}, get_misses_{0}, puts_{0}, put_drops_{0}, put_errors_{0},
      prefetched_{0}, evicted_host_{0}, evicted_disk_{0}, checksum_failures_{0};
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_TIERED_STORE_H_
