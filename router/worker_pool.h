// The router's view of its workers: discovery (static host:port lists, or DNS names that resolve to every
// pod of a Kubernetes headless Service), grpc.health.v1 checks, load (requests in flight through this
// router), and the choice of a worker per request through a RoutingPolicy.
//
// Thread-safe. A background thread re-resolves names and checks health every health_interval; a failed
// call reported through ReportFailure() takes a worker out of routing at once, until its next good check.
#ifndef V4SERVE_ROUTER_WORKER_POOL_H_
#define V4SERVE_ROUTER_WORKER_POOL_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "router/routing_policy.h"
#include "services/grpc_server.h"

namespace v4serve::router {

struct WorkerPoolOptions {
  std::vector<std::string> prefill_targets;  // host:port; a name may resolve to several workers
  std::vector<std::string> decode_targets;
  absl::Duration health_interval = absl::Seconds(2);
  absl::Duration health_timeout = absl::Seconds(1);
  services::TlsOptions tls;  // client side: CA, and cert + key for mTLS

  absl::Status Validate() const;
};

class WorkerPool;

// A chosen worker; counts as in flight on it until destroyed.
class WorkerLease {
 public:
  WorkerLease() = default;
  WorkerLease(WorkerLease&& other) noexcept { *this = std::move(other); }
  WorkerLease& operator=(WorkerLease&& other) noexcept;
  ~WorkerLease();

  const std::string& address() const { return address_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  explicit operator bool() const { return pool_ != nullptr; }

 private:
  friend class WorkerPool;
  WorkerPool* pool_ = nullptr;
  WorkerRole role_ = WorkerRole::kDecode;
  std::string address_;
  std::shared_ptr<grpc::Channel> channel_;
};

class WorkerPool {
 public:
  // Resolves targets and runs a first round of health checks before returning; `policy` must outlive it.
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Start(const WorkerPoolOptions& options,
                                                           RoutingPolicy* policy);
  ~WorkerPool();

  // A healthy worker of `role`, chosen by the policy. UNAVAILABLE naming the role when none is healthy.
  absl::StatusOr<WorkerLease> Pick(WorkerRole role, const RoutingContext& context);
  // A call to `address` failed in a way that says the worker is gone (UNAVAILABLE, connection errors).
  void ReportFailure(WorkerRole role, const std::string& address, const absl::Status& status);

  std::vector<WorkerInfo> Snapshot() const;
  // The channel to a known worker (null when the pool has none at `address`).
  std::shared_ptr<grpc::Channel> Channel(const std::string& address) const;
  // OK when at least one decode worker is healthy (prefill workers are optional: decode can prefill).
  absl::Status Ready() const;
  // Waits until Ready() or `deadline`.
  absl::Status AwaitReady(absl::Time deadline) const;
  bool has_prefill_targets() const { return !options_.prefill_targets.empty(); }
  bool has_targets() const { return !options_.decode_targets.empty() || !options_.prefill_targets.empty(); }

 private:
  struct Worker {
    WorkerInfo info;
    std::shared_ptr<grpc::Channel> channel;
  };
  friend class WorkerLease;

  explicit WorkerPool(WorkerPoolOptions options, RoutingPolicy* policy);
  void Refresh();  // resolve + health-check every target once
  void Loop();
  void Release(WorkerRole role, const std::string& address);
  absl::Status ReadyLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const WorkerPoolOptions options_;
  RoutingPolicy* const policy_;
  std::shared_ptr<grpc::ChannelCredentials> creds_;
  mutable absl::Mutex mu_;
  std::vector<Worker> workers_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// host:port -> every "ip:port" it resolves to (IPv6 in brackets). A literal address resolves to itself.
absl::StatusOr<std::vector<std::string>> ResolveTarget(const std::string& target);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_WORKER_POOL_H_
