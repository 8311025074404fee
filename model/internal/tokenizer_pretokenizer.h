// DeepSeek V3/V4 pre-tokenizer (internal to v4serve_model): a hand-written scanner equivalent to the
// tokenizer.json "Sequence" of three Isolated regex Splits,
//   1. \p{N}{1,3}
//   2. [一-龥぀-ゟ゠-ヿ]+
//   3. [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|
//      ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// as HF tokenizers runs them with Oniguruma (leftmost-first alternation, each later Split applied to
// the pieces of the earlier one, so a piece's end acts as end of input for (?!\S)).
//
// Stateless and thread-safe. Input must be valid UTF-8 (the Tokenizer sanitizes it first).
#ifndef V4SERVE_MODEL_INTERNAL_TOKENIZER_PRETOKENIZER_H_
#define V4SERVE_MODEL_INTERNAL_TOKENIZER_PRETOKENIZER_H_

#include <cstdint>
#include <string_view>
#include <vector>

namespace v4serve::model::internal {

// A piece of the input as a byte range.
struct PieceSpan {
  uint32_t begin;
  uint32_t end;
};

// Scratch buffers reused across calls to avoid allocations; owned by the caller, one per thread.
struct PreTokenizerScratch {
  std::vector<uint16_t> flags;    // per code point
  std::vector<uint32_t> offsets;  // byte offset of each code point, plus the end
};

// Replaces `pieces` with the pieces of `text`, in order; their concatenation is `text`.
void PreTokenize(std::string_view text, PreTokenizerScratch& scratch, std::vector<PieceSpan>& pieces);

}  // namespace v4serve::model::internal

#endif  // V4SERVE_MODEL_INTERNAL_TOKENIZER_PRETOKENIZER_H_
