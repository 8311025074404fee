// The NCCL KV transport between two GPUs (issue 10, item 6), measured against raw NCCL in the same run:
//   raw:       ncclSend/ncclRecv of device buffers GPU 0 -> GPU 1 (the ceiling), at the transfer's size;
//   transport: the KV of an 8k-token prompt of a V4-Flash-shaped layer stack (per 128-token block one chunk
//              per compressed layer, sizes from KvLayoutFor(V4-Flash config), then the window state) through
//              NcclKvSenders (GPU 0) -> NcclKvReceiver + KvReservations (GPU 1), as prefill and decode
//              workers use it; payload bytes verified on arrival;
//   overlap:   the same transfer with the sender computing between blocks (a stand-in busy-wait of the
//              per-block prefill time given by --block_compute_ms), against that compute alone.
// Prints a table; every ratio is against numbers of this run. Needs a CUDA build and two GPUs.
//
//   LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64 NCCL_NVLS_ENABLE=0 .gpu/v4serve_nccl_kv_bench
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/state_blocks.h"
#include "kvstore/transfer/kv_transfer.h"
#include "kvstore/transfer/nccl_api.h"
#include "kvstore/transfer/nccl_kv_transport.h"
#include "model/config.h"
#include "model/sequence_state.h"

namespace v4serve {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

#define CHECK_CUDA(x)                                              \
  do {                                                             \
    cudaError_t e = (x);                                           \
    if (e != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e)); \
      std::exit(1);                                                \
    }                                                              \
  } while (0)
#define CHECK_NCCL(x)                                              \
  do {                                                             \
    ncclResult_t r = (x);                                          \
    if (r != ncclSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, ncclGetErrorString(r)); \
      std::exit(1);                                                \
    }                                                              \
  } while (0)

// Raw NCCL point-to-point GPU 0 -> GPU 1 of `bytes` device bytes; median seconds of `reps`.
double RawNccl(size_t bytes, int reps) {
  int devs[2] = {0, 1};
  ncclComm_t comms[2];
  CHECK_NCCL(ncclCommInitAll(comms, 2, devs));
  void* buf[2];
  cudaStream_t stream[2];
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    CHECK_CUDA(cudaMalloc(&buf[d], bytes));
    CHECK_CUDA(cudaStreamCreate(&stream[d]));
  }
  std::vector<double> times;
  for (int i = 0; i < reps + 2; ++i) {
    const auto start = Clock::now();
    CHECK_NCCL(ncclGroupStart());
    CHECK_NCCL(ncclSend(buf[0], bytes, ncclChar, 1, comms[0], stream[0]));
    CHECK_NCCL(ncclRecv(buf[1], bytes, ncclChar, 0, comms[1], stream[1]));
    CHECK_NCCL(ncclGroupEnd());
    for (int d = 0; d < 2; ++d) {
      CHECK_CUDA(cudaSetDevice(d));
      CHECK_CUDA(cudaStreamSynchronize(stream[d]));
    }
    if (i >= 2) times.push_back(Seconds(start, Clock::now()));  // two warm-up rounds
  }
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    CHECK_CUDA(cudaFree(buf[d]));
    CHECK_CUDA(cudaStreamDestroy(stream[d]));
    ncclCommDestroy(comms[d]);
  }
  return Median(times);
}

// The host-memory ceiling of a transfer whose KV lives in host memory on both sides (the CPU engine's):
// `bytes` host -> GPU 0 and GPU 1 -> host, sequentially, from pinned (or pageable) buffers; median seconds.
double HostCopies(size_t bytes, int reps, bool pinned) {
  void* host[2] = {nullptr, nullptr};
  std::vector<char> pageable[2];
  void* dev[2];
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    CHECK_CUDA(cudaMalloc(&dev[d], bytes));
    if (pinned) {
      CHECK_CUDA(cudaHostAlloc(&host[d], bytes, cudaHostAllocDefault));
    } else {
      pageable[d].assign(bytes, 1);
      host[d] = pageable[d].data();
    }
    std::memset(host[d], 1, bytes);
  }
  std::vector<double> times;
  for (int i = 0; i < reps + 1; ++i) {
    const auto start = Clock::now();
    CHECK_CUDA(cudaSetDevice(0));
    CHECK_CUDA(cudaMemcpy(dev[0], host[0], bytes, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaSetDevice(1));
    CHECK_CUDA(cudaMemcpy(host[1], dev[1], bytes, cudaMemcpyDeviceToHost));
    if (i >= 1) times.push_back(Seconds(start, Clock::now()));
  }
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    CHECK_CUDA(cudaFree(dev[d]));
    if (pinned) CHECK_CUDA(cudaFreeHost(host[d]));
  }
  return Median(times);
}

struct Transfer {
  std::vector<kvstore::KvTransferChunk> chunks;
  size_t bytes = 0;
};

// The chunks a prefill worker sends for a `tokens`-token prompt of `config`: per complete block one chunk
// per compressed layer (its entries + indexer keys, FP32 as the CPU state holds them), then the window.
Transfer FlashTransfer(const model::ModelConfig& config, int tokens) {
  const kvstore::KvLayout layout = *engine::KvLayoutFor(config, /*model_fingerprint=*/1);
  const std::string window = model::SerializeSequenceState(model::NewSequenceState(config));
  Transfer t;
  for (int b = 0; b < tokens / layout.block_tokens; ++b) {
    for (size_t l = 0; l < layout.layers.size(); ++l) {
      const kvstore::KvLayerLayout& ll = layout.layers[l];
      kvstore::KvTransferChunk c;
      c.first_layer = static_cast<uint32_t>(l);
      c.num_layers = 1;
      c.first_token = static_cast<uint32_t>(b * layout.block_tokens);
      c.num_tokens = static_cast<uint32_t>(layout.block_tokens);
      c.payload.resize(static_cast<size_t>(ll.entries_per_block) * (ll.entry_width + ll.indexer_width) * 4 +
                       64 + 4 * static_cast<size_t>(layout.block_tokens));  // + header and token ids
      for (size_t i = 0; i < c.payload.size(); i += 61) c.payload[i] = static_cast<char>(i + l + b);
      t.bytes += c.payload.size();
      t.chunks.push_back(std::move(c));
    }
  }
  kvstore::KvTransferChunk w;
  w.window_state = w.last = true;
  w.payload = window;
  t.bytes += w.payload.size();
  t.chunks.push_back(std::move(w));
  return t;
}

void BusyFor(double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
  }
}

int Main(int argc, char** argv) {
  std::string config_path = "tests/model/testdata/v4_flash_config.json";
  int tokens = 8192, reps = 5;
  double block_compute_ms = 20;  // stand-in per-block prefill time on the sender
  uint32_t piece_bytes = 4u << 20;
  size_t batch_bytes = 8u << 20;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--config=", 0) == 0) config_path = a.substr(9);
    if (a.rfind("--tokens=", 0) == 0) tokens = std::atoi(a.c_str() + 9);
    if (a.rfind("--reps=", 0) == 0) reps = std::atoi(a.c_str() + 7);
    if (a.rfind("--block_compute_ms=", 0) == 0) block_compute_ms = std::atof(a.c_str() + 19);
    if (a.rfind("--piece_bytes=", 0) == 0) piece_bytes = static_cast<uint32_t>(std::atol(a.c_str() + 14));
    if (a.rfind("--batch_bytes=", 0) == 0) batch_bytes = static_cast<size_t>(std::atol(a.c_str() + 14));
  }
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) {
    std::printf("SKIP: needs 2 GPUs (found %d)\n", n);
    return 0;
  }
  std::ifstream in(config_path);
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<model::ModelConfig> config = model::ParseModelConfig(ss.str());
  if (!config.ok()) {
    std::fprintf(stderr, "%s: %s\n", config_path.c_str(), std::string(config.status().message()).c_str());
    return 1;
  }
  const Transfer t = FlashTransfer(*config, tokens);
  std::printf("V4-Flash-shaped KV of a %d-token prompt: %zu chunks, %.1f MiB (window state %.1f MiB)\n",
              tokens, t.chunks.size(), t.bytes / 1048576.0, t.chunks.back().payload.size() / 1048576.0);

  const double raw_s = RawNccl(t.bytes, reps);
  const double raw_piece_s = RawNccl(piece_bytes, reps * 4);
  const double pinned_s = HostCopies(t.bytes, reps, /*pinned=*/true);
  const double pageable_s = HostCopies(t.bytes, reps, /*pinned=*/false);

  auto nccl0 = kvstore::MakeCudaNccl(0);
  auto nccl1 = kvstore::MakeCudaNccl(1);
  if (!nccl0.ok() || !nccl1.ok()) {
    std::fprintf(stderr, "MakeCudaNccl: %s\n",
                 std::string((nccl0.ok() ? nccl1 : nccl0).status().message()).c_str());
    return 1;
  }
  kvstore::NcclKvOptions o;
  o.init_timeout = absl::Seconds(60);
  o.op_timeout = absl::Seconds(60);
  o.batch_bytes = batch_bytes;
  kvstore::KvReservations reservations{kvstore::KvReservationsOptions{}};
  kvstore::NcclKvReceiver receiver(nccl1->get(), &reservations, o);
  kvstore::NcclKvSenders senders(nccl0->get(), o);
  absl::StatusOr<std::string> uid = receiver.UniqueIdFor("prefill:0");
  if (!uid.ok()) return 1;

  // One transfer; `compute_s` of stand-in prefill work before each block's chunks.
  auto run = [&](int r, double compute_s, bool verify) -> double {
    absl::StatusOr<std::string> id =
        reservations.Reserve("req-" + std::to_string(r), tokens, absl::Now() + absl::Minutes(5));
    if (!id.ok()) std::exit(1);
    const auto start = Clock::now();
    absl::StatusOr<std::unique_ptr<kvstore::KvSender>> s = senders.Start("decode:1", *uid, *id, piece_bytes);
    if (!s.ok()) {
      std::fprintf(stderr, "Start: %s\n", std::string(s.status().message()).c_str());
      std::exit(1);
    }
    uint32_t last_token = UINT32_MAX;
    for (const kvstore::KvTransferChunk& c : t.chunks) {
      if (compute_s > 0 && !c.window_state && c.first_token != last_token) BusyFor(compute_s);
      last_token = c.first_token;
      if (!(*s)->Send(c).ok()) std::exit(1);
    }
    if (!(*s)->Finish().ok()) std::exit(1);
    absl::StatusOr<kvstore::KvTransferResult> got = reservations.Await(*id, absl::Now() + absl::Minutes(5));
    const double secs = Seconds(start, Clock::now());
    if (!got.ok()) {
      std::fprintf(stderr, "Await: %s\n", std::string(got.status().message()).c_str());
      std::exit(1);
    }
    if (verify && got->chunks != t.chunks) {
      std::fprintf(stderr, "payload mismatch\n");
      std::exit(1);
    }
    reservations.Release(*id);
    return secs;
  };
  run(0, 0, true);  // warm-up (pair setup), verified
  std::vector<double> plain;
  for (int r = 1; r <= reps; ++r) plain.push_back(run(r, 0, r == 1));
  const double transport_s = Median(plain);
  const int blocks = tokens / 128;
  const double compute_alone = blocks * block_compute_ms / 1e3;
  std::vector<double> overlapped;
  for (int r = 0; r < 2; ++r) overlapped.push_back(run(100 + r, block_compute_ms / 1e3, false));
  const double overlap_s = Median(overlapped);

  const double gb = t.bytes / 1e9;
  std::printf("\n| what | bytes | time | GB/s | ratio |\n|---|---|---|---|---|\n");
  std::printf("| raw NCCL send/recv, device buffers, one message | %.1f MB | %.2f ms | %.1f | 100%% |\n",
              t.bytes / 1e6, raw_s * 1e3, gb / raw_s);
  std::printf("| raw NCCL send/recv, one %u-byte piece | %.1f MB | %.3f ms | %.1f | |\n", piece_bytes,
              piece_bytes / 1e6, raw_piece_s * 1e3, piece_bytes / 1e9 / raw_piece_s);
  std::printf(
      "| host ceiling: pinned host -> GPU 0, GPU 1 -> host (cudaMemcpy) | %.1f MB | %.2f ms | %.1f | |\n",
      t.bytes / 1e6, pinned_s * 1e3, gb / pinned_s);
  std::printf("| host ceiling from pageable memory | %.1f MB | %.2f ms | %.1f | |\n", t.bytes / 1e6,
              pageable_s * 1e3, gb / pageable_s);
  std::printf(
      "| NCCL KV transport (host chunks, batches of %zu bytes, pinned staging), %zu chunks | %.1f MB | "
      "%.2f ms | %.1f | **%.1f%%** of raw NCCL, %.0f%% of the pinned host ceiling |\n",
      batch_bytes, t.chunks.size(), t.bytes / 1e6, transport_s * 1e3, gb / transport_s,
      100.0 * raw_s / transport_s, 100.0 * pinned_s / transport_s);
  std::printf(
      "| transport overlapped with %.0f ms/block of sender compute (%d blocks) | | %.1f ms vs %.1f ms "
      "compute alone | | %.1f%% over compute |\n",
      block_compute_ms, blocks, overlap_s * 1e3, compute_alone * 1e3,
      100.0 * (overlap_s - compute_alone) / compute_alone);
  return 0;
}

}  // namespace
}  // namespace v4serve

int main(int argc, char** argv) { return v4serve::Main(argc, argv); }
