// CRC-32C (Castagnoli), the checksum of every KV block (kv_block.h). Debian 12's Abseil (20220623)
// predates absl/crc, so this is a small table-driven implementation (software; ~1 GB/s is plenty for
// host-side block checks).
//
// Thread-safety: pure functions.
#ifndef V4SERVE_KVSTORE_CRC32C_H_
#define V4SERVE_KVSTORE_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace v4serve::kvstore {

// Extends `crc` (0 for a fresh checksum) over `data[0, n)`. Crc32c(0, "123456789", 9) == 0xE3069283.
uint32_t Crc32c(uint32_t crc, const void* data, size_t n);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_CRC32C_H_
