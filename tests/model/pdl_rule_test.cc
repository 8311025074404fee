// The rule programmatic dependent launch rests on (model/cuda/launch.cuh), checked on the sources so that CI
// (no GPU) catches a kernel that would race: every kernel of model/cuda's headers, which CudaBackend::Launch
// may start before the kernel ahead of it ends, calls PdlEnter() before it touches memory, so nothing ahead
// of that call indexes an array, follows a pointer, synchronizes or uses atomics (the weights' Prefetch*
// calls and index arithmetic only). Kernels defined in .cu files are launched plainly and must not go through
// Launch.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace v4serve::model {
namespace {

namespace fs = std::filesystem;

std::string Read(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<fs::path> Sources(const std::string& ext) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(fs::path(V4SERVE_TEST_SOURCE_DIR) / "model" / "cuda")) {
    if (e.path().extension() == ext) out.push_back(e.path());
  }
  return out;
}

struct Kernel {
  std::string name, file, before_enter;  // before_enter: the body up to PdlEnter (the whole body without it).
  bool enters = false;
};

// The __global__ functions of `src`, with the start of each body.
std::vector<Kernel> Kernels(const std::string& src, const std::string& file) {
  std::vector<Kernel> out;
  static const std::regex kGlobal(R"(__global__\s+void\s+)");
  for (auto it = std::sregex_iterator(src.begin(), src.end(), kGlobal); it != std::sregex_iterator(); ++it) {
    size_t p = static_cast<size_t>(it->position() + it->length());
    // Skip __launch_bounds__(...) (parentheses nest), then the name up to its parameter list.
    if (src.compare(p, 17, "__launch_bounds__") == 0) {
      int depth = 0;
      for (p = src.find('(', p);; ++p) {
        if (src[p] == '(') ++depth;
        if (src[p] == ')' && --depth == 0) break;
      }
      ++p;
    }
    const size_t paren = src.find('(', p);
    Kernel k;
    std::string name = src.substr(p, paren - p);
    name.erase(0, name.find_first_not_of(" \n"));
    name.erase(name.find_last_not_of(" \n") + 1);
    k.name = name;
    k.file = file;
    int depth = 0;
    size_t q = paren;
    for (;; ++q) {
      if (src[q] == '(') ++depth;
      if (src[q] == ')' && --depth == 0) break;
    }
    const size_t open = src.find('{', q);
    depth = 0;
    size_t close = open;
    for (;; ++close) {
      if (src[close] == '{') ++depth;
      if (src[close] == '}' && --depth == 0) break;
    }
    const std::string body = src.substr(open + 1, close - open - 1);
    const size_t enter = body.find("PdlEnter();");
    k.enters = enter != std::string::npos;
    k.before_enter = body.substr(0, k.enters ? enter : body.size());
    out.push_back(k);
  }
  return out;
}

// Weight initialization, launched plainly once at load (QuantizeFp8Tiles, the random draws).
const std::set<std::string> kPlainOnly = {"RandomFill", "RandomBytes", "QuantizeFp8Tiles"};

TEST(PdlRuleTest, EveryHeaderKernelWaitsBeforeItTouchesMemory) {
  int kernels = 0;
  for (const fs::path& h : Sources(".cuh")) {
    for (const Kernel& k : Kernels(Read(h), h.filename().string())) {
      if (kPlainOnly.count(k.name) != 0) continue;
      ++kernels;
      SCOPED_TRACE(k.file + ": " + k.name);
      ASSERT_TRUE(k.enters) << "no PdlEnter()";
      // Code ahead of the wait: no memory access but the weights' prefetch (Prefetch* functions: into L2, or
      // into the block's own shared memory).
      std::string ahead =
          std::regex_replace(k.before_enter, std::regex(R"(Prefetch\w*(<[^>]*>)?\([^;]*;)"), "");
      ahead = std::regex_replace(ahead, std::regex(R"(//[^\n]*)"), "");
      for (const char* banned : {"[", "->", "*a", "__syncthreads", "atomic", "__ldg", "__ldcg"}) {
        EXPECT_EQ(ahead.find(banned), std::string::npos) << "'" << banned << "' before PdlEnter:\n" << ahead;
      }
    }
  }
  EXPECT_GE(kernels, 35);  // The forward's kernels were found at all.
}

TEST(PdlRuleTest, KernelsOfCuFilesAreNotLaunchedProgrammatically) {
  std::string launches;
  std::vector<Kernel> own;
  for (const fs::path& f : Sources(".cu")) {
    const std::string src = Read(f);
    launches += src;
    for (const Kernel& k : Kernels(src, f.filename().string())) own.push_back(k);
  }
  for (const Kernel& k : own) {
    EXPECT_EQ(launches.find("Launch(" + k.name), std::string::npos) << k.file << ": " << k.name;
    EXPECT_EQ(launches.find("LaunchKernel(pdl, s, " + k.name), std::string::npos) << k.file << ": " << k.name;
  }
}

// The rule's check itself: a kernel that reads before its wait is reported.
TEST(PdlRuleTest, AReadAheadOfTheWaitIsFound) {
  const std::vector<Kernel> ks = Kernels(
      "__global__ void __launch_bounds__(128, (2))\n    K(const float* x, float* y) {\n  const float v = "
      "x[0];\n"
      "  PdlEnter();\n  y[0] = v;\n}\n__global__ void J(int* p) { *p = 1; }\n",
      "t.cuh");
  ASSERT_EQ(ks.size(), 2u);
  EXPECT_EQ(ks[0].name, "K");
  EXPECT_TRUE(ks[0].enters);
  EXPECT_NE(ks[0].before_enter.find("x[0]"), std::string::npos);
  EXPECT_EQ(ks[1].name, "J");
  EXPECT_FALSE(ks[1].enters);
}

}  // namespace
}  // namespace v4serve::model
