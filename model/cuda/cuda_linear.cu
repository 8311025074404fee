// The CUDA backend's linear layers: weights in FP8 tiles (PutFp8, PutLinear) and the GEMMs y = x W^T in each
// weight format (cuBLAS for FP32/BF16, model/cuda/fp8_gemm.cuh for FP8). See cuda_backend_impl.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "model/cpu/weights.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_backend_impl.cuh"
#include "model/cuda/cuda_check.h"
#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/fp8_gemm.cuh"
#include "services/status_macros.h"

namespace v4serve::model::cuda {
namespace impl {

namespace k = kernels;

namespace {
// f(std::integral_constant<int, kTok>) (its result) with the token groups of 8 that `rows` rows take in the
// skinny FP8 kernels' instantiations: 1, 2, 4 or 8 (up to 64 rows).
template <class F>
auto WithTokGroups(int64_t rows, F&& f) {
  if (rows <= 8) return f(std::integral_constant<int, 1>{});
  if (rows <= 16) return f(std::integral_constant<int, 2>{});
  if (rows <= 32) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}
}  // namespace

absl::Status CudaBackend::PutFp8(const float* host, int64_t out, int64_t in, Mat* m) {
  if (in % k::kFp8Block != 0) {
    return absl::InvalidArgumentError(absl::StrCat("FP8 weights need rows of a multiple of 128, got ", in));
  }
  m->out = out;
  m->in = in;
  m->fp8 = true;
  const int64_t n = out * in, tiles = (out + k::kFp8Block - 1) / k::kFp8Block * (in / k::kFp8Block);
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&m->p, std::max<int64_t>(1, n)));
  allocs_.push_back(m->p);
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&m->tile_scales, std::max<int64_t>(1, tiles) * 4));
  allocs_.push_back(m->tile_scales);
  weight_bytes_ += m->bytes();
  if (n == 0) return absl::OkStatus();
  Buf<float> f32(stream_);
  RETURN_IF_ERROR(f32.Alloc(n));
  if (host != nullptr) {
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(f32.get(), host, n * 4, cudaMemcpyHostToDevice, stream_));
  } else {  // N(0, 1/in)-like, as Put draws BF16/FP32 weights.
    k::RandomFill<<<1024, 256, 0, stream_>>>(f32.get(), false, n, ++seed_,
                                             1.0f / std::sqrt(static_cast<float>(in)));
    V4_LAUNCH_CHECK(RandomFill);
  }
  const dim3 grid(static_cast<unsigned>(in / k::kFp8Block),
                  static_cast<unsigned>((out + k::kFp8Block - 1) / k::kFp8Block));
  k::QuantizeFp8Tiles<<<grid, 256, 0, stream_>>>(f32.get(), out, in, static_cast<uint8_t*>(m->p),
                                                 m->tile_scales);
  V4_LAUNCH_CHECK(QuantizeFp8Tiles);
  return Sync();  // The host rows and the FP32 scratch go away after this.
}

absl::Status CudaBackend::PutLinear(const cpu::Tensor* t, int64_t out, int64_t in, Mat* m) {
  const float* host = t != nullptr ? t->data() : nullptr;
  if (fp8_ && in % k::kFp8Block == 0 && (t == nullptr || t->quantized)) return PutFp8(host, out, in, m);
  return Put(host, out, in, bf16_, host != nullptr ? WInit::kHost : WInit::kRandom, m);
}

absl::Status CudaBackend::InitLinearKernels() {
  // RowsGemmFp8's pipeline stages take more than the default 48 KiB at 4-8 token groups.
  const auto allow = [](auto kernel, size_t smem) -> absl::Status {
    V4_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(allow(k::RowsGemmFp8<1, kRowsWarps>, k::RowsFp8Smem(1, kRowsWarps)));
  RETURN_IF_ERROR(allow(k::RowsGemmFp8<2, kRowsWarps>, k::RowsFp8Smem(2, kRowsWarps)));
  RETURN_IF_ERROR(allow(k::RowsGemmFp8<4, kRowsWarps>, k::RowsFp8Smem(4, kRowsWarps)));
  return allow(k::RowsGemmFp8<8, kRowsWarps>, k::RowsFp8Smem(8, kRowsWarps));
}

absl::Status CudaBackend::Linear(const float* x, int64_t m, const Mat& w, float* y) const {
  return LinearBatched(x, m, w.in, 0, w, 1, w.out, y);
}

// Groups g < `groups`: y[:, g*out_g ...] (row stride ldy) = x[:, g*stride_x ...] (row stride ldx) W_g^T, with
// W_g the g-th block of w.out / groups rows. Column-major view: Y^T = W · X^T.
absl::StatusOr<const __nv_bfloat16*> CudaBackend::ToBf16Input(const float* x, int64_t n) const {
  RETURN_IF_ERROR(act_bf16_->Alloc(n));
  RETURN_IF_ERROR(Launch(k::ToBf16, Blocks(Blocks(n, 4), 256), 256, 0, x, n, act_bf16_->get()));
  return act_bf16_->get();
}

absl::Status CudaBackend::LinearBatched(const float* x, int64_t m, int64_t ldx, int64_t stride_x,
                                        const Mat& w, int64_t groups, int64_t ldy, float* y) const {
  if (m == 0) return absl::OkStatus();
  const int64_t out = w.out / groups, in = w.in;
  CountGemm(w, m);
  if (w.fp8) {
    if (groups != 1) return absl::InternalError("FP8 weights in a grouped projection");
    return LinearFp8(x, m, ldx, w, ldy, y);
  }
  if (!w.bf16 && groups == 1 && rows_f32_ && m <= kRowsF32 && in % 4 == 0 && ldx % 4 == 0 &&
      reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    return LinearF32Rows(x, m, ldx, w, ldy, y);
  }
  const float alpha = 1.0f, beta = 0.0f;
  const void* xin = x;
  cudaDataType_t type = CUDA_R_32F;
  if (w.bf16) {
    ASSIGN_OR_RETURN(xin, ToBf16Input(x, (m - 1) * ldx + (groups - 1) * stride_x + in));
    type = CUDA_R_16BF;
  }
  V4_CUBLAS_RETURN_IF_ERROR(blas_api_->gemm_strided_batched(
      blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(m), static_cast<int>(in),
      &alpha, w.p, type, static_cast<int>(in), out * in, xin, type, static_cast<int>(ldx), stride_x, &beta, y,
      CUDA_R_32F, static_cast<int>(ldy), out, static_cast<int>(groups), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaBackend::LinearsF32(const float* x, int64_t n, std::initializer_list<F32Out> outs) const {
  if (outs.size() == 0 || n == 0) return absl::OkStatus();
  const int64_t in = outs.begin()->w->in;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  bool split = tf32x3_ && n >= tf32x3_rows_ && in % 4 == 0 && aligned(x);
  for (const F32Out& o : outs) {
    split = split && !o.w->bf16 && !o.w->fp8 && !o.w->fp4 && o.w->in == in && aligned(o.w->p);
  }
  if (!split) {
    for (const F32Out& o : outs) RETURN_IF_ERROR(Linear(x, n, *o.w, o.y));
    return absl::OkStatus();
  }
  cudaStream_t s = stream_;
  Buf<float> xs(s), ws(s);
  RETURN_IF_ERROR(xs.Alloc(2 * n * in));
  float *const x_hi = xs.get(), *const x_lo = x_hi + n * in;
  RETURN_IF_ERROR(Launch(k::SplitTf32, Blocks(n * in / 4, 256), 256, 0, x, n * in, x_hi, x_lo));
  for (const F32Out& o : outs) {
    const int64_t out = o.w->out;
    CountGemm(*o.w, n);
    RETURN_IF_ERROR(ws.Alloc(2 * out * in));
    float *const w_hi = ws.get(), *const w_lo = w_hi + out * in;
    RETURN_IF_ERROR(Launch(k::SplitTf32, Blocks(out * in / 4, 256), 256, 0, static_cast<const float*>(o.w->p),
                           out * in, w_hi, w_lo));
    // Y^T [out, n] = W X^T column-major; the small products first, the large one added last.
    const float one = 1.0f, zero = 0.0f;
    const float* const terms[3][2] = {{w_lo, x_hi}, {w_hi, x_lo}, {w_hi, x_hi}};
    for (int t = 0; t < 3; ++t) {
      V4_CUBLAS_RETURN_IF_ERROR(blas_api_->gemm(
          blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(n), static_cast<int>(in),
          &one, terms[t][0], CUDA_R_32F, static_cast<int>(in), terms[t][1], CUDA_R_32F, static_cast<int>(in),
          t == 0 ? &zero : &one, o.y, CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F_FAST_TF32,
          CUBLAS_GEMM_DEFAULT));
    }
  }
  return absl::OkStatus();  // xs and ws are freed in stream order, after the GEMMs.
}

absl::StatusOr<int> CudaBackend::ResidentBlocks(const void* kernel, int threads, size_t smem) const {
  const auto key = std::make_tuple(kernel, threads, smem);
  if (auto it = resident_blocks_.find(key); it != resident_blocks_.end()) return it->second;
  int blocks = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  if (blocks < 1) return absl::InternalError(absl::StrCat("a kernel of ", threads, " threads fits no SM"));
  resident_blocks_.emplace(key, blocks);
  return blocks;
}

absl::StatusOr<CudaBackend::SplitK> CudaBackend::RowsSplitK(const void* kernel, int threads, int64_t groups,
                                                            int64_t k_steps, int64_t min_k, int64_t m,
                                                            int64_t out, size_t smem) const {
  if (groups > kSplitCounters) return SplitK{};
  ASSIGN_OR_RETURN(const int resident, ResidentBlocks(kernel, threads, smem));
  const int64_t splits =
      std::clamp<int64_t>(resident * sm_count_ / groups, 1, std::max<int64_t>(1, k_steps / min_k));
  if (splits == 1) return SplitK{};
  RETURN_IF_ERROR(split_partial_->Alloc(splits * m * out));
  return SplitK{splits, split_partial_->get()};
}

absl::Status CudaBackend::LinearF32Rows(const float* x, int64_t m, int64_t ldx, const Mat& w, int64_t ldy,
                                        float* y) const {
  // Row groups of 8 above 8 rows (kRg warps of a block on the same 8 features), else one group of the rows.
  const auto launch = [&](auto kernel, int64_t features) {
    const int64_t groups = Blocks(w.out, features);
    // Each lane at least 4 steps of 128 k (its shuffle sums are then a small share).
    ASSIGN_OR_RETURN(const SplitK sk,
                     RowsSplitK(reinterpret_cast<const void*>(kernel), 256, groups, w.in / 4, 128, m, w.out));
    return Launch(kernel, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(sk.splits)), 256, 0, x, m,
                  ldx, static_cast<const float*>(w.p), w.in, w.out, ldy, y, sk.partial, split_counters_,
                  pdl_);
  };
  if (m == 1) return launch(k::RowsGemmF32<1, 1>, 64);
  if (m == 2) return launch(k::RowsGemmF32<2, 1>, 64);
  if (m <= 4) return launch(k::RowsGemmF32<4, 1>, 64);
  if (m <= 8) return launch(k::RowsGemmF32<8, 1>, 64);
  if (m <= 16) return launch(k::RowsGemmF32<8, 2>, 32);
  if (m <= 32) return launch(k::RowsGemmF32<8, 4>, 16);
  return launch(k::RowsGemmF32<8, 8>, 8);
}

const LtPlan* CudaBackend::GetLtPlan(int64_t m, int64_t out, int64_t in, int64_t ldx, int64_t ldy,
                                     const void* a_scale, const void* b_scale) const {
  const auto key = std::make_tuple(m, out, in, ldx, ldy);
  if (auto it = lt_plans_.find(key); it != lt_plans_.end())
    return it->second.op != nullptr ? &it->second : nullptr;
  const CublasApi& api = *blas_api_;
  // D^T [out, m] = W [out, in] . X^T in cuBLAS's column-major terms: A = W (transposed), B = X, both k-major.
  // Any refusal (a library without block scales, no algorithm for the shape) is remembered as "no plan": our
  // kernels serve that shape.
  LtPlan p;
  cublasLtMatmulPreference_t pref = nullptr;
  const auto release = [&]() {
    if (pref != nullptr) api.pref_destroy(pref);
    if (p.a != nullptr) api.layout_destroy(p.a);
    if (p.b != nullptr) api.layout_destroy(p.b);
    if (p.d != nullptr) api.layout_destroy(p.d);
    if (p.op != nullptr) api.desc_destroy(p.op);
  };
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const cublasLtMatmulMatrixScale_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                    b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  const size_t ws = kLtWorkspace;
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  const bool ok =
      api.desc_create(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)) == CUBLAS_STATUS_SUCCESS &&
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)) == CUBLAS_STATUS_SUCCESS &&
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)) ==
          CUBLAS_STATUS_SUCCESS &&
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)) ==
          CUBLAS_STATUS_SUCCESS &&
      // The heuristic refuses block-scaled modes without scale pointers (INVALID_VALUE); each call sets its
      // own.
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)) ==
          CUBLAS_STATUS_SUCCESS &&
      api.desc_set(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)) ==
          CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&p.a, CUDA_R_8F_E4M3, in, out, in) == CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&p.b, CUDA_R_8F_E4M3, in, m, ldx) == CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&p.d, CUDA_R_32F, out, m, ldy) == CUBLAS_STATUS_SUCCESS &&
      api.pref_create(&pref) == CUBLAS_STATUS_SUCCESS &&
      api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)) ==
          CUBLAS_STATUS_SUCCESS &&
      api.heuristic(lt_, p.op, p.a, p.b, p.d, p.d, pref, 1, &heur, &found) == CUBLAS_STATUS_SUCCESS &&
      found > 0;
  if (!ok) {
    release();
    lt_plans_.emplace(key, LtPlan{});
    return nullptr;
  }
  api.pref_destroy(pref);
  p.algo = heur.algo;
  return &lt_plans_.emplace(key, p).first->second;
}

// cuBLASLt takes a multiple of 4 rows (it has no algorithm for other counts with VEC128 scales: measured on
// an H200, cuBLAS 13.1), the kernels here the rest.
absl::Status CudaBackend::LinearFp8(const float* x, int64_t m, int64_t ldx, const Mat& w, int64_t ldy,
                                    float* y, Fp8Path path) const {
  if (m == 0) return absl::OkStatus();
  if (ldx % k::kFp8Block != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return absl::InternalError(absl::StrCat("FP8 GEMM input rows of stride ", ldx,
                                            " (needs a multiple of 128) or not 16-byte aligned"));
  }
  if (path == Fp8Path::kLt && !LtServes(w)) {
    return absl::UnimplementedError("cuBLASLt's block-scaled FP8 GEMM is not available for this weight");
  }
  if ((path == Fp8Path::kSkinny || path == Fp8Path::kRows) && m > k::kSkinnyMaxRows) {
    return absl::InvalidArgumentError(absl::StrCat(path == Fp8Path::kSkinny ? "SkinnyGemmFp8" : "RowsGemmFp8",
                                                   " takes up to ", k::kSkinnyMaxRows, " rows"));
  }
  const int64_t row_blocks = ldx / k::kFp8Block, in_blocks = w.in / k::kFp8Block;
  RETURN_IF_ERROR(act_fp8_->Alloc((m - 1) * ldx + w.in));
  RETURN_IF_ERROR(act_fp8_scales_->Alloc(m * row_blocks));
  const uint8_t* codes = static_cast<const uint8_t*>(w.p);
  // kAuto's choice by rows and weight size (cuda_backend_impl.cuh): the row kernel's rows [rows_from,
  // rows_to], the skinny kernel's fewer, cuBLASLt's more.
  const bool big = w.in * w.out >= kRowsBigWeights;
  const int64_t rows_from = rows_fp8_ ? kRowsFrom : big ? 2 : kSkinnyRows + 1;
  const int64_t rows_to = rows_fp8_ ? k::kSkinnyMaxRows : big ? kRowsBigTo : kSkinnyRows;
  const int64_t skinny_rows = rows_from - 1 < rows_to ? rows_from - 1 : rows_to;
  if (path == Fp8Path::kRows || (path == Fp8Path::kAuto && m >= rows_from && m <= rows_to)) {
    RETURN_IF_ERROR(Launch(k::QuantizeFp8Blocks, Blocks(m * row_blocks, 8), 256, 0, x, m, row_blocks,
                           in_blocks, 0, act_fp8_->get(), act_fp8_scales_->get()));
    // k split where the feature groups alone do not fill the SMs (each split at least 2 k blocks).
    const int64_t groups = Blocks(w.out, 16 * kRowsWarps);
    return WithTokGroups(m, [&](auto tok) -> absl::Status {
      constexpr int kTok = decltype(tok)::value;
      const auto kernel = k::RowsGemmFp8<kTok, kRowsWarps>;
      constexpr size_t kSmem = k::RowsFp8Smem(kTok, kRowsWarps);
      ASSIGN_OR_RETURN(const SplitK sk, RowsSplitK(reinterpret_cast<const void*>(kernel), 32 * kRowsWarps,
                                                   groups, in_blocks, 2, m, w.out, kSmem));
      return Launch(kernel, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(sk.splits)),
                    32 * kRowsWarps, kSmem, act_fp8_->get(), act_fp8_scales_->get(), m, ldx, codes,
                    w.tile_scales, w.in, w.out, ldy, y, sk.partial, split_counters_, pdl_);
    });
  }
  // cuBLASLt's rows (m4) take M-major scales ([k block][row]); the rest's row-major ones follow in the
  // buffer.
  int64_t m4 = 0;
  const LtPlan* plan = nullptr;
  const void* a_scale = w.tile_scales;
  const void* b_scale = act_fp8_scales_->get();
  if (LtServes(w) && m >= 4 && (path == Fp8Path::kLt || (path == Fp8Path::kAuto && m > skinny_rows))) {
    plan = GetLtPlan(m / 4 * 4, w.out, w.in, ldx, ldy, a_scale, b_scale);
    if (plan != nullptr) m4 = m / 4 * 4;
  }
  if (path == Fp8Path::kLt && plan == nullptr && m >= 4) {
    return absl::UnimplementedError(
        absl::StrCat("cuBLASLt has no block-scaled FP8 GEMM for ", m, " x ", w.out, " x ", w.in));
  }
  if (m4 > 0) {
    RETURN_IF_ERROR(Launch(k::QuantizeFp8Blocks, Blocks(m4 * row_blocks, 8), 256, 0, x, m4, row_blocks,
                           in_blocks, m4, act_fp8_->get(), act_fp8_scales_->get()));
    const CublasApi& api = *blas_api_;
    V4_CUBLAS_RETURN_IF_ERROR(
        api.desc_set(plan->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)));
    V4_CUBLAS_RETURN_IF_ERROR(
        api.desc_set(plan->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)));
    const float alpha = 1.0f, beta = 0.0f;
    V4_CUBLAS_RETURN_IF_ERROR(api.matmul(lt_, plan->op, &alpha, w.p, plan->a, act_fp8_->get(), plan->b, &beta,
                                         y, plan->d, y, plan->d, &plan->algo, lt_ws_, kLtWorkspace, stream_));
    if (m4 == m) return absl::OkStatus();
  }
  // The other rows (all of them without cuBLASLt): SkinnyGemmFp8 up to its bound, else GemmFp8.
  const int64_t rest = m - m4;
  uint8_t* codes_r = act_fp8_->get() + m4 * ldx;
  float* scales_r = act_fp8_scales_->get() + m4 * row_blocks;
  float* yr = y + m4 * ldy;
  const bool tile = path == Fp8Path::kTile || rest > k::kSkinnyMaxRows;
  if (tile) {  // SkinnyGemmFp8 quantizes its input itself.
    RETURN_IF_ERROR(Launch(k::QuantizeFp8Blocks, Blocks(rest * row_blocks, 8), 256, 0, x + m4 * ldx, rest,
                           row_blocks, in_blocks, 0, codes_r, scales_r));
  }
  const auto skinny = [&](auto kernel, int warps) {
    return Launch(kernel, static_cast<unsigned>(Blocks(w.out, 16)), static_cast<unsigned>(32 * warps), 0,
                  x + m4 * ldx, rest, ldx, codes, w.tile_scales, w.in, w.out, ldy, yr, pdl_);
  };
  // SkinnyGemmFp8<kTok, k::SkinnyWarps(kTok, in_blocks)>.
  const auto skinny_tok = [&](auto tok) -> absl::Status {
    constexpr int kTok = decltype(tok)::value;
    switch (k::SkinnyWarps(kTok, in_blocks)) {
      case 16:
        if constexpr (kTok * 16 <= 32) return skinny(k::SkinnyGemmFp8<kTok, 16>, 16);
        [[fallthrough]];
      case 8:
        if constexpr (kTok * 8 <= 32) return skinny(k::SkinnyGemmFp8<kTok, 8>, 8);
        [[fallthrough]];
      default:
        return skinny(k::SkinnyGemmFp8<kTok, 4>, 4);
    }
  };
  if (tile) {
    const dim3 grid(static_cast<unsigned>(Blocks(rest, k::kF8Bm)),
                    static_cast<unsigned>(Blocks(w.out, k::kF8Bn)));
    return Launch(k::GemmFp8, grid, 256, k::kF8Smem, codes_r, scales_r, rest, ldx, codes, w.tile_scales, w.in,
                  w.out, ldy, yr);
  }
  return WithTokGroups(rest, skinny_tok);
}

}  // namespace impl

namespace testing {
namespace {

// Reads n 16-byte words (an L2 flush that leaves clean lines: the timed call after it evicts them without
// writing back); `sink` is written only if the sum hits a value the zeroed buffer cannot give, so the loads
// stay.
__global__ void ReadAll(const int4* p, size_t n, int* sink) {
  int acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int4 v = p[i];
    acc += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x7fffffff) *sink = acc;
}

}  // namespace

using impl::Buf;
using impl::CudaBackend;
using impl::Mat;
using impl::WInit;

namespace {
// With `seconds` set and repeats > 0: the mean device time of `repeats` more calls of `call`, each on its own
// after twice the L2 of other bytes was read, so it reads its weights from HBM as it does in a decode step
// (which streams GBs between two uses of a matrix; calls repeated back to back ran from L2 for matrices of a
// few MB, faster than in the step: session 15). The flush reads (a zeroed buffer), so the lines the call
// evicts are clean, as a step's weights are. Then one more call into an output `y` of `ny` NaNs: what comes
// back is that call's own, so a kernel that works only on a fresh backend (split-k counters not reset) shows
// in the result.
absl::Status TimeFlushed(const CudaBackend& b, int repeats, double* seconds,
                         const std::function<absl::Status()>& call, float* y, int64_t ny) {
  if (seconds == nullptr || repeats <= 0) return absl::OkStatus();
  int dev = 0, l2 = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const size_t flush_bytes = 2 * static_cast<size_t>(std::max(l2, 1 << 20));
  void* flush = nullptr;
  std::vector<cudaEvent_t> ev(2 * static_cast<size_t>(repeats), nullptr);
  absl::Cleanup release = [&] {
    for (cudaEvent_t e : ev)
      if (e != nullptr) cudaEventDestroy(e);
    if (flush != nullptr) cudaFree(flush);
  };
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&flush, flush_bytes + sizeof(int)));
  V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(flush, 0, flush_bytes + sizeof(int), b.stream()));
  for (cudaEvent_t& e : ev) V4_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e));
  const auto* words = static_cast<const int4*>(flush);
  int* sink = reinterpret_cast<int*>(static_cast<char*>(flush) + flush_bytes);
  for (int i = 0; i < repeats; ++i) {
    ReadAll<<<1024, 256, 0, b.stream()>>>(words, flush_bytes / sizeof(int4), sink);
    V4_LAUNCH_CHECK(ReadAll);
    V4_CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[2 * i], b.stream()));
    RETURN_IF_ERROR(call());
    V4_CUDA_RETURN_IF_ERROR(cudaEventRecord(ev[2 * i + 1], b.stream()));
  }
  V4_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(ev.back()));
  double total_ms = 0;
  for (int i = 0; i < repeats; ++i) {
    float ms = 0;
    V4_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    total_ms += ms;
  }
  *seconds = total_ms / 1e3 / repeats;
  V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(y, 0xff, ny * sizeof(float), b.stream()));
  return call();
}
}  // namespace

absl::StatusOr<std::vector<float>> Linear(const std::vector<float>& x, int64_t m, int64_t in,
                                          const std::vector<float>& w, int64_t out, CudaWeights format,
                                          int repeats, double* seconds, Fp8Path fp8_path) {
  if (static_cast<int64_t>(x.size()) != m * in || static_cast<int64_t>(w.size()) != out * in) {
    return absl::InvalidArgumentError("Linear: sizes do not match");
  }
  if (fp8_path != Fp8Path::kAuto && format != CudaWeights::kFp8) {
    return absl::InvalidArgumentError("an FP8 kernel path needs CudaWeights::kFp8");
  }
  CudaBackend b(ModelConfig{}, format);  // Runtime only, no model weights.
  RETURN_IF_ERROR(b.InitRuntime());
  Mat mat;
  if (format == CudaWeights::kFp8) {
    RETURN_IF_ERROR(b.PutFp8(w.data(), out, in, &mat));
  } else {
    RETURN_IF_ERROR(b.Put(w.data(), out, in, format == CudaWeights::kBf16, WInit::kHost, &mat));
  }
  Buf<float> dx(b.stream()), dy(b.stream());
  RETURN_IF_ERROR(dx.Upload(x));
  RETURN_IF_ERROR(dy.Alloc(m * out));
  auto call = [&]() {
    return fp8_path == Fp8Path::kAuto ? b.Linear(dx.get(), m, mat, dy.get())
                                      : b.LinearFp8(dx.get(), m, in, mat, out, dy.get(), fp8_path);
  };
  RETURN_IF_ERROR(call());
  RETURN_IF_ERROR(TimeFlushed(b, repeats, seconds, call, dy.get(), m * out));
  std::vector<float> y;
  RETURN_IF_ERROR(dy.Download(&y));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(b.stream()));
  return y;
}

absl::StatusOr<std::vector<float>> LinearF32(const std::vector<float>& x, int64_t m, int64_t in,
                                             const std::vector<float>& w, int64_t out, bool tf32x3,
                                             int repeats, double* seconds) {
  if (static_cast<int64_t>(x.size()) != m * in || static_cast<int64_t>(w.size()) != out * in) {
    return absl::InvalidArgumentError("LinearF32: sizes do not match");
  }
  CudaBackend b(ModelConfig{}, CudaWeights::kBf16);  // Runtime only: FP32 weights as the compressors'.
  RETURN_IF_ERROR(b.InitRuntime());
  b.set_tf32x3(tf32x3, /*min_rows=*/1);
  Mat mat;
  RETURN_IF_ERROR(b.Put(w.data(), out, in, /*bf16=*/false, WInit::kHost, &mat));
  Buf<float> dx(b.stream()), dy(b.stream());
  RETURN_IF_ERROR(dx.Upload(x));
  RETURN_IF_ERROR(dy.Alloc(m * out));
  auto call = [&]() { return b.LinearsF32(dx.get(), m, {{&mat, dy.get()}}); };
  RETURN_IF_ERROR(call());
  RETURN_IF_ERROR(TimeFlushed(b, repeats, seconds, call, dy.get(), m * out));
  std::vector<float> y;
  RETURN_IF_ERROR(dy.Download(&y));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(b.stream()));
  return y;
}

}  // namespace testing
}  // namespace v4serve::model::cuda
