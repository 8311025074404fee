#include "services/flags.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace v4serve::services {
namespace {

using ::testing::HasSubstr;

struct Opts {
  std::string host = "0.0.0.0";
  int port = 80;
  int64_t bytes = 1;
  double ratio = 0.5;
  bool verbose = false;
  bool tls = true;
  absl::Duration timeout = absl::Seconds(30);
  std::vector<std::string> workers;
};

FlagSet Bind(Opts* o) {
  FlagSet f("v4serve test", "A test command.");
  f.Add("host", &o->host, "host");
  f.Add("port", &o->port, "port");
  f.Add("bytes", &o->bytes, "bytes");
  f.Add("ratio", &o->ratio, "ratio");
  f.Add("verbose", &o->verbose, "verbose");
  f.Add("tls", &o->tls, "tls");
  f.Add("timeout", &o->timeout, "timeout");
  f.Add("workers", &o->workers, "workers");
  return f;
}

TEST(FlagsTest, ParsesEveryFormAndType) {
  Opts o;
  FlagSet f = Bind(&o);
  ASSERT_TRUE(
      f.Parse({"--host=127.0.0.1", "--port", "9000", "--bytes=1099511627776", "--ratio=0.25", "--verbose",
               "--notls", "--timeout=500ms", "--workers=a:1,b:2", "--workers", "c:3", "pos1"})
          .ok());
  EXPECT_EQ(o.host, "127.0.0.1");
  EXPECT_EQ(o.port, 9000);
  EXPECT_EQ(o.bytes, int64_t{1} << 40);
  EXPECT_DOUBLE_EQ(o.ratio, 0.25);
  EXPECT_TRUE(o.verbose);
  EXPECT_FALSE(o.tls);
  EXPECT_EQ(o.timeout, absl::Milliseconds(500));
  EXPECT_THAT(o.workers, ::testing::ElementsAre("a:1", "b:2", "c:3"));
  EXPECT_THAT(f.positional(), ::testing::ElementsAre("pos1"));
  EXPECT_FALSE(f.help_requested());
}

TEST(FlagsTest, ErrorsNameTheFlag) {
  Opts o;
  FlagSet f = Bind(&o);
  absl::Status st = f.Parse({"--port=eighty"});
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("--port"));
  EXPECT_THAT(Bind(&o).Parse({"--nope=1"}).message(), HasSubstr("unknown flag --nope"));
  EXPECT_THAT(Bind(&o).Parse({"--host"}).message(), HasSubstr("--host needs a value"));
  EXPECT_THAT(Bind(&o).Parse({"--timeout=soon"}).message(), HasSubstr("--timeout"));
  EXPECT_THAT(Bind(&o).Parse({"--verbose=maybe"}).message(), HasSubstr("--verbose"));
  EXPECT_THAT(Bind(&o).Parse({"--nohost"}).message(), HasSubstr("unknown flag"));
}

TEST(FlagsTest, HelpListsFlagsWithDefaults) {
  Opts o;
  FlagSet f = Bind(&o);
  ASSERT_TRUE(f.Parse({"--help"}).ok());
  EXPECT_TRUE(f.help_requested());
  std::string usage = f.Usage();
  EXPECT_THAT(usage, HasSubstr("usage: v4serve test"));
  EXPECT_THAT(usage, HasSubstr("--port (int, default 80)"));
  EXPECT_THAT(usage, HasSubstr("--timeout (duration, default 30s)"));
}

}  // namespace
}  // namespace v4serve::services
