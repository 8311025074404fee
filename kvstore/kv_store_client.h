// The interface between an engine and the node's tiered KV store (host memory + RocksDB on disk), so
// that engine/ links no RocksDB and no gRPC: `TieredStore` (tiered_store.h) implements it in-process,
// `GrpcKvStoreClient` (kvstore_service.h) implements it over the `v4serve kvstore` service.
//
// What the store keeps per block (docs/KV_STORE.md):
//   block bytes: the one KV block format (kv_block.h) WITHOUT boundary state (compressed entries,
//                indexer keys, tokens), CRC-32C trailer included;
//   window state: optional, a framed record (store_format.h) with the sequence's sliding-window state at
//                the block's end boundary: present at every block (SWA policy "full"), at checkpoints
//                ("periodic") or never ("zero").
// Both are addressed by (model fingerprint, tenant salt, block hash); every read verifies checksums and
// a mismatch is a miss (plus a metric), never bytes handed back.
//
// Thread-safe implementations; PutAsync never blocks (write-behind: a full queue drops the write and
// counts it).
#ifndef V4SERVE_KVSTORE_KV_STORE_CLIENT_H_
#define V4SERVE_KVSTORE_KV_STORE_CLIENT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace v4serve::kvstore {

// Which model and tenant a block belongs to (both are also folded into the block hash).
struct StoreScope {
  uint64_t model_fingerprint = 0;
  uint64_t tenant_salt = 0;
  bool operator==(const StoreScope&) const = default;
};

enum class Tier : int { kNone = 0, kDevice = 1, kHost = 2, kDisk = 3 };
const char* TierName(Tier t);

struct StoredBlock {
  uint64_t hash = 0;
  int32_t index = 0;         // Block position in its sequence.
  std::string block;         // kv_block.h bytes without boundary state.
  std::string window_state;  // store_format.h window-state record; empty when none is kept.

  int64_t bytes() const { return static_cast<int64_t>(block.size() + window_state.size()); }
};

struct LookupResult {
  int32_t matched = 0;                 // hashes[0..matched) are present (blocks; state may be absent).
  std::vector<Tier> tiers;             // Where each matched block was found.
  std::vector<bool> has_window_state;  // Whether a window-state checkpoint is stored for it.
};

class KvStoreClient {
 public:
  virtual ~KvStoreClient() = default;
  // The longest stored prefix of `hashes` (a block-hash chain). The store may start prefetching the
  // matched blocks (disk -> host) in the background so that the Gets that follow find them in memory.
  virtual absl::StatusOr<LookupResult> Lookup(const StoreScope& scope, absl::Span<const uint64_t> hashes) = 0;
  // One block, checksums verified. NOT_FOUND for a miss (including a block that failed verification).
  // `with_state`: also return the window-state record when one is stored.
  virtual absl::StatusOr<StoredBlock> Get(const StoreScope& scope, uint64_t hash, bool with_state) = 0;
  // Write-behind: queues the block and returns at once. false when it was dropped (queue full).
  virtual bool PutAsync(const StoreScope& scope, StoredBlock block) = 0;
  // Waits until every queued write is applied (tests, benches, shutdown).
  virtual void Flush() = 0;
};

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KV_STORE_CLIENT_H_
