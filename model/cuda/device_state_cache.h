// Device copies of sequence states' attention keys, kept between forward calls (internal to the CUDA
// backend, model/cuda/cuda_backend.cu).
//
// The host SequenceState stays the authoritative copy in the KV store's format: the backend still writes
// every window row and compressed entry back to it. What this cache saves is the upload: without it each
// forward copied every sequence's window ring, compressed entries and indexer keys from pageable host
// memory, per layer (13 of the 38 ms of an H100 decode step at batch 64, docs/PERFORMANCE.md). With it a
// decode step moves only what changed: the new window row stays on the device, and the entries that the
// host-side compressor appended are uploaded once.
//
// Validity: a copy is found by the state's device_tag (model/sequence_state.h), which Commit replaces with a
// fresh one after every forward, and is trusted only while the state's position and every layer's entry
// count equal the copy's. Anything else (a state restored from the KV store or received from a prefill
// worker, a rolled-back token, a copy of a state that has since moved on, InvalidateDeviceCopy) uploads the
// state whole. The device copy also holds each compressor's windows (kv rows and biased scores), so the
// backend pools compressed entries on the device; it writes the same rows back to the host state.
// Copies are freed least recently used first when their bytes exceed the budget
// (V4SERVE_CUDA_STATE_CACHE_MB, default a quarter of the device memory free after the weights).
//
// Thread-safety: none; the backend's forward calls are serialized (one stream).
#ifndef V4SERVE_MODEL_CUDA_DEVICE_STATE_CACHE_H_
#define V4SERVE_MODEL_CUDA_DEVICE_STATE_CACHE_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/sequence_state.h"

namespace v4serve::model::cuda {

// One device-to-device copy of `floats` floats.
struct CopySpan {
  const float* src;
  float* dst;
  int64_t floats;
};

// Runs all `spans` in one kernel launch on `stream` (the span list itself is uploaded first: from `pinned`,
// page-locked room for spans.size() spans that stays untouched until the stream has run the copy, where
// given, an asynchronous copy; else from pageable memory, which the driver stages before returning).
absl::Status CopySpans(const std::vector<CopySpan>& spans, cudaStream_t stream, CopySpan* pinned = nullptr);

class DeviceStateCache {
 public:
  // A streaming compressor's windows (CompressorState's arrays; the flags stay on the host).
  struct Compressor {
    float* kv = nullptr;       // [ratio, coff * width]: the current window's rows, slot = position % ratio.
    float* score = nullptr;    // Same, gate scores plus the positional bias.
    float* prev_kv = nullptr;  // Overlapping (CSA) compressors: the previous complete window.
    float* prev_score = nullptr;
  };
  struct Layer {
    float* window = nullptr;   // [sliding_window, head_dim] ring, slot = position % sliding_window.
    float* entries = nullptr;  // [capacity, head_dim].
    float* keys = nullptr;     // [capacity, index_head_dim] (CSA layers).
    int64_t n_entries = 0, capacity = 0;
    Compressor compressor, indexer;  // Layers with compression; the indexer's on CSA layers.
  };
  struct Copy {
    int64_t position = 0;
    std::vector<Layer> layers;
    int64_t bytes = 0;
    uint64_t last_use = 0;
  };

  DeviceStateCache(const ModelConfig& config, cudaStream_t stream, int64_t budget_bytes);
  ~DeviceStateCache();
  DeviceStateCache(const DeviceStateCache&) = delete;
  DeviceStateCache& operator=(const DeviceStateCache&) = delete;

  // The device copy of `state` for this forward, valid for the state as it is now: the cached one when the
  // tag, position and entry counts match, else a whole upload. It is held by the call until Commit/Abort.
  // A state acquired twice in one call gets the same copy.
  absl::StatusOr<Copy*> Acquire(SequenceState* state);
  // Room for `n_entries` entries (and indexer keys) in `layer` of `copy`, keeping the ones it holds.
  absl::Status Reserve(int64_t layer, int64_t n_entries, Copy* copy);
  // After a successful forward: the held copies take their states' new positions and fresh tags (written to
  // the states), return to the cache, and the least recently used copies are freed down to the budget.
  void Commit();
  // After a failed forward: the held copies are freed (the states may be half-updated).
  void Abort();

  // Counters since construction: forwards' sequences found valid here / uploaded whole.
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }

 private:
  absl::Status Upload(const SequenceState& state, Copy* copy);
  absl::Status UploadCompressor(const CompressorState& host, Compressor* dev, Copy* copy);
  // Device memory of `floats` floats owned by `copy`, filled from `host` (zeros when host is short).
  absl::Status Put(const std::vector<float>& host, int64_t floats, float** dev, Copy* copy);
  void Free(Copy* copy);

  ModelConfig c_;
  cudaStream_t stream_;
  int64_t budget_;
  int64_t bytes_ = 0;
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  absl::flat_hash_map<uint64_t, std::unique_ptr<Copy>> cached_;  // By tag.
  std::vector<std::pair<SequenceState*, std::unique_ptr<Copy>>> held_;
};

}  // namespace v4serve::model::cuda

#endif  // V4SERVE_MODEL_CUDA_DEVICE_STATE_CACHE_H_
