#include "decode/decode_service.h"

#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "decode/generate_stream.h"
#include "engine/kv_transfer_codec.h"
#include "grpcpp/create_channel.h"
#include "kvstore/kv_events_stream.h"
#include "kvstore/transfer/grpc_kv_transport.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/request_id.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::decode {

struct DecodeService::Job {
  uint64_t key = 0;
  std::string public_id;
  std::string prefill_worker;
  v1::DecodeRequest proto;
  engine::EngineRequest request;
  absl::Mutex mu;
  bool cancelled ABSL_GUARDED_BY(mu) = false;
  bool submitted ABSL_GUARDED_BY(mu) = false;   // The engine has it (EngineLoop::Cancel stops it).
  std::string reservation ABSL_GUARDED_BY(mu);  // While the KV is awaited.
  std::shared_ptr<grpc::ClientContext> call ABSL_GUARDED_BY(mu);  // The Prefill call in flight.
};

namespace {
const char* TransportName(v1::KvTransport t) {
  switch (t) {
    case v1::KV_TRANSPORT_IN_PROCESS:
      return "in_process";
    case v1::KV_TRANSPORT_NCCL:
      return "nccl";
    default:
      return "grpc";
  }
}

// A short label for the fallback metric.
const char* FallbackReason(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kDeadlineExceeded:
      return "timeout";
    case absl::StatusCode::kUnavailable:
      return "unavailable";
    case absl::StatusCode::kResourceExhausted:
      return "resource_exhausted";
    case absl::StatusCode::kDataLoss:
      return "data_loss";
    case absl::StatusCode::kFailedPrecondition:
      return "refused";
    default:
      return "error";
  }
}
}  // namespace

DecodeService::DecodeService(engine::EngineLoop* loop, const model::ModelConfig& config,
                             kvstore::KvLayout layout, DecodeServiceOptions options,
                             prometheus::Registry* metrics)
    : loop_(loop),
      config_(config),
      layout_(std::move(layout)),
      options_(std::move(options)),
      reservations_(kvstore::KvReservationsOptions{.capacity_tokens = options_.reservation_capacity_tokens}) {
  if (options_.nccl != nullptr) {
    nccl_receiver_ =
        std::make_unique<kvstore::NcclKvReceiver>(options_.nccl, &reservations_, options_.nccl_options);
  }
  fallbacks_ = &prometheus::BuildCounter()
                    .Name("v4serve_decode_kv_fallbacks_total")
                    .Help(
                        "Requests whose remote prefill or KV transfer failed, so decode computed the prefill "
                        "itself, by reason.")
                    .Register(*metrics);
  transfers_ = &prometheus::BuildCounter()
                    .Name("v4serve_decode_kv_transfers_total")
                    .Help("Remote prefills by transport and result (ok, failed, cancelled).")
                    .Register(*metrics);
  bytes_received_ = &services::MakeCounter(*metrics, "v4serve_decode_kv_bytes_received_total",
                                           "KV payload bytes received from prefill workers.");
  reservations_expired_ =
      &services::MakeCounter(*metrics, "v4serve_decode_kv_reservations_expired_total",
                             "KV reservations freed by their deadline before their KV arrived.");
  reservations_live_ = &services::MakeGauge(*metrics, "v4serve_decode_kv_reservations",
                                            "KV reservations waiting for their KV.");
  sweeper_ = std::thread([this] { SweepLoop(); });
}

DecodeService::~DecodeService() {
  std::vector<std::shared_ptr<Job>> jobs;
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    for (auto& [id, job] : jobs_) jobs.push_back(job);
    if (!advertised_.empty()) kvstore::InProcessKvHub::Get().Unregister(advertised_);
  }
  for (auto& job : jobs) CancelJob(job);
  while (true) {
    absl::flat_hash_map<uint64_t, std::thread> threads;
    {
      absl::MutexLock l(&mu_);
      threads.swap(threads_);
      finished_.clear();
    }
    if (threads.empty()) break;
    for (auto& [k, t] : threads) t.join();
  }
  sweeper_.join();
  nccl_receiver_.reset();
}

void DecodeService::SetAdvertisedAddress(const std::string& address) {
  absl::MutexLock l(&mu_);
  if (!advertised_.empty()) kvstore::InProcessKvHub::Get().Unregister(advertised_);
  advertised_ = address;
  kvstore::InProcessKvHub::Get().Register(address, &reservations_);
}

void DecodeService::SweepLoop() {
  absl::MutexLock l(&mu_);
  while (!stopping_) {
    auto stop = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
    mu_.AwaitWithTimeout(absl::Condition(&stop), absl::Milliseconds(100));
    reservations_.Sweep();
    const kvstore::KvReservationStats s = reservations_.stats();
    if (s.expired > expired_seen_) {
      reservations_expired_->Increment(static_cast<double>(s.expired - expired_seen_));
      expired_seen_ = s.expired;
    }
    reservations_live_->Set(static_cast<double>(s.live));
  }
}

std::shared_ptr<grpc::Channel> DecodeService::ChannelTo(const std::string& address) {
  absl::MutexLock l(&mu_);
  std::shared_ptr<grpc::Channel>& ch = channels_[address];
  if (ch == nullptr) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
        services::MakeChannelCredentials(options_.peer_tls);
    ch = grpc::CreateChannel(address, creds.ok() ? *creds : grpc::InsecureChannelCredentials());
  }
  return ch;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* DecodeService::Decode(grpc::CallbackServerContext* ctx,
                                                                      const v1::DecodeRequest* request) {
  v1::GenerateRequest g;
  g.mutable_token_ids()->mutable_ids()->CopyFrom(request->token_ids());
  *g.mutable_sampling() = request->sampling();
  g.set_tenant(request->tenant());
  absl::StatusOr<engine::EngineRequest> r = ToEngineRequest(g, options_.generate);
  if (!r.ok()) return new FailedStream(r.status());
  const std::string public_id = services::RequestIdFrom(*ctx);
  std::string engine_id = absl::StrCat(public_id, "#", next_id_.fetch_add(1));
  r->request_id = engine_id;
  engine::EngineLoop* loop = loop_;
  bool busy = false;
  if (!request->prefill_worker().empty() && r->sampling.n == 1) {
    absl::MutexLock l(&mu_);
    busy = static_cast<int64_t>(jobs_.size()) >= options_.max_remote_prefills;
  }
  if (busy) {
    fallbacks_->Add({{"reason", "busy"}}).Increment();
    V4LOG(WARNING).With("request_id", public_id).With("max_remote_prefills", options_.max_remote_prefills)
        << "too many remote prefills in flight; computing the prefill here";
  }
  if (request->prefill_worker().empty() || r->sampling.n != 1 || busy) {
    // Colocated: this worker prefills (n > 1 forks the prompt state inside the engine).
    auto* stream =
        new GenerateStream(public_id, r->sampling.n, [loop, engine_id] { loop->Cancel(engine_id); });
    r->on_output = stream->Callback();
    loop_->Submit(*std::move(r));
    return stream;
  }
  if (!r->sampling.seed.has_value()) {
    // Both workers must sample with the same seed: the prefill worker the first token, the engine the rest.
    absl::BitGen gen;
    r->sampling.seed = absl::Uniform<uint64_t>(gen);
  }
  auto job = std::make_shared<Job>();
  job->public_id = public_id;
  job->prefill_worker = request->prefill_worker();
  job->proto = *request;
  auto* stream = new GenerateStream(public_id, 1, [this, job] { CancelJob(job); });
  r->on_output = stream->Callback();
  job->request = *std::move(r);
  absl::MutexLock l(&mu_);
  for (uint64_t k : finished_) {
    auto it = threads_.find(k);
    if (it != threads_.end()) {
      it->second.join();
      threads_.erase(it);
    }
  }
  finished_.clear();
  job->key = next_id_.fetch_add(1);
  jobs_[public_id] = job;
  threads_.emplace(job->key, std::thread([this, job] { RunJob(job); }));
  return stream;
}

void DecodeService::RunJob(const std::shared_ptr<Job>& job) {
  absl::Status s = RemotePrefill(job);
  bool cancelled;
  {
    absl::MutexLock l(&job->mu);
    cancelled = job->cancelled;
  }
  const char* transport = TransportName(options_.transport);
  if (cancelled) {
    transfers_->Add({{"transport", transport}, {"result", "cancelled"}}).Increment();
  } else if (!s.ok()) {
    transfers_->Add({{"transport", transport}, {"result", "failed"}}).Increment();
    Fallback(job, s);
  } else {
    transfers_->Add({{"transport", transport}, {"result", "ok"}}).Increment();
  }
  absl::MutexLock l(&mu_);
  auto it = jobs_.find(job->public_id);
  if (it != jobs_.end() && it->second == job) jobs_.erase(it);
  finished_.push_back(job->key);
}

absl::Status DecodeService::RemotePrefill(const std::shared_ptr<Job>& job) {
  const engine::EngineRequest& req = job->request;
  const absl::Time deadline = absl::Now() + options_.prefill_timeout;
  ASSIGN_OR_RETURN(const std::string reservation,
                   reservations_.Reserve(req.request_id, static_cast<int64_t>(req.prompt.size()),
                                         absl::Now() + options_.reservation_timeout));
  {
    absl::MutexLock l(&job->mu);
    job->reservation = reservation;  // CancelJob releases it, which ends a wait for the KV at once.
  }
  // Whatever happens below, the reservation does not outlive this call (Await releases it on success).
  struct ReleaseOnExit {
    kvstore::KvReservations* r;
    std::string id;
    ~ReleaseOnExit() { r->Release(id); }
  } release{&reservations_, reservation};

  v1::PrefillRequest pr;
  pr.set_request_id(job->public_id);
  pr.mutable_token_ids()->CopyFrom(job->proto.token_ids());
  pr.set_tenant(job->proto.tenant());
  *pr.mutable_sampling() = job->proto.sampling();
  pr.mutable_sampling()->set_seed(*req.sampling.seed);
  v1::KvTarget* t = pr.mutable_target();
  {
    absl::MutexLock l(&mu_);
    t->set_decode_worker(advertised_);
  }
  if (t->decode_worker().empty())
    return absl::FailedPreconditionError("decode worker has no advertised address");
  t->set_reservation_id(reservation);
  t->set_transport(options_.transport);
  t->set_max_chunk_bytes(options_.max_chunk_bytes);
  if (options_.transport == v1::KV_TRANSPORT_NCCL) {
    if (nccl_receiver_ == nullptr) return absl::FailedPreconditionError("NCCL transport not configured");
    ASSIGN_OR_RETURN(std::string id, nccl_receiver_->UniqueIdFor(job->prefill_worker));
    t->set_nccl_unique_id(std::move(id));
    t->set_nccl_rank(0);
  }
  auto call = std::make_shared<grpc::ClientContext>();
  services::AttachRequestId(*call, job->public_id);
  call->set_deadline(absl::ToChronoTime(deadline));
  {
    absl::MutexLock l(&job->mu);
    if (job->cancelled) return absl::CancelledError("cancelled");
    job->call = call;
  }
  v1::PrefillResponse resp;
  grpc::Status st = v1::Worker::NewStub(ChannelTo(job->prefill_worker))->Prefill(call.get(), pr, &resp);
  {
    absl::MutexLock l(&job->mu);
    job->call = nullptr;
    if (job->cancelled) return absl::CancelledError("cancelled");
  }
  if (!st.ok()) {
    absl::Status as = services::FromGrpcStatus(st);
    return absl::Status(as.code(), absl::StrCat("prefill worker ", job->prefill_worker, ": ", as.message()));
  }
  ASSIGN_OR_RETURN(kvstore::KvTransferResult kv, reservations_.Await(reservation, deadline));
  bytes_received_->Increment(static_cast<double>(kv.bytes));
  std::vector<std::string> pages;  // The blocks' payloads, for the backend's device KV cache.
  ASSIGN_OR_RETURN(model::SequenceState state,
                   engine::AssembleTransferredState(config_, layout_, req.prompt, kv.chunks, &pages));
  engine::SampledToken first;
  first.id = resp.first_token().token_id();
  first.logprob = resp.first_token().logprob();
  for (const v1::TokenLogprob& tl : resp.first_token().top_logprobs())
    first.top.emplace_back(tl.token_id(), tl.logprob());
  absl::MutexLock l(&job->mu);
  if (job->cancelled) return absl::CancelledError("cancelled");
  job->submitted = true;
  loop_->SubmitPrefilled(job->request, std::move(state), std::move(first), resp.cached_prompt_tokens(),
                         std::move(pages));
  V4LOG(DEBUG)
          .With("request_id", job->public_id)
          .With("prefill_worker", job->prefill_worker)
          .With("kv_bytes", kv.bytes)
      << "KV received; decoding";
  return absl::OkStatus();
}

void DecodeService::Fallback(const std::shared_ptr<Job>& job, const absl::Status& why) {
  fallbacks_->Add({{"reason", FallbackReason(why)}}).Increment();
  V4LOG(WARNING)
          .With("request_id", job->public_id)
          .With("prefill_worker", job->prefill_worker)
          .With("status", why)
      << "remote prefill failed; computing the prefill here";
  absl::MutexLock l(&job->mu);
  if (job->cancelled || job->submitted) return;
  job->submitted = true;
  loop_->Submit(job->request);
}

void DecodeService::CancelJob(const std::shared_ptr<Job>& job) {
  std::shared_ptr<grpc::ClientContext> call;
  bool submitted;
  std::string reservation;
  {
    absl::MutexLock l(&job->mu);
    if (job->cancelled) return;
    job->cancelled = true;
    call = job->call;
    submitted = job->submitted;
    reservation = job->reservation;
  }
  if (call) call->TryCancel();  // The prefill worker sees the cancellation and stops between blocks.
  if (!reservation.empty()) reservations_.Release(reservation);
  if (submitted) {
    loop_->Cancel(job->request.request_id);  // The engine reports the cancellation to the stream.
  } else {
    // The engine never saw it: end the stream here.
    engine::SequenceOutput out;
    out.request_id = job->request.request_id;
    out.finish = engine::FinishReason::kCancelled;
    out.prompt_tokens = static_cast<int32_t>(job->request.prompt.size());
    job->request.on_output(out);
  }
}

grpc::ServerReadReactor<v1::KvChunk>* DecodeService::PushKv(grpc::CallbackServerContext*,
                                                            v1::KvTransferAck* ack) {
  return new kvstore::PushKvReactor(&reservations_, ack);
}

grpc::ServerUnaryReactor* DecodeService::Handshake(grpc::CallbackServerContext* ctx,
                                                   const v1::KvHandshake* request,
                                                   v1::KvHandshakeReply* reply) {
  *reply = kvstore::AnswerHandshake(reservations_, *request, layout_.model_fingerprint);
  if (request->transport() == v1::KV_TRANSPORT_NCCL && nccl_receiver_ == nullptr) {
    reply->set_accepted(false);
    reply->set_reason("this decode worker has no NCCL transport");
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Cancel(grpc::CallbackServerContext* ctx,
                                                const v1::CancelRequest* request,
                                                v1::CancelResponse* response) {
  std::shared_ptr<Job> job;
  {
    absl::MutexLock l(&mu_);
    auto it = jobs_.find(request->request_id());
    if (it != jobs_.end()) job = it->second;
  }
  response->set_found(job != nullptr);
  if (job) CancelJob(job);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* DecodeService::Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest*,
                                               v1::WorkerStats* response) {
  const engine::EngineStats s = loop_->Stats();
  response->set_role(v1::WORKER_ROLE_DECODE);
  response->set_model(options_.generate.model_id);
  response->set_model_loaded(true);
  response->set_running_sequences(static_cast<int32_t>(s.running));
  response->set_waiting_sequences(static_cast<int32_t>(s.waiting + s.swapped));
  response->set_kv_blocks_used(s.kv_blocks_used);
  response->set_kv_blocks_free(s.kv_blocks_free);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<v1::KvEvent>* DecodeService::KvEvents(grpc::CallbackServerContext*,
                                                               const v1::KvEventsRequest*) {
  std::string holder;
  {
    absl::MutexLock l(&mu_);
    holder = advertised_;
  }
  return kvstore::StreamKvEvents(options_.kv_events, holder);
}

}  // namespace v4serve::decode
