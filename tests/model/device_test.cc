#include "model/device.h"

#include <gtest/gtest.h>

#include "model/cuda/cuda_device.h"

namespace v4serve::model {
namespace {

TEST(DeviceTest, DescribeNamesTheBackendState) {
  std::string d = DescribeAccelerators();
  EXPECT_EQ(d.rfind("cuda: ", 0), 0u) << d;
  if (!BuiltWithCuda()) {
    EXPECT_EQ(d, "cuda: not built in");
  }
}

TEST(DeviceTest, ListGpusMatchesBuild) {
  absl::StatusOr<std::vector<GpuInfo>> gpus = ListGpus();
  if (!BuiltWithCuda()) {
    EXPECT_EQ(gpus.status().code(), absl::StatusCode::kFailedPrecondition);
    return;
  }
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  for (const GpuInfo& g : *gpus) {
    EXPECT_FALSE(g.name.empty());
    EXPECT_GT(g.memory_bytes, 0);
  }
}

// Runs a kernel compiled for sm_90a on every visible GPU; skips where there is none.
TEST(DeviceTest, KernelRunsOnEveryGpu) {
  if (!BuiltWithCuda()) GTEST_SKIP() << "built without CUDA";
  absl::StatusOr<std::vector<GpuInfo>> gpus = ListGpus();
  ASSERT_TRUE(gpus.ok()) << gpus.status();
  if (gpus->empty()) GTEST_SKIP() << "no GPU on this machine: " << DescribeAccelerators();
  for (const GpuInfo& g : *gpus) {
    EXPECT_TRUE(cuda::SelfTest(g.index, 1 << 20).ok()) << g.name;
  }
}

}  // namespace
}  // namespace v4serve::model
