// The process's Prometheus registry: build info and process metrics built in, served by an exposer on
// --metrics_port and (for the router) on its HTTP port too.
//
// Thread-safe (prometheus-cpp families are). Components take a `MetricsRegistry&` that must outlive them
// and add their own families to registry().
#ifndef V4SERVE_SERVICES_METRICS_H_
#define V4SERVE_SERVICES_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"

namespace prometheus {
class Exposer;
}

namespace v4serve::services {

class MetricsRegistry {
 public:
  // Registers v4serve_build_info{role,version,commit,build_type} and process_* metrics.
  explicit MetricsRegistry(std::string role);
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  prometheus::Registry& registry() { return *registry_; }

  // The Prometheus text exposition of everything registered.
  std::string Serialize() const;

  // Serves /metrics on host:port (port 0 picks one). Returns the bound port. At most once.
  absl::StatusOr<int> Expose(const std::string& host, int port);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> process_collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string exposed_host_;
};

// One unlabelled series in `r` (a family with a single counter or gauge), the common case.
prometheus::Counter& MakeCounter(prometheus::Registry& r, const std::string& name, const std::string& help);
prometheus::Gauge& MakeGauge(prometheus::Registry& r, const std::string& name, const std::string& help);

}  // namespace v4serve::services

#endif  // V4SERVE_SERVICES_METRICS_H_
