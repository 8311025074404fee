#include "kvstore/kv_block.h"

#include <random>

#include "gtest/gtest.h"
#include "kvstore/block_pool.h"
#include "kvstore/crc32c.h"
#include "kvstore/prefix_cache.h"

namespace v4serve::kvstore {
namespace {

KvLayout TestLayout() {
  KvLayout l;
  l.model_fingerprint = 0x1234;
  l.block_tokens = 128;
  l.layers = {{1, 32, 8, 4, KvDtype::kF32}, {2, 8, 8, 0, KvDtype::kF32}};
  return l;
}

KvBlock TestBlock(const KvLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1, 1);
  KvBlock b;
  b.block_hash = 77;
  b.block_index = 3;
  for (int i = 0; i < layout.block_tokens; ++i) b.tokens.push_back(static_cast<int32_t>(rng() % 500));
  for (const KvLayerLayout& l : layout.layers) {
    b.entries.emplace_back(static_cast<size_t>(l.entries_per_block * l.entry_width));
    b.indexer_keys.emplace_back(static_cast<size_t>(l.entries_per_block * l.indexer_width));
    for (float& x : b.entries.back()) x = u(rng);
    for (float& x : b.indexer_keys.back()) x = u(rng);
  }
  b.boundary_state = "swa-state-bytes";
  return b;
}

TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c(0, "123456789", 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(0, "", 0), 0u);
  EXPECT_EQ(Crc32c(0, std::string(32, '\0').data(), 32), 0x8A9136AAu);  // RFC 3720 B.4.
  // Incremental equals one-shot.
  EXPECT_EQ(Crc32c(Crc32c(0, "12345", 5), "6789", 4), 0xE3069283u);
}

TEST(KvBlockTest, RoundTripsWithAndWithoutState) {
  const KvLayout layout = TestLayout();
  ASSERT_TRUE(layout.Validate().ok());
  KvBlock b = TestBlock(layout, 1);
  absl::StatusOr<std::string> bytes = EncodeKvBlock(layout, b);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<KvBlock> back = DecodeKvBlock(layout, *bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, b);
  b.boundary_state.clear();
  bytes = EncodeKvBlock(layout, b);
  ASSERT_TRUE(bytes.ok());
  back = DecodeKvBlock(layout, *bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, b);
}

// The payload view is every layer's entries then indexer keys, in layout order, byte for byte (what a
// device KV page holds), with and without a boundary state behind it.
TEST(KvBlockTest, PayloadIsTheLayersEntriesAndKeysInOrder) {
  const KvLayout layout = TestLayout();
  for (const bool with_state : {true, false}) {
    KvBlock b = TestBlock(layout, 5);
    if (!with_state) b.boundary_state.clear();
    absl::StatusOr<std::string> bytes = EncodeKvBlock(layout, b);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    absl::StatusOr<KvBlock> back = DecodeKvBlock(layout, *bytes);
    ASSERT_TRUE(back.ok()) << back.status();
    std::string want;
    for (size_t i = 0; i < layout.layers.size(); ++i) {
      want.append(reinterpret_cast<const char*>(b.entries[i].data()), b.entries[i].size() * sizeof(float));
      want.append(reinterpret_cast<const char*>(b.indexer_keys[i].data()),
                  b.indexer_keys[i].size() * sizeof(float));
    }
    ASSERT_EQ(static_cast<int64_t>(want.size()), layout.PayloadBytes());
    EXPECT_EQ(KvBlockPayload(layout, *bytes, *back), want) << "with state " << with_state;
  }
}

TEST(KvBlockTest, EveryFlippedByteAndEveryTruncationIsAnErrorNotACrash) {
  const KvLayout layout = TestLayout();
  const std::string good = *EncodeKvBlock(layout, TestBlock(layout, 2));
  for (size_t i = 0; i < good.size(); i += 7) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x5A);
    EXPECT_EQ(DecodeKvBlock(layout, bad).status().code(), absl::StatusCode::kDataLoss) << i;
  }
  for (size_t n = 0; n < good.size(); n += 13) {
    EXPECT_FALSE(DecodeKvBlock(layout, good.substr(0, n)).ok()) << n;
  }
}

TEST(KvBlockTest, ForeignModelOrLayerSetIsRejected) {
  const KvLayout layout = TestLayout();
  const std::string bytes = *EncodeKvBlock(layout, TestBlock(layout, 3));
  KvLayout other = layout;
  other.model_fingerprint = 99;
  EXPECT_EQ(DecodeKvBlock(other, bytes).status().code(), absl::StatusCode::kFailedPrecondition);
  other = layout;
  other.layers[1].entries_per_block = 4;
  EXPECT_EQ(DecodeKvBlock(other, bytes).status().code(), absl::StatusCode::kFailedPrecondition);
  KvBlock wrong = TestBlock(layout, 4);
  wrong.entries[0].pop_back();
  EXPECT_EQ(EncodeKvBlock(layout, wrong).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BlockPoolTest, RefcountsShareAndFreeBlocks) {
  BlockPool pool(3);
  BlockId a = *pool.Allocate(), b = *pool.Allocate(), c = *pool.Allocate();
  EXPECT_EQ(pool.blocks_free(), 0);
  EXPECT_EQ(pool.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(pool.Ref(a).ok());  // A second sequence shares block a.
  ASSERT_TRUE(pool.Put(a, "xyz").ok());
  ASSERT_TRUE(pool.Unref(a).ok());
  EXPECT_EQ(pool.blocks_free(), 0);  // Still held by its other owner.
  EXPECT_EQ(*pool.Get(a), "xyz");
  ASSERT_TRUE(pool.Unref(a).ok());
  EXPECT_EQ(pool.blocks_free(), 1);
  EXPECT_EQ(pool.bytes_stored(), 0);
  EXPECT_EQ(pool.Unref(a).code(), absl::StatusCode::kFailedPrecondition);  // Double free is an error.
  EXPECT_EQ(pool.Ref(a).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool.Get(b).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*pool.Allocate(), a);
  ASSERT_TRUE(pool.Unref(b).ok());
  ASSERT_TRUE(pool.Unref(c).ok());
  EXPECT_EQ(pool.blocks_used(), 1);
}

TEST(PrefixCacheTest, HashChainDependsOnPrefixModelAndTenant) {
  std::vector<int32_t> t(300);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>(i % 97);
  std::vector<BlockHash> h = BlockHashChain(t, 128, 1, 0);
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h, BlockHashChain(t, 128, 1, 0));  // Deterministic.
  EXPECT_NE(h[0], BlockHashChain(t, 128, 2, 0)[0]);
  EXPECT_NE(h[0], BlockHashChain(t, 128, 1, 5)[0]);
  std::vector<int32_t> u = t;
  u[0] = 1000;  // Change in block 0 changes block 1's hash too (a chain, not per block).
  EXPECT_NE(BlockHashChain(u, 128, 1, 0)[1], h[1]);
  u = t;
  u[200] = 1000;
  EXPECT_EQ(BlockHashChain(u, 128, 1, 0)[0], h[0]);
  EXPECT_NE(BlockHashChain(u, 128, 1, 0)[1], h[1]);
}

TEST(PrefixCacheTest, AcquireLongestPrefixAndEvictOnlyUnreferencedLru) {
  BlockPool pool(4);
  PrefixCache cache(&pool);
  BlockId b0 = *pool.Allocate(), b1 = *pool.Allocate(), b2 = *pool.Allocate();
  EXPECT_TRUE(cache.Insert(10, b0));
  EXPECT_TRUE(cache.Insert(11, b1));
  EXPECT_TRUE(cache.Insert(20, b2));
  EXPECT_FALSE(cache.Insert(10, b2));  // Already cached.
  // The sequences finish: only the cache holds them.
  for (BlockId b : {b0, b1, b2}) ASSERT_TRUE(pool.Unref(b).ok());
  EXPECT_EQ(cache.evictable(), 3);
  std::vector<BlockHash> want = {10, 11, 12};
  std::vector<BlockId> got = cache.Acquire(want);
  EXPECT_EQ(got, (std::vector<BlockId>{b0, b1}));
  EXPECT_EQ(pool.refcount(b0), 2);
  // Referenced blocks are never evicted; the unreferenced one (20) goes first.
  EXPECT_EQ(cache.Evict(3), 1);
  EXPECT_EQ(cache.size(), 2);
  for (BlockId b : got) ASSERT_TRUE(pool.Unref(b).ok());
  EXPECT_EQ(cache.Evict(1), 1);
  EXPECT_EQ(cache.Acquire(want).size(), 0u);  // 10 was least recently used... and evicted first.
  EXPECT_EQ(cache.size(), 1);
  EXPECT_EQ(pool.blocks_free(), 3);
}

}  // namespace
}  // namespace v4serve::kvstore
