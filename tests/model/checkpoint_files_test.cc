// The tiny V4 checkpoint re-written as shards with an index, and damaged copies of it: sharded loading gives
// the same model; truncated or corrupt files are clear errors from Model::Load, never a crash.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string TinyDir() {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/tests/model/testdata/tiny_v4";
}

class CheckpointFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("v4serve_ckpt_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    fs::copy_file(fs::path(TinyDir()) / "config.json", dir_ / "config.json");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `names` of `src` into one safetensors file.
  static void WriteShard(const Checkpoint& src, const std::vector<std::string>& names, const fs::path& path) {
    nlohmann::json h = nlohmann::json::object();
    std::string data;
    for (const std::string& n : names) {
      TensorView v = *src.Get(n);
      const size_t bytes = v.info->end - v.info->begin;
      h[n] = {{"dtype", std::string(DTypeName(v.info->dtype))},
              {"shape", v.info->shape},
              {"data_offsets", {data.size(), data.size() + bytes}}};
      data.append(reinterpret_cast<const char*>(v.data), bytes);
    }
    const std::string hs = h.dump();
    const uint64_t n = hs.size();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << hs << data;
  }

  fs::path dir_;
};

std::vector<float> LastLogits(const Model& m) {
  SequenceState st = m.NewState();
  std::vector<int32_t> prompt;
  prompt.reserve(40);
  for (int i = 0; i < 40; ++i) prompt.push_back(2 + (i * 37) % 500);
  return *m.Prefill(&st, prompt);
}

TEST_F(CheckpointFilesTest, ShardedCopyLoadsTheSameModel) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> src = Checkpoint::Open(TinyDir());
  ASSERT_TRUE(src.ok());
  std::vector<std::string> names = (*src)->Names(), a, b;
  for (size_t i = 0; i < names.size(); ++i) (i % 2 ? a : b).push_back(names[i]);
  WriteShard(**src, a, dir_ / "model-00001-of-00002.safetensors");
  WriteShard(**src, b, dir_ / "model-00002-of-00002.safetensors");
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", nlohmann::json::object()}};
  for (const std::string& n : a) index["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (const std::string& n : b) index["weight_map"][n] = "model-00002-of-00002.safetensors";
  std::ofstream(dir_ / "model.safetensors.index.json") << index.dump();
  absl::StatusOr<std::unique_ptr<Model>> sharded = Model::Load(dir_.string(), ModelOptions{});
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  absl::StatusOr<std::unique_ptr<Model>> single = Model::Load(TinyDir(), ModelOptions{});
  ASSERT_TRUE(single.ok());
  EXPECT_EQ(LastLogits(**sharded), LastLogits(**single));

  // A shard missing from disk, and a tensor the index promises but no shard has.
  fs::remove(dir_ / "model-00002-of-00002.safetensors");
  absl::StatusOr<std::unique_ptr<Model>> broken = Model::Load(dir_.string(), ModelOptions{});
  ASSERT_FALSE(broken.ok());
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr("model-00002-of-00002.safetensors"));
}

TEST_F(CheckpointFilesTest, TruncatedOrCorruptCheckpointIsAClearError) {
  std::ifstream in(fs::path(TinyDir()) / "model.safetensors", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  // Truncated in the data section.
  std::ofstream(dir_ / "model.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  absl::StatusOr<std::unique_ptr<Model>> m = Model::Load(dir_.string(), ModelOptions{});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("truncated"));
  // A tensor re-labelled with an integer dtype of the same size (header length kept): a clear dtype error.
  std::string as_int = bytes;
  const std::string key = "\"embed.weight\":{\"dtype\":\"BF16\"";
  const size_t at = as_int.find(key);
  ASSERT_NE(at, std::string::npos);
  as_int.replace(at + key.size() - 6, 6, "\"I16\" ");
  std::ofstream(dir_ / "model.safetensors", std::ios::binary) << as_int;
  m = Model::Load(dir_.string(), ModelOptions{});
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("embed.weight"));
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("I16"));
}

}  // namespace
}  // namespace v4serve::model
