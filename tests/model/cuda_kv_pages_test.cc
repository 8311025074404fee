// The CUDA backend's paged device KV cache holds each 128-token block's compressed entries and indexer keys
// as the bytes of a kvstore block's payload (model/cuda/device_state_cache.h, kvstore/kv_block.h), so a
// page moves to host memory, the wire or disk with one copy. These tests compare the pages the device holds
// after real forwards of the tiny model, byte for byte, with the payload that kvstore's own encoder writes
// for the same entries (taken from the host state, which the backend keeps up to date): after a prefill,
// after decode steps that open new pages mid-decode, and after a state was uploaded whole (the host-packed
// path); and pages adopted from block payloads (Model::AdoptKvPages) serve the next step. Label gpu; every
// test skips without a GPU.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engine/state_blocks.h"
#include "gtest/gtest.h"
#include "kvstore/kv_block.h"
#include "model/checkpoint_layout.h"
#include "model/cuda/cuda_backend.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "model/sequence_state.h"
#include "tests/model/cuda_test_util.h"

namespace v4serve::model {
namespace {

static_assert(cuda::kKvPageTokens == kvstore::kDefaultBlockTokens, "a device page is one kvstore block");

std::unique_ptr<Model> LoadGpu(CudaWeights format) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  EXPECT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  if (!config.ok() || !ckpt.ok()) return nullptr;
  ModelOptions go;
  go.device = Device::kCuda;
  go.cuda_weights = format;
  auto g = Model::FromCheckpoint(*config, **ckpt, go);
  EXPECT_TRUE(g.ok()) << g.status();
  return g.ok() ? std::move(*g) : nullptr;
}

// The payload bytes of block `block` of `state` as kvstore encodes them: a KvBlock of the state's entries
// and keys of that block through EncodeKvBlock, DecodeKvBlock and KvBlockPayload.
std::string StorePayload(const kvstore::KvLayout& layout, const SequenceState& state, int32_t block) {
  const std::vector<int32_t> tokens(static_cast<size_t>(layout.block_tokens), 7);
  absl::StatusOr<kvstore::KvBlock> b = engine::BlockEntries(layout, state, block, tokens);
  EXPECT_TRUE(b.ok()) << b.status();  // The state holds the block's entries in every layer.
  if (!b.ok()) return "";
  absl::StatusOr<std::string> bytes = kvstore::EncodeKvBlock(layout, *b);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  if (!bytes.ok()) return "";
  absl::StatusOr<kvstore::KvBlock> back = kvstore::DecodeKvBlock(layout, *bytes);
  EXPECT_TRUE(back.ok()) << back.status();
  if (!back.ok()) return "";
  return std::string(kvstore::KvBlockPayload(layout, *bytes, *back));
}

// Every complete block of `state` on the device equals kvstore's payload for it.
void ExpectPagesAreStorePayloads(const Model& gpu, const kvstore::KvLayout& layout,
                                 const SequenceState& state) {
  const int64_t blocks = state.position / layout.block_tokens;
  ASSERT_GT(blocks, 0);
  for (int64_t k = 0; k < blocks; ++k) {
    SCOPED_TRACE(testing::Message() << "block " << k << " at position " << state.position);
    absl::StatusOr<std::string> page = cuda::DeviceKvPage(gpu.backend(), state, k);
    ASSERT_TRUE(page.ok()) << page.status();
    const std::string want = StorePayload(layout, state, static_cast<int32_t>(k));
    ASSERT_EQ(page->size(), want.size());
    EXPECT_TRUE(*page == want) << "the device page differs from kvstore's payload bytes";
  }
  absl::StatusOr<std::string> next = cuda::DeviceKvPage(gpu.backend(), state, blocks);
  EXPECT_EQ(next.status().code(), absl::StatusCode::kOutOfRange) << next.status();
}

void CheckPages(CudaWeights format) {
  std::unique_ptr<Model> gpu = LoadGpu(format);
  ASSERT_NE(gpu, nullptr);
  absl::StatusOr<kvstore::KvLayout> layout = engine::KvLayoutFor(gpu->config(), 1);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(layout->block_tokens, cuda::kKvPageTokens);
  // Two sequences: a prefill of 300 tokens (two complete blocks, a third begun), another of 250.
  SequenceState a = gpu->NewState(), b = gpu->NewState(), chunked = gpu->NewState();
  ASSERT_TRUE(gpu->Prefill(&a, Prompt(300, 1)).ok());
  ASSERT_TRUE(gpu->Prefill(&b, Prompt(250, 2)).ok());
  ExpectPagesAreStorePayloads(*gpu, *layout, a);
  ExpectPagesAreStorePayloads(*gpu, *layout, b);
  // Prefill chunks of 100: forwards whose new entries start inside a page and run into the next one.
  const std::vector<int32_t> long_prompt = Prompt(300, 3);
  for (size_t at = 0; at < long_prompt.size(); at += 100) {
    ASSERT_TRUE(gpu->Prefill(&chunked, absl::MakeConstSpan(long_prompt).subspan(at, 100)).ok());
  }
  ExpectPagesAreStorePayloads(*gpu, *layout, chunked);
  // Batched decode across the 256 and 384 boundaries: new pages open mid-decode and fill row by row.
  for (int step = 0; step < 90; ++step) {
    absl::StatusOr<std::vector<float>> logits = gpu->Decode(
        {&a, &b}, std::vector<int32_t>{static_cast<int32_t>(3 + step), static_cast<int32_t>(5 + step)});
    ASSERT_TRUE(logits.ok()) << logits.status();
  }
  ASSERT_EQ(a.position, 390);
  ExpectPagesAreStorePayloads(*gpu, *layout, a);
  ExpectPagesAreStorePayloads(*gpu, *layout, b);
  // A state whose device copy is dropped is uploaded whole (packed into pages on the host) by the next
  // forward; its pages then hold the same bytes.
  InvalidateDeviceCopy(&a);
  EXPECT_EQ(cuda::DeviceKvPage(gpu->backend(), a, 0).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(gpu->Decode({&a}, std::vector<int32_t>{11}).ok());
  absl::StatusOr<cuda::ForwardCounters> k = cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_uploaded, 1);
  ExpectPagesAreStorePayloads(*gpu, *layout, a);
  // A host state that moved on without the backend (here: one more token on a copy) has no valid page.
  SequenceState moved = a;
  moved.position += 1;
  EXPECT_EQ(cuda::DeviceKvPage(gpu->backend(), moved, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cuda::DeviceKvPage(gpu->backend(), a, -1).status().code(), absl::StatusCode::kOutOfRange);
}

TEST(CudaKvPagesTest, PagesAreKvStoreBlockPayloadsFp32) {
  SKIP_WITHOUT_GPU();
  CheckPages(CudaWeights::kF32);
}

TEST(CudaKvPagesTest, PagesAreKvStoreBlockPayloadsFp8) {
  SKIP_WITHOUT_GPU();
  CheckPages(CudaWeights::kFp8);
}

// Pages adopted from block payloads (as the engine does with cached or transferred blocks,
// Model::AdoptKvPages) make the device copy the next step uses: no upload, the same logits as a state
// uploaded from the host, and pages equal to the payloads. A state past its last full block gets the rest
// from the host. Pages that cannot be the state's are refused.
void CheckAdopt(CudaWeights format) {
  std::unique_ptr<Model> gpu = LoadGpu(format);
  ASSERT_NE(gpu, nullptr);
  absl::StatusOr<kvstore::KvLayout> layout = engine::KvLayoutFor(gpu->config(), 1);
  ASSERT_TRUE(layout.ok()) << layout.status();
  for (const int64_t prompt : {256, 300}) {
    SCOPED_TRACE(testing::Message() << "prompt " << prompt);
    SequenceState base = gpu->NewState();
    ASSERT_TRUE(gpu->Prefill(&base, Prompt(prompt, 9)).ok());
    // Host copies of the state as a restore would make them: no device copy of their own.
    SequenceState adopted = base, uploaded = base;
    InvalidateDeviceCopy(&adopted);
    InvalidateDeviceCopy(&uploaded);
    std::vector<std::string> payloads;
    for (int32_t k = 0; k < prompt / layout->block_tokens; ++k)
      payloads.push_back(StorePayload(*layout, base, k));
    const std::vector<absl::string_view> views(payloads.begin(), payloads.end());
    ASSERT_TRUE(gpu->AdoptKvPages(&adopted, views).ok());
    for (size_t k = 0; k < payloads.size(); ++k) {
      absl::StatusOr<std::string> page = cuda::DeviceKvPage(gpu->backend(), adopted, static_cast<int64_t>(k));
      ASSERT_TRUE(page.ok()) << page.status();
      EXPECT_TRUE(*page == payloads[k]) << "page " << k;
    }
    absl::StatusOr<std::vector<float>> la = gpu->Decode({&adopted}, std::vector<int32_t>{17});
    ASSERT_TRUE(la.ok()) << la.status();
    absl::StatusOr<cuda::ForwardCounters> ka = cuda::LastForwardCounters(gpu->backend());
    ASSERT_TRUE(ka.ok());
    EXPECT_EQ(ka->states_cached, 1);
    EXPECT_EQ(ka->states_uploaded, 0);
    absl::StatusOr<std::vector<float>> lu = gpu->Decode({&uploaded}, std::vector<int32_t>{17});
    ASSERT_TRUE(lu.ok()) << lu.status();
    absl::StatusOr<cuda::ForwardCounters> ku = cuda::LastForwardCounters(gpu->backend());
    ASSERT_TRUE(ku.ok());
    EXPECT_EQ(ku->states_uploaded, 1);
    EXPECT_LT(RelL2(*la, *lu), 1e-6);
    // The pages come from the payloads, not from the host state: a changed payload shows on the device.
    SequenceState probe = base;
    InvalidateDeviceCopy(&probe);
    std::string changed = payloads[0];
    const float marker = 1234.5f;
    std::memcpy(changed.data() + 8, &marker, sizeof(marker));
    ASSERT_TRUE(gpu->AdoptKvPages(&probe, {changed}).ok());
    absl::StatusOr<std::string> probed = cuda::DeviceKvPage(gpu->backend(), probe, 0);
    ASSERT_TRUE(probed.ok()) << probed.status();
    EXPECT_TRUE(*probed == changed);
    // Refused: a page of another size, more pages than the state's entries fill. The state keeps the copy
    // it had (here: from a step run on it), which still serves it.
    SequenceState other = base;
    InvalidateDeviceCopy(&other);
    ASSERT_TRUE(gpu->Decode({&other}, std::vector<int32_t>{23}).ok());
    const uint64_t tag = other.device_tag;
    const std::string short_page(payloads[0].size() - 4, '\0');
    EXPECT_EQ(gpu->AdoptKvPages(&other, {short_page}).code(), absl::StatusCode::kInvalidArgument);
    std::vector<absl::string_view> too_many = views;
    too_many.push_back(views[0]);
    if (prompt % layout->block_tokens == 0) too_many.push_back(views[0]);
    const absl::Status many = gpu->AdoptKvPages(&other, too_many);
    EXPECT_EQ(many.code(), absl::StatusCode::kInvalidArgument) << many;
    EXPECT_EQ(other.device_tag, tag);
    EXPECT_TRUE(cuda::DeviceKvPage(gpu->backend(), other, 0).ok());
  }
}

TEST(CudaKvPagesTest, AdoptedPagesServeTheNextStepWithoutAnUploadFp32) {
  SKIP_WITHOUT_GPU();
  CheckAdopt(CudaWeights::kF32);
}

TEST(CudaKvPagesTest, AdoptedPagesServeTheNextStepWithoutAnUploadFp8) {
  SKIP_WITHOUT_GPU();
  CheckAdopt(CudaWeights::kFp8);
}

}  // namespace
}  // namespace v4serve::model
