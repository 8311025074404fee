#include "model/config.h"

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace v4serve::model {
namespace {

using ::testing::HasSubstr;

std::string TestData(const std::string& name) {
  const char* src = std::getenv("V4SERVE_SOURCE_DIR");
  std::string path = std::string(src ? src : ".") + "/tests/model/testdata/" + name;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ConfigTest, ParsesV4Flash) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(TestData("v4_flash_config.json"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->num_hidden_layers, 43);
  EXPECT_EQ(c->compress_ratios.size(), 44u);
  int csa = 0, hca = 0, win = 0;
  for (int l = 0; l < 43; ++l) {
    LayerKind k = c->layer_kind(l);
    csa += k == LayerKind::kCsa;
    hca += k == LayerKind::kHca;
    win += k == LayerKind::kWindow;
  }
  EXPECT_EQ(win, 2);
  EXPECT_EQ(csa, 21);
  EXPECT_EQ(hca, 20);
  EXPECT_EQ(c->layer_kind(43), LayerKind::kWindow);  // MTP.
  EXPECT_TRUE(c->fp8_weights);
  EXPECT_EQ(c->expert_dtype, "");
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 65536);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 16);
  EXPECT_EQ(c->num_hash_layers, 3);
  // The release says 284B total, 13B active.
  ParameterCounts p = CountParameters(*c);
  EXPECT_NEAR(static_cast<double>(p.total) / 1e9, 284, 284 * 0.03) << p.total;
  EXPECT_NEAR(static_cast<double>(p.active_per_token) / 1e9, 13, 13 * 0.08) << p.active_per_token;
}

TEST(ConfigTest, ParsesV4Pro) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(TestData("v4_pro_config.json"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->num_hidden_layers, 61);
  EXPECT_EQ(c->expert_dtype, "fp4");
  int csa = 0, hca = 0;
  for (int l = 0; l < 61; ++l) {
    csa += c->layer_kind(l) == LayerKind::kCsa;
    hca += c->layer_kind(l) == LayerKind::kHca;
  }
  EXPECT_EQ(csa, 30);
  EXPECT_EQ(hca, 31);
  ParameterCounts p = CountParameters(*c);
  EXPECT_NEAR(static_cast<double>(p.total) / 1e12, 1.6, 1.6 * 0.03) << p.total;
  EXPECT_NEAR(static_cast<double>(p.active_per_token) / 1e9, 49, 49 * 0.08) << p.active_per_token;
}

// The report: at 1M tokens V4-Pro's compressed cache is about 2% of a BF16 GQA cache with 8 KV heads of
// dim 128 over the same layers.
TEST(ConfigTest, ProKvCacheIsAboutTwoPercentOfGqa) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(TestData("v4_pro_config.json"));
  ASSERT_TRUE(c.ok()) << c.status();
  const double tokens = 1 << 20;
  KvBytes kv = ComputeKvBytes(*c);
  const double v4 = kv.compressed_per_token * tokens + kv.window_state_bytes + kv.compressor_tail_bytes;
  const double gqa = GqaBf16BytesPerToken(*c, 8, 128) * tokens;
  const double ratio = v4 / gqa;
  EXPECT_GT(ratio, 0.015);
  EXPECT_LT(ratio, 0.025);
  // CSA: 30 layers x (583 + 129) / 4; HCA: 31 layers x 583 / 128.
  EXPECT_NEAR(kv.compressed_per_token, 30 * (583.0 + 129.0) / 4 + 31 * 583.0 / 128, 1e-9);
  EXPECT_NEAR(kv.window_state_bytes, 61 * 128 * 583.0, 1e-9);
}

TEST(ConfigTest, AcceptsTransformersSpelling) {
  nlohmann::json j = nlohmann::json::parse(TestData("v4_flash_config.json"));
  j.erase("compress_ratios");
  j.erase("num_hash_layers");
  j.erase("qk_rope_head_dim");
  j.erase("rope_scaling");
  j["num_hidden_layers"] = 4;
  j["layer_types"] = {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                      "compressed_sparse_attention"};
  j["compress_rates"] = {{"compressed_sparse_attention", 4}, {"heavily_compressed_attention", 16}};
  j["mlp_layer_types"] = {"hash_moe", "moe", "moe", "moe"};
  j["partial_rotary_factor"] = 0.125;
  j["rope_parameters"] = {{"main", {{"rope_type", "default"}, {"rope_theta", 10000.0}}},
                          {"compress",
                           {{"rope_type", "yarn"},
                            {"rope_theta", 160000.0},
                            {"factor", 16},
                            {"original_max_position_embeddings", 65536},
                            {"beta_fast", 32},
                            {"beta_slow", 1},
                            {"attention_factor", 1.0}}}};
  absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->compress_ratios, (std::vector<int64_t>{0, 4, 16, 4, 0}));
  EXPECT_EQ(c->num_hash_layers, 1);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 65536);
  EXPECT_DOUBLE_EQ(c->compress_rope_theta, 160000.0);
}

struct BadCase {
  const char* field;
  nlohmann::json value;  // null = erase the field.
};

TEST(ConfigTest, BadFieldsNameTheField) {
  const BadCase cases[] = {
      {"hidden_size", nullptr},
      {"hidden_size", -1},
      {"vocab_size", "big"},
      {"compress_ratios", {0, 4}},
      {"compress_ratios", {0, 0, 4, 3}},
      {"o_groups", 7},
      {"num_key_value_heads", 8},
      {"num_experts_per_tok", 1000},
      {"scoring_func", "relu"},
      {"qk_rope_head_dim", 63},
      {"rope_scaling", {{"type", "ntk"}}},
      {"hidden_act", "gelu"},
      {"model_type", "llama"},
  };
  for (const BadCase& bc : cases) {
    nlohmann::json j = nlohmann::json::parse(TestData("v4_flash_config.json"));
    if (bc.value.is_null()) {
      j.erase(bc.field);
    } else {
      j[bc.field] = bc.value;
    }
    absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump());
    ASSERT_FALSE(c.ok()) << bc.field << " = " << bc.value.dump();
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(bc.field)) << c.status();
  }
}

// The config transformers itself writes (save_pretrained of the tiny V4 used for the goldens) parses to the
// same model as the released-format config.json of that checkpoint, except for MTP (transformers has none).
TEST(ConfigTest, TransformersSavedConfigMatchesTheReleasedOne) {
  absl::StatusOr<ModelConfig> hf = ParseModelConfig(TestData("tiny_v4_transformers_config.json"));
  ASSERT_TRUE(hf.ok()) << hf.status();
  absl::StatusOr<ModelConfig> rel = ParseModelConfig(TestData("tiny_v4/config.json"));
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ(hf->compress_ratios, (std::vector<int64_t>{0, 4, 16, 4}));
  EXPECT_EQ(rel->compress_ratios, (std::vector<int64_t>{0, 4, 16, 4, 0}));
  EXPECT_EQ(hf->num_hash_layers, rel->num_hash_layers);
  EXPECT_EQ(hf->qk_rope_head_dim, rel->qk_rope_head_dim);
  EXPECT_EQ(hf->rope_scaling.original_max_position_embeddings,
            rel->rope_scaling.original_max_position_embeddings);
  EXPECT_DOUBLE_EQ(hf->rope_scaling.factor, rel->rope_scaling.factor);
  EXPECT_DOUBLE_EQ(hf->compress_rope_theta, rel->compress_rope_theta);
  EXPECT_DOUBLE_EQ(hf->rope_theta, rel->rope_theta);
  EXPECT_EQ(hf->index_topk, rel->index_topk);
  EXPECT_EQ(hf->o_groups, rel->o_groups);
  EXPECT_EQ(hf->num_nextn_predict_layers, 0);
}

TEST(ConfigTest, RejectsNonJson) {
  EXPECT_FALSE(ParseModelConfig("{not json").ok());
  EXPECT_FALSE(ParseModelConfig("[1,2]").ok());
  EXPECT_FALSE(LoadModelConfig("/nonexistent/dir").ok());
}

TEST(ConfigTest, DescribeMentionsCountsAndKv) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(TestData("v4_flash_config.json"));
  ASSERT_TRUE(c.ok());
  std::string d = DescribeConfig(*c);
  EXPECT_THAT(d, HasSubstr("active per token"));
  EXPECT_THAT(d, HasSubstr("KV bytes per token"));
  EXPECT_THAT(d, HasSubstr("21 CSA, 20 HCA"));
  std::cout << "V4-Flash:\n" << d;
  absl::StatusOr<ModelConfig> pro = ParseModelConfig(TestData("v4_pro_config.json"));
  ASSERT_TRUE(pro.ok());
  std::cout << "V4-Pro:\n" << DescribeConfig(*pro);
}

}  // namespace
}  // namespace v4serve::model
