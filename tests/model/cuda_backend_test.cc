// The CUDA backend against the CPU reference on the whole tiny V4 model (prefill in chunks, batched decode,
// sequence states); the kernels one by one are in cuda_kernels_test.cc. Label gpu; every test skips without
// a GPU.
//
// Tolerances. FP32 weights (CudaWeights::kF32): the GPU computes the same FP32 function as the CPU and
// differs only in summation order (cuBLAS vs the CPU's 4-way dot products, block reductions) and in the last
// bit of expf/cosf; relative L2 errors of such differences are ~1e-6 per op and stay far below 1e-4 after 4
// layers, while a logic error (wrong key, wrong expert, wrong position) moves the logits by O(1). BF16
// weights (kBf16) round the GEMM inputs to 8 mantissa bits (tiny_v4's weights are BF16/FP8/FP4 in the
// checkpoint, so they convert exactly), and a random-weight network amplifies such rounding from layer to
// layer: there the yardstick is the CPU's faithful mode, which rounds activations to BF16 (and more) as
// DeepSeek's kernels do. BF16 logits and states must stay within max(5e-2, 2 x the faithful mode's distance
// from the exact reference) at every step; greedy tokens may flip on near-ties.
#include "model/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "model/backend.h"
#include "model/cpu/attention.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/device.h"
#include "model/model.h"
#include "model/numeric_formats.h"
#include "model/safetensors.h"
#include "model/state_rollback.h"
#include "services/status_macros.h"
#include "tests/model/cuda_test_util.h"

namespace v4serve::model {
namespace {

struct Pair {
  std::unique_ptr<Model> cpu, gpu, faithful;
};

Pair LoadPair(CudaWeights format, int64_t index_topk = 0) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  EXPECT_TRUE(config.ok()) << config.status();
  if (index_topk > 0) config->index_topk = index_topk;
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  EXPECT_TRUE(ckpt.ok()) << ckpt.status();
  ModelOptions co, go;
  go.device = Device::kCuda;
  go.cuda_weights = format;
  ModelOptions fo;
  fo.mode = NumericMode::kFaithful;
  auto f = Model::FromCheckpoint(*config, **ckpt, fo);
  EXPECT_TRUE(f.ok()) << f.status();
  auto c = Model::FromCheckpoint(*config, **ckpt, co);
  auto g = Model::FromCheckpoint(*config, **ckpt, go);
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(g.ok()) << g.status();
  Pair p;
  if (c.ok()) p.cpu = std::move(*c);
  if (g.ok()) p.gpu = std::move(*g);
  if (f.ok()) p.faithful = std::move(*f);
  return p;
}

// The tiny model on the GPU with `env`'s switches set while it loads (the backend reads them at
// construction).
absl::StatusOr<std::unique_ptr<Model>> LoadWithEnv(
    const ModelConfig& config, const Checkpoint& ckpt, CudaWeights weights,
    const std::vector<std::pair<const char*, const char*>>& env) {
  ModelOptions o;
  o.device = Device::kCuda;
  o.cuda_weights = weights;
  for (const auto& [name, value] : env) setenv(name, value, 1);
  auto m = Model::FromCheckpoint(config, ckpt, o);
  for (const auto& [name, value] : env) unsetenv(name);
  return m;
}

// One decode step of the same tokens (the first k of `next`) on two models, each over its first k states;
// `next` then holds the first model's argmaxes for the following step.
struct TwinStep {
  std::vector<float> logits_a, logits_b, streams_a, streams_b;
};
absl::StatusOr<TwinStep> DecodeTwins(Model& a, Model& b, std::vector<SequenceState>& states_a,
                                     std::vector<SequenceState>& states_b, int k, int64_t vocab,
                                     std::vector<int32_t>* next) {
  std::vector<SequenceState*> pa, pb;
  for (int i = 0; i < k; ++i) {
    pa.push_back(&states_a[static_cast<size_t>(i)]);
    pb.push_back(&states_b[static_cast<size_t>(i)]);
  }
  const std::vector<int32_t> tok(next->begin(), next->begin() + k);
  TwinStep t;
  ASSIGN_OR_RETURN(t.logits_a, a.Decode(pa, tok, &t.streams_a));
  ASSIGN_OR_RETURN(t.logits_b, b.Decode(pb, tok, &t.streams_b));
  for (int i = 0; i < k; ++i) {
    const float* row = &t.logits_a[static_cast<size_t>(i) * vocab];
    (*next)[static_cast<size_t>(i)] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  }
  return t;
}

// A switch's value other than 0 or 1 fails the load with INVALID_ARGUMENT naming the switch.
void ExpectRefused(const absl::StatusOr<std::unique_ptr<Model>>& m, const char* name) {
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_NE(m.status().message().find(name), std::string::npos) << m.status();
}

double StateRelL2(const SequenceState& a, const SequenceState& b) {
  double worst = 0;
  EXPECT_EQ(a.position, b.position);
  EXPECT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size() && l < b.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].entries.size(), b.layers[l].entries.size()) << "layer " << l;
    worst = std::max(worst, RelL2(a.layers[l].window, b.layers[l].window));
    if (!b.layers[l].entries.empty())
      worst = std::max(worst, RelL2(a.layers[l].entries, b.layers[l].entries));
    if (!b.layers[l].indexer_keys.empty()) {
      worst = std::max(worst, RelL2(a.layers[l].indexer_keys, b.layers[l].indexer_keys));
    }
    // The compressors' windows (the GPU pools on the device and writes the same rows back to the host).
    for (int which = 0; which < 2; ++which) {
      const CompressorState& ca = which == 0 ? a.layers[l].compressor : a.layers[l].indexer_compressor;
      const CompressorState& cb = which == 0 ? b.layers[l].compressor : b.layers[l].indexer_compressor;
      EXPECT_EQ(ca.filled, cb.filled) << "layer " << l << " compressor " << which;
      EXPECT_EQ(ca.has_prev, cb.has_prev) << "layer " << l << " compressor " << which;
      if (cb.kv.empty()) continue;
      worst = std::max({worst, RelL2(ca.kv, cb.kv), RelL2(ca.score, cb.score)});
      if (cb.has_prev)
        worst = std::max({worst, RelL2(ca.prev_kv, cb.prev_kv), RelL2(ca.prev_score, cb.prev_score)});
    }
  }
  return worst;
}

// Prefill in chunks (crossing the window and both compression ratios), then batched decode of three
// sequences at different positions; logits and states against the CPU.
void CompareModel(CudaWeights format, int64_t index_topk, double tol, bool same_tokens) {
  Pair p = LoadPair(format, index_topk);
  ASSERT_TRUE(p.cpu && p.gpu);
  EXPECT_EQ(p.gpu->backend().device(), Device::kCuda) << p.gpu->backend().Describe();
  const int64_t vocab = p.cpu->config().vocab_size;
  std::vector<SequenceState> cs, gs, fs;
  // The tolerance of one comparison: `tol`, or for low-precision weights twice the faithful CPU's distance.
  double worst = 0, worst_faithful = 0;  // Largest logit distances seen, printed for docs/PERFORMANCE.md.
  auto limit = [&](double faithful_dist) { return same_tokens ? tol : std::max(tol, 2 * faithful_dist); };
  auto note = [&](const std::vector<float>& g, const std::vector<float>& c, double fd) {
    worst = std::max(worst, RelL2(g, c));
    worst_faithful = std::max(worst_faithful, fd);
  };
  // The 1100-token sequence's first chunk routes more than 2048 (token, expert) slots: the prefill path
  // (permutation on the host, cuBLAS per expert); the others take the device permutation and grouped GEMV.
  const std::vector<int64_t> lens = {70, 33, 101, 1100};
  for (size_t i = 0; i < lens.size(); ++i) {
    SequenceState c = p.cpu->NewState(), g = p.gpu->NewState(), f = p.faithful->NewState();
    const std::vector<int32_t> prompt = Prompt(lens[i], static_cast<uint32_t>(10 + i));
    // Chunks of 29 tokens (borders fall inside compression windows); 1030 + 70 for the long one.
    const int64_t step = lens[i] > 1000 ? 1030 : 29;
    for (int64_t b = 0; b < lens[i]; b += step) {
      const int64_t e = std::min<int64_t>(lens[i], b + step);
      absl::Span<const int32_t> chunk(&prompt[b], static_cast<size_t>(e - b));
      auto lc = p.cpu->Prefill(&c, chunk, /*all_logits=*/true);
      auto lg = p.gpu->Prefill(&g, chunk, /*all_logits=*/true);
      auto lf = p.faithful->Prefill(&f, chunk, /*all_logits=*/true);
      ASSERT_TRUE(lc.ok()) << lc.status();
      ASSERT_TRUE(lg.ok()) << lg.status();
      ASSERT_TRUE(lf.ok()) << lf.status();
      const double fd = RelL2(*lf, *lc);
      note(*lg, *lc, fd);
      EXPECT_LT(RelL2(*lg, *lc), limit(fd))
          << "prefill seq " << i << " chunk at " << b << " (faithful " << fd << ")";
    }
    const double fsd = StateRelL2(f, c);
    EXPECT_LT(StateRelL2(g, c), limit(fsd))
        << "state after prefill, seq " << i << " (faithful " << fsd << ")";
    cs.push_back(std::move(c));
    gs.push_back(std::move(g));
    fs.push_back(std::move(f));
  }
  std::vector<int32_t> next = {5, 77, 301, 42};
  for (int step = 0; step < 6; ++step) {
    std::vector<SequenceState*> cp, gp, fp;
    for (size_t i = 0; i < cs.size(); ++i) {
      cp.push_back(&cs[i]);
      gp.push_back(&gs[i]);
      fp.push_back(&fs[i]);
    }
    std::vector<float> cstreams, gstreams, fstreams;
    auto lc = p.cpu->Decode(cp, next, &cstreams);
    auto lg = p.gpu->Decode(gp, next, &gstreams);
    auto lf = p.faithful->Decode(fp, next, &fstreams);
    ASSERT_TRUE(lc.ok()) << lc.status();
    ASSERT_TRUE(lg.ok()) << lg.status();
    ASSERT_TRUE(lf.ok()) << lf.status();
    const double fd = RelL2(*lf, *lc), fsd = RelL2(fstreams, cstreams);
    note(*lg, *lc, fd);
    EXPECT_LT(RelL2(*lg, *lc), limit(fd)) << "decode step " << step << " (faithful " << fd << ")";
    EXPECT_LT(RelL2(gstreams, cstreams), limit(fsd)) << "final streams, decode step " << step;
    // Greedy tokens agree (sampled on the device for the GPU model).
    absl::StatusOr<std::vector<int32_t>> gtok =
        cuda::ArgmaxRows(*lg, static_cast<int64_t>(next.size()), vocab);
    ASSERT_TRUE(gtok.ok()) << gtok.status();
    for (size_t i = 0; i < next.size(); ++i) {
      const float* row = &(*lc)[i * vocab];
      const int32_t ctok = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      if (same_tokens) {
        EXPECT_EQ((*gtok)[i], ctok) << "decode step " << step << " seq " << i;
      }
      next[i] = ctok;
    }
  }
  std::printf("logits rel. L2 vs the exact CPU: largest %.3g (this backend), %.3g (CPU faithful mode)\n",
              worst, worst_faithful);
  for (size_t i = 0; i < cs.size(); ++i) {
    const double fsd = StateRelL2(fs[i], cs[i]);
    EXPECT_LT(StateRelL2(gs[i], cs[i]), limit(fsd)) << "final state " << i << " (faithful " << fsd << ")";
  }
}

TEST(CudaModelTest, Fp32WeightsMatchTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kF32, 0, 1e-4, true);
}

// index_topk 4 < visible entries: the indexer's top-k really selects (with 512 every entry is kept).
TEST(CudaModelTest, Fp32WeightsMatchWithASelectiveIndexer) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kF32, 4, 1e-4, true);
}

TEST(CudaModelTest, Bf16WeightsStayCloseToTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kBf16, 0, 5e-2, false);
}

// The FP8 mode rounds the FP8 linears' inputs as the faithful mode does (and keeps their weights exact): the
// same yardstick as BF16.
TEST(CudaModelTest, Fp8WeightsStayCloseToTheCpuReference) {
  SKIP_WITHOUT_GPU();
  CompareModel(CudaWeights::kFp8, 0, 5e-2, false);
}

// The backend keeps device copies of the states between calls (model/cuda/device_state_cache.h). Every way
// a state can change outside the backend's own forward must make it upload the state again: a copy that
// moves on separately, a rolled-back token, entries rewritten in place (with InvalidateDeviceCopy), and a
// budget of 0 (nothing kept). Each step's logits against the CPU; a stale copy moves them by O(1).
void CompareStateChanges(std::unique_ptr<Model> cpu, std::unique_ptr<Model> gpu, bool cached) {
  ASSERT_TRUE(cpu && gpu);
  SequenceState ca = cpu->NewState(), ga = gpu->NewState();
  const std::vector<int32_t> prompt = Prompt(70, 3);
  for (int64_t b = 0; b < 70; b += 29) {
    absl::Span<const int32_t> chunk(&prompt[b], static_cast<size_t>(std::min<int64_t>(70, b + 29) - b));
    auto lc = cpu->Prefill(&ca, chunk);
    auto lg = gpu->Prefill(&ga, chunk);
    ASSERT_TRUE(lc.ok() && lg.ok()) << lc.status() << lg.status();
    EXPECT_LT(RelL2(*lg, *lc), 1e-4) << "prefill chunk at " << b;
  }
  auto decode = [&](const std::vector<SequenceState*>& c, const std::vector<SequenceState*>& g,
                    const std::vector<int32_t>& tok, const char* what) {
    auto lc = cpu->Decode(c, tok);
    auto lg = gpu->Decode(g, tok);
    ASSERT_TRUE(lc.ok() && lg.ok()) << what << ": " << lc.status() << lg.status();
    EXPECT_LT(RelL2(*lg, *lc), 1e-4) << what;
  };
  decode({&ca}, {&ga}, {11}, "first decode");
  // A copy: both move on, one at a time, then together.
  SequenceState cb = ca, gb = ga;
  decode({&ca}, {&ga}, {12}, "original after the copy");
  decode({&cb}, {&gb}, {13}, "copy after the original moved on");
  decode({&ca, &cb}, {&ga, &gb}, {14, 15}, "both in one batch");
  // A rolled-back token (speculative decoding's rejected draft), then another token at its position.
  for (int i = 0; i < 6; ++i) {  // Crosses compressed-entry boundaries (ratio 4), so entries are dropped too.
    absl::StatusOr<TokenUndo> uc = SaveTokenUndo(cpu->config(), ca, ca.position);
    absl::StatusOr<TokenUndo> ug = SaveTokenUndo(gpu->config(), ga, ga.position);
    ASSERT_TRUE(uc.ok() && ug.ok());
    decode({&ca}, {&ga}, {static_cast<int32_t>(20 + i)}, "draft token");
    ASSERT_TRUE(UndoLastToken(*uc, &ca).ok());
    ASSERT_TRUE(UndoLastToken(*ug, &ga).ok());
    decode({&ca}, {&ga}, {static_cast<int32_t>(40 + i)}, "token after the rollback");
  }
  // Entries rewritten in place, same count.
  for (SequenceState* s : {&ca, &ga}) {
    for (AttentionLayerState& l : s->layers) {
      for (float& v : l.entries) v = -v;
    }
  }
  InvalidateDeviceCopy(&ga);
  decode({&ca}, {&ga}, {60}, "after entries were rewritten in place");
  absl::StatusOr<cuda::ForwardCounters> k = cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_uploaded, 1);
  decode({&ca, &cb}, {&ga, &gb}, {61, 62}, "batch after the rewrite");
  EXPECT_LT(StateRelL2(ga, ca), 1e-4);
  EXPECT_LT(StateRelL2(gb, cb), 1e-4);
  // Greedy on the device: the CPU's argmax, and the states move on alike.
  {
    auto lc = cpu->DecodeChunks({&ca, &cb}, std::vector<int64_t>{1, 2}, std::vector<int32_t>{63, 64, 65});
    auto ig =
        gpu->DecodeChunksGreedy({&ga, &gb}, std::vector<int64_t>{1, 2}, std::vector<int32_t>{63, 64, 65});
    ASSERT_TRUE(lc.ok() && ig.ok()) << lc.status() << ig.status();
    EXPECT_EQ(*ig, ArgmaxOfRows(*lc, 3));
    EXPECT_LT(StateRelL2(ga, ca), 1e-4);
    EXPECT_LT(StateRelL2(gb, cb), 1e-4);
  }
  k = cuda::LastForwardCounters(gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  // Both copies were kept, unless nothing is (budget 0).
  EXPECT_EQ(k->states_cached, cached ? 2 : 0);
  EXPECT_EQ(k->states_uploaded, cached ? 0 : 2);
}

TEST(CudaModelTest, DeviceStateCopiesFollowEveryChangeOfTheHostState) {
  SKIP_WITHOUT_GPU();
  Pair p = LoadPair(CudaWeights::kF32);
  CompareStateChanges(std::move(p.cpu), std::move(p.gpu), true);
}

TEST(CudaModelTest, StateCacheBudgetZeroUploadsEveryCallAndABadBudgetIsAClearError) {
  SKIP_WITHOUT_GPU();
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "0", 1);
  Pair p = LoadPair(CudaWeights::kF32);
  CompareStateChanges(std::move(p.cpu), std::move(p.gpu), false);
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "lots", 1);
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(config.ok() && ckpt.ok());
  ModelOptions go;
  go.device = Device::kCuda;
  auto g = Model::FromCheckpoint(*config, **ckpt, go);
  unsetenv("V4SERVE_CUDA_STATE_CACHE_MB");
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << g.status();
  EXPECT_NE(g.status().message().find("V4SERVE_CUDA_STATE_CACHE_MB"), std::string::npos) << g.status();
}

// Two backends in one process (tests, benches): a state run by one and then by the other must be uploaded
// there, not matched with an unrelated copy that happens to carry the same tag and length.
TEST(CudaModelTest, AStateMovingToAnotherBackendIsUploadedThere) {
  SKIP_WITHOUT_GPU();
  Pair p1 = LoadPair(CudaWeights::kF32), p2 = LoadPair(CudaWeights::kF32);
  ASSERT_TRUE(p1.cpu && p1.gpu && p2.gpu);
  SequenceState a = p1.gpu->NewState(), b = p2.gpu->NewState(), ca = p1.cpu->NewState();
  const std::vector<int32_t> pa = Prompt(70, 41), pb = Prompt(70, 42);
  ASSERT_TRUE(p1.gpu->Prefill(&a, pa).ok());  // Same number of forwards on each backend: same counters.
  ASSERT_TRUE(p2.gpu->Prefill(&b, pb).ok());
  ASSERT_TRUE(p1.cpu->Prefill(&ca, pa).ok());
  auto lg = p2.gpu->Decode({&a}, std::vector<int32_t>{9});
  auto lc = p1.cpu->Decode({&ca}, std::vector<int32_t>{9});
  ASSERT_TRUE(lg.ok() && lc.ok()) << lg.status() << lc.status();
  EXPECT_LT(RelL2(*lg, *lc), 1e-4);
  absl::StatusOr<cuda::ForwardCounters> k = cuda::LastForwardCounters(p2.gpu->backend());
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(k->states_uploaded, 1);
}

// The backend's contract allows a forward with no logit rows (a prefill chunk whose logits nobody reads):
// it returns none, runs no head, and leaves the state as a forward that asked for the last row's logits.
TEST(CudaModelTest, AForwardWithoutLogitRowsAdvancesTheStateTheSame) {
  SKIP_WITHOUT_GPU();
  Pair p = LoadPair(CudaWeights::kF32);
  ASSERT_TRUE(p.gpu);
  SequenceState a = p.gpu->NewState(), b = p.gpu->NewState();
  const std::vector<int32_t> prompt = Prompt(70, 43);
  const ForwardBackend& be = p.gpu->backend();
  const std::vector<ForwardSegment> sa = {{&a, 0, 70}}, sb = {{&b, 0, 70}};
  absl::StatusOr<std::vector<float>> none = be.Forward(sa, prompt, {}, nullptr);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
  absl::StatusOr<std::vector<int32_t>> no_ids = be.ForwardGreedy(sb, prompt, {});
  ASSERT_TRUE(no_ids.ok()) << no_ids.status();
  EXPECT_TRUE(no_ids->empty());
  EXPECT_EQ(a.position, 70);
  EXPECT_EQ(b.position, 70);
  SequenceState c = p.gpu->NewState();
  const std::vector<ForwardSegment> sc = {{&c, 0, 70}};
  ASSERT_TRUE(be.Forward(sc, prompt, std::vector<int64_t>{69}, nullptr).ok());
  auto la = p.gpu->Decode({&a}, std::vector<int32_t>{9});
  auto lb = p.gpu->Decode({&b}, std::vector<int32_t>{9});
  auto lc = p.gpu->Decode({&c}, std::vector<int32_t>{9});
  ASSERT_TRUE(la.ok() && lb.ok() && lc.ok()) << la.status() << lb.status() << lc.status();
  // The three steps run eagerly, captured and replayed (CUDA graphs): equal to
  // DecodeGraphsMatchTheEagerSteps' 1e-5; a state left wrong (a position, an entry, a window row) moves the
  // logits by O(1).
  EXPECT_LT(RelL2(*la, *lc), 1e-5);
  EXPECT_LT(RelL2(*lb, *lc), 1e-5);
}

// Sampling's candidates on the device (ForwardTop: sums, TopK, bitonic sort) against the host's definition
// (TopOfRows) of the same logits: the same forward run twice from equal states (nothing cached, so both
// upload the same host states and compute the same bits). Ids and values exactly, sums to rounding, and
// full_row gives the logits back.
TEST(CudaModelTest, SamplingCandidatesOnTheDeviceMatchTheHosts) {
  SKIP_WITHOUT_GPU();
  setenv("V4SERVE_CUDA_STATE_CACHE_MB", "0", 1);
  Pair p = LoadPair(CudaWeights::kBf16);
  unsetenv("V4SERVE_CUDA_STATE_CACHE_MB");
  ASSERT_TRUE(p.gpu != nullptr);
  const ModelConfig& c = p.gpu->config();
  std::vector<SequenceState> a = {NewSequenceState(c), NewSequenceState(c), NewSequenceState(c)};
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(
        p.gpu->Prefill(&a[i], Prompt(40 + 17 * static_cast<int64_t>(i), 60 + i), false, nullptr).ok());
  }
  std::vector<SequenceState> b = a;
  const std::vector<int32_t> next = {5, 9, 300};
  const std::vector<int64_t> counts = {1, 1, 1};
  const std::vector<float> temps = {0.7f, 0.0f, 1.6f};
  absl::StatusOr<std::vector<float>> logits =
      p.gpu->DecodeChunks({&a[0], &a[1], &a[2]}, counts, next, nullptr);
  ASSERT_TRUE(logits.ok()) << logits.status();
  for (const int64_t m : {int64_t{256}, int64_t{37}}) {
    SCOPED_TRACE(testing::Message() << "m " << m);
    std::vector<SequenceState> bb = b;
    absl::StatusOr<TopLogits> top = p.gpu->DecodeChunksTop({&bb[0], &bb[1], &bb[2]}, counts, next, temps, m);
    ASSERT_TRUE(top.ok()) << top.status();
    const TopLogits want = TopOfRows(*logits, 3, temps, m);
    ASSERT_EQ(top->m, m);
    EXPECT_EQ(top->vocab, c.vocab_size);
    EXPECT_EQ(top->ids, want.ids);
    EXPECT_EQ(top->values, want.values);
    for (int r = 0; r < 3; ++r) {
      EXPECT_NEAR(top->norm[r], want.norm[r], 1e-12 * want.norm[r]);
      EXPECT_NEAR(top->norm1[r], want.norm1[r], 1e-12 * want.norm1[r]);
    }
    absl::StatusOr<std::vector<float>> row = top->full_row(2);
    ASSERT_TRUE(row.ok()) << row.status();
    EXPECT_EQ(*row,
              std::vector<float>(logits->begin() + 2 * c.vocab_size, logits->begin() + 3 * c.vocab_size));
    EXPECT_FALSE(top->full_row(3).ok());
  }
}

// MXFP4 experts whose block scale the GEMV cannot hold (it folds 2^6 into the FP32 exponent: bytes above
// 248) are refused at load with a clear error, not computed as infinities.
TEST(CudaModelTest, Mxfp4ScalesBeyondTheGemvsRangeAreRefusedAtLoad) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->expert_dtype, "fp4");
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<std::unique_ptr<cpu::ModelWeights>> w = cpu::LoadWeights(*config, **ckpt, false);
  ASSERT_TRUE(w.ok()) << w.status();
  const cpu::RopeTable main = cpu::MakeRopeTable(config->qk_rope_head_dim, config->rope_theta, nullptr);
  const cpu::RopeTable comp =
      cpu::MakeRopeTable(config->qk_rope_head_dim, config->compress_rope_theta, &config->rope_scaling);
  ASSERT_TRUE(cuda::MakeCudaBackend(*config, **w, main, comp, CudaWeights::kBf16).ok());
  (*w)->layers[1].experts[3].w2[17] = 3e38f;  // amax / 6 = 2^125.2: a block scale of 2^126.
  absl::StatusOr<std::unique_ptr<ForwardBackend>> be =
      cuda::MakeCudaBackend(*config, **w, main, comp, CudaWeights::kBf16);
  ASSERT_FALSE(be.ok());
  EXPECT_EQ(be.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(be.status().message().find("block scale of 2^126"), std::string::npos) << be.status();
}

// CUDA graphs (CudaBackend::Section) against the same steps run eagerly (V4SERVE_CUDA_GRAPHS=0), FP8
// weights. Batches of 4, 2 and 1 sequences at different positions decode several steps each (a row count's
// first forward runs eagerly, its second captures, the rest replay); a 700-token prefill in between moves
// the GEMMs' scratch, so the graphs captured before it are stale and must be captured again. The graphs run
// the eager path's kernels in its order: logits, final streams and states equal to rounding, where a stale
// buffer, position or scratch address moves them by O(1). The counters show each path ran.
TEST(CudaModelTest, DecodeGraphsMatchTheEagerSteps) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(config.ok() && ckpt.ok());
  auto load = [&](const char* graphs) {
    return LoadWithEnv(*config, **ckpt, CudaWeights::kFp8, {{"V4SERVE_CUDA_GRAPHS", graphs}});
  };
  ExpectRefused(load("yes"), "V4SERVE_CUDA_GRAPHS");
  auto gm = load("1"), em = load("0");
  ASSERT_TRUE(gm.ok() && em.ok()) << gm.status() << em.status();
  Model& graphs = **gm;
  Model& eager = **em;
  EXPECT_NE(graphs.backend().Describe().find("CUDA graphs for decode up to 128 rows"), std::string::npos)
      << graphs.backend().Describe();
  EXPECT_NE(eager.backend().Describe().find("CUDA graphs off (V4SERVE_CUDA_GRAPHS=0)"), std::string::npos)
      << eager.backend().Describe();
  std::vector<SequenceState> gs, es;
  const std::vector<int64_t> lens = {70, 33, 101, 45};
  for (size_t i = 0; i < lens.size(); ++i) {
    gs.push_back(graphs.NewState());
    es.push_back(eager.NewState());
    const std::vector<int32_t> prompt = Prompt(lens[i], static_cast<uint32_t>(60 + i));
    ASSERT_TRUE(graphs.Prefill(&gs.back(), prompt).ok());
    ASSERT_TRUE(eager.Prefill(&es.back(), prompt).ok());
  }
  const int64_t vocab = config->vocab_size;
  std::vector<int32_t> next = {5, 77, 301, 42};
  int64_t replayed = 0, captured = 0, captured_after_move = 0;
  const std::vector<int> batches = {4, 4, 4, 4, 2, 2, 2, 1, 1, 1, 4, 4, 2, 2};
  for (size_t step = 0; step < batches.size(); ++step) {
    if (step == 10) {  // Moves the scratch: every graph so far is stale.
      SequenceState g = graphs.NewState(), e = eager.NewState();
      const std::vector<int32_t> long_prompt = Prompt(700, 99);
      auto lg = graphs.Prefill(&g, long_prompt), le = eager.Prefill(&e, long_prompt);
      ASSERT_TRUE(lg.ok() && le.ok()) << lg.status() << le.status();
      EXPECT_LT(RelL2(*lg, *le), 1e-5);
    }
    const int k = batches[step];
    absl::StatusOr<TwinStep> t = DecodeTwins(graphs, eager, gs, es, k, vocab, &next);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_LT(RelL2(t->logits_a, t->logits_b), 1e-5) << "step " << step << ", batch " << k;
    EXPECT_LT(RelL2(t->streams_a, t->streams_b), 1e-5) << "step " << step;
    absl::StatusOr<cuda::ForwardCounters> gc = cuda::LastForwardCounters(graphs.backend());
    absl::StatusOr<cuda::ForwardCounters> ec = cuda::LastForwardCounters(eager.backend());
    ASSERT_TRUE(gc.ok() && ec.ok());
    EXPECT_FALSE(gc->graphs_off);
    EXPECT_TRUE(ec->graphs_off);
    EXPECT_EQ(ec->graph_sections + ec->graph_captures, 0);
    // A replayed section counts what its host code would have: the same bytes and FLOPs.
    EXPECT_EQ(gc->weight_bytes, ec->weight_bytes) << "step " << step;
    EXPECT_EQ(gc->gemm_flops, ec->gemm_flops) << "step " << step;
    replayed += gc->graph_sections;
    captured += gc->graph_captures;
    if (step == 10) captured_after_move = gc->graph_captures;
  }
  for (size_t i = 0; i < gs.size(); ++i) EXPECT_LT(StateRelL2(gs[i], es[i]), 1e-5) << "state " << i;
  // Sections: 5 (4 layers) a forward. Row counts 4, 2, 1 each capture once (their second forward), 4 and 2
  // again after the move; the other forwards replay.
  EXPECT_EQ(captured, 5 * 5);
  EXPECT_EQ(captured_after_move, 5);
  EXPECT_GE(replayed, 5 * 6);
}

// Programmatic dependent launch (V4SERVE_CUDA_PDL, on by default on sm_90; model/cuda/launch.cuh) only lets a
// kernel's blocks start before the kernel ahead of it ends; each waits for that kernel before it touches its
// outputs. So every logit, final stream and state equals, bit for bit, what the same kernels give launched
// plainly, with CUDA graphs (the attribute captured as graph edges) and without; a kernel that read or wrote
// before its wait would race and differ. Prefill (700 tokens: the GEMM and tile kernels) and decode at 4, 2
// and 1 rows, FP8 and BF16 weights, with and without the row GEMMs (whose weights are prefetched ahead of the
// wait).
TEST(CudaModelTest, ProgrammaticLaunchGivesTheSameBitsAsPlainLaunches) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(config.ok() && ckpt.ok());
  {
    // Unset, the switch is on where the GPU and the kernels take it (sm_90, which the cases below need).
    auto dm = LoadWithEnv(*config, **ckpt, CudaWeights::kFp8, {{"V4SERVE_CUDA_PDL", ""}});
    ASSERT_TRUE(dm.ok()) << dm.status();
    EXPECT_NE((*dm)->backend().Describe().find("programmatic launch"), std::string::npos)
        << (*dm)->backend().Describe();
  }
  ExpectRefused(LoadWithEnv(*config, **ckpt, CudaWeights::kFp8, {{"V4SERVE_CUDA_ROWS_GEMM", "fp16"}}),
                "V4SERVE_CUDA_ROWS_GEMM");
  struct Case {
    CudaWeights weights;
    const char* graphs;
    const char* rows_gemm;  // The row GEMMs ask for their weights ahead of the wait.
  };
  for (const Case& cs : {Case{CudaWeights::kFp8, "1", "0"}, Case{CudaWeights::kFp8, "1", "1"},
                         Case{CudaWeights::kFp8, "0", "fp8"}, Case{CudaWeights::kBf16, "1", "f32"},
                         Case{CudaWeights::kBf16, "0", "0"}}) {
    const char* graphs = cs.graphs;
    SCOPED_TRACE(absl::StrCat("weights ", static_cast<int>(cs.weights), ", graphs ", graphs, ", row GEMMs ",
                              cs.rows_gemm));
    auto load = [&](const char* pdl) {
      return LoadWithEnv(*config, **ckpt, cs.weights,
                         {{"V4SERVE_CUDA_GRAPHS", graphs},
                          {"V4SERVE_CUDA_PDL", pdl},
                          {"V4SERVE_CUDA_ROWS_GEMM", cs.rows_gemm}});
    };
    ExpectRefused(load("on"), "V4SERVE_CUDA_PDL");
    auto pm = load("1"), lm = load("0");
    ASSERT_TRUE(pm.ok() && lm.ok()) << pm.status() << lm.status();
    Model& pdl = **pm;
    Model& plain = **lm;
    EXPECT_NE(pdl.backend().Describe().find("programmatic launch"), std::string::npos)
        << pdl.backend().Describe();
    EXPECT_EQ(plain.backend().Describe().find("programmatic launch"), std::string::npos);
    const bool want_graphs = std::string(graphs) == "1";
    // Captured with the attribute (a capture that failed would turn graphs off and hide the graph path).
    EXPECT_EQ(pdl.backend().Describe().find("CUDA graphs for decode") != std::string::npos, want_graphs)
        << pdl.backend().Describe();
    int64_t replayed = 0;
    std::vector<SequenceState> ps, ls;
    const std::vector<int64_t> lens = {700, 33, 101, 45};
    for (size_t i = 0; i < lens.size(); ++i) {
      ps.push_back(pdl.NewState());
      ls.push_back(plain.NewState());
      const std::vector<int32_t> prompt = Prompt(lens[i], static_cast<uint32_t>(80 + i));
      auto a = pdl.Prefill(&ps.back(), prompt), b = plain.Prefill(&ls.back(), prompt);
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      EXPECT_EQ(RelL2(*a, *b), 0.0) << "prefill " << i;
    }
    std::vector<int32_t> next = {5, 77, 301, 42};
    const int64_t vocab = config->vocab_size;
    for (const int k : {4, 4, 4, 2, 2, 2, 1, 1, 1}) {
      absl::StatusOr<TwinStep> t = DecodeTwins(pdl, plain, ps, ls, k, vocab, &next);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_EQ(RelL2(t->logits_a, t->logits_b), 0.0) << "batch " << k;
      EXPECT_EQ(RelL2(t->streams_a, t->streams_b), 0.0) << "batch " << k;
      absl::StatusOr<cuda::ForwardCounters> pc = cuda::LastForwardCounters(pdl.backend());
      ASSERT_TRUE(pc.ok());
      EXPECT_EQ(pc->graphs_off, !want_graphs) << pdl.backend().Describe();
      replayed += pc->graph_sections;
    }
    for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(StateRelL2(ps[i], ls[i]), 0.0) << "state " << i;
    if (want_graphs) {
      EXPECT_GT(replayed, 0);
    }
  }
}

TEST(CudaModelTest, AutoPicksCudaWithAGpuAndCudaFailsClearlyWithout) {
  std::string why;
  absl::StatusOr<Device> d = ResolveDevice(Device::kAuto, &why);
  ASSERT_TRUE(d.ok());
  absl::StatusOr<Device> forced = ResolveDevice(Device::kCuda);
  if (*d == Device::kCpu) {
    EXPECT_EQ(forced.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_NE(why.find("cpu: "), std::string::npos) << why;
  } else {
    EXPECT_TRUE(forced.ok());
  }
  EXPECT_FALSE(ParseDevice("gpu").ok());
  EXPECT_EQ(*ParseDevice("cuda"), Device::kCuda);
}

// Runs everywhere: without a GPU, asking for CUDA is a clear UNAVAILABLE (auto falls back to the CPU); with
// one, the model reports the CUDA backend.
TEST(CudaModelTest, ExplicitCudaWithoutAGpuIsUnavailableAndAutoFallsBack) {
  absl::StatusOr<ModelConfig> config = LoadModelConfig(TinyDir());
  ASSERT_TRUE(config.ok()) << config.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ModelOptions forced, automatic;
  forced.device = Device::kCuda;
  automatic.device = Device::kAuto;
  auto f = Model::FromCheckpoint(*config, **ckpt, forced);
  auto a = Model::FromCheckpoint(*config, **ckpt, automatic);
  ASSERT_TRUE(a.ok()) << a.status();
  std::string why;
  if (HaveGpu(&why)) {
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ((*f)->backend().device(), Device::kCuda);
    EXPECT_EQ((*a)->backend().device(), Device::kCuda);
  } else {
    EXPECT_EQ(f.status().code(), absl::StatusCode::kUnavailable) << f.status();
    EXPECT_NE(f.status().message().find("--device=cuda"), std::string::npos) << f.status();
    EXPECT_EQ((*a)->backend().device(), Device::kCpu);
    EXPECT_EQ((*a)->backend().Describe(), "cpu: fp32, exact");
  }
  // The faithful mode has no CUDA implementation: explicit CUDA refuses, auto stays on the CPU.
  forced.mode = automatic.mode = NumericMode::kFaithful;
  auto ff = Model::FromCheckpoint(*config, **ckpt, forced);
  EXPECT_FALSE(ff.ok());
  auto af = Model::FromCheckpoint(*config, **ckpt, automatic);
  ASSERT_TRUE(af.ok()) << af.status();
  EXPECT_EQ((*af)->backend().device(), Device::kCpu);
}

}  // namespace
}  // namespace v4serve::model
