#include "bench/kernel_trace.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#ifdef V4SERVE_HAVE_CUPTI
#include <cupti.h>
#endif

namespace v4serve::bench {

std::string ShortKernelName(const std::string& demangled) {
  std::string s = demangled;
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  // The parameter list: the "(...)" that closes the name.
  if (!s.empty() && s.back() == ')') {
    int parens = 0;
    for (size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') ++parens;
      if (s[i] == '(' && --parens == 0) {
        s = s.substr(0, i);
        break;
      }
    }
  }
  // Namespaces before the name (not inside template arguments).
  int depth = 0;
  size_t cut = 0;
  for (size_t i = 0; i + 1 < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (depth == 0 && s[i] == ':' && s[i + 1] == ':') cut = i + 2;
  }
  s = s.substr(cut);
  return s.size() > 70 ? s.substr(0, 70) : s;
}

namespace {

std::string Demangle(const char* name) {
  if (name == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d != nullptr ? d : name;
  std::free(d);
  return ShortKernelName(out);
}

std::mutex g_mu;
std::vector<TraceRecord>* g_records = nullptr;  // under g_mu; set while a trace runs

#ifdef V4SERVE_HAVE_CUPTI
constexpr size_t kBufferBytes = 8 << 20;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<TraceRecord> got;
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    TraceRecord r;
    if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || rec->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
      r = {TraceRecord::kKernel, Demangle(k->name), k->start, k->end, 0};
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
      const char* dir = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "HtoD"
                        : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "DtoH"
                        : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "DtoD"
                                                                         : "other";
      r = {TraceRecord::kMemcpy, absl::StrCat("memcpy ", dir), m->start, m->end, m->bytes};
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
      r = {TraceRecord::kMemset, "memset", m->start, m->end, m->bytes};
    } else {
      continue;
    }
    got.push_back(std::move(r));
  }
  std::free(buffer);
  std::lock_guard<std::mutex> l(g_mu);
  if (g_records != nullptr) g_records->insert(g_records->end(), got.begin(), got.end());
}

absl::Status Cupti(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return absl::OkStatus();
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  return absl::InternalError(absl::StrCat(what, ": ", msg != nullptr ? msg : "CUPTI error"));
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_MEMSET};
#endif

}  // namespace

absl::StatusOr<std::unique_ptr<KernelTrace>> KernelTrace::Start() {
#ifdef V4SERVE_HAVE_CUPTI
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_records != nullptr) return absl::FailedPreconditionError("a kernel trace is already running");
    g_records = new std::vector<TraceRecord>();
  }
  absl::Status st = Cupti(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted),
                          "cuptiActivityRegisterCallbacks");
  for (CUpti_ActivityKind k : kKinds) {
    if (st.ok()) st = Cupti(cuptiActivityEnable(k), "cuptiActivityEnable");
  }
  std::unique_ptr<KernelTrace> t(new KernelTrace());
  if (!st.ok()) {
    (void)t->Stop();
    return st;
  }
  return t;
#else
  return absl::UnimplementedError("built without CUPTI (CUDA::cupti not found at configure time)");
#endif
}

uint64_t KernelTrace::Now() {
  uint64_t t = 0;
#ifdef V4SERVE_HAVE_CUPTI
  cuptiGetTimestamp(&t);
#endif
  return t;
}

absl::StatusOr<std::vector<TraceRecord>> KernelTrace::Stop() {
  if (stopped_) return absl::FailedPreconditionError("the kernel trace was stopped already");
  stopped_ = true;
  absl::Status st;
#ifdef V4SERVE_HAVE_CUPTI
  // No new records once the kinds are off; one forced flush then delivers every buffer still held.
  for (CUpti_ActivityKind k : kKinds) cuptiActivityDisable(k);
  st = Cupti(cuptiActivityFlushAll(1), "cuptiActivityFlushAll");
#endif
  std::vector<TraceRecord> out;
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_records != nullptr) out = std::move(*g_records);
    delete g_records;
    g_records = nullptr;
  }
  if (!st.ok()) return st;
  std::sort(out.begin(), out.end(),
            [](const TraceRecord& a, const TraceRecord& b) { return a.start_ns < b.start_ns; });
  return out;
}

KernelTrace::~KernelTrace() {
  if (!stopped_) (void)Stop();
}

std::string SummarizeTrace(const std::vector<TraceRecord>& records,
                           const std::vector<std::pair<uint64_t, uint64_t>>& windows, int top) {
  if (windows.empty()) return "no windows traced\n";
  double wall = 0, lead = 0, tail = 0, busy = 0, idle = 0;
  int64_t count = 0, empty = 0;
  std::map<std::string, std::pair<double, int64_t>> by_name;                       // busy ns, records
  std::map<std::pair<std::string, std::string>, std::pair<double, int64_t>> gaps;  // idle ns, gaps
  for (const auto& [b, e] : windows) {
    std::vector<const TraceRecord*> in;
    for (const TraceRecord& r : records) {
      if (r.start_ns >= b && r.start_ns < e) in.push_back(&r);
    }
    wall += static_cast<double>(e - b);
    if (in.empty()) {
      ++empty;
      continue;
    }
    count += static_cast<int64_t>(in.size());
    // Sorted by start (Stop sorts): walk the union, the record that ends each busy stretch is the gap's
    // "before".
    uint64_t cur_end = in[0]->end_ns;
    const TraceRecord* ender = in[0];
    double w_busy = 0;
    uint64_t seg_start = in[0]->start_ns;
    for (size_t i = 0; i < in.size(); ++i) {
      const TraceRecord& r = *in[i];
      auto& n = by_name[r.kind == TraceRecord::kKernel ? r.name : absl::StrCat(r.name, " (", r.bytes, " B)")];
      n.first += static_cast<double>(r.end_ns - r.start_ns);
      n.second += 1;
      if (i == 0) continue;
      if (r.start_ns > cur_end) {
        w_busy += static_cast<double>(cur_end - seg_start);
        auto& g = gaps[{ender->name, r.name}];
        g.first += static_cast<double>(r.start_ns - cur_end);
        g.second += 1;
        seg_start = r.start_ns;
        cur_end = r.end_ns;
        ender = &r;
      } else if (r.end_ns > cur_end) {
        cur_end = r.end_ns;
        ender = &r;
      }
    }
    w_busy += static_cast<double>(cur_end - seg_start);
    const uint64_t last_end = cur_end;
    lead += static_cast<double>(in[0]->start_ns - b);
    tail += last_end > e ? 0.0 : static_cast<double>(e - last_end);
    busy += w_busy;
    idle += static_cast<double>(last_end - in[0]->start_ns) - w_busy;
  }
  const double n = static_cast<double>(windows.size());
  std::string out = absl::StrFormat(
      "    trace, %d windows (%d without GPU records), per window: wall %.1f us = host before the GPU's "
      "first record %.1f + GPU busy %.1f + GPU idle between records %.1f + host after the last %.1f; "
      "%.1f records\n",
      static_cast<int>(windows.size()), static_cast<int>(empty), wall / n / 1e3, lead / n / 1e3,
      busy / n / 1e3, idle / n / 1e3, tail / n / 1e3, static_cast<double>(count) / n);
  std::vector<std::tuple<double, int64_t, std::string>> g;
  for (const auto& [k, v] : gaps)
    g.emplace_back(v.first / n, v.second, absl::StrCat(k.first, " -> ", k.second));
  std::sort(g.rbegin(), g.rend());
  out += "    | idle gap (before -> after) | us a window | gaps a window |\n    |---|---|---|\n";
  for (int i = 0; i < top && i < static_cast<int>(g.size()); ++i) {
    out += absl::StrFormat("    | %s | %.1f | %.1f |\n", std::get<2>(g[i]), std::get<0>(g[i]) / 1e3,
                           static_cast<double>(std::get<1>(g[i])) / n);
  }
  std::vector<std::tuple<double, int64_t, std::string>> k;
  for (const auto& [name, v] : by_name) k.emplace_back(v.first / n, v.second, name);
  std::sort(k.rbegin(), k.rend());
  out += "    | record (kernel, copy, memset) | us a window | launches a window |\n    |---|---|---|\n";
  for (int i = 0; i < top && i < static_cast<int>(k.size()); ++i) {
    out += absl::StrFormat("    | %s | %.1f | %.1f |\n", std::get<2>(k[i]), std::get<0>(k[i]) / 1e3,
                           static_cast<double>(std::get<1>(k[i])) / n);
  }
  return out;
}

}  // namespace v4serve::bench
