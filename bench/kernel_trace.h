// Where a step's GPU time goes at the GPU's own clocks, with warm caches and CUDA graphs on: the kernels,
// copies and memsets CUPTI's activity API records, cut into host-side windows (one a decode step or a
// prefill). The GPU machine has ncu (each kernel alone, caches cold, graphs off) but not nsys, and a step's
// idle time between kernels shows in neither ncu nor a step's wall time; this does both.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace v4serve::bench {

struct TraceRecord {
  enum Kind { kKernel, kMemcpy, kMemset };
  Kind kind = kKernel;
  std::string name;  // kernels: demangled, without parameters or namespaces
  uint64_t start_ns = 0, end_ns = 0;
  uint64_t bytes = 0;  // copies and memsets
};

// Records from Start until Stop (one trace at a time in a process). Without CUPTI at build time Start
// returns UNIMPLEMENTED.
class KernelTrace {
 public:
  static absl::StatusOr<std::unique_ptr<KernelTrace>> Start();
  // CUPTI's clock, the one the records' times are on (host windows are taken with it).
  static uint64_t Now();
  // Flushes and returns what was recorded, sorted by start.
  absl::StatusOr<std::vector<TraceRecord>> Stop();
  ~KernelTrace();
  KernelTrace(const KernelTrace&) = delete;
  KernelTrace& operator=(const KernelTrace&) = delete;

 private:
  KernelTrace() = default;
  bool stopped_ = false;
};

// "void ns::Kernel<8, 2>(float const*, int)" -> "Kernel<8, 2>": the same names bench/ncu_step.py prints.
std::string ShortKernelName(const std::string& demangled);

// A text report of `windows` (host [begin, end) on KernelTrace's clock, e.g. decode steps), averaged over
// them: host wall, the host's time before the GPU's first record and after its last, the GPU's busy time
// (the union of records) and its idle time between records; the `top` largest idle gaps by the records
// around them; and the `top` record names by busy time a window.
std::string SummarizeTrace(const std::vector<TraceRecord>& records,
                           const std::vector<std::pair<uint64_t, uint64_t>>& windows, int top);

}  // namespace v4serve::bench
