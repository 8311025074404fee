#include "model/device.h"

#include <gtest/gtest.h>

#include "model/cuda/cuda_device.h"
#include "model/model.h"

namespace v4serve::model {
namespace {

TEST(DeviceTest, DescribeNamesTheBackendState) {
  std::string d = DescribeAccelerators();
  EXPECT_EQ(d.rfind("cuda: ", 0), 0u) << d;
  if (!BuiltWithCuda()) {
    EXPECT_EQ(d, "cuda: not built in");
  }
}

// The workers' --numerics and --cuda_weights: each value lands in ModelOptions, a bad one is refused naming
// its flag.
TEST(DeviceTest, ServingFlagsSetTheModelOptions) {
  ModelOptions o;
  EXPECT_EQ(o.cuda_weights, CudaWeights::kFp8);  // The workers' default.
  ASSERT_TRUE(SetCudaWeights("bf16", &o).ok());
  EXPECT_EQ(o.cuda_weights, CudaWeights::kBf16);
  ASSERT_TRUE(SetCudaWeights("fp32", &o).ok());
  EXPECT_EQ(o.cuda_weights, CudaWeights::kF32);
  ASSERT_TRUE(SetCudaWeights("fp8", &o).ok());
  EXPECT_EQ(o.cuda_weights, CudaWeights::kFp8);
  absl::Status bad = SetCudaWeights("fp4", &o);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("--cuda_weights"), absl::string_view::npos) << bad;
  ASSERT_TRUE(SetServingNumerics("cpu", "exact", &o).ok());
  EXPECT_EQ(o.mode, NumericMode::kExact);
  EXPECT_EQ(o.device, Device::kCpu);
  ASSERT_TRUE(SetServingNumerics("cpu", "auto", &o).ok());
  EXPECT_EQ(o.mode, NumericMode::kFaithful);
  bad = SetServingNumerics("cpu", "fast", &o);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("--numerics"), absl::string_view::npos) << bad;
  EXPECT_EQ(SetServingNumerics("cuda", "faithful", &o).code(), absl::StatusCode::kInvalidArgument);
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
