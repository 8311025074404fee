#include "kvstore/kvstore_server.h"

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "services/logging.h"
#include "services/metrics.h"
#include "services/status_macros.h"

namespace v4serve::kvstore {

absl::Status KvStoreServerOptions::Validate() const {
  if (db_path.empty())
    return absl::InvalidArgumentError("--db_path: a directory for the RocksDB store is required");
  return process.Validate();
}

absl::Status RunKvStoreServer(const KvStoreServerOptions& options, services::ShutdownSignal* shutdown) {
  RETURN_IF_ERROR(options.Validate());
  std::error_code ec;
  std::filesystem::create_directories(options.db_path, ec);  // RocksDB creates only the last level
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("--db_path: cannot create ", options.db_path, ": ", ec.message()));
  }
  rocksdb::Options db_options;
  db_options.create_if_missing = true;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status st = rocksdb::DB::Open(db_options, options.db_path, &raw);
  if (!st.ok()) {
    return absl::UnavailableError(
        absl::StrCat("cannot open KV store at ", options.db_path, ": ", st.ToString()));
  }
  std::unique_ptr<rocksdb::DB> db(raw);
  services::MetricsRegistry metrics("kvstore");
  ASSIGN_OR_RETURN(std::unique_ptr<services::ServerProcess> server,
                   services::ServerProcess::Start("kvstore", options.process, {}, &metrics, shutdown));
  V4LOG(INFO).With("db_path", options.db_path) << "kvstore opened";
  absl::Status run = server->Run();
  st = db->Close();
  if (!st.ok()) return absl::DataLossError(absl::StrCat("closing the KV store failed: ", st.ToString()));
  return run;
}

}  // namespace v4serve::kvstore
