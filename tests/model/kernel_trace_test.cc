// bench/kernel_trace.h: the report's arithmetic on made-up records (every machine), and CUPTI recording a
// real copy and memset inside a window (on a GPU; skips without one or without CUPTI).
#include "bench/kernel_trace.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace v4serve::bench {
namespace {

TEST(KernelTraceTest, ShortNamesDropParametersAndNamespaces) {
  EXPECT_EQ(ShortKernelName("void v4serve::model::cuda::kernels::GroupedGemvFp4Mma<8, 2, 1, 3>(float const*, "
                            "int)"),
            "GroupedGemvFp4Mma<8, 2, 1, 3>");
  EXPECT_EQ(ShortKernelName("void ns::(anonymous namespace)::Foo<a::B<1>>(int)"), "Foo<a::B<1>>");
  EXPECT_EQ(ShortKernelName("nvjet_sm90_tss_512x64_64x2_2x1_v_bz_coopB_TNN"),
            "nvjet_sm90_tss_512x64_64x2_2x1_v_bz_coopB_TNN");
  EXPECT_EQ(ShortKernelName(std::string(100, 'k')).size(), 70u);
}

// Two windows of 1000 us. In the first, A [100, 300) and B [250, 400) overlap, C [600, 700) follows after
// a 200 us gap, the host returns at 1000; the second holds only D [1100, 1500). A record that starts after
// the last window is left out.
TEST(KernelTraceTest, SummaryCutsBusyIdleAndHostTime) {
  const uint64_t us = 1000;
  std::vector<TraceRecord> recs = {
      {TraceRecord::kKernel, "A", 100 * us, 300 * us, 0},
      {TraceRecord::kKernel, "B", 250 * us, 400 * us, 0},
      {TraceRecord::kMemcpy, "memcpy HtoD", 600 * us, 700 * us, 4096},
      {TraceRecord::kKernel, "D", 1100 * us, 1500 * us, 0},
      {TraceRecord::kKernel, "late", 5000 * us, 6000 * us, 0},
  };
  const std::string s = SummarizeTrace(recs, {{0, 1000 * us}, {1000 * us, 2000 * us}}, 10);
  // Per window: wall 1000; host before (100 + 100) / 2 = 100; busy (300 + 100 + 400) / 2 = 400; idle
  // 200 / 2 = 100; host after (300 + 500) / 2 = 400; records 4 / 2.
  EXPECT_NE(s.find("wall 1000.0 us = host before the GPU's first record 100.0 + GPU busy 400.0 + GPU idle "
                   "between records 100.0 + host after the last 400.0; 2.0 records"),
            std::string::npos)
      << s;
  EXPECT_NE(s.find("| B -> memcpy HtoD | 100.0 | 0.5 |"), std::string::npos) << s;
  EXPECT_NE(s.find("| D | 200.0 | 0.5 |"), std::string::npos) << s;
  EXPECT_NE(s.find("| memcpy HtoD (4096 B) | 50.0 | 0.5 |"), std::string::npos) << s;
  EXPECT_EQ(s.find("late"), std::string::npos) << s;
  EXPECT_EQ(SummarizeTrace(recs, {}, 10), "no windows traced\n");
}

TEST(KernelTraceTest, RecordsACopyAndAMemsetOnTheGpu) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA GPU on this machine";
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 1 << 20), cudaSuccess);
  std::vector<char> host(1 << 20, 1);
  auto t = KernelTrace::Start();
  if (t.status().code() == absl::StatusCode::kUnimplemented) GTEST_SKIP() << t.status();
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(KernelTrace::Start().status().code(), absl::StatusCode::kFailedPrecondition);
  const uint64_t a = KernelTrace::Now();
  ASSERT_EQ(cudaMemset(d, 0, 1 << 20), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const uint64_t b = KernelTrace::Now();
  auto recs = (*t)->Stop();
  ASSERT_TRUE(recs.ok()) << recs.status();
  bool memset = false, copy = false;
  for (const TraceRecord& r : *recs) {
    EXPECT_LE(r.start_ns, r.end_ns);
    if (r.start_ns < a || r.start_ns >= b) continue;
    memset |= r.kind == TraceRecord::kMemset && r.bytes == (1u << 20);
    copy |= r.kind == TraceRecord::kMemcpy && r.name == "memcpy HtoD" && r.bytes == (1u << 20);
  }
  EXPECT_TRUE(memset && copy) << SummarizeTrace(*recs, {{a, b}}, 10);
  EXPECT_EQ((*t)->Stop().status().code(), absl::StatusCode::kFailedPrecondition);
  // A second trace may start once the first stopped.
  auto again = KernelTrace::Start();
  EXPECT_TRUE(again.ok()) << again.status();
  cudaFree(d);
}

}  // namespace
}  // namespace v4serve::bench
