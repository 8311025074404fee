// The tiered KV store, measured side by side in one run (issue #8; docs/KV_STORE.md "Measured"):
//
//   1. Disk-tier read throughput vs a raw sequential read of the same bytes on the same disk: N blocks
//      written through DiskTier (RocksDB, blob files), then read back in chain order with checksum
//      verification, page cache dropped (posix_fadvise DONTNEED) before each cold read; the same byte
//      count written to one file and read sequentially. One reader and --threads readers.
//   2. Bytes on disk per token for each SWA policy: measured on the tiny V4 (the store's column-family
//      byte counts after a --prefix_tokens prompt) and computed for V4-Flash's layout (FP32 block format),
//      with the window-state : compressed-entries ratio next to the report's ~8x.
//   3. TTFT of a request whose --prefix_tokens prefix is cached, from host memory and from disk (store
//      reopened, page cache dropped), for each policy, against a cold prefill of the same request.
//
//   build/default/bench/v4serve_kvstore_bench [--dir=/tmp/x] [--prefix_tokens=32768] [--disk_mib=1024]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "engine/state_blocks.h"
#include "kvstore/kv_block.h"
#include "kvstore/store_format.h"
#include "kvstore/tiered_store.h"
#include "model/config.h"
#include "model/model.h"
#include "model/sequence_state.h"
#include "services/flags.h"

namespace v4serve {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

void Die(const absl::Status& s) {
  std::fprintf(stderr, "kvstore_bench: %s\n", s.ToString().c_str());
  std::exit(1);
}

// Flushes and drops the page cache of every file under `path` (a cold read next time).
void DropCache(const std::string& path) {
  ::sync();
  std::error_code ec;
  auto drop = [](const fs::path& p) {
    int fd = ::open(p.c_str(), O_RDONLY);
    if (fd < 0) return;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  };
  if (fs::is_regular_file(path, ec)) {
    drop(path);
    return;
  }
  for (const auto& e : fs::recursive_directory_iterator(path, ec)) {
    if (e.is_regular_file(ec)) drop(e.path());
  }
}

int64_t DirBytes(const std::string& path) {
  int64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(path, ec)) {
    if (e.is_regular_file(ec)) n += static_cast<int64_t>(e.file_size(ec));
  }
  return n;
}

// ------------------------------------------------------------------------------------------ 1. throughput

// Writes `bytes` to one file (for the raw read).
void WriteRawFile(const std::string& file, int64_t bytes) {
  std::vector<char> buf(1 << 20);
  std::mt19937_64 rng(3);
  for (auto& c : buf) c = static_cast<char>(rng());
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (int64_t done = 0; done < bytes; done += static_cast<int64_t>(buf.size())) {
    if (::write(fd, buf.data(), buf.size()) != static_cast<ssize_t>(buf.size()))
      Die(absl::InternalError("write"));
  }
  ::fsync(fd);
  ::close(fd);
}

// Cold sequential read of the file with `threads` readers (each a contiguous slice, 1 MiB preads). MiB/s.
double RawRead(const std::string& file, int64_t bytes, int threads) {
  DropCache(file);
  const auto start = Clock::now();
  std::vector<std::thread> th;
  const int64_t slice = bytes / threads;
  for (int i = 0; i < threads; ++i) {
    th.emplace_back([&, i] {
      int fd = ::open(file.c_str(), O_RDONLY);
      std::vector<char> buf(1 << 20);
      for (int64_t off = i * slice; off < (i + 1) * slice; off += static_cast<int64_t>(buf.size())) {
        if (::pread(fd, buf.data(), buf.size(), off) <= 0) break;
      }
      ::close(fd);
    });
  }
  for (auto& x : th) x.join();
  return static_cast<double>(bytes) / (1 << 20) / Seconds(start, Clock::now());
}

constexpr uint64_t kBenchFingerprint = 0xBE7C4;

// Writes a chain of blocks of ~block_bytes through the disk tier; returns their hashes.
std::vector<uint64_t> WriteChain(const std::string& dir, int64_t bytes, int64_t block_bytes) {
  kvstore::KvLayout layout;
  layout.model_fingerprint = kBenchFingerprint;
  layout.layers.push_back({1, static_cast<int32_t>(std::max<int64_t>(1, block_bytes / (512 * 4))), 512, 0,
                           kvstore::KvDtype::kF32});
  const kvstore::StoreScope scope{kBenchFingerprint, 0};
  kvstore::KvBlock b;
  b.tokens.assign(128, 5);
  b.entries.emplace_back(static_cast<size_t>(layout.layers[0].entries_per_block) * 512);
  b.indexer_keys.emplace_back();
  std::mt19937 rng(1);
  for (float& f : b.entries[0]) f = static_cast<float>(rng() % 100000) / 3.0f;
  const int64_t n = std::max<int64_t>(1, bytes / block_bytes);
  std::vector<uint64_t> hashes;
  fs::remove_all(dir);
  kvstore::DiskTierOptions o;
  o.path = dir;
  o.capacity_bytes = bytes * 4;
  auto disk = kvstore::DiskTier::Open(o);
  if (!disk.ok()) Die(disk.status());
  for (int64_t i = 0; i < n; ++i) {
    b.block_hash = 0x1000 + static_cast<uint64_t>(i);
    b.block_index = static_cast<int32_t>(i);
    b.entries[0][static_cast<size_t>(i) % b.entries[0].size()] += 1.0f;  // Distinct blocks.
    kvstore::StoredBlock sb;
    sb.hash = b.block_hash;
    sb.index = b.block_index;
    sb.block = *kvstore::EncodeKvBlock(layout, b);
    hashes.push_back(sb.hash);
    if (!(*disk)->Put(kvstore::EncodeStoreKey(scope, sb.hash), sb).ok()) Die(absl::InternalError("put"));
  }
  if (absl::Status c = (*disk)->Compact(); !c.ok()) Die(c);
  return hashes;
}

// Cold read of the chain through DiskTier::Get, one reader, in chain order (verifying each block). MiB/s.
double DiskTierRead(const std::string& dir, const std::vector<uint64_t>& hashes) {
  DropCache(dir);
  kvstore::DiskTierOptions o;
  o.path = dir;
  o.capacity_bytes = int64_t{1} << 50;
  auto disk = kvstore::DiskTier::Open(o);  // Reopened: index rebuilt, caches cold.
  if (!disk.ok()) Die(disk.status());
  const kvstore::StoreScope scope{kBenchFingerprint, 0};
  int64_t got = 0;
  const auto start = Clock::now();
  for (uint64_t h : hashes) {
    auto sb = (*disk)->Get(kvstore::EncodeStoreKey(scope, h), false);
    if (!sb.ok()) Die(sb.status());
    got += static_cast<int64_t>(sb->block.size());
  }
  return static_cast<double>(got) / (1 << 20) / Seconds(start, Clock::now());
}

// Cold read of the chain as the engine reads a cached prefix: TieredStore::Lookup (which prefetches
// from disk into host memory on its reader threads), then Get of each block in order. MiB/s.
double TieredRead(const std::string& dir, const std::vector<uint64_t>& hashes) {
  DropCache(dir);
  kvstore::TieredStoreOptions o;
  o.disk_path = dir;
  o.disk_capacity_bytes = int64_t{1} << 50;
  o.host_capacity_bytes = int64_t{16} << 30;
  o.prefetch_blocks = static_cast<int32_t>(hashes.size());
  auto store = kvstore::TieredStore::Open(o);
  if (!store.ok()) Die(store.status());
  const kvstore::StoreScope scope{kBenchFingerprint, 0};
  int64_t got = 0;
  const auto start = Clock::now();
  auto found = (*store)->Lookup(scope, hashes);
  if (!found.ok() || found->matched != static_cast<int32_t>(hashes.size()))
    Die(absl::InternalError("lookup"));
  for (uint64_t h : hashes) {
    auto sb = (*store)->Get(scope, h, false);
    if (!sb.ok()) Die(sb.status());
    got += static_cast<int64_t>(sb->block.size());
  }
  return static_cast<double>(got) / (1 << 20) / Seconds(start, Clock::now());
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// ------------------------------------------------------------------------------------- 2 + 3. the model

const model::Model& Tiny(const std::string& source) {
  static const model::Model* m = [&] {
    auto r = model::Model::Load(source + "/tests/model/testdata/tiny_v4", model::ModelOptions());
    if (!r.ok()) Die(r.status());
    return r->release();
  }();
  return *m;
}

struct Ttft {
  double seconds = 0;
  engine::EngineStats stats;
  std::vector<int32_t> tokens;
};

Ttft RunRequest(const model::Model& m, const std::vector<int32_t>& prompt, engine::SwaPolicy policy,
                int64_t checkpoint, std::shared_ptr<kvstore::KvStoreClient> store) {
  engine::EngineOptions o;
  o.kv.num_blocks = static_cast<int64_t>(prompt.size()) / 128 + 16;
  o.kv.swa_policy = policy;
  o.kv.swa_checkpoint_tokens = checkpoint;
  o.kv.store = std::move(store);
  o.model_fingerprint = 0x71A7;
  o.scheduler.max_step_tokens = 2048;
  auto e = engine::Engine::Create(&m, o);
  if (!e.ok()) Die(e.status());
  Ttft r;
  bool first = false;
  engine::EngineRequest req;
  req.request_id = "q";
  req.prompt = prompt;
  req.sampling.max_tokens = 4;
  req.sampling.ignore_eos = true;
  req.on_output = [&](const engine::SequenceOutput& out) {
    if (out.token) {
      if (!first) r.seconds = 0;
      first = true;
      r.tokens.push_back(out.token->id);
    }
  };
  const auto start = Clock::now();
  if (absl::Status s = (*e)->Submit(std::move(req)); !s.ok()) Die(s);
  while (!first) {
    if (absl::Status s = (*e)->Step(); !s.ok()) Die(s);
  }
  r.seconds = Seconds(start, Clock::now());
  while ((*e)->HasWork()) {
    if (absl::Status s = (*e)->Step(); !s.ok()) Die(s);
  }
  r.stats = (*e)->stats();
  return r;
}

int Main(int argc, char** argv) {
  std::string dir = "/tmp/v4serve_kvstore_bench";
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  std::string source = src ? src : V4SERVE_SOURCE_DIR_DEFAULT;
  int64_t disk_mib = 1024, block_kib = 1024, prefix_tokens = 32768, checkpoint_tokens = 4096;
  int threads = 4, rounds = 3;
  bool skip_ttft = false;
  services::FlagSet flags("v4serve_kvstore_bench",
                          "Tiered KV store: disk throughput, bytes per token, TTFT.");
  flags.Add("dir", &dir, "Scratch directory on the disk to measure (removed afterwards).");
  flags.Add("disk_mib", &disk_mib, "Bytes written and read back for the throughput comparison.");
  flags.Add("block_kib", &block_kib, "Block size for the throughput comparison.");
  flags.Add("threads", &threads, "Readers of the parallel raw read.");
  flags.Add("rounds", &rounds, "Alternating rounds of the throughput comparison (medians reported).");
  flags.Add("prefix_tokens", &prefix_tokens, "Cached prefix of the TTFT and bytes-per-token runs (tiny V4).");
  flags.Add("checkpoint_tokens", &checkpoint_tokens, "Periodic policy's interval.");
  flags.Add("skip_ttft", &skip_ttft, "Only the disk throughput.");
  std::vector<std::string> args(argv + 1, argv + argc);
  if (absl::Status s = flags.Parse(args); !s.ok()) {
    std::fprintf(stderr, "%s\n%s", s.ToString().c_str(), flags.Usage().c_str());
    return 2;
  }
  fs::create_directories(dir);
  std::printf("# v4serve kvstore bench (dir %s)\n\n", dir.c_str());

  // 1. Throughput: the same bytes through the disk tier and as one raw file, alternating, medians.
  const int64_t bytes = disk_mib << 20, block_bytes = block_kib << 10;
  const std::vector<uint64_t> hashes = WriteChain(dir + "/tier", bytes, block_bytes);
  const int64_t on_disk = DirBytes(dir + "/tier");
  WriteRawFile(dir + "/raw.bin", bytes);
  std::vector<double> tier1, tiered, raw1, rawn;
  for (int r = 0; r < rounds; ++r) {
    tier1.push_back(DiskTierRead(dir + "/tier", hashes));
    raw1.push_back(RawRead(dir + "/raw.bin", bytes, 1));
    tiered.push_back(TieredRead(dir + "/tier", hashes));
    rawn.push_back(RawRead(dir + "/raw.bin", bytes, threads));
  }
  fs::remove_all(dir + "/tier");
  fs::remove(dir + "/raw.bin");
  const double raw = Median(raw1);
  std::printf("## Disk-tier read throughput (%lld MiB in %lld KiB blocks, cold page cache, median of %d)\n",
              (long long)disk_mib, (long long)block_kib, rounds);
  std::printf("| read | MiB/s | vs raw sequential (1 reader) |\n|---|---|---|\n");
  std::printf("| raw sequential file, 1 reader (1 MiB preads) | %.0f | 100%% |\n", raw);
  std::printf("| raw sequential file, %d readers | %.0f | %.0f%% |\n", threads, Median(rawn),
              100 * Median(rawn) / raw);
  std::printf("| disk tier: DiskTier::Get in chain order, 1 reader, CRC verified | %.0f | %.0f%% |\n",
              Median(tier1), 100 * Median(tier1) / raw);
  std::printf("| disk tier as the engine reads: Lookup (prefetch, 4 threads) + Get | %.0f | %.0f%% |\n",
              Median(tiered), 100 * Median(tiered) / raw);
  std::printf("(store directory after compaction: %lld bytes for %lld payload bytes)\n\n", (long long)on_disk,
              (long long)bytes);
  std::fflush(stdout);
  if (skip_ttft) return 0;

  // 2a. V4-Flash layout, computed.
  {
    std::ifstream in(source + "/tests/model/testdata/v4_flash_config.json");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto config = model::ParseModelConfig(text);
    if (!config.ok()) Die(config.status());
    auto layout = engine::KvLayoutFor(*config, 1);
    if (!layout.ok()) Die(layout.status());
    const double entries = static_cast<double>(layout->PayloadBytes());
    const double state =
        static_cast<double>(model::SerializeSequenceState(model::NewSequenceState(*config)).size());
    const double ring =
        static_cast<double>(config->num_hidden_layers * config->sliding_window * config->head_dim * 4);
    std::printf("## Bytes per token, V4-Flash layout (computed, FP32 block format, 128-token blocks)\n");
    std::printf(
        "compressed entries + indexer keys per block: %.0f B; window state per boundary: %.0f B; "
        "state / entries = %.1fx; the window rings alone: %.0f B = %.1fx (report: ~8x at its storage "
        "precision)\n",
        entries, state, state / entries, ring, ring / entries);
    std::printf(
        "| policy | bytes/token |\n|---|---|\n| full | %.0f |\n| periodic (%lld) | %.0f |\n| zero | %.0f "
        "|\n\n",
        (entries + state) / 128, (long long)checkpoint_tokens, entries / 128 + state / checkpoint_tokens,
        entries / 128);
  }

  // 2b + 3. Tiny V4: store per policy, TTFT cold / host / disk.
  const model::Model& m = Tiny(source);
  std::mt19937 rng(7);
  std::vector<int32_t> prefix(static_cast<size_t>(prefix_tokens));
  for (int32_t& t : prefix) t = static_cast<int32_t>(2 + rng() % 510);
  std::vector<int32_t> writer = prefix, query = prefix;
  for (int i = 0; i < 64; ++i) writer.push_back(static_cast<int32_t>(2 + rng() % 510));
  for (int i = 0; i < 64; ++i) query.push_back(static_cast<int32_t>(2 + rng() % 510));
  std::printf("## Tiny V4 (CPU, exact FP32), prefix %lld tokens + 64-token tail, periodic every %lld\n",
              (long long)prefix_tokens, (long long)checkpoint_tokens);
  const Ttft cold = RunRequest(m, query, engine::SwaPolicy::kFull, checkpoint_tokens, nullptr);
  std::printf("cold prefill TTFT: %.3f s (%lld tokens computed)\n\n", cold.seconds,
              (long long)cold.stats.prefill_tokens_computed);
  std::printf(
      "| policy | bytes/token on disk (blocks + states) | state/entries | TTFT host | TTFT disk | "
      "host / cold | disk / cold | recomputed | same tokens |\n|---|---|---|---|---|---|---|---|---|\n");
  for (engine::SwaPolicy policy :
       {engine::SwaPolicy::kFull, engine::SwaPolicy::kPeriodic, engine::SwaPolicy::kZero}) {
    const std::string pdir = dir + "/" + engine::SwaPolicyName(policy);
    fs::remove_all(pdir);
    kvstore::TieredStoreOptions so;
    so.disk_path = pdir;
    so.host_capacity_bytes = 8LL << 30;
    so.write_queue_blocks = 1 << 16;
    Ttft host, disk;
    kvstore::DiskTierStats ds;
    {
      auto store = kvstore::TieredStore::Open(so);
      if (!store.ok()) Die(store.status());
      std::shared_ptr<kvstore::TieredStore> s = std::move(*store);
      RunRequest(m, writer, policy, checkpoint_tokens, s);
      s->Flush();
      host = RunRequest(m, query, policy, checkpoint_tokens, s);
      ds = s->disk()->Stats();
    }
    DropCache(pdir);
    {
      auto store = kvstore::TieredStore::Open(so);
      if (!store.ok()) Die(store.status());
      std::shared_ptr<kvstore::TieredStore> s = std::move(*store);
      disk = RunRequest(m, query, policy, checkpoint_tokens, s);
    }
    const double per_token = static_cast<double>(ds.block_bytes + ds.state_bytes) / prefix_tokens;
    const double ratio = ds.window_states > 0 && ds.blocks > 0
                             ? (static_cast<double>(ds.state_bytes) / ds.window_states) /
                                   (static_cast<double>(ds.block_bytes) / ds.blocks)
                             : 0.0;
    std::printf("| %s | %.0f (dir %.0f) | %.2fx | %.3f s | %.3f s | %.1f%% | %.1f%% | %lld | %s |\n",
                engine::SwaPolicyName(policy), per_token,
                static_cast<double>(ds.bytes_on_disk) / prefix_tokens, ratio, host.seconds, disk.seconds,
                100 * host.seconds / cold.seconds, 100 * disk.seconds / cold.seconds,
                (long long)host.stats.kv_recomputed_tokens,
                host.tokens == cold.tokens && disk.tokens == cold.tokens ? "yes" : "NO");
    std::fflush(stdout);
    fs::remove_all(pdir);
  }
  fs::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace v4serve

int main(int argc, char** argv) { return v4serve::Main(argc, argv); }
