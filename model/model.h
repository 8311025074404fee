// DeepSeek-V4 forward pass on CPU (FP32).
//
// Two entry points share one SequenceState per sequence:
//   Prefill: run a chunk of tokens of one sequence after what its state already holds;
//   Decode:  run one token for each of a batch of sequences.
// Both advance the states in place. Prefill in chunks of any size leaves the same state and logits as
// one prefill of the whole prompt.
//
// Numeric modes (MODEL.md "Precision the reference simulates"): kExact is FP32 without fake quantization
// (matches transformers); kFaithful rounds as DeepSeek's inference code does (BF16 activations between
// ops, FP8 inputs of FP8/FP4-stored GEMMs, FP8 window/compressed KV on the non-RoPE dims, Hadamard + FP4
// indexer vectors) and matches tools/golden/v4_reference.py. Serving uses kFaithful.
//
// Thread-safety: a Model is immutable after Load; calls are externally synchronized (one forward call at
// a time, because they share the process-wide matmul thread pool). The caller owns the states.
#ifndef V4SERVE_MODEL_MODEL_H_
#define V4SERVE_MODEL_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/sequence_state.h"

namespace v4serve::model {

namespace cpu {
struct HcWeights;
struct ModelWeights;
struct RopeTable;
struct Tensor;
}  // namespace cpu

enum class NumericMode { kExact, kFaithful };

struct ModelOptions {
  NumericMode mode = NumericMode::kExact;
  bool load_mtp = false;  // Load the MTP weights too (needed by MtpDraft).
  // Where Prefill/Decode/DecodeChunks run (model/backend.h). kAuto takes CUDA when a GPU is visible and the
  // mode is kExact (the CUDA backend does not simulate the faithful rounding yet), else the CPU. MTP drafts
  // run on the CPU either way.
  Device device = Device::kCpu;
  CudaWeights cuda_weights = CudaWeights::kFp8;
};

// `--cuda_weights`: fp8, bf16 or fp32 into options->cuda_weights; INVALID_ARGUMENT naming the flag otherwise.
absl::Status SetCudaWeights(absl::string_view name, ModelOptions* options);

// What the workers serve with (`--device`, `--numerics`): "faithful" simulates the released kernels'
// FP8/FP4 rounding (CPU only), "exact" is FP32 on the CPU and the CUDA backend's own BF16/FP8/FP4 GEMMs on
// a GPU; "auto" is faithful on the CPU and the CUDA backend where a GPU is visible (--device=auto|cuda).
// Sets options->device and options->mode; INVALID_ARGUMENT naming the flag for a bad value or for
// faithful on CUDA; UNAVAILABLE for --device=cuda without a GPU.
absl::Status SetServingNumerics(absl::string_view device, absl::string_view numerics, ModelOptions* options);

class Model {
 public:
  // Loads config.json and the safetensors checkpoint in `dir`.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, const ModelOptions& options);
  static absl::StatusOr<std::unique_ptr<Model>> FromCheckpoint(const ModelConfig& config,
                                                               const Checkpoint& ckpt,
                                                               const ModelOptions& options);
  ~Model();

  const ModelConfig& config() const { return config_; }
  SequenceState NewState() const { return NewSequenceState(config_); }
  // The backend that runs the main layers (CPU or CUDA).
  const ForwardBackend& backend() const { return *backend_; }
  // Tests: puts `backend` in place of this model's and returns the one it had (a wrapping test backend may
  // keep it and delegate to it). Not concurrent with any other call on the model.
  std::unique_ptr<ForwardBackend> ReplaceBackendForTesting(std::unique_ptr<ForwardBackend> backend) {
    std::swap(backend, backend_);
    return backend;
  }

  // Runs `tokens` (non-empty) after the state's tokens. Returns logits [vocab] of the last token, or
  // [tokens.size(), vocab] when `all_logits`. On error the state is unchanged only for argument errors
  // (bad token id, empty chunk), which are checked before any work.
  // When `final_streams` is set it receives the main model's last mHC streams [tokens, hc_mult, hidden]
  // (the MTP input).
  absl::StatusOr<std::vector<float>> Prefill(SequenceState* state, absl::Span<const int32_t> tokens,
                                             bool all_logits = false,
                                             std::vector<float>* final_streams = nullptr) const;

  // One token per sequence: states[i] consumes tokens[i]. Returns logits [batch, vocab]. States must be
  // distinct.
  absl::StatusOr<std::vector<float>> Decode(absl::Span<SequenceState* const> states,
                                            absl::Span<const int32_t> tokens,
                                            std::vector<float>* final_streams = nullptr) const;

  // Several sequences, each consuming its own chunk: states[i] consumes counts[i] (>= 1) tokens, taken in
  // order from `tokens` (size = sum of counts). Returns logits of every token [tokens.size(), vocab].
  // One forward for the batch (the engine verifies MTP drafts of many sequences with 2-token chunks).
  absl::StatusOr<std::vector<float>> DecodeChunks(absl::Span<SequenceState* const> states,
                                                  absl::Span<const int64_t> counts,
                                                  absl::Span<const int32_t> tokens,
                                                  std::vector<float>* final_streams = nullptr) const;

  // DecodeChunks for greedy decoding: the argmax token of every row [tokens.size()] (the lowest id on ties,
  // as a temperature-0 sampler without penalties picks) instead of its logits, so that a GPU backend
  // copies back token ids rather than [rows, vocab] floats.
  absl::StatusOr<std::vector<int32_t>> DecodeChunksGreedy(absl::Span<SequenceState* const> states,
                                                          absl::Span<const int64_t> counts,
                                                          absl::Span<const int32_t> tokens) const;

  // DecodeChunks for sampling that reads only each row's best `m` logits and two sums (TopLogits: no
  // penalties, top-k <= m), at temperatures[i] for row i, so that a GPU backend copies back m candidates a
  // row rather than [rows, vocab] floats.
  absl::StatusOr<TopLogits> DecodeChunksTop(absl::Span<SequenceState* const> states,
                                            absl::Span<const int64_t> counts,
                                            absl::Span<const int32_t> tokens,
                                            absl::Span<const float> temperatures, int64_t m) const;

  // `state` was just rebuilt on the host from KV blocks whose payloads are `pages`, blocks 0, 1, ... in order
  // (kvstore::KvBlockPayload of each): the backend may keep them as they are (ForwardBackend::AdoptKvPages;
  // the CUDA backend copies each into a page of its device KV cache). INVALID_ARGUMENT when they cannot be
  // this state's blocks (sizes, count): the state is then uploaded from the host at its next forward;
  // UNIMPLEMENTED when the backend keeps no copies of states (CPU).
  absl::Status AdoptKvPages(SequenceState* state, absl::Span<const absl::string_view> pages) const;

  // MTP draft logits [n, vocab] of one sequence: row t combines the main model's final streams at position
  // state->mtp_position + t (`streams`, [n, hc_mult, hidden], from Prefill/Decode) with the embedding of the
  // token that follows that position (`next_tokens`, [n]) and predicts the token after it. Advances the
  // MTP window state by n positions. Needs ModelOptions::load_mtp and an MTP layer in the config.
  absl::StatusOr<std::vector<float>> MtpDraft(SequenceState* state, absl::Span<const float> streams,
                                              absl::Span<const int32_t> next_tokens,
                                              int64_t mtp_index = 0) const;
  // MtpDraft for several sequences in one pass: states[i] takes counts[i] (>= 1) rows of `streams` and
  // `next_tokens`, in order. Returns [sum counts, vocab]; each state's rows equal its own MtpDraft.
  absl::StatusOr<std::vector<float>> MtpDraftBatch(absl::Span<SequenceState* const> states,
                                                   absl::Span<const int64_t> counts,
                                                   absl::Span<const float> streams,
                                                   absl::Span<const int32_t> next_tokens,
                                                   int64_t mtp_index = 0) const;

 private:
  struct Seq {
    SequenceState* state;
    int64_t begin, count;
  };
  Model(ModelConfig config, std::unique_ptr<cpu::ModelWeights> weights);
  absl::StatusOr<std::vector<float>> Forward(const std::vector<Seq>& seqs, absl::Span<const int32_t> tokens,
                                             const std::vector<int64_t>& logit_rows,
                                             std::vector<float>* final_streams) const;
  // DecodeChunks' argument checks: the sequences of `states` with their chunks of `tokens`.
  absl::StatusOr<std::vector<Seq>> ChunkSeqs(absl::Span<SequenceState* const> states,
                                             absl::Span<const int64_t> counts,
                                             absl::Span<const int32_t> tokens) const;
  // Forward's checks: token ids in range, states of this model.
  absl::StatusOr<std::vector<ForwardSegment>> Segments(const std::vector<Seq>& seqs,
                                                       absl::Span<const int32_t> tokens) const;
  // The CPU backend's Forward (ForwardBackend contract).
  friend class CpuForwardBackend;
  absl::StatusOr<std::vector<float>> CpuForward(absl::Span<const ForwardSegment> seqs,
                                                absl::Span<const int32_t> tokens,
                                                absl::Span<const int64_t> logit_rows,
                                                std::vector<float>* final_streams) const;
  // hc_head + norm + LM head for `m` rows of streams.
  std::vector<float> Logits(const float* streams, int64_t m, const cpu::HcWeights& hc_head,
                            const cpu::Tensor& norm) const;

  ModelConfig config_;
  std::unique_ptr<cpu::ModelWeights> weights_;
  std::unique_ptr<cpu::RopeTable> rope_main_, rope_compress_;
  bool faithful_ = false;
  std::unique_ptr<ForwardBackend> backend_;
};

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_MODEL_H_
