// Fuzz entry points for the tokenizer and chat code. Each *_fuzzer.cc defines one and, unless
// V4SERVE_FUZZ_NO_MAIN is set, LLVMFuzzerTestOneInput calling it; fuzz_seeds_test.cc runs all of them
// over the committed seed corpora so every CI build exercises them. A violated invariant aborts.
#ifndef V4SERVE_TESTS_MODEL_FUZZ_FUZZ_TARGETS_H_
#define V4SERVE_TESTS_MODEL_FUZZ_FUZZ_TARGETS_H_

#include <cstddef>
#include <cstdint>

namespace v4serve::model::fuzz {

// Byte 0 picks thinking mode and a chunk size; the rest is model output fed to DsmlParser in chunks.
// Checks: streamed == one-shot parse, tool-call arguments are JSON objects, no-DSML text is lossless.
int FuzzDsmlParser(const uint8_t* data, size_t size);
// The input is text: Decode(Encode(text)) must be the text with ill-formed UTF-8 replaced, and the
// StreamingDecoder must produce the same text, in valid UTF-8 pieces, whatever the chunking.
int FuzzStreamingDecode(const uint8_t* data, size_t size);
// The input is a JSON request body {"messages": ..., "tools": ...}: rendering must not crash and either
// succeed or return INVALID_ARGUMENT.
int FuzzChatRender(const uint8_t* data, size_t size);

}  // namespace v4serve::model::fuzz

#endif  // V4SERVE_TESTS_MODEL_FUZZ_FUZZ_TARGETS_H_
