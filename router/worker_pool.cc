#include "router/worker_pool.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/blocking_counter.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "services/logging.h"
#include "services/status_macros.h"

namespace v4serve::router {
namespace {

const char* RoleName(WorkerRole role) { return role == WorkerRole::kPrefill ? "prefill" : "decode"; }

}  // namespace

absl::Status WorkerPoolOptions::Validate() const {
  for (const auto* list : {&prefill_targets, &decode_targets}) {
    for (const std::string& t : *list) {
      size_t colon = t.rfind(':');
      int port = 0;
      if (colon == std::string::npos || colon == 0 || !absl::SimpleAtoi(t.substr(colon + 1), &port) ||
          port <= 0 || port > 65535) {
        return absl::InvalidArgumentError(absl::StrCat(
            list == &prefill_targets ? "prefill_workers" : "decode_workers", ": '", t, "' is not host:port"));
      }
    }
  }
  if (health_interval <= absl::ZeroDuration() || health_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("worker_health_interval and worker_health_timeout must be positive");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ResolveTarget(const std::string& target) {
  size_t colon = target.rfind(':');
  std::string host = target.substr(0, colon), port = target.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) return absl::UnavailableError(absl::StrCat("cannot resolve ", target, ": ", gai_strerror(rc)));
  std::set<std::string> out;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr, buf, sizeof(buf));
      out.insert(absl::StrCat(buf, ":", port));
    } else if (a->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr, buf, sizeof(buf));
      out.insert(absl::StrCat("[", buf, "]:", port));
    }
  }
  freeaddrinfo(res);
  return std::vector<std::string>(out.begin(), out.end());
}

WorkerLease& WorkerLease::operator=(WorkerLease&& other) noexcept {
  if (this != &other) {
    if (pool_ != nullptr) pool_->Release(role_, address_);
    pool_ = std::exchange(other.pool_, nullptr);
    role_ = other.role_;
    address_ = std::move(other.address_);
    channel_ = std::move(other.channel_);
  }
  return *this;
}

WorkerLease::~WorkerLease() {
  if (pool_ != nullptr) pool_->Release(role_, address_);
}

WorkerPool::WorkerPool(WorkerPoolOptions options, RoutingPolicy* policy)
    : options_(std::move(options)), policy_(policy) {}

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Start(const WorkerPoolOptions& options,
                                                              RoutingPolicy* policy) {
  RETURN_IF_ERROR(options.Validate());
  auto pool = std::unique_ptr<WorkerPool>(new WorkerPool(options, policy));
  ASSIGN_OR_RETURN(pool->creds_, services::MakeChannelCredentials(options.tls));
  pool->Refresh();
  pool->thread_ = std::thread([p = pool.get()] { p->Loop(); });
  return pool;
}

std::shared_ptr<grpc::Channel> WorkerPool::Channel(const std::string& address) const {
  absl::MutexLock lock(&mu_);
  for (const Worker& w : workers_) {
    if (w.info.address == address) return w.channel;
  }
  return nullptr;
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void WorkerPool::Loop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.health_interval)) return;
    }
    Refresh();
  }
}

void WorkerPool::Refresh() {
  // 1. Resolve every target (outside the lock: DNS may be slow).
  struct Found {
    std::string target, address;
    WorkerRole role;
  };
  std::vector<Found> found;
  for (WorkerRole role : {WorkerRole::kPrefill, WorkerRole::kDecode}) {
    for (const std::string& target :
         role == WorkerRole::kPrefill ? options_.prefill_targets : options_.decode_targets) {
      absl::StatusOr<std::vector<std::string>> addrs = ResolveTarget(target);
      if (!addrs.ok()) {
        V4LOG(WARNING).With("target", target).With("status", addrs.status())
            << "worker name does not resolve";
        continue;
      }
      for (std::string& a : *addrs) found.push_back({target, std::move(a), role});
    }
  }
  // 2. Merge into the worker list: keep known workers (and their load), add new, drop vanished idle ones.
  std::vector<std::pair<WorkerRole, std::string>> to_check;
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  {
    absl::MutexLock lock(&mu_);
    std::vector<Worker> next;
    for (const Found& f : found) {
      auto it = std::find_if(workers_.begin(), workers_.end(), [&](const Worker& w) {
        return w.info.address == f.address && w.info.role == f.role;
      });
      if (it != workers_.end()) {
        next.push_back(std::move(*it));
        workers_.erase(it);
      } else {
        Worker w;
        w.info = {f.target, f.address, f.role, false, 0, "not checked yet"};
        w.channel = grpc::CreateChannel(f.address, creds_);
        next.push_back(std::move(w));
      }
    }
    for (Worker& gone : workers_) {
      if (gone.info.in_flight > 0) next.push_back(std::move(gone));  // leases still point at it
    }
    workers_ = std::move(next);
    for (const Worker& w : workers_) {
      to_check.emplace_back(w.info.role, w.info.address);
      channels.push_back(w.channel);
    }
  }
  // 3. Health-check all of them concurrently (callback API), then record the results.
  std::vector<absl::Status> results(to_check.size());
  absl::BlockingCounter pending(static_cast<int>(to_check.size()));
  struct Call {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    std::unique_ptr<grpc::health::v1::Health::Stub> stub;
  };
  std::vector<std::unique_ptr<Call>> calls;
  for (size_t i = 0; i < to_check.size(); ++i) {
    auto call = std::make_unique<Call>();
    call->stub = grpc::health::v1::Health::NewStub(channels[i]);
    call->ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_timeout));
    Call* c = call.get();
    c->stub->async()->Check(&c->ctx, &c->req, &c->resp, [c, i, &results, &pending](const grpc::Status& st) {
      if (!st.ok()) {
        results[i] = absl::UnavailableError(absl::StrCat("health check: ", st.error_message()));
      } else if (c->resp.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
        results[i] = absl::UnavailableError(absl::StrCat(
            "health: ", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(c->resp.status())));
      }
      pending.DecrementCount();
    });
    calls.push_back(std::move(call));
  }
  pending.Wait();
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < to_check.size(); ++i) {
    for (Worker& w : workers_) {
      if (w.info.role != to_check[i].first || w.info.address != to_check[i].second) continue;
      bool was = w.info.healthy;
      w.info.healthy = results[i].ok();
      w.info.last_error = results[i].ok() ? "" : std::string(results[i].message());
      if (was != w.info.healthy) {
        V4LOG(INFO)
                .With("role", RoleName(w.info.role))
                .With("worker", w.info.address)
                .With("healthy", w.info.healthy ? "true" : "false")
                .With("error", w.info.last_error)
            << "worker health changed";
      }
    }
  }
}

absl::StatusOr<WorkerLease> WorkerPool::Pick(WorkerRole role, const RoutingContext& context) {
  absl::MutexLock lock(&mu_);
  std::vector<const WorkerInfo*> candidates;
  std::vector<Worker*> owners;
  for (Worker& w : workers_) {
    if (w.info.role == role && w.info.healthy) {
      candidates.push_back(&w.info);
      owners.push_back(&w);
    }
  }
  if (candidates.empty()) {
    return absl::UnavailableError(absl::StrCat("no healthy ", RoleName(role), " worker"));
  }
  Worker* chosen = owners[policy_->Choose(candidates, context)];
  ++chosen->info.in_flight;
  WorkerLease lease;
  lease.pool_ = this;
  lease.role_ = role;
  lease.address_ = chosen->info.address;
  lease.channel_ = chosen->channel;
  return lease;
}

void WorkerPool::Release(WorkerRole role, const std::string& address) {
  absl::MutexLock lock(&mu_);
  for (Worker& w : workers_) {
    if (w.info.role == role && w.info.address == address && w.info.in_flight > 0) {
      --w.info.in_flight;
      return;
    }
  }
}

void WorkerPool::ReportFailure(WorkerRole role, const std::string& address, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  for (Worker& w : workers_) {
    if (w.info.role == role && w.info.address == address && w.info.healthy) {
      w.info.healthy = false;
      w.info.last_error = std::string(status.message());
      V4LOG(WARNING).With("role", RoleName(role)).With("worker", address).With("status", status)
          << "worker removed from routing until its next good health check";
    }
  }
}

std::vector<WorkerInfo> WorkerPool::Snapshot() const {
  absl::MutexLock lock(&mu_);
  std::vector<WorkerInfo> out;
  for (const Worker& w : workers_) out.push_back(w.info);
  return out;
}

absl::Status WorkerPool::ReadyLocked() const {
  if (options_.decode_targets.empty()) {
    return absl::UnavailableError(
        "no model is loaded: this router has no decode workers (start `v4serve decode --model DIR` and pass "
        "--decode_workers, or run `v4serve up`)");
  }
  for (const Worker& w : workers_) {
    if (w.info.role == WorkerRole::kDecode && w.info.healthy) return absl::OkStatus();
  }
  std::string why;
  for (const Worker& w : workers_) {
    if (w.info.role == WorkerRole::kDecode)
      absl::StrAppend(&why, why.empty() ? "" : "; ", w.info.address, ": ", w.info.last_error);
  }
  return absl::UnavailableError(
      absl::StrCat("no healthy decode worker (", why.empty() ? "none resolved" : why, ")"));
}

absl::Status WorkerPool::Ready() const {
  absl::MutexLock lock(&mu_);
  return ReadyLocked();
}

absl::Status WorkerPool::AwaitReady(absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return ReadyLocked().ok(); };
  mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
  return ReadyLocked();
}

}  // namespace v4serve::router
