#include "kvstore/tiered_store.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/store_format.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/write_batch.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::kvstore {
namespace {

int64_t SizeOf(const StoredBlock& b) { return static_cast<int64_t>(b.block.size() + b.window_state.size()); }

// meta CF value of a block: u64 block bytes | u64 state bytes | u32 index | u64 write sequence.
std::string EncodeMeta(int64_t block_bytes, int64_t state_bytes, int32_t index, uint64_t seq) {
  std::string out(28, '\0');
  const uint64_t a = static_cast<uint64_t>(block_bytes), b = static_cast<uint64_t>(state_bytes);
  const uint32_t i = static_cast<uint32_t>(index);
  std::memcpy(out.data(), &a, 8);
  std::memcpy(out.data() + 8, &b, 8);
  std::memcpy(out.data() + 16, &i, 4);
  std::memcpy(out.data() + 20, &seq, 8);
  return out;
}
struct Meta {
  int64_t block_bytes, state_bytes;
  int32_t index;
  uint64_t seq;
};
bool DecodeMeta(const rocksdb::Slice& v, Meta* m) {
  if (v.size() != 28) return false;
  uint64_t a = 0, b = 0;
  uint32_t i = 0;
  std::memcpy(&a, v.data(), 8);
  std::memcpy(&b, v.data() + 8, 8);
  std::memcpy(&i, v.data() + 16, 4);
  std::memcpy(&m->seq, v.data() + 20, 8);
  m->block_bytes = static_cast<int64_t>(a);
  m->state_bytes = static_cast<int64_t>(b);
  m->index = static_cast<int32_t>(i);
  return true;
}

constexpr char kFormatKey[] = "format";  // meta CF: the store's format record (not a 25-byte block key).
constexpr char kFormatValue[] = "v4serve-kvstore 1";
enum Cf { kDefaultCf = 0, kBlocksCf = 1, kStateCf = 2, kMetaCf = 3 };

absl::Status FromRocks(const rocksdb::Status& st, absl::string_view what) {
  if (st.ok()) return absl::OkStatus();
  if (st.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, ": ", st.ToString()));
  if (st.IsCorruption()) return absl::DataLossError(absl::StrCat(what, ": ", st.ToString()));
  return absl::UnavailableError(absl::StrCat(what, ": ", st.ToString()));
}

}  // namespace

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
  const int64_t size = SizeOf(*block);
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

// ------------------------------------------------------------------------------------------------ disk

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(const DiskTierOptions& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("disk tier: a directory is required");
  if (options.capacity_bytes <= 0) return absl::InvalidArgumentError("disk tier: capacity must be positive");
  std::error_code ec;
  if (!options.read_only) {
    std::filesystem::create_directories(options.path, ec);
    if (ec) {
      return absl::PermissionDeniedError(absl::StrCat("cannot create ", options.path, ": ", ec.message()));
    }
  } else if (!std::filesystem::exists(std::filesystem::path(options.path) / "CURRENT", ec)) {
    return absl::NotFoundError(absl::StrCat("no KV store at ", options.path));
  }
  std::unique_ptr<DiskTier> t(new DiskTier(options));
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  // A crash (kill -9) loses at most the unsynced tail of the WAL; recovery stops at the first bad
  // record instead of refusing to open.
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  db_options.paranoid_checks = true;
  rocksdb::ColumnFamilyOptions blocks_cf;
  blocks_cf.enable_blob_files = options.blob_files;
  blocks_cf.min_blob_size = options.min_blob_bytes;
  blocks_cf.enable_blob_garbage_collection = true;
  blocks_cf.blob_compression_type = rocksdb::kNoCompression;  // FP32 entries barely compress.
  blocks_cf.write_buffer_size = 32 << 20;                     // Flushes (and blob files) every 32 MiB.
  rocksdb::ColumnFamilyOptions state_cf = blocks_cf;
  rocksdb::ColumnFamilyOptions meta_cf;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {"blocks", blocks_cf},
      {"window_state", state_cf},
      {"meta", meta_cf}};
  rocksdb::DB* raw = nullptr;
  rocksdb::Status st = options.read_only
                           ? rocksdb::DB::OpenForReadOnly(db_options, options.path, cfs, &t->handles_, &raw)
                           : rocksdb::DB::Open(db_options, options.path, cfs, &t->handles_, &raw);
  if (!st.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot open KV store at ", options.path, ": ", st.ToString()));
  }
  t->db_.reset(raw);
  std::string format;
  st = t->db_->Get(rocksdb::ReadOptions(), t->handles_[kMetaCf], kFormatKey, &format);
  if (st.IsNotFound() && !options.read_only) {
    st = t->db_->Put(rocksdb::WriteOptions(), t->handles_[kMetaCf], kFormatKey, kFormatValue);
    format = kFormatValue;
  }
  if (!st.ok() && !st.IsNotFound()) return FromRocks(st, "reading the store's format record");
  if (st.ok() && format != kFormatValue) {
    return absl::FailedPreconditionError(absl::StrCat("KV store at ", options.path, " has format '", format,
                                                      "', this build reads '", kFormatValue, "'"));
  }
  RETURN_IF_ERROR(t->RebuildIndex());
  return t;
}

DiskTier::DiskTier(DiskTierOptions options) : options_(std::move(options)) {}

DiskTier::~DiskTier() {
  if (db_ == nullptr) return;
  for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h).PermitUncheckedError();
  rocksdb::Status st = db_->Close();
  if (!st.ok()) {
    V4LOG(WARNING).With("status", st.ToString()) << "closing the KV store";
  }
}

absl::Status DiskTier::RebuildIndex() {
  struct Row {
    std::string key;
    Meta meta;
  };
  std::vector<Row> rows;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[kMetaCf]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (it->key().size() != kStoreKeyBytes) continue;  // The format record.
    Row r;
    r.key = it->key().ToString();
    if (!DecodeMeta(it->value(), &r.meta)) {
      V4LOG(WARNING) << "KV store: malformed meta record skipped";
      continue;
    }
    rows.push_back(std::move(r));
  }
  if (!it->status().ok()) return FromRocks(it->status(), "rebuilding the KV store index");
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.meta.seq < b.meta.seq; });
  absl::MutexLock l(&mu_);
  for (Row& r : rows) {
    lru_.push_back(r.key);
    index_[r.key] = IndexEntry{r.meta.block_bytes, r.meta.state_bytes, std::prev(lru_.end())};
    bytes_ += r.meta.block_bytes + r.meta.state_bytes;
    next_seq_ = std::max(next_seq_, r.meta.seq + 1);
  }
  return absl::OkStatus();
}

bool DiskTier::Contains(const std::string& key, bool* has_state) const {
  absl::MutexLock l(&mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return false;
  if (has_state != nullptr) *has_state = it->second.state_bytes > 0;
  return true;
}

void DiskTier::DropLocked(const std::string& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return;
  bytes_ -= it->second.block_bytes + it->second.state_bytes;
  lru_.erase(it->second.lru);
  index_.erase(it);
}

absl::Status DiskTier::DeleteFromDb(const std::string& key) {
  if (options_.read_only) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  batch.Delete(handles_[kBlocksCf], key);
  batch.Delete(handles_[kStateCf], key);
  batch.Delete(handles_[kMetaCf], key);
  return FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), "deleting a KV block");
}

absl::StatusOr<StoredBlock> DiskTier::Get(const std::string& key, bool with_state) {
  bool has_state = false;
  {
    absl::MutexLock l(&mu_);
    auto it = index_.find(key);
    if (it == index_.end()) return absl::NotFoundError("block not on disk");
    has_state = it->second.state_bytes > 0;
    lru_.splice(lru_.end(), lru_, it->second.lru);
  }
  StoreScope scope;
  uint64_t hash = 0;
  RETURN_IF_ERROR(DecodeStoreKey(key, &scope, &hash));
  // Our CRC-32C over the whole block (and the header's hash and fingerprint, checked against the key)
  // is verified below on every read, end to end. RocksDB's own per-record checksum would verify the
  // same bytes a second time, with the portable software CRC of distribution builds (the largest cost
  // of a disk read in bench/kvstore_bench.cc), so it is skipped on this path.
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;
  StoredBlock out;
  out.hash = hash;
  rocksdb::PinnableSlice value;
  rocksdb::Status st = db_->Get(ro, handles_[kBlocksCf], key, &value);
  absl::Status bad;
  if (!st.ok()) {
    bad = FromRocks(st, "reading a KV block");
  } else {
    out.block.assign(value.data(), value.size());
    bad = VerifyBlockBytes(out.block, scope.model_fingerprint, hash);
    if (bad.ok()) {
      uint32_t index = 0;
      std::memcpy(&index, out.block.data() + 24, 4);
      out.index = static_cast<int32_t>(index);
    }
  }
  if (bad.ok() && with_state && has_state) {
    std::string state;
    st = db_->Get(ro, handles_[kStateCf], key, &state);
    if (!st.ok()) {
      bad = FromRocks(st, "reading a window state");
    } else {
      absl::StatusOr<WindowState> ws = DecodeWindowState(state);
      if (!ws.ok()) {
        bad = ws.status();
      } else if (ws->hash != hash || ws->model_fingerprint != scope.model_fingerprint) {
        bad = absl::DataLossError("window state stored under another block's key");
      } else {
        out.window_state = std::move(state);
      }
    }
  }
  if (!bad.ok()) {
    if (bad.code() == absl::StatusCode::kUnavailable) return bad;  // An I/O problem, not the data.
    checksum_failures_.fetch_add(1);
    V4LOG(WARNING).With("status", bad.ToString()) << "KV store: block failed verification; dropped (a miss)";
    {
      absl::MutexLock l(&mu_);
      DropLocked(key);
    }
    DeleteFromDb(key).IgnoreError();
    return absl::NotFoundError(absl::StrCat("block failed verification: ", bad.message()));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> DiskTier::Put(const std::string& key, const StoredBlock& block) {
  if (options_.read_only) return absl::FailedPreconditionError("KV store opened read-only");
  const int64_t size = SizeOf(block);
  if (size > options_.capacity_bytes) return absl::ResourceExhaustedError("block larger than the disk tier");
  std::vector<std::string> evicted;
  uint64_t seq = 0;
  {
    absl::MutexLock l(&mu_);
    seq = next_seq_++;
    int64_t old = 0;
    if (auto it = index_.find(key); it != index_.end()) old = it->second.block_bytes + it->second.state_bytes;
    for (auto it = lru_.begin(); bytes_ - old + size > options_.capacity_bytes && it != lru_.end();) {
      if (*it == key) {
        ++it;
        continue;
      }
      const std::string victim = *it;
      ++it;
      evicted.push_back(victim);
      DropLocked(victim);
    }
  }
  rocksdb::WriteBatch batch;
  for (const std::string& v : evicted) {
    batch.Delete(handles_[kBlocksCf], v);
    batch.Delete(handles_[kStateCf], v);
    batch.Delete(handles_[kMetaCf], v);
  }
  batch.Put(handles_[kBlocksCf], key, block.block);
  if (!block.window_state.empty()) {
    batch.Put(handles_[kStateCf], key, block.window_state);
  } else {
    batch.Delete(handles_[kStateCf], key);
  }
  batch.Put(handles_[kMetaCf], key,
            EncodeMeta(static_cast<int64_t>(block.block.size()),
                       static_cast<int64_t>(block.window_state.size()), block.index, seq));
  // One atomic batch: after a crash the block, its state and its meta record are all there or none is.
  absl::Status w = FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), "writing a KV block");
  if (!w.ok()) return w;
  absl::MutexLock l(&mu_);
  DropLocked(key);
  lru_.push_back(key);
  index_[key] = IndexEntry{static_cast<int64_t>(block.block.size()),
                           static_cast<int64_t>(block.window_state.size()), std::prev(lru_.end())};
  bytes_ += size;
  return evicted;
}

absl::StatusOr<std::pair<int64_t, int64_t>> DiskTier::Verify() {
  std::vector<std::string> keys;
  {
    absl::MutexLock l(&mu_);
    keys.reserve(index_.size());
    for (const auto& [k, e] : index_) keys.push_back(k);
  }
  int64_t good = 0, bad = 0;
  absl::flat_hash_map<std::string, bool> seen;
  for (const std::string& k : keys) {
    seen[k] = true;
    absl::StatusOr<StoredBlock> b = Get(k, /*with_state=*/true);
    if (b.ok()) {
      ++good;
    } else if (b.status().code() == absl::StatusCode::kNotFound) {
      ++bad;
    } else {
      return b.status();
    }
  }
  // Blocks without meta (cannot happen with atomic batches) would be invisible; count them as bad too.
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[kBlocksCf]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (!seen.contains(it->key().ToString())) ++bad;
  }
  if (!it->status().ok()) return FromRocks(it->status(), "scanning KV blocks");
  return std::make_pair(good, bad);
}

absl::Status DiskTier::Compact() {
  if (options_.read_only) return absl::FailedPreconditionError("KV store opened read-only");
  rocksdb::CompactRangeOptions o;
  o.bottommost_level_compaction = rocksdb::BottommostLevelCompaction::kForce;
  for (rocksdb::ColumnFamilyHandle* h : handles_) {
    absl::Status s = FromRocks(db_->CompactRange(o, h, nullptr, nullptr), "compacting");
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

DiskTierStats DiskTier::Stats() const {
  DiskTierStats s;
  absl::flat_hash_map<uint64_t, int64_t> per_model;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [k, e] : index_) {
      ++s.blocks;
      s.block_bytes += e.block_bytes;
      s.state_bytes += e.state_bytes;
      if (e.state_bytes > 0) ++s.window_states;
      StoreScope scope;
      uint64_t hash = 0;
      if (DecodeStoreKey(k, &scope, &hash).ok()) ++per_model[scope.model_fingerprint];
    }
  }
  s.blocks_per_model.assign(per_model.begin(), per_model.end());
  std::sort(s.blocks_per_model.begin(), s.blocks_per_model.end());
  std::error_code ec;
  for (const auto& e : std::filesystem::recursive_directory_iterator(options_.path, ec)) {
    if (e.is_regular_file(ec)) s.bytes_on_disk += static_cast<int64_t>(e.file_size(ec));
  }
  return s;
}

int64_t DiskTier::blocks() const {
  absl::MutexLock l(&mu_);
  return static_cast<int64_t>(index_.size());
}

int64_t DiskTier::index_bytes() const {
  absl::MutexLock l(&mu_);
  return bytes_;
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
    if (disk_ != nullptr) {
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
