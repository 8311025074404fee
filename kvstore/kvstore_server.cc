#include "kvstore/kvstore_server.h"

#include <map>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "kvstore/kvstore_service.h"
#include "kvstore/tiered_store.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/status_macros.h"

namespace v4serve::kvstore {
namespace {

// The store's counters as Prometheus metrics, refreshed once a second from TieredStore::stats().
class StoreMetrics {
 public:
  explicit StoreMetrics(prometheus::Registry& r) : r_(r) {}

  void Update(const TieredStoreStats& s, int64_t events_dropped) {
    Gauge("v4serve_kvstore_blocks", "Blocks held per tier.", "host").Set(double(s.host_blocks));
    Gauge("v4serve_kvstore_blocks", "Blocks held per tier.", "disk").Set(double(s.disk_blocks));
    Gauge("v4serve_kvstore_host_bytes", "Bytes held in the host-memory tier.", "").Set(double(s.host_bytes));
    Gauge("v4serve_kvstore_write_queue_depth", "Blocks waiting in the write-behind queue.", "")
        .Set(double(s.write_queue_depth));
    Count("v4serve_kvstore_get_hits_total", "Gets served, per tier.", "host", s.get_hits_host);
    Count("v4serve_kvstore_get_hits_total", "Gets served, per tier.", "disk", s.get_hits_disk);
    Count("v4serve_kvstore_get_misses_total", "Gets that found no verified block.", "", s.get_misses);
    Count("v4serve_kvstore_lookup_hit_blocks_total", "Blocks matched by Lookups.", "", s.lookup_hit_blocks);
    Count("v4serve_kvstore_puts_total", "Blocks offered to the store.", "", s.puts);
    Count("v4serve_kvstore_put_drops_total", "Disk writes dropped because the write-behind queue was full.",
          "", s.put_drops);
    Count("v4serve_kvstore_put_errors_total", "Disk writes that failed.", "", s.put_errors);
    Count("v4serve_kvstore_prefetched_total", "Blocks prefetched from disk into host memory.", "",
          s.prefetched);
    Count("v4serve_kvstore_checksum_failures_total",
          "Blocks that failed verification on read (served as misses and dropped).", "", s.checksum_failures);
    Count("v4serve_kvstore_evictions_total", "Blocks evicted, per tier.", "host", s.evicted_host);
    Count("v4serve_kvstore_evictions_total", "Blocks evicted, per tier.", "disk", s.evicted_disk);
    Count("v4serve_kvstore_events_dropped_total", "Events a slow Events subscriber did not get.", "",
          events_dropped);
  }

 private:
  prometheus::Labels LabelsOf(const std::string& tier) {
    return tier.empty() ? prometheus::Labels{} : prometheus::Labels{{"tier", tier}};
  }
  prometheus::Gauge& Gauge(const std::string& name, const char* help, const std::string& tier) {
    auto& fam = gauges_.try_emplace(name, nullptr).first->second;
    if (fam == nullptr) fam = &prometheus::BuildGauge().Name(name).Help(help).Register(r_);
    return fam->Add(LabelsOf(tier));
  }
  void Count(const std::string& name, const char* help, const std::string& tier, int64_t total) {
    auto& fam = counters_.try_emplace(name, nullptr).first->second;
    if (fam == nullptr) fam = &prometheus::BuildCounter().Name(name).Help(help).Register(r_);
    prometheus::Counter& c = fam->Add(LabelsOf(tier));
    const double delta = double(total) - c.Value();
    if (delta > 0) c.Increment(delta);
  }

  prometheus::Registry& r_;
  std::map<std::string, prometheus::Family<prometheus::Gauge>*> gauges_;
  std::map<std::string, prometheus::Family<prometheus::Counter>*> counters_;
};

}  // namespace

absl::Status KvStoreServerOptions::Validate() const {
  if (db_path.empty())
    return absl::InvalidArgumentError("--db_path: a directory for the RocksDB store is required");
  if (host_mb <= 0) return absl::InvalidArgumentError("--host_mb must be positive");
  if (disk_mb <= 0) return absl::InvalidArgumentError("--disk_mb must be positive");
  if (write_queue_blocks <= 0) return absl::InvalidArgumentError("--write_queue_blocks must be positive");
  return process.Validate();
}

void AddKvStoreTierFlags(services::FlagSet& flags, KvStoreServerOptions* o) {
  flags.Add("host_mb", &o->host_mb, "Host-memory tier capacity in MiB (LRU).");
  flags.Add("disk_mb", &o->disk_mb, "Disk tier capacity in MiB of block + window-state bytes (LRU).");
  flags.Add("write_queue_blocks", &o->write_queue_blocks,
            "Write-behind queue bound; a full queue drops the disk write (counted).");
  flags.Add("blob_files", &o->blob_files, "Keep block values in RocksDB blob files (BlobDB).");
}

absl::Status RunKvStoreServer(const KvStoreServerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  TieredStoreOptions to;
  to.host_capacity_bytes = options.host_mb << 20;
  to.disk_path = options.db_path;
  to.disk_capacity_bytes = options.disk_mb << 20;
  to.write_queue_blocks = options.write_queue_blocks;
  to.blob_files = options.blob_files;
  ASSIGN_OR_RETURN(std::unique_ptr<TieredStore> store, TieredStore::Open(to));
  services::MetricsRegistry metrics("kvstore");
  KvStoreService service(store.get(), "");
  StoreMetrics store_metrics(metrics.registry());
  store_metrics.Update(store->stats(), 0);
  ASSIGN_OR_RETURN(
      std::unique_ptr<services::ServerProcess> server,
      services::ServerProcess::Start("kvstore", options.process, {&service}, &metrics, shutdown));
  service.set_holder(absl::StrCat(options.process.grpc.host, ":", server->grpc_port()));
  V4LOG(INFO).With("db_path", options.db_path).With("blocks", store->stats().disk_blocks)
      << "kvstore opened (index rebuilt)";
  absl::Notification done;
  std::thread updater([&] {
    while (!done.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      store_metrics.Update(store->stats(), service.events_dropped());
    }
  });
  absl::Status run = server->Run();
  done.Notify();
  updater.join();
  store->Flush();
  return run;
}

}  // namespace v4serve::kvstore
