// Worker.Decode with its prefill worker in the same test process, over real loopback gRPC servers:
// every transport (in-process, gRPC PushKv, NCCL on the fake NCCL-like interface) gives the reference
// greedy tokens (model::Generate, no engine); a prefill worker that is gone, too slow, or whose KV never
// completes makes the decode worker prefill itself (counted) and frees the reservation.
#include "decode/decode_service.h"

#include <memory>
#include <thread>

#include "absl/synchronization/notification.h"
#include "engine/engine_loop.h"
#include "engine/state_blocks.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvstore/transfer/fake_nccl.h"
#include "kvstore/transfer/grpc_kv_transport.h"
#include "prefill/prefill_service.h"
#include "prometheus/text_serializer.h"
#include "services/grpc_server.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::decode {
namespace {

using engine::testing::RandomTokens;
using engine::testing::ReferenceGreedy;
using engine::testing::TinyModel;
using ::testing::HasSubstr;

constexpr uint64_t kFingerprint = 0xABCD;

kvstore::KvLayout Layout() { return *engine::KvLayoutFor(TinyModel().config(), kFingerprint); }

double Sum(prometheus::Registry& r, const std::string& name, const std::string& label = "") {
  const std::string text = prometheus::TextSerializer().Serialize(r.Collect());
  double sum = 0;
  size_t pos = 0;
  while ((pos = text.find("\n" + name, pos)) != std::string::npos) {
    const size_t end = text.find('\n', pos + 1);
    const std::string line = text.substr(pos + 1, end - pos - 1);
    pos = end;
    if (line.size() > name.size() && line[name.size()] != ' ' && line[name.size()] != '{') continue;
    if (!label.empty() && line.find(label) == std::string::npos) continue;
    sum += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return sum;
}

struct Output {
  grpc::Status status;
  std::vector<int32_t> tokens;
  absl::Duration took;
};

// A prefill worker that never answers in time.
class StuckPrefill final : public v1::Worker::CallbackService {
 public:
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest*,
                                    v1::PrefillResponse*) override {
    auto* reactor = ctx->DefaultReactor();
    std::thread([reactor] {
      absl::SleepFor(absl::Seconds(3));
      reactor->Finish(grpc::Status(grpc::StatusCode::INTERNAL, "too late"));
    }).detach();
    return reactor;
  }
};

// A prefill worker that pushes one block chunk and then answers OK without the last chunk.
class IncompletePrefill final : public v1::Worker::CallbackService {
 public:
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest* req,
                                    v1::PrefillResponse* resp) override {
    auto* reactor = ctx->DefaultReactor();
    const std::string peer = prefill::PeerHost(ctx->peer());
    v1::PrefillRequest copy = *req;
    std::thread([reactor, peer, copy, resp] {
      v1::KvHandshake hs;
      hs.set_reservation_id(copy.target().reservation_id());
      hs.set_format_version(kvstore::kKvBlockFormatVersion);
      hs.set_model_fingerprint(kvstore::FingerprintBytes(kFingerprint));
      hs.set_transport(v1::KV_TRANSPORT_GRPC);
      auto channel =
          grpc::CreateChannel(peer + copy.target().decode_worker(), grpc::InsecureChannelCredentials());
      auto s = kvstore::GrpcKvSender::Start(channel, hs, "incomplete", absl::Now() + absl::Seconds(10));
      if (s.ok()) {
        kvstore::KvTransferChunk c;
        c.num_layers = 1;
        c.num_tokens = 128;
        c.payload = "not even a block";
        (*s)->Send(c).IgnoreError();
      }
      resp->mutable_first_token()->set_token_id(5);
      reactor->Finish(grpc::Status::OK);
      // Keep the stream open (no last chunk, no cancel) past the reservation's deadline.
      absl::SleepFor(absl::Milliseconds(1500));
    }).detach();
    return reactor;
  }
};

// A prefill worker that waits for its caller to cancel and records that it saw it.
class CancelWatchingPrefill final : public v1::Worker::CallbackService {
 public:
  absl::Notification started, saw_cancel;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx, const v1::PrefillRequest*,
                                    v1::PrefillResponse*) override {
    auto* reactor = ctx->DefaultReactor();
    started.Notify();
    std::thread([this, ctx, reactor] {
      const absl::Time deadline = absl::Now() + absl::Seconds(10);
      while (!ctx->IsCancelled() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
      if (ctx->IsCancelled()) saw_cancel.Notify();
      reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    }).detach();
    return reactor;
  }
};

class DecodeServiceTest : public ::testing::Test {
 protected:
  void Start(v1::KvTransport transport, grpc::Service* prefill_service = nullptr,
             absl::Duration prefill_timeout = absl::Seconds(30),
             absl::Duration reservation_timeout = absl::Seconds(30)) {
    engine::EngineOptions eo;
    eo.kv.num_blocks = 64;
    eo.model_fingerprint = kFingerprint;
    loop_ = std::make_unique<engine::EngineLoop>(*engine::Engine::Create(&TinyModel(), eo), nullptr);
    DecodeServiceOptions o;
    o.generate.model_id = "tiny_v4";
    o.generate.max_total_tokens = 64 * 128;
    o.transport = transport;
    o.prefill_timeout = prefill_timeout;
    o.reservation_timeout = reservation_timeout;
    o.max_chunk_bytes = 1000;  // NCCL pieces smaller than a layer's block.
    o.max_remote_prefills = max_remote_prefills_;
    if (transport == v1::KV_TRANSPORT_NCCL) {
      o.nccl = &decode_nccl_;
      o.nccl_options.init_timeout = absl::Seconds(5);
    }
    decode_ =
        std::make_unique<DecodeService>(loop_.get(), TinyModel().config(), Layout(), o, &decode_metrics_);
    services::GrpcServerOptions so;
    so.host = "127.0.0.1";
    auto d = services::GrpcServer::Start(so, {decode_.get()});
    ASSERT_TRUE(d.ok()) << d.status();
    decode_server_ = std::move(*d);
    decode_->SetAdvertisedAddress(absl::StrCat(":", decode_server_->port()));
    if (prefill_service == nullptr) {
      prefill::PrefillServiceOptions po;
      po.nccl = &senders_;
      prefill_ = std::make_unique<prefill::PrefillService>(&TinyModel(), Layout(), po, &prefill_metrics_);
      prefill_service = prefill_.get();
    }
    auto p = services::GrpcServer::Start(so, {prefill_service});
    ASSERT_TRUE(p.ok()) << p.status();
    prefill_server_ = std::move(*p);
    prefill_address_ = absl::StrCat("127.0.0.1:", prefill_server_->port());
  }
  void TearDown() override {
    if (decode_server_) decode_server_->Shutdown(absl::Now() + absl::Seconds(5));
    if (prefill_server_) prefill_server_->Shutdown(absl::Now() + absl::Seconds(5));
    decode_.reset();
    prefill_.reset();
    loop_.reset();
  }

  Output Decode(const std::vector<int32_t>& prompt, int max_tokens, const std::string& prefill_worker) {
    auto stub = v1::Worker::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", decode_server_->port()),
                                                        grpc::InsecureChannelCredentials()));
    v1::DecodeRequest req;
    for (int32_t t : prompt) req.add_token_ids(t);
    req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    req.mutable_sampling()->set_ignore_eos(true);
    req.set_prefill_worker(prefill_worker);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    const absl::Time start = absl::Now();
    auto reader = stub->Decode(&ctx, req);
    Output out;
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      for (const auto& t : m.tokens()) out.tokens.push_back(t.token_id());
    }
    out.status = reader->Finish();
    out.took = absl::Now() - start;
    return out;
  }

  std::shared_ptr<kvstore::FakeNcclWorld> world_ = std::make_shared<kvstore::FakeNcclWorld>();
  kvstore::FakeNccl decode_nccl_{world_}, prefill_nccl_{world_};
  kvstore::NcclKvSenders senders_{&prefill_nccl_, kvstore::NcclKvOptions{.init_timeout = absl::Seconds(5)}};
  prometheus::Registry decode_metrics_, prefill_metrics_;
  std::unique_ptr<engine::EngineLoop> loop_;
  std::unique_ptr<DecodeService> decode_;
  std::unique_ptr<prefill::PrefillService> prefill_;
  std::unique_ptr<services::GrpcServer> decode_server_, prefill_server_;
  std::string prefill_address_;
  int max_remote_prefills_ = 256;
};

class TransportTest : public DecodeServiceTest, public ::testing::WithParamInterface<v1::KvTransport> {};

TEST_P(TransportTest, RemotePrefillGivesTheReferenceTokens) {
  Start(GetParam());
  std::mt19937 rng(17);
  for (int64_t len : {9, 128, 290}) {
    const std::vector<int32_t> prompt = RandomTokens(&rng, len);
    Output out = Decode(prompt, 10, prefill_address_);
    ASSERT_TRUE(out.status.ok()) << out.status.error_message();
    EXPECT_EQ(out.tokens, ReferenceGreedy(prompt, 10)) << "prompt of " << len;
  }
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_transfers_total", "result=\"ok\""), 3);
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total"), 0);
  EXPECT_EQ(Sum(prefill_metrics_, "v4serve_prefill_tokens_total"), 9 + 128 + 290);
  EXPECT_EQ(decode_->reservations()->stats().live, 0);
  if (GetParam() == v1::KV_TRANSPORT_NCCL) {
    EXPECT_EQ(world_->comms_created.load(), 2);  // One pair (both ranks), reused by every request.
  }
  // A repeated prefix is restored on the prefill worker, not recomputed, and still decodes right.
  const std::vector<int32_t> prompt = RandomTokens(&rng, 300);
  ASSERT_TRUE(Decode(prompt, 4, prefill_address_).status.ok());
  Output again = Decode(prompt, 4, prefill_address_);
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.tokens, ReferenceGreedy(prompt, 4));
  EXPECT_EQ(Sum(prefill_metrics_, "v4serve_prefill_prefix_hit_tokens_total"), 256);
}

INSTANTIATE_TEST_SUITE_P(Transports, TransportTest,
                         ::testing::Values(v1::KV_TRANSPORT_IN_PROCESS, v1::KV_TRANSPORT_GRPC,
                                           v1::KV_TRANSPORT_NCCL),
                         [](const auto& info) {
                           return std::string(v1::KvTransport_Name(info.param)).substr(13);
                         });

TEST_F(DecodeServiceTest, UnreachablePrefillWorkerFallsBackToALocalPrefill) {
  Start(v1::KV_TRANSPORT_GRPC);
  std::mt19937 rng(2);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 200);
  Output out = Decode(prompt, 6, "127.0.0.1:1");
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.tokens, ReferenceGreedy(prompt, 6));
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total", "reason=\"unavailable\""), 1);
  EXPECT_EQ(decode_->reservations()->stats().live, 0);
}

TEST_F(DecodeServiceTest, SlowPrefillWorkerTimesOutAndFallsBack) {
  StuckPrefill stuck;
  Start(v1::KV_TRANSPORT_GRPC, &stuck, /*prefill_timeout=*/absl::Milliseconds(300));
  std::mt19937 rng(4);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 50);
  Output out = Decode(prompt, 6, prefill_address_);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.tokens, ReferenceGreedy(prompt, 6));
  EXPECT_LT(out.took, absl::Seconds(2));
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total", "reason=\"timeout\""), 1);
}

// Remote prefills hold a thread each while they wait: past the limit a request prefills here at once.
TEST_F(DecodeServiceTest, RemotePrefillsPastTheLimitPrefillLocally) {
  CancelWatchingPrefill watcher;
  max_remote_prefills_ = 1;
  Start(v1::KV_TRANSPORT_GRPC, &watcher, /*prefill_timeout=*/absl::Seconds(3));
  std::mt19937 rng(9);
  const std::vector<int32_t> first = RandomTokens(&rng, 40), second = RandomTokens(&rng, 60);
  Output out1;
  std::thread t([&] { out1 = Decode(first, 4, prefill_address_); });
  watcher.started.WaitForNotification();  // The first request holds the only remote slot.
  Output out2 = Decode(second, 4, prefill_address_);
  ASSERT_TRUE(out2.status.ok()) << out2.status.error_message();
  EXPECT_EQ(out2.tokens, ReferenceGreedy(second, 4));
  EXPECT_LT(out2.took, absl::Seconds(2));  // Not queued behind the stuck prefill.
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total", "reason=\"busy\""), 1);
  t.join();  // The first times out on the stuck prefill worker and falls back too.
  ASSERT_TRUE(out1.status.ok()) << out1.status.error_message();
  EXPECT_EQ(out1.tokens, ReferenceGreedy(first, 4));
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total", "reason=\"timeout\""), 1);
}

TEST_F(DecodeServiceTest, ReservationWhoseKvNeverCompletesIsFreedAndDecodeFallsBack) {
  IncompletePrefill incomplete;
  Start(v1::KV_TRANSPORT_GRPC, &incomplete, /*prefill_timeout=*/absl::Seconds(30),
        /*reservation_timeout=*/absl::Milliseconds(400));
  std::mt19937 rng(6);
  const std::vector<int32_t> prompt = RandomTokens(&rng, 60);
  Output out = Decode(prompt, 5, prefill_address_);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  EXPECT_EQ(out.tokens, ReferenceGreedy(prompt, 5));  // Not the bogus first token 5.
  EXPECT_LT(out.took, absl::Seconds(5));
  EXPECT_GE(out.took, absl::Milliseconds(400));  // It waited for the reservation's deadline.
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total", "reason=\"timeout\""), 1);
  EXPECT_EQ(decode_->reservations()->stats().expired, 1);
  EXPECT_EQ(decode_->reservations()->stats().live, 0);
  absl::SleepFor(absl::Milliseconds(1600));  // Let the fake prefill's thread finish before teardown.
}

TEST_F(DecodeServiceTest, ClientCancelReachesThePrefillWorker) {
  CancelWatchingPrefill watcher;
  Start(v1::KV_TRANSPORT_GRPC, &watcher);
  auto stub = v1::Worker::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", decode_server_->port()),
                                                      grpc::InsecureChannelCredentials()));
  v1::DecodeRequest req;
  for (int i = 0; i < 40; ++i) req.add_token_ids(2 + i);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_tokens(4);
  req.set_prefill_worker(prefill_address_);
  grpc::ClientContext ctx;
  auto reader = stub->Decode(&ctx, req);
  ASSERT_TRUE(watcher.started.WaitForNotificationWithTimeout(absl::Seconds(10)));
  ctx.TryCancel();  // The router's client went away.
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(watcher.saw_cancel.WaitForNotificationWithTimeout(absl::Seconds(5)));
  // No fallback for a cancelled request, and its reservation is gone.
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_fallbacks_total"), 0);
  EXPECT_EQ(Sum(decode_metrics_, "v4serve_decode_kv_transfers_total", "result=\"cancelled\""), 1);
  EXPECT_EQ(decode_->reservations()->stats().live, 0);
}

TEST_F(DecodeServiceTest, HandshakeRefusesAnotherModel) {
  Start(v1::KV_TRANSPORT_GRPC);
  auto stub = v1::Worker::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", decode_server_->port()),
                                                      grpc::InsecureChannelCredentials()));
  absl::StatusOr<std::string> id = decode_->reservations()->Reserve("r", 10, absl::Now() + absl::Seconds(10));
  v1::KvHandshake hs;
  hs.set_reservation_id(*id);
  hs.set_format_version(kvstore::kKvBlockFormatVersion);
  hs.set_model_fingerprint(kvstore::FingerprintBytes(kFingerprint + 1));
  hs.set_transport(v1::KV_TRANSPORT_GRPC);
  grpc::ClientContext ctx;
  v1::KvHandshakeReply reply;
  ASSERT_TRUE(stub->Handshake(&ctx, hs, &reply).ok());
  EXPECT_FALSE(reply.accepted());
  EXPECT_THAT(reply.reason(), HasSubstr("fingerprint"));
}

}  // namespace
}  // namespace v4serve::decode
