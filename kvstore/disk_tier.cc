// DiskTier (kvstore/tiered_store.h): the RocksDB tier of the tiered store. Blocks, window states and each
// block's meta record live in three column families; an in-memory index (rebuilt at Open) orders blocks by
// write sequence for eviction.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/store_format.h"
#include "kvstore/tiered_store.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/write_batch.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::kvstore {
namespace {

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
  // A prefix is read in chain order, which is write order within the blob files: let the kernel read
  // ahead (RocksDB's default advises random access on every file it opens).
  db_options.advise_random_on_open = false;
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
  const int64_t size = block.bytes();
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

std::vector<std::string> DiskTier::Keys() const {
  absl::MutexLock l(&mu_);
  return std::vector<std::string>(lru_.begin(), lru_.end());
}

int64_t DiskTier::index_bytes() const {
  absl::MutexLock l(&mu_);
  return bytes_;
}

}  // namespace v4serve::kvstore
