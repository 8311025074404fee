#include "decode/decode_worker.h"

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "decode/decode_service.h"
#include "decode/generate_service.h"
#include "engine/engine.h"
#include "engine/engine_loop.h"
#include "engine/engine_metrics.h"
#include "engine/state_blocks.h"
#include "kvstore/kvstore_service.h"
#include "kvstore/tiered_store.h"
#include "kvstore/transfer/nccl_api.h"
#include "model/device.h"
#include "model/model.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/server_process.h"
#include "services/status_macros.h"

namespace v4serve::decode {

absl::Status DecodeWorkerOptions::Validate() const {
  RETURN_IF_ERROR(worker.Validate());
  if (kv_blocks <= 0) return absl::InvalidArgumentError("--kv_blocks must be positive");
  if (max_step_tokens <= 0) return absl::InvalidArgumentError("--max_step_tokens must be positive");
  if (max_running <= 0) return absl::InvalidArgumentError("--max_running must be positive");
  if (preemption != "recompute" && preemption != "swap") {
    return absl::InvalidArgumentError("--preemption must be 'recompute' or 'swap'");
  }
  if (swap_space_mb < 0) return absl::InvalidArgumentError("--swap_space_mb must be >= 0");
  if (max_model_len < 0) return absl::InvalidArgumentError("--max_model_len must be >= 0");
  if (kv_transport != "grpc" && kv_transport != "nccl" && kv_transport != "in_process") {
    return absl::InvalidArgumentError("--kv_transport must be 'grpc', 'nccl' or 'in_process'");
  }
  if (prefill_timeout_ms <= 0) return absl::InvalidArgumentError("--prefill_timeout_ms must be positive");
  if (kv_reservation_timeout_ms <= 0)
    return absl::InvalidArgumentError("--kv_reservation_timeout_ms must be positive");
  if (max_remote_prefills < 0 || max_remote_prefills > 100000) {
    return absl::InvalidArgumentError("--max_remote_prefills must be in [0, 100000]");
  }
  if (kv_max_chunk_bytes <= 0 || kv_max_chunk_bytes > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("--kv_max_chunk_bytes must be in (0, 2^31]");
  }
  if (gpu < 0) return absl::InvalidArgumentError("--gpu must be >= 0");
  if (!kvstore.empty() && !kv_dir.empty()) {
    return absl::InvalidArgumentError(
        "--kvstore and --kv_dir: give one (a shared store, or an in-process one)");
  }
  absl::StatusOr<engine::SwaPolicy> policy = engine::ParseSwaPolicy(swa_policy);
  if (!policy.ok()) return policy.status();
  if (*policy == engine::SwaPolicy::kPeriodic &&
      (swa_checkpoint_tokens <= 0 || swa_checkpoint_tokens % 128 != 0)) {
    return absl::InvalidArgumentError("--swa_checkpoint_tokens must be a positive multiple of 128");
  }
  if (kv_host_mb <= 0) return absl::InvalidArgumentError("--kv_host_mb must be positive");
  if (kv_disk_mb <= 0) return absl::InvalidArgumentError("--kv_disk_mb must be positive");
  return absl::OkStatus();
}

void AddDecodeWorkerFlags(services::FlagSet& flags, DecodeWorkerOptions* o) {
  services::AddWorkerFlags(flags, &o->worker);
  flags.Add(
      "colocated", &o->colocated,
      "Kept for compatibility: the worker always serves Inference.Generate (prefilling itself) as well as "
      "Worker.Decode.");
  flags.Add("kv_transport", &o->kv_transport,
            "How prefill workers send KV for Worker.Decode: 'grpc' (PushKv stream), 'nccl' (GPU to GPU, CUDA "
            "build) or 'in_process' (a prefill service in this process).");
  flags.Add("prefill_timeout_ms", &o->prefill_timeout_ms,
            "Remote prefill + KV arrival limit; past it (or on any failure) the worker prefills itself.");
  flags.Add("kv_reservation_timeout_ms", &o->kv_reservation_timeout_ms,
            "Reserved KV room whose transfer never completes is freed after this.");
  flags.Add("kv_max_chunk_bytes", &o->kv_max_chunk_bytes, "Largest NCCL send (KvTarget.max_chunk_bytes).");
  flags.Add("max_remote_prefills", &o->max_remote_prefills,
            "Remote prefills in flight at once; past it a request prefills on this worker (fallback reason "
            "\"busy\"). 0 = always prefill here.");
  flags.Add(
      "advertise_host", &o->advertise_host,
      "Host prefill workers reach this worker at for KV pushes; empty = the address the call came from.");
  flags.Add("gpu", &o->gpu, "GPU of the NCCL KV transport.");
  flags.Add("kv_blocks", &o->kv_blocks, "KV pool capacity in 128-token blocks (colocated).");
  flags.Add("max_step_tokens", &o->max_step_tokens, "Prefill + decode tokens per engine step (colocated).");
  flags.Add("max_running", &o->max_running, "Most sequences running at once (colocated).");
  flags.Add("preemption", &o->preemption, "When KV memory runs out: 'recompute' or 'swap' (colocated).");
  flags.Add("swap_space_mb", &o->swap_space_mb, "Host memory for swapped sequence states (colocated).");
  flags.Add("prefix_cache", &o->prefix_cache, "Reuse cached prefix blocks (colocated).");
  flags.Add("max_model_len", &o->max_model_len, "Prompt + output token cap; 0 = the model's (colocated).");
  flags.Add("kvstore", &o->kvstore,
            "host:port of the node's `v4serve kvstore`: share prefix KV with the node's other workers "
            "(colocated).");
  flags.Add("kv_dir", &o->kv_dir,
            "An in-process tiered KV store (host memory + RocksDB in this directory) instead of --kvstore.");
  flags.Add("swa_policy", &o->swa_policy,
            "Sliding-window state kept with cached blocks: full (every block), periodic (every "
            "--swa_checkpoint_tokens) or zero (none; recomputed exactly).");
  flags.Add("swa_checkpoint_tokens", &o->swa_checkpoint_tokens,
            "Checkpoint interval of --swa_policy=periodic, a multiple of 128.");
  flags.Add("kv_host_mb", &o->kv_host_mb, "Host-memory tier capacity of the in-process store (--kv_dir).");
  flags.Add("kv_disk_mb", &o->kv_disk_mb, "Disk tier capacity of the in-process store (--kv_dir).");
  flags.Add("mtp", &o->mtp,
            "MTP speculative decoding for greedy requests: draft one token with the checkpoint's MTP layer, "
            "verify it in the next step; same output (colocated).");
}

absl::Status RunDecodeWorker(const DecodeWorkerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("decode");
  services::ServerProcessOptions process = options.worker.process;
  process.accelerators = model::DescribeAccelerators();
  const std::string& dir = options.worker.model_dir;
  model::ModelOptions mo;
  mo.load_mtp = options.mtp;
  RETURN_IF_ERROR(model::SetServingNumerics(options.worker.device, options.worker.numerics, &mo));
  RETURN_IF_ERROR(model::SetCudaWeights(options.worker.cuda_weights, &mo));
  ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, model::Model::Load(dir, mo));
  V4LOG(INFO).With("device", options.worker.device).With("numerics", options.worker.numerics)
      << "model runs " << (mo.mode == model::NumericMode::kFaithful ? "faithful" : "exact") << " on "
      << model->backend().Describe();
  engine::EngineOptions eo;
  eo.mtp = options.mtp;
  eo.kv.num_blocks = options.kv_blocks;
  eo.kv.enable_prefix_cache = options.prefix_cache;
  ASSIGN_OR_RETURN(eo.kv.swa_policy, engine::ParseSwaPolicy(options.swa_policy));
  eo.kv.swa_checkpoint_tokens = options.swa_checkpoint_tokens;
  if (!options.kvstore.empty()) {
    ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds,
                     services::MakeChannelCredentials(options.worker.process.grpc.tls));
    eo.kv.store = std::make_shared<kvstore::GrpcKvStoreClient>(grpc::CreateChannel(options.kvstore, creds));
  } else if (!options.kv_dir.empty()) {
    kvstore::TieredStoreOptions to;
    to.disk_path = options.kv_dir;
    to.host_capacity_bytes = options.kv_host_mb << 20;
    to.disk_capacity_bytes = options.kv_disk_mb << 20;
    ASSIGN_OR_RETURN(std::unique_ptr<kvstore::TieredStore> store, kvstore::TieredStore::Open(to));
    eo.kv.store = std::move(store);
  }
  eo.scheduler.max_step_tokens = options.max_step_tokens;
  eo.scheduler.max_running = options.max_running;
  eo.scheduler.preemption =
      options.preemption == "swap" ? engine::PreemptionMode::kSwap : engine::PreemptionMode::kRecompute;
  eo.scheduler.swap_space_bytes = options.swap_space_mb << 20;
  eo.max_model_len =
      options.max_model_len > 0 ? options.max_model_len : model->config().max_position_embeddings;
  ASSIGN_OR_RETURN(eo.model_fingerprint, engine::ModelFingerprint(dir));
  // What the prefix cache holds, streamed to routers (Worker.KvEvents) for prefix-aware routing.
  kvstore::KvEventHub kv_events(eo.model_fingerprint, kvstore::kDefaultBlockTokens);
  if (options.prefix_cache) eo.kv.events = &kv_events;
  GenerateServiceOptions so;
  so.model_id = std::filesystem::path(dir).lexically_normal().filename().string();
  if (so.model_id.empty())
    so.model_id = std::filesystem::path(dir).lexically_normal().parent_path().filename().string();
  so.max_total_tokens = std::min<int64_t>(eo.max_model_len, options.kv_blocks * 128);
  ASSIGN_OR_RETURN(std::unique_ptr<engine::Engine> engine, engine::Engine::Create(model.get(), eo));
  engine::EngineMetrics engine_metrics(metrics.registry());
  engine::EngineLoop loop(std::move(engine), &engine_metrics);
  GenerateService service(&loop, so);
  DecodeServiceOptions dso;
  dso.generate = so;
  dso.transport = options.kv_transport == "nccl"         ? v1::KV_TRANSPORT_NCCL
                  : options.kv_transport == "in_process" ? v1::KV_TRANSPORT_IN_PROCESS
                                                         : v1::KV_TRANSPORT_GRPC;
  dso.prefill_timeout = absl::Milliseconds(options.prefill_timeout_ms);
  dso.reservation_timeout = absl::Milliseconds(options.kv_reservation_timeout_ms);
  dso.reservation_capacity_tokens = options.kv_blocks * kvstore::kDefaultBlockTokens;
  dso.max_chunk_bytes = static_cast<uint32_t>(options.kv_max_chunk_bytes);
  dso.max_remote_prefills = static_cast<int>(options.max_remote_prefills);
  dso.peer_tls = process.grpc.tls;
  dso.kv_events = options.prefix_cache ? &kv_events : nullptr;
  std::unique_ptr<kvstore::NcclApi> nccl;
  if (options.kv_transport == "nccl") {
    ASSIGN_OR_RETURN(nccl, kvstore::MakeCudaNccl(static_cast<int>(options.gpu)));
    dso.nccl = nccl.get();
    dso.nccl_options.op_timeout = dso.prefill_timeout;
  }
  ASSIGN_OR_RETURN(kvstore::KvLayout layout, engine::KvLayoutFor(model->config(), eo.model_fingerprint));
  DecodeService decode(&loop, model->config(), std::move(layout), dso, &metrics.registry());
  ASSIGN_OR_RETURN(
      std::unique_ptr<services::ServerProcess> server,
      services::ServerProcess::Start("decode", process, {&service, &decode}, &metrics, shutdown));
  decode.SetAdvertisedAddress(absl::StrCat(options.advertise_host, ":", server->grpc_port()));
  services::CloseOnDrain close_events([&kv_events] { kv_events.Close(); });  // end the event streams first
  server->AddDrainable(&close_events);
  V4LOG(INFO)
          .With("model", dir)
          .With("model_id", so.model_id)
          .With("kv_blocks", options.kv_blocks)
          .With("kv_transport", options.kv_transport)
          .With("swa_policy", options.swa_policy)
          .With("kvstore", !options.kvstore.empty() ? options.kvstore : options.kv_dir)
      << "decode worker serving Worker.Decode and Inference.Generate";
  return server->Run();
}

}  // namespace v4serve::decode
