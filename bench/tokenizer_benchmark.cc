// Tokenizer and chat-encoding micro benchmarks. Baseline: tools/tokenizer/hf_speed.py runs HF tokenizers on
// the same text and this binary, and prints both figures and their ratio (docs/TOKENIZER.md).
//
//   build/default/bench/v4serve_tokenizer_bench [--text=FILE] [--tokenizer=FILE]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include "model/chat_encoder.h"
#include "model/dsml_parser.h"
#include "model/tokenizer.h"
#include "model/tokenizer_streaming.h"

namespace {

using v4serve::model::Tokenizer;

std::string g_text_path = V4SERVE_SOURCE_DIR "/tests/model/testdata/tokenizer/bench_text.txt";
std::string g_tokenizer_path = V4SERVE_SOURCE_DIR "/tests/model/testdata/tokenizer/tokenizer.json";
constexpr int kRepeat = 25;  // same as tools/tokenizer/hf_speed.py

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

const Tokenizer& Tok() {
  static const Tokenizer* tok = [] {
    auto t = Tokenizer::LoadFromFile(g_tokenizer_path);
    if (!t.ok()) {
      std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
      std::abort();
    }
    return t->release();
  }();
  return *tok;
}

const std::string& Text() {
  static const std::string text = [] {
    const std::string one = ReadFile(g_text_path);
    std::string all;
    for (int i = 0; i < kRepeat; ++i) all += one;
    return all;
  }();
  return text;
}

void BM_Encode(benchmark::State& state) {
  const Tokenizer& tok = Tok();
  const std::string& text = Text();
  size_t ids = 0;
  for (auto _ : state) {
    auto out = tok.Encode(text);
    ids = out.size();
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.counters["ids"] = static_cast<double>(ids);
}
BENCHMARK(BM_Encode)->Unit(benchmark::kMillisecond);

// The text cut after the first newline past every 4 KiB, like request-sized inputs (hf_speed.py cuts it
// the same way).
std::vector<std::string> Chunks() {
  std::vector<std::string> chunks;
  std::string cur;
  const std::string& text = Text();
  size_t start = 0;
  while (start < text.size()) {
    size_t nl = text.find('\n', start);
    nl = nl == std::string::npos ? text.size() : nl + 1;
    cur.append(text, start, nl - start);
    start = nl;
    if (cur.size() >= 4096) chunks.push_back(std::move(cur)), cur.clear();
  }
  if (!cur.empty()) chunks.push_back(cur);
  return chunks;
}

void BM_EncodeChunks(benchmark::State& state) {
  const Tokenizer& tok = Tok();
  const auto chunks = Chunks();
  for (auto _ : state) {
    for (const auto& c : chunks) benchmark::DoNotOptimize(tok.Encode(c).data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * Text().size()));
}
BENCHMARK(BM_EncodeChunks)->Unit(benchmark::kMillisecond);

void BM_Decode(benchmark::State& state) {
  const Tokenizer& tok = Tok();
  const auto ids = tok.Encode(Text());
  for (auto _ : state) benchmark::DoNotOptimize(tok.Decode(ids));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * Text().size()));
}
BENCHMARK(BM_Decode)->Unit(benchmark::kMillisecond);

void BM_StreamingDecode(benchmark::State& state) {
  const Tokenizer& tok = Tok();
  const auto ids = tok.Encode(Text());
  for (auto _ : state) {
    v4serve::model::StreamingDecoder decoder(tok, {});
    size_t bytes = 0;
    for (auto id : ids) bytes += decoder.Push(id)->size();
    benchmark::DoNotOptimize(bytes);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * ids.size()));
}
BENCHMARK(BM_StreamingDecode)->Unit(benchmark::kMillisecond);

void BM_DsmlParserStreaming(benchmark::State& state) {
  const Tokenizer& tok = Tok();
  const auto ids = tok.Encode(Text());
  std::vector<std::string> pieces;
  pieces.reserve(ids.size());
  v4serve::model::StreamingDecoder decoder(tok, {});
  for (auto id : ids) pieces.push_back(*decoder.Push(id));
  for (auto _ : state) {
    v4serve::model::DsmlParser parser({.thinking = true});
    size_t n = 0;
    for (const auto& p : pieces) n += parser.Push(p).size();
    n += parser.Finish().size();
    benchmark::DoNotOptimize(n);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * Text().size()));
}
BENCHMARK(BM_DsmlParserStreaming)->Unit(benchmark::kMillisecond);

void BM_ChatEncode(benchmark::State& state) {
  v4serve::model::ChatEncoder encoder(Tok());
  const auto messages = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees."},
    {"role": "user", "content": "Thanks! And tomorrow?"}])");
  const auto tools =
      nlohmann::ordered_json::parse(R"([{"type": "function", "function": {"name": "get_weather",
    "description": "Weather forecast", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}])");
  for (auto _ : state) {
    auto prompt = encoder.Encode(messages, tools, {.thinking_mode = v4serve::model::ThinkingMode::kThinking});
    benchmark::DoNotOptimize(prompt->ids.data());
  }
}
BENCHMARK(BM_ChatEncode)->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--text=", 7) == 0) g_text_path = argv[i] + 7;
    if (std::strncmp(argv[i], "--tokenizer=", 12) == 0) g_tokenizer_path = argv[i] + 12;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
