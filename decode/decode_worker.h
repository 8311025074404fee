// `v4serve decode`: a decode worker (docs/ARCHITECTURE.md, request flow step 4).
//
// The worker loads the model and runs one engine (engine/engine.h). It serves Inference.Generate (token
// ids; it prefills itself: the colocated path) and Worker.Decode (decode_service.h: the prompt's KV comes
// from the prefill worker the router names, with a local prefill as the fallback), plus the KV receive
// side (Worker.PushKv / Handshake).
#ifndef V4SERVE_DECODE_DECODE_WORKER_H_
#define V4SERVE_DECODE_DECODE_WORKER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "services/flags.h"
#include "services/shutdown.h"
#include "services/worker_options.h"

namespace v4serve::decode {

struct DecodeWorkerOptions {
  services::WorkerOptions worker;
  bool colocated = false;                // Accepted for compatibility: Inference.Generate is always served.
  int64_t kv_blocks = 512;               // KV pool capacity, in 128-token blocks.
  int64_t max_step_tokens = 512;         // Prefill + decode tokens per engine step.
  int64_t max_running = 64;              // Running sequences (decode batch cap).
  std::string preemption = "recompute";  // "recompute" or "swap".
  int64_t swap_space_mb = 1024;          // Host memory for swapped states.
  bool prefix_cache = true;
  int64_t max_model_len = 0;  // 0 = the model's max_position_embeddings.
  bool mtp = false;           // MTP speculative decoding of greedy requests (loads the MTP weights).
  // Disaggregated decode (Worker.Decode).
  std::string kv_transport = "grpc";          // "grpc", "nccl" or "in_process".
  int64_t prefill_timeout_ms = 60000;         // Remote prefill + KV arrival; then decode prefills itself.
  int64_t kv_reservation_timeout_ms = 90000;  // A reservation whose KV never completes is freed.
  int64_t kv_max_chunk_bytes = 4 << 20;       // NCCL piece size (KvTarget.max_chunk_bytes).
  int64_t max_remote_prefills = 256;          // Remote prefills in flight; past it, prefill here.
  std::string advertise_host;                 // Host prefill workers push KV to; empty = the caller's view.
  int64_t gpu = 0;                            // GPU of the NCCL transport.
  // Tiered KV store (docs/KV_STORE.md): the node's shared `v4serve kvstore` (host:port), or an
  // in-process store in `kv_dir` (colocated); at most one. SWA policy and tier capacities.
  std::string kvstore;
  std::string kv_dir;
  std::string swa_policy = "full";
  int64_t swa_checkpoint_tokens = 4096;
  int64_t kv_host_mb = 4096;
  int64_t kv_disk_mb = 65536;

  // INVALID_ARGUMENT naming the flag.
  absl::Status Validate() const;
};

void AddDecodeWorkerFlags(services::FlagSet& flags, DecodeWorkerOptions* options);

// Serves until `shutdown` triggers, then drains. OK means a clean exit.
absl::Status RunDecodeWorker(const DecodeWorkerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::decode

#endif  // V4SERVE_DECODE_DECODE_WORKER_H_
