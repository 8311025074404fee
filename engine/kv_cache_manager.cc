#include "engine/kv_cache_manager.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/state_blocks.h"
#include "kvstore/store_format.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::engine {

using kvstore::BlockHash;
using kvstore::BlockId;
using kvstore::KvBlock;

absl::Status KvCacheOptions::Validate() const {
  if (num_blocks <= 0) return absl::InvalidArgumentError("kv num_blocks must be positive");
  if (swa_policy == SwaPolicy::kPeriodic &&
      (swa_checkpoint_tokens <= 0 || swa_checkpoint_tokens % kvstore::kDefaultBlockTokens != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--swa_checkpoint_tokens must be a positive multiple of ",
                                                   kvstore::kDefaultBlockTokens, ", not ",
                                                   swa_checkpoint_tokens));
  }
  return absl::OkStatus();
}

KvCacheManager::KvCacheManager(const model::ModelConfig& config, kvstore::KvLayout layout,
                               const KvCacheOptions& options, const model::Model* model)
    : config_(config),
      model_(model),
      layout_(std::move(layout)),
      options_(options),
      pool_(options.num_blocks),
      cache_(&pool_, options.events) {}

KvCacheManager::~KvCacheManager() = default;

absl::StatusOr<BlockId> KvCacheManager::AllocateEvicting() {
  absl::StatusOr<BlockId> id = pool_.Allocate();
  if (id.ok() || cache_.Evict(1) == 0) return id;
  return pool_.Allocate();
}

absl::StatusOr<int64_t> KvCacheManager::Admit(Sequence* seq) {
  const int64_t n_tokens = static_cast<int64_t>(seq->tokens.size());
  std::vector<BlockId> blocks;
  std::vector<KvBlock> restored;
  std::vector<EncodedBlock> encoded;  // restored[i] as it came.
  if (options_.enable_prefix_cache && n_tokens > 1) {
    // At least one token must be computed to get the logits that pick the next token.
    const int64_t max_blocks = (n_tokens - 1) / block_tokens();
    const std::vector<BlockHash> hashes = kvstore::BlockHashChain(
        absl::MakeConstSpan(seq->tokens).subspan(0, static_cast<size_t>(max_blocks * block_tokens())),
        block_tokens(), layout_.model_fingerprint, seq->tenant_salt);
    const std::vector<BlockId> hit = cache_.Acquire(hashes);
    for (size_t i = 0; i < hit.size(); ++i) {
      absl::StatusOr<std::string> bytes = pool_.Get(hit[i]);
      absl::StatusOr<KvBlock> block =
          bytes.ok() ? kvstore::DecodeKvBlock(layout_, *bytes) : absl::StatusOr<KvBlock>(bytes.status());
      const bool same_tokens =
          block.ok() && block->block_index == static_cast<int32_t>(i) &&
          std::equal(block->tokens.begin(), block->tokens.end(), seq->tokens.begin() + i * block_tokens());
      if (!same_tokens) {
        V4LOG(WARNING).With("block", hit[i]).With("status", block.status().ToString())
            << "cached KV block unusable; recomputing from here";
        if (!block.ok()) cache_.Erase(hashes[i]);
        for (size_t j = i; j < hit.size(); ++j) pool_.Unref(hit[j]).IgnoreError();
        break;
      }
      blocks.push_back(hit[i]);
      const size_t at =
          static_cast<size_t>(kvstore::KvBlockPayload(layout_, *bytes, *block).data() - bytes->data());
      encoded.push_back({*std::move(bytes), at});
      restored.push_back(*std::move(block));
    }
  }
  if (options_.store != nullptr && options_.enable_prefix_cache &&
      restored.size() < static_cast<size_t>(std::max<int64_t>(0, (n_tokens - 1) / block_tokens()))) {
    const int64_t max_blocks = (n_tokens - 1) / block_tokens();
    const std::vector<BlockHash> hashes = kvstore::BlockHashChain(
        absl::MakeConstSpan(seq->tokens).subspan(0, static_cast<size_t>(max_blocks * block_tokens())),
        block_tokens(), layout_.model_fingerprint, seq->tenant_salt);
    FetchFromStore(*seq, hashes, &blocks, &restored, &encoded);
  }
  if (!restored.empty() && restored.back().boundary_state.empty() && model_ == nullptr) {
    // No model to recompute with: reuse up to the last block that carries its window state.
    size_t keep = restored.size();
    while (keep > 0 && restored[keep - 1].boundary_state.empty()) --keep;
    for (size_t j = keep; j < blocks.size(); ++j) pool_.Unref(blocks[j]).IgnoreError();
    blocks.resize(keep);
    restored.resize(keep);
    encoded.resize(keep);
  }
  model::SequenceState state;
  bool adopt = false;  // The state's entries are exactly the restored blocks' payloads.
  if (!restored.empty()) {
    int64_t recomputed = 0;
    absl::StatusOr<model::SequenceState> s =
        model_ != nullptr ? RestoreWithRecompute(*model_, layout_, restored, &recomputed)
                          : RestoreState(config_, layout_, restored);
    recomputed_tokens_ += recomputed;
    if (s.ok()) {
      state = *std::move(s);
      adopt = recomputed == 0;
    } else {
      V4LOG(WARNING).With("status", s.status().ToString()) << "cached prefix does not restore; recomputing";
      for (BlockId b : blocks) pool_.Unref(b).IgnoreError();
      blocks.clear();
      restored.clear();
    }
  }
  if (restored.empty()) state = model::NewSequenceState(config_);
  const int64_t reused = static_cast<int64_t>(restored.size());
  RETURN_IF_ERROR(AllocateUpTo(&blocks, BlocksFor(n_tokens)));
  // Admitted: the backend may take the blocks' payloads as they are (one copy a page into the CUDA
  // backend's device KV cache) for the step about to run. Only now, so that an admission that fails for
  // want of blocks (and is retried each step) leaves no device copy behind.
  if (adopt) {
    std::vector<absl::string_view> payloads;
    for (const EncodedBlock& e : encoded) {
      payloads.push_back(
          absl::string_view(e.bytes).substr(e.payload_at, static_cast<size_t>(layout_.PayloadBytes())));
    }
    AdoptPages(&state, payloads);
  }
  seq->blocks = std::move(blocks);
  seq->cached_blocks = static_cast<int32_t>(reused);
  seq->state = std::move(state);
  return reused * block_tokens();
}

void KvCacheManager::AdoptPages(model::SequenceState* state, absl::Span<const absl::string_view> payloads) {
  if (model_ == nullptr || payloads.empty()) return;
  if (absl::Status a = model_->AdoptKvPages(state, payloads); a.ok()) {
    pages_adopted_ += static_cast<int64_t>(payloads.size());
  } else if (a.code() != absl::StatusCode::kUnimplemented) {  // UNIMPLEMENTED: a CPU backend.
    V4LOG(WARNING).With("status", a.ToString()) << "KV pages not adopted by the backend; uploading instead";
  }
}

absl::Status KvCacheManager::AllocateUpTo(std::vector<BlockId>* blocks, int64_t count) {
  while (static_cast<int64_t>(blocks->size()) < count) {
    absl::StatusOr<BlockId> id = AllocateEvicting();
    if (!id.ok()) {
      for (BlockId b : *blocks) pool_.Unref(b).IgnoreError();
      blocks->clear();
      return id.status();
    }
    blocks->push_back(*id);
  }
  return absl::OkStatus();
}

absl::Status KvCacheManager::SwapIn(Sequence* seq) {
  ASSIGN_OR_RETURN(model::SequenceState state, model::DeserializeSequenceState(config_, seq->swapped_state));
  std::vector<BlockId> blocks;
  RETURN_IF_ERROR(AllocateUpTo(&blocks, BlocksFor(static_cast<int64_t>(seq->tokens.size()))));
  seq->blocks = std::move(blocks);
  state.device_tag = seq->swapped_device_tag;  // Trusted by the backend only while it matches the state.
  seq->swapped_device_tag = 0;
  seq->state = std::move(state);
  // The swapped-in copies are not the cached blocks: republish nothing before the current position.
  seq->cached_blocks = static_cast<int32_t>(seq->state.position / block_tokens());
  std::string().swap(seq->swapped_state);
  return absl::OkStatus();
}

void KvCacheManager::SwapOut(Sequence* seq) {
  seq->swapped_state = model::SerializeSequenceState(seq->state);
  seq->swapped_device_tag = seq->state.device_tag;
  Release(seq);
}

absl::Status KvCacheManager::Grow(Sequence* seq, int64_t tokens) {
  const size_t want = static_cast<size_t>(BlocksFor(tokens));
  std::vector<BlockId> added;
  while (seq->blocks.size() + added.size() < want) {
    absl::StatusOr<BlockId> id = AllocateEvicting();
    if (!id.ok()) {
      for (BlockId b : added) pool_.Unref(b).IgnoreError();
      return id.status();
    }
    added.push_back(*id);
  }
  seq->blocks.insert(seq->blocks.end(), added.begin(), added.end());
  return absl::OkStatus();
}

void KvCacheManager::OnBlockBoundary(Sequence* seq) {
  if (!options_.enable_prefix_cache) return;
  const int64_t pos = seq->state.position;
  if (pos == 0 || pos % block_tokens() != 0) return;
  const int32_t index = static_cast<int32_t>(pos / block_tokens()) - 1;
  if (index < seq->cached_blocks || index >= static_cast<int32_t>(seq->blocks.size())) return;
  if (index != seq->cached_blocks) {
    // An earlier block is not cached (publication failed, or restored from swap): the chain has a gap,
    // and later hashes would name prefixes the cache cannot serve. Stop publishing for this sequence.
    return;
  }
  const std::vector<BlockHash> hashes =
      kvstore::BlockHashChain(absl::MakeConstSpan(seq->tokens).subspan(0, static_cast<size_t>(pos)),
                              block_tokens(), layout_.model_fingerprint, seq->tenant_salt);
  const BlockHash hash = hashes.back();
  absl::StatusOr<KvBlock> block = ExtractBlock(
      config_, layout_, seq->state, index,
      absl::MakeConstSpan(seq->tokens).subspan(static_cast<size_t>(index) * block_tokens(), block_tokens()),
      hash);
  if (block.ok()) {
    const bool keep_state =
        KeepsWindowState(options_.swa_policy, options_.swa_checkpoint_tokens, index, block_tokens());
    if (options_.store != nullptr) WriteBehind(*seq, *block, keep_state);
    if (!keep_state) block->boundary_state.clear();
  }
  absl::StatusOr<std::string> bytes =
      block.ok() ? kvstore::EncodeKvBlock(layout_, *block) : absl::StatusOr<std::string>(block.status());
  const BlockId mine = seq->blocks[static_cast<size_t>(index)];
  absl::Status put = bytes.ok() ? pool_.Put(mine, *std::move(bytes)) : bytes.status();
  if (!put.ok()) {
    V4LOG(WARNING).With("status", put.ToString()) << "KV block not published";
    return;
  }
  if (!cache_.Insert(hash, mine)) {
    // Another sequence published the same prefix first: share its block and free ours.
    std::vector<BlockId> theirs = cache_.Acquire(absl::MakeConstSpan(&hash, 1));
    if (theirs.size() == 1) {
      pool_.Unref(mine).IgnoreError();
      seq->blocks[static_cast<size_t>(index)] = theirs[0];
    }
  }
  seq->cached_blocks = index + 1;
}

void KvCacheManager::FetchFromStore(const Sequence& seq, absl::Span<const BlockHash> hashes,
                                    std::vector<BlockId>* blocks, std::vector<KvBlock>* restored,
                                    std::vector<EncodedBlock>* encoded) {
  const kvstore::StoreScope scope{layout_.model_fingerprint, seq.tenant_salt};
  const size_t have = blocks->size();
  absl::StatusOr<kvstore::LookupResult> found = options_.store->Lookup(scope, hashes.subspan(have));
  if (!found.ok()) {
    V4LOG(WARNING).With("status", found.status().ToString()) << "KV store lookup failed; computing instead";
    return;
  }
  for (int32_t k = 0; k < found->matched; ++k) {
    const size_t i = have + static_cast<size_t>(k);
    absl::StatusOr<kvstore::StoredBlock> stored = options_.store->Get(scope, hashes[i], /*with_state=*/true);
    if (!stored.ok()) break;  // Evicted meanwhile, or failed verification (counted by the store).
    absl::StatusOr<KvBlock> block = kvstore::DecodeKvBlock(layout_, stored->block);
    if (!block.ok() || block->block_hash != hashes[i] || block->block_index != static_cast<int32_t>(i) ||
        !std::equal(block->tokens.begin(), block->tokens.end(), seq.tokens.begin() + i * block_tokens())) {
      V4LOG(WARNING).With("status", block.status().ToString()) << "stored KV block unusable; recomputing";
      break;
    }
    // Before the boundary state changes: the payload's place in the bytes depends on the encoded one.
    const size_t at = static_cast<size_t>(kvstore::KvBlockPayload(layout_, stored->block, *block).data() -
                                          stored->block.data());
    if (!stored->window_state.empty()) {
      absl::StatusOr<kvstore::WindowState> ws = kvstore::DecodeWindowState(stored->window_state);
      // A state that does not match is ignored: the policy's recomputation rebuilds it exactly.
      if (ws.ok() && ws->hash == hashes[i] && ws->index == static_cast<int32_t>(i) &&
          ws->model_fingerprint == layout_.model_fingerprint) {
        block->boundary_state = std::move(ws->state);
      }
    }
    absl::StatusOr<BlockId> id = AllocateEvicting();
    if (!id.ok()) break;
    absl::StatusOr<std::string> bytes = kvstore::EncodeKvBlock(layout_, *block);
    if (!bytes.ok() || !pool_.Put(*id, *std::move(bytes)).ok()) {
      pool_.Unref(*id).IgnoreError();
      break;
    }
    cache_.Insert(hashes[i], *id);  // Promoted to this process's tier (false: another copy is cached).
    blocks->push_back(*id);
    encoded->push_back({std::move(stored->block), at});
    restored->push_back(*std::move(block));
    store_hit_tokens_ += block_tokens();
  }
}

void KvCacheManager::WriteBehind(const Sequence& seq, const KvBlock& block, bool keep_state) {
  KvBlock entries_only = block;
  std::string state = std::move(entries_only.boundary_state);
  entries_only.boundary_state.clear();
  absl::StatusOr<std::string> bytes = kvstore::EncodeKvBlock(layout_, entries_only);
  if (!bytes.ok()) return;
  kvstore::StoredBlock out;
  out.hash = block.block_hash;
  out.index = block.block_index;
  out.block = *std::move(bytes);
  if (keep_state && !state.empty()) {
    out.window_state = kvstore::EncodeWindowState(kvstore::WindowState{
        layout_.model_fingerprint, block.block_hash, block.block_index, std::move(state)});
  }
  options_.store->PutAsync(kvstore::StoreScope{layout_.model_fingerprint, seq.tenant_salt}, std::move(out));
}

absl::Status KvCacheManager::Fork(const Sequence& parent, Sequence* child) {
  const size_t full = static_cast<size_t>(parent.state.position / block_tokens());
  std::vector<BlockId> blocks;
  auto undo = [&] {
    for (BlockId b : blocks) pool_.Unref(b).IgnoreError();
  };
  for (size_t i = 0; i < full && i < parent.blocks.size(); ++i) {
    absl::Status s = pool_.Ref(parent.blocks[i]);
    if (!s.ok()) {
      undo();
      return s;
    }
    blocks.push_back(parent.blocks[i]);
  }
  while (static_cast<int64_t>(blocks.size()) < BlocksFor(static_cast<int64_t>(child->tokens.size()))) {
    absl::StatusOr<BlockId> id = AllocateEvicting();
    if (!id.ok()) {
      undo();
      return id.status();
    }
    blocks.push_back(*id);
  }
  child->blocks = std::move(blocks);
  child->cached_blocks = std::min<int32_t>(parent.cached_blocks, static_cast<int32_t>(full));
  child->state = parent.state;
  return absl::OkStatus();
}

void KvCacheManager::Release(Sequence* seq) {
  for (BlockId b : seq->blocks) pool_.Unref(b).IgnoreError();
  seq->blocks.clear();
  seq->cached_blocks = 0;
  seq->state = model::SequenceState();
}

}  // namespace v4serve::engine
