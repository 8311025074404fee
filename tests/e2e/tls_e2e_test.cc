// gRPC with TLS and mutual TLS from PEM files, through the real binary.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"
#include "services/grpc_server.h"
#include "tests/testing/v4serve_process.h"

namespace v4serve {
namespace {

using testing::TempDir;
using testing::V4serveProcess;

// A CA, and a server and a client certificate it signs (server valid for localhost and 127.0.0.1).
void MakeCertificates(const std::string& dir) {
  std::string script =
      "set -e; cd '" + dir + "'; exec 2>/dev/null\n" +
      R"(openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr -subj /CN=localhost
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem -days 2 -extfile $who.ext
done)";
  std::ofstream(dir + "/make_certs.sh") << script << "\n";
  ASSERT_EQ(std::system(("bash '" + dir + "/make_certs.sh'").c_str()), 0);
}

std::shared_ptr<grpc::Channel> TlsChannel(int port, const services::TlsOptions& tls) {
  auto creds = services::MakeChannelCredentials(tls);
  EXPECT_TRUE(creds.ok()) << creds.status();
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  return grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port), *creds, args);
}

TEST(TlsE2eTest, MutualTlsAcceptsSignedClientsOnly) {
  TempDir dir;
  MakeCertificates(dir.path());
  const std::string d = dir.path() + "/";
  auto router = V4serveProcess::Start({"router", "--host=127.0.0.1", "--http_host=127.0.0.1", "--http_port=0",
                                       "--grpc_port=0", "--tls_cert=" + d + "server.pem",
                                       "--tls_key=" + d + "server.key", "--tls_ca=" + d + "ca.pem",
                                       "--tls_require_client_cert"});
  ASSERT_TRUE(router.ok()) << router.status();
  int port = (*router)->port("grpc_port");

  services::TlsOptions client{
      .cert_file = d + "client.pem", .key_file = d + "client.key", .ca_file = d + "ca.pem"};
  EXPECT_TRUE(services::CheckHealth(TlsChannel(port, client), "", absl::Seconds(10)).ok());

  services::TlsOptions no_cert{.ca_file = d + "ca.pem"};
  EXPECT_FALSE(services::CheckHealth(TlsChannel(port, no_cert), "", absl::Seconds(5)).ok());
  auto plain = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  EXPECT_FALSE(services::CheckHealth(plain, "", absl::Seconds(5)).ok());
  EXPECT_EQ((*router)->Terminate(absl::Seconds(20)), 0);
}

TEST(TlsE2eTest, MissingKeyFileIsAClearStartupError) {
  std::string out;
  EXPECT_EQ(testing::RunV4serve({"router", "--http_port=0", "--grpc_port=0", "--tls_cert=/nonexistent/c.pem",
                                 "--tls_key=/nonexistent/k.pem"},
                                &out),
            1);
  EXPECT_THAT(out, ::testing::HasSubstr("cannot open /nonexistent/"));
}

}  // namespace
}  // namespace v4serve
