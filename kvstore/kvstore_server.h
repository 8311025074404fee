// `v4serve kvstore`: a node's tiered KV store (host memory + RocksDB on local disk) served over gRPC
// (kvstore_service.h), so that the workers of a node share one store (docs/KV_STORE.md).
#ifndef V4SERVE_KVSTORE_KVSTORE_SERVER_H_
#define V4SERVE_KVSTORE_KVSTORE_SERVER_H_

#include <string>

#include "absl/status/status.h"
#include "services/flags.h"
#include "services/server_process.h"
#include "services/shutdown.h"

namespace v4serve::kvstore {

struct KvStoreServerOptions {
  std::string db_path;      // RocksDB directory; created when missing
  int64_t host_mb = 4096;   // Host-memory tier capacity.
  int64_t disk_mb = 65536;  // Disk tier capacity (block + window-state bytes).
  int32_t write_queue_blocks = 1024;
  bool blob_files = true;
  services::ServerProcessOptions process;

  absl::Status Validate() const;
};

// Binds --host_mb, --disk_mb, --write_queue_blocks, --blob_files (not --db_path, not the server flags).
void AddKvStoreTierFlags(services::FlagSet& flags, KvStoreServerOptions* options);

// Opens (or creates) the database, serves until `shutdown` triggers, drains and closes it.
absl::Status RunKvStoreServer(const KvStoreServerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KVSTORE_SERVER_H_
