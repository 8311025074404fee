// The CUDA backend: attention (projections, indexer, sparse/dense attention, window rings) and the
// streaming compressors on the device. See cuda_backend_impl.cuh.
#include <cmath>
#include <numeric>
#include <random>

#include "model/cuda/attention_mma.cuh"
#include "model/cuda/cuda_backend_impl.cuh"
#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/select_kernels.cuh"

namespace v4serve::model::cuda::impl {

namespace k = kernels;

// The head dims AttentionMma is instantiated for, and at most 64 heads (4 head groups x 2 dim halves = 256
// threads, its launch bound).
static bool AttentionMmaFits(int64_t h, int64_t hd) {
  return h >= 1 && h <= 64 && (hd == 128 || hd == 256 || hd == 512);
}

template <int HD>
static absl::Status SetAttentionMmaSmem() {
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k::AttentionMma<HD>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(k::AttentionMmaSmem(64, HD))));
  return absl::OkStatus();
}

absl::Status InitAttentionMma() {
  RETURN_IF_ERROR(SetAttentionMmaSmem<128>());
  RETURN_IF_ERROR(SetAttentionMmaSmem<256>());
  RETURN_IF_ERROR(SetAttentionMmaSmem<512>());
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k::IndexerScoresMma<128>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(k::IndexerMmaSmem(64, 128))));
  return absl::OkStatus();
}

absl::Status LaunchAttention(const AttentionArgs& a, bool tensor_cores, size_t smem_optin, cudaStream_t s,
                             bool pdl) {
  if (a.n <= 0) return absl::OkStatus();
  if (tensor_cores && AttentionMmaFits(a.h, a.hd)) {
    const int h = static_cast<int>(a.h);
    // Key splits up to 32 rows: about two blocks an SM (H200: 132) over the rows, each split at least two
    // key tiles. Above, one block a row (H200, 64 rows x 640 keys: 5 splits took 159 us, one block a row 144:
    // the partial outputs' traffic outweighs the idle SMs).
    constexpr int64_t kSplitRows = 32, kSplitBlocks = 2 * 132, kMaxSplits = k::kMaxAttentionSplits;
    const int64_t tiles = Blocks(a.max_keys, k::kMmaKeyTile);
    const int64_t splits =
        a.n > kSplitRows ? 1
                         : std::clamp<int64_t>(std::min(Blocks(kSplitBlocks, a.n), tiles / 2), 1, kMaxSplits);
    const int64_t split_keys = splits > 1 ? Blocks(tiles, splits) * k::kMmaKeyTile : 0;
    Buf<float> part(s), ml(s);
    if (splits > 1) {
      RETURN_IF_ERROR(part.Alloc(a.n * splits * a.h * a.hd));
      RETURN_IF_ERROR(ml.Alloc(a.n * splits * a.h * 2));
    }
    const dim3 grid(static_cast<unsigned>(a.n), static_cast<unsigned>(splits)),
        block(static_cast<unsigned>(k::AttentionMmaThreads(h)));
    const size_t smem = k::AttentionMmaSmem(h, static_cast<int>(a.hd));
    const dim3 cgrid(static_cast<unsigned>(a.n), static_cast<unsigned>(h));
#define V4_ATTENTION_MMA(HD)                                                                             \
  do {                                                                                                   \
    RETURN_IF_ERROR(LaunchKernel(pdl, s, k::AttentionMma<HD>, grid, block, smem, a.q, a.wk, a.ek,        \
                                 a.win_start, a.win_cnt, a.ent_base, a.vis, a.sel, a.sel_cnt, a.topk,    \
                                 a.sink, h, a.scale, a.o, split_keys, part.get(), ml.get()));            \
    if (splits > 1) {                                                                                    \
      RETURN_IF_ERROR(LaunchKernel(pdl, s, k::AttentionCombine<HD>, cgrid, 128, 0, part.get(), ml.get(), \
                                   static_cast<int>(splits), h, a.o));                                   \
    }                                                                                                    \
  } while (false)
    if (a.hd == 128) V4_ATTENTION_MMA(128);
    if (a.hd == 256) V4_ATTENTION_MMA(256);
    if (a.hd == 512) V4_ATTENTION_MMA(512);
#undef V4_ATTENTION_MMA
    return absl::OkStatus();
  }
  const size_t smem = static_cast<size_t>((a.hd + std::max<int64_t>(a.max_keys, 1)) * 4);
  if (smem > smem_optin) {
    return absl::UnimplementedError(
        absl::StrCat("attention over ", a.max_keys, " keys exceeds shared memory"));
  }
  RETURN_IF_ERROR(LaunchKernel(pdl, s, k::Attention, a.n * a.h, 256, smem, a.q, a.wk, a.ek, a.win_start,
                               a.win_cnt, a.ent_base, a.vis, a.sel, a.sel_cnt, a.topk, a.sink, a.h, a.hd,
                               a.scale, a.o));
  return absl::OkStatus();
}

absl::Status LaunchIndexerScores(const IndexerArgs& a, bool tensor_cores, cudaStream_t s, bool pdl) {
  if (a.n <= 0 || a.max_vis <= 0) return absl::OkStatus();  // No entry is visible: nothing to score.
  if (tensor_cores && a.id == 128 && a.ih >= 1 && a.ih <= 64) {
    // Enough blocks to fill the GPU at small batches; one per row when long.
    const int64_t chunks = std::clamp<int64_t>(Blocks(4 * 132, a.n), 1, Blocks(a.max_vis, k::kIdxTile));
    const int ih = static_cast<int>(a.ih);
    RETURN_IF_ERROR(LaunchKernel(pdl, s, k::IndexerScoresMma<128>,
                                 dim3(static_cast<unsigned>(a.n), static_cast<unsigned>(chunks)),
                                 static_cast<unsigned>((ih + 15) / 16 * 32), k::IndexerMmaSmem(ih, 128), a.iq,
                                 a.iw, a.ik, a.ent_base, a.vis, ih, a.max_vis, a.sc));
    return absl::OkStatus();
  }
  // Enough blocks to fill the GPU at small batches (a warp per entry at most); one per row when long.
  const int64_t chunks = std::clamp<int64_t>(Blocks(2 * 132, a.n), 1, Blocks(a.max_vis, 8));
  RETURN_IF_ERROR(LaunchKernel(
      pdl, s, k::IndexerScores, dim3(static_cast<unsigned>(a.n), static_cast<unsigned>(chunks)), 256,
      k::IndexerScoresSmem(a.ih, a.id, 8), a.iq, a.iw, a.ik, a.ent_base, a.vis, a.ih, a.id, a.max_vis, a.sc));
  return absl::OkStatus();
}

absl::Status CudaBackend::InitAttentionKernels(const cudaDeviceProp& prop) {
  RETURN_IF_ERROR(InitAttentionMma());
  // Dynamic shared memory may take what the kernel's static shared memory leaves of the opt-in limit.
  cudaFuncAttributes fa{};
  V4_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, k::Attention));
  smem_optin_ = prop.sharedMemPerBlockOptin - fa.sharedSizeBytes;
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k::Attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem_optin_)));
  V4_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, k::IndexerScores));
  V4_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(k::IndexerScores, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(prop.sharedMemPerBlockOptin - fa.sharedSizeBytes)));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<const float*>> CudaBackend::DownloadTails(
    const float* dev, int64_t width, absl::Span<const ForwardSegment> segments, int64_t keep) const {
  int64_t rows = 0, tails = 0;
  for (const ForwardSegment& seg : segments) {
    rows = std::max(rows, seg.begin + seg.count);
    tails += std::min(seg.count, keep);
  }
  std::vector<const float*> out;
  if (rows <= 2 * tails || rows * width <= (int64_t{1} << 20)) {  // Mostly tails anyway (decode): one copy.
    ASSIGN_OR_RETURN(float* h, arena_.Take(rows * width));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, dev, rows * width * 4, cudaMemcpyDeviceToHost, stream_));
    for (const ForwardSegment& seg : segments) {
      out.push_back(h + (seg.begin + seg.count - std::min(seg.count, keep)) * width);
    }
    return out;
  }
  for (const ForwardSegment& seg : segments) {
    const int64_t t = std::min(seg.count, keep);
    ASSIGN_OR_RETURN(float* h, arena_.Take(t * width));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, dev + (seg.begin + seg.count - t) * width, t * width * 4,
                                            cudaMemcpyDeviceToHost, stream_));
    out.push_back(h);
  }
  return out;
}

absl::Status CudaBackend::Compress(const CompressJob& job, int64_t layer,
                                   absl::Span<const ForwardSegment> segments,
                                   absl::Span<DeviceStateCache::Copy* const> copies,
                                   absl::Span<const int64_t> n_before, int64_t n, const int64_t* d_pos,
                                   std::vector<CopySpan>* late, Finish* finish) const {
  const int64_t m = c_.compress_ratios[static_cast<size_t>(layer)], width = job.width;
  const bool overlap = m == 4;
  const int64_t row = (overlap ? 2 : 1) * width, rd = c_.qk_rope_head_dim;
  const size_t ns = segments.size(), li = static_cast<size_t>(layer);
  cudaStream_t s = stream_;
  RETURN_IF_ERROR(Launch(k::AddApe, Blocks(n * row, 256), 256, 0, job.score, n, row, d_pos, m, job.w->ape));
  // Per entry to emit, its source rows (pointers at the feature half each contributes), as CompressorPush
  // reads them: this call's rows, or the copy's windows as they were when the call started.
  std::vector<const float*> pk, ps;
  std::vector<int32_t> begin = {0};
  std::vector<int64_t> epos, first(ns + 1, 0);
  std::vector<CopySpan> early;  // New entries into the copies; previous windows (before `late` runs).
  for (size_t i = 0; i < ns; ++i) {
    const ForwardSegment& seg = segments[i];
    const DeviceStateCache::Layer& dl = copies[i]->layers[li];
    const DeviceStateCache::Compressor& dc = job.which == 0 ? dl.compressor : dl.indexer;
    const AttentionLayerState& st = seg.state->layers[li];
    const CompressorState& hs = job.which == 0 ? st.compressor : st.indexer_compressor;
    const int64_t pos0 = seg.state->position, end = pos0 + seg.count;
    auto src = [&](int64_t q, bool score) -> const float* {
      if (q >= pos0) return (score ? job.score : job.kv) + (seg.begin + q - pos0) * row;
      if (q / m == pos0 / m) return (score ? dc.score : dc.kv) + (q % m) * row;  // The window in progress.
      return (score ? dc.prev_score : dc.prev_kv) + (q % m) * row;               // The one before (overlap).
    };
    first[i] = static_cast<int64_t>(epos.size());
    bool has_prev = hs.has_prev;
    int64_t last = -1;
    for (int64_t e = (pos0 / m + 1) * m - 1; e < end; e += m) {
      if (overlap && has_prev) {
        for (int64_t q = e - 2 * m + 1; q <= e - m; ++q) {
          pk.push_back(src(q, false));
          ps.push_back(src(q, true));
        }
      }
      const int64_t off = overlap ? width : 0;
      for (int64_t q = e - m + 1; q <= e; ++q) {
        pk.push_back(src(q, false) + off);
        ps.push_back(src(q, true) + off);
      }
      begin.push_back(static_cast<int32_t>(pk.size()));
      epos.push_back(e + 1 - m);
      has_prev = true;
      last = e;
    }
    if (overlap && last >= 0) {  // The last window completed becomes the previous one.
      for (int64_t q = last - m + 1; q <= last; ++q) {
        early.push_back({src(q, false), dc.prev_kv + (q % m) * row, row});
        early.push_back({src(q, true), dc.prev_score + (q % m) * row, row});
      }
    }
    for (int64_t q = std::max(pos0, end - m); q < end; ++q) {  // Each slot's newest row.
      late->push_back({src(q, false), dc.kv + (q % m) * row, row});
      late->push_back({src(q, true), dc.score + (q % m) * row, row});
    }
  }
  first[ns] = static_cast<int64_t>(epos.size());
  const int64_t ne = first[ns];
  Buf<float> pooled(s);
  Buf<const float*> d_pk(s), d_ps(s);
  Buf<int32_t> d_begin(s);
  Buf<int64_t> d_epos(s);
  const float* host_entries = nullptr;
  if (ne > 0) {
    RETURN_IF_ERROR(Stage(pk, &d_pk));
    RETURN_IF_ERROR(Stage(ps, &d_ps));
    RETURN_IF_ERROR(Stage(begin, &d_begin));
    RETURN_IF_ERROR(Stage(epos, &d_epos));
    RETURN_IF_ERROR(pooled.Alloc(ne * width));
    RETURN_IF_ERROR(
        Launch(k::PoolEntries, ne, 128, 0, d_pk.get(), d_ps.get(), d_begin.get(), width, pooled.get()));
    RETURN_IF_ERROR(Launch(k::RmsNormRope, ne, 256, 0, pooled.get(), width, job.w->norm, c_.rms_norm_eps,
                           width - rd, rd, d_epos.get(), 1, inv_comp_));
    // Into the copies' pages (reserved by the caller), a span per page the new entries reach.
    const int64_t pp = state_cache_->page_layout().per_page[li];
    for (size_t i = 0; i < ns; ++i) {
      const int64_t cnt = first[i + 1] - first[i];
      for (int64_t j = 0; j < cnt;) {
        const int64_t e = n_before[i] + j, run = std::min(cnt - j, pp - e % pp);
        early.push_back({pooled.get() + (first[i] + j) * width,
                         state_cache_->Row(*copies[i], layer, e, job.which == 1), run * width});
        j += run;
      }
    }
    ASSIGN_OR_RETURN(float* h, arena_.Take(ne * width));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, pooled.get(), ne * width * 4, cudaMemcpyDeviceToHost, s));
    host_entries = h;
  }
  RETURN_IF_ERROR(StageCopySpans(early));    // Before `pooled` is freed, in stream order.
  const int64_t keep = overlap ? 2 * m : m;  // Rows that decide the host state's windows.
  ASSIGN_OR_RETURN(const std::vector<const float*> kv_rows, DownloadTails(job.kv, row, segments, keep));
  ASSIGN_OR_RETURN(const std::vector<const float*> sc_rows, DownloadTails(job.score, row, segments, keep));
  const int which = job.which;
  finish->push_back([segments, li, which, width, row, keep, first, host_entries, kv_rows, sc_rows] {
    for (size_t i = 0; i < segments.size(); ++i) {
      const ForwardSegment& seg = segments[i];
      AttentionLayerState& st = seg.state->layers[li];
      CompressorState& hs = which == 0 ? st.compressor : st.indexer_compressor;
      const int64_t t = std::min(seg.count, keep), end = seg.state->position + seg.count;
      for (int64_t j = 0; j < t; ++j) {
        if (cpu::CompressorWriteRow(kv_rows[i] + j * row, sc_rows[i] + j * row, nullptr, end - t + j, &hs)) {
          cpu::CompressorCloseWindow(&hs);
        }
      }
      std::vector<float>& dst = which == 0 ? st.entries : st.indexer_keys;
      if (first[i + 1] > first[i]) {
        dst.insert(dst.end(), host_entries + first[i] * width, host_entries + first[i + 1] * width);
      }
    }
  });
  return absl::OkStatus();
}

absl::Status CudaBackend::AttentionIn(const LayerW& w, int64_t layer, const float* x, int64_t n,
                                      StepBuffers* b) const {
  const ModelConfig& c = c_;
  const int64_t h = c.num_attention_heads, hd = c.head_dim, rd = c.qk_rope_head_dim;
  const int64_t ratio = c.compress_ratios[static_cast<size_t>(layer)];
  const bool csa = ratio == 4;
  const int64_t ih = c.index_n_heads, id = c.index_head_dim;
  const double eps = c.rms_norm_eps;
  const float* inv = ratio > 0 ? inv_comp_ : inv_main_;
  const int64_t* d_pos = b->pos.get();
  cudaStream_t s = stream_;

  Buf<float> qr(s);
  RETURN_IF_ERROR(qr.Alloc(n * c.q_lora_rank));
  RETURN_IF_ERROR(Linear(x, n, w.wq_a, qr.get()));
  RETURN_IF_ERROR(Launch(k::RmsNorm, n, 256, 0, qr.get(), c.q_lora_rank, w.q_norm, eps));
  RETURN_IF_ERROR(Linear(qr.get(), n, w.wq_b, b->q.get()));
  RETURN_IF_ERROR(
      Launch(k::RmsNormRope, n * h, 128, 0, b->q.get(), hd, nullptr, eps, hd - rd, rd, d_pos, h, inv));
  RETURN_IF_ERROR(Linear(x, n, w.wkv, b->kv.get()));
  RETURN_IF_ERROR(
      Launch(k::RmsNormRope, n, 128, 0, b->kv.get(), hd, w.kv_norm, eps, hd - rd, rd, d_pos, 1, inv));
  if (csa) {  // The FP32 compressor projections, x split once where they run as 3xTF32.
    RETURN_IF_ERROR(LinearsF32(x, n,
                               {{&w.compressor.wkv, b->ckv.get()},
                                {&w.compressor.wgate, b->cscore.get()},
                                {&w.indexer_compressor.wkv, b->ikv.get()},
                                {&w.indexer_compressor.wgate, b->iscore.get()}}));
    RETURN_IF_ERROR(Linear(qr.get(), n, w.indexer_wq_b, b->iq.get()));
    RETURN_IF_ERROR(Linear(x, n, w.indexer_weights, b->iw.get()));
  } else if (ratio > 0) {
    RETURN_IF_ERROR(
        LinearsF32(x, n, {{&w.compressor.wkv, b->ckv.get()}, {&w.compressor.wgate, b->cscore.get()}}));
  }
  if (csa) {
    RETURN_IF_ERROR(Launch(k::Rope, Blocks(n * ih * rd / 2, 256), 256, 0, b->iq.get(), n * ih, id, id - rd,
                           rd, d_pos, ih, inv, false));
    const float iscale =
        static_cast<float>(1.0 / std::sqrt(static_cast<double>(id)) / std::sqrt(static_cast<double>(ih)));
    RETURN_IF_ERROR(Launch(k::Scale, Blocks(n * ih, 256), 256, 0, b->iw.get(), n * ih, iscale));
  }
  return Mark(&counters_.s_attn_proj);
}

absl::Status CudaBackend::AttentionCore(const LayerW& w, int64_t layer,
                                        absl::Span<const ForwardSegment> segments,
                                        absl::Span<DeviceStateCache::Copy* const> copies, int64_t n,
                                        StepBuffers* b, Finish* finish) const {
  const ModelConfig& c = c_;
  const int64_t h = c.num_attention_heads, hd = c.head_dim;
  const int64_t win = c.sliding_window, ratio = c.compress_ratios[static_cast<size_t>(layer)];
  const bool csa = ratio == 4;
  const int64_t id = c.index_head_dim, ih = c.index_n_heads;
  const float *q = b->q.get(), *kv = b->kv.get();
  const int64_t* d_pos = b->pos.get();
  cudaStream_t s = stream_;
  // Entry counts after this call: a window completes at each position p with p % ratio == ratio - 1.
  const size_t ns = segments.size();
  std::vector<int64_t> n_before(ns), n_after(ns);
  for (size_t i = 0; i < ns; ++i) {
    const int64_t pos0 = segments[i].state->position, end = pos0 + segments[i].count;
    n_before[i] =
        static_cast<int64_t>(segments[i].state->layers[static_cast<size_t>(layer)].entries.size()) / hd;
    n_after[i] = n_before[i] + (ratio > 0 ? end / ratio - pos0 / ratio : 0);
    if (n_before[i] != copies[i]->layers[static_cast<size_t>(layer)].n_entries) {
      return absl::InternalError(absl::StrCat("layer ", layer, ": the state holds ", n_before[i],
                                              " compressed entries, its device copy ",
                                              copies[i]->layers[static_cast<size_t>(layer)].n_entries));
    }
  }
  // The compressors pool on the device into the device copies; `late` then moves this call's rows into
  // their windows (after the pooling and the previous-window spans have read the old ones).
  std::vector<CopySpan> late;
  if (ratio > 0) {
    for (size_t i = 0; i < ns; ++i) RETURN_IF_ERROR(state_cache_->Reserve(layer, n_after[i], copies[i]));
    const CompressJob main{&w.compressor, 0, hd, b->ckv.get(), b->cscore.get()};
    RETURN_IF_ERROR(Compress(main, layer, segments, copies, n_before, n, d_pos, &late, finish));
    if (csa) {
      const CompressJob indexer{&w.indexer_compressor, 1, id, b->ikv.get(), b->iscore.get()};
      RETURN_IF_ERROR(Compress(indexer, layer, segments, copies, n_before, n, d_pos, &late, finish));
    }
    for (size_t i = 0; i < ns; ++i) copies[i]->layers[static_cast<size_t>(layer)].n_entries = n_after[i];
  }
  // Window keys: per segment its prior window keys (from the ring) then its own rows, copied into one
  // buffer. Entries and indexer keys stay in the copies' pages: the kernels read them through a page table
  // (the segments' pages one after the other; ent_base is where a row's segment's pages start in it).
  // The four per-row tables and the page table, one after the other, so that they go up in one upload.
  const KvPageLayout& pl = state_cache_->page_layout();
  const int64_t pp = pl.per_page[static_cast<size_t>(layer)];
  int64_t n_pages = 0;
  for (size_t i = 0; i < ns; ++i) n_pages += pp > 0 ? (n_after[i] + pp - 1) / pp : 0;
  std::vector<int64_t> tables(static_cast<size_t>(4 * n + n_pages));
  int64_t *const win_start = tables.data(), *const win_cnt = win_start + n,
                 *const ent_base = win_start + 2 * n, *const vis = win_start + 3 * n,
                 *const page_table = win_start + 4 * n;
  int64_t wk_rows = 0, ek_rows = 0, pages_before = 0, max_keys = 0, max_vis = 0;
  for (size_t i = 0; i < ns; ++i) {
    const ForwardSegment& seg = segments[i];
    const int64_t pos0 = seg.state->position, prior = std::min(pos0, win - 1);
    const int64_t n_ent = n_after[i];
    for (int64_t t = 0; t < seg.count; ++t) {
      const int64_t r = seg.begin + t, p = pos0 + t;
      const int64_t first = std::max<int64_t>(p - win + 1, pos0 - prior);
      win_start[r] = wk_rows + (first - (pos0 - prior));
      win_cnt[r] = p - first + 1;
      ent_base[r] = pages_before;
      vis[r] = ratio > 0 ? std::min((p + 1) / ratio, n_ent) : 0;
      max_vis = std::max(max_vis, vis[r]);
      max_keys = std::max(max_keys, win_cnt[r] + (csa ? std::min(vis[r], c.index_topk) : vis[r]));
    }
    wk_rows += prior + seg.count;
    ek_rows += n_ent;
    const int64_t seg_pages = pp > 0 ? (n_ent + pp - 1) / pp : 0;
    for (int64_t k = 0; k < seg_pages; ++k) {
      page_table[pages_before + k] = reinterpret_cast<int64_t>(copies[i]->pages[static_cast<size_t>(k)]);
    }
    pages_before += seg_pages;
  }
  Buf<float> wk(s);
  RETURN_IF_ERROR(wk.Alloc(wk_rows * hd));
  // Filled on the device from the states' device copies, in the launch that also moves `late`.
  {
    int64_t wo = 0;
    for (size_t i = 0; i < ns; ++i) {
      const ForwardSegment& seg = segments[i];
      const DeviceStateCache::Layer& dl = copies[i]->layers[static_cast<size_t>(layer)];
      const int64_t pos0 = seg.state->position, prior = std::min(pos0, win - 1);
      if (prior > 0) {  // Ring slots of positions pos0 - prior .. pos0 - 1: one run, or two if it wraps.
        const int64_t s0 = (pos0 - prior) % win, run = std::min(prior, win - s0);
        late.push_back({dl.window + s0 * hd, wk.get() + wo * hd, run * hd});
        late.push_back({dl.window, wk.get() + (wo + run) * hd, (prior - run) * hd});
      }
      late.push_back({kv + seg.begin * hd, wk.get() + (wo + prior) * hd, seg.count * hd});
      wo += prior + seg.count;
    }
  }
  RETURN_IF_ERROR(StageCopySpans(late));
  counters_.kv_bytes += (wk_rows * hd + ek_rows * hd + (csa ? ek_rows * id : 0)) * 4;
  RETURN_IF_ERROR(Mark(&counters_.s_attn_host));
  Buf<int64_t> d_tables(s);
  RETURN_IF_ERROR(Stage(tables, &d_tables));
  const int64_t *d_ws = d_tables.get(), *d_wc = d_ws + n, *d_eb = d_ws + 2 * n, *d_vis = d_ws + 3 * n;
  const auto* d_pages = reinterpret_cast<const float* const*>(d_ws + 4 * n);
  const int shift = std::max(0, k::PagedRowsShift(pp));  // pp: 0 on uncompressed layers (no entries read).
  const k::PagedRows ek{d_pages, pl.entries_at[static_cast<size_t>(layer)], shift};
  const k::PagedRows ik{d_pages, pl.keys_at[static_cast<size_t>(layer)], shift};
  Buf<float> sc(s);
  Buf<int32_t> sel(s), sel_cnt(s);
  if (csa && max_vis > 0) {
    RETURN_IF_ERROR(sc.Alloc(n * max_vis));
    RETURN_IF_ERROR(LaunchIndexerScores(
        {b->iq.get(), b->iw.get(), ik, d_eb, d_vis, n, ih, id, max_vis, sc.get()}, bf16_, s, pdl_));
    RETURN_IF_ERROR(sel.Alloc(n * c.index_topk));
    RETURN_IF_ERROR(sel_cnt.Alloc(n));
    RETURN_IF_ERROR(
        Launch(k::TopK, n, 256, 0, sc.get(), max_vis, d_vis, c.index_topk, sel.get(), sel_cnt.get()));
    for (int64_t r = 0; r < n; ++r) counters_.attention_flops += 2.0 * vis[r] * ih * id;
  }
  RETURN_IF_ERROR(Mark(&counters_.s_indexer));
  const bool use_entries = ratio > 0 && max_vis > 0;
  const AttentionArgs args{q,
                           wk.get(),
                           ek,
                           d_ws,
                           d_wc,
                           use_entries ? d_eb : nullptr,
                           d_vis,
                           csa && use_entries ? sel.get() : nullptr,
                           sel_cnt.get(),
                           c.index_topk,
                           w.attn_sink,
                           n,
                           h,
                           hd,
                           max_keys,
                           1.0f / std::sqrt(static_cast<float>(hd)),
                           b->o.get()};
  // BF16 weights: tensor cores (BF16 operands); FP32 weights keep the FP32 kernel the tight tests compare.
  RETURN_IF_ERROR(LaunchAttention(args, bf16_, smem_optin_, s, pdl_));
  for (int64_t r = 0; r < n; ++r) {
    const int64_t keys = win_cnt[r] + (csa ? std::min(vis[r], c.index_topk) : vis[r]);
    counters_.attention_flops += 4.0 * keys * hd * h;
  }
  // Each segment's last `win` rows into its device ring (after the attention read the old ring, in stream
  // order), and at the end of the forward into the host ring.
  std::vector<CopySpan> ring_spans;
  for (size_t i = 0; i < ns; ++i) {
    const ForwardSegment& seg = segments[i];
    float* ring = copies[i]->layers[static_cast<size_t>(layer)].window;
    const int64_t t0 = std::max<int64_t>(0, seg.count - win), rows = seg.count - t0;
    const int64_t s0 = (seg.state->position + t0) % win, run = std::min(rows, win - s0);
    ring_spans.push_back({kv + (seg.begin + t0) * hd, ring + s0 * hd, run * hd});
    ring_spans.push_back({kv + (seg.begin + t0 + run) * hd, ring, (rows - run) * hd});
  }
  RETURN_IF_ERROR(StageCopySpans(ring_spans));
  ASSIGN_OR_RETURN(const std::vector<const float*> tails, DownloadTails(kv, hd, segments, win));
  finish->push_back([segments, layer, win, hd, tails] {
    for (size_t i = 0; i < segments.size(); ++i) {
      const ForwardSegment& seg = segments[i];
      AttentionLayerState& st = seg.state->layers[static_cast<size_t>(layer)];
      const int64_t t0 = std::max<int64_t>(0, seg.count - win);
      for (int64_t t = t0; t < seg.count; ++t) {
        const int64_t p = seg.state->position + t;
        std::copy_n(tails[i] + (t - t0) * hd, hd, &st.window[(p % win) * hd]);
      }
    }
  });
  return Mark(&counters_.s_attn_kernels);
}

absl::Status CudaBackend::AttentionOut(const LayerW& w, int64_t layer, int64_t n, StepBuffers* b,
                                       float* out) const {
  const ModelConfig& c = c_;
  const int64_t h = c.num_attention_heads, hd = c.head_dim, rd = c.qk_rope_head_dim;
  const float* inv = c.compress_ratios[static_cast<size_t>(layer)] > 0 ? inv_comp_ : inv_main_;
  cudaStream_t s = stream_;
  float* o = b->o.get();
  RETURN_IF_ERROR(Launch(k::Rope, Blocks(n * h * rd / 2, 256), 256, 0, o, n * h, hd, hd - rd, rd,
                         b->pos.get(), h, inv, true));
  // Grouped low-rank output projection, then wo_b.
  const int64_t g = c.o_groups, rank = c.o_lora_rank, gin = h * hd / g;
  Buf<float> mid(s);
  RETURN_IF_ERROR(mid.Alloc(n * g * rank));
  RETURN_IF_ERROR(LinearBatched(o, n, h * hd, gin, w.wo_a, g, g * rank, mid.get()));
  RETURN_IF_ERROR(Linear(mid.get(), n, w.wo_b, out));  // Scratch is freed in stream order.
  return Mark(&counters_.s_attn_out);
}

}  // namespace v4serve::model::cuda::impl

namespace v4serve::model::cuda::testing {

namespace k = kernels;

namespace {
// Rows of `width` floats, row s of token row r being src[(base[r] + s) * width] for s < count[r], laid out
// as the backend's KV pages are read: each token row's rows in pages of `per_page`, the pages placed in a
// shuffled order in one pool, each behind a lead-in of other floats (the page's `offset`). Everything else
// in the pool (lead-ins, unused rows, one page that no row uses) is NaN, so that a kernel that reads past
// its page table, at a wrong offset or from a wrong page returns NaN.
struct PagedRowsOnDevice {
  impl::Buf<float> pool{nullptr};
  impl::Buf<const float*> table{nullptr};
  impl::Buf<int64_t> first{nullptr};
  k::PagedRows rows;
};
absl::Status PageRows(const std::vector<float>& src, int64_t width, const std::vector<int64_t>& base,
                      const std::vector<int64_t>& count, int64_t per_page, PagedRowsOnDevice* out) {
  const int64_t offset = 3 * width + 4, stride = offset + per_page * width + 8;
  std::vector<int64_t> first;
  int64_t pages = 0;
  for (int64_t c : count) {
    first.push_back(pages);
    pages += (c + per_page - 1) / per_page;
  }
  std::vector<int64_t> slot(static_cast<size_t>(pages));
  std::iota(slot.begin(), slot.end(), 1);  // Slot 0 stays unused.
  std::shuffle(slot.begin(), slot.end(), std::mt19937_64(per_page));
  std::vector<float> pool(static_cast<size_t>((pages + 1) * stride), std::nanf(""));
  for (size_t r = 0; r < count.size(); ++r) {
    for (int64_t e = 0; e < count[r]; ++e) {
      if (base[r] < 0 || (base[r] + e + 1) * width > static_cast<int64_t>(src.size())) {
        return absl::InvalidArgumentError("PageRows: a row past the source");
      }
      std::copy_n(src.data() + (base[r] + e) * width, width,
                  pool.data() + slot[static_cast<size_t>(first[r] + e / per_page)] * stride + offset +
                      (e % per_page) * width);
    }
  }
  RETURN_IF_ERROR(out->pool.Upload(pool));
  std::vector<const float*> table;
  for (int64_t sl : slot) table.push_back(out->pool.get() + sl * stride);
  if (table.empty()) table.push_back(out->pool.get());
  RETURN_IF_ERROR(out->table.Upload(table));
  RETURN_IF_ERROR(out->first.Upload(first));
  const int shift = k::PagedRowsShift(per_page);
  if (shift < 0) return absl::InvalidArgumentError("PageRows: pages of a power of two rows");
  out->rows = k::PagedRows{out->table.get(), offset, shift};
  return absl::OkStatus();
}

// With `seconds` set: the mean device time of `repeats` more calls of `launch` (after the first, untimed).
absl::Status TimeLaunches(int repeats, double* seconds, const std::function<absl::Status()>& launch) {
  if (seconds == nullptr || repeats <= 0) return absl::OkStatus();
  cudaEvent_t e0, e1;
  V4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e0));
  V4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e1));
  V4_CUDA_RETURN_IF_ERROR(cudaEventRecord(e0));
  for (int i = 0; i < repeats; ++i) RETURN_IF_ERROR(launch());
  V4_CUDA_RETURN_IF_ERROR(cudaEventRecord(e1));
  V4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(e1));
  float ms = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  *seconds = ms * 1e-3 / repeats;
  return absl::OkStatus();
}
}  // namespace

AttentionCase RandomAttentionCase(int64_t n, int64_t h, int64_t hd, int64_t window, int64_t entries,
                                  int64_t topk, uint64_t seed) {
  AttentionCase c;
  c.n = n;
  c.h = h;
  c.hd = hd;
  c.topk = topk;
  c.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto fill = [&](std::vector<float>* v, int64_t count) {
    v->resize(static_cast<size_t>(count));
    for (float& x : *v) x = nd(rng);
  };
  fill(&c.q, n * h * hd);
  fill(&c.wk, (n + window - 1) * hd);
  fill(&c.ek, std::max<int64_t>(entries, 1) * hd);
  fill(&c.sink, h);
  std::vector<int32_t> all(static_cast<size_t>(entries));
  std::iota(all.begin(), all.end(), 0);
  for (int64_t r = 0; r < n; ++r) {
    c.win_start.push_back(r);
    c.win_cnt.push_back(window);
    c.ent_base.push_back(0);
    c.vis.push_back(entries);
    if (topk > 0) {
      std::shuffle(all.begin(), all.end(), rng);
      const int64_t k = std::min(topk, entries);
      c.sel.insert(c.sel.end(), all.begin(), all.begin() + k);
      c.sel.insert(c.sel.end(), static_cast<size_t>(topk - k), 0);
      c.sel_cnt.push_back(static_cast<int32_t>(k));
    }
  }
  return c;
}

absl::StatusOr<std::vector<float>> SparseAttention(const AttentionCase& c, bool tensor_cores, int repeats,
                                                   double* seconds) {
  using impl::Buf;
  const size_t n = static_cast<size_t>(c.n);
  if (c.n < 1 || c.h < 1 || c.hd < 1 || c.q.size() != n * c.h * c.hd ||
      c.sink.size() != static_cast<size_t>(c.h) || c.win_start.size() != n || c.win_cnt.size() != n ||
      c.ent_base.size() != n || c.vis.size() != n ||
      (!c.sel.empty() && (c.sel.size() != n * c.topk || c.sel_cnt.size() != n))) {
    return absl::InvalidArgumentError("SparseAttention: sizes do not match");
  }
  int dev = 0;
  cudaDeviceProp prop{};
  V4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  V4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, dev));
  RETURN_IF_ERROR(impl::InitAttentionMma());
  cudaFuncAttributes fa{};
  V4_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, k::Attention));
  const size_t optin = prop.sharedMemPerBlockOptin - fa.sharedSizeBytes;
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k::Attention, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(optin)));
  Buf<float> q(nullptr), wk(nullptr), sink(nullptr), o(nullptr);
  Buf<int64_t> ws(nullptr), wc(nullptr), vis(nullptr);
  Buf<int32_t> sel(nullptr), sel_cnt(nullptr);
  RETURN_IF_ERROR(q.Upload(c.q));
  RETURN_IF_ERROR(wk.Upload(c.wk));
  RETURN_IF_ERROR(sink.Upload(c.sink));
  RETURN_IF_ERROR(ws.Upload(c.win_start));
  RETURN_IF_ERROR(wc.Upload(c.win_cnt));
  RETURN_IF_ERROR(vis.Upload(c.vis));
  // The entries in pages of 8 (a quarter of the kernels' 32-key tiles, so tiles span pages), as the backend's
  // KV pages hold them.
  std::vector<int64_t> count = c.vis;
  for (size_t r = 0; r < n && !c.sel.empty(); ++r) {
    for (int64_t j = 0; j < c.sel_cnt[r]; ++j) {
      count[r] = std::max<int64_t>(count[r], c.sel[r * c.topk + j] + 1);
    }
  }
  PagedRowsOnDevice ek;
  RETURN_IF_ERROR(PageRows(c.ek, c.hd, c.ent_base, count, 8, &ek));
  RETURN_IF_ERROR(sel.Upload(c.sel));
  RETURN_IF_ERROR(sel_cnt.Upload(c.sel_cnt));
  RETURN_IF_ERROR(o.Alloc(c.n * c.h * c.hd));
  int64_t max_keys = 0;
  for (size_t r = 0; r < n; ++r) {
    max_keys = std::max(max_keys, c.win_cnt[r] + (c.sel.empty() ? c.vis[r] : c.sel_cnt[r]));
  }
  const impl::AttentionArgs args{
      q.get(),       wk.get(),       ek.rows,    ws.get(),
      wc.get(),      ek.first.get(), vis.get(),  c.sel.empty() ? nullptr : sel.get(),
      sel_cnt.get(), c.topk,         sink.get(), c.n,
      c.h,           c.hd,           max_keys,   c.scale,
      o.get()};
  RETURN_IF_ERROR(impl::LaunchAttention(args, tensor_cores, optin, nullptr, false));
  std::vector<float> out;
  RETURN_IF_ERROR(o.Download(&out));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  RETURN_IF_ERROR(TimeLaunches(
      repeats, seconds, [&] { return impl::LaunchAttention(args, tensor_cores, optin, nullptr, false); }));
  return out;
}

absl::StatusOr<std::vector<float>> IndexerScores(const std::vector<float>& iq, const std::vector<float>& iw,
                                                 const std::vector<float>& ik,
                                                 const std::vector<int64_t>& ent_base,
                                                 const std::vector<int64_t>& vis, int64_t ih, int64_t id,
                                                 bool tensor_cores, int repeats, double* seconds) {
  using impl::Buf;
  const int64_t n = static_cast<int64_t>(vis.size());
  int64_t max_vis = 0;
  for (int64_t v : vis) max_vis = std::max(max_vis, v);
  if (n < 1 || ih < 1 || id < 1 || static_cast<int64_t>(iq.size()) != n * ih * id ||
      static_cast<int64_t>(iw.size()) != n * ih || ent_base.size() != vis.size() || id % 4 != 0) {
    return absl::InvalidArgumentError("IndexerScores: sizes do not match");
  }
  RETURN_IF_ERROR(impl::InitAttentionMma());
  int dev = 0;
  cudaDeviceProp prop{};
  V4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  V4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, dev));
  cudaFuncAttributes fa{};
  V4_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, k::IndexerScores));
  V4_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(k::IndexerScores, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(prop.sharedMemPerBlockOptin - fa.sharedSizeBytes)));
  Buf<float> dq(nullptr), dw(nullptr), sc(nullptr);
  Buf<int64_t> dv(nullptr);
  RETURN_IF_ERROR(dq.Upload(iq));
  RETURN_IF_ERROR(dw.Upload(iw));
  RETURN_IF_ERROR(dv.Upload(vis));
  PagedRowsOnDevice dk;  // Pages of 32 keys, as a CSA layer's KV pages hold them.
  RETURN_IF_ERROR(PageRows(ik, id, ent_base, vis, 32, &dk));
  RETURN_IF_ERROR(sc.Alloc(n * std::max<int64_t>(max_vis, 1)));
  V4_CUDA_RETURN_IF_ERROR(cudaMemset(sc.get(), 0, n * std::max<int64_t>(max_vis, 1) * 4));
  const impl::IndexerArgs args{dq.get(), dw.get(), dk.rows, dk.first.get(), dv.get(),
                               n,        ih,       id,      max_vis,        sc.get()};
  RETURN_IF_ERROR(impl::LaunchIndexerScores(args, tensor_cores, nullptr, false));
  std::vector<float> out;
  RETURN_IF_ERROR(sc.Download(&out));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  RETURN_IF_ERROR(TimeLaunches(
      repeats, seconds, [&] { return impl::LaunchIndexerScores(args, tensor_cores, nullptr, false); }));
  return out;
}

}  // namespace v4serve::model::cuda::testing
