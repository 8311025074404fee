// Byte-level BPE merge loop (internal to v4serve_model).
//
// Works on raw bytes: each byte starts as the id of its byte-level character, then the lowest-ranked
// adjacent pair is merged (leftmost first on ties) until no pair has a merge, exactly as HF tokenizers'
// BPE model without dropout. Immutable after Build, so EncodePiece is thread-safe.
#ifndef V4SERVE_MODEL_INTERNAL_TOKENIZER_BPE_H_
#define V4SERVE_MODEL_INTERNAL_TOKENIZER_BPE_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace v4serve::model::internal {

class BpeMerger {
 public:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };

  // byte_ids[b] is the id of byte b's single-byte token, or -1 when the vocabulary lacks it (HF then
  // drops the byte, as it has no unk token).
  BpeMerger(std::array<int32_t, 256> byte_ids, absl::flat_hash_map<uint64_t, Merge> merges,
            absl::flat_hash_map<std::string, int32_t> whole_pieces);

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }

  // Appends the ids of one pre-tokenized piece (raw bytes) to `out`.
  void EncodePiece(std::string_view piece, std::vector<int32_t>& out) const;

 private:
  const Merge* Find(int32_t left, int32_t right) const {
    auto it = merges_.find(PairKey(left, right));
    return it == merges_.end() ? nullptr : &it->second;
  }
  void MergeSmall(std::vector<int32_t>& symbols) const;
  void MergeLarge(std::vector<int32_t>& symbols) const;

  std::array<int32_t, 256> byte_ids_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  // Non-empty only with "ignore_merges": pieces found here map to one id without merging.
  absl::flat_hash_map<std::string, int32_t> whole_pieces_;
};

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_TOKENIZER_BPE_H_
