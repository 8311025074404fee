// Bytes of the tiered KV store that are not the block format itself (docs/KV_STORE.md "Key layout"):
// RocksDB keys and the window-state record. Model-agnostic: kvstore never interprets the state bytes.
//
// Key (25 bytes, big-endian so that one model's and one tenant's blocks are contiguous):
//   u8 key format version (kStoreKeyVersion) | u64 model fingerprint | u64 tenant salt | u64 block hash
//
// Window-state record (little-endian, like the block format):
//   magic "V4WS" | u16 format version | u16 flags (0) | u64 model fingerprint | u64 block hash
//   | u32 block index | u64 state length | state bytes | u32 CRC-32C of everything before it
//
// Thread-safety: pure functions.
#ifndef V4SERVE_KVSTORE_STORE_FORMAT_H_
#define V4SERVE_KVSTORE_STORE_FORMAT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kvstore/kv_store_client.h"

namespace v4serve::kvstore {

inline constexpr uint8_t kStoreKeyVersion = 1;
inline constexpr uint16_t kWindowStateFormatVersion = 1;
inline constexpr size_t kStoreKeyBytes = 25;

std::string EncodeStoreKey(const StoreScope& scope, uint64_t hash);
// INVALID_ARGUMENT for a key of another length or version.
absl::Status DecodeStoreKey(absl::string_view key, StoreScope* scope, uint64_t* hash);

// Checks the CRC-32C trailer of block-format bytes (kv_block.h) and the header's magic, version and
// fingerprint, without a KvLayout. DATA_LOSS / FAILED_PRECONDITION like DecodeKvBlock.
absl::Status VerifyBlockBytes(absl::string_view bytes, uint64_t model_fingerprint, uint64_t hash);

struct WindowState {
  uint64_t model_fingerprint = 0;
  uint64_t hash = 0;
  int32_t index = 0;
  std::string state;  // Model-owned bytes (model::SerializeSequenceState of the boundary state).
};
std::string EncodeWindowState(const WindowState& ws);
// Verifies magic, version and checksum. DATA_LOSS for malformed or checksum-failing bytes.
absl::StatusOr<WindowState> DecodeWindowState(absl::string_view bytes);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_STORE_FORMAT_H_
