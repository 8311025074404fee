// `v4serve kvstore`: a node's persistent KV tier, RocksDB on local disk, served over gRPC.
#ifndef V4SERVE_KVSTORE_KVSTORE_SERVER_H_
#define V4SERVE_KVSTORE_KVSTORE_SERVER_H_

#include <string>

#include "absl/status/status.h"
#include "services/server_process.h"
#include "services/shutdown.h"

namespace v4serve::kvstore {

struct KvStoreServerOptions {
  std::string db_path;  // RocksDB directory; created when missing
  services::ServerProcessOptions process;

  absl::Status Validate() const;
};

// Opens (or creates) the database, serves until `shutdown` triggers, drains and closes it.
absl::Status RunKvStoreServer(const KvStoreServerOptions& options, services::ShutdownSignal* shutdown);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KVSTORE_SERVER_H_
