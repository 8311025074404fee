#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/cpu/compressor.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_backend_impl.cuh"
#include "model/cuda/cuda_check.h"
#include "model/cuda/cuda_device.h"
#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/device_state_cache.h"
#include "model/cuda/select_kernels.cuh"
#include "model/numeric_formats.h"
#include "services/status_macros.h"

namespace v4serve::model::cuda {
namespace impl {

namespace k = kernels;

namespace {

// An on/off switch from the environment: "0" or "1", `unset` when absent or empty, INVALID_ARGUMENT
// naming the variable otherwise.
absl::StatusOr<bool> EnvSwitch(const char* name, bool unset) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return unset;
  const std::string s = v;
  if (s != "0" && s != "1") {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be 0 or 1, got \"", s, "\""));
  }
  return s == "1";
}

absl::StatusOr<const CublasApi*> Cublas() {
  static const absl::StatusOr<CublasApi>* api = [] {
    const std::string name = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
    void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      return new absl::StatusOr<CublasApi>(
          absl::UnavailableError(absl::StrCat("cannot load ", name, ": ", dlerror())));
    }
    CublasApi a;
    bool ok = true;
    auto sym = [&](auto* fn, const char* n) {
      *fn = reinterpret_cast<std::remove_reference_t<decltype(*fn)>>(dlsym(h, n));
      ok &= *fn != nullptr;
    };
    sym(&a.create, "cublasCreate_v2");
    sym(&a.destroy, "cublasDestroy_v2");
    sym(&a.set_stream, "cublasSetStream_v2");
    sym(&a.set_math_mode, "cublasSetMathMode");
    sym(&a.gemm, "cublasGemmEx");
    sym(&a.gemm_strided_batched, "cublasGemmStridedBatchedEx");
    if (!ok)
      return new absl::StatusOr<CublasApi>(absl::UnavailableError(absl::StrCat(name, " lacks a symbol")));
    a.set_workspace = reinterpret_cast<decltype(a.set_workspace)>(dlsym(h, "cublasSetWorkspace_v2"));
    // cuBLASLt (loaded with cuBLAS, which needs it): its block-scaled FP8 GEMM serves LinearFp8 where
    // present.
    const std::string lt_name = absl::StrCat("libcublasLt.so.", CUBLAS_VER_MAJOR);
    if (void* lt = dlopen(lt_name.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      h = lt;
      sym(&a.lt_create, "cublasLtCreate");
      sym(&a.lt_destroy, "cublasLtDestroy");
      sym(&a.desc_create, "cublasLtMatmulDescCreate");
      sym(&a.desc_destroy, "cublasLtMatmulDescDestroy");
      sym(&a.desc_set, "cublasLtMatmulDescSetAttribute");
      sym(&a.layout_create, "cublasLtMatrixLayoutCreate");
      sym(&a.layout_destroy, "cublasLtMatrixLayoutDestroy");
      sym(&a.pref_create, "cublasLtMatmulPreferenceCreate");
      sym(&a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
      sym(&a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
      sym(&a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
      sym(&a.matmul, "cublasLtMatmul");
      a.lt_ok = ok;
    }
    return new absl::StatusOr<CublasApi>(a);
  }();
  if (!api->ok()) return api->status();
  return &**api;
}

// Host FP32 rows -> MXFP4 with the smallest power-of-two scale per block of 32 (amax / 6 rounded up), so
// values that came from an MXFP4 checkpoint convert back exactly.
void QuantizeMxfp4(const float* v, int64_t n, uint8_t* codes, uint8_t* scales) {
  static constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* x = v + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    int e = -127;
    if (amax > 0) {
      int ex = 0;
      const float m = std::frexp(amax / 6.0f, &ex);
      e = std::clamp(m == 0.5f ? ex - 1 : ex, -127, 127);
    }
    scales[b] = static_cast<uint8_t>(e + 127);
    const float s = std::ldexp(1.0f, e);
    for (int j = 0; j < 32; j += 2) {
      uint8_t pair = 0;
      for (int h = 0; h < 2; ++h) {
        const float q = x[j + h] / s;
        int best = 0;
        for (int g = 1; g < 8; ++g) {
          if (std::fabs(std::fabs(q) - kGrid[g]) < std::fabs(std::fabs(q) - kGrid[best])) best = g;
        }
        const uint8_t code = static_cast<uint8_t>(best | (q < 0 && best != 0 ? 8 : 0));
        pair |= static_cast<uint8_t>(code << (4 * h));
      }
      codes[b * 16 + j / 2] = pair;
    }
  }
}

}  // namespace

absl::StatusOr<ForwardCounters> CudaBackend::Counters() const {
  ForwardCounters c = counters_;
  c.graphs_off = !GraphsOn();
  const int64_t ne = c_.n_routed_experts, d = c_.hidden_size, inter = c_.moe_intermediate_size;
  std::vector<int32_t> t(static_cast<size_t>(c_.num_hidden_layers * ne));
  V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(t.data(), touched_, t.size() * 4, cudaMemcpyDeviceToHost, stream_));
  RETURN_IF_ERROR(Sync());
  const bool fp4 = bf16_ && c_.expert_dtype == "fp4";
  const int64_t expert_bytes = fp4 ? 3 * d * inter / 2 + 3 * d * inter / 32 : 3 * d * inter * (bf16_ ? 2 : 4);
  for (int32_t rows : t) {
    if (rows == 0) continue;
    ++c.experts_touched;
    c.weight_bytes += expert_bytes;
    c.gemm_flops += 2.0 * rows * 3 * d * inter;
  }
  return c;
}

absl::Status CudaBackend::Put(const float* host, int64_t out, int64_t in, bool bf16, WInit init, Mat* m) {
  m->out = out;
  m->in = in;
  m->bf16 = bf16;
  const int64_t n = out * in;
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&m->p, std::max<int64_t>(1, m->bytes())));
  allocs_.push_back(m->p);
  weight_bytes_ += m->bytes();
  if (init == WInit::kHost) {
    if (bf16) {
      std::vector<uint16_t> h(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToBf16(host[i]);
      V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(m->p, h.data(), n * 2, cudaMemcpyHostToDevice));
    } else {
      V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(m->p, host, n * 4, cudaMemcpyHostToDevice));
    }
  } else {
    const float scale = init == WInit::kRandom ? 1.0f / std::sqrt(static_cast<float>(in)) : 0.0f;
    k::RandomFill<<<1024, 256, 0, stream_>>>(m->p, bf16, n, ++seed_, scale);
    V4_LAUNCH_CHECK(RandomFill);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PutFp4(const float* host, int64_t out, int64_t in, Mat* m) {
  if (in % 32 != 0) return absl::InvalidArgumentError("MXFP4 weights need rows of a multiple of 32");
  m->out = out;
  m->in = in;
  m->fp4 = true;
  const int64_t n = out * in;
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&m->p, n / 2));
  allocs_.push_back(m->p);
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&m->scales, n / 32));
  allocs_.push_back(m->scales);
  weight_bytes_ += m->bytes();
  if (host != nullptr) {
    std::vector<uint8_t> codes(static_cast<size_t>(n / 2)), sc(static_cast<size_t>(n / 32));
    QuantizeMxfp4(host, n, codes.data(), sc.data());
    // GroupedGemvFp4 folds 2^6 into the scale's FP32 exponent: bytes above 248 (scales above 2^121, weights
    // beyond ~1e36; 255 is NaN) would overflow it. No real checkpoint comes near; refuse rather than compute
    // garbage.
    const uint8_t top = sc.empty() ? 0 : *std::max_element(sc.begin(), sc.end());
    if (top > 248) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MXFP4 expert weights with a block scale of 2^", static_cast<int>(top) - 127,
          ": the CUDA backend's MXFP4 GEMV supports scales up to 2^121 (weights up to ~1.6e37)"));
    }
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(m->p, codes.data(), codes.size(), cudaMemcpyHostToDevice));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(m->scales, sc.data(), sc.size(), cudaMemcpyHostToDevice));
  } else {
    // Random codes (|value| 2.1 on average) with a scale that gives about N(0, 1/in) weights.
    k::RandomBytes<<<1024, 256, 0, stream_>>>(static_cast<uint8_t*>(m->p), n / 2, ++seed_);
    V4_LAUNCH_CHECK(RandomBytes);
    const int e = static_cast<int>(std::lround(std::log2(1.0 / (std::sqrt(static_cast<double>(in)) * 2.5))));
    V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(m->scales, e + 127, n / 32, stream_));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PutVec(const float* host, int64_t n, WInit init, float** p) {
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(p, std::max<int64_t>(1, n) * 4));
  allocs_.push_back(*p);
  weight_bytes_ += n * 4;
  std::vector<float> h;
  if (init == WInit::kHost) {
    h.assign(host, host + n);
  } else {
    h.assign(static_cast<size_t>(n), init == WInit::kOnes ? 1.0f : 0.0f);
    if (init == WInit::kRandom) {  // Small values, like the CPU bench's random 1-D tensors.
      for (int64_t i = 0; i < n; ++i) h[i] = 0.1f * std::sin(static_cast<float>(i * 7 + seed_));
    }
  }
  V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(*p, h.data(), n * 4, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CudaBackend::LoadLayer(const cpu::BlockWeights* b, int64_t layer, LayerW* l) {
  const ModelConfig& c = c_;
  const int64_t d = c.hidden_size, h = c.num_attention_heads, hd = c.head_dim, hc = c.hc_mult;
  const int64_t mix = (2 + hc) * hc;
  const WInit wi = b ? WInit::kHost : WInit::kRandom;
  auto P = [&](const cpu::Tensor* t) -> const float* { return b ? t->data() : nullptr; };
  auto vec = [&](const cpu::Tensor* t, int64_t n, WInit rnd, float** p) {
    return PutVec(b ? t->data() : nullptr, n, b ? WInit::kHost : rnd, p);
  };
  RETURN_IF_ERROR(vec(b ? &b->attn_norm : nullptr, d, WInit::kOnes, &l->attn_norm));
  RETURN_IF_ERROR(vec(b ? &b->ffn_norm : nullptr, d, WInit::kOnes, &l->ffn_norm));
  for (int site = 0; site < 2; ++site) {
    const cpu::HcWeights* src = b ? (site == 0 ? &b->hc_attn : &b->hc_ffn) : nullptr;
    HcW& dst = site == 0 ? l->hc_attn : l->hc_ffn;
    RETURN_IF_ERROR(Put(src ? src->fn.data() : nullptr, mix, hc * d, false, wi, &dst.fn));
    RETURN_IF_ERROR(vec(src ? &src->base : nullptr, mix, WInit::kRandom, &dst.base));
    RETURN_IF_ERROR(vec(src ? &src->scale : nullptr, 3, WInit::kRandom, &dst.scale));
  }
  RETURN_IF_ERROR(vec(b ? &b->attn_sink : nullptr, h, WInit::kRandom, &l->attn_sink));
  RETURN_IF_ERROR(PutLinear(b ? &b->wq_a : nullptr, c.q_lora_rank, d, &l->wq_a));
  RETURN_IF_ERROR(vec(b ? &b->q_norm : nullptr, c.q_lora_rank, WInit::kOnes, &l->q_norm));
  RETURN_IF_ERROR(PutLinear(b ? &b->wq_b : nullptr, h * hd, c.q_lora_rank, &l->wq_b));
  RETURN_IF_ERROR(PutLinear(b ? &b->wkv : nullptr, hd, d, &l->wkv));
  RETURN_IF_ERROR(vec(b ? &b->kv_norm : nullptr, hd, WInit::kOnes, &l->kv_norm));
  RETURN_IF_ERROR(
      Put(P(b ? &b->wo_a : nullptr), c.o_groups * c.o_lora_rank, h * hd / c.o_groups, bf16_, wi, &l->wo_a));
  RETURN_IF_ERROR(PutLinear(b ? &b->wo_b : nullptr, d, c.o_groups * c.o_lora_rank, &l->wo_b));
  const int64_t ratio = c.compress_ratios[static_cast<size_t>(layer)];
  auto comp = [&](const cpu::CompressorWeights* src, int64_t width, CompW* dst) -> absl::Status {
    const int64_t coff = ratio == 4 ? 2 : 1;
    RETURN_IF_ERROR(Put(src ? src->wkv.data() : nullptr, coff * width, d, false, wi, &dst->wkv));
    RETURN_IF_ERROR(Put(src ? src->wgate.data() : nullptr, coff * width, d, false, wi, &dst->wgate));
    if (src != nullptr) {
      dst->host.ape = src->ape;
      dst->host.norm = src->norm;
    } else {
      dst->host.ape.assign(static_cast<size_t>(ratio * coff * width), 0.0f);
      for (size_t i = 0; i < dst->host.ape.size(); ++i)
        dst->host.ape[i] = 0.05f * std::cos(static_cast<float>(i));
      dst->host.norm.assign(static_cast<size_t>(width), 1.0f);
    }
    if (static_cast<int64_t>(dst->host.ape.size()) != ratio * coff * width ||
        static_cast<int64_t>(dst->host.norm.size()) != width) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, ": compressor ape/norm of the wrong size"));
    }
    RETURN_IF_ERROR(PutVec(dst->host.ape.data(), ratio * coff * width, WInit::kHost, &dst->ape));
    return PutVec(dst->host.norm.data(), width, WInit::kHost, &dst->norm);
  };
  if (ratio > 0) RETURN_IF_ERROR(comp(b ? &b->compressor : nullptr, hd, &l->compressor));
  if (ratio == 4) {
    RETURN_IF_ERROR(PutLinear(b ? &b->indexer_wq_b : nullptr, c.index_n_heads * c.index_head_dim,
                              c.q_lora_rank, &l->indexer_wq_b));
    RETURN_IF_ERROR(
        Put(P(b ? &b->indexer_weights : nullptr), c.index_n_heads, d, bf16_, wi, &l->indexer_weights));
    RETURN_IF_ERROR(comp(b ? &b->indexer_compressor : nullptr, c.index_head_dim, &l->indexer_compressor));
  }
  const int64_t ne = c.n_routed_experts, inter = c.moe_intermediate_size;
  RETURN_IF_ERROR(Put(P(b ? &b->gate : nullptr), ne, d, false, wi, &l->gate));
  const bool hash = layer < c.num_hidden_layers && c.is_hash_layer(layer);
  if (hash) {
    std::vector<int32_t> t2e;
    if (b != nullptr) {
      t2e = b->tid2eid;
    } else {
      t2e.resize(static_cast<size_t>(c.vocab_size * c.num_experts_per_tok));
      for (size_t i = 0; i < t2e.size(); ++i) t2e[i] = static_cast<int32_t>((i * 7919) % ne);
    }
    V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&l->tid2eid, t2e.size() * 4));
    allocs_.push_back(l->tid2eid);
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpy(l->tid2eid, t2e.data(), t2e.size() * 4, cudaMemcpyHostToDevice));
  } else {
    RETURN_IF_ERROR(vec(b ? &b->gate_bias : nullptr, ne, WInit::kRandom, &l->gate_bias));
  }
  // Experts stacked so that one pointer and an expert index address any of them.
  // MXFP4 routed experts when the checkpoint has them and the backend is not in its FP32 mode.
  // (GroupedGemmFp4 steps over inputs 64 at a time: other widths keep the experts in BF16.)
  const bool fp4 =
      bf16_ && c.expert_dtype == "fp4" && c.hidden_size % 64 == 0 && c.moe_intermediate_size % 64 == 0;
  auto stack = [&](int which, int64_t out, int64_t in, Mat* dst) -> absl::Status {
    if (b == nullptr)
      return fp4 ? PutFp4(nullptr, ne * out, in, dst)
                 : Put(nullptr, ne * out, in, bf16_, WInit::kRandom, dst);
    std::vector<float> all(static_cast<size_t>(ne * out * in));
    for (int64_t e = 0; e < ne; ++e) {
      const cpu::ExpertWeights& ew = b->experts[static_cast<size_t>(e)];
      const cpu::Tensor& t = which == 1 ? ew.w1 : which == 3 ? ew.w3 : ew.w2;
      std::copy(t.begin(), t.end(), all.begin() + e * out * in);
    }
    return fp4 ? PutFp4(all.data(), ne * out, in, dst)
               : Put(all.data(), ne * out, in, bf16_, WInit::kHost, dst);
  };
  RETURN_IF_ERROR(stack(1, inter, d, &l->w1));
  RETURN_IF_ERROR(stack(3, inter, d, &l->w3));
  RETURN_IF_ERROR(stack(2, d, inter, &l->w2));
  l->w1.out = l->w3.out = inter;  // Per expert; the stack holds ne of them.
  l->w2.out = d;
  RETURN_IF_ERROR(PutLinear(b ? &b->shared.w1 : nullptr, inter, d, &l->s1));
  RETURN_IF_ERROR(PutLinear(b ? &b->shared.w3 : nullptr, inter, d, &l->s3));
  return PutLinear(b ? &b->shared.w2 : nullptr, d, inter, &l->s2);
}

absl::Status CudaBackend::InitRuntime() {
  int dev = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  V4_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, dev));
  gpu_name_ = prop.name;
  V4_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  ASSIGN_OR_RETURN(blas_api_, Cublas());
  V4_CUBLAS_RETURN_IF_ERROR(blas_api_->create(&blas_));
  V4_CUBLAS_RETURN_IF_ERROR(blas_api_->set_stream(blas_, stream_));
  // CUBLAS_COMPUTE_32F under the default math mode keeps FP32 GEMMs in FP32 (no TF32), so the FP32 mode can
  // be compared with the CPU tightly, and BF16 GEMMs still use the tensor cores.
  V4_CUBLAS_RETURN_IF_ERROR(blas_api_->set_math_mode(blas_, CUBLAS_DEFAULT_MATH));
  if (blas_api_->set_workspace !=
      nullptr) {  // After set_stream, which resets it. 32 MiB: cuBLAS's advice on Hopper.
    constexpr size_t kBlasWorkspace = size_t{32} << 20;
    V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&blas_ws_, kBlasWorkspace));
    V4_CUBLAS_RETURN_IF_ERROR(blas_api_->set_workspace(blas_, blas_ws_, kBlasWorkspace));
  }
  cudaMemPool_t pool;
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t keep = std::numeric_limits<uint64_t>::max();  // Keep freed scratch for the next step.
  V4_CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  act_bf16_ = std::make_unique<Buf<__nv_bfloat16>>(stream_);
  if (blas_api_->lt_ok && fp8_) {  // Only the FP8 mode's linears use cuBLASLt.
    V4_CUBLAS_RETURN_IF_ERROR(blas_api_->lt_create(&lt_));
    V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&lt_ws_, kLtWorkspace));
  }
  act_fp8_ = std::make_unique<Buf<uint8_t>>(stream_);
  act_fp8_scales_ = std::make_unique<Buf<float>>(stream_);
  act_fp8_round_ = std::make_unique<Buf<float>>(stream_);
  act_f16_ = std::make_unique<Buf<__half>>(stream_);
  act_f16_inv_ = std::make_unique<Buf<float>>(stream_);
  // The GEMMs' scratch, which graphs capture by address.
  act_bf16_->Track(&scratch_moves_, &capturing_);
  act_fp8_->Track(&scratch_moves_, &capturing_);
  act_fp8_scales_->Track(&scratch_moves_, &capturing_);
  act_fp8_round_->Track(&scratch_moves_, &capturing_);
  split_partial_ = std::make_unique<Buf<float>>(stream_);
  split_partial_->Track(&scratch_moves_, &capturing_);
  sm_count_ = prop.multiProcessorCount;
  V4_CUDA_RETURN_IF_ERROR(cudaMalloc(&split_counters_, kSplitCounters * sizeof(unsigned)));
  allocs_.push_back(split_counters_);
  V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(split_counters_, 0, kSplitCounters * sizeof(unsigned), stream_));
  // The row GEMMs for decode batches: 1 both, fp8 RowsGemmFp8 only, f32 RowsGemmF32 only, 0 (unset) neither.
  if (const char* v = std::getenv("V4SERVE_CUDA_ROWS_GEMM"); v != nullptr && *v != '\0') {
    const std::string rows = v;
    if (rows != "0" && rows != "1" && rows != "fp8" && rows != "f32") {
      return absl::InvalidArgumentError(
          absl::StrCat("V4SERVE_CUDA_ROWS_GEMM must be 0, 1, fp8 or f32, got \"", rows, "\""));
    }
    rows_fp8_ = rows == "1" || rows == "fp8";
    rows_f32_ = rows == "1" || rows == "f32";
  }
  // Programmatic dependent launch: on by default where it can run (session 15, H100: 1.01-1.03x faster
  // decode steps at batch 1-64, docs/PERFORMANCE.md). The wait is compiled in for sm_90 only: programmatic
  // launches of kernels built for an older target would race, so V4SERVE_CUDA_PDL=1 is refused there.
  cudaFuncAttributes fa{};
  V4_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&fa, k::RmsNorm));
  const bool pdl_runs = prop.major >= 9 && fa.binaryVersion >= 90;
  ASSIGN_OR_RETURN(pdl_, EnvSwitch("V4SERVE_CUDA_PDL", pdl_runs));
  if (pdl_ && !pdl_runs) {
    return absl::FailedPreconditionError(absl::StrCat(
        "V4SERVE_CUDA_PDL=1 needs a GPU of compute capability 9.0 and kernels built for it; this is ",
        prop.major, ".", prop.minor, " with kernels built for ", fa.binaryVersion / 10, ".",
        fa.binaryVersion % 10));
  }
  act_f16_->Track(&scratch_moves_, &capturing_);
  act_f16_inv_->Track(&scratch_moves_, &capturing_);
  top_logits_ = std::make_unique<Buf<float>>(stream_);
  RETURN_IF_ERROR(InitMoeKernels());
  // The prefill's expert GEMM on wgmma (GroupedGemmFp4Wg) where it runs, unless V4SERVE_CUDA_WGMMA=0.
  ASSIGN_OR_RETURN(wgmma_, EnvSwitch("V4SERVE_CUDA_WGMMA", wgmma_runs_));
  if (wgmma_ && !wgmma_runs_) {
    return absl::FailedPreconditionError(
        "V4SERVE_CUDA_WGMMA=1 needs a GPU of compute capability 9.x and kernels built for sm_90a");
  }
  // The compressors' prefill GEMMs as 3xTF32 (LinearsF32) outside the FP32 mode, unless
  // V4SERVE_CUDA_TF32X3=0.
  ASSIGN_OR_RETURN(tf32x3_, EnvSwitch("V4SERVE_CUDA_TF32X3", bf16_ && prop.major >= 8));
  RETURN_IF_ERROR(InitLinearKernels());
  return InitAttentionKernels(prop);
}

absl::Status CudaBackend::Init(const cpu::ModelWeights* w, const cpu::RopeTable* rope_main,
                               const cpu::RopeTable* rope_comp, uint64_t seed) {
  const ModelConfig& c = c_;
  seed_ = seed;
  if (c.hc_mult > k::kMaxHc) return absl::InvalidArgumentError("hc_mult above the CUDA backend's bound");
  if (c.hidden_size % 4 != 0) {  // HcPost and the BF16 copies move four features at a time.
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA backend needs hidden_size a multiple of 4, got ", c.hidden_size));
  }
  RETURN_IF_ERROR(InitRuntime());
  const char* prof = std::getenv("V4SERVE_CUDA_PROFILE");
  profile_ = prof != nullptr && std::string(prof) == "1";

  rope_main_ = rope_main ? *rope_main : cpu::MakeRopeTable(c.qk_rope_head_dim, c.rope_theta, nullptr);
  rope_comp_ =
      rope_comp ? *rope_comp : cpu::MakeRopeTable(c.qk_rope_head_dim, c.compress_rope_theta, &c.rope_scaling);
  for (int which = 0; which < 2; ++which) {
    const cpu::RopeTable& t = which == 0 ? rope_main_ : rope_comp_;
    std::vector<float> f(t.inv_freq.size());
    for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(t.inv_freq[i]);
    RETURN_IF_ERROR(
        PutVec(f.data(), static_cast<int64_t>(f.size()), WInit::kHost, which == 0 ? &inv_main_ : &inv_comp_));
  }
  const int64_t d = c.hidden_size, hc = c.hc_mult;
  const WInit wi = w ? WInit::kHost : WInit::kRandom;
  // The embedding is a gather, not a GEMM: FP32 in the FP32 mode, BF16 otherwise.
  RETURN_IF_ERROR(
      Put(w ? w->embed.data() : nullptr, c.vocab_size, d, bf16_, w ? WInit::kHost : WInit::kRandom, &embed_));
  if (w == nullptr) {  // Unit-variance embeddings, like a trained model's residual stream scale.
    k::RandomFill<<<1024, 256, 0, stream_>>>(embed_.p, bf16_, c.vocab_size * d, ++seed_, 1.0f);
    V4_LAUNCH_CHECK(RandomFill);
  }
  RETURN_IF_ERROR(Put(w ? w->head.data() : nullptr, c.vocab_size, d, bf16_, wi, &head_));
  RETURN_IF_ERROR(PutVec(w ? w->norm.data() : nullptr, d, w ? WInit::kHost : WInit::kOnes, &norm_));
  RETURN_IF_ERROR(Put(w ? w->hc_head.fn.data() : nullptr, hc, hc * d, false, wi, &hc_head_.fn));
  RETURN_IF_ERROR(
      PutVec(w ? w->hc_head.base.data() : nullptr, hc, w ? WInit::kHost : WInit::kRandom, &hc_head_.base));
  RETURN_IF_ERROR(
      PutVec(w ? w->hc_head.scale.data() : nullptr, 1, w ? WInit::kHost : WInit::kRandom, &hc_head_.scale));
  V4_CUDA_RETURN_IF_ERROR(
      cudaMalloc(&touched_, std::max<int64_t>(1, c.num_hidden_layers * c.n_routed_experts) * 4));
  allocs_.push_back(touched_);
  if (c.num_experts_per_tok > 64) return absl::InvalidArgumentError("num_experts_per_tok above 64");
  layers_.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    RETURN_IF_ERROR(
        LoadLayer(w ? &w->layers[static_cast<size_t>(l)] : nullptr, l, &layers_[static_cast<size_t>(l)]));
  }
  RETURN_IF_ERROR(Sync());
  // Device copies of sequence states: V4SERVE_CUDA_STATE_CACHE_MB, else a quarter of what the weights left.
  size_t free_b = 0, total_b = 0;
  V4_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_b, &total_b));
  int64_t budget = static_cast<int64_t>(free_b / 4);
  if (const char* mb = std::getenv("V4SERVE_CUDA_STATE_CACHE_MB"); mb != nullptr && *mb != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(mb, &end, 10);
    if (*end != '\0' || v < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("V4SERVE_CUDA_STATE_CACHE_MB must be a number of MiB >= 0, got \"", mb, "\""));
    }
    budget = static_cast<int64_t>(v) << 20;
  }
  ASSIGN_OR_RETURN(KvPageLayout pages, KvPageLayout::For(c));
  state_cache_ = std::make_unique<DeviceStateCache>(c, std::move(pages), stream_, budget);
  // CUDA graphs for forwards of up to 128 rows whose MoE takes the device path (at most 2048 slots, experts
  // the GEMVs read); V4SERVE_CUDA_GRAPHS=0 turns them off.
  bool gemv = true;
  for (const LayerW& l : layers_) gemv &= GemvFits(l.w1) && GemvFits(l.w2);
  ASSIGN_OR_RETURN(const bool graphs, EnvSwitch("V4SERVE_CUDA_GRAPHS", true));
  if (!graphs) {
    graphs_off_why_ = "V4SERVE_CUDA_GRAPHS=0";
  } else if (profile_) {
    graphs_off_why_ = "V4SERVE_CUDA_PROFILE=1 synchronizes inside the sections";
  } else if (!gemv) {
    graphs_off_why_ = "the experts' shapes take the host-planned MoE path";
  } else {
    graph_max_rows_ = std::min<int64_t>(128, 2048 / std::max<int64_t>(1, c.num_experts_per_tok));
    graph_warm_.assign(static_cast<size_t>(graph_max_rows_) + 1, false);
  }
  return absl::OkStatus();
}

}  // namespace impl

using impl::Blocks;
using impl::Buf;
using impl::CudaBackend;
using impl::Mat;
using impl::WInit;
namespace k = kernels;

absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeCudaBackend(const ModelConfig& config,
                                                                const cpu::ModelWeights& weights,
                                                                const cpu::RopeTable& rope_main,
                                                                const cpu::RopeTable& rope_compress,
                                                                CudaWeights format) {
  auto b = std::make_unique<CudaBackend>(config, format);
  RETURN_IF_ERROR(b->Init(&weights, &rope_main, &rope_compress, 0));
  return std::unique_ptr<ForwardBackend>(std::move(b));
}

absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeRandomCudaBackend(const ModelConfig& config,
                                                                      CudaWeights format, uint64_t seed) {
  absl::StatusOr<std::vector<GpuInfo>> gpus = ListDevices();
  if (!gpus.ok()) return gpus.status();
  if (gpus->empty()) return absl::UnavailableError("no GPU visible");
  auto b = std::make_unique<CudaBackend>(config, format);
  RETURN_IF_ERROR(b->Init(nullptr, nullptr, nullptr, seed));
  return std::unique_ptr<ForwardBackend>(std::move(b));
}

absl::StatusOr<ForwardCounters> LastForwardCounters(const ForwardBackend& backend) {
  const auto* b = dynamic_cast<const CudaBackend*>(&backend);
  if (b == nullptr) return absl::FailedPreconditionError("not a CUDA backend");
  return b->Counters();
}

absl::StatusOr<std::string> DeviceKvPage(const ForwardBackend& backend, const SequenceState& state,
                                         int64_t block) {
  const auto* b = dynamic_cast<const CudaBackend*>(&backend);
  if (b == nullptr) return absl::FailedPreconditionError("not a CUDA backend");
  return b->KvPage(state, block);
}

absl::StatusOr<std::string> CudaBackend::KvPage(const SequenceState& state, int64_t block) const {
  if (block < 0 || (block + 1) * kKvPageTokens > state.position) {
    return absl::OutOfRangeError(
        absl::StrCat("block ", block, " is not complete at position ", state.position));
  }
  const DeviceStateCache::Copy* copy = state_cache_->Find(state);
  if (copy == nullptr) return absl::NotFoundError("no device copy of this state is valid here");
  std::string payload(static_cast<size_t>(state_cache_->page_layout().PayloadBytes()), '\0');
  RETURN_IF_ERROR(state_cache_->DownloadPage(*copy, block, payload.data()));
  return payload;
}

absl::StatusOr<std::vector<int32_t>> ArgmaxRows(const std::vector<float>& logits, int64_t rows,
                                                int64_t cols) {
  if (rows * cols != static_cast<int64_t>(logits.size()) || rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError("ArgmaxRows: logits size is not rows * cols");
  }
  Buf<float> x(nullptr), pv(nullptr);
  Buf<int32_t> out(nullptr), pi(nullptr);
  RETURN_IF_ERROR(x.Upload(logits));
  RETURN_IF_ERROR(out.Alloc(rows));
  RETURN_IF_ERROR(pv.Alloc(rows * k::kArgmaxChunks));
  RETURN_IF_ERROR(pi.Alloc(rows * k::kArgmaxChunks));
  k::LaunchArgmaxRows(x.get(), rows, cols, pv.get(), pi.get(), out.get(), nullptr);
  V4_LAUNCH_CHECK(ArgmaxRows);
  std::vector<int32_t> h;
  RETURN_IF_ERROR(out.Download(&h));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return h;
}

namespace testing {

absl::Status RmsNorm(std::vector<float>* x, int64_t rows, int64_t dim, const std::vector<float>& weight,
                     double eps) {
  Buf<float> dx(nullptr), dw(nullptr);
  RETURN_IF_ERROR(dx.Upload(*x));
  RETURN_IF_ERROR(dw.Upload(weight));
  k::RmsNorm<<<rows, 256>>>(dx.get(), dim, weight.empty() ? nullptr : dw.get(), eps);
  V4_LAUNCH_CHECK(RmsNorm);
  RETURN_IF_ERROR(dx.Download(x));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::vector<int64_t>>> TopK(const std::vector<float>& scores, int64_t rows,
                                                       int64_t n, int64_t kk) {
  Buf<float> sc(nullptr);
  Buf<int64_t> nv(nullptr);
  Buf<int32_t> sel(nullptr), cnt(nullptr);
  RETURN_IF_ERROR(sc.Upload(scores));
  RETURN_IF_ERROR(nv.Upload(std::vector<int64_t>(static_cast<size_t>(rows), n)));
  RETURN_IF_ERROR(sel.Alloc(rows * kk));
  RETURN_IF_ERROR(cnt.Alloc(rows));
  k::TopK<<<rows, 256>>>(sc.get(), n, nv.get(), kk, sel.get(), cnt.get());
  V4_LAUNCH_CHECK(TopK);
  std::vector<int32_t> hs, hc;
  RETURN_IF_ERROR(sel.Download(&hs));
  RETURN_IF_ERROR(cnt.Download(&hc));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  std::vector<std::vector<int64_t>> out(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    out[r].assign(hs.begin() + r * kk, hs.begin() + r * kk + hc[r]);
    std::sort(out[r].begin(), out[r].end());
  }
  return out;
}

absl::Status Rope(std::vector<float>* x, int64_t rows, int64_t dim, int64_t rope_dim,
                  const std::vector<double>& inv_freq, const std::vector<int64_t>& positions, bool inverse) {
  std::vector<float> f(inv_freq.begin(), inv_freq.end());
  Buf<float> dx(nullptr), df(nullptr);
  Buf<int64_t> dp(nullptr);
  RETURN_IF_ERROR(dx.Upload(*x));
  RETURN_IF_ERROR(df.Upload(f));
  RETURN_IF_ERROR(dp.Upload(positions));
  k::Rope<<<Blocks(rows * rope_dim / 2, 256), 256>>>(dx.get(), rows, dim, dim - rope_dim, rope_dim, dp.get(),
                                                     1, df.get(), inverse);
  V4_LAUNCH_CHECK(Rope);
  RETURN_IF_ERROR(dx.Download(x));
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

}  // namespace testing
}  // namespace v4serve::model::cuda
