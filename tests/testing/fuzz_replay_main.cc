// Runs a libFuzzer entry point without libFuzzer: every file of the corpus directory given as argv[1],
// then 5,000 deterministic random mutations of them (byte flips, truncations, splices). Used by the
// `*_replay` ctests so that every build exercises each fuzz target; long runs use the libFuzzer binary.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  std::vector<std::string> corpus = {"", "{}", "\xff\xfe", std::string(1000, 'a')};
  if (argc > 1) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(argv[1], ec)) {
      std::ifstream in(entry.path(), std::ios::binary);
      corpus.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  }
  size_t seeds = corpus.size();
  for (const std::string& input : corpus) {
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  }
  std::mt19937_64 rng(42);
  for (int i = 0; i < 5000; ++i) {
    std::string s = corpus[rng() % corpus.size()];
    switch (rng() % 4) {
      case 0:
        if (!s.empty()) s[rng() % s.size()] ^= static_cast<char>(1u << (rng() % 8));
        break;
      case 1:
        s.resize(s.empty() ? 0 : rng() % s.size());
        break;
      case 2:
        s.insert(s.empty() ? 0 : rng() % s.size(), corpus[rng() % corpus.size()]);
        break;
      default:
        if (!s.empty()) s[rng() % s.size()] = static_cast<char>(rng());
        break;
    }
    if (s.size() > (1u << 20)) s.resize(1u << 20);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }
  std::printf("replayed %zu seeds and 5000 mutations\n", seeds);
  return 0;
}
