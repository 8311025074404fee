// The NCCL KV transport on the real NCCL library (kvstore/transfer/nccl_api_cuda.cc): a prefill-side
// sender on GPU 0 and a decode-side receiver on GPU 1 in one process, joined by a unique id, carry
// transfers with payloads that are not multiples of the piece size, zero-length layers and many layers.
// Needs a CUDA build and two GPUs; skips with a message otherwise. (Throughput on 2×H200 is measured by
// the "Runs on 2×H200" work, not here.)
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvstore/transfer/kv_transfer.h"
#include "kvstore/transfer/nccl_api.h"
#include "kvstore/transfer/nccl_kv_transport.h"

namespace v4serve::kvstore {
namespace {

TEST(NcclCudaTest, TwoGpuPairCarriesChunkedTransfers) {
  absl::StatusOr<std::unique_ptr<NcclApi>> gpu0 = MakeCudaNccl(0);
  absl::StatusOr<std::unique_ptr<NcclApi>> gpu1 = MakeCudaNccl(1);
  if (!gpu0.ok() || !gpu1.ok()) {
    GTEST_SKIP() << "needs a CUDA build and two GPUs: " << (gpu0.ok() ? gpu1.status() : gpu0.status());
  }
  NcclKvOptions o{
      .init_timeout = absl::Seconds(60), .op_timeout = absl::Seconds(30), .idle_timeout = absl::Minutes(5)};
  KvReservations reservations{KvReservationsOptions{}};
  NcclKvReceiver receiver(gpu1->get(), &reservations, o);
  NcclKvSenders senders(gpu0->get(), o);
  absl::StatusOr<std::string> uid = receiver.UniqueIdFor("prefill:0");
  ASSERT_TRUE(uid.ok()) << uid.status();
  for (int r = 0; r < 3; ++r) {
    absl::StatusOr<std::string> id =
        reservations.Reserve("req-" + std::to_string(r), 4096, absl::Now() + absl::Minutes(1));
    ASSERT_TRUE(id.ok());
    absl::StatusOr<std::unique_ptr<KvSender>> s = senders.Start("decode:1", *uid, *id, /*piece_bytes=*/65536);
    ASSERT_TRUE(s.ok()) << s.status();
    std::vector<KvTransferChunk> sent;
    for (uint32_t layer = 0; layer < 61; ++layer) {
      KvTransferChunk c;
      c.first_layer = layer;
      c.num_layers = 1;
      c.first_token = 128 * static_cast<uint32_t>(r);
      c.num_tokens = 128;
      c.payload.resize(layer % 10 == 0 ? 0 : 100000 + 977 * layer + r);
      for (size_t i = 0; i < c.payload.size(); ++i)
        c.payload[i] = static_cast<char>((i * 31 + layer + r) & 0xFF);
      sent.push_back(c);
      ASSERT_TRUE((*s)->Send(c).ok());
    }
    KvTransferChunk w;
    w.window_state = w.last = true;
    w.payload.assign(70001, 'w');
    sent.push_back(w);
    ASSERT_TRUE((*s)->Send(w).ok());
    ASSERT_TRUE((*s)->Finish().ok());
    absl::StatusOr<KvTransferResult> got = reservations.Await(*id, absl::Now() + absl::Seconds(60));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->chunks, sent);
  }
  EXPECT_EQ(receiver.live_pairs(), 1);
  EXPECT_EQ(senders.live_pairs(), 1);
}

}  // namespace
}  // namespace v4serve::kvstore
