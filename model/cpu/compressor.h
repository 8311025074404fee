// Streaming KV compressor (CSA ratio 4 with overlapping windows, HCA non-overlapping): consumes one
// token's projected kv and gate score at a time and emits a compressed entry when a window completes.
// Feeding tokens one by one is what makes chunked prefill, one-shot prefill and decode identical.
#ifndef V4SERVE_MODEL_CPU_COMPRESSOR_H_
#define V4SERVE_MODEL_CPU_COMPRESSOR_H_

#include <vector>

#include "model/cpu/numerics.h"
#include "model/cpu/ops.h"
#include "model/cpu/weights.h"
#include "model/sequence_state.h"

namespace v4serve::model::cpu {

// `kv` and `score` are the token's wkv/wgate projections (coff*width each); `pos` its position. When the
// token completes a window, writes the entry (pooled, RMSNorm'd with w.norm, RoPE'd at the window's first
// position) to `entries` (appended) and returns true.
// `indexer`: finished keys go through the Hadamard rotation and FP4 (faithful mode); attention entries
// through FP8 on the non-RoPE dims.
bool CompressorPush(const CompressorWeights& w, const RopeTable& rope, int64_t rope_dim, double eps,
                    const Numerics& num, bool indexer, const float* kv, const float* score, int64_t pos,
                    CompressorState* state, std::vector<float>* entries);

// CompressorPush's bookkeeping without the pooling, which Push itself uses and a backend that pools on its
// device replays to keep the host state exact: CompressorWriteRow records the token's row, its score plus
// `bias` (w.ape's row for the slot; null when `score` already includes it) and returns whether it completed
// a window; CompressorCloseWindow then keeps that window as the previous one (overlap) and empties the
// current one.
bool CompressorWriteRow(const float* kv, const float* score, const float* bias, int64_t pos,
                        CompressorState* state);
void CompressorCloseWindow(CompressorState* state);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_COMPRESSOR_H_
