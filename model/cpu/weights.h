// FP32 weights of the CPU forward pass, loaded (and dequantized) from a checkpoint in the released
// tensor naming. Owned by the Model; immutable after loading.
#ifndef V4SERVE_MODEL_CPU_WEIGHTS_H_
#define V4SERVE_MODEL_CPU_WEIGHTS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace v4serve::model::cpu {

// FP32 values plus whether the checkpoint stored them quantized (FP8 or MXFP4): in the faithful numeric
// mode the input of such a weight's GEMM is rounded through FP8, as DeepSeek's linear() does.
struct Tensor : std::vector<float> {
  using std::vector<float>::vector;
  Tensor() = default;
  Tensor(std::vector<float>&& v) : std::vector<float>(std::move(v)) {}  // NOLINT: implicit by design.
  bool quantized = false;
};

struct HcWeights {
  Tensor fn, base, scale;  // [(2+hc)*hc, hc*D], [(2+hc)*hc], [3] (head: [hc, hc*D], [hc], [1]).
};

struct CompressorWeights {
  Tensor wkv, wgate, ape, norm;  // [coff*w, D], [coff*w, D], [ratio, coff*w], [w].
};

struct ExpertWeights {
  Tensor w1, w2, w3;  // [I, D], [D, I], [I, D].
};

struct BlockWeights {
  Tensor attn_norm, ffn_norm;
  HcWeights hc_attn, hc_ffn;
  Tensor attn_sink, wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b;
  CompressorWeights compressor;          // ratio > 0.
  Tensor indexer_wq_b, indexer_weights;  // CSA.
  CompressorWeights indexer_compressor;  // CSA.
  Tensor gate, gate_bias;                // gate_bias empty on hash layers.
  std::vector<int32_t> tid2eid;          // [vocab, k] on hash layers.
  std::vector<ExpertWeights> experts;
  ExpertWeights shared;
};

struct MtpWeights {
  BlockWeights block;
  Tensor e_proj, h_proj, enorm, hnorm, norm;
  HcWeights hc_head;
};

struct ModelWeights {
  Tensor embed, head, norm;
  HcWeights hc_head;
  std::vector<BlockWeights> layers;
  std::vector<MtpWeights> mtp;
};

// Loads every tensor CheckpointTensors(config) lists (MTP only when `load_mtp`), checking shapes.
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadWeights(const ModelConfig& config, const Checkpoint& ckpt,
                                                          bool load_mtp);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_WEIGHTS_H_
