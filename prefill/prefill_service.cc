#include "prefill/prefill_service.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "engine/kv_transfer_codec.h"
#include "engine/sampler.h"
#include "engine/sampling_proto.h"
#include "engine/state_blocks.h"
#include "grpcpp/create_channel.h"
#include "kvstore/kv_events_stream.h"
#include "kvstore/transfer/grpc_kv_transport.h"
#include "kvstore/transfer/kv_transfer.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/request_id.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::prefill {

absl::Status PrefillServiceOptions::Validate() const {
  if (max_concurrent <= 0) return absl::InvalidArgumentError("--max_concurrent_prefills must be positive");
  if (max_queued < 0) return absl::InvalidArgumentError("--max_queued_prefills must be >= 0");
  if (prefix_cache_blocks < 0) return absl::InvalidArgumentError("--prefix_cache_blocks must be >= 0");
  if (layers_per_chunk <= 0) return absl::InvalidArgumentError("--kv_layers_per_chunk must be positive");
  if (transfer_timeout <= absl::ZeroDuration())
    return absl::InvalidArgumentError("--kv_transfer_timeout_ms must be positive");
  return absl::OkStatus();
}

std::string PeerHost(const std::string& peer) {
  absl::string_view p = peer;
  if (absl::ConsumePrefix(&p, "ipv4:") || absl::ConsumePrefix(&p, "ipv6:")) {
    const size_t colon = p.rfind(':');
    if (colon != absl::string_view::npos) return std::string(p.substr(0, colon));
  }
  return "";
}

struct PrefillService::Job {
  uint64_t key = 0;
  std::string request_id;
  v1::PrefillRequest request;
  v1::PrefillResponse* response = nullptr;
  grpc::CallbackServerContext* ctx = nullptr;
  grpc::ServerUnaryReactor* reactor = nullptr;
  std::string peer_host;
  std::atomic<bool> cancelled{false};

  bool Cancelled() const { return cancelled.load() || ctx->IsCancelled(); }
};

PrefillService::PrefillService(const model::Model* model, kvstore::KvLayout layout,
                               PrefillServiceOptions options, prometheus::Registry* metrics)
    : model_(model), layout_(std::move(layout)), options_(std::move(options)) {
  requests_ = &prometheus::BuildCounter()
                   .Name("v4serve_prefill_requests_total")
                   .Help("Worker.Prefill requests by result (ok, error, cancelled, rejected).")
                   .Register(*metrics);
  kv_bytes_ = &services::MakeCounter(*metrics, "v4serve_prefill_kv_bytes_sent_total",
                                     "KV payload bytes sent to decode workers.");
  tokens_ = &services::MakeCounter(*metrics, "v4serve_prefill_tokens_total", "Prompt tokens computed.");
  cached_tokens_ = &services::MakeCounter(
      *metrics, "v4serve_prefill_prefix_hit_tokens_total",
      "Prompt tokens restored from the prefill worker's prefix cache instead of computed.");
  if (options_.prefix_cache_blocks > 0) {
    pool_ = std::make_unique<kvstore::BlockPool>(options_.prefix_cache_blocks);
    cache_ = std::make_unique<kvstore::PrefixCache>(pool_.get(), options_.kv_events);
  }
  in_flight_ =
      &services::MakeGauge(*metrics, "v4serve_prefill_in_flight", "Prefill requests computing or queued.");
}

PrefillService::~PrefillService() {
  absl::flat_hash_map<uint64_t, std::thread> threads;
  {
    absl::MutexLock l(&mu_);
    stopping_ = true;
    for (auto& [id, job] : jobs_) job->cancelled = true;
  }
  // Threads remove themselves from threads_ only through finished_; take them all and join.
  while (true) {
    {
      absl::MutexLock l(&mu_);
      for (auto& [k, t] : threads_) threads.emplace(k, std::move(t));
      threads_.clear();
      finished_.clear();
    }
    if (threads.empty()) break;
    for (auto& [k, t] : threads) {
      if (t.joinable()) t.join();
    }
    threads.clear();
  }
}

grpc::ServerUnaryReactor* PrefillService::Prefill(grpc::CallbackServerContext* ctx,
                                                  const v1::PrefillRequest* request,
                                                  v1::PrefillResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto fail = [&](const absl::Status& s, const char* result) {
    requests_->Add({{"result", result}}).Increment();
    reactor->Finish(services::ToGrpcStatus(s));
    return reactor;
  };
  if (request->token_ids().empty())
    return fail(absl::InvalidArgumentError("token_ids: the prompt is empty"), "error");
  for (int32_t t : request->token_ids()) {
    if (t < 0 || t >= model_->config().vocab_size) {
      return fail(absl::InvalidArgumentError(absl::StrCat("token_ids: id ", t, " outside the vocabulary")),
                  "error");
    }
  }
  if (!request->has_target() || request->target().reservation_id().empty()) {
    return fail(absl::InvalidArgumentError("target: the decode worker's KV reservation is missing"), "error");
  }
  auto job = std::make_shared<Job>();
  job->request_id = request->request_id().empty() ? services::RequestIdFrom(*ctx) : request->request_id();
  job->request = *request;
  job->response = response;
  job->ctx = ctx;
  job->reactor = reactor;
  job->peer_host = PeerHost(ctx->peer());
  {
    absl::MutexLock l(&mu_);
    for (uint64_t k : finished_) {
      auto it = threads_.find(k);
      if (it != threads_.end()) {
        it->second.join();
        threads_.erase(it);
      }
    }
    finished_.clear();
    if (stopping_) return fail(absl::UnavailableError("prefill worker shutting down"), "rejected");
    if (running_ + queued_ >= options_.max_concurrent + options_.max_queued) {
      return fail(absl::ResourceExhaustedError(
                      absl::StrCat("prefill worker full: ", running_, " computing and ", queued_,
                                   " queued (--max_concurrent_prefills ", options_.max_concurrent,
                                   ", --max_queued_prefills ", options_.max_queued, ")")),
                  "rejected");
    }
    if (jobs_.contains(job->request_id)) {
      return fail(
          absl::AlreadyExistsError(absl::StrCat("request ", job->request_id, " is already prefilling")),
          "rejected");
    }
    ++queued_;
    in_flight_->Increment();
    job->key = ++next_;
    jobs_[job->request_id] = job;
    threads_.emplace(job->key, std::thread([this, job] { Run(job); }));
  }
  return reactor;
}

void PrefillService::Run(const std::shared_ptr<Job>& job) {
  {
    absl::MutexLock l(&mu_);
    auto slot = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_ < options_.max_concurrent; };
    mu_.Await(absl::Condition(&slot));
    --queued_;
    ++running_;
  }
  absl::Status s =
      job->Cancelled() ? absl::CancelledError("cancelled before it started") : Compute(job.get());
  const char* result = s.ok() ? "ok" : (job->Cancelled() ? "cancelled" : "error");
  if (!s.ok() && !job->Cancelled()) {
    V4LOG(WARNING).With("request_id", job->request_id).With("status", s) << "prefill failed";
  }
  requests_->Add({{"result", result}}).Increment();
  job->reactor->Finish(services::ToGrpcStatus(s));
  absl::MutexLock l(&mu_);
  --running_;
  in_flight_->Decrement();
  jobs_.erase(job->request_id);
  finished_.push_back(job->key);
}

std::shared_ptr<grpc::Channel> PrefillService::ChannelTo(const std::string& address) {
  absl::MutexLock l(&mu_);
  std::shared_ptr<grpc::Channel>& ch = channels_[address];
  if (ch == nullptr) {
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
        services::MakeChannelCredentials(options_.peer_tls);
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(-1);
    ch = grpc::CreateCustomChannel(address, creds.ok() ? *creds : grpc::InsecureChannelCredentials(), args);
  }
  return ch;
}

absl::StatusOr<std::unique_ptr<kvstore::KvSender>> PrefillService::StartSender(Job* job) {
  const v1::KvTarget& t = job->request.target();
  const absl::Time deadline = absl::Now() + options_.transfer_timeout;
  if (t.transport() == v1::KV_TRANSPORT_IN_PROCESS) {
    kvstore::KvReservations* r = kvstore::InProcessKvHub::Get().Find(t.decode_worker());
    if (r == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("in-process KV transport, but no decode worker ",
                                                        t.decode_worker(), " in this process"));
    }
    RETURN_IF_ERROR(r->Check(t.reservation_id()));
    return std::unique_ptr<kvstore::KvSender>(new kvstore::InProcessKvSender(r, t.reservation_id()));
  }
  // ":port" means "the host this request came from".
  std::string address = t.decode_worker();
  if (!address.empty() && address[0] == ':') address = job->peer_host + address;
  if (address.empty() || address[0] == ':') {
    return absl::InvalidArgumentError("target.decode_worker: no decode worker address");
  }
  v1::KvHandshake hs;
  hs.set_reservation_id(t.reservation_id());
  hs.set_format_version(kvstore::kKvBlockFormatVersion);
  hs.set_model_fingerprint(kvstore::FingerprintBytes(layout_.model_fingerprint));
  hs.set_transport(t.transport());
  std::shared_ptr<grpc::Channel> channel = ChannelTo(address);
  if (t.transport() == v1::KV_TRANSPORT_GRPC) {
    ASSIGN_OR_RETURN(std::unique_ptr<kvstore::GrpcKvSender> s,
                     kvstore::GrpcKvSender::Start(channel, hs, job->request_id, deadline));
    return std::unique_ptr<kvstore::KvSender>(std::move(s));
  }
  if (t.transport() == v1::KV_TRANSPORT_NCCL) {
    if (options_.nccl == nullptr) {
      return absl::FailedPreconditionError(
          "this prefill worker has no NCCL transport (start it with --kv_transport=nccl)");
    }
    {  // The handshake checks format and model before the pair communicator is joined.
      auto stub = v1::Worker::NewStub(channel);
      grpc::ClientContext ctx;
      services::AttachRequestId(ctx, job->request_id);
      ctx.set_deadline(absl::ToChronoTime(deadline));
      v1::KvHandshakeReply reply;
      grpc::Status st = stub->Handshake(&ctx, hs, &reply);
      if (!st.ok()) return services::FromGrpcStatus(st);
      if (!reply.accepted()) {
        return absl::FailedPreconditionError(
            absl::StrCat("decode worker refused the KV transfer: ", reply.reason()));
      }
    }
    const uint32_t piece = t.max_chunk_bytes() > 0 ? t.max_chunk_bytes() : (4u << 20);
    return options_.nccl->Start(address, t.nccl_unique_id(), t.reservation_id(), piece);
  }
  return absl::InvalidArgumentError("target.transport: unspecified KV transport");
}

absl::Status PrefillService::Compute(Job* job) {
  const v1::PrefillRequest& req = job->request;
  const std::vector<int32_t> prompt(req.token_ids().begin(), req.token_ids().end());
  const int64_t room =
      std::max<int64_t>(1, model_->config().max_position_embeddings - static_cast<int64_t>(prompt.size()));
  ASSIGN_OR_RETURN(engine::SamplingParams params, engine::SamplingFromProto(req.sampling(), room));
  RETURN_IF_ERROR(params.Validate(model_->config().vocab_size));
  ASSIGN_OR_RETURN(std::unique_ptr<kvstore::KvSender> sender, StartSender(job));
  auto abort = [&](const absl::Status& s) {
    sender->Abort(s);
    return s;
  };
  model::SequenceState state = model_->NewState();
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t bt = layout_.block_tokens;
  const uint64_t salt = kvstore::TenantSalt(req.tenant());
  const std::vector<kvstore::BlockHash> hashes =
      kvstore::BlockHashChain(prompt, static_cast<int32_t>(bt), layout_.model_fingerprint, salt);
  const int64_t restored = RestorePrefix(prompt, hashes, &state);
  cached_tokens_->Increment(static_cast<double>(restored * bt));
  std::vector<float> logits;
  int64_t sent_blocks = 0;
  for (int64_t pos = restored * bt; pos < n;) {
    if (job->Cancelled()) return abort(absl::CancelledError("prefill cancelled by the decode worker"));
    const int64_t len = std::min(bt - pos % bt, n - pos);
    {
      absl::MutexLock l(&model_mu_);
      absl::StatusOr<std::vector<float>> out = model_->Prefill(
          &state, absl::MakeConstSpan(prompt).subspan(static_cast<size_t>(pos), static_cast<size_t>(len)),
          /*all_logits=*/false, nullptr);
      if (!out.ok()) return abort(out.status());
      logits = *std::move(out);
    }
    pos += len;
    tokens_->Increment(static_cast<double>(len));
    if (pos % bt == 0) {
      CacheBlock(state, static_cast<int32_t>(pos / bt - 1),
                 absl::MakeConstSpan(prompt).subspan(static_cast<size_t>(pos - bt), static_cast<size_t>(bt)),
                 hashes[static_cast<size_t>(pos / bt - 1)]);
    }
    // Ship every block this chunk completed while the next chunk computes.
    for (; sent_blocks < pos / bt; ++sent_blocks) {
      absl::StatusOr<std::vector<kvstore::KvTransferChunk>> chunks = engine::EncodeBlockChunks(
          layout_, state, static_cast<int32_t>(sent_blocks),
          absl::MakeConstSpan(prompt).subspan(static_cast<size_t>(sent_blocks * bt), static_cast<size_t>(bt)),
          options_.layers_per_chunk);
      if (!chunks.ok()) return abort(chunks.status());
      for (kvstore::KvTransferChunk& c : *chunks) {
        if (absl::Status s = sender->Send(std::move(c)); !s.ok()) return abort(s);
      }
    }
  }
  // The first token, sampled as the decode worker's engine would (same params, same seed).
  engine::Sampler sampler(params, params.seed.value_or(0));
  sampler.AddPromptTokens(prompt);
  engine::SampledToken first = sampler.Sample(logits);
  absl::StatusOr<kvstore::KvTransferChunk> window = engine::EncodeWindowChunk(layout_, state);
  if (!window.ok()) return abort(window.status());
  if (absl::Status s = sender->Send(*std::move(window)); !s.ok()) return abort(s);
  if (job->Cancelled()) return abort(absl::CancelledError("prefill cancelled by the decode worker"));
  RETURN_IF_ERROR(sender->Finish());
  kv_bytes_->Increment(static_cast<double>(sender->bytes_sent()));
  v1::PrefillResponse* resp = job->response;
  resp->set_request_id(req.request_id());
  v1::GeneratedToken* t = resp->mutable_first_token();
  t->set_token_id(first.id);
  t->set_logprob(first.logprob);
  for (const auto& [id, lp] : first.top) {
    v1::TokenLogprob* top = t->add_top_logprobs();
    top->set_token_id(id);
    top->set_logprob(lp);
  }
  resp->set_cached_prompt_tokens(static_cast<int32_t>(restored * bt));
  resp->set_kv_bytes_sent(sender->bytes_sent());
  V4LOG(DEBUG)
          .With("request_id", job->request_id)
          .With("prompt_tokens", n)
          .With("kv_bytes", sender->bytes_sent())
      << "prefilled";
  return absl::OkStatus();
}

int64_t PrefillService::RestorePrefix(absl::Span<const int32_t> prompt,
                                      absl::Span<const kvstore::BlockHash> hashes,
                                      model::SequenceState* state) {
  if (cache_ == nullptr || prompt.size() < 2) return 0;
  const size_t max_blocks = (prompt.size() - 1) / static_cast<size_t>(layout_.block_tokens);
  const std::vector<kvstore::BlockId> hit =
      cache_->Acquire(hashes.subspan(0, std::min(max_blocks, hashes.size())));
  std::vector<kvstore::KvBlock> blocks;
  for (size_t i = 0; i < hit.size(); ++i) {
    absl::StatusOr<std::string> bytes = pool_->Get(hit[i]);
    absl::StatusOr<kvstore::KvBlock> b = bytes.ok() ? kvstore::DecodeKvBlock(layout_, *bytes)
                                                    : absl::StatusOr<kvstore::KvBlock>(bytes.status());
    if (!b.ok() || b->block_index != static_cast<int32_t>(i) ||
        !std::equal(b->tokens.begin(), b->tokens.end(), prompt.begin() + i * layout_.block_tokens)) {
      if (!b.ok()) cache_->Erase(hashes[i]);
      break;
    }
    blocks.push_back(*std::move(b));
  }
  for (kvstore::BlockId id : hit) pool_->Unref(id).IgnoreError();
  if (blocks.empty()) return 0;
  absl::StatusOr<model::SequenceState> s = engine::RestoreState(model_->config(), layout_, blocks);
  if (!s.ok()) {
    V4LOG(WARNING).With("status", s.status()) << "cached prefix does not restore; computing it";
    return 0;
  }
  *state = *std::move(s);
  return static_cast<int64_t>(blocks.size());
}

void PrefillService::CacheBlock(const model::SequenceState& state, int32_t index,
                                absl::Span<const int32_t> tokens, kvstore::BlockHash hash) {
  if (cache_ == nullptr) return;
  absl::StatusOr<kvstore::KvBlock> b =
      engine::ExtractBlock(model_->config(), layout_, state, index, tokens, hash);
  absl::StatusOr<std::string> bytes =
      b.ok() ? kvstore::EncodeKvBlock(layout_, *b) : absl::StatusOr<std::string>(b.status());
  if (!bytes.ok()) {
    V4LOG(WARNING).With("status", bytes.status()) << "KV block not cached";
    return;
  }
  absl::StatusOr<kvstore::BlockId> id = pool_->Allocate();
  if (!id.ok() && cache_->Evict(1) > 0) id = pool_->Allocate();
  if (!id.ok()) return;  // Every cached block is in use: skip caching this one.
  if (pool_->Put(*id, *std::move(bytes)).ok()) cache_->Insert(hash, *id);
  pool_->Unref(*id).IgnoreError();  // The cache holds its own reference (or none: freed).
}

grpc::ServerUnaryReactor* PrefillService::Cancel(grpc::CallbackServerContext* ctx,
                                                 const v1::CancelRequest* request,
                                                 v1::CancelResponse* response) {
  {
    absl::MutexLock l(&mu_);
    auto it = jobs_.find(request->request_id());
    response->set_found(it != jobs_.end());
    if (it != jobs_.end()) it->second->cancelled = true;
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* PrefillService::Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest*,
                                                v1::WorkerStats* response) {
  response->set_role(v1::WORKER_ROLE_PREFILL);
  response->set_model_loaded(true);
  {
    absl::MutexLock l(&mu_);
    response->set_running_sequences(running_);
    response->set_waiting_sequences(queued_);
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<v1::KvEvent>* PrefillService::KvEvents(grpc::CallbackServerContext*,
                                                                const v1::KvEventsRequest*) {
  return kvstore::StreamKvEvents(cache_ != nullptr ? options_.kv_events : nullptr, "");
}

}  // namespace v4serve::prefill
