// The CUDA backend: MoE routing, token permutation and the expert GEMMs. See cuda_backend_impl.cuh.
#include <cmath>

#include "model/cuda/cuda_backend_impl.cuh"
#include "model/cuda/cuda_moe_kernels.cuh"

namespace v4serve::model::cuda::impl {

namespace k = kernels;

// SwiGlu's `out` where it writes in place.
constexpr __nv_bfloat16* kNoBf16 = nullptr;

absl::Status CudaBackend::ToF16Input(const float* x, const int32_t* rows, int64_t n, int64_t in) const {
  RETURN_IF_ERROR(act_f16_->Alloc(n * in));
  RETURN_IF_ERROR(act_f16_inv_->Alloc(n));
  RETURN_IF_ERROR(Launch(k::ToF16Rows, static_cast<unsigned>(n), 256, 0, x, rows, in, act_f16_->get(),
                         act_f16_inv_->get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::GemvFp4Mma(const Mat& w, const Mat* w3, int64_t groups, const int32_t* active,
                                     const int32_t* n_active, const int32_t* d_start, const int32_t* d_count,
                                     float* y, const float* slot_w, float lim) const {
  if (w3 != nullptr && (w3->in != w.in || w3->out != w.out || !MmaGemvFits(*w3))) {
    return absl::InternalError("the fused gate / up GEMV needs two MXFP4 matrices of one shape");
  }
  const k::GemvFp4Args a{act_f16_->get(),
                         act_f16_inv_->get(),
                         static_cast<const uint8_t*>(w.p),
                         w.scales,
                         w3 != nullptr ? static_cast<const uint8_t*>(w3->p) : nullptr,
                         w3 != nullptr ? w3->scales : nullptr,
                         active,
                         n_active,
                         d_start,
                         d_count,
                         w.in,
                         w.out,
                         y,
                         slot_w,
                         lim};
  // 32 output rows a block: two 16-row tiles of one matrix, or one of the gate's and the same rows of the up
  // projection's (docs/PERFORMANCE.md: 2 tiles against 1, a batch-64 step 5.00 -> 4.41 ms on H200). The
  // warps of a block split the 128-wide k chunks: 8 in the fused gate / up GEMV over V4-Flash's 32 chunks, 4
  // in the down projection over its 16 and in narrow matrices (under 8 chunks). Launch bounds of 24 warps an
  // SM keep ptxas from moving a chunk's loads next to their MMAs (docs/PERFORMANCE.md, session 12).
  const bool wide = w.in / 128 >= 8;
  const dim3 grid(static_cast<unsigned>(groups),
                  static_cast<unsigned>(Blocks(w.out, w3 != nullptr ? 16 : 32)));
  if (w3 != nullptr && wide) return Launch(k::GroupedGemvFp4Mma<8, 2, true, 3>, grid, 256, 0, a);
  if (w3 != nullptr) return Launch(k::GroupedGemvFp4Mma<4, 2, true, 6>, grid, 128, 0, a);
  return Launch(k::GroupedGemvFp4Mma<4, 2, false, 6>, grid, 128, 0, a);
}

absl::Status CudaBackend::ExpertGemmDevice(const Mat& w, int64_t groups, ExpertKernel kernel,
                                           int64_t max_rows, const float* xin, int64_t slots,
                                           const int32_t* active, const int32_t* n_active,
                                           const int32_t* d_start, const int32_t* d_count, float* y) const {
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, 8)));
  if (w.fp4 && kernel == ExpertKernel::kMma) {
    if (w.in % k::kEgBk != 0) {
      return absl::UnimplementedError(
          absl::StrCat("MXFP4 expert GEMM over ", w.in, " inputs (needs a multiple of ", k::kEgBk, ")"));
    }
    const int32_t* const tiles[7] = {nullptr, nullptr, nullptr, active, n_active, d_start, d_count};
    const dim3 g3(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, k::kEgBn)),
                  static_cast<unsigned>(Blocks(max_rows, k::kEgBm)));
    return GroupedGemmFp4(w, xin, slots, tiles, g3, y);
  }
  if (kernel == ExpertKernel::kGemvMma && MmaGemvFits(w)) {
    RETURN_IF_ERROR(ToF16Input(xin, nullptr, slots, w.in));
    return GemvFp4Mma(w, nullptr, groups, active, n_active, d_start, d_count, y, nullptr, 0.f);
  }
  if (kernel == ExpertKernel::kGemvMma) kernel = SimtExpertKernel(slots, groups);
  if (w.fp4) {
    if (Fp8Experts(w)) {  // The GEMVs take FP32: the FP8 mode's inputs, rounded.
      RETURN_IF_ERROR(act_fp8_round_->Alloc(slots * w.in));
      const int64_t blocks = slots * w.in / 128;
      RETURN_IF_ERROR(
          Launch(k::RoundFp8Blocks, Blocks(blocks, 8), 256, 0, xin, blocks, act_fp8_round_->get()));
      xin = act_fp8_round_->get();
    }
    // 4 warps per block; 4 output rows per warp (8 in the narrow variant).
    constexpr int kRows = 4, kNarrowRows = 8;
    const dim3 g4(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, 4 * kRows)));
    const uint8_t* codes = static_cast<const uint8_t*>(w.p);
    if (kernel == ExpertKernel::kGemvNarrow) {
      const dim3 g8(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, 4 * kNarrowRows)));
      return Launch(k::GroupedGemvFp4<kNarrowRows, 2>, g8, 128, 0, xin, codes, w.scales, active, n_active,
                    d_start, d_count, w.in, w.out, y);
    }
    return Launch(k::GroupedGemvFp4<kRows, k::kMaxGroupRows>, g4, 128, 0, xin, codes, w.scales, active,
                  n_active, d_start, d_count, w.in, w.out, y);
  }
  return Launch(w.bf16 ? k::GroupedGemv<k::kBf16> : k::GroupedGemv<k::kF32>, grid, 256, 0, xin, w.p, active,
                n_active, d_start, d_count, w.in, w.out, y);
}

int32_t CudaBackend::ExpertTileRows(const Mat& w) const { return WgmmaExperts(w) ? k::kWgBm : k::kEgBm; }

absl::Status CudaBackend::ExpertGemmHost(const Mat& w, const float* xin, const std::vector<int32_t>& g_expert,
                                         const std::vector<int32_t>& g_off, const std::vector<int32_t>& g_cnt,
                                         float* y, const __nv_bfloat16* xin_bf16) const {
  const int64_t out = w.out, in = w.in;
  const int64_t groups = static_cast<int64_t>(g_expert.size());
  if (groups == 0) return absl::OkStatus();
  const bool lowp = w.bf16 || w.fp4;
  const void* x = xin;
  if (w.fp4) {  // One launch for all experts: tiles of up to kEgBm rows of one expert.
    if (in % k::kEgBk != 0) {
      return absl::UnimplementedError(
          absl::StrCat("MXFP4 expert GEMM over ", in, " inputs (needs a multiple of ", k::kEgBk, ")"));
    }
    const int32_t bm = ExpertTileRows(w);
    std::vector<int32_t> tiles;  // (expert, first row, rows) per tile.
    for (int64_t gi = 0; gi < groups; ++gi) {
      for (int32_t r = 0; r < g_cnt[gi]; r += bm) {
        tiles.insert(tiles.end(), {g_expert[gi], g_off[gi] + r, std::min<int32_t>(bm, g_cnt[gi] - r)});
      }
    }
    const int64_t nt = static_cast<int64_t>(tiles.size()) / 3;
    std::vector<int32_t> cols(tiles.size());  // Column-major: experts, then first rows, then row counts.
    for (int64_t i = 0; i < nt; ++i) {
      for (int64_t f = 0; f < 3; ++f) cols[f * nt + i] = tiles[i * 3 + f];
    }
    Buf<int32_t> d_tiles(stream_);
    RETURN_IF_ERROR(d_tiles.Upload(cols));
    const int32_t* const et[7] = {
        d_tiles.get(), d_tiles.get() + nt, d_tiles.get() + 2 * nt, nullptr, nullptr, nullptr, nullptr};
    // The upload is staged before cudaMemcpyAsync returns (pageable memory).
    static_assert(k::kWgBn == k::kEgBn, "both host-tiled kernels take 128-column blocks");
    return GroupedGemmFp4(w, xin, g_off.back() + g_cnt.back(), et,
                          dim3(static_cast<unsigned>(Blocks(out, k::kEgBn)), static_cast<unsigned>(nt)), y,
                          xin_bf16);
  }
  if (lowp) {
    ASSIGN_OR_RETURN(x, ToBf16Input(xin, (g_off.back() + g_cnt.back()) * in));
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t type = lowp ? CUDA_R_16BF : CUDA_R_32F;
  const int64_t esz = lowp ? 2 : 4;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const char* wp = static_cast<const char*>(w.p) + g_expert[gi] * out * in * esz;
    const char* xp = static_cast<const char*>(x) + static_cast<int64_t>(g_off[gi]) * in * esz;
    V4_CUBLAS_RETURN_IF_ERROR(
        blas_api_->gemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), g_cnt[gi],
                        static_cast<int>(in), &alpha, wp, type, static_cast<int>(in), xp, type,
                        static_cast<int>(in), &beta, y + static_cast<int64_t>(g_off[gi]) * out, CUDA_R_32F,
                        static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::GroupedGemmFp4(const Mat& w, const float* xin, int64_t rows,
                                         const int32_t* const (&t)[7], dim3 grid, float* y,
                                         const __nv_bfloat16* xin_bf16) const {
  const uint8_t* codes = static_cast<const uint8_t*>(w.p);
  const bool fp8 = Fp8Experts(w);
  if (fp8) {
    RETURN_IF_ERROR(act_fp8_->Alloc(rows * w.in));
    RETURN_IF_ERROR(act_fp8_scales_->Alloc(rows * w.in / 128));
    const int64_t rb = w.in / 128;
    RETURN_IF_ERROR(Launch(k::QuantizeFp8Blocks, Blocks(rows * rb, 8), 256, 0, xin, rows, rb, rb, 0,
                           act_fp8_->get(), act_fp8_scales_->get()));
  } else if (xin_bf16 == nullptr) {
    ASSIGN_OR_RETURN(xin_bf16, ToBf16Input(xin, rows * w.in));
  }
  // Host tiles (grid.y of them) in launches of at most 65535 (grid.y's bound), device tiles in one.
  const bool host = t[0] != nullptr;
  constexpr int64_t kMaxY = 65535;
  const int64_t total = host ? grid.y : 1;
  for (int64_t off = 0; off < total; off += kMaxY) {
    dim3 g = grid;
    k::ExpertTiles tiles{t[0], t[1], t[2], t[3], t[4], t[5], t[6]};
    if (host) {
      g.y = static_cast<unsigned>(std::min(kMaxY, total - off));
      tiles.expert += off;
      tiles.row0 += off;
      tiles.rows += off;
    }
    if (fp8) {
      RETURN_IF_ERROR(Launch(k::GroupedGemmFp4Fp8, g, 256, k::kEg8Smem, act_fp8_->get(),
                             act_fp8_scales_->get(), codes, w.scales, tiles, w.in, w.out, y));
    } else if (host && WgmmaExperts(w)) {
      RETURN_IF_ERROR(
          Launch(k::GroupedGemmFp4Wg, g, 256, k::kWgSmem, xin_bf16, codes, w.scales, tiles, w.in, w.out, y));
    } else {
      RETURN_IF_ERROR(
          Launch(k::GroupedGemmFp4, g, 256, k::kEgSmem, xin_bf16, codes, w.scales, tiles, w.in, w.out, y));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::InitMoeKernels() {
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(k::GroupedGemmFp4, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(k::kEgSmem)));
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      k::GroupedGemmFp4Wg, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k::kWgSmem)));
  // Whether GroupedGemmFp4Wg can run: built for sm_90a (the probe) on a GPU of compute capability 9.x.
  int dev = 0, major = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  wgmma_runs_ = false;
  if (major == 9) {
    Buf<int32_t> built(stream_);
    std::vector<int32_t> flag;
    RETURN_IF_ERROR(built.Upload({0}));
    k::WgmmaBuilt<<<1, 1, 0, stream_>>>(built.get());
    V4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    RETURN_IF_ERROR(built.Download(&flag));
    V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    wgmma_runs_ = flag.at(0) == 1;
  }
  V4_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      k::GroupedGemmFp4Fp8, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k::kEg8Smem)));
  return absl::OkStatus();
}

absl::Status CudaBackend::PermuteOnDevice(const int32_t* sel, const float* wts, int64_t rows, int64_t k,
                                          int64_t ne, int32_t* touched, DevicePermutation* p,
                                          int32_t tile_rows) const {
  const int64_t slots = rows * k;
  const bool one_block = tile_rows == 0 && k::PermuteFits(rows, k, ne);
  if (!one_block && (tile_rows < 0 || !k::PermuteChunksFit(k, ne))) {
    return absl::InternalError(
        absl::StrCat("device permutation of ", rows, " x ", k, " selections over ", ne, " experts"));
  }
  RETURN_IF_ERROR(p->count.Alloc(ne));
  RETURN_IF_ERROR(p->start.Alloc(ne));
  RETURN_IF_ERROR(p->active.Alloc(ne));
  RETURN_IF_ERROR(p->n_active.Alloc(1));
  RETURN_IF_ERROR(p->perm.Alloc(slots));
  RETURN_IF_ERROR(p->row_slots.Alloc(slots));
  RETURN_IF_ERROR(p->slot_w.Alloc(slots));
  if (one_block) {
    return Launch(k::Permute, 1, 256, k::PermuteSmem(slots, ne), sel, wts, rows, k, ne, p->count.get(),
                  p->start.get(), p->perm.get(), p->slot_w.get(), p->row_slots.get(), touched,
                  p->active.get(), p->n_active.get());
  }
  const int64_t chunks = k::PermuteChunks(rows);
  Buf<int32_t> chunk(stream_);
  RETURN_IF_ERROR(chunk.Alloc(chunks * ne));
  p->max_tiles = tile_rows > 0 ? k::PermuteMaxTiles(slots, ne, tile_rows) : 0;
  if (tile_rows > 0) RETURN_IF_ERROR(p->tiles.Alloc(3 * p->max_tiles));
  RETURN_IF_ERROR(Launch(k::PermuteCount, static_cast<unsigned>(chunks), 256, static_cast<size_t>(ne * 4),
                         sel, rows, k, ne, chunk.get()));
  RETURN_IF_ERROR(Launch(k::PermuteScan, 1, 256, 0, chunks, ne, tile_rows, p->max_tiles, chunk.get(),
                         p->count.get(), p->start.get(), touched, p->active.get(), p->n_active.get(),
                         tile_rows > 0 ? p->tiles.get() : nullptr));
  return Launch(k::PermuteScatter, static_cast<unsigned>(chunks), 256, k::PermuteChunkSmem(k), sel, wts, rows,
                k, ne, static_cast<const int32_t*>(chunk.get()), p->perm.get(), p->slot_w.get(),
                p->row_slots.get());  // `chunk` is freed in stream order, after the scatter.
}

absl::Status CudaBackend::Moe(const LayerW& w, int64_t layer, bool hash, const float* x,
                              const int32_t* d_tokens, int64_t n, float* out) const {
  const ModelConfig& c = c_;
  const int64_t d = c.hidden_size, ne = c.n_routed_experts, kk = c.num_experts_per_tok,
                inter = c.moe_intermediate_size;
  const float lim = static_cast<float>(c.swiglu_limit);
  cudaStream_t s = stream_;
  Buf<float> logits(s), wts(s);
  Buf<int32_t> sel(s);
  RETURN_IF_ERROR(logits.Alloc(n * ne));
  RETURN_IF_ERROR(Linear(x, n, w.gate, logits.get()));
  RETURN_IF_ERROR(sel.Alloc(n * kk));
  RETURN_IF_ERROR(wts.Alloc(n * kk));
  RETURN_IF_ERROR(Launch(k::Route, n, 128, 3 * ne * 4, logits.get(), ne, kk, c.scoring_func == "sigmoid",
                         hash ? nullptr : w.gate_bias, hash ? w.tid2eid : nullptr, d_tokens,
                         static_cast<float>(c.routed_scaling_factor), sel.get(), wts.get()));
  // Shared expert over every row, straight into `out`.
  Buf<float> g(s), u(s);
  RETURN_IF_ERROR(g.Alloc(n * inter));
  RETURN_IF_ERROR(u.Alloc(n * inter));
  RETURN_IF_ERROR(Linear(x, n, w.s1, g.get()));
  RETURN_IF_ERROR(Linear(x, n, w.s3, u.get()));
  RETURN_IF_ERROR(
      Launch(k::SwiGlu, Blocks(n * inter, 256), 256, 0, g.get(), u.get(), n, inter, nullptr, lim, kNoBf16));
  RETURN_IF_ERROR(Linear(g.get(), n, w.s2, out));
  const int64_t slots = n * kk;
  int32_t* touched = touched_ + layer * ne;
  if (k::PermuteFits(n, kk, ne) && GemvFits(w.w1) && GemvFits(w.w2)) {
    // Decode-sized: permutation and expert GEMVs on the device, no host round trip.
    DevicePermutation p(s);
    RETURN_IF_ERROR(PermuteOnDevice(sel.get(), wts.get(), n, kk, ne, touched, &p));
    Buf<float> xin(s), eg(s), eu(s), ey(s);
    RETURN_IF_ERROR(eg.Alloc(slots * inter));
    RETURN_IF_ERROR(ey.Alloc(slots * d));
    const int64_t groups = std::min(ne, slots);  // At most this many experts have rows.
    const bool mma_gemv = MmaGemvFits(w.w1) && MmaGemvFits(w.w3) && MmaGemvFits(w.w2);
    const ExpertKernel kernel = DecodeExpertKernel(slots, ne, mma_gemv);
    // Rows an expert can get: one per row, unless hash routing lists an expert twice for a token.
    const int64_t max_rows = hash ? slots : n;
    if (kernel == ExpertKernel::kGemvMma && mma_gemv) {
      // The slots' rows gathered into FP16, then gate and up with SwiGLU in one GEMV.
      RETURN_IF_ERROR(ToF16Input(x, p.perm.get(), slots, d));
      RETURN_IF_ERROR(GemvFp4Mma(w.w1, &w.w3, groups, p.active.get(), p.n_active.get(), p.start.get(),
                                 p.count.get(), eg.get(), p.slot_w.get(), lim));
    } else {
      RETURN_IF_ERROR(xin.Alloc(slots * d));
      RETURN_IF_ERROR(Launch(k::GatherRows, slots, 256, 0, x, p.perm.get(), d, xin.get()));
      RETURN_IF_ERROR(eu.Alloc(slots * inter));
      RETURN_IF_ERROR(ExpertGemmDevice(w.w1, groups, kernel, max_rows, xin.get(), slots, p.active.get(),
                                       p.n_active.get(), p.start.get(), p.count.get(), eg.get()));
      RETURN_IF_ERROR(ExpertGemmDevice(w.w3, groups, kernel, max_rows, xin.get(), slots, p.active.get(),
                                       p.n_active.get(), p.start.get(), p.count.get(), eu.get()));
      RETURN_IF_ERROR(Launch(k::SwiGlu, Blocks(slots * inter, 256), 256, 0, eg.get(), eu.get(), slots, inter,
                             p.slot_w.get(), lim, kNoBf16));
    }
    RETURN_IF_ERROR(ExpertGemmDevice(w.w2, groups, kernel, max_rows, eg.get(), slots, p.active.get(),
                                     p.n_active.get(), p.start.get(), p.count.get(), ey.get()));
    RETURN_IF_ERROR(Launch(k::CombineExperts,
                           dim3(static_cast<unsigned>(n), static_cast<unsigned>(Blocks(d, 256))), 256, 0, out,
                           ey.get(), p.row_slots.get(), kk, d));
    return absl::OkStatus();
  }
  // Prefill-sized. MXFP4 experts: the permutation and the GEMMs' tiles on the device, so the host queues
  // the whole forward without waiting (the host permutation's synchronization left the GPU idle ~1 ms a
  // layer at 8192 tokens). Other expert formats (a cuBLAS call an expert): on the host, whose groups those
  // calls take. Both give slots grouped by expert, rows in order within an expert.
  const bool device_tiles = w.w1.fp4 && w.w3.fp4 && w.w2.fp4 && k::PermuteChunksFit(kk, ne) &&
                            ExpertTileRows(w.w1) == ExpertTileRows(w.w2) &&
                            ExpertTileRows(w.w3) == ExpertTileRows(w.w2);
  DevicePermutation p(s);
  std::vector<int32_t> g_expert, g_off, g_cnt;
  if (device_tiles) {
    RETURN_IF_ERROR(PermuteOnDevice(sel.get(), wts.get(), n, kk, ne, touched, &p, ExpertTileRows(w.w1)));
  } else {
    std::vector<int32_t> h_sel;
    std::vector<float> h_wts;
    RETURN_IF_ERROR(sel.Download(&h_sel));
    RETURN_IF_ERROR(wts.Download(&h_wts));
    RETURN_IF_ERROR(Sync());
    std::vector<int32_t> count(static_cast<size_t>(ne), 0);
    for (int32_t e : h_sel) {
      if (e < 0 || e >= ne) return absl::InternalError(absl::StrCat("routing picked expert ", e));
      ++count[e];
    }
    std::vector<int32_t> start(static_cast<size_t>(ne) + 1, 0);
    for (int64_t e = 0; e < ne; ++e) start[e + 1] = start[e] + count[e];
    std::vector<int32_t> perm(static_cast<size_t>(n * kk)), fill(start.begin(), start.end() - 1);
    std::vector<float> slot_w(static_cast<size_t>(n * kk));
    std::vector<int32_t> row_slots(static_cast<size_t>(n * kk));
    for (int64_t r = 0; r < n; ++r) {
      // The row's slots sorted by expert; slots grow with the expert (start[] is its exclusive scan), so by
      // slot: an insertion sort in place (a vector and std::sort a row took ~1 ms a layer at 8192 tokens).
      int32_t* rs = row_slots.data() + r * kk;
      for (int64_t j = 0; j < kk; ++j) {
        const int32_t e = h_sel[r * kk + j];
        const int32_t slot = fill[e]++;
        perm[slot] = static_cast<int32_t>(r);
        slot_w[slot] = h_wts[r * kk + j];
        int64_t i = j;
        for (; i > 0 && rs[i - 1] > slot; --i) rs[i] = rs[i - 1];
        rs[i] = slot;
      }
    }
    for (int64_t e = 0; e < ne; ++e) {
      if (count[e] == 0) continue;
      g_expert.push_back(static_cast<int32_t>(e));
      g_off.push_back(start[e]);
      g_cnt.push_back(count[e]);
    }
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(touched, count.data(), ne * 4, cudaMemcpyHostToDevice, s));
    RETURN_IF_ERROR(p.perm.Upload(perm));
    RETURN_IF_ERROR(p.row_slots.Upload(row_slots));
    RETURN_IF_ERROR(p.slot_w.Upload(slot_w));
  }
  // y = the experts' GEMM over the permuted rows (x, or x16 where it is given in BF16).
  auto experts = [&](const Mat& m, const float* x32, const __nv_bfloat16* x16, float* y) -> absl::Status {
    if (!device_tiles) return ExpertGemmHost(m, x32, g_expert, g_off, g_cnt, y, x16);
    const int32_t* t = p.tiles.get();
    const int32_t* const et[7] = {t,       t + p.max_tiles, t + 2 * p.max_tiles, nullptr, nullptr,
                                  nullptr, nullptr};
    return GroupedGemmFp4(
        m, x32, slots, et,
        dim3(static_cast<unsigned>(Blocks(m.out, k::kEgBn)), static_cast<unsigned>(p.max_tiles)), y, x16);
  };
  Buf<float> xin(s), eg(s), eu(s), ey(s);
  Buf<__nv_bfloat16> xin_bf16(s);
  // The experts' inputs in the permuted order: straight to BF16 where both GEMMs read BF16 (one pass, no
  // FP32 copy), else FP32.
  static_assert(k::kEgBk == 64 && k::kWgBk == 64, "ExpertsTakeBf16's multiple");
  const bool bf16_in = ExpertsTakeBf16(w.w1) && ExpertsTakeBf16(w.w3);
  if (bf16_in) {
    RETURN_IF_ERROR(xin_bf16.Alloc(slots * d));
    RETURN_IF_ERROR(Launch(k::GatherRowsBf16,
                           dim3(static_cast<unsigned>(slots), static_cast<unsigned>(Blocks(d, 1024))), 256, 0,
                           x, p.perm.get(), d, xin_bf16.get()));
  } else {
    RETURN_IF_ERROR(xin.Alloc(slots * d));
    RETURN_IF_ERROR(Launch(k::GatherRows, slots, 256, 0, x, p.perm.get(), d, xin.get()));
  }
  RETURN_IF_ERROR(eg.Alloc(slots * inter));
  RETURN_IF_ERROR(eu.Alloc(slots * inter));
  RETURN_IF_ERROR(ey.Alloc(slots * d));
  RETURN_IF_ERROR(experts(w.w1, xin.get(), xin_bf16.get(), eg.get()));
  RETURN_IF_ERROR(experts(w.w3, xin.get(), xin_bf16.get(), eu.get()));
  // w2's input straight to BF16 where its GEMM reads BF16.
  Buf<__nv_bfloat16> eg_bf16(s);
  if (ExpertsTakeBf16(w.w2)) RETURN_IF_ERROR(eg_bf16.Alloc(slots * inter));
  RETURN_IF_ERROR(Launch(k::SwiGlu, Blocks(slots * inter, 256), 256, 0, eg.get(), eu.get(), slots, inter,
                         p.slot_w.get(), lim, eg_bf16.get()));
  RETURN_IF_ERROR(experts(w.w2, eg.get(), eg_bf16.get(), ey.get()));
  RETURN_IF_ERROR(Launch(k::CombineExperts,
                         dim3(static_cast<unsigned>(n), static_cast<unsigned>(Blocks(d, 256))), 256, 0, out,
                         ey.get(), p.row_slots.get(), kk, d));
  return absl::OkStatus();  // Pageable uploads are staged before cudaMemcpyAsync returns.
}

}  // namespace v4serve::model::cuda::impl

namespace v4serve::model::cuda::testing {

absl::StatusOr<std::vector<float>> ExpertGemmFp4(const std::vector<float>& x, int64_t in,
                                                 const std::vector<float>& w, int64_t out,
                                                 const std::vector<int32_t>& rows_per_expert, ExpertPath path,
                                                 int repeats, double* seconds, bool fp8,
                                                 const std::vector<float>& slot_w, float lim) {
  using impl::Buf;
  const int64_t experts = static_cast<int64_t>(rows_per_expert.size());
  int64_t slots = 0, max_rows = 0;
  for (int32_t r : rows_per_expert) {
    slots += r;
    max_rows = std::max<int64_t>(max_rows, r);
  }
  const bool glu = path == ExpertPath::kDecodeGlu;
  if (in < 1 || out < 1 || static_cast<int64_t>(x.size()) != slots * in ||
      static_cast<int64_t>(w.size()) != (glu ? 2 : 1) * experts * out * in ||
      (!slot_w.empty() && static_cast<int64_t>(slot_w.size()) != slots)) {
    return absl::InvalidArgumentError("ExpertGemmFp4: sizes do not match");
  }
  impl::CudaBackend b(ModelConfig{}, fp8 ? CudaWeights::kFp8 : CudaWeights::kBf16);  // Runtime only.
  RETURN_IF_ERROR(b.InitRuntime());
  b.set_fp8_expert_inputs(fp8);
  if (path == ExpertPath::kPrefillMmaSync) b.set_wgmma(false);
  const bool prefill = path == ExpertPath::kPrefill || path == ExpertPath::kPrefillMmaSync;
  impl::Mat m, m3;
  RETURN_IF_ERROR(b.PutFp4(w.data(), experts * out, in, &m));
  m.out = out;  // Per expert, as the layers' stacks.
  if (glu) {
    if (!b.MmaGemvFits(m)) return absl::InvalidArgumentError("kDecodeGlu: in must be a multiple of 128");
    RETURN_IF_ERROR(b.PutFp4(w.data() + experts * out * in, experts * out, in, &m3));
    m3.out = out;
  }
  std::vector<int32_t> g_expert, g_off, g_cnt, start(static_cast<size_t>(experts));
  int32_t off = 0;
  for (int64_t e = 0; e < experts; ++e) {
    start[e] = off;
    if (rows_per_expert[e] > 0) {
      g_expert.push_back(static_cast<int32_t>(e));
      g_off.push_back(off);
      g_cnt.push_back(rows_per_expert[e]);
    }
    off += rows_per_expert[e];
  }
  Buf<float> dx(b.stream()), dy(b.stream()), dw(b.stream());
  if (!slot_w.empty()) RETURN_IF_ERROR(dw.Upload(slot_w));
  Buf<int32_t> active(b.stream()), n_active(b.stream()), d_start(b.stream()), d_count(b.stream());
  RETURN_IF_ERROR(dx.Upload(x));
  RETURN_IF_ERROR(dy.Alloc(slots * out));
  RETURN_IF_ERROR(active.Upload(g_expert));
  RETURN_IF_ERROR(n_active.Upload({static_cast<int32_t>(g_expert.size())}));
  RETURN_IF_ERROR(d_start.Upload(start));
  RETURN_IF_ERROR(d_count.Upload(rows_per_expert));
  const impl::ExpertKernel kernel = path == ExpertPath::kDecodeMma ? impl::ExpertKernel::kMma
                                    : path == ExpertPath::kDecodeGemv
                                        ? impl::ExpertKernel::kGemvMma
                                        : impl::SimtExpertKernel(slots, experts);
  auto run = [&]() -> absl::Status {
    if (prefill) return b.ExpertGemmHost(m, dx.get(), g_expert, g_off, g_cnt, dy.get());
    if (glu) {
      RETURN_IF_ERROR(b.ToF16Input(dx.get(), nullptr, slots, in));
      return b.GemvFp4Mma(m, &m3, static_cast<int64_t>(g_expert.size()), active.get(), n_active.get(),
                          d_start.get(), d_count.get(), dy.get(), slot_w.empty() ? nullptr : dw.get(), lim);
    }
    return b.ExpertGemmDevice(m, static_cast<int64_t>(g_expert.size()), kernel, max_rows, dx.get(), slots,
                              active.get(), n_active.get(), d_start.get(), d_count.get(), dy.get());
  };
  RETURN_IF_ERROR(run());
  std::vector<float> y;
  RETURN_IF_ERROR(dy.Download(&y));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(b.stream()));
  if (seconds != nullptr && repeats > 0) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) RETURN_IF_ERROR(run());
    V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(b.stream()));
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeats;
  }
  return y;
}

absl::StatusOr<bool> PrefillExpertsOnWgmma() {
  impl::CudaBackend b(ModelConfig{}, CudaWeights::kBf16);  // Runtime only.
  RETURN_IF_ERROR(b.InitRuntime());
  impl::Mat m;
  m.fp4 = true;
  return b.WgmmaExperts(m);
}

absl::StatusOr<Permutation> Permute(const std::vector<int32_t>& sel, const std::vector<float>& wts,
                                    int64_t rows, int64_t k, int64_t experts, int32_t tile_rows) {
  using impl::Buf;
  const int64_t slots = rows * k;
  const bool one_block = tile_rows == 0 && kernels::PermuteFits(rows, k, experts);
  if (rows < 1 || k < 1 || experts < 1 || tile_rows < 0 ||
      (!one_block && !kernels::PermuteChunksFit(k, experts)) || static_cast<int64_t>(sel.size()) != slots ||
      static_cast<int64_t>(wts.size()) != slots) {
    return absl::InvalidArgumentError("Permute: sizes out of range");
  }
  for (int32_t e : sel) {
    if (e < 0 || e >= experts) return absl::InvalidArgumentError("Permute: expert out of range");
  }
  impl::CudaBackend b(ModelConfig{}, CudaWeights::kBf16);  // Runtime only.
  RETURN_IF_ERROR(b.InitRuntime());
  cudaStream_t s = b.stream();
  Buf<int32_t> d_sel(s);
  Buf<float> d_wts(s);
  RETURN_IF_ERROR(d_sel.Upload(sel));
  RETURN_IF_ERROR(d_wts.Upload(wts));
  impl::CudaBackend::DevicePermutation d(s);
  RETURN_IF_ERROR(b.PermuteOnDevice(d_sel.get(), d_wts.get(), rows, k, experts, nullptr, &d, tile_rows));
  Permutation p;
  std::vector<int32_t> na;
  RETURN_IF_ERROR(d.count.Download(&p.count));
  RETURN_IF_ERROR(d.start.Download(&p.start));
  RETURN_IF_ERROR(d.perm.Download(&p.perm));
  RETURN_IF_ERROR(d.row_slots.Download(&p.row_slots));
  RETURN_IF_ERROR(d.slot_w.Download(&p.slot_w));
  RETURN_IF_ERROR(d.active.Download(&p.active));
  RETURN_IF_ERROR(d.n_active.Download(&na));
  std::vector<int32_t> tiles;
  if (tile_rows > 0) RETURN_IF_ERROR(d.tiles.Download(&tiles));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  p.active.resize(static_cast<size_t>(na.at(0)));
  const int64_t mt = d.max_tiles;
  for (int64_t t = 0; t < mt && tile_rows > 0; ++t) {
    if (tiles[2 * mt + t] == 0) {  // The padding: every tile after it must be empty too.
      for (int64_t u = t; u < mt; ++u) {
        if (tiles[2 * mt + u] != 0) return absl::InternalError("a tile after the padding has rows");
      }
      break;
    }
    p.tiles.insert(p.tiles.end(), {tiles[t], tiles[mt + t], tiles[2 * mt + t]});
  }
  return p;
}

}  // namespace v4serve::model::cuda::testing
