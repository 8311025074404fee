#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "model/internal/tokenizer_unicode.h"
#include "model/tokenizer.h"
#include "model/tokenizer_streaming.h"
#include "tests/model/fuzz/fuzz_targets.h"

namespace v4serve::model::fuzz {
namespace {

const Tokenizer& TestTokenizer() {
  static const Tokenizer* tok = [] {
    const char* root = std::getenv("V4SERVE_SOURCE_DIR");
    const std::string path = std::string(root != nullptr ? root : V4SERVE_TEST_SOURCE_DIR) +
                             "/tests/model/testdata/tokenizer/tokenizer.json";
    auto t = Tokenizer::LoadFromFile(path);
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

}  // namespace

int FuzzStreamingDecode(const uint8_t* data, size_t size) {
  const Tokenizer& tok = TestTokenizer();
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string expected;
  internal::AppendUtf8Lossy(input, expected);

  const std::vector<TokenId> ids = tok.Encode(input);
  auto decoded = tok.Decode(ids);
  if (!decoded.ok() || *decoded != expected) std::abort();
  if (*tok.Decode(tok.EncodeOrdinary(input)) != expected) std::abort();

  StreamingDecoder by_id(tok, {.skip_special_tokens = false});
  std::string streamed;
  for (TokenId id : ids) {
    auto piece = by_id.Push(id);
    if (!piece.ok() || internal::ValidUtf8Prefix(*piece) != piece->size()) std::abort();
    streamed += *piece;
  }
  streamed += by_id.Finish();
  if (streamed != expected) std::abort();

  // Raw bytes in chunks of 1..4 bytes (the chunk size cycles), as token bytes would arrive.
  StreamingDecoder by_bytes(tok, {});
  std::string raw;
  for (size_t pos = 0, n = 1; pos < input.size(); pos += n, n = n % 4 + 1) {
    const std::string piece = by_bytes.PushBytes(input.substr(pos, n));
    if (internal::ValidUtf8Prefix(piece) != piece.size() || by_bytes.pending_bytes() > 3) std::abort();
    raw += piece;
  }
  raw += by_bytes.Finish();
  if (raw != expected) std::abort();
  return 0;
}

}  // namespace v4serve::model::fuzz

#ifndef V4SERVE_FUZZ_NO_MAIN
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return v4serve::model::fuzz::FuzzStreamingDecode(data, size);
}
#endif
