#include "model/safetensors.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/numeric_formats.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

std::string Serialize(const std::vector<RawTensor>& ts) {
  nlohmann::json h = nlohmann::json::object();
  std::string data;
  for (const RawTensor& t : ts) {
    h[t.name] = {{"dtype", t.dtype},
                 {"shape", t.shape},
                 {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data.append(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  }
  h["__metadata__"] = {{"format", "pt"}};
  std::string hs = h.dump();
  uint64_t n = hs.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + hs + data;
}

template <typename T>
std::vector<uint8_t> Bytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("v4serve_st_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& file, const std::string& bytes) {
    std::ofstream(dir_ / file, std::ios::binary) << bytes;
  }
  fs::path dir_;
};

TEST(NumericFormatsTest, Fp8RoundTripsEveryCode) {
  for (int b = 0; b < 256; ++b) {
    const float f = Fp8E4m3ToFloat(static_cast<uint8_t>(b));
    if (std::isnan(f)) continue;
    if (b == 0x80) continue;  // -0 encodes as 0x80 too, but compare values.
    EXPECT_EQ(FloatToFp8E4m3(f), b) << b << " " << f;
  }
  EXPECT_EQ(Fp8E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(RoundToFp8E4m3(1000.0f), 448.0f);
  EXPECT_EQ(RoundToFp8E4m3(1.0625f), 1.0f);   // Tie between 1 and 1.125 goes to even (1.0).
  EXPECT_EQ(RoundToFp8E4m3(1.1875f), 1.25f);  // Tie between 1.125 and 1.25 goes to even (1.25).
  EXPECT_EQ(RoundToBf16(1.00390625f), 1.0f);
  EXPECT_EQ(RoundToFp4E2m1(2.5f), 2.0f);
  EXPECT_EQ(RoundToFp4E2m1(-5.0f), -4.0f);
  EXPECT_EQ(RoundToFp4E2m1(0.25f), 0.0f);
  EXPECT_EQ(RoundToFp4E2m1(9.0f), 6.0f);
  EXPECT_EQ(E8m0ToFloat(127), 1.0f);
  EXPECT_EQ(E8m0ToFloat(130), 8.0f);
}

TEST_F(SafetensorsTest, ReadsEveryWeightFormat) {
  std::mt19937 rng(7);
  // BF16 [2,3].
  std::vector<float> want_bf16 = {1.5f, -2.0f, 0.25f, 3.0f, -0.125f, 8.0f};
  std::vector<uint16_t> bf16;
  bf16.reserve(want_bf16.size());
  for (float f : want_bf16) bf16.push_back(FloatToBf16(f));
  // FP8 [256, 128] with 2x1 tiles.
  const int64_t r8 = 256, c8 = 128;
  std::vector<uint8_t> fp8(r8 * c8);
  for (auto& b : fp8) b = static_cast<uint8_t>(rng() % 0x7e);
  std::vector<uint8_t> fp8_scale = {125, 129};
  // FP4 [2, 64]: packed [2, 32], scales [2, 2].
  std::vector<uint8_t> fp4(2 * 32);
  for (auto& b : fp4) b = static_cast<uint8_t>(rng());
  std::vector<uint8_t> fp4_scale = {127, 120, 130, 127};
  std::vector<int64_t> ids = {0, 5, 7, 1};
  Write("model.safetensors", Serialize({
                                 {"a.weight", "BF16", {2, 3}, Bytes(bf16)},
                                 {"q.weight", "F8_E4M3", {r8, c8}, fp8},
                                 {"q.scale", "F8_E8M0", {2, 1}, fp8_scale},
                                 {"e.weight", "I8", {2, 32}, fp4},
                                 {"e.scale", "F8_E8M0", {2, 2}, fp4_scale},
                                 {"g.tid2eid", "I64", {2, 2}, Bytes(ids)},
                                 {"f", "F32", {2}, Bytes(std::vector<float>{0.5f, -1.0f})},
                             }));
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  absl::StatusOr<std::vector<float>> a = (*c)->ReadFloat("a.weight", {2, 3});
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, want_bf16);
  absl::StatusOr<std::vector<float>> q = (*c)->ReadFloat("q.weight", {r8, c8});
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ((*q)[5], Fp8E4m3ToFloat(fp8[5]) * 0.25f);
  EXPECT_EQ((*q)[200 * c8 + 7], Fp8E4m3ToFloat(fp8[200 * c8 + 7]) * 4.0f);
  absl::StatusOr<std::vector<float>> e = (*c)->ReadFloat("e.weight", {2, 64});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)[0], Fp4E2m1ToFloat(fp4[0] & 0xf));
  EXPECT_EQ((*e)[1], Fp4E2m1ToFloat(fp4[0] >> 4));
  EXPECT_EQ((*e)[33], Fp4E2m1ToFloat(fp4[16] >> 4) * std::ldexp(1.0f, -7));
  EXPECT_EQ((*e)[64 + 2], Fp4E2m1ToFloat(fp4[33] & 0xf) * 8.0f);
  absl::StatusOr<std::vector<int32_t>> ids32 = (*c)->ReadInt("g.tid2eid", {2, 2});
  ASSERT_TRUE(ids32.ok());
  EXPECT_EQ(*ids32, (std::vector<int32_t>{0, 5, 7, 1}));
  // Wrong shape, wrong dtype, missing tensor: clear errors.
  EXPECT_THAT(std::string((*c)->ReadFloat("a.weight", {3, 2}).status().message()), HasSubstr("a.weight"));
  EXPECT_THAT(std::string((*c)->ReadFloat("g.tid2eid", {2, 2}).status().message()), HasSubstr("dtype I64"));
  EXPECT_THAT(std::string((*c)->ReadInt("f", {2}).status().message()), HasSubstr("integer"));
  EXPECT_EQ((*c)->ReadFloat("nope", {1}).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, MissingScaleIsAnError) {
  Write("model.safetensors", Serialize({{"q.weight", "F8_E4M3", {2, 2}, {1, 2, 3, 4}}}));
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir_.string());
  ASSERT_TRUE(c.ok());
  EXPECT_THAT(std::string((*c)->ReadFloat("q.weight", {2, 2}).status().message()), HasSubstr("q.scale"));
}

TEST_F(SafetensorsTest, ShardedWithIndex) {
  Write("a.safetensors", Serialize({{"x", "F32", {1}, Bytes(std::vector<float>{1})}}));
  Write("b.safetensors", Serialize({{"y", "F32", {1}, Bytes(std::vector<float>{2})}}));
  Write("model.safetensors.index.json",
        R"({"metadata":{},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}})");
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir_.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(*(*c)->ReadFloat("y", {1}), std::vector<float>{2});
  EXPECT_EQ((*c)->Names().size(), 2u);
  // An index naming a tensor its shard lacks.
  Write("model.safetensors.index.json", R"({"weight_map":{"x":"a.safetensors","z":"b.safetensors"}})");
  c = Checkpoint::Open(dir_.string());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("'z'"));
  // A missing shard.
  Write("model.safetensors.index.json", R"({"weight_map":{"x":"missing.safetensors"}})");
  EXPECT_FALSE(Checkpoint::Open(dir_.string()).ok());
  // A shard escaping the directory.
  Write("model.safetensors.index.json", R"({"weight_map":{"x":"../a.safetensors"}})");
  EXPECT_FALSE(Checkpoint::Open(dir_.string()).ok());
}

TEST_F(SafetensorsTest, TruncatedAndCorruptFilesAreErrors) {
  const std::string good = Serialize({{"x", "F32", {4}, Bytes(std::vector<float>{1, 2, 3, 4})}});
  for (size_t cut : {size_t{0}, size_t{5}, size_t{8}, size_t{20}, good.size() - 1}) {
    Write("model.safetensors", good.substr(0, cut));
    absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir_.string());
    ASSERT_FALSE(c.ok()) << cut;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss) << c.status();
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("model.safetensors"));
  }
  std::string bad_len = good;
  bad_len[7] = 0x7f;  // Header length beyond the file.
  Write("model.safetensors", bad_len);
  EXPECT_FALSE(Checkpoint::Open(dir_.string()).ok());
}

TEST(SafetensorsHeaderTest, RejectsInconsistentHeaders) {
  auto err = [](const std::string& h, uint64_t size) {
    absl::StatusOr<std::vector<TensorInfo>> r = ParseSafetensorsHeader(h, size);
    return r.ok() ? std::string("OK") : std::string(r.status().message());
  };
  EXPECT_EQ(err(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8), "OK");
  EXPECT_THAT(err(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
              HasSubstr("needs 12 bytes"));
  EXPECT_THAT(err(R"({"x":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), HasSubstr("unknown dtype"));
  EXPECT_THAT(err(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4), HasSubstr("truncated"));
  EXPECT_THAT(err(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
              HasSubstr("non-negative"));
  EXPECT_THAT(
      err(R"({"x":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"y":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
          8),
      HasSubstr("overlap"));
  EXPECT_THAT(
      err(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8),
      HasSubstr("too large"));
  EXPECT_THAT(err("[1]", 0), HasSubstr("object"));
  EXPECT_THAT(err("{", 0), HasSubstr("JSON"));
}

// Mutates a valid header byte by byte: whatever the result, parsing must return (ok or an error) and every
// accepted tensor must lie inside the data section. The fuzz target (fuzz label) explores further.
TEST(SafetensorsHeaderTest, MutatedHeadersNeverEscapeTheData) {
  const std::string base =
      R"({"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[12,16]},"__metadata__":{"k":"v"}})";
  std::mt19937 rng(1234);
  const char kAlphabet[] = "{}[]\",:0123456789-eE.abcdFIU8_ \\";
  int accepted = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::string h = base;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % h.size();
      switch (rng() % 3) {
        case 0:
          h[pos] = kAlphabet[rng() % (sizeof(kAlphabet) - 1)];
          break;
        case 1:
          h.erase(pos, 1 + rng() % 3);
          break;
        default:
          h.insert(pos, 1, kAlphabet[rng() % (sizeof(kAlphabet) - 1)]);
      }
      if (h.empty()) h = "{";
    }
    const uint64_t data_size = rng() % 24;
    absl::StatusOr<std::vector<TensorInfo>> r = ParseSafetensorsHeader(h, data_size);
    if (!r.ok()) continue;
    ++accepted;
    for (const TensorInfo& t : *r) {
      ASSERT_LE(t.begin, t.end);
      ASSERT_LE(t.end, data_size);
      ASSERT_EQ(static_cast<int64_t>(t.end - t.begin), t.elements() * DTypeSize(t.dtype));
    }
  }
  EXPECT_GT(accepted, 0);  // Some mutations (e.g. in names) stay valid.
}

// FP4 -> FP8 as DeepSeek's convert.py does it must be lossless: dequantizing either gives the same values.
TEST(Fp4ToFp8Test, ConversionIsExact) {
  std::mt19937 rng(99);
  const int64_t out = 256, in = 256;
  std::vector<uint8_t> packed(out * in / 2), scale(out * in / 32);
  for (auto& b : packed) b = static_cast<uint8_t>(rng());
  for (auto& s : scale) s = static_cast<uint8_t>(120 + rng() % 7);  // Spread within 2^6 per tile.
  std::vector<uint8_t> fp8, fp8_scale;
  ASSERT_TRUE(ConvertFp4ToFp8(packed.data(), scale.data(), out, in, &fp8, &fp8_scale).ok());
  ASSERT_EQ(fp8_scale.size(), 4u);
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t c = 0; c < in; ++c) {
      const uint8_t b = packed[r * in / 2 + c / 2];
      const float want = Fp4E2m1ToFloat(c % 2 ? b >> 4 : b & 0xf) * E8m0ToFloat(scale[r * in / 32 + c / 32]);
      const float got = Fp8E4m3ToFloat(fp8[r * in + c]) * E8m0ToFloat(fp8_scale[(r / 128) * 2 + c / 128]);
      ASSERT_EQ(want, got) << r << "," << c;
    }
  }
  // A spread too wide to be exact is refused, not silently rounded.
  scale.assign(scale.size(), 127);
  scale[0] = 127 - 12;
  scale[1] = 127 + 6;
  packed[0] = 0x11;  // 0.5 at the tiny scale.
  EXPECT_FALSE(ConvertFp4ToFp8(packed.data(), scale.data(), out, in, &fp8, &fp8_scale).ok());
}

}  // namespace
}  // namespace v4serve::model
