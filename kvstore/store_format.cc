#include "kvstore/store_format.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstore/crc32c.h"
#include "kvstore/kv_block.h"

namespace v4serve::kvstore {
namespace {

void PutBe64(std::string* out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint64_t GetBe64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
template <typename T>
void PutLe(std::string* out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // Hosts are little-endian, like the format.
  out->append(b, sizeof(T));
}
template <typename T>
T GetLe(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

constexpr char kWsMagic[4] = {'V', '4', 'W', 'S'};
constexpr size_t kWsHeader = 4 + 2 + 2 + 8 + 8 + 4 + 8;

}  // namespace

const char* TierName(Tier t) {
  switch (t) {
    case Tier::kDevice:
      return "device";
    case Tier::kHost:
      return "host";
    case Tier::kDisk:
      return "disk";
    case Tier::kNone:
      break;
  }
  return "none";
}

std::string EncodeStoreKey(const StoreScope& scope, uint64_t hash) {
  std::string k;
  k.reserve(kStoreKeyBytes);
  k.push_back(static_cast<char>(kStoreKeyVersion));
  PutBe64(&k, scope.model_fingerprint);
  PutBe64(&k, scope.tenant_salt);
  PutBe64(&k, hash);
  return k;
}

absl::Status DecodeStoreKey(absl::string_view key, StoreScope* scope, uint64_t* hash) {
  if (key.size() != kStoreKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat("KV store key of ", key.size(), " bytes, want 25"));
  }
  if (static_cast<uint8_t>(key[0]) != kStoreKeyVersion) {
    return absl::InvalidArgumentError(absl::StrCat("KV store key version ",
                                                   static_cast<int>(static_cast<uint8_t>(key[0])), ", want ",
                                                   static_cast<int>(kStoreKeyVersion)));
  }
  scope->model_fingerprint = GetBe64(key.data() + 1);
  scope->tenant_salt = GetBe64(key.data() + 9);
  *hash = GetBe64(key.data() + 17);
  return absl::OkStatus();
}

absl::Status VerifyBlockBytes(absl::string_view bytes, uint64_t model_fingerprint, uint64_t hash) {
  // magic 4 | version 2 | flags 2 | fingerprint 8 | hash 8 ... | crc 4
  if (bytes.size() < 24 + 4) return absl::DataLossError("KV block too short");
  const uint32_t stored = GetLe<uint32_t>(bytes.data() + bytes.size() - 4);
  if (Crc32c(0, bytes.data(), bytes.size() - 4) != stored)
    return absl::DataLossError("KV block checksum mismatch");
  if (std::memcmp(bytes.data(), "V4KB", 4) != 0) return absl::DataLossError("not a KV block (bad magic)");
  if (GetLe<uint16_t>(bytes.data() + 4) != kKvBlockFormatVersion) {
    return absl::FailedPreconditionError("KV block of another format version");
  }
  if (GetLe<uint64_t>(bytes.data() + 8) != model_fingerprint) {
    return absl::FailedPreconditionError("KV block belongs to another model (fingerprint mismatch)");
  }
  if (GetLe<uint64_t>(bytes.data() + 16) != hash) {
    return absl::DataLossError("KV block stored under another block's hash");
  }
  return absl::OkStatus();
}

std::string EncodeWindowState(const WindowState& ws) {
  std::string out;
  out.reserve(kWsHeader + ws.state.size() + 4);
  out.append(kWsMagic, 4);
  PutLe<uint16_t>(&out, kWindowStateFormatVersion);
  PutLe<uint16_t>(&out, 0);
  PutLe<uint64_t>(&out, ws.model_fingerprint);
  PutLe<uint64_t>(&out, ws.hash);
  PutLe<uint32_t>(&out, static_cast<uint32_t>(ws.index));
  PutLe<uint64_t>(&out, ws.state.size());
  out.append(ws.state);
  PutLe<uint32_t>(&out, Crc32c(0, out.data(), out.size()));
  return out;
}

absl::StatusOr<WindowState> DecodeWindowState(absl::string_view bytes) {
  if (bytes.size() < kWsHeader + 4) return absl::DataLossError("window-state record too short");
  const uint32_t stored = GetLe<uint32_t>(bytes.data() + bytes.size() - 4);
  if (Crc32c(0, bytes.data(), bytes.size() - 4) != stored) {
    return absl::DataLossError("window-state record checksum mismatch");
  }
  if (std::memcmp(bytes.data(), kWsMagic, 4) != 0) return absl::DataLossError("not a window-state record");
  if (GetLe<uint16_t>(bytes.data() + 4) != kWindowStateFormatVersion) {
    return absl::FailedPreconditionError("window-state record of another format version");
  }
  WindowState ws;
  ws.model_fingerprint = GetLe<uint64_t>(bytes.data() + 8);
  ws.hash = GetLe<uint64_t>(bytes.data() + 16);
  ws.index = static_cast<int32_t>(GetLe<uint32_t>(bytes.data() + 24));
  const uint64_t len = GetLe<uint64_t>(bytes.data() + 28);
  if (len != bytes.size() - kWsHeader - 4)
    return absl::DataLossError("window-state length disagrees with its size");
  ws.state.assign(bytes.data() + kWsHeader, len);
  return ws;
}

}  // namespace v4serve::kvstore
