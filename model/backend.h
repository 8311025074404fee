// Where a Model's forward pass runs: one interface, a CPU implementation (model/model.cc, the reference)
// and a CUDA implementation (model/cuda/cuda_backend.h). Model::Prefill/Decode/DecodeChunks validate their
// arguments and hand the batch to the backend chosen at load time (ModelOptions::device).
//
// Sequence states stay host values (SequenceState) on every backend, so the engine, the KV store and state
// transfer see one format whichever device computed them.
#ifndef V4SERVE_MODEL_BACKEND_H_
#define V4SERVE_MODEL_BACKEND_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "model/sequence_state.h"

namespace v4serve::model {

// kAuto: CUDA when this binary has it and a GPU is visible, else the CPU.
enum class Device { kAuto, kCpu, kCuda };

// "auto", "cpu" or "cuda".
absl::StatusOr<Device> ParseDevice(absl::string_view name);
const char* DeviceName(Device device);

// kAuto -> kCuda or kCpu (with `why` saying which and why, for logs); kCuda fails with UNAVAILABLE where
// the binary lacks CUDA or no GPU is visible; kCpu is returned as is.
absl::StatusOr<Device> ResolveDevice(Device requested, std::string* why = nullptr);

// Weight precision of the CUDA backend. kF32 keeps the CPU reference's FP32 weights (tests compare it with
// the CPU tightly); kBf16 stores BF16 weights and feeds the GEMMs BF16 activations with FP32 accumulation
// (half the weight bytes); kFp8 is kBf16 except that the linears the checkpoint stores in FP8 stay FP8 with
// their 128 x 128 block scales and their GEMMs take inputs quantized to FP8 per row in blocks of 128, as
// DeepSeek's kernels and the CPU faithful mode do (half those weights' bytes again). Routed experts are MXFP4
// in both low-precision modes when the checkpoint has them.
enum class CudaWeights { kBf16, kF32, kFp8 };

// A run of `count` consecutive rows of the batch that continue one sequence's state.
struct ForwardSegment {
  SequenceState* state;
  int64_t begin;
  int64_t count;
};

// What sampling reads of each logit row when it does not need the whole row (ForwardBackend::ForwardTop):
// the row's `m` largest logits in the sampling order (larger first, lower id first among equals) and two sums
// over the whole row, with max the row's largest logit and float arithmetic inside the exp as the engine's
// sampler does it:
//   norm[r]  = sum over v of exp(double(float(x_v - max) / t_r))   (t_r = temperatures[r], 0 taken as 1)
//   norm1[r] = sum over v of exp(double(x_v - max))                 (for log-probabilities)
// The CPU sums in token-id order (exactly the engine sampler's own sums); a GPU in its reduction's fixed
// order (equal to ~1e-16).
struct TopLogits {
  int64_t rows = 0, vocab = 0, m = 0;  // m: min(requested, vocab); the CUDA backend also at most 1024.
  std::vector<int32_t> ids;            // [rows, m]
  std::vector<float> values;           // [rows, m]
  std::vector<double> norm, norm1;     // [rows]
  // The whole logit row r, for a draw that walks past the m candidates. Valid until the backend's next call
  // (FAILED_PRECONDITION after it) and while the backend lives.
  std::function<absl::StatusOr<std::vector<float>>(int64_t r)> full_row;
};
// The sampling order: larger logit first, lower id first among equals (a total order).
inline bool SamplingOrderBefore(float x, int32_t a, float y, int32_t b) { return x != y ? x > y : a < b; }
// Sum over x of exp(double(float(x_v - mx) / t)) in token-id order: the softmax's normalizer exactly as the
// engine's sampler computes it (t = 1: the log-probabilities' sum), which TopLogits' CPU sums must equal.
double SoftmaxNormalizer(absl::Span<const float> x, float mx, float t);

// TopLogits of `logits` [rows, vocab] on the host; full_row serves from `logits`. Needs m >= 1 and one
// temperature per row (ForwardTop checks both).
TopLogits TopOfRows(std::vector<float> logits, int64_t rows, absl::Span<const float> temperatures, int64_t m);
// ForwardTop's argument checks (one temperature per logit row, at least one candidate): INVALID_ARGUMENT.
absl::Status ValidateTopRequest(size_t logit_rows, size_t temperatures, int64_t m);

class ForwardBackend {
 public:
  virtual ~ForwardBackend() = default;
  virtual Device device() const = 0;
  // One line for logs, e.g. "cuda: NVIDIA H100 80GB HBM3, bf16 weights".
  virtual std::string Describe() const = 0;
  // Runs the main layers over `tokens` (already range-checked; segments cover the rows in order), advances
  // each segment's state (layers and position) and returns the logits of `logit_rows` [rows, vocab]. When
  // `final_streams` is set it receives the last mHC streams of every row [tokens, hc_mult, hidden].
  virtual absl::StatusOr<std::vector<float>> Forward(absl::Span<const ForwardSegment> segments,
                                                     absl::Span<const int32_t> tokens,
                                                     absl::Span<const int64_t> logit_rows,
                                                     std::vector<float>* final_streams) const = 0;
  // Forward that returns the greedy token of each of `logit_rows` (the argmax, the lowest id on ties, as
  // the engine's sampler picks at temperature 0) instead of its logits. This default argmaxes Forward's
  // logits; the CUDA backend picks on the device and copies back only the ids.
  virtual absl::StatusOr<std::vector<int32_t>> ForwardGreedy(absl::Span<const ForwardSegment> segments,
                                                             absl::Span<const int32_t> tokens,
                                                             absl::Span<const int64_t> logit_rows) const;
  // Forward that returns what sampling at temperatures[i] reads of each of `logit_rows` (TopLogits, m
  // candidates a row) instead of [rows, vocab] logits. This default computes it from Forward's logits on
  // the host; the CUDA backend on the device, copying back m candidates a row.
  virtual absl::StatusOr<TopLogits> ForwardTop(absl::Span<const ForwardSegment> segments,
                                               absl::Span<const int32_t> tokens,
                                               absl::Span<const int64_t> logit_rows,
                                               absl::Span<const float> temperatures, int64_t m) const;
  // `state` was just rebuilt on the host from KV blocks whose payloads are `pages` (blocks 0, 1, ... in
  // order; kvstore::KvBlockPayload). A backend that keeps its own copy of states may take the blocks from
  // the payloads as they are (the CUDA backend: one copy a page into its paged device KV cache) instead of
  // from the host state's arrays at the next forward. The host state stays authoritative, and the pages must
  // hold exactly its entries. This default returns UNIMPLEMENTED: the backend keeps no copies (the CPU
  // backend reads the host state).
  virtual absl::Status AdoptKvPages(SequenceState* state, absl::Span<const absl::string_view> pages) const;
};

// The argmax of each of `rows` rows of `logits` (lowest index on ties).
std::vector<int32_t> ArgmaxOfRows(absl::Span<const float> logits, int64_t rows);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_BACKEND_H_
