// Crash safety of `v4serve kvstore` (issue #8 acceptance): kill -9 the real binary while clients are
// writing, restart it on the same directory, many times. Every restart must open, and every block it
// serves must be exactly the block that was written under that key (blocks are a function of their
// key, so a reader can tell). Blocks the crash lost (write-behind queue, unsynced WAL tail) are misses,
// which is allowed; wrong bytes are not. At the end `v4serve kv verify` must find nothing bad.
//
// Iterations: V4SERVE_KILL_ITERATIONS (default 50). Numbers go to stdout (tools/kvstore_kill_test.sh).
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvstore/kvstore_service.h"
#include "kvstore/prefix_cache.h"
#include "tests/kvstore/kv_store_test_util.h"
#include "tests/testing/v4serve_process.h"
#include "v4serve/v1/kvstore.grpc.pb.h"

namespace v4serve::kvstore {
namespace {

using v4serve::testing::RunV4serve;
using v4serve::testing::TempDir;
using v4serve::testing::V4serveProcess;

constexpr uint64_t kFingerprint = 0x5EED5EED5EED5EEDull;

TEST(KvstoreKillTest, KillDuringWritesNeverServesACorruptBlock) {
  const char* env = std::getenv("V4SERVE_KILL_ITERATIONS");
  const int iterations = env != nullptr ? std::atoi(env) : 50;
  TempDir dir;
  const std::string db = dir.path() + "/kv";
  const KvLayout layout = testing::SmallLayout(kFingerprint, 16, 64);  // 4.6 KiB blocks: blob files.
  const StoreScope scope{kFingerprint, 7};
  std::mt19937 rng(2026);
  uint64_t next_hash = 1, last_run_first = 1;
  int64_t acked_total = 0, served_total = 0, lost_total = 0, corrupt_total = 0, restarts = 0;
  absl::Duration open_max;
  for (int it = 0; it <= iterations; ++it) {
    const absl::Time t0 = absl::Now();
    auto proc = V4serveProcess::Start({"kvstore", "--db_path=" + db, "--grpc_port=0", "--host_mb=64",
                                       "--write_queue_blocks=4096", "--log_level=warning"});
    ASSERT_TRUE(proc.ok()) << "restart " << it << " did not open: " << proc.status();
    open_max = std::max(open_max, absl::Now() - t0);
    ++restarts;
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*proc)->port("grpc_port")),
                                       grpc::InsecureChannelCredentials());
    GrpcKvStoreClientOptions co;
    co.deadline = absl::Seconds(10);
    GrpcKvStoreClient client(channel, co);
    // Everything ever written is either served exactly or missing: every block of the last run of
    // writes (where the crash hit), a sample of older ones, and all of them after the last restart.
    int64_t served = 0, lost = 0, corrupt = 0;
    std::vector<uint64_t> check;
    for (uint64_t h = last_run_first; h < next_hash; ++h) check.push_back(h);
    for (int i = 0; i < 300 && last_run_first > 1; ++i) check.push_back(1 + rng() % (last_run_first - 1));
    if (it == iterations) {
      check.clear();
      for (uint64_t h = 1; h < next_hash; ++h) check.push_back(h);
    }
    for (uint64_t h : check) {
      absl::StatusOr<StoredBlock> got = client.Get(scope, h, true);
      if (got.ok()) {
        const StoredBlock want = testing::MakeBlock(layout, h, static_cast<int32_t>(h % 1000), h % 3 == 0);
        if (got->block != want.block || got->window_state != want.window_state) ++corrupt;
        ++served;
      } else {
        ASSERT_EQ(got.status().code(), absl::StatusCode::kNotFound) << got.status();
        ++lost;
      }
    }
    served_total += served;
    lost_total += lost;
    corrupt_total += corrupt;
    EXPECT_EQ(corrupt, 0) << "restart " << it;
    if (it == iterations) break;
    // Writers put new blocks as fast as the store takes them; kill -9 lands in the middle.
    std::atomic<bool> stop{false};
    std::atomic<int64_t> acked{0};
    std::atomic<uint64_t> hashes{next_hash};
    auto stub = v1::KvStore::NewStub(channel);
    std::vector<std::thread> writers;
    for (int w = 0; w < 3; ++w) {
      writers.emplace_back([&] {
        while (!stop.load()) {
          const uint64_t h = hashes.fetch_add(1);
          const StoredBlock b = testing::MakeBlock(layout, h, static_cast<int32_t>(h % 1000), h % 3 == 0);
          v1::PutBlockRequest req;
          req.mutable_block()->mutable_id()->set_hash(BlockHashBytes(h));
          req.mutable_block()->set_index(static_cast<uint32_t>(b.index));
          req.mutable_block()->set_model_fingerprint(BlockHashBytes(kFingerprint));
          req.set_tenant_salt(scope.tenant_salt);
          req.set_payload(b.block);
          req.set_window_state(b.window_state);
          v1::PutBlockResponse resp;
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
          if (!stub->Put(&ctx, req, &resp).ok()) return;  // The store is gone.
          acked.fetch_add(1);
        }
      });
    }
    last_run_first = next_hash;
    std::this_thread::sleep_for(std::chrono::milliseconds(50 + rng() % 250));
    const int pid = (*proc)->ready().at("pid").get<int>();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    for (std::thread& t : writers) t.join();
    stop = true;
    acked_total += acked.load();
    next_hash = hashes.load();
    proc->reset();  // Reaps the killed process.
  }
  std::string out;
  const int rc = RunV4serve({"kv", "verify", "--dir=" + db}, &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find(" 0 bad"), std::string::npos) << out;
  std::string stats;
  RunV4serve({"kv", "stats", "--dir=" + db}, &stats);
  std::printf(
      "kill -9 test: %d kills, %lld restarts opened (slowest %s), %lld puts acknowledged, %llu blocks "
      "attempted; re-reads after restarts: %lld served exactly, %lld missing (lost in the crash), %lld "
      "corrupt\nkv verify: %s%s",
      iterations, static_cast<long long>(restarts), absl::FormatDuration(open_max).c_str(),
      static_cast<long long>(acked_total), static_cast<unsigned long long>(next_hash - 1),
      static_cast<long long>(served_total), static_cast<long long>(lost_total),
      static_cast<long long>(corrupt_total), out.c_str(), stats.c_str());
  EXPECT_EQ(corrupt_total, 0);
  EXPECT_GT(acked_total, 0);
}

}  // namespace
}  // namespace v4serve::kvstore
