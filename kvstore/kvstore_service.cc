#include "kvstore/kvstore_service.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvstore/prefix_cache.h"
#include "kvstore/store_format.h"
#include "services/logging.h"
#include "services/status_mapping.h"

namespace v4serve::kvstore {

uint64_t TenantSalt(const std::string& tenant, uint64_t salt) {
  return salt != 0 ? salt : TenantSalt(absl::string_view(tenant));
}

namespace {

bool HashFromBytes(const std::string& bytes, uint64_t* hash) {
  absl::StatusOr<BlockHash> h = BlockHashFromBytes(bytes);
  if (!h.ok()) return false;
  *hash = *h;
  return true;
}

grpc::Status Invalid(const std::string& msg) { return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, msg); }

const char* const kHashError = "block id: hash must be 8 bytes (the 64-bit chain hash, big-endian)";

v1::KvEvent ToProto(const StoreEvent& e, const std::string& holder) {
  v1::KvEvent out;
  out.set_kind(e.kind == StoreEvent::Kind::kStored ? v1::KvEvent::KIND_STORED : v1::KvEvent::KIND_EVICTED);
  for (uint64_t h : e.hashes) out.add_blocks()->set_hash(BlockHashBytes(h));
  out.set_holder(holder);
  out.set_tier(TierName(e.tier));
  out.set_model_fingerprint(e.scope.model_fingerprint);
  out.set_tenant_salt(e.scope.tenant_salt);
  return out;
}

class EventStream;
struct EventLink {
  absl::Mutex mu;
  EventStream* stream ABSL_GUARDED_BY(mu) = nullptr;
};

// Streams store events; at most one write in flight, a bounded queue (older events are dropped first).
class EventStream : public grpc::ServerWriteReactor<v1::KvEvent> {
 public:
  static constexpr size_t kMaxQueued = 4096;

  EventStream(TieredStore* store, std::string holder, std::atomic<int64_t>* dropped)
      : store_(store), holder_(std::move(holder)), dropped_(dropped), link_(std::make_shared<EventLink>()) {
    {
      absl::MutexLock l(&link_->mu);
      link_->stream = this;
    }
    subscription_ = store_->Subscribe([link = link_](const StoreEvent& e) {
      absl::MutexLock l(&link->mu);
      if (link->stream == nullptr) return;
      link->stream->link_->mu.AssertHeld();
      link->stream->PushLocked(e);
    });
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&link_->mu);
    writing_ = false;
    if (!ok) {
      if (!finished_) {
        finished_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "event stream closed"));
      }
      return;
    }
    PumpLocked();
  }
  void OnCancel() override {
    absl::MutexLock l(&link_->mu);
    if (!finished_) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "event stream cancelled"));
    }
  }
  void OnDone() override {
    {
      absl::MutexLock l(&link_->mu);
      link_->stream = nullptr;
    }
    store_->Unsubscribe(subscription_);
    delete this;
  }

 private:
  void PushLocked(const StoreEvent& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finished_) return;
    if (queue_.size() >= kMaxQueued) {
      queue_.pop_front();
      dropped_->fetch_add(1);
    }
    queue_.push_back(ToProto(e, holder_));
    PumpLocked();
  }
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (writing_ || finished_ || queue_.empty()) return;
    current_ = std::move(queue_.front());
    queue_.pop_front();
    writing_ = true;
    StartWrite(&current_);
  }

  TieredStore* const store_;
  const std::string holder_;
  std::atomic<int64_t>* const dropped_;
  std::shared_ptr<EventLink> link_;
  int64_t subscription_ = -1;
  std::deque<v1::KvEvent> queue_ ABSL_GUARDED_BY(link_->mu);
  v1::KvEvent current_ ABSL_GUARDED_BY(link_->mu);
  bool writing_ ABSL_GUARDED_BY(link_->mu) = false;
  bool finished_ ABSL_GUARDED_BY(link_->mu) = false;
};

}  // namespace

grpc::ServerUnaryReactor* KvStoreService::Get(grpc::CallbackServerContext* ctx,
                                              const v1::GetBlockRequest* request,
                                              v1::GetBlockResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  uint64_t hash = 0;
  if (!HashFromBytes(request->id().hash(), &hash)) {
    reactor->Finish(Invalid(kHashError));
    return reactor;
  }
  const StoreScope scope{request->model_fingerprint(), TenantSalt(request->tenant(), request->tenant_salt())};
  absl::StatusOr<StoredBlock> b = store_->Get(scope, hash, request->with_window_state());
  if (!b.ok()) {
    reactor->Finish(services::ToGrpcStatus(b.status()));
    return reactor;
  }
  v1::BlockDescriptor* d = response->mutable_block();
  d->mutable_id()->set_hash(BlockHashBytes(hash));
  d->set_index(static_cast<uint32_t>(b->index));
  d->set_format_version(1);
  d->set_model_fingerprint(BlockHashBytes(scope.model_fingerprint));
  d->set_size_bytes(b->block.size());
  uint32_t crc = 0;
  std::memcpy(&crc, b->block.data() + b->block.size() - 4, 4);
  d->set_checksum(crc);
  d->set_has_window_state(!b->window_state.empty());
  response->set_payload(std::move(b->block));
  response->set_window_state(std::move(b->window_state));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* KvStoreService::Put(grpc::CallbackServerContext* ctx,
                                              const v1::PutBlockRequest* request,
                                              v1::PutBlockResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  uint64_t hash = 0, fingerprint = 0;
  if (!HashFromBytes(request->block().id().hash(), &hash)) {
    reactor->Finish(Invalid(kHashError));
    return reactor;
  }
  if (!HashFromBytes(request->block().model_fingerprint(), &fingerprint)) {
    reactor->Finish(Invalid("block.model_fingerprint must be 8 bytes (big-endian)"));
    return reactor;
  }
  absl::Status ok = VerifyBlockBytes(request->payload(), fingerprint, hash);
  if (ok.ok() && !request->window_state().empty()) {
    absl::StatusOr<WindowState> ws = DecodeWindowState(request->window_state());
    ok = !ws.ok() ? ws.status()
         : (ws->hash != hash || ws->model_fingerprint != fingerprint)
             ? absl::InvalidArgumentError("window_state belongs to another block")
             : absl::OkStatus();
  }
  if (!ok.ok()) {
    reactor->Finish(Invalid(absl::StrCat("payload: ", ok.message())));
    return reactor;
  }
  StoredBlock b;
  b.hash = hash;
  uint32_t index = 0;
  std::memcpy(&index, request->payload().data() + 24, 4);
  b.index = static_cast<int32_t>(index);
  b.block = request->payload();
  b.window_state = request->window_state();
  const StoreScope scope{fingerprint, TenantSalt(request->tenant(), request->tenant_salt())};
  response->set_stored(store_->PutAsync(scope, std::move(b)));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* KvStoreService::Lookup(grpc::CallbackServerContext* ctx,
                                                 const v1::LookupRequest* request,
                                                 v1::LookupResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  std::vector<uint64_t> chain;
  chain.reserve(static_cast<size_t>(request->chain_size()));
  for (const v1::BlockId& id : request->chain()) {
    uint64_t h = 0;
    if (!HashFromBytes(id.hash(), &h)) {
      reactor->Finish(Invalid(absl::StrCat("chain[", chain.size(), "]: ", kHashError)));
      return reactor;
    }
    chain.push_back(h);
  }
  const StoreScope scope{request->model_fingerprint(), TenantSalt(request->tenant(), request->tenant_salt())};
  absl::StatusOr<LookupResult> r = store_->Lookup(scope, chain);
  if (!r.ok()) {
    reactor->Finish(services::ToGrpcStatus(r.status()));
    return reactor;
  }
  response->set_matched_blocks(r->matched);
  int32_t last_state = -1;
  for (int32_t i = 0; i < r->matched; ++i) {
    response->add_tiers(TierName(r->tiers[static_cast<size_t>(i)]));
    const bool s = r->has_window_state[static_cast<size_t>(i)];
    response->add_has_window_state(s);
    if (s) last_state = i;
  }
  response->set_last_window_state(last_state);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<v1::KvEvent>* KvStoreService::Events(grpc::CallbackServerContext* ctx,
                                                              const v1::KvEventsRequest* request) {
  return new EventStream(store_, holder_, &events_dropped_);
}

// ---------------------------------------------------------------------------------------------- client

GrpcKvStoreClient::GrpcKvStoreClient(std::shared_ptr<grpc::Channel> channel, GrpcKvStoreClientOptions options)
    : options_(options), stub_(v1::KvStore::NewStub(std::move(channel))) {
  sender_ = std::thread([this] { SenderLoop(); });
}

GrpcKvStoreClient::~GrpcKvStoreClient() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    cv_.SignalAll();
  }
  sender_.join();
}

bool GrpcKvStoreClient::Unavailable() {
  return absl::ToUnixNanos(absl::Now()) < unavailable_until_ns_.load();
}

void GrpcKvStoreClient::NoteFailure(const grpc::Status& st) {
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE ||
      st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    unavailable_until_ns_.store(absl::ToUnixNanos(absl::Now() + options_.backoff));
  }
}

absl::StatusOr<LookupResult> GrpcKvStoreClient::Lookup(const StoreScope& scope,
                                                       absl::Span<const uint64_t> hashes) {
  if (Unavailable()) return absl::UnavailableError("kvstore unavailable (backing off after a failed call)");
  v1::LookupRequest req;
  req.set_model_fingerprint(scope.model_fingerprint);
  req.set_tenant_salt(scope.tenant_salt);
  for (uint64_t h : hashes) req.add_chain()->set_hash(BlockHashBytes(h));
  v1::LookupResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
  grpc::Status st = stub_->Lookup(&ctx, req, &resp);
  if (!st.ok()) {
    NoteFailure(st);
    return services::FromGrpcStatus(st);
  }
  LookupResult r;
  r.matched = std::min<int32_t>(resp.matched_blocks(), static_cast<int32_t>(hashes.size()));
  for (int32_t i = 0; i < r.matched; ++i) {
    const std::string& t = i < resp.tiers_size() ? resp.tiers(i) : std::string();
    r.tiers.push_back(t == "device" ? Tier::kDevice
                      : t == "host" ? Tier::kHost
                      : t == "disk" ? Tier::kDisk
                                    : Tier::kNone);
    r.has_window_state.push_back(i < resp.has_window_state_size() && resp.has_window_state(i));
  }
  return r;
}

absl::StatusOr<StoredBlock> GrpcKvStoreClient::Get(const StoreScope& scope, uint64_t hash, bool with_state) {
  v1::GetBlockRequest req;
  req.mutable_id()->set_hash(BlockHashBytes(hash));
  req.set_model_fingerprint(scope.model_fingerprint);
  req.set_tenant_salt(scope.tenant_salt);
  req.set_with_window_state(with_state);
  v1::GetBlockResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
  grpc::Status st = stub_->Get(&ctx, req, &resp);
  if (!st.ok()) {
    NoteFailure(st);
    return services::FromGrpcStatus(st);
  }
  // Verified again here: the bytes crossed a network.
  absl::Status ok = VerifyBlockBytes(resp.payload(), scope.model_fingerprint, hash);
  if (!ok.ok())
    return absl::NotFoundError(absl::StrCat("block from the store failed verification: ", ok.message()));
  StoredBlock b;
  b.hash = hash;
  b.index = static_cast<int32_t>(resp.block().index());
  b.block = std::move(*resp.mutable_payload());
  if (with_state && !resp.window_state().empty() && DecodeWindowState(resp.window_state()).ok()) {
    b.window_state = std::move(*resp.mutable_window_state());
  }
  return b;
}

bool GrpcKvStoreClient::PutAsync(const StoreScope& scope, StoredBlock block) {
  absl::MutexLock l(&mu_);
  if (static_cast<int32_t>(queue_.size()) >= options_.write_queue_blocks) {
    put_drops_.fetch_add(1);
    return false;
  }
  queue_.emplace_back(scope, std::move(block));
  ++in_flight_;
  cv_.SignalAll();
  return true;
}

void GrpcKvStoreClient::SenderLoop() {
  for (;;) {
    std::pair<StoreScope, StoredBlock> item;
    {
      absl::MutexLock l(&mu_);
      while (!stop_ && queue_.empty()) cv_.Wait(&mu_);
      if (queue_.empty()) return;
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    v1::PutBlockRequest req;
    v1::BlockDescriptor* d = req.mutable_block();
    d->mutable_id()->set_hash(BlockHashBytes(item.second.hash));
    d->set_index(static_cast<uint32_t>(item.second.index));
    d->set_format_version(1);
    d->set_model_fingerprint(BlockHashBytes(item.first.model_fingerprint));
    d->set_size_bytes(item.second.block.size());
    d->set_has_window_state(!item.second.window_state.empty());
    req.set_tenant_salt(item.first.tenant_salt);
    req.set_payload(std::move(item.second.block));
    req.set_window_state(std::move(item.second.window_state));
    v1::PutBlockResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.deadline));
    grpc::Status st = Unavailable() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "backing off")
                                    : stub_->Put(&ctx, req, &resp);
    if (!st.ok()) {
      NoteFailure(st);
      put_errors_.fetch_add(1);
    } else if (!resp.stored()) {
      put_drops_.fetch_add(1);
    }
    absl::MutexLock l(&mu_);
    if (--in_flight_ == 0) idle_cv_.SignalAll();
  }
}

void GrpcKvStoreClient::Flush() {
  absl::MutexLock l(&mu_);
  while (in_flight_ > 0) idle_cv_.Wait(&mu_);
}

}  // namespace v4serve::kvstore
