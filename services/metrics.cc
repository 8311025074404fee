#include "services/metrics.h"

#include <dirent.h>
#include <netdb.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <exception>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"
#include "services/build_info.h"

namespace v4serve::services {
namespace {

// Opens and closes a TCP connection to host:port (loopback for a wildcard host); errors are ignored.
void Poke(const std::string& host, int port) {
  const bool wildcard = host.empty() || host == "0.0.0.0" || host == "::" || host == "[::]";
  std::string h = wildcard ? "127.0.0.1" : host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(h.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    bool ok = connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    close(fd);
    if (ok) break;
  }
  freeaddrinfo(res);
}

prometheus::MetricFamily OneValue(const std::string& name, const std::string& help,
                                  prometheus::MetricType type, double value) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(metric);
  return family;
}

int CountOpenFds() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int n = 0;
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n - 3;  // ".", ".." and the DIR's own descriptor
}

// process_* metrics in the names the Prometheus client libraries use, read from /proc at scrape time.
class ProcessCollector : public prometheus::Collectable {
 public:
  ProcessCollector() : start_time_seconds_(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch())) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    using prometheus::MetricType;
    std::vector<prometheus::MetricFamily> out;
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
                 (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    out.push_back(OneValue("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                           MetricType::Counter, cpu));
    std::ifstream statm("/proc/self/statm");
    double pages_virtual = 0, pages_resident = 0;
    if (statm >> pages_virtual >> pages_resident) {
      double page = static_cast<double>(sysconf(_SC_PAGESIZE));
      out.push_back(OneValue("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                             MetricType::Gauge, pages_virtual * page));
      out.push_back(OneValue("process_resident_memory_bytes", "Resident memory size in bytes.",
                             MetricType::Gauge, pages_resident * page));
    }
    out.push_back(
        OneValue("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, CountOpenFds()));
    out.push_back(OneValue("process_start_time_seconds",
                           "Start time of the process since unix epoch in seconds.", MetricType::Gauge,
                           start_time_seconds_));
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("Threads:", 0) == 0) {
        double threads = 0;
        if (absl::SimpleAtod(absl::StripAsciiWhitespace(line.substr(8)), &threads)) {
          out.push_back(OneValue("process_threads", "Number of OS threads in the process.", MetricType::Gauge,
                                 threads));
        }
      }
    }
    return out;
  }

 private:
  double start_time_seconds_;
};

}  // namespace

MetricsRegistry::MetricsRegistry(std::string role)
    : registry_(std::make_shared<prometheus::Registry>()),
      process_collector_(std::make_shared<ProcessCollector>()) {
  const BuildInfo& info = GetBuildInfo();
  prometheus::BuildGauge()
      .Name("v4serve_build_info")
      .Help("Build information of this v4serve process; the value is always 1.")
      .Register(*registry_)
      .Add({{"role", role},
            {"version", std::string(info.version)},
            {"commit", std::string(info.git_commit)},
            {"build_type", std::string(info.build_type)}})
      .Set(1);
}

MetricsRegistry::~MetricsRegistry() {
  if (exposer_ == nullptr) return;
  // The exposer's server (civetweb) sees that it must stop only when its poll() on the listening socket
  // returns, which with no traffic is every 2 s, so every process took up to 2 s to exit after draining.
  // Connecting to the port while it stops wakes that poll.
  const std::vector<int> ports = exposer_->GetListeningPorts();
  std::atomic<bool> stopped{false};
  std::thread waker([&] {
    while (!stopped.load()) {
      for (int port : ports) Poke(exposed_host_, port);
      absl::SleepFor(absl::Milliseconds(20));
    }
  });
  exposer_.reset();
  stopped = true;
  waker.join();
}

std::string MetricsRegistry::Serialize() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> process = process_collector_->Collect();
  families.insert(families.end(), process.begin(), process.end());
  return prometheus::TextSerializer().Serialize(families);
}

absl::StatusOr<int> MetricsRegistry::Expose(const std::string& host, int port) {
  if (exposer_ != nullptr) return absl::FailedPreconditionError("metrics are already exposed");
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", host, ":", port, ": ", e.what()));
  }
  exposed_host_ = host;
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(process_collector_);
  std::vector<int> ports = exposer_->GetListeningPorts();
  if (ports.empty()) return absl::InternalError("metrics exposer reports no listening port");
  return ports.front();
}

prometheus::Counter& MakeCounter(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

prometheus::Gauge& MakeGauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}

}  // namespace v4serve::services
