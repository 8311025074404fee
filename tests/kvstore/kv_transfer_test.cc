// The KV-transfer interface and its three transports: reservations (capacity, expiry, failure), the
// in-process sender, the gRPC stream over a real loopback server, and the NCCL transport on the fake
// NCCL-like interface (pair setup, chunked sends, failure handling).
#include "kvstore/transfer/kv_transfer.h"

#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvstore/kv_block.h"
#include "kvstore/transfer/fake_nccl.h"
#include "kvstore/transfer/grpc_kv_transport.h"
#include "kvstore/transfer/nccl_kv_transport.h"
#include "services/grpc_server.h"

namespace v4serve::kvstore {
namespace {

using ::testing::HasSubstr;

KvTransferChunk Chunk(uint32_t first_token, size_t bytes, bool last = false, char fill = 'a') {
  KvTransferChunk c;
  c.first_layer = 0;
  c.num_layers = 1;
  c.first_token = first_token;
  c.num_tokens = 128;
  c.last = last;
  c.window_state = last;
  c.payload.resize(bytes);
  for (size_t i = 0; i < bytes; ++i) c.payload[i] = static_cast<char>(fill + (i % 23));
  return c;
}

absl::Time Far() { return absl::Now() + absl::Seconds(30); }

TEST(KvReservationsTest, CompletedTransferReturnsChunksInOrderAndFreesRoom) {
  KvReservations r(KvReservationsOptions{.capacity_tokens = 300});
  absl::StatusOr<std::string> id = r.Reserve("req-1", 200, Far());
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(r.Reserve("req-2", 200, Far()).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(r.Deliver(*id, Chunk(0, 10)).ok());
  ASSERT_TRUE(r.Deliver(*id, Chunk(128, 0)).ok());
  ASSERT_TRUE(r.Deliver(*id, Chunk(200, 7, /*last=*/true)).ok());
  EXPECT_EQ(r.Deliver(*id, Chunk(0, 1)).code(), absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<KvTransferResult> got = r.Await(*id, Far());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->chunks.size(), 3u);
  EXPECT_EQ(got->chunks[0], Chunk(0, 10));
  EXPECT_EQ(got->chunks[2], Chunk(200, 7, true));
  EXPECT_EQ(got->bytes, 17u);
  EXPECT_EQ(r.stats().live, 0);
  EXPECT_TRUE(r.Reserve("req-2", 300, Far()).ok());  // The room came back.
  EXPECT_EQ(r.Reserve("req-3", 0, Far()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvReservationsTest, ReservationWhoseKvNeverArrivesIsFreedAtItsDeadline) {
  absl::Time now = absl::FromUnixSeconds(1000);
  KvReservations r(KvReservationsOptions{.capacity_tokens = 128}, [&now] { return now; });
  absl::StatusOr<std::string> id = r.Reserve("req-1", 128, now + absl::Seconds(5));
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(r.Deliver(*id, Chunk(0, 4)).ok());
  EXPECT_EQ(r.Sweep(), 0);
  now += absl::Seconds(6);
  EXPECT_EQ(r.Sweep(), 1);
  EXPECT_EQ(r.stats().expired, 1);
  EXPECT_EQ(r.stats().tokens_reserved, 0);
  EXPECT_EQ(r.Deliver(*id, Chunk(128, 4)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(r.Await(*id, now + absl::Seconds(1)).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(r.Reserve("req-2", 128, now + absl::Seconds(5)).ok());
}

TEST(KvReservationsTest, AwaitTimesOutWithoutFreeingAndSeesFailures) {
  KvReservations r(KvReservationsOptions{});
  absl::StatusOr<std::string> id = r.Reserve("req-1", 10, Far());
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(r.Await(*id, absl::Now() + absl::Milliseconds(30)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(r.Check(*id).ok());  // Still live: only its own deadline frees it.
  std::thread failer([&] {
    absl::SleepFor(absl::Milliseconds(20));
    r.Fail(*id, absl::AbortedError("peer gone"));
  });
  absl::StatusOr<KvTransferResult> got = r.Await(*id, Far());
  failer.join();
  EXPECT_EQ(got.status().code(), absl::StatusCode::kAborted);
  EXPECT_THAT(got.status().message(), HasSubstr("peer gone"));
  EXPECT_EQ(r.stats().live, 0);
}

TEST(KvReservationsTest, OversizedChunkIsRefused) {
  KvReservations r(KvReservationsOptions{.max_chunk_bytes = 8});
  absl::StatusOr<std::string> id = r.Reserve("req-1", 10, Far());
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(r.Deliver(*id, Chunk(0, 9)).code(), absl::StatusCode::kInvalidArgument);
}

TEST(InProcessKvSenderTest, DeliversStraightIntoTheReservation) {
  KvReservations r(KvReservationsOptions{});
  absl::StatusOr<std::string> id = r.Reserve("req-1", 256, Far());
  ASSERT_TRUE(id.ok());
  InProcessKvHub::Get().Register("in-process-test:1", &r);
  KvReservations* found = InProcessKvHub::Get().Find("in-process-test:1");
  ASSERT_EQ(found, &r);
  InProcessKvSender s(found, *id);
  ASSERT_TRUE(s.Send(Chunk(0, 100)).ok());
  ASSERT_TRUE(s.Send(Chunk(128, 5, true)).ok());
  ASSERT_TRUE(s.Finish().ok());
  EXPECT_EQ(s.bytes_sent(), 105u);
  absl::StatusOr<KvTransferResult> got = r.Await(*id, Far());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->chunks.size(), 2u);
  InProcessKvHub::Get().Unregister("in-process-test:1");
  EXPECT_EQ(InProcessKvHub::Get().Find("in-process-test:1"), nullptr);

  // Aborting fails the receiver's wait.
  absl::StatusOr<std::string> id2 = r.Reserve("req-2", 256, Far());
  InProcessKvSender s2(&r, *id2);
  s2.Abort(absl::CancelledError("client went away"));
  EXPECT_EQ(r.Await(*id2, Far()).status().code(), absl::StatusCode::kCancelled);
}

// The receiving end of the gRPC transport, as a decode worker serves it.
class ReceiverService final : public v1::Worker::CallbackService {
 public:
  ReceiverService(KvReservations* r, uint64_t fingerprint) : r_(r), fingerprint_(fingerprint) {}
  grpc::ServerReadReactor<v1::KvChunk>* PushKv(grpc::CallbackServerContext*,
                                               v1::KvTransferAck* ack) override {
    return new PushKvReactor(r_, ack);
  }
  grpc::ServerUnaryReactor* Handshake(grpc::CallbackServerContext* ctx, const v1::KvHandshake* req,
                                      v1::KvHandshakeReply* reply) override {
    *reply = AnswerHandshake(*r_, *req, fingerprint_);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  KvReservations* r_;
  uint64_t fingerprint_;
};

class GrpcKvTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    services::GrpcServerOptions o;
    o.host = "127.0.0.1";
    absl::StatusOr<std::unique_ptr<services::GrpcServer>> s = services::GrpcServer::Start(o, {&service_});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->port()),
                                   grpc::InsecureChannelCredentials());
  }
  void TearDown() override { server_->Shutdown(absl::Now() + absl::Seconds(2)); }

  v1::KvHandshake Handshake(const std::string& reservation, uint64_t fingerprint = 42) {
    v1::KvHandshake h;
    h.set_reservation_id(reservation);
    h.set_format_version(kKvBlockFormatVersion);
    h.set_model_fingerprint(FingerprintBytes(fingerprint));
    h.set_transport(v1::KV_TRANSPORT_GRPC);
    return h;
  }

  KvReservations reservations_{KvReservationsOptions{}};
  ReceiverService service_{&reservations_, 42};
  std::unique_ptr<services::GrpcServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(GrpcKvTransportTest, StreamsEveryChunkAndIsAcknowledged) {
  absl::StatusOr<std::string> id = reservations_.Reserve("req-1", 1000, Far());
  ASSERT_TRUE(id.ok());
  absl::StatusOr<std::unique_ptr<GrpcKvSender>> s =
      GrpcKvSender::Start(channel_, Handshake(*id), "req-1", Far());
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<KvTransferChunk> sent;
  for (uint32_t b = 0; b < 7; ++b)
    sent.push_back(Chunk(b * 128, 1000 + b * 333, false, static_cast<char>('a' + b)));
  sent.push_back(Chunk(0, 0));  // A zero-length layer.
  sent.push_back(Chunk(896, 77, /*last=*/true));
  for (const KvTransferChunk& c : sent) ASSERT_TRUE((*s)->Send(c).ok());
  ASSERT_TRUE((*s)->Finish().ok());
  absl::StatusOr<KvTransferResult> got = reservations_.Await(*id, Far());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->chunks, sent);
  EXPECT_EQ(got->bytes, (*s)->bytes_sent());
}

TEST_F(GrpcKvTransportTest, HandshakeRefusesAnotherModelOrAnUnknownReservation) {
  absl::StatusOr<std::string> id = reservations_.Reserve("req-1", 10, Far());
  absl::StatusOr<std::unique_ptr<GrpcKvSender>> s =
      GrpcKvSender::Start(channel_, Handshake(*id, /*fingerprint=*/7), "req-1", Far());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.status().message(), HasSubstr("fingerprint"));
  s = GrpcKvSender::Start(channel_, Handshake("kvr-nope"), "req-1", Far());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.status().message(), HasSubstr("no live KV reservation"));
}

TEST_F(GrpcKvTransportTest, ExpiredReservationFailsTheSender) {
  absl::StatusOr<std::string> id = reservations_.Reserve("req-1", 10, absl::Now() + absl::Milliseconds(300));
  absl::StatusOr<std::unique_ptr<GrpcKvSender>> s =
      GrpcKvSender::Start(channel_, Handshake(*id), "req-1", Far());
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Send(Chunk(0, 10)).ok());
  absl::SleepFor(absl::Milliseconds(400));
  absl::Status st = (*s)->Send(Chunk(128, 10, true));
  if (st.ok()) st = (*s)->Finish();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
}

TEST_F(GrpcKvTransportTest, AbortedSenderFailsTheReservation) {
  absl::StatusOr<std::string> id = reservations_.Reserve("req-1", 10, Far());
  absl::StatusOr<std::unique_ptr<GrpcKvSender>> s =
      GrpcKvSender::Start(channel_, Handshake(*id), "req-1", Far());
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->Send(Chunk(0, 10)).ok());
  (*s)->Abort(absl::CancelledError("prefill cancelled"));
  // The receiver fails the reservation when the cancel reaches it after the first chunk; otherwise the
  // transfer simply never completes. Either way it never completes.
  absl::StatusOr<KvTransferResult> got = reservations_.Await(*id, absl::Now() + absl::Seconds(2));
  EXPECT_FALSE(got.ok());
}

TEST(GrpcKvSenderTest, UnreachableDecodeWorkerIsUnavailable) {
  auto channel = grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials());
  v1::KvHandshake h;
  h.set_reservation_id("kvr-1");
  absl::StatusOr<std::unique_ptr<GrpcKvSender>> s =
      GrpcKvSender::Start(channel, h, "req-1", absl::Now() + absl::Seconds(2));
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
}

// --- NCCL transport on the fake NCCL-like interface ---

TEST(NcclKvHeaderTest, RoundTripsAndRejectsGarbage) {
  NcclKvHeader h;
  h.last = true;
  h.payload_bytes = 123456789;
  h.piece_bytes = 4096;
  h.num_chunks = 61;
  h.reservation_id = "kvr-7-req-abc";
  std::string bytes = EncodeNcclKvHeader(h);
  ASSERT_EQ(bytes.size(), kNcclKvHeaderBytes);
  absl::StatusOr<NcclKvHeader> back = DecodeNcclKvHeader(bytes);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->reservation_id, h.reservation_id);
  EXPECT_EQ(back->payload_bytes, h.payload_bytes);
  EXPECT_EQ(back->num_chunks, 61u);
  EXPECT_TRUE(back->last);
  EXPECT_FALSE(back->abort);
  std::string unknown_flag = bytes;
  unknown_flag[6] |= 2;  // the flags follow the magic (4 bytes) and the version (2)
  EXPECT_EQ(DecodeNcclKvHeader(unknown_flag).status().code(), absl::StatusCode::kDataLoss);
  bytes[0] ^= 1;
  EXPECT_EQ(DecodeNcclKvHeader(bytes).status().code(), absl::StatusCode::kDataLoss);
}

TEST(NcclKvRecordsTest, RoundTripAndGarbage) {
  std::string batch;
  std::vector<KvTransferChunk> chunks = {Chunk(0, 100), Chunk(128, 0), Chunk(256, 7, /*last=*/true)};
  chunks[1].first_layer = 42;
  for (const KvTransferChunk& c : chunks) AppendNcclKvRecord(c, &batch);
  absl::StatusOr<std::vector<KvTransferChunk>> back = DecodeNcclKvRecords(batch, 3);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, chunks);
  EXPECT_EQ(DecodeNcclKvRecords(batch, 2).status().code(), absl::StatusCode::kDataLoss);  // bytes left over
  EXPECT_EQ(DecodeNcclKvRecords(batch, 4).status().code(), absl::StatusCode::kDataLoss);  // truncated
  EXPECT_EQ(DecodeNcclKvRecords(batch.substr(0, batch.size() - 1), 3).status().code(),
            absl::StatusCode::kDataLoss);  // last record overruns
  std::string bad_flags = batch;
  bad_flags[16] = 0x70;
  EXPECT_EQ(DecodeNcclKvRecords(bad_flags, 3).status().code(), absl::StatusCode::kDataLoss);
}

TEST(FakeNcclTest, MismatchedSizesAreAnErrorNotCorruption) {
  auto world = std::make_shared<FakeNcclWorld>();
  FakeNccl a(world), b(world);
  absl::StatusOr<std::string> id = a.GetUniqueId();
  ASSERT_TRUE(id.ok());
  absl::StatusOr<std::unique_ptr<NcclComm>> c1;
  std::thread t([&] { c1 = a.CommInitRank(2, *id, 0, absl::Seconds(5)); });
  absl::StatusOr<std::unique_ptr<NcclComm>> c2 = b.CommInitRank(2, *id, 1, absl::Seconds(5));
  t.join();
  ASSERT_TRUE(c1.ok() && c2.ok());
  std::string out(10, 'x'), in(12, '\0');
  ASSERT_TRUE((*c1)->Send(out.data(), out.size(), 1).ok());
  ASSERT_TRUE((*c2)->Recv(in.data(), in.size(), 0).ok());
  absl::Status s = (*c2)->StreamSync(absl::Seconds(1));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("size mismatch"));
}

struct NcclPair {
  std::shared_ptr<FakeNcclWorld> world = std::make_shared<FakeNcclWorld>();
  FakeNccl decode_nccl{world}, prefill_nccl{world};
  KvReservations reservations{KvReservationsOptions{}};
  NcclKvOptions options{
      .init_timeout = absl::Seconds(5), .op_timeout = absl::Seconds(5), .idle_timeout = absl::Seconds(30)};
  NcclKvReceiver receiver{&decode_nccl, &reservations, options};
  NcclKvSenders senders{&prefill_nccl, options};
};

TEST(NcclKvTransportTest, PairIsCreatedOnDemandAndCarriesChunkedTransfers) {
  NcclPair p;
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  ASSERT_TRUE(uid.ok()) << uid.status();
  EXPECT_EQ(uid->size(), kNcclUniqueIdBytes);
  EXPECT_EQ(*p.receiver.UniqueIdFor("prefill-0:1"), *uid);  // One communicator per pair.
  std::vector<std::string> ids;
  std::vector<std::vector<KvTransferChunk>> sent(2);
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<std::string> id = p.reservations.Reserve("req-" + std::to_string(r), 10000, Far());
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
    absl::StatusOr<std::unique_ptr<KvSender>> s =
        p.senders.Start("decode-0:1", *uid, *id, /*piece_bytes=*/64);
    ASSERT_TRUE(s.ok()) << s.status();
    // Many layers, sizes that are not multiples of the piece, zero-length layers.
    for (uint32_t layer = 0; layer < 61; ++layer) {
      KvTransferChunk c =
          Chunk(128 * (layer % 3), (layer * 37 + r) % 300, false, static_cast<char>('A' + layer % 26));
      c.first_layer = layer;
      sent[r].push_back(c);
      ASSERT_TRUE((*s)->Send(c).ok());
    }
    sent[r].push_back(Chunk(384, 1001, /*last=*/true));
    ASSERT_TRUE((*s)->Send(sent[r].back()).ok());
    ASSERT_TRUE((*s)->Finish().ok());
  }
  for (int r = 0; r < 2; ++r) {
    absl::StatusOr<KvTransferResult> got = p.reservations.Await(ids[r], Far());
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->chunks, sent[r]);
  }
  EXPECT_EQ(p.world->comms_created.load(), 2);  // One pair, both ranks, reused by the second transfer.
  EXPECT_EQ(p.senders.live_pairs(), 1);
  EXPECT_EQ(p.receiver.live_pairs(), 1);
}

// A transfer of many small layer chunks goes as a few batch messages, not two messages per chunk.
TEST(NcclKvTransportTest, ChunksAreBatchedIntoFewMessages) {
  NcclPair p;
  p.options.batch_bytes = 64 * 1024;
  NcclKvSenders senders(&p.prefill_nccl, p.options);
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  ASSERT_TRUE(uid.ok()) << uid.status();
  absl::StatusOr<std::string> id = p.reservations.Reserve("req-1", 100000, Far());
  ASSERT_TRUE(id.ok());
  absl::StatusOr<std::unique_ptr<KvSender>> s =
      senders.Start("decode-0:1", *uid, *id, /*piece_bytes=*/1 << 20);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<KvTransferChunk> sent;
  for (uint32_t block = 0; block < 64; ++block) {
    for (uint32_t layer = 0; layer < 4; ++layer) {
      KvTransferChunk c = Chunk(128 * block, 1000 + layer, false, static_cast<char>('a' + layer));
      c.first_layer = layer;
      sent.push_back(c);
      ASSERT_TRUE((*s)->Send(c).ok());
    }
  }
  sent.push_back(Chunk(8192, 5000, /*last=*/true));
  ASSERT_TRUE((*s)->Send(sent.back()).ok());
  ASSERT_TRUE((*s)->Finish().ok());
  absl::StatusOr<KvTransferResult> got = p.reservations.Await(*id, Far());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->chunks, sent);
  EXPECT_EQ((*s)->bytes_sent(), 64u * (1000 + 1001 + 1002 + 1003) + 5000);
  // 263 KB of records in batches of >= 64 KiB: 4-5 batches, each a header and one piece.
  EXPECT_LE(p.world->messages_sent.load(), 10);
  EXPECT_GE(p.world->messages_sent.load(), 8);
}

// A transfer that ends with Finish and no chunk marked last still sends what it gathered.
TEST(NcclKvTransportTest, FinishFlushesAPartialBatch) {
  NcclPair p;
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  absl::StatusOr<std::string> id = p.reservations.Reserve("req-1", 1000, Far());
  absl::StatusOr<std::unique_ptr<KvSender>> s = p.senders.Start("decode-0:1", *uid, *id, 1024);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Send(Chunk(0, 10)).ok());
  EXPECT_EQ(p.world->messages_sent.load(), 0);  // Still gathering.
  ASSERT_TRUE((*s)->Finish().ok());
  EXPECT_EQ(p.world->messages_sent.load(), 2);
  EXPECT_EQ((*s)->Send(Chunk(128, 10)).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(NcclKvTransportTest, SenderAbortFailsOnlyItsReservation) {
  NcclPair p;
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  absl::StatusOr<std::string> id = p.reservations.Reserve("req-1", 100, Far());
  absl::StatusOr<std::unique_ptr<KvSender>> s = p.senders.Start("decode-0:1", *uid, *id, 1024);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->Send(Chunk(0, 10)).ok());
  (*s)->Abort(absl::CancelledError("cancelled"));
  EXPECT_EQ(p.reservations.Await(*id, Far()).status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(p.receiver.live_pairs(), 1);  // The pair itself is fine.
}

TEST(NcclKvTransportTest, PeerAbortFailsOpenTransfersAndTheNextRequestBuildsANewPair) {
  NcclPair p;
  p.options.batch_bytes = 1;  // Every chunk goes at once, so the transfer is open when the peer dies.
  NcclKvSenders senders(&p.prefill_nccl, p.options);
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  absl::StatusOr<std::string> id = p.reservations.Reserve("req-1", 100, Far());
  {
    absl::StatusOr<std::unique_ptr<KvSender>> s = senders.Start("decode-0:1", *uid, *id, 1024);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->Send(Chunk(0, 10)).ok());
    while (p.reservations.stats().bytes_received < 10) absl::SleepFor(absl::Milliseconds(1));
    p.world->AbortAll();  // The prefill process dies mid-transfer.
    EXPECT_FALSE((*s)->Send(Chunk(128, 10, true)).ok());
  }
  absl::StatusOr<KvTransferResult> got = p.reservations.Await(*id, Far());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kAborted) << got.status();
  while (p.receiver.live_pairs() > 0) absl::SleepFor(absl::Milliseconds(1));
  absl::StatusOr<std::string> uid2 = p.receiver.UniqueIdFor("prefill-0:1");
  ASSERT_TRUE(uid2.ok());
  EXPECT_NE(*uid2, *uid);
  absl::StatusOr<std::string> id2 = p.reservations.Reserve("req-2", 100, Far());
  absl::StatusOr<std::unique_ptr<KvSender>> s2 = senders.Start("decode-0:1", *uid2, *id2, 1024);
  ASSERT_TRUE(s2.ok()) << s2.status();
  ASSERT_TRUE((*s2)->Send(Chunk(0, 300, true)).ok());
  ASSERT_TRUE((*s2)->Finish().ok());
  EXPECT_TRUE(p.reservations.Await(*id2, Far()).ok());
}

TEST(NcclKvTransportTest, PeerThatNeverJoinsTimesOutOnBothSides) {
  NcclPair p;
  p.options.init_timeout = absl::Milliseconds(200);
  NcclKvReceiver receiver(&p.decode_nccl, &p.reservations, p.options);
  absl::StatusOr<std::string> uid = receiver.UniqueIdFor("prefill-9:1");
  ASSERT_TRUE(uid.ok());
  while (receiver.live_pairs() > 0) absl::SleepFor(absl::Milliseconds(5));  // Its rank 1 gave up.
  absl::StatusOr<std::string> uid2 = receiver.UniqueIdFor("prefill-9:1");
  ASSERT_TRUE(uid2.ok());
  EXPECT_NE(*uid2, *uid);

  NcclKvSenders senders(&p.prefill_nccl, p.options);
  absl::StatusOr<std::string> lonely = p.prefill_nccl.GetUniqueId();
  absl::StatusOr<std::unique_ptr<KvSender>> s = senders.Start("decode-9:1", *lonely, "kvr-1", 1024);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kDeadlineExceeded) << s.status();
  EXPECT_EQ(senders.live_pairs(), 0);
}

TEST(NcclKvTransportTest, UniqueIdFailureAndBadTargetsAreClearErrors) {
  NcclPair p;
  p.world->fail_unique_id = true;
  absl::StatusOr<std::string> uid = p.receiver.UniqueIdFor("prefill-0:1");
  EXPECT_EQ(uid.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(uid.status().message(), HasSubstr("prefill-0:1"));
  EXPECT_EQ(p.senders.Start("decode-0:1", "short", "kvr-1", 1024).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.senders.Start("decode-0:1", std::string(kNcclUniqueIdBytes, 'x'), std::string(300, 'r'), 1024)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace v4serve::kvstore
