// StreamingDecoder: turns generated token ids into text one id at a time, for streaming responses.
//
// Never emits part of a UTF-8 character: bytes of a character split across tokens are held until the
// character is complete. Bytes that can never form a character are emitted as U+FFFD, one per maximal
// ill-formed subpart, so the concatenation of every Push() result and Finish() equals
// Tokenizer::Decode() of all ids (and HF tokenizers' decode).
//
// Thread-safety: externally synchronized (one decoder per generation stream). Holds a reference to the
// Tokenizer, which must outlive it.
#ifndef V4SERVE_MODEL_TOKENIZER_STREAMING_H_
#define V4SERVE_MODEL_TOKENIZER_STREAMING_H_

#include <string>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace v4serve::model {

class StreamingDecoder {
 public:
  struct Options {
    // Drop special tokens (BOS, EOS, <｜User｜>, ...) from the text, like HF skip_special_tokens.
    bool skip_special_tokens = true;
  };

  StreamingDecoder(const Tokenizer& tokenizer, Options options);

  // Appends one id; returns the text completed by it (often empty). INVALID_ARGUMENT for an id outside
  // the vocabulary; the decoder's state is then unchanged.
  absl::StatusOr<std::string> Push(TokenId id);
  // Appends raw bytes (as if from tokens); returns the completed text. For tests and fuzzing.
  std::string PushBytes(std::string_view bytes);
  // Ends the stream: returns the held incomplete character as U+FFFD (or "" when none) and resets.
  std::string Finish();

  // Bytes held back because they may start a character (at most 3).
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tokenizer_;
  Options options_;
  std::string pending_;
};

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_TOKENIZER_STREAMING_H_
