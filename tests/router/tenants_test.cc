#include "router/tenants.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "tests/testing/v4serve_process.h"

namespace v4serve::router {
namespace {

using ::testing::HasSubstr;

std::string WriteKeys(const testing::TempDir& dir, const std::string& json) {
  std::string path = dir.path() + "/keys.json";
  std::ofstream(path) << json;
  return path;
}

TEST(TenantRegistryTest, WithoutKeysEveryoneIsTheDefaultTenant) {
  auto r = TenantRegistry::Create("", {});
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE((*r)->auth_enabled());
  EXPECT_EQ(*(*r)->Authenticate(""), "");
  EXPECT_EQ(*(*r)->Authenticate("Bearer anything"), "");
}

TEST(TenantRegistryTest, KeysNameTenants) {
  testing::TempDir dir;
  auto r = TenantRegistry::Create(
      WriteKeys(dir, R"({"keys": [{"key": "sk-acme-0001", "tenant": "acme"},
                                  {"key": "sk-beta-0001", "tenant": "beta"}]})"),
      {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*(*r)->Authenticate("Bearer sk-acme-0001"), "acme");
  EXPECT_EQ(*(*r)->Authenticate("Bearer sk-beta-0001 "), "beta");
  EXPECT_EQ((*r)->Authenticate("").status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT((*r)->Authenticate("Bearer sk-nope-0001").status().message(), HasSubstr("invalid API key"));
  EXPECT_THAT((*r)->Authenticate("Basic abc").status().message(), HasSubstr("Bearer"));
}

TEST(TenantRegistryTest, MalformedFilesNameTheProblem) {
  testing::TempDir dir;
  EXPECT_THAT(TenantRegistry::Create(dir.path() + "/missing.json", {}).status().message(),
              HasSubstr("cannot be read"));
  EXPECT_THAT(TenantRegistry::Create(WriteKeys(dir, "{"), {}).status().message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(TenantRegistry::Create(WriteKeys(dir, R"({"keys": [{"key": "short", "tenant": "a"}]})"), {})
                  .status()
                  .message(),
              HasSubstr("keys[0].key"));
  EXPECT_THAT(TenantRegistry::Create(WriteKeys(dir, R"({"keys": [{"key": "sk-12345678"}]})"), {})
                  .status()
                  .message(),
              HasSubstr("keys[0].tenant"));
  EXPECT_THAT(TenantRegistry::Create(
                  WriteKeys(dir, R"({"keys": [{"key": "sk-12345678", "tenant": "a", "max_concurrent": -1}]})"),
                  {})
                  .status()
                  .message(),
              HasSubstr("max_concurrent"));
}

TEST(TenantRegistryTest, RateLimitRefillsOverTime) {
  absl::Time now = absl::FromUnixSeconds(1000);
  auto r = TenantRegistry::Create("", {.requests_per_minute = 2}, [&] { return now; });
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->Admit("").ok());
  EXPECT_TRUE((*r)->Admit("").ok());
  absl::Status over = (*r)->Admit("").status();
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.message(), HasSubstr("retry in 30 s"));
  now += absl::Seconds(30);  // one request's worth at 2/min
  EXPECT_TRUE((*r)->Admit("").ok());
  EXPECT_FALSE((*r)->Admit("").ok());
}

TEST(TenantRegistryTest, ConcurrencyLimitIsPerTenantAndReleasedByTickets) {
  testing::TempDir dir;
  auto r = TenantRegistry::Create(
      WriteKeys(dir, R"({"keys": [{"key": "sk-acme-0001", "tenant": "acme", "max_concurrent": 1}]})"),
      {.max_concurrent = 2});
  ASSERT_TRUE(r.ok()) << r.status();
  absl::StatusOr<TenantTicket> t1 = (*r)->Admit("acme");
  ASSERT_TRUE(t1.ok());
  EXPECT_THAT((*r)->Admit("acme").status().message(), HasSubstr("1 requests in flight"));
  // Another tenant has its own slots (the defaults).
  auto o1 = (*r)->Admit("other"), o2 = (*r)->Admit("other");
  EXPECT_TRUE(o1.ok() && o2.ok());
  EXPECT_FALSE((*r)->Admit("other").ok());
  *t1 = TenantTicket();  // released
  EXPECT_TRUE((*r)->Admit("acme").ok());
}

}  // namespace
}  // namespace v4serve::router
