// GenerateRequest → engine request mapping of the colocated worker (defaults, limits, errors).
#include "decode/generate_service.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace v4serve::decode {
namespace {

using ::testing::HasSubstr;

GenerateServiceOptions Options() {
  GenerateServiceOptions o;
  o.model_id = "tiny_v4";
  o.max_total_tokens = 1000;
  return o;
}

v1::GenerateRequest Request(int n_tokens) {
  v1::GenerateRequest r;
  for (int i = 0; i < n_tokens; ++i) r.mutable_token_ids()->add_ids(2 + i);
  return r;
}

TEST(GenerateServiceTest, DefaultsFollowTheProto) {
  auto r = ToEngineRequest(Request(10), Options());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt.size(), 10u);
  EXPECT_EQ(r->sampling.temperature, 1.0f);  // Unset temperature means 1, not greedy.
  EXPECT_EQ(r->sampling.n, 1);
  EXPECT_EQ(r->sampling.max_tokens, 990);  // 0 = up to the context / KV limit.
  EXPECT_FALSE(r->sampling.seed.has_value());
  EXPECT_EQ(r->tenant_salt, 0u);
}

TEST(GenerateServiceTest, CopiesEverySamplingField) {
  v1::GenerateRequest req = Request(4);
  v1::SamplingParams* s = req.mutable_sampling();
  s->set_temperature(0.5f);
  s->set_top_p(0.8f);
  s->set_top_k(7);
  s->set_min_p(0.1f);
  s->set_repetition_penalty(1.2f);
  s->set_presence_penalty(0.3f);
  s->set_frequency_penalty(-0.4f);
  s->set_seed(77);
  s->set_max_tokens(5000);
  s->add_stop_token_ids(9);
  s->set_n(3);
  s->set_top_logprobs(4);
  s->set_logprobs(true);
  s->set_ignore_eos(true);
  req.set_tenant("acme");
  auto r = ToEngineRequest(req, Options());
  ASSERT_TRUE(r.ok()) << r.status();
  const engine::SamplingParams& p = r->sampling;
  EXPECT_EQ(p.temperature, 0.5f);
  EXPECT_EQ(p.top_p, 0.8f);
  EXPECT_EQ(p.top_k, 7);
  EXPECT_EQ(p.min_p, 0.1f);
  EXPECT_EQ(p.repetition_penalty, 1.2f);
  EXPECT_EQ(p.presence_penalty, 0.3f);
  EXPECT_EQ(p.frequency_penalty, -0.4f);
  EXPECT_EQ(p.seed, 77u);
  EXPECT_EQ(p.max_tokens, 996);  // Clamped to the room left.
  EXPECT_EQ(p.stop_token_ids, std::vector<int32_t>{9});
  EXPECT_EQ(p.n, 3);
  EXPECT_EQ(p.top_logprobs, 4);
  EXPECT_TRUE(p.logprobs);
  EXPECT_TRUE(p.ignore_eos);
  EXPECT_NE(r->tenant_salt, 0u);
  req.set_tenant("other");
  EXPECT_NE(ToEngineRequest(req, Options())->tenant_salt, r->tenant_salt);
}

TEST(GenerateServiceTest, RejectsWhatItCannotServe) {
  v1::GenerateRequest text;
  text.set_text("hi");
  EXPECT_THAT(ToEngineRequest(text, Options()).status().message(), HasSubstr("token_ids"));
  v1::GenerateRequest other = Request(3);
  other.set_model("v4-pro");
  EXPECT_EQ(ToEngineRequest(other, Options()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ToEngineRequest(Request(1000), Options()).status().code(), absl::StatusCode::kInvalidArgument);
  v1::GenerateRequest empty;
  empty.mutable_token_ids();
  EXPECT_EQ(ToEngineRequest(empty, Options()).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace v4serve::decode
