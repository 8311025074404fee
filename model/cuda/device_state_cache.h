// Device copies of sequence states' attention keys, kept between forward calls (internal to the CUDA
// backend, model/cuda/cuda_backend.cu): each sequence's window rings and compressor windows, and its
// compressed entries and indexer keys in pages of the kvstore block format (KvPageLayout below), which the
// attention and indexer kernels read in place through a page table (model/cuda/paged_rows.h).
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
// (V4SERVE_CUDA_STATE_CACHE_MB, default a quarter of the device memory free after the weights); their pages
// go back to the pool's free list (the pool keeps the slabs it took, so its size is its peak).
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
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "model/config.h"
#include "model/cuda/cuda_backend.h"
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

// The pages of the device KV cache: page k of a sequence holds the compressed entries its tokens
// [128k, 128k + 128) produce, in the layout of a kvstore block's payload (kvstore/kv_block.h: per
// compressed layer in ascending order, its entries [128 / ratio, head_dim], then on CSA layers its indexer
// keys [128 / ratio, index_head_dim]; FP32, KvDtype::kF32). A page therefore moves between the device and
// a block's bytes in host memory, on the wire or on disk as one copy of PayloadBytes(), unconverted
// (tests/model/cuda_kv_pages_test.cc checks the bytes against kvstore's encoder).
struct KvPageLayout {
  int64_t page_floats = 0;  // The payload, floats.
  int64_t stride = 0;       // Floats between pages of a slab: page_floats rounded up to 64 (256-byte pages).
  // Per model layer: entries a page holds (0 on uncompressed layers), and floats from a page's start to
  // the layer's entries and to its indexer keys.
  std::vector<int64_t> per_page, entries_at, keys_at;
  int64_t PayloadBytes() const { return page_floats * 4; }
  // INVALID_ARGUMENT when a compression ratio does not divide kKvPageTokens or a width is not a multiple of
  // 4 floats (rows must be 16-byte aligned for the kernels' vector loads).
  static absl::StatusOr<KvPageLayout> For(const ModelConfig& config);
};

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
    float* window = nullptr;         // [sliding_window, head_dim] ring, slot = position % sliding_window.
    int64_t n_entries = 0;           // Compressed entries (and indexer keys) in the copy's pages.
    Compressor compressor, indexer;  // Layers with compression; the indexer's on CSA layers.
  };
  struct Copy {
    int64_t position = 0;
    std::vector<Layer> layers;
    std::vector<float*> pages;  // Page k: the entries of tokens [128k, 128k + 128) (KvPageLayout).
    int64_t bytes = 0;
    uint64_t last_use = 0;
  };

  DeviceStateCache(const ModelConfig& config, KvPageLayout pages, cudaStream_t stream, int64_t budget_bytes);
  ~DeviceStateCache();
  DeviceStateCache(const DeviceStateCache&) = delete;
  DeviceStateCache& operator=(const DeviceStateCache&) = delete;

  const KvPageLayout& page_layout() const { return pl_; }
  // Entry `e` of `layer` (its indexer key with `keys`) in `copy`'s pages (reserved).
  float* Row(const Copy& copy, int64_t layer, int64_t e, bool keys) const;

  // The device copy of `state` for this forward, valid for the state as it is now: the cached one when the
  // tag, position and entry counts match, else a whole upload. It is held by the call until Commit/Abort.
  // A state acquired twice in one call gets the same copy.
  absl::StatusOr<Copy*> Acquire(SequenceState* state);
  // Pages for `n_entries` entries (and indexer keys) of `layer` in `copy`, keeping the ones it holds.
  absl::Status Reserve(int64_t layer, int64_t n_entries, Copy* copy);
  // After a successful forward: the held copies take their states' new positions and fresh tags (written to
  // the states), return to the cache, and the least recently used copies are freed down to the budget.
  void Commit();
  // After a failed forward: the held copies are freed (the states may be half-updated).
  void Abort();
  // A new copy of `state` (not held by a forward) whose first pages are `pages`, kvstore block payloads of
  // its blocks 0, 1, ... taken as they are (one copy each); the rest (windows, compressors, entries past
  // those blocks) from the host state. The state gets the copy's tag, replacing any copy it had; the copy
  // is the first to go when the budget is exceeded, until a forward uses it. INVALID_ARGUMENT when a page
  // is not PayloadBytes() or the state holds fewer entries than the pages (the state is left as it was).
  absl::Status Adopt(SequenceState* state, absl::Span<const absl::string_view> pages);

  // The cached copy that is valid for `state` as it is now, or null (not held by a forward).
  const Copy* Find(const SequenceState& state) const;
  // Page `k` of `copy` to `payload` (PayloadBytes(), host memory), one copy; waits for it.
  absl::Status DownloadPage(const Copy& copy, int64_t k, void* payload) const;

  // Counters since construction: forwards' sequences found valid here / uploaded whole; pages adopted.
  int64_t hits() const { return hits_; }
  int64_t misses() const { return misses_; }
  int64_t pages_adopted() const { return pages_adopted_; }
  // Pages held by copies, and pages the pool has allocated (held + free).
  int64_t pages_held() const { return pages_held_; }
  int64_t pages_allocated() const { return static_cast<int64_t>(free_.size()) + pages_held_; }

 private:
  bool Valid(const Copy& copy, const SequenceState& state) const;
  // The whole state into `copy`; its pages k < pages.size() from those payloads, the rest packed from the
  // host state's entries.
  absl::Status Upload(const SequenceState& state, Copy* copy, absl::Span<const absl::string_view> pages = {});
  // Frees the least recently used cached copies down to the budget.
  void EvictToBudget();
  absl::Status UploadCompressor(const CompressorState& host, Compressor* dev, Copy* copy);
  // Device memory of `floats` floats owned by `copy`, filled from `host` (zeros when host is short).
  absl::Status Put(const std::vector<float>& host, int64_t floats, float** dev, Copy* copy);
  // A page from the free list, which takes a new slab when empty.
  absl::StatusOr<float*> TakePage();
  void Free(Copy* copy);

  ModelConfig c_;
  KvPageLayout pl_;
  cudaStream_t stream_;
  int64_t budget_;
  int64_t bytes_ = 0;
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0, pages_adopted_ = 0;
  int64_t pages_held_ = 0;
  std::vector<void*> slabs_;  // Never freed before the cache: pages return to free_.
  std::vector<float*> free_;  // Pages no copy holds (reused in stream order: one stream).
  absl::flat_hash_map<uint64_t, std::unique_ptr<Copy>> cached_;  // By tag.
  std::vector<std::pair<SequenceState*, std::unique_ptr<Copy>>> held_;
};

}  // namespace v4serve::model::cuda

#endif  // V4SERVE_MODEL_CUDA_DEVICE_STATE_CACHE_H_
