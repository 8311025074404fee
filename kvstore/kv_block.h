// The KV block format (docs/ARCHITECTURE.md "KV layout"): one 128-token block of one sequence, the same
// bytes in host memory, on the wire and on disk.
//
// A block holds, per compressed layer of its layer set, the compressed entries the block's tokens
// produced (CSA: 128/4 entries plus the lightning indexer's keys; HCA: 128/ratio entries), the block's
// token ids (so a hash collision is detected, never served), and optionally the sequence's
// sliding-window state at the block's end boundary (the "full" SWA policy): opaque bytes owned by the
// model layer, which kvstore never interprets (kvstore does not depend on model/).
//
// Layout (little-endian):
//   magic "V4KB" | u16 format version | u16 flags | u64 model fingerprint | u64 block hash
//   | u32 block index | u32 block tokens | u32 layer count
//   | per layer: u32 layer id, u32 entries, u32 entry width, u32 indexer width, u32 dtype
//   | i32 tokens[block tokens]
//   | per layer: entries [entries, entry width], indexer keys [entries, indexer width] (dtype elements)
//   | u64 boundary-state length | boundary-state bytes
//   | u32 CRC-32C of everything before it
// Decoding checks the magic, version, fingerprint, layer set and every size against the caller's
// KvLayout before reading, and the checksum over the whole block: a corrupt or foreign block is a
// DATA_LOSS / FAILED_PRECONDITION error (a cache miss for the caller), never a crash or wrong data.
//
// Thread-safety: pure functions on values.
#ifndef V4SERVE_KVSTORE_KV_BLOCK_H_
#define V4SERVE_KVSTORE_KV_BLOCK_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace v4serve::kvstore {

inline constexpr uint16_t kKvBlockFormatVersion = 1;
inline constexpr int32_t kDefaultBlockTokens = 128;

// Element type of stored entries. The exact numeric mode stores FP32; the faithful mode's BF16 + FP8
// with scales will add its own value (a new dtype, same format version).
enum class KvDtype : uint32_t { kF32 = 0 };

struct KvLayerLayout {
  int32_t layer = 0;              // Layer id in the model.
  int32_t entries_per_block = 0;  // block_tokens / compress ratio.
  int32_t entry_width = 0;        // head_dim.
  int32_t indexer_width = 0;      // CSA: index_head_dim; 0 otherwise.
  KvDtype dtype = KvDtype::kF32;

  bool operator==(const KvLayerLayout&) const = default;
};

// What a block of one model looks like. Built once per model (engine/state_blocks.h does it from a
// ModelConfig) and validated once.
struct KvLayout {
  uint64_t model_fingerprint = 0;
  int32_t block_tokens = kDefaultBlockTokens;
  std::vector<KvLayerLayout> layers;  // The layer set, ascending layer ids.

  absl::Status Validate() const;
  // Bytes of the entries + indexer keys of one block (no header, no tokens, no boundary state).
  int64_t PayloadBytes() const;
};

// One decoded block. entries[i] / indexer_keys[i] belong to layout.layers[i].
struct KvBlock {
  uint64_t block_hash = 0;
  int32_t block_index = 0;      // Position of the block in its sequence (tokens / block_tokens).
  std::vector<int32_t> tokens;  // block_tokens ids.
  std::vector<std::vector<float>> entries;
  std::vector<std::vector<float>> indexer_keys;
  std::string boundary_state;  // Empty when the state at the end boundary was not kept.

  bool operator==(const KvBlock&) const = default;
};

// Encodes `block`; INVALID_ARGUMENT when its sizes disagree with `layout`.
absl::StatusOr<std::string> EncodeKvBlock(const KvLayout& layout, const KvBlock& block);

// Decodes and verifies `bytes` against `layout` (fingerprint included). DATA_LOSS for truncated,
// malformed or checksum-failing bytes; FAILED_PRECONDITION for a block of another model, layer set or
// format version.
absl::StatusOr<KvBlock> DecodeKvBlock(const KvLayout& layout, absl::string_view bytes);

// The payload (every layer's entries, then its indexer keys, in layout order: the block minus header,
// tokens, boundary state and checksum) inside `bytes`, which DecodeKvBlock accepted as `block`: a view into
// `bytes`. A device KV cache whose pages use this layout takes it with one copy
// (model/cuda/device_state_cache.h).
absl::string_view KvBlockPayload(const KvLayout& layout, absl::string_view bytes, const KvBlock& block);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KV_BLOCK_H_
