#include "model/model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "model/cpu/block.h"
#include "model/cpu/mhc.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/cuda/cuda_backend.h"
#include "services/status_macros.h"

namespace v4serve::model {

absl::Status SetServingNumerics(absl::string_view device, absl::string_view numerics, ModelOptions* options) {
  ASSIGN_OR_RETURN(const Device requested, ParseDevice(device));
  if (numerics == "exact") {
    options->mode = NumericMode::kExact;
    options->device = requested;
    return absl::OkStatus();
  }
  if (numerics == "faithful") {
    if (requested == Device::kCuda) {
      return absl::InvalidArgumentError(
          "--numerics=faithful runs on the CPU only (the CUDA backend computes in its own precisions); "
          "use --device=cpu, or --numerics=exact|auto on a GPU");
    }
    options->mode = NumericMode::kFaithful;
    options->device = Device::kCpu;
    return absl::OkStatus();
  }
  if (numerics != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--numerics must be auto, faithful or exact, not '", numerics, "'"));
  }
  ASSIGN_OR_RETURN(const Device resolved, ResolveDevice(requested));
  options->device = resolved;
  options->mode = resolved == Device::kCuda ? NumericMode::kExact : NumericMode::kFaithful;
  return absl::OkStatus();
}

absl::Status SetCudaWeights(absl::string_view name, ModelOptions* options) {
  if (name == "fp8") {
    options->cuda_weights = CudaWeights::kFp8;
  } else if (name == "bf16") {
    options->cuda_weights = CudaWeights::kBf16;
  } else if (name == "fp32") {
    options->cuda_weights = CudaWeights::kF32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--cuda_weights must be fp8, bf16 or fp32, not '", name, "'"));
  }
  return absl::OkStatus();
}

// The CPU reference behind the backend interface: the FP32 forward pass of model/cpu.
class CpuForwardBackend final : public ForwardBackend {
 public:
  explicit CpuForwardBackend(const Model* model) : model_(model) {}
  Device device() const override { return Device::kCpu; }
  std::string Describe() const override {
    return model_->faithful_ ? "cpu: fp32, faithful rounding" : "cpu: fp32, exact";
  }
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const ForwardSegment> segments,
                                             absl::Span<const int32_t> tokens,
                                             absl::Span<const int64_t> logit_rows,
                                             std::vector<float>* final_streams) const override {
    return model_->CpuForward(segments, tokens, logit_rows, final_streams);
  }

 private:
  const Model* model_;
};

Model::Model(ModelConfig config, std::unique_ptr<cpu::ModelWeights> weights)
    : config_(std::move(config)), weights_(std::move(weights)) {
  rope_main_ = std::make_unique<cpu::RopeTable>(
      cpu::MakeRopeTable(config_.qk_rope_head_dim, config_.rope_theta, nullptr));
  rope_compress_ = std::make_unique<cpu::RopeTable>(
      cpu::MakeRopeTable(config_.qk_rope_head_dim, config_.compress_rope_theta, &config_.rope_scaling));
}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir, const ModelOptions& options) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
  return FromCheckpoint(config, *ckpt, options);
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromCheckpoint(const ModelConfig& config,
                                                             const Checkpoint& ckpt,
                                                             const ModelOptions& options) {
  RETURN_IF_ERROR(ValidateModelConfig(config));
  ASSIGN_OR_RETURN(std::unique_ptr<cpu::ModelWeights> w, cpu::LoadWeights(config, ckpt, options.load_mtp));
  std::unique_ptr<Model> m(new Model(config, std::move(w)));
  m->faithful_ = options.mode == NumericMode::kFaithful;
  ASSIGN_OR_RETURN(Device device, ResolveDevice(options.device));
  if (device == Device::kCuda && m->faithful_) {
    if (options.device == Device::kCuda) {
      return absl::UnimplementedError("the CUDA backend runs the exact numeric mode only (not kFaithful)");
    }
    device = Device::kCpu;
  }
  if (device == Device::kCuda) {
    ASSIGN_OR_RETURN(m->backend_, cuda::MakeCudaBackend(config, *m->weights_, *m->rope_main_,
                                                        *m->rope_compress_, options.cuda_weights));
  } else {
    m->backend_ = std::make_unique<CpuForwardBackend>(m.get());
  }
  return m;
}

namespace {
// Logit rows 0 .. n - 1: every token of the call.
std::vector<int64_t> EveryRow(size_t n) {
  std::vector<int64_t> rows(n);
  for (size_t i = 0; i < n; ++i) rows[i] = static_cast<int64_t>(i);
  return rows;
}
}  // namespace

absl::StatusOr<std::vector<float>> Model::Prefill(SequenceState* state, absl::Span<const int32_t> tokens,
                                                  bool all_logits, std::vector<float>* final_streams) const {
  if (tokens.empty()) return absl::InvalidArgumentError("Prefill needs at least one token");
  const std::vector<int64_t> rows =
      all_logits ? EveryRow(tokens.size()) : std::vector<int64_t>{static_cast<int64_t>(tokens.size()) - 1};
  return Forward({Seq{state, 0, static_cast<int64_t>(tokens.size())}}, tokens, rows, final_streams);
}

absl::StatusOr<std::vector<float>> Model::Decode(absl::Span<SequenceState* const> states,
                                                 absl::Span<const int32_t> tokens,
                                                 std::vector<float>* final_streams) const {
  if (states.size() != tokens.size() || states.empty()) {
    return absl::InvalidArgumentError("Decode needs one token per state and at least one state");
  }
  std::vector<Seq> seqs;
  std::vector<int64_t> rows;
  for (size_t i = 0; i < states.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (states[i] == states[j]) return absl::InvalidArgumentError("Decode got the same state twice");
    }
    seqs.push_back(Seq{states[i], static_cast<int64_t>(i), 1});
    rows.push_back(static_cast<int64_t>(i));
  }
  return Forward(seqs, tokens, rows, final_streams);
}

absl::StatusOr<std::vector<float>> Model::DecodeChunks(absl::Span<SequenceState* const> states,
                                                       absl::Span<const int64_t> counts,
                                                       absl::Span<const int32_t> tokens,
                                                       std::vector<float>* final_streams) const {
  ASSIGN_OR_RETURN(std::vector<Seq> seqs, ChunkSeqs(states, counts, tokens));
  return Forward(seqs, tokens, EveryRow(tokens.size()), final_streams);
}

absl::Status Model::AdoptKvPages(SequenceState* state, absl::Span<const absl::string_view> pages) const {
  if (state == nullptr || state->layers.size() != static_cast<size_t>(config_.num_hidden_layers)) {
    return absl::InvalidArgumentError("AdoptKvPages: not a state of this model");
  }
  return backend_->AdoptKvPages(state, pages);
}

absl::StatusOr<std::vector<int32_t>> Model::DecodeChunksGreedy(absl::Span<SequenceState* const> states,
                                                               absl::Span<const int64_t> counts,
                                                               absl::Span<const int32_t> tokens) const {
  ASSIGN_OR_RETURN(std::vector<Seq> seqs, ChunkSeqs(states, counts, tokens));
  ASSIGN_OR_RETURN(std::vector<ForwardSegment> segments, Segments(seqs, tokens));
  return backend_->ForwardGreedy(segments, tokens, EveryRow(tokens.size()));
}

absl::StatusOr<TopLogits> Model::DecodeChunksTop(absl::Span<SequenceState* const> states,
                                                 absl::Span<const int64_t> counts,
                                                 absl::Span<const int32_t> tokens,
                                                 absl::Span<const float> temperatures, int64_t m) const {
  RETURN_IF_ERROR(ValidateTopRequest(tokens.size(), temperatures.size(), m));
  ASSIGN_OR_RETURN(std::vector<Seq> seqs, ChunkSeqs(states, counts, tokens));
  ASSIGN_OR_RETURN(std::vector<ForwardSegment> segments, Segments(seqs, tokens));
  return backend_->ForwardTop(segments, tokens, EveryRow(tokens.size()), temperatures, m);
}

absl::StatusOr<std::vector<Model::Seq>> Model::ChunkSeqs(absl::Span<SequenceState* const> states,
                                                         absl::Span<const int64_t> counts,
                                                         absl::Span<const int32_t> tokens) const {
  if (states.size() != counts.size() || states.empty()) {
    return absl::InvalidArgumentError("DecodeChunks needs one count per state and at least one state");
  }
  std::vector<Seq> seqs;
  int64_t begin = 0;
  for (size_t i = 0; i < states.size(); ++i) {
    if (counts[i] < 1) return absl::InvalidArgumentError("DecodeChunks needs chunks of at least one token");
    for (size_t j = 0; j < i; ++j) {
      if (states[i] == states[j]) return absl::InvalidArgumentError("DecodeChunks got the same state twice");
    }
    seqs.push_back(Seq{states[i], begin, counts[i]});
    begin += counts[i];
  }
  if (begin != static_cast<int64_t>(tokens.size())) {
    return absl::InvalidArgumentError("DecodeChunks: counts do not add up to the tokens");
  }
  return seqs;
}

absl::StatusOr<std::vector<float>> Model::Forward(const std::vector<Seq>& seqs,
                                                  absl::Span<const int32_t> tokens,
                                                  const std::vector<int64_t>& logit_rows,
                                                  std::vector<float>* final_streams) const {
  ASSIGN_OR_RETURN(std::vector<ForwardSegment> segments, Segments(seqs, tokens));
  return backend_->Forward(segments, tokens, logit_rows, final_streams);
}

absl::StatusOr<std::vector<ForwardSegment>> Model::Segments(const std::vector<Seq>& seqs,
                                                            absl::Span<const int32_t> tokens) const {
  const ModelConfig& c = config_;
  for (int32_t t : tokens) {
    if (t < 0 || t >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token id ", t, " out of range"));
  }
  std::vector<ForwardSegment> segments;
  for (const Seq& s : seqs) {
    if (s.state->layers.size() != static_cast<size_t>(c.num_hidden_layers)) {
      return absl::InvalidArgumentError("sequence state does not belong to this model (layer count)");
    }
    segments.push_back(ForwardSegment{s.state, s.begin, s.count});
  }
  return segments;
}

absl::StatusOr<std::vector<float>> Model::CpuForward(absl::Span<const ForwardSegment> seqs,
                                                     absl::Span<const int32_t> tokens,
                                                     absl::Span<const int64_t> logit_rows,
                                                     std::vector<float>* final_streams) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(tokens.size()), d = c.hidden_size, hc = c.hc_mult;
  // Embedding, copied into every stream.
  std::vector<float> streams(static_cast<size_t>(n * hc * d));
  for (int64_t t = 0; t < n; ++t) {
    const float* e = &weights_->embed[static_cast<size_t>(tokens[t]) * d];
    for (int64_t j = 0; j < hc; ++j) std::copy(e, e + d, &streams[(t * hc + j) * d]);
  }
  const cpu::LayerRopes ropes{rope_main_.get(), rope_compress_.get()};
  const cpu::Numerics num{faithful_};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::vector<cpu::Segment> segs;
    segs.reserve(seqs.size());
    for (const ForwardSegment& s : seqs) {
      segs.push_back({&s.state->layers[l], s.state->position, s.begin, s.count});
    }
    cpu::BlockForward(c, num, weights_->layers[l], l, c.is_hash_layer(l), ropes, tokens.data(), n, segs,
                      streams.data());
  }
  for (const ForwardSegment& s : seqs) s.state->position += s.count;

  // Final collapse, norm and head for the requested rows only.
  std::vector<float> picked(logit_rows.size() * hc * d);
  for (size_t i = 0; i < logit_rows.size(); ++i) {
    std::copy(&streams[logit_rows[i] * hc * d], &streams[(logit_rows[i] + 1) * hc * d], &picked[i * hc * d]);
  }
  std::vector<float> logits =
      Logits(picked.data(), static_cast<int64_t>(logit_rows.size()), weights_->hc_head, weights_->norm);
  if (final_streams != nullptr) *final_streams = std::move(streams);
  return logits;
}

std::vector<float> Model::Logits(const float* streams, int64_t m, const cpu::HcWeights& hc_head,
                                 const cpu::Tensor& norm) const {
  const cpu::Numerics num{faithful_};
  std::vector<float> hidden, logits;
  cpu::HcHead(config_, num, hc_head, streams, m, &hidden);
  cpu::RmsNorm(hidden.data(), m, config_.hidden_size, norm.data(), config_.rms_norm_eps);
  num.Bf(&hidden);
  num.Matmul(hidden.data(), m, config_.hidden_size, weights_->head.data(), config_.vocab_size, &logits);
  return logits;
}

absl::StatusOr<std::vector<float>> Model::MtpDraft(SequenceState* state, absl::Span<const float> streams,
                                                   absl::Span<const int32_t> next_tokens,
                                                   int64_t mtp_index) const {
  const int64_t n = static_cast<int64_t>(next_tokens.size());
  return MtpDraftBatch(absl::MakeConstSpan(&state, 1), absl::MakeConstSpan(&n, 1), streams, next_tokens,
                       mtp_index);
}

absl::StatusOr<std::vector<float>> Model::MtpDraftBatch(absl::Span<SequenceState* const> states,
                                                        absl::Span<const int64_t> counts,
                                                        absl::Span<const float> streams,
                                                        absl::Span<const int32_t> next_tokens,
                                                        int64_t mtp_index) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(next_tokens.size()), d = c.hidden_size, hc = c.hc_mult;
  if (mtp_index < 0 || mtp_index >= static_cast<int64_t>(weights_->mtp.size())) {
    return absl::FailedPreconditionError(
        "MTP weights not loaded (ModelOptions::load_mtp) or no such MTP layer");
  }
  if (n == 0 || static_cast<int64_t>(streams.size()) != n * hc * d) {
    return absl::InvalidArgumentError("MtpDraft needs [n, hc_mult, hidden] streams for n > 0 next tokens");
  }
  if (states.empty() || states.size() != counts.size()) {
    return absl::InvalidArgumentError("MtpDraftBatch needs one count per state and at least one state");
  }
  std::vector<cpu::Segment> segs;
  int64_t begin = 0;
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i]->mtp_layers.size() != static_cast<size_t>(c.num_nextn_predict_layers)) {
      return absl::InvalidArgumentError("sequence state has no MTP layer state");
    }
    if (counts[i] < 1) return absl::InvalidArgumentError("MtpDraftBatch needs counts >= 1");
    for (size_t j = 0; j < i; ++j) {
      if (states[i] == states[j]) return absl::InvalidArgumentError("MtpDraftBatch got the same state twice");
    }
    segs.push_back(
        cpu::Segment{&states[i]->mtp_layers[mtp_index], states[i]->mtp_position, begin, counts[i]});
    begin += counts[i];
  }
  if (begin != n) return absl::InvalidArgumentError("MtpDraftBatch: counts do not add up to the tokens");
  for (int32_t t : next_tokens) {
    if (t < 0 || t >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token id ", t, " out of range"));
  }
  const cpu::MtpWeights& w = weights_->mtp[mtp_index];
  const cpu::Numerics num{faithful_};
  // e_proj(enorm(embed(next))) broadcast over the streams + h_proj(hnorm(streams)).
  std::vector<float> e(static_cast<size_t>(n * d)), hn(streams.begin(), streams.end()), pe, ph;
  for (int64_t t = 0; t < n; ++t) {
    const float* row = &weights_->embed[static_cast<size_t>(next_tokens[t]) * d];
    std::copy(row, row + d, &e[t * d]);
  }
  num.Bf(&e);
  cpu::RmsNorm(e.data(), n, d, w.enorm.data(), c.rms_norm_eps);
  num.Bf(&e);
  cpu::RmsNorm(hn.data(), n * hc, d, w.hnorm.data(), c.rms_norm_eps);
  num.Bf(&hn);
  num.Linear(e.data(), n, d, w.e_proj, d, &pe);
  num.Linear(hn.data(), n * hc, d, w.h_proj, d, &ph);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < hc; ++j) {
      for (int64_t i = 0; i < d; ++i) ph[(t * hc + j) * d + i] += pe[t * d + i];
    }
  }
  num.Bf(&ph);
  const cpu::LayerRopes ropes{rope_main_.get(), rope_compress_.get()};
  const int64_t layer = c.num_hidden_layers + mtp_index;
  cpu::BlockForward(c, num, w.block, layer, /*hash=*/false, ropes, next_tokens.data(), n, segs, ph.data());
  for (size_t i = 0; i < states.size(); ++i) states[i]->mtp_position += counts[i];
  return Logits(ph.data(), n, w.hc_head, w.norm);
}

}  // namespace v4serve::model
