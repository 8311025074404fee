// Engine throughput and prefix-cache latency on the tiny V4 (exact FP32 mode, CPU):
//   BM_EngineDecode/B: B concurrent greedy sequences (64-token prompts), decode tokens/s after their
//     prefill; B = 1 is the baseline of the same run (the batching gain is items_per_second / B=1's).
//   BM_EngineTtft/cached: time to first token of a request whose 1,024-token prefix is cached
//     (only its 32-token tail is computed), against /cold: the same request on an empty cache.
//   BM_QuickInstructionTtft/N: a quick instruction (<｜title｜> after an N-token conversation and its
//     answer) measured both ways in the same iteration: cold (empty cache) and after the conversation
//     ran on the same engine (its blocks cached). Counters: cold_ms, quick_ms, ratio (target <= 5%).
//
//   build/default/bench/v4serve_engine_bench --benchmark_min_time=2
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <random>

#include "engine/engine.h"
#include "model/model.h"

namespace v4serve::engine {
namespace {

std::string SourceDir() {
  const char* s = std::getenv("V4SERVE_SOURCE_DIR");
  return s ? s : V4SERVE_SOURCE_DIR_DEFAULT;
}

const model::Model& TinyModel() {
  static const model::Model* m = [] {
    model::ModelOptions mo;
    mo.load_mtp = true;  // For the MTP cases of BM_EngineDecode; the main forward is the same.
    auto r = model::Model::Load(SourceDir() + "/tests/model/testdata/tiny_v4", mo);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
      std::abort();
    }
    return r->release();
  }();
  return *m;
}

std::vector<int32_t> Tokens(std::mt19937* rng, int n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = static_cast<int32_t>(2 + (*rng)() % 510);
  return t;
}

std::unique_ptr<Engine> MakeEngine(bool mtp = false, int64_t num_blocks = 512) {
  EngineOptions o;
  o.mtp = mtp;
  o.kv.num_blocks = num_blocks;
  o.scheduler.max_step_tokens = 2048;
  o.scheduler.max_running = 256;
  auto e = Engine::Create(&TinyModel(), o);
  if (!e.ok()) std::abort();
  return *std::move(e);
}

EngineRequest Greedy(const std::string& id, std::vector<int32_t> prompt, int max_tokens, int64_t* tokens) {
  EngineRequest r;
  r.request_id = id;
  r.prompt = std::move(prompt);
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  r.on_output = [tokens](const SequenceOutput& o) { *tokens += o.token ? 1 : 0; };
  return r;
}

void BM_EngineDecode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const bool mtp = state.range(1) == 1;
  constexpr int kDecodeTokens = 32;
  std::mt19937 rng(1);
  int64_t decoded = 0, drafts = 0, accepted = 0;
  for (auto _ : state) {
    std::unique_ptr<Engine> e = MakeEngine(mtp);
    int64_t tokens = 0;
    for (int i = 0; i < batch; ++i) {
      if (!e->Submit(Greedy("r" + std::to_string(i), Tokens(&rng, 64), kDecodeTokens + 1, &tokens)).ok()) {
        std::abort();
      }
    }
    while (tokens < batch) {  // Prefill (each sequence's first token).
      if (!e->Step().ok()) std::abort();
    }
    const auto start = std::chrono::steady_clock::now();
    while (e->HasWork()) {
      if (!e->Step().ok()) std::abort();
    }
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    decoded += tokens - batch;
    drafts += e->stats().mtp_draft_tokens;
    accepted += e->stats().mtp_accepted_tokens;
  }
  state.SetItemsProcessed(decoded);
  state.counters["batch"] = batch;
  state.counters["mtp_acceptance"] = drafts > 0 ? static_cast<double>(accepted) / drafts : 0.0;
}
// Args: batch, MTP (0 off, 1 on: greedy drafts verified one sequence per 2-token prefill).
BENCHMARK(BM_EngineDecode)
    ->ArgNames({"batch", "mtp"})
    ->Args({1, 0})
    ->Args({4, 0})
    ->Args({16, 0})
    ->Args({32, 0})
    ->Args({64, 0})
    ->Args({1, 1})
    ->Args({4, 1})
    ->Args({16, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_EngineTtft(benchmark::State& state) {
  const bool cached = state.range(0) == 1;
  std::mt19937 rng(2);
  const std::vector<int32_t> prefix = Tokens(&rng, 1024);
  int n = 0;
  for (auto _ : state) {
    std::unique_ptr<Engine> e = MakeEngine();
    int64_t tokens = 0;
    if (cached) {  // Warm the cache with another request on the same prefix.
      std::vector<int32_t> warm = prefix;
      for (int32_t t : Tokens(&rng, 20)) warm.push_back(t);
      if (!e->Submit(Greedy("warm", warm, 1, &tokens)).ok()) std::abort();
      while (e->HasWork()) {
        if (!e->Step().ok()) std::abort();
      }
    }
    std::vector<int32_t> prompt = prefix;
    for (int32_t t : Tokens(&rng, 32)) prompt.push_back(t);
    int64_t first = 0;
    const auto start = std::chrono::steady_clock::now();
    if (!e->Submit(Greedy("q" + std::to_string(n++), prompt, 1, &first)).ok()) std::abort();
    while (first == 0) {
      if (!e->Step().ok()) std::abort();
    }
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    state.counters["prefill_tokens"] = static_cast<double>(e->stats().prefill_tokens_computed);
    state.counters["prefix_hit_tokens"] = static_cast<double>(e->stats().prefix_hit_tokens);
  }
}
BENCHMARK(BM_EngineTtft)->ArgName("cached")->Arg(0)->Arg(1)->UseManualTime()->Unit(benchmark::kMillisecond);

// Runs `prompt` on `e` until its first token; returns the seconds that took.
double TimeToFirstToken(Engine* e, const std::string& id, const std::vector<int32_t>& prompt) {
  int64_t first = 0;
  const auto start = std::chrono::steady_clock::now();
  if (!e->Submit(Greedy(id, prompt, 1, &first)).ok()) std::abort();
  while (first == 0) {
    if (!e->Step().ok()) std::abort();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  while (e->HasWork()) {
    if (!e->Step().ok()) std::abort();
  }
  return s;
}

void BM_QuickInstructionTtft(benchmark::State& state) {
  const int conversation_tokens = static_cast<int>(state.range(0));
  constexpr int32_t kEos = 1, kTitle = 3;  // a task token after the answer's end-of-sentence
  std::mt19937 rng(3);
  const std::vector<int32_t> conversation = Tokens(&rng, conversation_tokens);
  std::vector<int32_t> quick = conversation;
  for (int32_t t : Tokens(&rng, 40)) quick.push_back(t);  // the assistant's answer
  quick.push_back(kEos);
  quick.push_back(kTitle);
  for (auto _ : state) {
    std::unique_ptr<Engine> cold = MakeEngine(/*mtp=*/false, /*num_blocks=*/conversation_tokens / 64 + 64);
    const double cold_s = TimeToFirstToken(cold.get(), "cold", quick);
    cold.reset();
    std::unique_ptr<Engine> e = MakeEngine(/*mtp=*/false, /*num_blocks=*/conversation_tokens / 64 + 64);
    std::vector<int32_t> turn = conversation;
    TimeToFirstToken(e.get(), "conversation", turn);  // the conversation's own request caches its blocks
    const int64_t computed_before = e->stats().prefill_tokens_computed;
    const double quick_s = TimeToFirstToken(e.get(), "title", quick);
    state.SetIterationTime(quick_s);
    state.counters["cold_ms"] = cold_s * 1e3;
    state.counters["quick_ms"] = quick_s * 1e3;
    state.counters["ratio"] = quick_s / cold_s;
    state.counters["quick_prefill_tokens"] =
        static_cast<double>(e->stats().prefill_tokens_computed - computed_before);
  }
}
BENCHMARK(BM_QuickInstructionTtft)
    ->ArgName("conversation_tokens")
    ->Arg(4096)
    ->Arg(32768)
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace v4serve::engine

BENCHMARK_MAIN();
