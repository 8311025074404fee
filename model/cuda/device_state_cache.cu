#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/cuda/cuda_check.h"
#include "model/cuda/device_state_cache.h"
#include "model/cuda/paged_rows.h"
#include "services/status_macros.h"

namespace v4serve::model::cuda {
namespace {

// Block (i, j) copies part j of span i; float4 where both ends are 16-byte aligned.
__global__ void CopySpansKernel(const CopySpan* spans, int n) {
  const int i = blockIdx.x;
  if (i >= n) return;
  const CopySpan sp = spans[i];
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool vec = ((reinterpret_cast<uintptr_t>(sp.src) | reinterpret_cast<uintptr_t>(sp.dst)) & 15) == 0;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = sp.floats / 4;
    const float4* s4 = reinterpret_cast<const float4*>(sp.src);
    float4* d4 = reinterpret_cast<float4*>(sp.dst);
    for (int64_t k = t0; k < n4; k += stride) d4[k] = s4[k];
    done = n4 * 4;
  }
  for (int64_t k = done + t0; k < sp.floats; k += stride) sp.dst[k] = sp.src[k];
}

int64_t Floats(const std::vector<float>& v) { return static_cast<int64_t>(v.size()); }

// Tags are unique in the process, not per cache: a state that one backend ran and another one then runs
// must not name an unrelated copy there.
uint64_t NextTag() {
  static std::atomic<uint64_t> next{0};
  return ++next;
}

}  // namespace

absl::Status CopySpans(const std::vector<CopySpan>& spans, cudaStream_t stream, CopySpan* pinned) {
  std::vector<CopySpan> live;
  int64_t most = 0;
  for (const CopySpan& sp : spans) {
    if (sp.floats <= 0) continue;
    live.push_back(sp);
    most = std::max(most, sp.floats);
  }
  if (live.empty()) return absl::OkStatus();
  CopySpan* d = nullptr;
  const size_t bytes = live.size() * sizeof(CopySpan);
  V4_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&d), bytes, stream));
  // A pageable source is staged before cudaMemcpyAsync returns, so `live` may go.
  const CopySpan* src = live.data();
  if (pinned != nullptr) src = std::copy(live.begin(), live.end(), pinned) - live.size();
  V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, stream));
  const int64_t parts = std::clamp<int64_t>((most / 4 + 255) / 256, 1, 32);
  CopySpansKernel<<<dim3(static_cast<unsigned>(live.size()), static_cast<unsigned>(parts)), 256, 0, stream>>>(
      d, static_cast<int>(live.size()));
  V4_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  V4_CUDA_RETURN_IF_ERROR(cudaFreeAsync(d, stream));
  return absl::OkStatus();
}

absl::StatusOr<KvPageLayout> KvPageLayout::For(const ModelConfig& config) {
  KvPageLayout pl;
  const size_t layers = static_cast<size_t>(config.num_hidden_layers);
  pl.per_page.assign(layers, 0);
  pl.entries_at.assign(layers, 0);
  pl.keys_at.assign(layers, 0);
  if (config.compress_ratios.size() < layers) {
    return absl::InvalidArgumentError("compress_ratios lists fewer layers than num_hidden_layers");
  }
  for (size_t l = 0; l < layers; ++l) {
    const int64_t ratio = config.compress_ratios[l];
    if (ratio == 0) continue;
    if (ratio < 0 || kKvPageTokens % ratio != 0) {
      return absl::InvalidArgumentError(absl::StrCat("compress ratio ", ratio, " of layer ", l,
                                                     " does not divide the KV page of ", kKvPageTokens,
                                                     " tokens"));
    }
    const int64_t id = ratio == 4 ? config.index_head_dim : 0;
    if (config.head_dim % 4 != 0 || id % 4 != 0) {
      return absl::InvalidArgumentError(
          "head_dim and index_head_dim must be multiples of 4 for the KV pages");
    }
    pl.per_page[l] = kKvPageTokens / ratio;
    if (kernels::PagedRowsShift(pl.per_page[l]) < 0) {  // The kernels shift (paged_rows.h).
      return absl::InvalidArgumentError(absl::StrCat("compress ratio ", ratio, " of layer ", l,
                                                     " gives pages of ", pl.per_page[l],
                                                     " entries, not a power of two"));
    }
    pl.entries_at[l] = pl.page_floats;
    pl.keys_at[l] = pl.page_floats + pl.per_page[l] * config.head_dim;
    pl.page_floats = pl.keys_at[l] + pl.per_page[l] * id;
  }
  pl.stride = std::max<int64_t>(64, (pl.page_floats + 63) / 64 * 64);
  return pl;
}

DeviceStateCache::DeviceStateCache(const ModelConfig& config, KvPageLayout pages, cudaStream_t stream,
                                   int64_t budget_bytes)
    : c_(config), pl_(std::move(pages)), stream_(stream), budget_(budget_bytes) {}

DeviceStateCache::~DeviceStateCache() {
  Abort();
  for (auto& [tag, copy] : cached_) Free(copy.get());
  for (void* slab : slabs_) cudaFreeAsync(slab, stream_);
}

float* DeviceStateCache::Row(const Copy& copy, int64_t layer, int64_t e, bool keys) const {
  const size_t l = static_cast<size_t>(layer);
  const int64_t pp = pl_.per_page[l];
  return copy.pages[static_cast<size_t>(e / pp)] + (keys ? pl_.keys_at[l] : pl_.entries_at[l]) +
         (e % pp) * (keys ? c_.index_head_dim : c_.head_dim);
}

absl::StatusOr<float*> DeviceStateCache::TakePage() {
  if (free_.empty()) {
    // Slabs of about 32 MiB (at least one page), zeroed when taken (a reused page keeps its old bytes: only
    // rows below a copy's entry counts are ever read).
    const int64_t pages = std::max<int64_t>(1, (int64_t{32} << 20) / (pl_.stride * 4));
    void* slab = nullptr;
    V4_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&slab, pages * pl_.stride * 4, stream_));
    slabs_.push_back(slab);
    V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(slab, 0, pages * pl_.stride * 4, stream_));
    for (int64_t k = pages - 1; k >= 0; --k) free_.push_back(static_cast<float*>(slab) + k * pl_.stride);
  }
  float* page = free_.back();
  free_.pop_back();
  ++pages_held_;
  return page;
}

void DeviceStateCache::Free(Copy* copy) {
  for (Layer& l : copy->layers) {
    for (float* p :
         {l.window, l.compressor.kv, l.compressor.score, l.compressor.prev_kv, l.compressor.prev_score,
          l.indexer.kv, l.indexer.score, l.indexer.prev_kv, l.indexer.prev_score}) {
      if (p != nullptr) cudaFreeAsync(p, stream_);
    }
    l = Layer{};
  }
  for (float* page : copy->pages) free_.push_back(page);
  pages_held_ -= static_cast<int64_t>(copy->pages.size());
  copy->pages.clear();
  bytes_ -= copy->bytes;
  copy->bytes = 0;
}

absl::Status DeviceStateCache::Reserve(int64_t layer, int64_t n_entries, Copy* copy) {
  const int64_t pp = pl_.per_page[static_cast<size_t>(layer)];
  if (pp == 0) return absl::OkStatus();
  const int64_t need = (n_entries + pp - 1) / pp;
  while (static_cast<int64_t>(copy->pages.size()) < need) {
    ASSIGN_OR_RETURN(float* page, TakePage());
    copy->pages.push_back(page);
    copy->bytes += pl_.stride * 4;
    bytes_ += pl_.stride * 4;
  }
  return absl::OkStatus();
}

absl::Status DeviceStateCache::Put(const std::vector<float>& host, int64_t floats, float** dev, Copy* copy) {
  const int64_t bytes = floats * 4;
  V4_CUDA_RETURN_IF_ERROR(
      cudaMallocAsync(reinterpret_cast<void**>(dev), std::max<int64_t>(bytes, 4), stream_));
  copy->bytes += bytes;
  bytes_ += bytes;
  if (Floats(host) >= floats) {
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(*dev, host.data(), bytes, cudaMemcpyHostToDevice, stream_));
  } else {
    V4_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(*dev, 0, bytes, stream_));
  }
  return absl::OkStatus();
}

absl::Status DeviceStateCache::UploadCompressor(const CompressorState& host, Compressor* dev, Copy* copy) {
  const int64_t floats = host.ratio * (host.overlap ? 2 : 1) * host.width;
  if (Floats(host.kv) != floats || Floats(host.score) != floats) {
    return absl::InternalError(
        absl::StrCat("compressor state holds ", host.kv.size(), " values, expected ", floats));
  }
  RETURN_IF_ERROR(Put(host.kv, floats, &dev->kv, copy));
  RETURN_IF_ERROR(Put(host.score, floats, &dev->score, copy));
  if (host.overlap) {
    RETURN_IF_ERROR(Put(host.prev_kv, floats, &dev->prev_kv, copy));
    RETURN_IF_ERROR(Put(host.prev_score, floats, &dev->prev_score, copy));
  }
  return absl::OkStatus();
}

absl::Status DeviceStateCache::Upload(const SequenceState& state, Copy* copy,
                                      absl::Span<const absl::string_view> pages) {
  copy->position = state.position;
  copy->layers.assign(state.layers.size(), Layer{});
  for (size_t li = 0; li < state.layers.size(); ++li) {
    const AttentionLayerState& ls = state.layers[li];
    Layer& l = copy->layers[li];
    if (!ls.window.empty()) RETURN_IF_ERROR(Put(ls.window, Floats(ls.window), &l.window, copy));
    const int64_t ratio = c_.compress_ratios[li];
    if (ratio == 0) continue;
    RETURN_IF_ERROR(UploadCompressor(ls.compressor, &l.compressor, copy));
    if (ratio == 4) RETURN_IF_ERROR(UploadCompressor(ls.indexer_compressor, &l.indexer, copy));
    const int64_t hd = c_.head_dim, id = ratio == 4 ? c_.index_head_dim : 0;
    const int64_t n = Floats(ls.entries) / hd;
    if (Floats(ls.entries) != n * hd || Floats(ls.indexer_keys) != n * id) {
      return absl::InternalError(absl::StrCat("layer ", li, ": ", ls.entries.size(), " entry values and ",
                                              ls.indexer_keys.size(), " indexer key values do not match"));
    }
    RETURN_IF_ERROR(Reserve(static_cast<int64_t>(li), n, copy));
    l.n_entries = n;
  }
  // The entries into pages, one copy a page: the given payloads as they are, the other pages packed on the
  // host in the page layout (a pageable source is staged before cudaMemcpyAsync returns, so neither needs to
  // outlive this call).
  const int64_t n_pages = static_cast<int64_t>(copy->pages.size()),
                given = static_cast<int64_t>(pages.size());
  if (given > n_pages) {
    return absl::InvalidArgumentError(
        absl::StrCat(given, " KV pages for a state whose entries fill ", n_pages, " pages"));
  }
  for (int64_t k = 0; k < given; ++k) {
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(copy->pages[static_cast<size_t>(k)],
                                            pages[static_cast<size_t>(k)].data(), pl_.PayloadBytes(),
                                            cudaMemcpyHostToDevice, stream_));
  }
  if (n_pages == given) return absl::OkStatus();
  std::vector<float> packed(static_cast<size_t>((n_pages - given) * pl_.page_floats), 0.0f);
  for (size_t li = 0; li < state.layers.size(); ++li) {
    const int64_t pp = pl_.per_page[li];
    if (pp == 0) continue;
    const AttentionLayerState& ls = state.layers[li];
    const int64_t n = copy->layers[li].n_entries;
    const int64_t hd = c_.head_dim, id = c_.compress_ratios[li] == 4 ? c_.index_head_dim : 0;
    for (int64_t k = given; k * pp < n; ++k) {
      const int64_t e0 = k * pp, cnt = std::min(pp, n - e0);
      float* page = packed.data() + (k - given) * pl_.page_floats;
      std::copy_n(ls.entries.data() + e0 * hd, cnt * hd, page + pl_.entries_at[li]);
      if (id > 0) std::copy_n(ls.indexer_keys.data() + e0 * id, cnt * id, page + pl_.keys_at[li]);
    }
  }
  for (int64_t k = given; k < n_pages; ++k) {
    V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(copy->pages[static_cast<size_t>(k)],
                                            packed.data() + (k - given) * pl_.page_floats, pl_.PayloadBytes(),
                                            cudaMemcpyHostToDevice, stream_));
  }
  return absl::OkStatus();
}

bool DeviceStateCache::Valid(const Copy& copy, const SequenceState& state) const {
  bool valid = copy.position == state.position && copy.layers.size() == state.layers.size();
  for (size_t l = 0; valid && l < state.layers.size(); ++l) {
    const int64_t n = Floats(state.layers[l].entries) / c_.head_dim;
    valid = copy.layers[l].n_entries == n &&
            (copy.layers[l].window != nullptr) == !state.layers[l].window.empty();
  }
  return valid;
}

const DeviceStateCache::Copy* DeviceStateCache::Find(const SequenceState& state) const {
  if (state.device_tag == 0) return nullptr;
  auto it = cached_.find(state.device_tag);
  return it != cached_.end() && Valid(*it->second, state) ? it->second.get() : nullptr;
}

absl::Status DeviceStateCache::DownloadPage(const Copy& copy, int64_t k, void* payload) const {
  if (k < 0 || k >= static_cast<int64_t>(copy.pages.size())) {
    return absl::OutOfRangeError(absl::StrCat("page ", k, " of a copy with ", copy.pages.size()));
  }
  V4_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(payload, copy.pages[static_cast<size_t>(k)], pl_.PayloadBytes(),
                                          cudaMemcpyDeviceToHost, stream_));
  V4_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::StatusOr<DeviceStateCache::Copy*> DeviceStateCache::Acquire(SequenceState* state) {
  for (auto& [s, copy] : held_) {
    if (s == state) return copy.get();
  }
  std::unique_ptr<Copy> copy;
  if (auto it = cached_.find(state->device_tag); state->device_tag != 0 && it != cached_.end()) {
    copy = std::move(it->second);
    cached_.erase(it);
    const bool valid = Valid(*copy, *state);
    if (valid) {
      ++hits_;
    } else {
      Free(copy.get());
      copy.reset();
    }
  }
  if (copy == nullptr) {
    ++misses_;
    copy = std::make_unique<Copy>();
    if (absl::Status s = Upload(*state, copy.get()); !s.ok()) {
      Free(copy.get());
      return s;
    }
  }
  copy->last_use = ++clock_;
  state->device_tag = 0;  // Until Commit: a failed forward leaves no tag that names a stale copy.
  held_.emplace_back(state, std::move(copy));
  return held_.back().second.get();
}

absl::Status DeviceStateCache::Adopt(SequenceState* state, absl::Span<const absl::string_view> pages) {
  for (const auto& [s, copy] : held_) {
    if (s == state) return absl::FailedPreconditionError("AdoptKvPages on a state a forward holds");
  }
  for (const absl::string_view page : pages) {
    if (static_cast<int64_t>(page.size()) != pl_.PayloadBytes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("a KV page of ", page.size(), " bytes; this model's are ", pl_.PayloadBytes()));
    }
  }
  const int64_t given = static_cast<int64_t>(pages.size());
  for (size_t l = 0; l < state->layers.size(); ++l) {
    const int64_t n = static_cast<int64_t>(state->layers[l].entries.size()) / c_.head_dim;
    if (pl_.per_page[l] > 0 && n < given * pl_.per_page[l]) {
      return absl::InvalidArgumentError(
          absl::StrCat(given, " KV pages for a state with ", n, " compressed entries in layer ", l));
    }
  }
  if (auto it = cached_.find(state->device_tag); state->device_tag != 0 && it != cached_.end()) {
    Free(it->second.get());
    cached_.erase(it);
  }
  state->device_tag = 0;
  auto copy = std::make_unique<Copy>();
  if (absl::Status s = Upload(*state, copy.get(), pages); !s.ok()) {
    Free(copy.get());
    return s;
  }
  pages_adopted_ += given;
  // Least recent until a forward uses it: a copy adopted for a state that waits (a prefilled sequence in
  // the swapped queue) must not push running sequences' copies out of the budget.
  copy->last_use = 0;
  state->device_tag = NextTag();
  cached_[state->device_tag] = std::move(copy);
  EvictToBudget();
  return absl::OkStatus();
}

void DeviceStateCache::Commit() {
  for (auto& [state, copy] : held_) {
    copy->position = state->position;
    state->device_tag = NextTag();
    cached_[state->device_tag] = std::move(copy);
  }
  held_.clear();
  EvictToBudget();
}

void DeviceStateCache::EvictToBudget() {
  if (bytes_ <= budget_) return;
  std::vector<std::pair<uint64_t, uint64_t>> by_use;  // (last use, tag)
  for (auto& [tag, copy] : cached_) by_use.emplace_back(copy->last_use, tag);
  std::sort(by_use.begin(), by_use.end());
  for (const auto& [use, tag] : by_use) {
    if (bytes_ <= budget_) break;
    auto it = cached_.find(tag);
    Free(it->second.get());
    cached_.erase(it);
  }
}

void DeviceStateCache::Abort() {
  for (auto& [state, copy] : held_) Free(copy.get());
  held_.clear();
}

}  // namespace v4serve::model::cuda
