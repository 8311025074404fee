#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/cpu/compressor.h"
#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_check.h"
#include "model/cuda/cuda_device.h"
#include "model/cuda/cuda_kernels.cuh"
#include "model/cuda/device_state_cache.h"
#include "model/numeric_formats.h"
#include "services/status_macros.h"

namespace v4serve::model::cuda {
namespace {

namespace k = kernels;

absl::Status CublasStatus(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(call, " failed at ", file, ":", line, ": cuBLAS status ", static_cast<int>(s)));
}
#define V4_CUBLAS_RETURN_IF_ERROR(call)                                                 \
  do {                                                                                  \
    ::absl::Status v4_cublas_status_ = CublasStatus((call), #call, __FILE__, __LINE__); \
    if (!v4_cublas_status_.ok()) return v4_cublas_status_;                              \
  } while (false)
// After a kernel launch: a launch error (bad configuration) or an earlier asynchronous fault.
#define V4_LAUNCH_CHECK(name) V4_CUDA_RETURN_IF_ERROR(cudaGetLastError())

int64_t Blocks(int64_t n, int64_t t) { return (n + t - 1) / t; }

// cuBLAS is opened at run time, when the first CUDA backend is made, not linked: libcublasLt's 94 KB of
// initial TLS, when loaded at process start, made civetweb's (prometheus-cpp's) thread creation fail in
// every v4serve process, GPU or not. Opened with dlopen its TLS is allocated per thread on first use.
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  // The C entry points (C++ also sees inline overloads taking cudaDataType as the compute type).
  cublasStatus_t (*gemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                         const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                         cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*gemm_strided_batched)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                         const void*, const void*, cudaDataType, int, long long, const void*,
                                         cudaDataType, int, long long, const void*, void*, cudaDataType, int,
                                         long long, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
};

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
    return new absl::StatusOr<CublasApi>(a);
  }();
  if (!api->ok()) return api->status();
  return &**api;
}

// A stream-ordered device buffer (cudaMallocAsync; freed on the same stream).
template <class T>
class Buf {
 public:
  explicit Buf(cudaStream_t s) : s_(s) {}
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() {
    if (p_ != nullptr) cudaFreeAsync(p_, s_);
  }
  absl::Status Alloc(int64_t n) {
    if (n <= cap_) {
      n_ = n;
      return absl::OkStatus();
    }
    if (p_ != nullptr) cudaFreeAsync(p_, s_);
    p_ = nullptr;
    V4_CUDA_RETURN_IF_ERROR(
        cudaMallocAsync(reinterpret_cast<void**>(&p_), std::max<int64_t>(1, n) * sizeof(T), s_));
    cap_ = n_ = n;
    return absl::OkStatus();
  }
  absl::Status Upload(const T* h, int64_t n) {
    RETURN_IF_ERROR(Alloc(n));
    if (n > 0) V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p_, h, n * sizeof(T), cudaMemcpyHostToDevice, s_));
    return absl::OkStatus();
  }
  absl::Status Upload(const std::vector<T>& h) { return Upload(h.data(), static_cast<int64_t>(h.size())); }
  absl::Status Download(std::vector<T>* h) const {
    h->resize(static_cast<size_t>(n_));
    if (n_ > 0)
      V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h->data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, s_));
    return absl::OkStatus();
  }
  T* get() const { return p_; }
  int64_t size() const { return n_; }

 private:
  cudaStream_t s_;
  T* p_ = nullptr;
  int64_t n_ = 0, cap_ = 0;
};

// A weight matrix [out, in] (row-major, as checkpoints store it): FP32, BF16, or MXFP4 (`fp4`: e2m1 codes
// two per byte in `p`, one e8m0 scale per 32 elements of a row in `scales`).
struct Mat {
  void* p = nullptr;
  int64_t out = 0, in = 0;
  bool bf16 = false;
  bool fp4 = false;
  uint8_t* scales = nullptr;
  int64_t bytes() const { return fp4 ? out * in / 2 + out * in / 32 : out * in * (bf16 ? 2 : 4); }
};

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

struct HcW {
  Mat fn;  // Always FP32: the mixes feed Sinkhorn and sigmoid gates.
  float* base = nullptr;
  float* scale = nullptr;
};

struct CompW {
  Mat wkv, wgate;               // FP32: the compressor's pooled entries are sensitive.
  cpu::CompressorWeights host;  // ape and norm (random weights: drawn here).
  float* ape = nullptr;         // The same on the device.
  float* norm = nullptr;
};

// One compressor's work in a call (CudaBackend::Compress).
struct CompressJob {
  const CompW* w;
  int which;      // 0: the attention compressor, 1: the lightning indexer's.
  int64_t width;  // Entry width.
  float* kv;      // This call's projected rows [n, coff * width].
  float* score;   // Their gate scores; Compress adds the positional bias in place.
};

// What a forward leaves for the host states, run after its one synchronization, in order.
using Finish = std::vector<std::function<void()>>;

// Page-locked host memory handed out in order during one forward (the targets of its device-to-host
// copies) and reused by the next; blocks are kept.
class PinnedArena {
 public:
  PinnedArena() = default;
  PinnedArena(const PinnedArena&) = delete;
  PinnedArena& operator=(const PinnedArena&) = delete;
  ~PinnedArena() {
    for (const Block& b : blocks_) cudaFreeHost(b.p);
  }
  void Reset() {
    for (Block& b : blocks_) b.used = 0;
  }
  absl::StatusOr<float*> Take(int64_t floats) {
    const int64_t need = (std::max<int64_t>(floats, 1) + 3) / 4 * 4;  // 16-byte aligned pieces.
    for (Block& b : blocks_) {
      if (b.cap - b.used >= need) {
        float* p = b.p + b.used;
        b.used += need;
        return p;
      }
    }
    Block b;
    b.cap = std::max<int64_t>(need, int64_t{4} << 20);
    V4_CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&b.p), b.cap * 4));
    b.used = need;
    blocks_.push_back(b);
    return b.p;
  }

 private:
  struct Block {
    float* p = nullptr;
    int64_t cap = 0, used = 0;
  };
  std::vector<Block> blocks_;
};

struct LayerW {
  float *attn_norm = nullptr, *ffn_norm = nullptr, *attn_sink = nullptr, *q_norm = nullptr,
        *kv_norm = nullptr;
  HcW hc_attn, hc_ffn;
  Mat wq_a, wq_b, wkv, wo_a, wo_b;
  CompW compressor, indexer_compressor;
  Mat indexer_wq_b, indexer_weights;
  Mat gate;  // FP32: routing decisions must match the CPU.
  float* gate_bias = nullptr;
  int32_t* tid2eid = nullptr;
  Mat w1, w3, w2;  // All experts stacked: [E * I, D], [E * I, D], [E * D, I].
  Mat s1, s3, s2;  // Shared expert.
};

enum class WInit { kHost, kOnes, kZeros, kRandom };

class CudaBackend final : public ForwardBackend {
 public:
  CudaBackend(const ModelConfig& c, CudaWeights format) : c_(c), bf16_(format == CudaWeights::kBf16) {}
  ~CudaBackend() override {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    act_bf16_.reset();  // Both free on stream_, which must still exist.
    state_cache_.reset();
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (void* p : allocs_) cudaFree(p);
    if (blas_ != nullptr) blas_api_->destroy(blas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::kCuda; }
  std::string Describe() const override {
    const bool fp4 = bf16_ && c_.expert_dtype == "fp4";
    return absl::StrFormat("cuda: %s, %s weights%s, %.2f GiB on device", gpu_name_, bf16_ ? "bf16" : "fp32",
                           fp4 ? " (mxfp4 routed experts)" : "",
                           static_cast<double>(weight_bytes_) / (1ull << 30));
  }

  absl::Status Init(const cpu::ModelWeights* w, const cpu::RopeTable* rope_main,
                    const cpu::RopeTable* rope_comp, uint64_t seed);
  // Stream, cuBLAS handle, memory pool and kernel attributes (Init calls it).
  absl::Status InitRuntime();
  // Uploads (or, with host null, draws) a weight matrix.
  absl::Status Put(const float* host, int64_t out, int64_t in, bool bf16, WInit init, Mat* m);

  absl::StatusOr<std::vector<float>> Forward(absl::Span<const ForwardSegment> segments,
                                             absl::Span<const int32_t> tokens,
                                             absl::Span<const int64_t> logit_rows,
                                             std::vector<float>* final_streams) const override;

  // The last Forward's counters; the experts' share is read back from the device here.
  absl::StatusOr<ForwardCounters> Counters() const;

  // y[m, out] = x[m, in] W^T (x rows of stride ldx, y rows of stride ldy), FP32 out.
  absl::Status Linear(const float* x, int64_t m, const Mat& w, float* y) const;
  absl::Status LinearBatched(const float* x, int64_t m, int64_t ldx, int64_t stride_x, const Mat& w,
                             int64_t groups, int64_t ldy, float* y) const;
  cudaStream_t stream() const { return stream_; }

 private:
  absl::Status PutVec(const float* host, int64_t n, WInit init, float** p);
  absl::Status PutFp4(const float* host, int64_t out, int64_t in, Mat* m);
  absl::Status LoadLayer(const cpu::BlockWeights* b, int64_t layer, LayerW* l);
  absl::Status HcPre(const HcW& w, const float* streams, int64_t n, float* collapsed, float* post,
                     float* comb) const;
  // `copies[i]`: the device copy of segments[i]'s state (window ring, entries, indexer keys, compressor
  // windows). What the host states need is copied to pinned memory and applied by `finish`.
  absl::Status Attention(const LayerW& w, int64_t layer, absl::Span<const ForwardSegment> segments,
                         absl::Span<DeviceStateCache::Copy* const> copies, const float* x, int64_t n,
                         float* out, Finish* finish) const;
  // The streaming compressor over this call's rows (model/cpu/compressor.cc on the device): pools the
  // entries of the windows they complete into the device copies (past `n_before`), adds the spans that
  // move the rows into the copies' windows to `late` (to run after this call's reads of the old ones), and
  // leaves `finish` the same bookkeeping and entries for the host states.
  absl::Status Compress(const CompressJob& job, int64_t layer, absl::Span<const ForwardSegment> segments,
                        absl::Span<DeviceStateCache::Copy* const> copies, absl::Span<const int64_t> n_before,
                        int64_t n, const int64_t* d_pos, std::vector<CopySpan>* late, Finish* finish) const;
  // Copies the last min(count, keep) rows (of `width` floats) of each segment of `dev` [rows, width] to
  // pinned memory; returns where each segment's first copied row will be once the stream gets there.
  absl::StatusOr<std::vector<const float*>> DownloadTails(const float* dev, int64_t width,
                                                          absl::Span<const ForwardSegment> segments,
                                                          int64_t keep) const;
  absl::Status Moe(const LayerW& w, int64_t layer, bool hash, const float* x, const int32_t* d_tokens,
                   int64_t n, float* out) const;
  // Expert GEMMs over slots grouped by expert. Device path: GroupedGemv over all experts with the device's
  // counts and starts. Host path: cuBLAS per expert with host counts.
  // `narrow`: experts have one or two rows each, mostly (MXFP4 GEMV variant).
  absl::Status ExpertGemmDevice(const Mat& w, int64_t groups, bool narrow, const float* xin,
                                const int32_t* active, const int32_t* n_active, const int32_t* d_start,
                                const int32_t* d_count, float* y) const;
  absl::Status ExpertGemmHost(const Mat& w, const float* xin, const std::vector<int32_t>& g_expert,
                              const std::vector<int32_t>& g_off, const std::vector<int32_t>& g_cnt,
                              float* y) const;
  bool GemvFits(const Mat& w) const { return w.in % (w.fp4 ? 32 : w.bf16 ? 256 : 128) == 0; }
  absl::Status Sync() const {
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize", __FILE__, __LINE__);
  }
  void CountGemm(const Mat& w, int64_t m) const {
    counters_.weight_bytes += w.bytes();
    counters_.gemm_flops += 2.0 * static_cast<double>(m) * static_cast<double>(w.out * w.in);
  }

  ModelConfig c_;
  bool bf16_;
  std::string gpu_name_;
  size_t smem_optin_ = 48 << 10;
  int64_t weight_bytes_ = 0;
  std::vector<void*> allocs_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  const CublasApi* blas_api_ = nullptr;
  cpu::RopeTable rope_main_, rope_comp_;
  float *inv_main_ = nullptr, *inv_comp_ = nullptr;
  Mat embed_, head_;
  float* norm_ = nullptr;
  HcW hc_head_;
  std::vector<LayerW> layers_;
  uint64_t seed_ = 0;
  mutable std::unique_ptr<Buf<__nv_bfloat16>> act_bf16_;  // Scratch for BF16 GEMM inputs.
  mutable std::unique_ptr<DeviceStateCache> state_cache_;
  mutable PinnedArena arena_;
  mutable ForwardCounters counters_;
  int32_t* touched_ = nullptr;  // [layers, experts]: rows each expert got in the last Forward.
  bool profile_ = false;
  mutable std::chrono::steady_clock::time_point mark_;
  // Profiling: synchronizes and adds the wall time since the last mark to `*slot`.
  absl::Status Mark(double* slot) const {
    if (!profile_) return absl::OkStatus();
    RETURN_IF_ERROR(Sync());
    const auto now = std::chrono::steady_clock::now();
    *slot += std::chrono::duration<double>(now - mark_).count();
    mark_ = now;
    return absl::OkStatus();
  }
};

absl::StatusOr<ForwardCounters> CudaBackend::Counters() const {
  ForwardCounters c = counters_;
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
  RETURN_IF_ERROR(Put(P(b ? &b->wq_a : nullptr), c.q_lora_rank, d, bf16_, wi, &l->wq_a));
  RETURN_IF_ERROR(vec(b ? &b->q_norm : nullptr, c.q_lora_rank, WInit::kOnes, &l->q_norm));
  RETURN_IF_ERROR(Put(P(b ? &b->wq_b : nullptr), h * hd, c.q_lora_rank, bf16_, wi, &l->wq_b));
  RETURN_IF_ERROR(Put(P(b ? &b->wkv : nullptr), hd, d, bf16_, wi, &l->wkv));
  RETURN_IF_ERROR(vec(b ? &b->kv_norm : nullptr, hd, WInit::kOnes, &l->kv_norm));
  RETURN_IF_ERROR(
      Put(P(b ? &b->wo_a : nullptr), c.o_groups * c.o_lora_rank, h * hd / c.o_groups, bf16_, wi, &l->wo_a));
  RETURN_IF_ERROR(Put(P(b ? &b->wo_b : nullptr), d, c.o_groups * c.o_lora_rank, bf16_, wi, &l->wo_b));
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
    RETURN_IF_ERROR(Put(P(b ? &b->indexer_wq_b : nullptr), c.index_n_heads * c.index_head_dim, c.q_lora_rank,
                        bf16_, wi, &l->indexer_wq_b));
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
  const bool fp4 = bf16_ && c.expert_dtype == "fp4";
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
  RETURN_IF_ERROR(Put(P(b ? &b->shared.w1 : nullptr), inter, d, bf16_, wi, &l->s1));
  RETURN_IF_ERROR(Put(P(b ? &b->shared.w3 : nullptr), inter, d, bf16_, wi, &l->s3));
  return Put(P(b ? &b->shared.w2 : nullptr), d, inter, bf16_, wi, &l->s2);
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
  cudaMemPool_t pool;
  V4_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, dev));
  uint64_t keep = std::numeric_limits<uint64_t>::max();  // Keep freed scratch for the next step.
  V4_CUDA_RETURN_IF_ERROR(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  act_bf16_ = std::make_unique<Buf<__nv_bfloat16>>(stream_);
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

absl::Status CudaBackend::Init(const cpu::ModelWeights* w, const cpu::RopeTable* rope_main,
                               const cpu::RopeTable* rope_comp, uint64_t seed) {
  const ModelConfig& c = c_;
  seed_ = seed;
  if (c.hc_mult > k::kMaxHc) return absl::InvalidArgumentError("hc_mult above the CUDA backend's bound");
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
  state_cache_ = std::make_unique<DeviceStateCache>(c, stream_, budget);
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(const float* x, int64_t m, const Mat& w, float* y) const {
  return LinearBatched(x, m, w.in, 0, w, 1, w.out, y);
}

// Groups g < `groups`: y[:, g*out_g ...] (row stride ldy) = x[:, g*stride_x ...] (row stride ldx) W_g^T, with
// W_g the g-th block of w.out / groups rows. Column-major view: Y^T = W · X^T.
absl::Status CudaBackend::LinearBatched(const float* x, int64_t m, int64_t ldx, int64_t stride_x,
                                        const Mat& w, int64_t groups, int64_t ldy, float* y) const {
  if (m == 0) return absl::OkStatus();
  const int64_t out = w.out / groups, in = w.in;
  CountGemm(w, m);
  const float alpha = 1.0f, beta = 0.0f;
  const void* xin = x;
  cudaDataType_t type = CUDA_R_32F;
  if (w.bf16) {
    const int64_t n = (m - 1) * ldx + (groups - 1) * stride_x + in;
    RETURN_IF_ERROR(act_bf16_->Alloc(n));
    k::ToBf16<<<Blocks(n, 256), 256, 0, stream_>>>(x, n, act_bf16_->get());
    V4_LAUNCH_CHECK(ToBf16);
    xin = act_bf16_->get();
    type = CUDA_R_16BF;
  }
  V4_CUBLAS_RETURN_IF_ERROR(blas_api_->gemm_strided_batched(
      blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(m), static_cast<int>(in),
      &alpha, w.p, type, static_cast<int>(in), out * in, xin, type, static_cast<int>(ldx), stride_x, &beta, y,
      CUDA_R_32F, static_cast<int>(ldy), out, static_cast<int>(groups), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaBackend::HcPre(const HcW& w, const float* streams, int64_t n, float* collapsed, float* post,
                                float* comb) const {
  const ModelConfig& c = c_;
  const int64_t hc = c.hc_mult, d = c.hidden_size, mix = (2 + hc) * hc;
  Buf<float> mixes(stream_), rs(stream_);
  RETURN_IF_ERROR(mixes.Alloc(n * mix));
  RETURN_IF_ERROR(rs.Alloc(n));
  RETURN_IF_ERROR(Linear(streams, n, w.fn, mixes.get()));
  k::RowRsqrt<<<n, 1024, 0, stream_>>>(streams, hc * d, c.rms_norm_eps, rs.get());
  V4_LAUNCH_CHECK(RowRsqrt);
  k::HcMix<<<n, 256, 0, stream_>>>(mixes.get(), rs.get(), w.base, w.scale, static_cast<int>(hc),
                                   static_cast<int>(c.hc_sinkhorn_iters), static_cast<float>(c.hc_eps),
                                   streams, d, collapsed, post, comb);
  V4_LAUNCH_CHECK(HcMix);
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
  k::AddApe<<<Blocks(n * row, 256), 256, 0, s>>>(job.score, n, row, d_pos, m, job.w->ape);
  V4_LAUNCH_CHECK(AddApe);
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
    RETURN_IF_ERROR(d_pk.Upload(pk));
    RETURN_IF_ERROR(d_ps.Upload(ps));
    RETURN_IF_ERROR(d_begin.Upload(begin));
    RETURN_IF_ERROR(d_epos.Upload(epos));
    RETURN_IF_ERROR(pooled.Alloc(ne * width));
    k::PoolEntries<<<ne, 128, 0, s>>>(d_pk.get(), d_ps.get(), d_begin.get(), width, pooled.get());
    V4_LAUNCH_CHECK(PoolEntries);
    k::RmsNorm<<<ne, 256, 0, s>>>(pooled.get(), width, job.w->norm, c_.rms_norm_eps);
    V4_LAUNCH_CHECK(RmsNorm);
    k::Rope<<<Blocks(ne * rd / 2, 256), 256, 0, s>>>(pooled.get(), ne, width, width - rd, rd, d_epos.get(), 1,
                                                     inv_comp_, false);
    V4_LAUNCH_CHECK(Rope);
    for (size_t i = 0; i < ns; ++i) {
      const DeviceStateCache::Layer& dl = copies[i]->layers[li];
      early.push_back({pooled.get() + first[i] * width,
                       (job.which == 0 ? dl.entries : dl.keys) + n_before[i] * width,
                       (first[i + 1] - first[i]) * width});
    }
    ASSIGN_OR_RETURN(float* h, arena_.Take(ne * width));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, pooled.get(), ne * width * 4, cudaMemcpyDeviceToHost, s));
    host_entries = h;
  }
  RETURN_IF_ERROR(CopySpans(early, s));      // Before `pooled` is freed, in stream order.
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
        if (cpu::CompressorWriteRow(kv_rows[i] + j * row, sc_rows[i] + j * row, end - t + j, &hs)) {
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

absl::Status CudaBackend::Attention(const LayerW& w, int64_t layer, absl::Span<const ForwardSegment> segments,
                                    absl::Span<DeviceStateCache::Copy* const> copies, const float* x,
                                    int64_t n, float* out, Finish* finish) const {
  const ModelConfig& c = c_;
  const int64_t h = c.num_attention_heads, hd = c.head_dim, rd = c.qk_rope_head_dim;
  const int64_t win = c.sliding_window, ratio = c.compress_ratios[static_cast<size_t>(layer)];
  const bool csa = ratio == 4;
  const int64_t coff = csa ? 2 : 1, ih = c.index_n_heads, id = c.index_head_dim;
  const double eps = c.rms_norm_eps;
  const float* inv = ratio > 0 ? inv_comp_ : inv_main_;
  cudaStream_t s = stream_;

  Buf<float> qr(s), q(s), kv(s), ckv(s), cscore(s), iq(s), iw(s), ikv(s), iscore(s);
  RETURN_IF_ERROR(qr.Alloc(n * c.q_lora_rank));
  RETURN_IF_ERROR(Linear(x, n, w.wq_a, qr.get()));
  k::RmsNorm<<<n, 256, 0, s>>>(qr.get(), c.q_lora_rank, w.q_norm, eps);
  V4_LAUNCH_CHECK(RmsNorm);
  RETURN_IF_ERROR(q.Alloc(n * h * hd));
  RETURN_IF_ERROR(Linear(qr.get(), n, w.wq_b, q.get()));
  k::RmsNorm<<<n * h, 128, 0, s>>>(q.get(), hd, nullptr, eps);
  V4_LAUNCH_CHECK(RmsNorm);
  RETURN_IF_ERROR(kv.Alloc(n * hd));
  RETURN_IF_ERROR(Linear(x, n, w.wkv, kv.get()));
  k::RmsNorm<<<n, 128, 0, s>>>(kv.get(), hd, w.kv_norm, eps);
  V4_LAUNCH_CHECK(RmsNorm);
  if (ratio > 0) {
    RETURN_IF_ERROR(ckv.Alloc(n * coff * hd));
    RETURN_IF_ERROR(cscore.Alloc(n * coff * hd));
    RETURN_IF_ERROR(Linear(x, n, w.compressor.wkv, ckv.get()));
    RETURN_IF_ERROR(Linear(x, n, w.compressor.wgate, cscore.get()));
  }
  if (csa) {
    RETURN_IF_ERROR(iq.Alloc(n * ih * id));
    RETURN_IF_ERROR(iw.Alloc(n * ih));
    RETURN_IF_ERROR(ikv.Alloc(n * coff * id));
    RETURN_IF_ERROR(iscore.Alloc(n * coff * id));
    RETURN_IF_ERROR(Linear(qr.get(), n, w.indexer_wq_b, iq.get()));
    RETURN_IF_ERROR(Linear(x, n, w.indexer_weights, iw.get()));
    RETURN_IF_ERROR(Linear(x, n, w.indexer_compressor.wkv, ikv.get()));
    RETURN_IF_ERROR(Linear(x, n, w.indexer_compressor.wgate, iscore.get()));
  }
  // Positions of the rows.
  std::vector<int64_t> pos(static_cast<size_t>(n));
  for (const ForwardSegment& seg : segments) {
    for (int64_t t = 0; t < seg.count; ++t) pos[seg.begin + t] = seg.state->position + t;
  }
  Buf<int64_t> d_pos(s);
  RETURN_IF_ERROR(d_pos.Upload(pos));
  k::Rope<<<Blocks(n * h * rd / 2, 256), 256, 0, s>>>(q.get(), n * h, hd, hd - rd, rd, d_pos.get(), h, inv,
                                                      false);
  V4_LAUNCH_CHECK(Rope);
  k::Rope<<<Blocks(n * rd / 2, 256), 256, 0, s>>>(kv.get(), n, hd, hd - rd, rd, d_pos.get(), 1, inv, false);
  V4_LAUNCH_CHECK(Rope);
  if (csa) {
    k::Rope<<<Blocks(n * ih * rd / 2, 256), 256, 0, s>>>(iq.get(), n * ih, id, id - rd, rd, d_pos.get(), ih,
                                                         inv, false);
    V4_LAUNCH_CHECK(Rope);
    const float iscale =
        static_cast<float>(1.0 / std::sqrt(static_cast<double>(id)) / std::sqrt(static_cast<double>(ih)));
    k::Scale<<<Blocks(n * ih, 256), 256, 0, s>>>(iw.get(), n * ih, iscale);
    V4_LAUNCH_CHECK(Scale);
  }
  RETURN_IF_ERROR(Mark(&counters_.s_attn_proj));
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
    const CompressJob main{&w.compressor, 0, hd, ckv.get(), cscore.get()};
    RETURN_IF_ERROR(Compress(main, layer, segments, copies, n_before, n, d_pos.get(), &late, finish));
    if (csa) {
      const CompressJob indexer{&w.indexer_compressor, 1, id, ikv.get(), iscore.get()};
      RETURN_IF_ERROR(Compress(indexer, layer, segments, copies, n_before, n, d_pos.get(), &late, finish));
    }
    for (size_t i = 0; i < ns; ++i) copies[i]->layers[static_cast<size_t>(layer)].n_entries = n_after[i];
  }
  // Key buffers: per segment its prior window keys (from the ring) then its own rows; its entries.
  std::vector<int64_t> win_start(static_cast<size_t>(n)), win_cnt(static_cast<size_t>(n)),
      ent_base(static_cast<size_t>(n)), vis(static_cast<size_t>(n));
  int64_t wk_rows = 0, ek_rows = 0, max_keys = 0, max_vis = 0;
  for (size_t i = 0; i < ns; ++i) {
    const ForwardSegment& seg = segments[i];
    const int64_t pos0 = seg.state->position, prior = std::min(pos0, win - 1);
    const int64_t n_ent = n_after[i];
    for (int64_t t = 0; t < seg.count; ++t) {
      const int64_t r = seg.begin + t, p = pos0 + t;
      const int64_t first = std::max<int64_t>(p - win + 1, pos0 - prior);
      win_start[r] = wk_rows + (first - (pos0 - prior));
      win_cnt[r] = p - first + 1;
      ent_base[r] = ek_rows;
      vis[r] = ratio > 0 ? std::min((p + 1) / ratio, n_ent) : 0;
      max_vis = std::max(max_vis, vis[r]);
      max_keys = std::max(max_keys, win_cnt[r] + (csa ? std::min(vis[r], c.index_topk) : vis[r]));
    }
    wk_rows += prior + seg.count;
    ek_rows += n_ent;
  }
  Buf<float> wk(s), ek(s), ik(s);
  RETURN_IF_ERROR(wk.Alloc(wk_rows * hd));
  RETURN_IF_ERROR(ek.Alloc(ek_rows * hd));
  if (csa) RETURN_IF_ERROR(ik.Alloc(ek_rows * id));
  // Filled on the device from the states' device copies, in the launch that also moves `late`.
  {
    int64_t wo = 0, eo = 0;
    for (size_t i = 0; i < ns; ++i) {
      const ForwardSegment& seg = segments[i];
      const DeviceStateCache::Layer& dl = copies[i]->layers[static_cast<size_t>(layer)];
      const int64_t pos0 = seg.state->position, prior = std::min(pos0, win - 1);
      if (prior > 0) {  // Ring slots of positions pos0 - prior .. pos0 - 1: one run, or two if it wraps.
        const int64_t s0 = (pos0 - prior) % win, run = std::min(prior, win - s0);
        late.push_back({dl.window + s0 * hd, wk.get() + wo * hd, run * hd});
        late.push_back({dl.window, wk.get() + (wo + run) * hd, (prior - run) * hd});
      }
      late.push_back({kv.get() + seg.begin * hd, wk.get() + (wo + prior) * hd, seg.count * hd});
      wo += prior + seg.count;
      late.push_back({dl.entries, ek.get() + eo * hd, n_after[i] * hd});
      if (csa) late.push_back({dl.keys, ik.get() + eo * id, n_after[i] * id});
      eo += n_after[i];
    }
  }
  RETURN_IF_ERROR(CopySpans(late, s));
  counters_.kv_bytes += (wk_rows * hd + ek_rows * hd + (csa ? ek_rows * id : 0)) * 4;
  RETURN_IF_ERROR(Mark(&counters_.s_attn_host));
  Buf<int64_t> d_ws(s), d_wc(s), d_eb(s), d_vis(s);
  RETURN_IF_ERROR(d_ws.Upload(win_start));
  RETURN_IF_ERROR(d_wc.Upload(win_cnt));
  RETURN_IF_ERROR(d_eb.Upload(ent_base));
  RETURN_IF_ERROR(d_vis.Upload(vis));
  Buf<float> sc(s);
  Buf<int32_t> sel(s), sel_cnt(s);
  if (csa && max_vis > 0) {
    RETURN_IF_ERROR(sc.Alloc(n * max_vis));
    // Enough blocks to fill the GPU at small batches (a warp per entry at most); one per row when long.
    const int64_t chunks = std::clamp<int64_t>(Blocks(2 * 132, n), 1, Blocks(max_vis, 8));
    k::IndexerScores<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(chunks)), 256,
                       k::IndexerScoresSmem(ih, id, 8), s>>>(iq.get(), iw.get(), ik.get(), d_eb.get(),
                                                             d_vis.get(), ih, id, max_vis, sc.get());
    V4_LAUNCH_CHECK(IndexerScores);
    RETURN_IF_ERROR(sel.Alloc(n * c.index_topk));
    RETURN_IF_ERROR(sel_cnt.Alloc(n));
    k::TopK<<<n, 256, 0, s>>>(sc.get(), max_vis, d_vis.get(), c.index_topk, sel.get(), sel_cnt.get());
    V4_LAUNCH_CHECK(TopK);
    for (int64_t r = 0; r < n; ++r) counters_.attention_flops += 2.0 * vis[r] * ih * id;
  }
  Buf<float> o(s);
  RETURN_IF_ERROR(o.Alloc(n * h * hd));
  const size_t smem = static_cast<size_t>((hd + std::max<int64_t>(max_keys, 1)) * 4);
  if (smem > smem_optin_) {
    return absl::UnimplementedError(absl::StrCat("attention over ", max_keys, " keys exceeds shared memory"));
  }
  const bool use_entries = ratio > 0 && max_vis > 0;
  k::Attention<<<n * h, 256, smem, s>>>(
      q.get(), wk.get(), ek.get(), d_ws.get(), d_wc.get(), use_entries ? d_eb.get() : nullptr, d_vis.get(),
      csa && use_entries ? sel.get() : nullptr, sel_cnt.get(), c.index_topk, w.attn_sink, h, hd,
      1.0f / std::sqrt(static_cast<float>(hd)), o.get());
  V4_LAUNCH_CHECK(Attention);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t keys = win_cnt[r] + (csa ? std::min(vis[r], c.index_topk) : vis[r]);
    counters_.attention_flops += 4.0 * keys * hd * h;
  }
  k::Rope<<<Blocks(n * h * rd / 2, 256), 256, 0, s>>>(o.get(), n * h, hd, hd - rd, rd, d_pos.get(), h, inv,
                                                      true);
  V4_LAUNCH_CHECK(Rope);
  // Each segment's last `win` rows into its device ring (after the attention read the old ring, in stream
  // order), and at the end of the forward into the host ring.
  std::vector<CopySpan> ring_spans;
  for (size_t i = 0; i < ns; ++i) {
    const ForwardSegment& seg = segments[i];
    float* ring = copies[i]->layers[static_cast<size_t>(layer)].window;
    const int64_t t0 = std::max<int64_t>(0, seg.count - win), rows = seg.count - t0;
    const int64_t s0 = (seg.state->position + t0) % win, run = std::min(rows, win - s0);
    ring_spans.push_back({kv.get() + (seg.begin + t0) * hd, ring + s0 * hd, run * hd});
    ring_spans.push_back({kv.get() + (seg.begin + t0 + run) * hd, ring, (rows - run) * hd});
  }
  RETURN_IF_ERROR(CopySpans(ring_spans, s));
  ASSIGN_OR_RETURN(const std::vector<const float*> tails, DownloadTails(kv.get(), hd, segments, win));
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
  RETURN_IF_ERROR(Mark(&counters_.s_attn_kernels));
  // Grouped low-rank output projection, then wo_b.
  const int64_t g = c.o_groups, rank = c.o_lora_rank, gin = h * hd / g;
  Buf<float> mid(s);
  RETURN_IF_ERROR(mid.Alloc(n * g * rank));
  RETURN_IF_ERROR(LinearBatched(o.get(), n, h * hd, gin, w.wo_a, g, g * rank, mid.get()));
  RETURN_IF_ERROR(Linear(mid.get(), n, w.wo_b, out));  // Scratch is freed in stream order.
  return Mark(&counters_.s_attn_out);
}

absl::Status CudaBackend::ExpertGemmDevice(const Mat& w, int64_t groups, bool narrow, const float* xin,
                                           const int32_t* active, const int32_t* n_active,
                                           const int32_t* d_start, const int32_t* d_count, float* y) const {
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, 8)));
  if (w.fp4) {
    // 4 output rows per warp, 4 warps per block.
    constexpr int kRows = 4;
    const dim3 g4(static_cast<unsigned>(groups), static_cast<unsigned>(Blocks(w.out, 4 * kRows)));
    const uint8_t* codes = static_cast<const uint8_t*>(w.p);
    if (narrow) {
      k::GroupedGemvFp4<kRows, 2>
          <<<g4, 128, 0, stream_>>>(xin, codes, w.scales, active, n_active, d_start, d_count, w.in, w.out, y);
    } else {
      k::GroupedGemvFp4<kRows, k::kMaxGroupRows>
          <<<g4, 128, 0, stream_>>>(xin, codes, w.scales, active, n_active, d_start, d_count, w.in, w.out, y);
    }
  } else if (w.bf16) {
    k::GroupedGemv<k::kBf16>
        <<<grid, 256, 0, stream_>>>(xin, w.p, active, n_active, d_start, d_count, w.in, w.out, y);
  } else {
    k::GroupedGemv<k::kF32>
        <<<grid, 256, 0, stream_>>>(xin, w.p, active, n_active, d_start, d_count, w.in, w.out, y);
  }
  V4_LAUNCH_CHECK(GroupedGemv);
  return absl::OkStatus();
}

absl::Status CudaBackend::ExpertGemmHost(const Mat& w, const float* xin, const std::vector<int32_t>& g_expert,
                                         const std::vector<int32_t>& g_off, const std::vector<int32_t>& g_cnt,
                                         float* y) const {
  const int64_t out = w.out, in = w.in;
  const int64_t groups = static_cast<int64_t>(g_expert.size());
  if (groups == 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  const bool lowp = w.bf16 || w.fp4;  // MXFP4 experts are dequantized to BF16 per expert, then cuBLAS.
  const cudaDataType_t type = lowp ? CUDA_R_16BF : CUDA_R_32F;
  const void* x = xin;
  Buf<__nv_bfloat16> wdq(stream_);
  if (w.fp4) RETURN_IF_ERROR(wdq.Alloc(out * in));
  if (lowp) {
    const int64_t rows = g_off.back() + g_cnt.back();
    RETURN_IF_ERROR(act_bf16_->Alloc(rows * in));
    k::ToBf16<<<Blocks(rows * in, 256), 256, 0, stream_>>>(xin, rows * in, act_bf16_->get());
    V4_LAUNCH_CHECK(ToBf16);
    x = act_bf16_->get();
  }
  const int64_t esz = lowp ? 2 : 4;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const char* wp = static_cast<const char*>(w.p) + g_expert[gi] * out * in * esz;
    if (w.fp4) {
      const int64_t blocks = out * in / 32;
      k::Mxfp4ToBf16<<<Blocks(blocks, 256), 256, 0, stream_>>>(
          static_cast<const uint8_t*>(w.p) + g_expert[gi] * out * in / 2, w.scales + g_expert[gi] * blocks,
          blocks, wdq.get());
      V4_LAUNCH_CHECK(Mxfp4ToBf16);
      wp = reinterpret_cast<const char*>(wdq.get());
    }
    const char* xp = static_cast<const char*>(x) + static_cast<int64_t>(g_off[gi]) * in * esz;
    V4_CUBLAS_RETURN_IF_ERROR(
        blas_api_->gemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), g_cnt[gi],
                        static_cast<int>(in), &alpha, wp, type, static_cast<int>(in), xp, type,
                        static_cast<int>(in), &beta, y + static_cast<int64_t>(g_off[gi]) * out, CUDA_R_32F,
                        static_cast<int>(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  return absl::OkStatus();
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
  k::Route<<<n, 128, 3 * ne * 4, s>>>(logits.get(), ne, kk, c.scoring_func == "sigmoid",
                                      hash ? nullptr : w.gate_bias, hash ? w.tid2eid : nullptr, d_tokens,
                                      static_cast<float>(c.routed_scaling_factor), sel.get(), wts.get());
  V4_LAUNCH_CHECK(Route);
  // Shared expert over every row, straight into `out`.
  Buf<float> g(s), u(s);
  RETURN_IF_ERROR(g.Alloc(n * inter));
  RETURN_IF_ERROR(u.Alloc(n * inter));
  RETURN_IF_ERROR(Linear(x, n, w.s1, g.get()));
  RETURN_IF_ERROR(Linear(x, n, w.s3, u.get()));
  k::SwiGlu<<<Blocks(n * inter, 256), 256, 0, s>>>(g.get(), u.get(), n, inter, nullptr, lim);
  V4_LAUNCH_CHECK(SwiGlu);
  RETURN_IF_ERROR(Linear(g.get(), n, w.s2, out));
  const int64_t slots = n * kk;
  int32_t* touched = touched_ + layer * ne;
  if (slots <= 2048 && GemvFits(w.w1) && GemvFits(w.w2)) {
    // Decode-sized: permutation and expert GEMVs on the device, no host round trip.
    Buf<int32_t> cnt(s), start(s), perm(s), row_slots(s), active(s), n_active(s);
    Buf<float> slot_w(s), xin(s), eg(s), eu(s), ey(s);
    RETURN_IF_ERROR(cnt.Alloc(ne));
    RETURN_IF_ERROR(start.Alloc(ne));
    RETURN_IF_ERROR(perm.Alloc(slots));
    RETURN_IF_ERROR(row_slots.Alloc(slots));
    RETURN_IF_ERROR(slot_w.Alloc(slots));
    RETURN_IF_ERROR(active.Alloc(ne));
    RETURN_IF_ERROR(n_active.Alloc(1));
    k::Permute<<<1, 256, 2 * ne * 4, s>>>(sel.get(), wts.get(), n, kk, ne, cnt.get(), start.get(), perm.get(),
                                          slot_w.get(), row_slots.get(), touched, active.get(),
                                          n_active.get());
    V4_LAUNCH_CHECK(Permute);
    RETURN_IF_ERROR(xin.Alloc(slots * d));
    k::GatherRows<<<slots, 256, 0, s>>>(x, perm.get(), d, xin.get());
    V4_LAUNCH_CHECK(GatherRows);
    RETURN_IF_ERROR(eg.Alloc(slots * inter));
    RETURN_IF_ERROR(eu.Alloc(slots * inter));
    RETURN_IF_ERROR(ey.Alloc(slots * d));
    const int64_t groups = std::min(ne, slots);  // At most this many experts have rows.
    const bool narrow = slots <= ne;
    RETURN_IF_ERROR(ExpertGemmDevice(w.w1, groups, narrow, xin.get(), active.get(), n_active.get(),
                                     start.get(), cnt.get(), eg.get()));
    RETURN_IF_ERROR(ExpertGemmDevice(w.w3, groups, narrow, xin.get(), active.get(), n_active.get(),
                                     start.get(), cnt.get(), eu.get()));
    k::SwiGlu<<<Blocks(slots * inter, 256), 256, 0, s>>>(eg.get(), eu.get(), slots, inter, slot_w.get(), lim);
    V4_LAUNCH_CHECK(SwiGlu);
    RETURN_IF_ERROR(ExpertGemmDevice(w.w2, groups, narrow, eg.get(), active.get(), n_active.get(),
                                     start.get(), cnt.get(), ey.get()));
    k::CombineExperts<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(Blocks(d, 256))), 256, 0, s>>>(
        out, ey.get(), row_slots.get(), kk, d);
    V4_LAUNCH_CHECK(CombineExperts);
    return absl::OkStatus();
  }
  // Token permutation on the host: slots grouped by expert (rows in order within an expert).
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
    std::vector<std::pair<int32_t, int32_t>> mine;  // (expert, slot)
    for (int64_t j = 0; j < kk; ++j) {
      const int32_t e = h_sel[r * kk + j];
      const int32_t slot = fill[e]++;
      perm[slot] = static_cast<int32_t>(r);
      slot_w[slot] = h_wts[r * kk + j];
      mine.emplace_back(e, slot);
    }
    std::sort(mine.begin(), mine.end());
    for (int64_t j = 0; j < kk; ++j) row_slots[r * kk + j] = mine[j].second;
  }
  std::vector<int32_t> g_expert, g_off, g_cnt;
  for (int64_t e = 0; e < ne; ++e) {
    if (count[e] == 0) continue;
    g_expert.push_back(static_cast<int32_t>(e));
    g_off.push_back(start[e]);
    g_cnt.push_back(count[e]);
  }
  V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(touched, count.data(), ne * 4, cudaMemcpyHostToDevice, s));
  Buf<int32_t> d_perm(s), d_row_slots(s);
  Buf<float> d_slot_w(s), xin(s), eg(s), eu(s), ey(s);
  RETURN_IF_ERROR(d_perm.Upload(perm));
  RETURN_IF_ERROR(d_row_slots.Upload(row_slots));
  RETURN_IF_ERROR(d_slot_w.Upload(slot_w));
  RETURN_IF_ERROR(xin.Alloc(slots * d));
  k::GatherRows<<<slots, 256, 0, s>>>(x, d_perm.get(), d, xin.get());
  V4_LAUNCH_CHECK(GatherRows);
  RETURN_IF_ERROR(eg.Alloc(slots * inter));
  RETURN_IF_ERROR(eu.Alloc(slots * inter));
  RETURN_IF_ERROR(ey.Alloc(slots * d));
  RETURN_IF_ERROR(ExpertGemmHost(w.w1, xin.get(), g_expert, g_off, g_cnt, eg.get()));
  RETURN_IF_ERROR(ExpertGemmHost(w.w3, xin.get(), g_expert, g_off, g_cnt, eu.get()));
  k::SwiGlu<<<Blocks(slots * inter, 256), 256, 0, s>>>(eg.get(), eu.get(), slots, inter, d_slot_w.get(), lim);
  V4_LAUNCH_CHECK(SwiGlu);
  RETURN_IF_ERROR(ExpertGemmHost(w.w2, eg.get(), g_expert, g_off, g_cnt, ey.get()));
  k::CombineExperts<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(Blocks(d, 256))), 256, 0, s>>>(
      out, ey.get(), d_row_slots.get(), kk, d);
  V4_LAUNCH_CHECK(CombineExperts);
  return absl::OkStatus();  // Pageable uploads are staged before cudaMemcpyAsync returns.
}

absl::StatusOr<std::vector<float>> CudaBackend::Forward(absl::Span<const ForwardSegment> segments,
                                                        absl::Span<const int32_t> tokens,
                                                        absl::Span<const int64_t> logit_rows,
                                                        std::vector<float>* final_streams) const {
  const ModelConfig& c = c_;
  const int64_t n = static_cast<int64_t>(tokens.size()), d = c.hidden_size, hc = c.hc_mult;
  counters_ = ForwardCounters{};
  cudaStream_t s = stream_;
  V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(touched_, 0, c.num_hidden_layers * c.n_routed_experts * 4, s));
  Buf<int32_t> d_tok(s);
  RETURN_IF_ERROR(d_tok.Upload(tokens.data(), n));
  Buf<float> streams(s), collapsed(s), sub(s), post(s), comb(s);
  RETURN_IF_ERROR(streams.Alloc(n * hc * d));
  RETURN_IF_ERROR(collapsed.Alloc(n * d));
  RETURN_IF_ERROR(sub.Alloc(n * d));
  RETURN_IF_ERROR(post.Alloc(n * hc));
  RETURN_IF_ERROR(comb.Alloc(n * hc * hc));
  k::Embed<<<n, 256, 0, s>>>(d_tok.get(), embed_.p, embed_.bf16, hc, d, streams.get());
  V4_LAUNCH_CHECK(Embed);
  arena_.Reset();  // The previous forward's copies to it have completed (it synchronized).
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
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerW& w = layers_[static_cast<size_t>(l)];
    RETURN_IF_ERROR(HcPre(w.hc_attn, streams.get(), n, collapsed.get(), post.get(), comb.get()));
    k::RmsNorm<<<n, 256, 0, s>>>(collapsed.get(), d, w.attn_norm, c.rms_norm_eps);
    V4_LAUNCH_CHECK(RmsNorm);
    RETURN_IF_ERROR(Mark(&counters_.s_mhc));
    RETURN_IF_ERROR(Attention(w, l, segments, copies, collapsed.get(), n, sub.get(), &finish));
    k::HcPost<<<Blocks(n * d, 256), 256, 0, s>>>(streams.get(), sub.get(), post.get(), comb.get(), n,
                                                 static_cast<int>(hc), d);
    V4_LAUNCH_CHECK(HcPost);
    RETURN_IF_ERROR(HcPre(w.hc_ffn, streams.get(), n, collapsed.get(), post.get(), comb.get()));
    k::RmsNorm<<<n, 256, 0, s>>>(collapsed.get(), d, w.ffn_norm, c.rms_norm_eps);
    V4_LAUNCH_CHECK(RmsNorm);
    RETURN_IF_ERROR(Mark(&counters_.s_mhc));
    RETURN_IF_ERROR(Moe(w, l, c.is_hash_layer(l), collapsed.get(), d_tok.get(), n, sub.get()));
    RETURN_IF_ERROR(Mark(&counters_.s_moe));
    k::HcPost<<<Blocks(n * d, 256), 256, 0, s>>>(streams.get(), sub.get(), post.get(), comb.get(), n,
                                                 static_cast<int>(hc), d);
    V4_LAUNCH_CHECK(HcPost);
    counters_.activation_bytes += n * hc * d * 4 * 6;  // Two sites: read for the mixes, read + write post.
    RETURN_IF_ERROR(Mark(&counters_.s_mhc));
  }
  // Final collapse, norm and head for the requested rows.
  const int64_t m = static_cast<int64_t>(logit_rows.size());
  Buf<float> picked(s), hidden(s), mixes(s), rs(s), logits(s);
  RETURN_IF_ERROR(picked.Alloc(m * hc * d));
  for (int64_t i = 0; i < m; ++i) {
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(picked.get() + i * hc * d, streams.get() + logit_rows[i] * hc * d,
                                            hc * d * 4, cudaMemcpyDeviceToDevice, s));
  }
  RETURN_IF_ERROR(mixes.Alloc(m * hc));
  RETURN_IF_ERROR(rs.Alloc(m));
  RETURN_IF_ERROR(hidden.Alloc(m * d));
  RETURN_IF_ERROR(Linear(picked.get(), m, hc_head_.fn, mixes.get()));
  k::RowRsqrt<<<m, 1024, 0, s>>>(picked.get(), hc * d, c.rms_norm_eps, rs.get());
  V4_LAUNCH_CHECK(RowRsqrt);
  k::HcHeadMix<<<m, 256, 0, s>>>(mixes.get(), rs.get(), hc_head_.base, hc_head_.scale, static_cast<int>(hc),
                                 static_cast<float>(c.hc_eps), picked.get(), d, hidden.get());
  V4_LAUNCH_CHECK(HcHeadMix);
  k::RmsNorm<<<m, 256, 0, s>>>(hidden.get(), d, norm_, c.rms_norm_eps);
  V4_LAUNCH_CHECK(RmsNorm);
  RETURN_IF_ERROR(logits.Alloc(m * c.vocab_size));
  RETURN_IF_ERROR(Linear(hidden.get(), m, head_, logits.get()));
  // Decode-sized logits go through page-locked memory (a pageable copy of batch 64's 33 MB ran at a few
  // GB/s); larger ones (every row of a long prefill) straight to pageable memory.
  const int64_t nl = m * c.vocab_size;
  constexpr int64_t kPinnedFloats = int64_t{64} << 20;  // 256 MiB.
  const float* pinned = nullptr;
  std::vector<float> out;
  if (nl <= kPinnedFloats) {
    ASSIGN_OR_RETURN(float* p, arena_.Take(nl));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(p, logits.get(), nl * 4, cudaMemcpyDeviceToHost, s));
    pinned = p;
  } else {
    RETURN_IF_ERROR(logits.Download(&out));
  }
  if (final_streams != nullptr) RETURN_IF_ERROR(streams.Download(final_streams));
  // The forward's one synchronization; then the host states take what it computed, in order.
  RETURN_IF_ERROR(Sync());
  for (const std::function<void()>& f : finish) f();
  for (const ForwardSegment& seg : segments) seg.state->position += seg.count;
  std::move(abort_copies).Cancel();
  state_cache_->Commit();
  if (pinned != nullptr) out.assign(pinned, pinned + nl);
  RETURN_IF_ERROR(Mark(&counters_.s_head));
  return out;
}

}  // namespace

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

absl::StatusOr<std::vector<int32_t>> ArgmaxRows(const std::vector<float>& logits, int64_t rows,
                                                int64_t cols) {
  if (rows * cols != static_cast<int64_t>(logits.size()) || rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError("ArgmaxRows: logits size is not rows * cols");
  }
  Buf<float> x(nullptr);
  Buf<int32_t> out(nullptr);
  RETURN_IF_ERROR(x.Upload(logits));
  RETURN_IF_ERROR(out.Alloc(rows));
  k::ArgmaxRows<<<rows, 1024>>>(x.get(), cols, out.get());
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

absl::StatusOr<std::vector<float>> Linear(const std::vector<float>& x, int64_t m, int64_t in,
                                          const std::vector<float>& w, int64_t out, CudaWeights format) {
  if (static_cast<int64_t>(x.size()) != m * in || static_cast<int64_t>(w.size()) != out * in) {
    return absl::InvalidArgumentError("Linear: sizes do not match");
  }
  CudaBackend b(ModelConfig{}, format);  // Runtime only, no model weights.
  RETURN_IF_ERROR(b.InitRuntime());
  Mat mat;
  RETURN_IF_ERROR(b.Put(w.data(), out, in, format == CudaWeights::kBf16, WInit::kHost, &mat));
  Buf<float> dx(b.stream()), dy(b.stream());
  RETURN_IF_ERROR(dx.Upload(x));
  RETURN_IF_ERROR(dy.Alloc(m * out));
  RETURN_IF_ERROR(b.Linear(dx.get(), m, mat, dy.get()));
  std::vector<float> y;
  RETURN_IF_ERROR(dy.Download(&y));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(b.stream()));
  return y;
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
