// The CUDA backend's internals, shared by its translation units: model/cuda/cuda_backend.cu (runtime,
// weights, entry points), cuda_forward.cu (the forward loop, its CUDA graphs, mHC and the head),
// cuda_attention.cu (attention and the compressors), cuda_moe.cu (routing and the expert GEMMs) and
// cuda_linear.cu (the linear layers). Not a public header: model/cuda/cuda_backend.h is.
//
// Kernels (cuda_kernels.cuh) have internal linkage, so each unit has its own copy of the ones it launches;
// a kernel's attributes (dynamic shared memory) must be set in the unit that launches it.
#ifndef V4SERVE_MODEL_CUDA_CUDA_BACKEND_IMPL_CUH_
#define V4SERVE_MODEL_CUDA_CUDA_BACKEND_IMPL_CUH_

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/cpu/compressor.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/cuda/cuda_backend.h"
#include "model/cuda/cuda_check.h"
#include "model/cuda/device_state_cache.h"
#include "model/cuda/launch.cuh"
#include "model/cuda/paged_rows.h"
#include "model/sequence_state.h"
#include "services/status_macros.h"

namespace v4serve::model::cuda::impl {

inline absl::Status CublasStatus(cublasStatus_t s, const char* call, const char* file, int line) {
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

inline int64_t Blocks(int64_t n, int64_t t) { return (n + t - 1) / t; }

// cuBLAS is opened at run time (cuda_backend.cu, Cublas()), when the first CUDA backend is made, not linked:
// libcublasLt's 94 KB of initial TLS, when loaded at process start, made civetweb's (prometheus-cpp's) thread
// creation fail in every v4serve process, GPU or not. Opened with dlopen its TLS is allocated per thread on
// first use.
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  // Optional: a workspace of ours, so that GEMMs captured into CUDA graphs do not each allocate one.
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  // The C entry points (C++ also sees inline overloads taking cudaDataType as the compute type).
  cublasStatus_t (*gemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                         const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                         cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*gemm_strided_batched)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                         const void*, const void*, cudaDataType, int, long long, const void*,
                                         cudaDataType, int, long long, const void*, void*, cudaDataType, int,
                                         long long, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  // cuBLASLt, for the FP8 GEMMs with block scales (LinearFp8). `lt_ok` false when the library lacks them.
  bool lt_ok = false;
  decltype(&cublasLtCreate) lt_create = nullptr;
  decltype(&cublasLtDestroy) lt_destroy = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
};

// One cuBLASLt FP8 GEMM shape's descriptors and algorithm (LinearFp8), made on first use and kept.
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

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
    if (frozen_ != nullptr && *frozen_) {
      return absl::FailedPreconditionError("a scratch buffer would move during a CUDA graph capture");
    }
    // The new block first: a failed allocation leaves the buffer as it was.
    T* p = nullptr;
    V4_CUDA_RETURN_IF_ERROR(
        cudaMallocAsync(reinterpret_cast<void**>(&p), std::max<int64_t>(1, n) * sizeof(T), s_));
    if (p_ != nullptr) cudaFreeAsync(p_, s_);
    p_ = p;
    cap_ = n_ = n;
    if (moves_ != nullptr) ++*moves_;
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
  // For scratch that CUDA graphs hold by address (CudaBackend::Section): each move (a larger Alloc) counts
  // in `*moves` (graphs captured before it are stale), and a move while `*frozen` (a capture is running) is
  // refused: FAILED_PRECONDITION, nothing changed.
  void Track(uint64_t* moves, const bool* frozen) {
    moves_ = moves;
    frozen_ = frozen;
  }

 private:
  cudaStream_t s_;
  T* p_ = nullptr;
  int64_t n_ = 0, cap_ = 0;
  uint64_t* moves_ = nullptr;
  const bool* frozen_ = nullptr;
};

// A forward's activations that cross from one section of CUDA-graph-capturable work to the attention core
// between them (CudaBackend::Run): tokens and positions, the residual streams and mHC mixes, the attention
// projections the core reads (q, kv, the compressors' rows, the indexer's queries and weights) and its
// output `o`. Decode-sized forwards keep one set at fixed addresses, which their graphs record.
struct StepBuffers {
  explicit StepBuffers(cudaStream_t s)
      : tok(s),
        pos(s),
        streams(s),
        collapsed(s),
        sub(s),
        post(s),
        comb(s),
        q(s),
        kv(s),
        ckv(s),
        cscore(s),
        iq(s),
        iw(s),
        ikv(s),
        iscore(s),
        o(s) {}
  // Sizes every buffer for `n` rows (addresses stay while n is within what was reserved before).
  absl::Status Reserve(const ModelConfig& c, int64_t n) {
    const int64_t d = c.hidden_size, hc = c.hc_mult, h = c.num_attention_heads, hd = c.head_dim;
    const int64_t ih = c.index_n_heads, id = c.index_head_dim;
    RETURN_IF_ERROR(tok.Alloc(n));
    RETURN_IF_ERROR(pos.Alloc(n));
    RETURN_IF_ERROR(streams.Alloc(n * hc * d));
    RETURN_IF_ERROR(collapsed.Alloc(n * d));
    RETURN_IF_ERROR(sub.Alloc(n * d));
    RETURN_IF_ERROR(post.Alloc(n * hc));
    RETURN_IF_ERROR(comb.Alloc(n * hc * hc));
    RETURN_IF_ERROR(q.Alloc(n * h * hd));
    RETURN_IF_ERROR(kv.Alloc(n * hd));
    RETURN_IF_ERROR(ckv.Alloc(n * 2 * hd));  // Two (overlapping) windows' rows in CSA layers.
    RETURN_IF_ERROR(cscore.Alloc(n * 2 * hd));
    RETURN_IF_ERROR(iq.Alloc(n * ih * id));
    RETURN_IF_ERROR(iw.Alloc(n * ih));
    RETURN_IF_ERROR(ikv.Alloc(n * 2 * id));
    RETURN_IF_ERROR(iscore.Alloc(n * 2 * id));
    return o.Alloc(n * h * hd);
  }
  Buf<int32_t> tok;
  Buf<int64_t> pos;
  Buf<float> streams, collapsed, sub, post, comb;
  Buf<float> q, kv, ckv, cscore, iq, iw, ikv, iscore, o;
};

// A weight matrix [out, in] (row-major, as checkpoints store it): FP32, BF16, MXFP4 (`fp4`: e2m1 codes
// two per byte in `p`, one e8m0 scale per 32 elements of a row in `scales`) or FP8 (`fp8`: e4m3 codes in `p`,
// one power-of-two FP32 scale per 128 x 128 tile in `tile_scales` [ceil(out / 128), in / 128], the layout
// cuBLASLt's BLK128x128_32F mode reads; model/cuda/fp8_gemm.cuh).
struct Mat {
  void* p = nullptr;
  int64_t out = 0, in = 0;
  bool bf16 = false;
  bool fp4 = false;
  bool fp8 = false;
  uint8_t* scales = nullptr;
  float* tile_scales = nullptr;
  int64_t bytes() const {
    if (fp4) return out * in / 2 + out * in / 32;
    if (fp8) return out * in + (out + 127) / 128 * (in / 128) * 4;
    return out * in * (bf16 ? 2 : 4);
  }
};

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

// One attention launch (cuda_attention.cu): per token row, window keys wk[win_start .. + win_cnt) then its
// selected entries (`sel` [n, topk], `sel_cnt`) or, with sel null, every visible entry s < vis, entry s at
// ek.Row(ent_base, s) (the row's sequence's pages start at ek.pages[ent_base]; ent_base null: no entries),
// and the per-head sink. Keys are the values. `max_keys` bounds a row's keys.
struct AttentionArgs {
  const float *q, *wk;
  kernels::PagedRows ek;
  const int64_t *win_start, *win_cnt, *ent_base, *vis;
  const int32_t *sel, *sel_cnt;
  int64_t topk;
  const float* sink;
  int64_t n, h, hd, max_keys;
  float scale;
  float* o;  // [n, h, hd]
};
// `tensor_cores`: kernels::AttentionMma (BF16 operands) where it is instantiated for (h, hd), else the FP32
// kernels::Attention, whose logits must fit `smem_optin` bytes of shared memory (UNIMPLEMENTED otherwise).
absl::Status LaunchAttention(const AttentionArgs& a, bool tensor_cores, size_t smem_optin, cudaStream_t s,
                             bool pdl);
// The lightning indexer's scores (cuda_attention.cu): sc[r, s] (row stride max_vis) for s < vis[r] from the
// row's ih query heads of id (`iq` [n, ih, id]), head weights `iw` [n, ih] and keys ik.Row(ent_base[r], s).
struct IndexerArgs {
  const float *iq, *iw;
  kernels::PagedRows ik;
  const int64_t *ent_base, *vis;
  int64_t n, ih, id, max_vis;
  float* sc;
};
// `tensor_cores`: kernels::IndexerScoresMma (BF16 operands) for id 128 and up to 64 heads, else the FP32
// kernels::IndexerScores.
absl::Status LaunchIndexerScores(const IndexerArgs& a, bool tensor_cores, cudaStream_t s, bool pdl);
// Lets the tensor-core kernels take the shared memory they need (per device; InitAttentionKernels calls it).
absl::Status InitAttentionMma();

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

// The decode path's expert kernels: for MXFP4 experts, the grouped GEMV on tensor cores (GroupedGemvFp4Mma:
// weights read once per 8 rows of an expert) or the tensor-core grouped GEMM (GroupedGemmFp4: once per 64
// rows, but it streams them slower); the SIMT GEMVs reading each expert's weights once per 2 rows (narrow:
// experts with one or two rows, mostly) or per 8 rows, which the FP8-input mode, BF16/FP32 experts and
// inputs not a multiple of 128 wide run (kGemvMma falls back to them), and the bench compares.
enum class ExpertKernel { kGemvNarrow, kGemvWide, kGemvMma, kMma };
// Which one a decode step of `slots` (rows x experts per token) over `experts` routed experts runs;
// `mma_gemv`: the layer's experts take the GEMV on tensor cores. The bench's expert table
// (docs/PERFORMANCE.md): that GEMV beats the GEMM up to 6 rows an expert (1.4x there; V4's 256 experts: up to
// 256 decode rows), the SIMT GEMV only below 3.
inline ExpertKernel DecodeExpertKernel(int64_t slots, int64_t experts, bool mma_gemv) {
  const bool gemm = mma_gemv ? slots > 6 * experts : slots >= 3 * experts;
  return gemm ? ExpertKernel::kMma : ExpertKernel::kGemvMma;
}
// The SIMT GEMV for that many slots.
inline ExpertKernel SimtExpertKernel(int64_t slots, int64_t experts) {
  return slots <= 2 * experts ? ExpertKernel::kGemvNarrow : ExpertKernel::kGemvWide;
}

class CudaBackend final : public ForwardBackend {
 public:
  CudaBackend(const ModelConfig& c, CudaWeights format)
      : c_(c), bf16_(format != CudaWeights::kF32), fp8_(format == CudaWeights::kFp8) {}
  ~CudaBackend() override {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    DropGraphs();
    graph_bufs_.reset();
    act_bf16_.reset();  // These free on stream_, which must still exist.
    act_f16_.reset();
    act_f16_inv_.reset();
    act_fp8_.reset();
    act_fp8_scales_.reset();
    act_fp8_round_.reset();
    split_partial_.reset();
    top_logits_.reset();
    state_cache_.reset();
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (void* p : allocs_) cudaFree(p);
    if (blas_ != nullptr) blas_api_->destroy(blas_);
    for (auto& [key, plan] : lt_plans_) {
      blas_api_->layout_destroy(plan.a);
      blas_api_->layout_destroy(plan.b);
      blas_api_->layout_destroy(plan.d);
      blas_api_->desc_destroy(plan.op);
    }
    if (lt_ != nullptr) blas_api_->lt_destroy(lt_);
    if (lt_ws_ != nullptr) cudaFree(lt_ws_);
    if (blas_ws_ != nullptr) cudaFree(blas_ws_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::kCuda; }
  std::string Describe() const override {
    const bool fp4 = bf16_ && c_.expert_dtype == "fp4";
    return absl::StrFormat(
        "cuda: %s, %s weights%s, %.2f GiB on device, CUDA graphs %s%s%s%s", gpu_name_,
        fp8_    ? "fp8 (checkpoint fp8 linears) + bf16"
        : bf16_ ? "bf16"
                : "fp32",
        fp4 ? " (mxfp4 routed experts)" : "", static_cast<double>(weight_bytes_) / (1ull << 30),
        GraphsOn() ? absl::StrCat("for decode up to ", graph_max_rows_, " rows")
                   : absl::StrCat("off (", graphs_off_why_, ")"),
        rows_fp8_ && rows_f32_ ? ", row GEMMs"
        : rows_fp8_            ? ", FP8 row GEMMs"
        : rows_f32_            ? ", FP32 row GEMMs"
                               : "",
        pdl_ ? ", programmatic launch" : "", tf32x3_ ? ", 3xTF32 compressor GEMMs in prefill" : "");
  }

  absl::Status Init(const cpu::ModelWeights* w, const cpu::RopeTable* rope_main,
                    const cpu::RopeTable* rope_comp, uint64_t seed);
  // Stream, cuBLAS handle, memory pool and kernel attributes (Init calls it).
  absl::Status InitRuntime();
  // The attention kernels' shared memory limits (cuda_attention.cu, where they are launched).
  absl::Status InitAttentionKernels(const cudaDeviceProp& prop);
  // The MoE kernels' shared memory limits (cuda_moe.cu).
  absl::Status InitMoeKernels();
  // The linear kernels' shared memory limits (cuda_linear.cu).
  absl::Status InitLinearKernels();
  // Uploads (or, with host null, draws) a weight matrix.
  absl::Status Put(const float* host, int64_t out, int64_t in, bool bf16, WInit init, Mat* m);
  // Uploads (or, with host null, draws) a weight matrix as FP8 tiles (in a multiple of 128), quantized on the
  // device (kernels::QuantizeFp8Tiles; a checkpoint's FP8 weights come back exactly).
  absl::Status PutFp8(const float* host, int64_t out, int64_t in, Mat* m);
  // A linear weight in the backend's format: FP8 in the FP8 mode where the checkpoint stores it in FP8 (t
  // null: drawn, as the released checkpoints' FP8 linears) and in is a multiple of 128, else BF16 or FP32.
  absl::Status PutLinear(const cpu::Tensor* t, int64_t out, int64_t in, Mat* m);

  absl::StatusOr<std::vector<float>> Forward(absl::Span<const ForwardSegment> segments,
                                             absl::Span<const int32_t> tokens,
                                             absl::Span<const int64_t> logit_rows,
                                             std::vector<float>* final_streams) const override;
  // The argmax on the device (ArgmaxRows); only the ids come back.
  absl::StatusOr<std::vector<int32_t>> ForwardGreedy(absl::Span<const ForwardSegment> segments,
                                                     absl::Span<const int32_t> tokens,
                                                     absl::Span<const int64_t> logit_rows) const override;
  // The candidates and sums sampling reads (TopLogits) computed on the device; the logits stay there for
  // full_row until the next call.
  absl::StatusOr<TopLogits> ForwardTop(absl::Span<const ForwardSegment> segments,
                                       absl::Span<const int32_t> tokens, absl::Span<const int64_t> logit_rows,
                                       absl::Span<const float> temperatures, int64_t m) const override;
  // The pages go into a new device copy of `state` as they are (DeviceStateCache::Adopt).
  absl::Status AdoptKvPages(SequenceState* state, absl::Span<const absl::string_view> pages) const override {
    return state_cache_->Adopt(state, pages);
  }
  // What the head's logits of `logit_rows` become: copied to `logits`, argmaxed into `ids`, or reduced to
  // `top` (TopLogits at `temperatures` with `top_m` candidates a row). One of the three is set.
  struct Outputs {
    std::vector<float>* logits = nullptr;
    std::vector<int32_t>* ids = nullptr;
    TopLogits* top = nullptr;
    absl::Span<const float> temperatures;
    int64_t top_m = 0;
  };
  absl::Status Run(absl::Span<const ForwardSegment> segments, absl::Span<const int32_t> tokens,
                   absl::Span<const int64_t> logit_rows, std::vector<float>* final_streams,
                   const Outputs& outputs) const;

  // The last Forward's counters; the experts' share is read back from the device here.
  absl::StatusOr<ForwardCounters> Counters() const;
  // DeviceKvPage (cuda_backend.h).
  absl::StatusOr<std::string> KvPage(const SequenceState& state, int64_t block) const;

  // y[m, out] = x[m, in] W^T (x rows of stride ldx, y rows of stride ldy), FP32 out.
  absl::Status Linear(const float* x, int64_t m, const Mat& w, float* y) const;
  absl::Status LinearBatched(const float* x, int64_t m, int64_t ldx, int64_t stride_x, const Mat& w,
                             int64_t groups, int64_t ldy, float* y) const;
  // y_i = x W_i^T for FP32 weights W_i [out_i, in] that read one x [n, in] (the compressors' projections).
  // Outside the FP32 mode, from kTf32x3Rows rows (prefill; V4SERVE_CUDA_TF32X3=0 keeps SGEMM), each is three
  // TF32 tensor-core GEMMs on hi/lo parts (kernels::SplitTf32; x split once for all of them):
  // W_lo x_hi + W_hi x_lo + W_hi x_hi with FP32 accumulation (CUTLASS's "3xTF32"). The dropped W_lo x_lo and
  // the parts' rounding are ~2^-21 of each product, below the FP32 sum's own rounding at these depths, so
  // the result keeps FP32's accuracy (CudaKernelTest.Tf32x3KeepsFp32Accuracy). Else Linear for each. W is
  // split on each call into scratch (~15 us for a 16 MiB weight, against 2.4 ms of GEMMs a prefill): kept
  // split, it would double the compressors' FP32 weights on the device for every layer.
  struct F32Out {
    const Mat* w;
    float* y;
  };
  static constexpr int64_t kTf32x3Rows = 512;
  absl::Status LinearsF32(const float* x, int64_t n, std::initializer_list<F32Out> outs) const;
  // The FP8 GEMM: x quantized per row in blocks of 128 (model/cuda/fp8_gemm.cuh; SkinnyGemmFp8 quantizes as
  // it reads, the others take QuantizeFp8Blocks's codes). kAuto's choice by rows and weight size, from the
  // kernels timed side by side (docs/PERFORMANCE.md, "Session 17"; L2 flushed before each call):
  //   - weights of at least kRowsBigWeights codes (wq_b, wo_b: 32 MiB): SkinnyGemmFp8 for 1 row,
  //     RowsGemmFp8 for 2 to kRowsBigTo (12) rows, cuBLASLt above (wq_b at 8 rows: 18.6 us against the
  //     skinny kernel's 23.0 and cuBLASLt's 24.1; at 16 rows cuBLASLt 20.9 against 36.9);
  //   - smaller weights (shared expert 8 MiB, wq_a, wkv, indexer): SkinnyGemmFp8 up to kSkinnyRows (16),
  //     cuBLASLt above (the row kernel loses to the skinny one there: 13.9 against 11.3 us at 8 rows).
  // With V4SERVE_CUDA_ROWS_GEMM=1 or fp8, RowsGemmFp8 takes kRowsFrom (9) to kSkinnyMaxRows (64) rows of
  // every weight, SkinnyGemmFp8 the fewer. cuBLASLt runs on the rows up to a multiple of 4 (the 1-3 left, a
  // second pass over the weights, by ours: padding them is not written). Where cuBLASLt cannot (a library
  // without block scales, inputs of other than a multiple of 512, a refused shape) GemmFp8 takes the rows
  // above 64. `path` forces one (bench/, tests). ldx a multiple of 128, x 16-byte aligned. FP32 weights
  // (mixes, gate, compressors; every linear in the FP32 mode) on up to kRowsF32 rows take RowsGemmF32
  // (cuda_kernels.cuh) with V4SERVE_CUDA_ROWS_GEMM=1 or f32, cuBLAS otherwise.
  static constexpr int64_t kSkinnyRows = 16, kRowsFrom = 9, kRowsF32 = 64, kRowsBigTo = 12;
  static constexpr int64_t kRowsBigWeights = int64_t{16} << 20;
  absl::Status LinearF32Rows(const float* x, int64_t m, int64_t ldx, const Mat& w, int64_t ldy,
                             float* y) const;
  // A row GEMM's k split: `splits` so that `groups` feature groups of `kernel` (blocks of `threads`) fill
  // every SM with as many blocks as it holds at once (ResidentBlocks), each split at least `min_k` of the
  // `k_steps` (1 where the groups alone do, or are more than the counters), and above 1 the partial sums'
  // scratch for m x out outputs (split_partial_; null for 1). Filling by the occupancy, not a fixed 2 blocks
  // an SM, keeps a kernel that fits one block an SM (session 15's RowsGemmFp8 at 64 rows: ~185 registers) to
  // one wave.
  struct SplitK {
    int64_t splits = 1;
    float* partial = nullptr;
  };
  absl::StatusOr<SplitK> RowsSplitK(const void* kernel, int threads, int64_t groups, int64_t k_steps,
                                    int64_t min_k, int64_t m, int64_t out, size_t smem = 0) const;
  // Blocks of `threads` threads of `kernel` with `smem` bytes of dynamic shared memory one SM holds at once
  // (its registers and shared memory decide), asked of the runtime once a kernel.
  absl::StatusOr<int> ResidentBlocks(const void* kernel, int threads, size_t smem = 0) const;
  // RowsGemmFp8's warps a block (16 features each).
  static constexpr int kRowsWarps = 8;
  absl::Status LinearFp8(const float* x, int64_t m, int64_t ldx, const Mat& w, int64_t ldy, float* y,
                         Fp8Path path = Fp8Path::kAuto) const;
  // cuBLASLt runs this FP8 GEMM (scales: VEC128 for x, BLK128x128 for W, both FP32).
  bool LtServes(const Mat& w) const { return lt_ != nullptr && (w.in / 128) % 4 == 0; }
  cudaStream_t stream() const { return stream_; }
  // kernel<<<grid, block, smem, stream_>>>(args...), programmatic (launch.cuh) unless V4SERVE_CUDA_PDL=0:
  // every kernel of the forward goes through here, so each calls PdlEnter first.
  template <class... Params, class... Args>
  absl::Status Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) const {
    return LaunchKernel(pdl_, stream_, kernel, grid, block, smem, std::forward<Args>(args)...);
  }
  // Uploads n host values to `d` (resized to n) through this forward's page-locked memory (arena_): an
  // asynchronous copy, where a pageable source costs the driver a staging copy first. `h` may go on return.
  template <class T>
  absl::Status Stage(const T* h, int64_t n, Buf<T>* d) const {
    RETURN_IF_ERROR(d->Alloc(n));
    if (n == 0) return absl::OkStatus();
    const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
    ASSIGN_OR_RETURN(float* p, arena_.Take((bytes + 3) / 4));
    std::memcpy(p, h, static_cast<size_t>(bytes));
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d->get(), p, bytes, cudaMemcpyHostToDevice, stream_));
    return absl::OkStatus();
  }
  template <class T>
  absl::Status Stage(const std::vector<T>& h, Buf<T>* d) const {
    return Stage(h.data(), static_cast<int64_t>(h.size()), d);
  }
  // CopySpans with its span list staged in arena_.
  absl::Status StageCopySpans(const std::vector<CopySpan>& spans) const {
    ASSIGN_OR_RETURN(float* p, arena_.Take(static_cast<int64_t>(spans.size() * sizeof(CopySpan) / 4)));
    return CopySpans(spans, stream_, reinterpret_cast<CopySpan*>(p));
  }
  // Uploads (or, with host null, draws) MXFP4 weights, quantized from FP32 rows.
  absl::Status PutFp4(const float* host, int64_t out, int64_t in, Mat* m);
  // Expert GEMMs over slots grouped by expert, groups listed on the host (prefill-sized): g_cnt[i] rows of
  // expert g_expert[i] from row g_off[i] of xin [slots, w.in] to y [slots, w.out]. MXFP4: GroupedGemmFp4, one
  // launch; BF16/FP32: cuBLAS per expert.
  // Expert GEMMs over slots grouped by expert with the device's routing (decode path, no host round trip):
  // count[e] rows of expert e from row start[e] of xin [slots, w.in] for the active experts (active[0 ..
  // *n_active), at most `groups`); an expert has at most `max_rows` rows.
  absl::Status ExpertGemmDevice(const Mat& w, int64_t groups, ExpertKernel kernel, int64_t max_rows,
                                const float* xin, int64_t slots, const int32_t* active,
                                const int32_t* n_active, const int32_t* d_start, const int32_t* d_count,
                                float* y) const;
  // The MXFP4 GEMV on tensor cores (GroupedGemvFp4Mma) takes this matrix: MXFP4 with `in` a multiple of 128,
  // outside the FP8-input measurements.
  bool MmaGemvFits(const Mat& w) const { return w.fp4 && !Fp8Experts(w) && w.in % 128 == 0; }
  // x's rows (rows[r], or r where rows is null) for GroupedGemvFp4Mma: ToF16Rows into act_f16_ /
  // act_f16_inv_.
  absl::Status ToF16Input(const float* x, const int32_t* rows, int64_t n, int64_t in) const;
  // x[0..n) in BF16 in act_bf16_ (the BF16 GEMMs' inputs): the converted copy.
  absl::StatusOr<const __nv_bfloat16*> ToBf16Input(const float* x, int64_t n) const;
  // GroupedGemvFp4Mma over act_f16_ (ToF16Input's), routing as ExpertGemmDevice's. With w3, one launch takes
  // the gate (w) and up (w3) projections and writes SwiGLU(gate, up) (clamped at lim when lim > 0) times
  // slot_w[slot] (when given) to y: the decode MoE's first half.
  absl::Status GemvFp4Mma(const Mat& w, const Mat* w3, int64_t groups, const int32_t* active,
                          const int32_t* n_active, const int32_t* d_start, const int32_t* d_count, float* y,
                          const float* slot_w, float lim) const;
  // The MoE's token permutation on the device of `rows` rows of k selections (sel, wts [rows, k] on the
  // device) over ne experts, into p's buffers (allocated on this backend's stream); `touched` (may be null)
  // receives the counts too. Decode-sized (kernels::PermuteFits) with tile_rows 0: kernels::Permute, one
  // block. Otherwise (kernels::PermuteChunksFit) kernels::PermuteCount / PermuteScan / PermuteScatter, and
  // with tile_rows > 0 also the prefill GEMMs' tiles of up to tile_rows rows (p->tiles, p->max_tiles of them,
  // the ones past the last with 0 rows).
  struct DevicePermutation {
    explicit DevicePermutation(cudaStream_t s)
        : count(s), start(s), perm(s), row_slots(s), active(s), n_active(s), tiles(s), slot_w(s) {}
    Buf<int32_t> count, start, perm, row_slots, active, n_active, tiles;
    Buf<float> slot_w;
    int64_t max_tiles = 0;
  };
  absl::Status PermuteOnDevice(const int32_t* sel, const float* wts, int64_t rows, int64_t k, int64_t ne,
                               int32_t* touched, DevicePermutation* p, int32_t tile_rows = 0) const;
  // xin_bf16, where given, is xin already in BF16 (the MXFP4 GEMM with BF16 inputs reads it, xin unused).
  absl::Status ExpertGemmHost(const Mat& w, const float* xin, const std::vector<int32_t>& g_expert,
                              const std::vector<int32_t>& g_off, const std::vector<int32_t>& g_cnt, float* y,
                              const __nv_bfloat16* xin_bf16 = nullptr) const;
  // The MXFP4 expert GEMM on tensor cores over `rows` rows of xin: GroupedGemmFp4Fp8 (FP8 inputs) in the FP8
  // mode, GroupedGemmFp4 (BF16 inputs) otherwise.
  // `tiles`: kernels::ExpertTiles's seven pointers (host tiles: expert, row0, rows, grid (column blocks,
  // tiles), any number of tiles; or device routing: active, n_active, start, count, grid (experts, column
  // blocks, row tiles)), passed as such because that struct has internal linkage.
  absl::Status GroupedGemmFp4(const Mat& w, const float* xin, int64_t rows, const int32_t* const (&tiles)[7],
                              dim3 grid, float* y, const __nv_bfloat16* xin_bf16 = nullptr) const;
  // MXFP4 experts with FP8 inputs (GroupedGemmFp4Fp8; the GEMVs on FP8-rounded inputs): off in serving, where
  // the FP8 mode's experts take BF16 inputs, because our mma.sync kernel ran slower with FP8 inputs (the
  // per-value conversion to e4m3 costs more than the halved MMA count saves; docs/PERFORMANCE.md). On for
  // the tests and bench that measure it (set_fp8_expert_inputs).
  bool Fp8Experts(const Mat& w) const { return fp8_expert_inputs_ && w.fp4 && w.in % 128 == 0; }
  void set_fp8_expert_inputs(bool on) { fp8_expert_inputs_ = on; }
  // Host-tiled MXFP4 expert GEMMs with BF16 inputs (the prefill's) on wgmma (GroupedGemmFp4Wg, 128-row
  // tiles): on where the kernels were built for sm_90a and run on compute capability 9.x, unless
  // V4SERVE_CUDA_WGMMA=0; GroupedGemmFp4 (mma.sync, 64-row tiles) otherwise. set_wgmma(false): the tests
  // and bench that measure the mma.sync kernel on the same path.
  bool WgmmaExperts(const Mat& w) const { return wgmma_ && w.fp4 && !Fp8Experts(w); }
  // The rows of a host-listed tile of GroupedGemmFp4's kernel for w (kernels::kWgBm on wgmma, else kEgBm).
  int32_t ExpertTileRows(const Mat& w) const;
  // Whether the host-tiled expert GEMM of w reads BF16 inputs (MXFP4 on BF16 tensor cores, inputs a multiple
  // of 64): the prefill MoE then writes its inputs in BF16 only (GatherRowsBf16, SwiGlu's BF16 output).
  bool ExpertsTakeBf16(const Mat& w) const { return w.fp4 && !Fp8Experts(w) && w.in % 64 == 0; }
  void set_wgmma(bool on) { wgmma_ = on && wgmma_runs_; }
  // LinearsF32's 3xTF32 path on or off, from `min_rows` rows (the tests).
  void set_tf32x3(bool on, int64_t min_rows) {
    tf32x3_ = on;
    tf32x3_rows_ = min_rows;
  }

 private:
  absl::Status PutVec(const float* host, int64_t n, WInit init, float** p);
  absl::Status LoadLayer(const cpu::BlockWeights* b, int64_t layer, LayerW* l);
  // The mHC pre-mix and the norm after it (`norm`: attn_norm or ffn_norm) into collapsed.
  absl::Status HcPre(const HcW& w, const float* norm, const float* streams, int64_t n, float* collapsed,
                     float* post, float* comb) const;
  // The mHC post-mix of a sublayer's output `out` back into the streams with HcPre's post and comb.
  absl::Status HcPost(const float* out, const float* post, const float* comb, int64_t n,
                      float* streams) const;
  // Attention in three parts. AttentionIn: the projections of x (and their norms, RoPE) into b's q, kv,
  // compressor and indexer rows. AttentionCore: per sequence, the compressors, key staging, indexer and the
  // attention kernel into b->o, planned on the host for each call's positions; `copies[i]` is the device
  // copy of segments[i]'s state (window ring, entries, indexer keys, compressor windows), and what the host
  // states need is copied to pinned memory and applied by `finish`. AttentionOut: inverse RoPE and the output
  // projections into `out`. In and Out depend only on the row count, so they go into CUDA graphs (Section).
  absl::Status AttentionIn(const LayerW& w, int64_t layer, const float* x, int64_t n, StepBuffers* b) const;
  absl::Status AttentionCore(const LayerW& w, int64_t layer, absl::Span<const ForwardSegment> segments,
                             absl::Span<DeviceStateCache::Copy* const> copies, int64_t n, StepBuffers* b,
                             Finish* finish) const;
  absl::Status AttentionOut(const LayerW& w, int64_t layer, int64_t n, StepBuffers* b, float* out) const;
  // CUDA graphs for decode steps. A forward is a chain of sections (the embedding and layer 0's attention
  // projections; then each layer's attention output, MoE and the next layer's projections) with an attention
  // core between two; a section's work depends only on the row count n (fixed-address StepBuffers, the
  // backend's scratch, weights), so it is captured once per (n, section) and replayed. Section runs `fn`:
  // eagerly when `graph` is false or n has not run eagerly since the scratch last moved (that run sizes the
  // scratch, which must not move inside a capture), else from its graph, capturing it first. A capture that
  // fails runs `fn` eagerly (nothing of it ran) and, unless the scratch would have moved, turns the graphs
  // off.
  // Graphs record all work queued on stream_, so one thread drives the backend (as Model's contract says;
  // the engine calls it from its step loop).
  absl::Status Section(int64_t n, int64_t index, bool graph, const std::function<absl::Status()>& fn) const;
  bool GraphsOn() const { return graph_max_rows_ > 0 && graphs_off_why_.empty(); }
  // Destroys the graphs (all, or with `stale_only` those captured before the scratch last moved) and trims
  // the graph memory pool.
  void DropGraphs(bool stale_only = false) const;
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
  bool GemvFits(const Mat& w) const { return w.in % (w.fp4 ? 32 : w.bf16 ? 256 : 128) == 0; }
  absl::Status Sync() const {
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize", __FILE__, __LINE__);
  }
  void CountGemm(const Mat& w, int64_t m) const {
    counters_.weight_bytes += w.bytes();
    counters_.gemm_flops += 2.0 * static_cast<double>(m) * static_cast<double>(w.out * w.in);
  }

  ModelConfig c_;
  bool bf16_;  // Low-precision mode (kBf16 or kFp8): BF16 weights, tensor-core attention, MXFP4 experts.
  bool fp8_;   // kFp8: the checkpoint's FP8 linears stay FP8 (PutLinear).
  bool fp8_expert_inputs_ = false;
  bool wgmma_ = false, wgmma_runs_ = false;  // WgmmaExperts; InitMoeKernels.
  std::string gpu_name_;
  size_t smem_optin_ = 48 << 10;
  int64_t weight_bytes_ = 0;
  std::vector<void*> allocs_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  const CublasApi* blas_api_ = nullptr;
  void* blas_ws_ = nullptr;        // cuBLAS's workspace (CublasApi::set_workspace).
  cublasLtHandle_t lt_ = nullptr;  // Null without cuBLASLt's block-scaled FP8 (CublasApi::lt_ok).
  void* lt_ws_ = nullptr;
  static constexpr size_t kLtWorkspace = size_t{32} << 20;
  static constexpr int64_t kSplitCounters = 4096;  // The row GEMMs' feature groups that may split k.
  // By (m, out, in, ldx, ldy); node-based: GetLtPlan hands out pointers to its entries.
  mutable absl::node_hash_map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>, LtPlan> lt_plans_;
  mutable absl::flat_hash_map<std::tuple<const void*, int, size_t>, int> resident_blocks_;
  // Null when cuBLASLt refuses the shape (remembered).
  const LtPlan* GetLtPlan(int64_t m, int64_t out, int64_t in, int64_t ldx, int64_t ldy, const void* a_scale,
                          const void* b_scale) const;
  cpu::RopeTable rope_main_, rope_comp_;
  float *inv_main_ = nullptr, *inv_comp_ = nullptr;
  Mat embed_, head_;
  float* norm_ = nullptr;
  HcW hc_head_;
  std::vector<LayerW> layers_;
  uint64_t seed_ = 0;
  mutable std::unique_ptr<Buf<__nv_bfloat16>> act_bf16_;  // Scratch for BF16 GEMM inputs.
  mutable std::unique_ptr<Buf<__half>> act_f16_;          // FP16 inputs of GroupedGemvFp4Mma (ToF16Rows),
  mutable std::unique_ptr<Buf<float>> act_f16_inv_;       // and their row scales.
  mutable std::unique_ptr<Buf<uint8_t>> act_fp8_;         // Scratch for FP8 GEMM inputs: codes,
  mutable std::unique_ptr<Buf<float>> act_fp8_scales_;    // and their block scales.
  mutable std::unique_ptr<Buf<float>> act_fp8_round_;     // FP8-rounded FP32 inputs (the MXFP4 GEMVs).
  mutable std::unique_ptr<Buf<float>> split_partial_;     // The row GEMMs' split-k partial sums
  unsigned* split_counters_ = nullptr;  // and their arrivals per feature group (zero between launches).
  int sm_count_ = 0;
  // V4SERVE_CUDA_ROWS_GEMM=1 (both), =fp8 or =f32: RowsGemmFp8 / RowsGemmF32 for decode rows (off unless set:
  // slower than cuBLASLt / cuBLAS in session 15's step).
  bool rows_fp8_ = false, rows_f32_ = false;
  bool tf32x3_ = false;  // LinearsF32's 3xTF32 GEMMs: outside the FP32 mode unless V4SERVE_CUDA_TF32X3=0,
  int64_t tf32x3_rows_ = kTf32x3Rows;  // from this many rows (the tests: any).
  bool pdl_ = false;  // Programmatic dependent launch (launch.cuh): on sm_90 unless V4SERVE_CUDA_PDL=0.
  mutable std::unique_ptr<Buf<float>> top_logits_;  // ForwardTop's logits, for TopLogits::full_row.
  mutable uint64_t runs_ = 0;                       // Forwards so far (full_row checks its own is last).
  mutable std::unique_ptr<DeviceStateCache> state_cache_;
  mutable PinnedArena arena_;
  mutable bool in_flight_ = false;  // A forward is between its first use of arena_ and its synchronization.
  mutable ForwardCounters counters_;
  int32_t* touched_ = nullptr;  // [layers, experts]: rows each expert got in the last Forward.
  // CUDA graphs (Section): forwards of up to graph_max_rows_ rows (0: none) use graph_bufs_.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    uint64_t moves = 0;       // scratch_moves_ when captured.
    ForwardCounters counted;  // What the section adds to the counters (its host code does not run).
  };
  static constexpr size_t kMaxGraphs = 8192;  // Sections kept (V4-Flash: 44 per row count).
  int64_t graph_max_rows_ = 0;
  mutable std::string graphs_off_why_;
  mutable absl::flat_hash_map<std::pair<int64_t, int64_t>, Graph> graphs_;  // By (rows, section).
  mutable std::vector<bool> graph_warm_;  // [rows]: an eager forward of that many rows since the last move.
  mutable uint64_t scratch_moves_ = 0;
  mutable bool capturing_ = false;
  mutable std::unique_ptr<StepBuffers> graph_bufs_;
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

}  // namespace v4serve::model::cuda::impl

#endif  // V4SERVE_MODEL_CUDA_CUDA_BACKEND_IMPL_CUH_
