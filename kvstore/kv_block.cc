#include "kvstore/kv_block.h"

#include <cstring>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "kvstore/crc32c.h"

namespace v4serve::kvstore {
namespace {

constexpr char kMagic[4] = {'V', '4', 'K', 'B'};

class Writer {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // Host is little-endian (x86-64, aarch64), as the format.
    out_.append(b, sizeof(T));
  }
  void Bytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string& out() { return out_; }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(absl::string_view b) : b_(b) {}
  template <typename T>
  absl::Status Get(T* v, const char* what) {
    if (b_.size() - pos_ < sizeof(T))
      return absl::DataLossError(absl::StrCat("KV block truncated at ", what));
    std::memcpy(v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status Bytes(void* dst, size_t n, const char* what) {
    if (b_.size() - pos_ < n) return absl::DataLossError(absl::StrCat("KV block truncated at ", what));
    if (n > 0) std::memcpy(dst, b_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  size_t pos() const { return pos_; }

 private:
  absl::string_view b_;
  size_t pos_ = 0;
};

#define KV_RETURN_IF_ERROR(expr) \
  do {                           \
    absl::Status _st = (expr);   \
    if (!_st.ok()) return _st;   \
  } while (0)

}  // namespace

absl::Status KvLayout::Validate() const {
  if (block_tokens <= 0) return absl::InvalidArgumentError("KvLayout.block_tokens must be positive");
  int32_t prev = -1;
  for (const KvLayerLayout& l : layers) {
    if (l.layer <= prev) return absl::InvalidArgumentError("KvLayout.layers must have ascending layer ids");
    prev = l.layer;
    if (l.entries_per_block <= 0 || l.entry_width <= 0 || l.indexer_width < 0) {
      return absl::InvalidArgumentError(absl::StrCat("KvLayout layer ", l.layer, " has a non-positive size"));
    }
    if (l.dtype != KvDtype::kF32) return absl::InvalidArgumentError("KvLayout: unsupported dtype");
  }
  return absl::OkStatus();
}

int64_t KvLayout::PayloadBytes() const {
  int64_t n = 0;
  for (const KvLayerLayout& l : layers) {
    n += int64_t{l.entries_per_block} * (l.entry_width + l.indexer_width) *
         static_cast<int64_t>(sizeof(float));
  }
  return n;
}

absl::StatusOr<std::string> EncodeKvBlock(const KvLayout& layout, const KvBlock& block) {
  if (block.tokens.size() != static_cast<size_t>(layout.block_tokens)) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block has ", block.tokens.size(), " tokens, layout wants ", layout.block_tokens));
  }
  if (block.entries.size() != layout.layers.size() || block.indexer_keys.size() != layout.layers.size()) {
    return absl::InvalidArgumentError("KV block layer count differs from the layout");
  }
  for (size_t i = 0; i < layout.layers.size(); ++i) {
    const KvLayerLayout& l = layout.layers[i];
    if (block.entries[i].size() != static_cast<size_t>(l.entries_per_block) * l.entry_width ||
        block.indexer_keys[i].size() != static_cast<size_t>(l.entries_per_block) * l.indexer_width) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV block layer ", l.layer, " sizes differ from the layout"));
    }
  }
  Writer w;
  w.Bytes(kMagic, 4);
  w.Put<uint16_t>(kKvBlockFormatVersion);
  w.Put<uint16_t>(block.boundary_state.empty() ? 0 : 1);
  w.Put<uint64_t>(layout.model_fingerprint);
  w.Put<uint64_t>(block.block_hash);
  w.Put<uint32_t>(static_cast<uint32_t>(block.block_index));
  w.Put<uint32_t>(static_cast<uint32_t>(layout.block_tokens));
  w.Put<uint32_t>(static_cast<uint32_t>(layout.layers.size()));
  for (const KvLayerLayout& l : layout.layers) {
    w.Put<uint32_t>(static_cast<uint32_t>(l.layer));
    w.Put<uint32_t>(static_cast<uint32_t>(l.entries_per_block));
    w.Put<uint32_t>(static_cast<uint32_t>(l.entry_width));
    w.Put<uint32_t>(static_cast<uint32_t>(l.indexer_width));
    w.Put<uint32_t>(static_cast<uint32_t>(l.dtype));
  }
  w.Bytes(block.tokens.data(), block.tokens.size() * sizeof(int32_t));
  for (size_t i = 0; i < layout.layers.size(); ++i) {
    w.Bytes(block.entries[i].data(), block.entries[i].size() * sizeof(float));
    w.Bytes(block.indexer_keys[i].data(), block.indexer_keys[i].size() * sizeof(float));
  }
  w.Put<uint64_t>(block.boundary_state.size());
  w.Bytes(block.boundary_state.data(), block.boundary_state.size());
  const uint32_t crc = Crc32c(0, w.out().data(), w.out().size());
  w.Put<uint32_t>(crc);
  return std::move(w.out());
}

absl::StatusOr<KvBlock> DecodeKvBlock(const KvLayout& layout, absl::string_view bytes) {
  // The checksum first: every later check then reads bytes that were written as they are.
  if (bytes.size() < 4 + sizeof(uint32_t)) return absl::DataLossError("KV block too short");
  uint32_t stored_crc = 0;
  std::memcpy(&stored_crc, bytes.data() + bytes.size() - 4, 4);
  if (Crc32c(0, bytes.data(), bytes.size() - 4) != stored_crc) {
    return absl::DataLossError("KV block checksum mismatch");
  }
  Reader r(bytes.substr(0, bytes.size() - 4));
  char magic[4];
  KV_RETURN_IF_ERROR(r.Bytes(magic, 4, "magic"));
  if (std::memcmp(magic, kMagic, 4) != 0) return absl::DataLossError("not a KV block (bad magic)");
  uint16_t version = 0, flags = 0;
  KV_RETURN_IF_ERROR(r.Get(&version, "version"));
  if (version != kKvBlockFormatVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV block format version ", version, ", want ", kKvBlockFormatVersion));
  }
  KV_RETURN_IF_ERROR(r.Get(&flags, "flags"));
  if ((flags & ~uint16_t{1}) != 0) return absl::DataLossError("KV block has unknown flags");
  uint64_t fingerprint = 0;
  KV_RETURN_IF_ERROR(r.Get(&fingerprint, "fingerprint"));
  if (fingerprint != layout.model_fingerprint) {
    return absl::FailedPreconditionError("KV block belongs to another model (fingerprint mismatch)");
  }
  KvBlock block;
  uint32_t index = 0, block_tokens = 0, n_layers = 0;
  KV_RETURN_IF_ERROR(r.Get(&block.block_hash, "hash"));
  KV_RETURN_IF_ERROR(r.Get(&index, "block index"));
  KV_RETURN_IF_ERROR(r.Get(&block_tokens, "block tokens"));
  KV_RETURN_IF_ERROR(r.Get(&n_layers, "layer count"));
  block.block_index = static_cast<int32_t>(index);
  if (block_tokens != static_cast<uint32_t>(layout.block_tokens) || n_layers != layout.layers.size()) {
    return absl::FailedPreconditionError("KV block geometry differs from the layout");
  }
  for (const KvLayerLayout& want : layout.layers) {
    uint32_t v[5] = {};
    for (uint32_t& x : v) KV_RETURN_IF_ERROR(r.Get(&x, "layer table"));
    KvLayerLayout got{static_cast<int32_t>(v[0]), static_cast<int32_t>(v[1]), static_cast<int32_t>(v[2]),
                      static_cast<int32_t>(v[3]), static_cast<KvDtype>(v[4])};
    if (!(got == want)) return absl::FailedPreconditionError("KV block layer set differs from the layout");
  }
  block.tokens.resize(block_tokens);
  KV_RETURN_IF_ERROR(r.Bytes(block.tokens.data(), block_tokens * sizeof(int32_t), "tokens"));
  block.entries.resize(n_layers);
  block.indexer_keys.resize(n_layers);
  for (size_t i = 0; i < n_layers; ++i) {
    const KvLayerLayout& l = layout.layers[i];
    block.entries[i].resize(static_cast<size_t>(l.entries_per_block) * l.entry_width);
    block.indexer_keys[i].resize(static_cast<size_t>(l.entries_per_block) * l.indexer_width);
    KV_RETURN_IF_ERROR(r.Bytes(block.entries[i].data(), block.entries[i].size() * sizeof(float), "entries"));
    KV_RETURN_IF_ERROR(
        r.Bytes(block.indexer_keys[i].data(), block.indexer_keys[i].size() * sizeof(float), "indexer keys"));
  }
  uint64_t state_len = 0;
  KV_RETURN_IF_ERROR(r.Get(&state_len, "state length"));
  const size_t body = bytes.size() - 4;
  if (state_len != body - r.pos() - 0 || ((flags & 1) != 0) != (state_len > 0)) {
    return absl::DataLossError("KV block boundary-state length disagrees with its size");
  }
  block.boundary_state.resize(state_len);
  KV_RETURN_IF_ERROR(r.Bytes(block.boundary_state.data(), state_len, "boundary state"));
  return block;
}

absl::string_view KvBlockPayload(const KvLayout& layout, absl::string_view bytes, const KvBlock& block) {
  // What follows the payload: the boundary state's length, its bytes, the checksum.
  const size_t tail = sizeof(uint64_t) + block.boundary_state.size() + sizeof(uint32_t);
  const size_t payload = static_cast<size_t>(layout.PayloadBytes());
  return bytes.substr(bytes.size() - tail - payload, payload);
}

}  // namespace v4serve::kvstore
