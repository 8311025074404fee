// The tiered KV store (kvstore/tiered_store.h) and its gRPC service (kvstore/kvstore_service.h):
// LRU eviction and pinning per tier, read-through from disk with promotion and prefetch, checksum
// failures as misses plus a metric, the index rebuilt after a restart, tenants and models kept apart,
// and the service's Get / Put / Lookup / Events with bad input rejected.
#include "kvstore/tiered_store.h"

#include <filesystem>
#include <thread>

#include "absl/synchronization/notification.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstore/kvstore_service.h"
#include "kvstore/prefix_cache.h"
#include "kvstore/store_format.h"
#include "rocksdb/db.h"
#include "tests/kvstore/kv_store_test_util.h"

namespace v4serve::kvstore {
namespace {

using testing::MakeBlock;
using testing::SmallLayout;

std::string TempDir(const std::string& name) {
  const char* t = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(t ? t : "/tmp") + "/v4serve_tiered_" + name + "_" + std::to_string(getpid());
  std::filesystem::remove_all(dir);
  return dir;
}

TEST(StoreFormatTest, KeysAndWindowStatesRoundTripAndRejectDamage) {
  const StoreScope scope{0x1122334455667788ull, 42};
  const std::string key = EncodeStoreKey(scope, 0xABCDull);
  ASSERT_EQ(key.size(), kStoreKeyBytes);
  StoreScope got;
  uint64_t hash = 0;
  ASSERT_TRUE(DecodeStoreKey(key, &got, &hash).ok());
  EXPECT_EQ(got, scope);
  EXPECT_EQ(hash, 0xABCDull);
  EXPECT_FALSE(DecodeStoreKey(key.substr(1), &got, &hash).ok());
  std::string v2 = key;
  v2[0] = 2;
  EXPECT_FALSE(DecodeStoreKey(v2, &got, &hash).ok());

  const std::string ws = EncodeWindowState({7, 9, 3, "state bytes"});
  auto back = DecodeWindowState(ws);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->state, "state bytes");
  EXPECT_EQ(back->index, 3);
  for (size_t i = 0; i < ws.size(); ++i) {
    std::string bad = ws;
    bad[i] ^= 0x10;
    EXPECT_FALSE(DecodeWindowState(bad).ok()) << i;
  }
  EXPECT_FALSE(DecodeWindowState(ws.substr(0, ws.size() - 1)).ok());

  const KvLayout layout = SmallLayout(7);
  const StoredBlock b = MakeBlock(layout, 9, 0, false);
  EXPECT_TRUE(VerifyBlockBytes(b.block, 7, 9).ok());
  EXPECT_EQ(VerifyBlockBytes(b.block, 8, 9).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(VerifyBlockBytes(b.block, 7, 10).ok());
  std::string flipped = b.block;
  flipped[flipped.size() / 2] ^= 1;
  EXPECT_EQ(VerifyBlockBytes(flipped, 7, 9).code(), absl::StatusCode::kDataLoss);
}

TEST(MemoryTierTest, EvictsLeastRecentlyUsedAndNeverPinned) {
  const KvLayout layout = SmallLayout(1);
  const StoredBlock proto = MakeBlock(layout, 1, 0, false);
  const int64_t size = static_cast<int64_t>(proto.block.size());
  MemoryTier tier(Tier::kHost, 3 * size);
  auto put = [&](const std::string& k) {
    bool inserted = false;
    auto evicted = tier.Put(k, std::make_shared<StoredBlock>(proto), &inserted);
    EXPECT_TRUE(inserted) << k;
    return evicted;
  };
  EXPECT_TRUE(put("a").empty());
  EXPECT_TRUE(put("b").empty());
  EXPECT_TRUE(put("c").empty());
  ASSERT_NE(tier.Get("a"), nullptr);  // a becomes most recent: b is the oldest.
  EXPECT_EQ(put("d"), std::vector<std::string>{"b"});
  tier.Pin("c");
  EXPECT_EQ(put("e"), std::vector<std::string>{"a"});  // c is older but pinned.
  EXPECT_TRUE(tier.Contains("c", nullptr));
  tier.Pin("d");
  tier.Pin("e");
  bool inserted = true;
  EXPECT_TRUE(tier.Put("f", std::make_shared<StoredBlock>(proto), &inserted).empty());
  EXPECT_FALSE(inserted);  // Everything is pinned: the new block does not fit.
  tier.Unpin("d");
  EXPECT_EQ(put("f"), std::vector<std::string>{"d"});
  EXPECT_EQ(tier.blocks(), 3);
  EXPECT_EQ(tier.bytes(), 3 * size);
}

TEST(TieredStoreTest, WriteBehindReadThroughRestartAndTenants) {
  const std::string dir = TempDir("basic");
  const KvLayout layout = SmallLayout(5);
  const StoreScope alice{5, 111}, bob{5, 222};
  TieredStoreOptions o;
  o.disk_path = dir;
  o.host_capacity_bytes = 1 << 20;
  std::vector<StoredBlock> blocks;
  for (int i = 0; i < 6; ++i) blocks.push_back(MakeBlock(layout, 1000 + i, i, i % 2 == 1));
  {
    auto store = TieredStore::Open(o);
    ASSERT_TRUE(store.ok()) << store.status();
    std::vector<StoreEvent> events;
    absl::Mutex mu;
    (*store)->Subscribe([&](const StoreEvent& e) {
      absl::MutexLock l(&mu);
      events.push_back(e);
    });
    for (const StoredBlock& b : blocks) EXPECT_TRUE((*store)->PutAsync(alice, b));
    (*store)->Flush();
    {
      absl::MutexLock l(&mu);
      ASSERT_EQ(events.size(), 6u);
      EXPECT_EQ(events[0].kind, StoreEvent::Kind::kStored);
      EXPECT_EQ(events[0].tier, Tier::kDisk);
      EXPECT_EQ(events[0].scope, alice);
      EXPECT_EQ(events[0].hashes, std::vector<uint64_t>{1000});
    }
    const uint64_t chain[] = {1000, 1001, 1002, 4242, 1004};
    auto found = (*store)->Lookup(alice, chain);
    ASSERT_TRUE(found.ok());
    EXPECT_EQ(found->matched, 3);
    EXPECT_EQ(found->tiers[0], Tier::kHost);
    EXPECT_EQ(found->has_window_state, (std::vector<bool>{false, true, false}));
    EXPECT_EQ((*store)->Lookup(bob, chain)->matched, 0);  // Another tenant's salt: nothing.
    auto got = (*store)->Get(alice, 1001, true);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(got->block, blocks[1].block);
    EXPECT_EQ(got->window_state, blocks[1].window_state);
    EXPECT_EQ((*store)->Get(alice, 1001, false)->window_state, "");
    EXPECT_EQ((*store)->Get(bob, 1001, true).status().code(), absl::StatusCode::kNotFound);
  }
  {
    // Restart: the index comes back from the meta column family; the host tier starts empty.
    auto store = TieredStore::Open(o);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ((*store)->stats().disk_blocks, 6);
    EXPECT_EQ((*store)->stats().host_blocks, 0);
    const uint64_t chain[] = {1000, 1001, 1002, 1003, 1004, 1005};
    auto found = (*store)->Lookup(alice, chain);
    ASSERT_TRUE(found.ok());
    EXPECT_EQ(found->matched, 6);
    EXPECT_EQ(found->tiers[0], Tier::kDisk);
    (*store)->Flush();  // Prefetch done: everything is in host memory now.
    EXPECT_EQ((*store)->stats().prefetched, 6);
    for (int i = 0; i < 6; ++i) {
      auto got = (*store)->Get(alice, 1000 + i, true);
      ASSERT_TRUE(got.ok()) << i;
      EXPECT_EQ(got->block, blocks[static_cast<size_t>(i)].block);
      EXPECT_EQ(got->window_state, blocks[static_cast<size_t>(i)].window_state);
      EXPECT_EQ(got->index, i);
    }
    EXPECT_EQ((*store)->stats().get_hits_host, 6);
    const DiskTierStats ds = (*store)->disk()->Stats();
    EXPECT_EQ(ds.window_states, 3);
    EXPECT_EQ(ds.block_bytes, 6 * static_cast<int64_t>(blocks[0].block.size()));
    EXPECT_GT(ds.bytes_on_disk, 0);
  }
  std::filesystem::remove_all(dir);
}

TEST(TieredStoreTest, CorruptBytesOnDiskAreAMissAndAMetricNeverServed) {
  const std::string dir = TempDir("corrupt");
  const KvLayout layout = SmallLayout(5);
  const StoreScope scope{5, 0};
  TieredStoreOptions o;
  o.disk_path = dir;
  {
    auto store = TieredStore::Open(o);
    ASSERT_TRUE(store.ok());
    for (int i = 0; i < 3; ++i) (*store)->PutAsync(scope, MakeBlock(layout, 10 + i, i, true));
    (*store)->Flush();
  }
  {
    // Damage block 11's bytes and block 12's window state behind the store's back.
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
        {rocksdb::kDefaultColumnFamilyName, {}}, {"blocks", {}}, {"window_state", {}}, {"meta", {}}};
    std::vector<rocksdb::ColumnFamilyHandle*> h;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::DBOptions(), dir, cfs, &h, &db).ok());
    std::string v;
    ASSERT_TRUE(db->Get({}, h[1], EncodeStoreKey(scope, 11), &v).ok());
    v[v.size() / 2] ^= 0x01;
    ASSERT_TRUE(db->Put({}, h[1], EncodeStoreKey(scope, 11), v).ok());
    ASSERT_TRUE(db->Get({}, h[2], EncodeStoreKey(scope, 12), &v).ok());
    v[40] ^= 0x01;
    ASSERT_TRUE(db->Put({}, h[2], EncodeStoreKey(scope, 12), v).ok());
    for (auto* x : h) ASSERT_TRUE(db->DestroyColumnFamilyHandle(x).ok());
    ASSERT_TRUE(db->Close().ok());
    delete db;
  }
  {
    DiskTierOptions d;
    d.path = dir;
    d.read_only = true;
    auto disk = DiskTier::Open(d);
    ASSERT_TRUE(disk.ok()) << disk.status();
    auto verified = (*disk)->Verify();
    ASSERT_TRUE(verified.ok());
    EXPECT_EQ(verified->first, 1);
    EXPECT_EQ(verified->second, 2);
  }
  auto store = TieredStore::Open(o);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->Get(scope, 10, true).ok());
  EXPECT_EQ((*store)->Get(scope, 11, true).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->Get(scope, 12, true).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*store)->stats().checksum_failures, 2);
  const uint64_t chain[] = {10, 11, 12};
  EXPECT_EQ((*store)->Lookup(scope, chain)->matched, 1);  // The bad ones were dropped.
  EXPECT_EQ((*store)->stats().disk_blocks, 1);
  std::filesystem::remove_all(dir);
}

TEST(TieredStoreTest, DiskCapacityEvictsOldestAndReportsIt) {
  const std::string dir = TempDir("evict");
  const KvLayout layout = SmallLayout(5);
  const StoreScope scope{5, 0};
  const StoredBlock proto = MakeBlock(layout, 1, 0, false);
  TieredStoreOptions o;
  o.disk_path = dir;
  o.host_capacity_bytes = 2 * static_cast<int64_t>(proto.block.size());
  o.disk_capacity_bytes = 4 * static_cast<int64_t>(proto.block.size());
  auto store = TieredStore::Open(o);
  ASSERT_TRUE(store.ok());
  std::atomic<int> evicted_disk{0};
  (*store)->Subscribe([&](const StoreEvent& e) {
    if (e.kind == StoreEvent::Kind::kEvicted && e.tier == Tier::kDisk)
      evicted_disk += static_cast<int>(e.hashes.size());
  });
  for (int i = 0; i < 6; ++i) {
    (*store)->PutAsync(scope, MakeBlock(layout, 100 + i, i, false));
    (*store)->Flush();
  }
  EXPECT_EQ((*store)->stats().disk_blocks, 4);
  EXPECT_EQ((*store)->stats().host_blocks, 2);
  EXPECT_EQ((*store)->stats().evicted_disk, 2);
  EXPECT_EQ((*store)->stats().evicted_host, 4);
  EXPECT_EQ(evicted_disk.load(), 2);
  EXPECT_FALSE((*store)->Get(scope, 100, false).ok());
  EXPECT_TRUE((*store)->Get(scope, 102, false).ok());  // From disk, promoted to host.
  EXPECT_EQ((*store)->stats().get_hits_disk, 1);
  std::filesystem::remove_all(dir);
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir("service");
    TieredStoreOptions o;
    o.disk_path = dir_;
    auto store = TieredStore::Open(o);
    ASSERT_TRUE(store.ok());
    store_ = std::move(*store);
    service_ = std::make_unique<KvStoreService>(store_.get(), "test:1");
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials());
  }
  void TearDown() override {
    server_->Shutdown();
    server_.reset();
    service_.reset();
    store_.reset();
    std::filesystem::remove_all(dir_);
  }
  std::string dir_;
  std::unique_ptr<TieredStore> store_;
  std::unique_ptr<KvStoreService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  int port_ = 0;
};

TEST_F(ServiceTest, ClientPutLookupGetAndEvents) {
  auto stub = v1::KvStore::NewStub(channel_);
  grpc::ClientContext events_ctx;
  v1::KvEventsRequest er;
  er.set_subscriber("router");
  auto reader = stub->Events(&events_ctx, er);
  // Wait until the subscription is live: Events has no first message, so poll with a probe block.
  GrpcKvStoreClient client(channel_);
  const KvLayout layout = SmallLayout(77);
  const StoreScope scope{77, TenantSalt("acme", 0)};
  std::vector<StoredBlock> blocks;
  for (int i = 0; i < 3; ++i) blocks.push_back(MakeBlock(layout, 500 + i, i, i == 1));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  for (const StoredBlock& b : blocks) EXPECT_TRUE(client.PutAsync(scope, b));
  client.Flush();
  store_->Flush();
  const uint64_t chain[] = {500, 501, 502, 503};
  auto found = client.Lookup(scope, chain);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->matched, 3);
  EXPECT_EQ(found->has_window_state, (std::vector<bool>{false, true, false}));
  auto got = client.Get(scope, 501, true);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->block, blocks[1].block);
  EXPECT_EQ(got->window_state, blocks[1].window_state);
  EXPECT_EQ(client.Get(scope, 999, true).status().code(), absl::StatusCode::kNotFound);
  // The tenant name resolves to the same salt the workers use.
  v1::LookupRequest lr;
  lr.set_model_fingerprint(77);
  lr.set_tenant("acme");
  lr.add_chain()->set_hash(BlockHashBytes(500));
  v1::LookupResponse resp;
  grpc::ClientContext lctx;
  ASSERT_TRUE(stub->Lookup(&lctx, lr, &resp).ok());
  EXPECT_EQ(resp.matched_blocks(), 1);
  EXPECT_EQ(resp.tiers(0), "host");

  int stored = 0;
  v1::KvEvent ev;
  while (stored < 3 && reader->Read(&ev)) {
    EXPECT_EQ(ev.kind(), v1::KvEvent::KIND_STORED);
    EXPECT_EQ(ev.holder(), "test:1");
    EXPECT_EQ(ev.model_fingerprint(), 77u);
    EXPECT_EQ(ev.tenant_salt(), scope.tenant_salt);
    stored += ev.blocks_size();
  }
  EXPECT_EQ(stored, 3);
  events_ctx.TryCancel();
  v1::KvEvent rest;
  while (reader->Read(&rest)) {
  }
  reader->Finish().IgnoreError();
}

TEST_F(ServiceTest, BadInputIsInvalidArgumentAndNothingIsStored) {
  auto stub = v1::KvStore::NewStub(channel_);
  const KvLayout layout = SmallLayout(77);
  StoredBlock b = MakeBlock(layout, 600, 0, false);
  auto put = [&](const std::string& hash, const std::string& fp, std::string payload) {
    v1::PutBlockRequest req;
    req.mutable_block()->mutable_id()->set_hash(hash);
    req.mutable_block()->set_model_fingerprint(fp);
    req.set_payload(std::move(payload));
    v1::PutBlockResponse resp;
    grpc::ClientContext ctx;
    return stub->Put(&ctx, req, &resp);
  };
  EXPECT_EQ(put("short", BlockHashBytes(77), b.block).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(put(BlockHashBytes(600), "x", b.block).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  std::string bad = b.block;
  bad[100] ^= 4;
  grpc::Status st = put(BlockHashBytes(600), BlockHashBytes(77), bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("checksum"), std::string::npos) << st.error_message();
  EXPECT_EQ(put(BlockHashBytes(601), BlockHashBytes(77), b.block).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(put(BlockHashBytes(600), BlockHashBytes(78), b.block).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(put(BlockHashBytes(600), BlockHashBytes(77), b.block).ok());
  store_->Flush();
  EXPECT_EQ(store_->stats().disk_blocks, 1);
  v1::GetBlockRequest g;
  g.mutable_id()->set_hash("123");
  v1::GetBlockResponse gr;
  grpc::ClientContext gctx;
  EXPECT_EQ(stub->Get(&gctx, g, &gr).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

TEST(GrpcKvStoreClientTest, AnAbsentStoreIsAMissWithoutStalling) {
  // Nothing listens on this port: the first call fails within its deadline, later ones at once.
  GrpcKvStoreClientOptions o;
  o.deadline = absl::Milliseconds(200);
  GrpcKvStoreClient client(grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()), o);
  const uint64_t chain[] = {1, 2};
  EXPECT_FALSE(client.Lookup({1, 0}, chain).ok());
  const absl::Time start = absl::Now();
  for (int i = 0; i < 20; ++i) EXPECT_FALSE(client.Lookup({1, 0}, chain).ok());
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(200));  // Backing off, not 20 deadlines.
  EXPECT_TRUE(client.PutAsync({1, 0}, MakeBlock(SmallLayout(1), 1, 0, false)));
  client.Flush();
  EXPECT_EQ(client.put_errors(), 1);
}

}  // namespace
}  // namespace v4serve::kvstore
