// Helpers shared by the tokenizer and chat tests: locating committed fixtures.
#ifndef V4SERVE_TESTS_MODEL_TOKENIZER_TEST_UTIL_H_
#define V4SERVE_TESTS_MODEL_TOKENIZER_TEST_UTIL_H_

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace v4serve::model::testing {

// Path of a file under tests/model/testdata (ctest sets V4SERVE_SOURCE_DIR; the fallback is the
// source directory baked in at configure time).
inline std::string TestDataPath(const std::string& relative) {
  const char* root = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(root != nullptr ? root : V4SERVE_TEST_SOURCE_DIR) + "/tests/model/testdata/" + relative;
}

inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::abort();
  }
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace v4serve::model::testing

#endif  // V4SERVE_TESTS_MODEL_TOKENIZER_TEST_UTIL_H_
