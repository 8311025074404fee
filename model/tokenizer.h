// Tokenizer: DeepSeek-V4's byte-level BPE tokenizer, loaded from a HF tokenizers `tokenizer.json`.
//
// Produces the same ids as HF tokenizers' `Tokenizer.encode(text, add_special_tokens=False)` for the
// DeepSeek V3/V4 file layout: empty normalizer, the three-Split + ByteLevel pre-tokenizer, a BPE model
// without byte fallback or dropout, a ByteLevel decoder and `added_tokens` matched before
// pre-tokenization. Files with other components are rejected at load time (UNIMPLEMENTED) rather than
// tokenized differently. docs/TOKENIZER.md lists what is supported.
//
// Thread-safety: immutable after construction; every const method may be called from any thread.
// Ownership: Load* return a unique_ptr the caller owns; StreamingDecoder and ChatEncoder keep a reference
// to it, so it must outlive them.
#ifndef V4SERVE_MODEL_TOKENIZER_H_
#define V4SERVE_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace v4serve::model {

using TokenId = int32_t;

namespace internal {
class BpeMerger;
class AddedTokenMatcher;
}  // namespace internal

class Tokenizer {
 public:
  // An entry of tokenizer.json's "added_tokens".
  struct AddedToken {
    TokenId id;
    std::string content;
    bool special;     // Dropped by Decode(..., skip_special_tokens=true).
    bool normalized;  // Matched in the second pass (after tokens with normalized=false), as HF does.
  };

  // Reads and parses a tokenizer.json. NOT_FOUND when the file cannot be read, INVALID_ARGUMENT when it
  // is not a well-formed tokenizer.json, UNIMPLEMENTED for components other than DeepSeek's.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromFile(const std::string& path);
  // Same, from the JSON text itself.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromJson(std::string_view json_text);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encodes `text`. Added tokens written in the text (special ones such as "<｜User｜>" included) become
  // their ids, like HF. Ill-formed UTF-8 is first replaced by U+FFFD per maximal ill-formed subpart
  // (Python's bytes.decode("utf-8", "replace")), so any byte string is accepted. Text beyond 1 GiB is
  // tokenized in 1 GiB parts (32-bit offsets inside); request bodies are limited far below that.
  std::vector<TokenId> Encode(std::string_view text) const;
  // Like Encode but added-token strings are tokenized as ordinary text: use it for untrusted text that
  // must not be able to inject control tokens.
  std::vector<TokenId> EncodeOrdinary(std::string_view text) const;

  // Decodes ids to text as HF's decode does (ByteLevel decoder, invalid UTF-8 replaced by U+FFFD).
  // INVALID_ARGUMENT naming the position when an id is outside the vocabulary.
  absl::StatusOr<std::string> Decode(absl::Span<const TokenId> ids, bool skip_special_tokens = false) const;

  // The raw bytes a token stands for (a byte-level token may be part of a UTF-8 character), or nullptr
  // for an unknown id. The pointer stays valid for the Tokenizer's lifetime.
  const std::string* TokenBytes(TokenId id) const;
  // The id of a vocabulary entry or added token by its tokenizer.json spelling (byte-level characters
  // for vocabulary entries, e.g. "Ġthe"; literal content for added tokens, e.g. "<｜User｜>").
  std::optional<TokenId> TokenToId(std::string_view token) const;
  bool IsSpecial(TokenId id) const;
  // One past the largest id (vocabulary and added tokens).
  int32_t vocab_size() const { return static_cast<int32_t>(token_bytes_.size()); }
  const std::vector<AddedToken>& added_tokens() const { return added_tokens_; }

 private:
  Tokenizer();
  friend class TokenizerLoader;

  void EncodeOrdinaryValid(std::string_view text, std::vector<TokenId>& out) const;
  void EncodeValid(std::string_view text, std::vector<TokenId>& out) const;

  std::unique_ptr<internal::BpeMerger> bpe_;
  std::unique_ptr<internal::AddedTokenMatcher> non_normalized_matcher_;
  std::unique_ptr<internal::AddedTokenMatcher> normalized_matcher_;
  std::vector<std::string> token_bytes_;  // by id; empty string for ids that do not exist
  std::vector<uint8_t> id_flags_;         // by id: kExists | kSpecial
  absl::flat_hash_map<std::string, TokenId> token_to_id_;
  std::vector<AddedToken> added_tokens_;
};

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_TOKENIZER_H_
