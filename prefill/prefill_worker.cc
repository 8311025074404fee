#include "prefill/prefill_worker.h"

#include <memory>

#include "engine/state_blocks.h"
#include "kvstore/transfer/nccl_api.h"
#include "kvstore/transfer/nccl_kv_transport.h"
#include "model/device.h"
#include "model/model.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/server_process.h"
#include "services/status_macros.h"

namespace v4serve::prefill {

absl::Status PrefillWorkerOptions::Validate() const {
  RETURN_IF_ERROR(worker.Validate());
  if (transfer_timeout_ms <= 0)
    return absl::InvalidArgumentError("--kv_transfer_timeout_ms must be positive");
  PrefillServiceOptions s = service;
  s.transfer_timeout = absl::Milliseconds(transfer_timeout_ms);
  RETURN_IF_ERROR(s.Validate());
  if (kv_transport != "grpc" && kv_transport != "nccl") {
    return absl::InvalidArgumentError("--kv_transport must be 'grpc' or 'nccl'");
  }
  if (gpu < 0) return absl::InvalidArgumentError("--gpu must be >= 0");
  return absl::OkStatus();
}

void AddPrefillWorkerFlags(services::FlagSet& flags, PrefillWorkerOptions* o) {
  services::AddWorkerFlags(flags, &o->worker);
  flags.Add("max_concurrent_prefills", &o->service.max_concurrent, "Prefill requests computing at once.");
  flags.Add("max_queued_prefills", &o->service.max_queued,
            "Prefill requests waiting for a slot; more are refused with RESOURCE_EXHAUSTED.");
  flags.Add("prefix_cache_blocks", &o->service.prefix_cache_blocks,
            "128-token blocks kept for prefix reuse (0 = off); a repeated prefix is restored, not computed.");
  flags.Add("kv_layers_per_chunk", &o->service.layers_per_chunk, "Compressed layers per KV transfer chunk.");
  flags.Add("kv_transfer_timeout_ms", &o->transfer_timeout_ms, "Handshake + KV push limit per request.");
  flags.Add("kv_transport", &o->kv_transport,
            "'grpc', or 'nccl' to also accept NCCL pair communicators from decode workers (CUDA build).");
  flags.Add("gpu", &o->gpu, "GPU used by the NCCL KV transport.");
}

absl::Status RunPrefillWorker(const PrefillWorkerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  services::MetricsRegistry metrics("prefill");
  services::ServerProcessOptions process = options.worker.process;
  process.accelerators = model::DescribeAccelerators();
  const std::string& dir = options.worker.model_dir;
  model::ModelOptions mo;
  RETURN_IF_ERROR(model::SetServingNumerics(options.worker.device, options.worker.numerics, &mo));
  RETURN_IF_ERROR(model::SetCudaWeights(options.worker.cuda_weights, &mo));
  ASSIGN_OR_RETURN(std::unique_ptr<model::Model> model, model::Model::Load(dir, mo));
  V4LOG(INFO).With("device", options.worker.device).With("numerics", options.worker.numerics)
      << "model runs " << (mo.mode == model::NumericMode::kFaithful ? "faithful" : "exact") << " on "
      << model->backend().Describe();
  ASSIGN_OR_RETURN(const uint64_t fingerprint, engine::ModelFingerprint(dir));
  ASSIGN_OR_RETURN(kvstore::KvLayout layout, engine::KvLayoutFor(model->config(), fingerprint));
  PrefillServiceOptions so = options.service;
  so.transfer_timeout = absl::Milliseconds(options.transfer_timeout_ms);
  so.peer_tls = process.grpc.tls;
  std::unique_ptr<kvstore::NcclApi> nccl;
  std::unique_ptr<kvstore::NcclKvSenders> senders;
  if (options.kv_transport == "nccl") {
    ASSIGN_OR_RETURN(nccl, kvstore::MakeCudaNccl(static_cast<int>(options.gpu)));
    kvstore::NcclKvOptions no;
    no.op_timeout = so.transfer_timeout;
    senders = std::make_unique<kvstore::NcclKvSenders>(nccl.get(), no);
    so.nccl = senders.get();
  }
  kvstore::KvEventHub kv_events(fingerprint, layout.block_tokens);
  so.kv_events = &kv_events;
  PrefillService service(model.get(), std::move(layout), so, &metrics.registry());
  ASSIGN_OR_RETURN(std::unique_ptr<services::ServerProcess> server,
                   services::ServerProcess::Start("prefill", process, {&service}, &metrics, shutdown));
  services::CloseOnDrain close_events([&kv_events] { kv_events.Close(); });  // end the event streams first
  server->AddDrainable(&close_events);
  V4LOG(INFO)
          .With("model", dir)
          .With("accelerators", process.accelerators)
          .With("kv_transport", options.kv_transport)
      << "prefill worker serving Worker.Prefill";
  return server->Run();
}

}  // namespace v4serve::prefill
