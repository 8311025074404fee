// The CUDA backend's forward pass (see cuda_backend_impl.cuh): CudaBackend::Run, the chain of CUDA-graph
// sections and attention cores a forward is, the sections' capture and replay (Section, DropGraphs), the mHC
// pre-mix and the head with its three outputs (logits, greedy ids, sampling's candidates). Runtime, weights
// and the public entry points are in cuda_backend.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_backend_impl.cuh"
#include "model/cuda/cuda_check.h"
#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/device_state_cache.h"
#include "model/cuda/mhc_kernels.cuh"
#include "model/cuda/select_kernels.cuh"
#include "services/status_macros.h"

namespace v4serve::model::cuda::impl {

namespace k = kernels;

void CudaBackend::DropGraphs(bool stale_only) const {
  for (auto it = graphs_.begin(); it != graphs_.end();) {
    if (stale_only && it->second.moves == scratch_moves_) {
      ++it;
      continue;
    }
    cudaGraphExecDestroy(it->second.exec);  // In flight: freed when it completes.
    graphs_.erase(it++);
  }
  int dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGraphMemTrim(dev);  // Their sections' scratch.
}

namespace {
// The additive counters a section's host code adds (what a replay adds without running it).
ForwardCounters CountedSince(const ForwardCounters& now, const ForwardCounters& before) {
  ForwardCounters d;
  d.weight_bytes = now.weight_bytes - before.weight_bytes;
  d.kv_bytes = now.kv_bytes - before.kv_bytes;
  d.activation_bytes = now.activation_bytes - before.activation_bytes;
  d.gemm_flops = now.gemm_flops - before.gemm_flops;
  d.attention_flops = now.attention_flops - before.attention_flops;
  return d;
}
void AddCounted(const ForwardCounters& d, ForwardCounters* c) {
  c->weight_bytes += d.weight_bytes;
  c->kv_bytes += d.kv_bytes;
  c->activation_bytes += d.activation_bytes;
  c->gemm_flops += d.gemm_flops;
  c->attention_flops += d.attention_flops;
}

// The collapse's slices a token (HcMix, HcHeadMix): about two blocks an SM at small batches, up to 4 a
// token and slices of at least 128 values (the tiny model's 256 take 2, so the tests run the split too).
int64_t HcParts(int64_t n, int64_t d) {
  return std::clamp<int64_t>(Blocks(2 * 132, std::max<int64_t>(n, 1)), 1, std::clamp<int64_t>(d / 128, 1, 4));
}

}  // namespace

absl::Status CudaBackend::Section(int64_t n, int64_t index, bool graph,
                                  const std::function<absl::Status()>& fn) const {
  if (!graph || !GraphsOn()) return fn();
  const auto key = std::make_pair(n, index);
  if (auto it = graphs_.find(key); it != graphs_.end()) {
    if (it->second.moves == scratch_moves_) {
      V4_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second.exec, stream_));
      AddCounted(it->second.counted, &counters_);
      ++counters_.graph_sections;
      return absl::OkStatus();
    }
    DropGraphs(/*stale_only=*/true);  // The scratch moved since they were captured (a larger forward ran).
  }
  if (!graph_warm_[static_cast<size_t>(n)] || graphs_.size() >= kMaxGraphs) return fn();
  const ForwardCounters before = counters_;
  if (const cudaError_t e = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
      e != cudaSuccess) {
    (void)cudaGetLastError();
    graphs_off_why_ = absl::StrCat("cudaStreamBeginCapture failed: ", cudaGetErrorString(e));
    DropGraphs();
    return fn();
  }
  capturing_ = true;
  absl::Status st = fn();
  capturing_ = false;
  cudaGraph_t g = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream_, &g);
  cudaGraphExec_t exec = nullptr;
  st.Update(CudaStatus(end, "cudaStreamEndCapture", __FILE__, __LINE__));  // Keeps an earlier error.
  if (st.ok())
    st.Update(CudaStatus(cudaGraphInstantiate(&exec, g, 0), "cudaGraphInstantiate", __FILE__, __LINE__));
  if (g != nullptr) cudaGraphDestroy(g);
  if (!st.ok()) {
    // Nothing of the section ran. A scratch buffer that had to grow: this row count runs eagerly once more
    // (which grows it). Anything else: graphs off for this backend, said by Describe().
    (void)cudaGetLastError();
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    counters_ = before;
    if (st.code() == absl::StatusCode::kFailedPrecondition) {
      graph_warm_[static_cast<size_t>(n)] = false;
    } else {
      graphs_off_why_ = absl::StrCat("a capture failed: ", st.message());
      DropGraphs();
    }
    return fn();
  }
  graphs_[key] = Graph{exec, scratch_moves_, CountedSince(counters_, before)};
  ++counters_.graph_captures;
  V4_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream_));
  return absl::OkStatus();
}

absl::Status CudaBackend::HcPre(const HcW& w, const float* norm, const float* streams, int64_t n,
                                float* collapsed, float* post, float* comb) const {
  const ModelConfig& c = c_;
  const int64_t hc = c.hc_mult, d = c.hidden_size, mix = (2 + hc) * hc;
  Buf<float> mixes(stream_);
  RETURN_IF_ERROR(mixes.Alloc(n * mix));
  RETURN_IF_ERROR(Linear(streams, n, w.fn, mixes.get()));
  const int64_t parts = HcParts(n, d);
  if (parts > 1) {  // Decode sizes: a token's collapse over several blocks, its Sinkhorn beside them.
    return Launch(k::HcMix, static_cast<unsigned>(n * (parts + 1)), 256, 0, mixes.get(), c.rms_norm_eps,
                  w.base, w.scale, static_cast<int>(hc), static_cast<int>(c.hc_sinkhorn_iters),
                  static_cast<float>(c.hc_eps), streams, d, norm, collapsed, post, comb,
                  static_cast<int>(parts));
  }
  // Prefill sizes: a block a token's collapse (its streams read once), then a warp a token's Sinkhorn.
  Buf<float> rs(stream_);
  RETURN_IF_ERROR(rs.Alloc(n));
  RETURN_IF_ERROR(Launch(k::HcCollapseRows, static_cast<unsigned>(n), 256, 0, mixes.get(), c.rms_norm_eps,
                         w.base, w.scale, static_cast<int>(hc), static_cast<float>(c.hc_eps), streams, d,
                         norm, collapsed, rs.get()));
  return Launch(k::HcPostCombRows, static_cast<unsigned>(Blocks(n, 8)), 256, 0, mixes.get(),
                static_cast<const float*>(rs.get()), w.base, w.scale, static_cast<int>(hc),
                static_cast<int>(c.hc_sinkhorn_iters), static_cast<float>(c.hc_eps), n, post, comb);
}

absl::Status CudaBackend::HcPost(const float* out, const float* post, const float* comb, int64_t n,
                                 float* streams) const {
  const int hc = static_cast<int>(c_.hc_mult);
  const int64_t d = c_.hidden_size;
  return Launch(k::HcPostKernel(hc), k::HcPostGrid(n, d), k::kHcPostThreads, 0, streams, out, post, comb, hc,
                d);
}

absl::StatusOr<std::vector<float>> CudaBackend::Forward(absl::Span<const ForwardSegment> segments,
                                                        absl::Span<const int32_t> tokens,
                                                        absl::Span<const int64_t> logit_rows,
                                                        std::vector<float>* final_streams) const {
  std::vector<float> logits;
  Outputs out;
  out.logits = &logits;
  RETURN_IF_ERROR(Run(segments, tokens, logit_rows, final_streams, out));
  return logits;
}

absl::StatusOr<std::vector<int32_t>> CudaBackend::ForwardGreedy(absl::Span<const ForwardSegment> segments,
                                                                absl::Span<const int32_t> tokens,
                                                                absl::Span<const int64_t> logit_rows) const {
  std::vector<int32_t> ids;
  Outputs out;
  out.ids = &ids;
  RETURN_IF_ERROR(Run(segments, tokens, logit_rows, nullptr, out));
  return ids;
}

absl::StatusOr<TopLogits> CudaBackend::ForwardTop(absl::Span<const ForwardSegment> segments,
                                                  absl::Span<const int32_t> tokens,
                                                  absl::Span<const int64_t> logit_rows,
                                                  absl::Span<const float> temperatures, int64_t m) const {
  RETURN_IF_ERROR(ValidateTopRequest(logit_rows.size(), temperatures.size(), m));
  TopLogits top;
  Outputs out;
  out.top = &top;
  out.temperatures = temperatures;
  out.top_m = std::min<int64_t>({m, c_.vocab_size, 1024});
  RETURN_IF_ERROR(Run(segments, tokens, logit_rows, nullptr, out));
  const int64_t vocab = c_.vocab_size, rows = top.rows;
  const uint64_t run = runs_;
  top.full_row = [this, vocab, rows, run](int64_t r) -> absl::StatusOr<std::vector<float>> {
    if (runs_ != run) {
      return absl::FailedPreconditionError(
          "TopLogits::full_row after the backend's next call: the logits are gone");
    }
    if (r < 0 || r >= rows || top_logits_->size() < rows * vocab) {
      return absl::OutOfRangeError(absl::StrCat("logit row ", r, " of ", rows, " is not kept"));
    }
    std::vector<float> row(static_cast<size_t>(vocab));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row.data(), top_logits_->get() + r * vocab, vocab * 4,
                                            cudaMemcpyDeviceToHost, stream_));
    RETURN_IF_ERROR(Sync());
    return row;
  };
  return top;
}

absl::Status CudaBackend::Run(absl::Span<const ForwardSegment> segments, absl::Span<const int32_t> tokens,
                              absl::Span<const int64_t> logit_rows, std::vector<float>* final_streams,
                              const Outputs& outputs) const {
  ++runs_;
  using Clock = std::chrono::steady_clock;
  Clock::time_point host_mark = Clock::now();
  auto host_lap = [&host_mark](double* slot) {  // Host time since the last lap into `slot`.
    const Clock::time_point now = Clock::now();
    *slot += std::chrono::duration<double>(now - host_mark).count();
    host_mark = now;
  };
  std::vector<float>* logits_out = outputs.logits;
  std::vector<int32_t>* ids = outputs.ids;
  TopLogits* top = outputs.top;
  const ModelConfig& c = c_;
  const int64_t n = static_cast<int64_t>(tokens.size()), d = c.hidden_size, hc = c.hc_mult;
  counters_ = ForwardCounters{};
  cudaStream_t s = stream_;
  // A forward that failed before its synchronization may still have copies from arena_ queued.
  if (in_flight_) RETURN_IF_ERROR(Sync());
  in_flight_ = true;
  arena_.Reset();  // The previous forward's copies to it have completed (it synchronized).
  V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(touched_, 0, c.num_hidden_layers * c.n_routed_experts * 4, s));
  // Decode-sized forwards: the fixed buffers their CUDA graphs record (Section); others their own.
  const bool graph = GraphsOn() && n <= graph_max_rows_;
  std::unique_ptr<StepBuffers> own;
  if (graph && graph_bufs_ == nullptr) {  // Kept only whole: graphs rely on these never moving.
    auto bufs = std::make_unique<StepBuffers>(s);
    RETURN_IF_ERROR(bufs->Reserve(c, graph_max_rows_));
    graph_bufs_ = std::move(bufs);
  }
  if (!graph) own = std::make_unique<StepBuffers>(s);
  StepBuffers* const b = graph ? graph_bufs_.get() : own.get();
  RETURN_IF_ERROR(b->Reserve(c, n));
  RETURN_IF_ERROR(Stage(tokens.data(), n, &b->tok));
  {
    std::vector<int64_t> pos(static_cast<size_t>(n));
    for (const ForwardSegment& seg : segments) {
      for (int64_t t = 0; t < seg.count; ++t) pos[seg.begin + t] = seg.state->position + t;
    }
    RETURN_IF_ERROR(Stage(pos, &b->pos));
  }
  float* const streams = b->streams.get();
  float *const collapsed = b->collapsed.get(), *const sub = b->sub.get(), *const post = b->post.get(),
               *const comb = b->comb.get();
  Finish finish;
  std::vector<DeviceStateCache::Copy*> copies;
  absl::Cleanup abort_copies = [this] { state_cache_->Abort(); };
  const int64_t hits0 = state_cache_->hits(), misses0 = state_cache_->misses();
  for (const ForwardSegment& seg : segments) {
    ASSIGN_OR_RETURN(DeviceStateCache::Copy * copy, state_cache_->Acquire(seg.state));
    copies.push_back(copy);
  }
  counters_.states_cached = state_cache_->hits() - hits0;
  counters_.states_uploaded = state_cache_->misses() - misses0;
  if (profile_) {
    RETURN_IF_ERROR(Sync());
    mark_ = std::chrono::steady_clock::now();
  }
  // Section l: layer l - 1's attention output, its MoE and mHC, then layer l's mHC and attention
  // projections (section 0: the embedding first); layer l's attention core after it.
  const int64_t layers = c.num_hidden_layers;
  host_lap(&counters_.host_setup);
  for (int64_t l = 0; l <= layers; ++l) {
    RETURN_IF_ERROR(Section(n, l, graph, [&]() -> absl::Status {
      if (l == 0) {
        RETURN_IF_ERROR(Launch(k::Embed,
                               dim3(static_cast<unsigned>(n), static_cast<unsigned>(Blocks(d, 256))), 256, 0,
                               b->tok.get(), embed_.p, embed_.bf16, hc, d, streams));
      } else {
        const LayerW& w = layers_[static_cast<size_t>(l - 1)];
        RETURN_IF_ERROR(AttentionOut(w, l - 1, n, b, sub));
        RETURN_IF_ERROR(HcPost(sub, post, comb, n, streams));
        RETURN_IF_ERROR(HcPre(w.hc_ffn, w.ffn_norm, streams, n, collapsed, post, comb));
        RETURN_IF_ERROR(Mark(&counters_.s_mhc));
        RETURN_IF_ERROR(Moe(w, l - 1, c.is_hash_layer(l - 1), collapsed, b->tok.get(), n, sub));
        RETURN_IF_ERROR(Mark(&counters_.s_moe));
        RETURN_IF_ERROR(HcPost(sub, post, comb, n, streams));
        counters_.activation_bytes +=
            n * hc * d * 4 * 6;  // Two sites: read for the mixes, read + write post.
        RETURN_IF_ERROR(Mark(&counters_.s_mhc));
      }
      if (l == layers) return absl::OkStatus();
      const LayerW& w = layers_[static_cast<size_t>(l)];
      RETURN_IF_ERROR(HcPre(w.hc_attn, w.attn_norm, streams, n, collapsed, post, comb));
      RETURN_IF_ERROR(Mark(&counters_.s_mhc));
      return AttentionIn(w, l, collapsed, n, b);
    }));
    host_lap(&counters_.host_sections);
    if (l < layers) {
      RETURN_IF_ERROR(AttentionCore(layers_[static_cast<size_t>(l)], l, segments, copies, n, b, &finish));
      host_lap(&counters_.host_cores);
    }
  }
  // Final collapse, norm and head for the requested rows.
  const int64_t m = static_cast<int64_t>(logit_rows.size());
  Buf<float> picked_rows(s), hidden(s), mixes(s), logits(s);
  Buf<int32_t> d_rows(s);
  bool all_rows = m == n;  // Decode: every row, in order; the head reads the streams in place.
  for (int64_t i = 0; i < m && all_rows; ++i) all_rows = logit_rows[i] == i;
  const float* picked = streams;
  if (!all_rows && m > 0) {
    const std::vector<int32_t> rows(logit_rows.begin(), logit_rows.end());
    RETURN_IF_ERROR(Stage(rows, &d_rows));
    RETURN_IF_ERROR(picked_rows.Alloc(m * hc * d));
    RETURN_IF_ERROR(Launch(k::GatherRows, m, 256, 0, streams, d_rows.get(), hc * d, picked_rows.get()));
    picked = picked_rows.get();
  }
  RETURN_IF_ERROR(mixes.Alloc(m * hc));
  RETURN_IF_ERROR(hidden.Alloc(m * d));
  Buf<float>& lg = top != nullptr ? *top_logits_ : logits;  // Top: kept for TopLogits::full_row.
  RETURN_IF_ERROR(lg.Alloc(m * c.vocab_size));
  if (m > 0) {  // No logit rows (a prefill chunk whose logits nobody reads): no head.
    RETURN_IF_ERROR(Linear(picked, m, hc_head_.fn, mixes.get()));
    RETURN_IF_ERROR(Launch(k::HcHeadMix, dim3(static_cast<unsigned>(m), static_cast<unsigned>(HcParts(m, d))),
                           256, 0, mixes.get(), c.rms_norm_eps, hc_head_.base, hc_head_.scale,
                           static_cast<int>(hc), static_cast<float>(c.hc_eps), picked, d, norm_,
                           hidden.get()));
    RETURN_IF_ERROR(Linear(hidden.get(), m, head_, lg.get()));
  }
  // Top: m candidates a row and two sums. Greedy: the ids only. Otherwise decode-sized logits go through
  // page-locked memory (a pageable copy of batch 64's 33 MB ran at a few GB/s); larger ones (every row of a
  // long prefill) straight to pageable memory.
  const int64_t nl = m * c.vocab_size;
  constexpr int64_t kPinnedFloats = int64_t{64} << 20;  // 256 MiB.
  const float* pinned = nullptr;
  Buf<int32_t> d_ids(s);
  const int32_t* pinned_ids = nullptr;
  Buf<float> d_temps(s);
  Buf<double> d_norms(s);
  Buf<int32_t> d_sel(s), d_cnt(s), d_top_ids(s);
  Buf<float> d_top_vals(s);
  Buf<int64_t> d_cols(s);
  const void* pinned_top = nullptr;
  const int64_t tm = outputs.top_m;
  constexpr int64_t kSumChunks = 16;  // Blocks a row for the softmax sums (a row's 129k double exps).
  if (top != nullptr) {
    if (m > 0) {  // Top-m by TopK's radix select, sorted, then the sums; all back in one piece.
      RETURN_IF_ERROR(Stage(outputs.temperatures.data(), m, &d_temps));
      RETURN_IF_ERROR(Stage(std::vector<int64_t>(static_cast<size_t>(m), c.vocab_size), &d_cols));
      RETURN_IF_ERROR(d_sel.Alloc(m * tm));
      RETURN_IF_ERROR(d_cnt.Alloc(m));
      RETURN_IF_ERROR(
          Launch(k::TopK, m, 1024, 0, lg.get(), c.vocab_size, d_cols.get(), tm, d_sel.get(), d_cnt.get()));
      RETURN_IF_ERROR(d_top_ids.Alloc(m * tm));
      RETURN_IF_ERROR(d_top_vals.Alloc(m * tm));
      RETURN_IF_ERROR(Launch(k::SortTop, m, 256, 0, lg.get(), c.vocab_size, d_sel.get(), static_cast<int>(tm),
                             d_top_ids.get(), d_top_vals.get()));
      RETURN_IF_ERROR(d_norms.Alloc(2 * m * kSumChunks));
      RETURN_IF_ERROR(Launch(k::RowSoftmaxPartials, dim3(static_cast<unsigned>(m), kSumChunks), 256, 0,
                             lg.get(), c.vocab_size, d_top_vals.get(), static_cast<int>(tm), d_temps.get(),
                             d_norms.get()));
      // Partial sums (doubles) first: 16-byte aligned.
      ASSIGN_OR_RETURN(float* p, arena_.Take(4 * m * kSumChunks + 2 * m * tm));
      V4_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(p, d_norms.get(), 2 * m * kSumChunks * 8, cudaMemcpyDeviceToHost, s));
      float* after = p + 4 * m * kSumChunks;
      V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(after, d_top_ids.get(), m * tm * 4, cudaMemcpyDeviceToHost, s));
      V4_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(after + m * tm, d_top_vals.get(), m * tm * 4, cudaMemcpyDeviceToHost, s));
      pinned_top = p;
    }
  } else if (ids != nullptr) {
    if (m > 0) {
      RETURN_IF_ERROR(d_ids.Alloc(m));
      Buf<float> pv(s);
      Buf<int32_t> pi(s);
      RETURN_IF_ERROR(pv.Alloc(m * k::kArgmaxChunks));
      RETURN_IF_ERROR(pi.Alloc(m * k::kArgmaxChunks));
      k::LaunchArgmaxRows(logits.get(), m, c.vocab_size, pv.get(), pi.get(), d_ids.get(), s);
      V4_LAUNCH_CHECK(ArgmaxRows);
      ASSIGN_OR_RETURN(float* p, arena_.Take(m));
      V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p, d_ids.get(), m * 4, cudaMemcpyDeviceToHost, s));
      pinned_ids = reinterpret_cast<const int32_t*>(p);
    }
  } else if (nl <= kPinnedFloats) {
    ASSIGN_OR_RETURN(float* p, arena_.Take(nl));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p, logits.get(), nl * 4, cudaMemcpyDeviceToHost, s));
    pinned = p;
  } else {
    RETURN_IF_ERROR(logits.Download(logits_out));
  }
  if (final_streams != nullptr) RETURN_IF_ERROR(b->streams.Download(final_streams));
  // The forward's one synchronization; then the host states take what it computed, in order.
  host_lap(&counters_.host_head);
  RETURN_IF_ERROR(Sync());
  host_lap(&counters_.host_wait);
  in_flight_ = false;
  for (const std::function<void()>& f : finish) f();
  for (const ForwardSegment& seg : segments) seg.state->position += seg.count;
  std::move(abort_copies).Cancel();
  state_cache_->Commit();
  if (graph) graph_warm_[static_cast<size_t>(n)] = true;  // The scratch now fits n's sections.
  if (pinned != nullptr) logits_out->assign(pinned, pinned + nl);
  if (ids != nullptr) ids->assign(pinned_ids, pinned_ids + (pinned_ids != nullptr ? m : 0));
  if (top != nullptr) {
    top->rows = m;
    top->vocab = c.vocab_size;
    top->m = tm;
    if (pinned_top != nullptr) {
      const double* partial = static_cast<const double*>(pinned_top);
      const float* base = static_cast<const float*>(pinned_top) + 4 * m * kSumChunks;
      top->norm.assign(static_cast<size_t>(m), 0.0);
      top->norm1.assign(static_cast<size_t>(m), 0.0);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t ch = 0; ch < kSumChunks; ++ch) {
          top->norm[r] += partial[(r * kSumChunks + ch) * 2];
          top->norm1[r] += partial[(r * kSumChunks + ch) * 2 + 1];
        }
      }
      top->ids.assign(reinterpret_cast<const int32_t*>(base),
                      reinterpret_cast<const int32_t*>(base) + m * tm);
      top->values.assign(base + m * tm, base + 2 * m * tm);
    }
  }
  RETURN_IF_ERROR(Mark(&counters_.s_head));
  host_lap(&counters_.host_finish);
  return absl::OkStatus();
}

}  // namespace v4serve::model::cuda::impl
