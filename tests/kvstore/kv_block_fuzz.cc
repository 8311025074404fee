// Fuzzes KV block decoding (blocks arrive from peers and disk). Each input is decoded twice: as raw
// bytes (almost always a checksum miss), and spliced into a valid block with its checksum recomputed,
// so the parser behind the checksum (version, fingerprint, layer table, sizes, state length) is reached
// too. Decoding must return an error or a block that re-encodes to the same bytes; never crash.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kvstore/crc32c.h"
#include "kvstore/kv_block.h"

namespace {

using v4serve::kvstore::KvBlock;
using v4serve::kvstore::KvLayout;

const KvLayout& Layout() {
  static const KvLayout* layout = [] {
    auto* l = new KvLayout();
    l->model_fingerprint = 7;
    l->block_tokens = 8;
    l->layers = {{1, 2, 4, 2, v4serve::kvstore::KvDtype::kF32},
                 {3, 1, 4, 0, v4serve::kvstore::KvDtype::kF32}};
    return l;
  }();
  return *layout;
}

const std::string& ValidBlock() {
  static const std::string* bytes = [] {
    KvBlock b;
    b.block_hash = 99;
    b.block_index = 1;
    b.tokens = {1, 2, 3, 4, 5, 6, 7, 8};
    b.entries = {std::vector<float>(8, 0.5f), std::vector<float>(4, -1.0f)};
    b.indexer_keys = {std::vector<float>(4, 2.0f), {}};
    b.boundary_state = "state";
    return new std::string(*v4serve::kvstore::EncodeKvBlock(Layout(), b));
  }();
  return *bytes;
}

void Check(const std::string& bytes) {
  auto block = v4serve::kvstore::DecodeKvBlock(Layout(), bytes);
  if (!block.ok()) return;
  auto again = v4serve::kvstore::EncodeKvBlock(Layout(), *block);
  if (!again.ok() || *again != bytes) std::abort();  // A block that decodes must be exactly what encodes.
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Check(std::string(reinterpret_cast<const char*>(data), size));
  if (size < 2) return 0;
  std::string spliced = ValidBlock();
  const size_t at = data[0] % spliced.size();
  const size_t keep = data[1] % (spliced.size() + 16);
  spliced.replace(at, std::min(size - 2, spliced.size() - at), reinterpret_cast<const char*>(data + 2),
                  std::min(size - 2, spliced.size() - at));
  spliced.resize(std::max<size_t>(keep, 4));
  const uint32_t crc = v4serve::kvstore::Crc32c(0, spliced.data(), spliced.size() - 4);
  std::memcpy(spliced.data() + spliced.size() - 4, &crc, 4);
  Check(spliced);
  return 0;
}
