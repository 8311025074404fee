// The tensors a DeepSeek-V4 checkpoint holds, by name and logical (dequantized) shape, as the released
// checkpoints name them (no `model.` prefix). Used to count parameters and to check a checkpoint
// before the forward pass reads it.
//
// Thread-safety: pure functions of the config.
#ifndef V4SERVE_MODEL_CHECKPOINT_LAYOUT_H_
#define V4SERVE_MODEL_CHECKPOINT_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace v4serve::model {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // Logical shape: an FP4 [out, in/2] int8 tensor is listed as [out, in].
  bool routed_expert = false;
  bool mtp = false;
  bool is_int = false;  // tid2eid (int64/int32 expert ids).
  int64_t elements() const;
};

// Every tensor of the main model and the MTP layers, in a stable order.
std::vector<TensorSpec> CheckpointTensors(const ModelConfig& config);

// Tensors of one block (`prefix` is "layers.L." or "mtp.K."); `layer` selects CSA/HCA/hash-routing.
void AppendBlockTensors(const ModelConfig& config, const std::string& prefix, int64_t layer, bool mtp,
                        std::vector<TensorSpec>* out);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_CHECKPOINT_LAYOUT_H_
