// CPU prefill and decode throughput of the exact-mode forward pass (baselines, no targets):
//   * the tiny V4 of tests/model/testdata/tiny_v4 (every layer kind, hash + score routing);
//   * one V4-Flash-shaped CSA layer with random BF16 weights (hidden 4096, 64 heads x 512, indexer 64 x 128,
//     expert width 2048) but 8 routed experts (6 active) and a 4096-token vocabulary so that it fits in the
//     memory of a small CPU machine.
// Each benchmark reports tokens/s as items_per_second, plus a baseline of the same machine measured in the
// same run: single-matrix FP32 GEMM throughput (BM_MatmulBaseline, GFLOP/s).
//
//   build/default/bench/v4serve_model_bench --benchmark_min_time=1s
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "model/checkpoint_layout.h"
#include "model/cpu/ops.h"
#include "model/model.h"
#include "model/numeric_formats.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

std::string SourceDir() {
  const char* s = std::getenv("V4SERVE_SOURCE_DIR");
  return s ? s : V4SERVE_SOURCE_DIR_DEFAULT;
}

const Model& TinyModel(NumericMode mode = NumericMode::kExact) {
  static const Model* exact = nullptr;
  static const Model* faithful = nullptr;
  const Model*& m = mode == NumericMode::kExact ? exact : faithful;
  if (m != nullptr) return *m;
  m = [mode] {
    ModelOptions options;
    options.mode = mode;
    auto r = Model::Load(SourceDir() + "/tests/model/testdata/tiny_v4", options);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
      std::abort();
    }
    return r->release();
  }();
  return *m;
}

// Writes config.json and a random BF16 checkpoint for `config` into a temp dir; returns the dir.
std::string WriteRandomCheckpoint(const nlohmann::json& config_json, const ModelConfig& c) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("v4serve_bench_flash_layer_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config_json.dump();
  nlohmann::json header = nlohmann::json::object();
  uint64_t off = 0;
  std::vector<TensorSpec> specs = CheckpointTensors(c);
  for (const TensorSpec& t : specs) {
    const uint64_t bytes = static_cast<uint64_t>(t.elements()) * (t.is_int ? 8 : 2);
    header[t.name] = {
        {"dtype", t.is_int ? "I64" : "BF16"}, {"shape", t.shape}, {"data_offsets", {off, off + bytes}}};
    off += bytes;
  }
  std::string hs = header.dump();
  std::ofstream out(dir / "model.safetensors", std::ios::binary);
  const uint64_t n = hs.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << hs;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<char> buf;
  for (const TensorSpec& t : specs) {
    const int64_t count = t.elements();
    if (t.is_int) {
      std::vector<int64_t> v(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) v[i] = i % c.n_routed_experts;
      out.write(reinterpret_cast<const char*>(v.data()), count * 8);
      continue;
    }
    const bool is_norm = t.name.find("norm") != std::string::npos;
    const float scale = t.shape.size() == 2 ? 1.0f / std::sqrt(static_cast<float>(t.shape[1])) : 0.1f;
    std::vector<uint16_t> v(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) v[i] = FloatToBf16(is_norm ? 1.0f : normal(rng) * scale);
    out.write(reinterpret_cast<const char*>(v.data()), count * 2);
  }
  return dir.string();
}

const Model& FlashLayerModel() {
  static const Model* m = [] {
    std::ifstream in(SourceDir() + "/tests/model/testdata/v4_flash_config.json");
    nlohmann::json j = nlohmann::json::parse(in);
    j["num_hidden_layers"] = 1;
    j["num_nextn_predict_layers"] = 0;
    j["compress_ratios"] = {4};
    j["num_hash_layers"] = 0;
    j["n_routed_experts"] = 8;
    j["vocab_size"] = 4096;
    j.erase("quantization_config");
    auto config = ParseModelConfig(j.dump());
    if (!config.ok()) std::abort();
    const std::string dir = WriteRandomCheckpoint(j, *config);
    auto r = Model::Load(dir, ModelOptions{});
    std::filesystem::remove_all(dir);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
      std::abort();
    }
    return r->release();
  }();
  return *m;
}

std::vector<int32_t> Tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(2 + (i * 7919) % (vocab - 2));
  return t;
}

void Prefill(benchmark::State& state, const Model& m) {
  const std::vector<int32_t> tokens = Tokens(state.range(0), m.config().vocab_size);
  for (auto _ : state) {
    SequenceState s = m.NewState();
    benchmark::DoNotOptimize(m.Prefill(&s, tokens));
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

// Decode of one token for each of range(1) sequences, each after a range(0)-token prompt.
void Decode(benchmark::State& state, const Model& m) {
  const int64_t batch = state.range(1);
  std::vector<SequenceState> states;
  for (int64_t b = 0; b < batch; ++b) {
    states.push_back(m.NewState());
    (void)m.Prefill(&states.back(), Tokens(state.range(0), m.config().vocab_size));
  }
  std::vector<SequenceState*> ptrs;
  ptrs.reserve(states.size());
  for (auto& s : states) ptrs.push_back(&s);
  std::vector<int32_t> next(static_cast<size_t>(batch), 5);
  for (auto _ : state) benchmark::DoNotOptimize(m.Decode(ptrs, next));
  state.SetItemsProcessed(state.iterations() * batch);
}

void BM_TinyPrefill(benchmark::State& s) { Prefill(s, TinyModel()); }
void BM_TinyDecode(benchmark::State& s) { Decode(s, TinyModel()); }
void BM_TinyPrefillFaithful(benchmark::State& s) { Prefill(s, TinyModel(NumericMode::kFaithful)); }
void BM_TinyDecodeFaithful(benchmark::State& s) { Decode(s, TinyModel(NumericMode::kFaithful)); }
void BM_FlashLayerPrefill(benchmark::State& s) { Prefill(s, FlashLayerModel()); }
void BM_FlashLayerDecode(benchmark::State& s) { Decode(s, FlashLayerModel()); }

void BM_MatmulBaseline(benchmark::State& state) {
  const int64_t m = state.range(0), k = 4096, n = 4096;
  std::vector<float> x(static_cast<size_t>(m * k), 0.5f), w(static_cast<size_t>(n * k), 0.25f), y;
  for (auto _ : state) {
    cpu::MatmulWt(x.data(), m, k, w.data(), n, &y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(m * k * n) * static_cast<double>(state.iterations()) / 1e9,
                         benchmark::Counter::kIsRate);
}

// The faithful mode's GEMM (FP64 accumulation rounded once to FP32), for the F64/F32 ratio in one run.
void BM_MatmulF64(benchmark::State& state) {
  const int64_t m = state.range(0), k = 4096, n = 4096;
  std::vector<float> x(static_cast<size_t>(m * k), 0.5f), w(static_cast<size_t>(n * k), 0.25f), y;
  for (auto _ : state) {
    cpu::MatmulWtF64(x.data(), m, k, w.data(), n, &y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(m * k * n) * static_cast<double>(state.iterations()) / 1e9,
                         benchmark::Counter::kIsRate);
}

BENCHMARK(BM_MatmulBaseline)->Arg(1)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_MatmulF64)->Arg(1)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TinyPrefill)->Arg(128)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TinyDecode)->Args({256, 1})->Args({256, 8})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TinyPrefillFaithful)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_TinyDecodeFaithful)->Args({256, 1})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_FlashLayerPrefill)->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
BENCHMARK(BM_FlashLayerDecode)->Args({256, 1})->Args({256, 8})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace v4serve::model

BENCHMARK_MAIN();
