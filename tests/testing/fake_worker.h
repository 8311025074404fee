// A decode worker stand-in for router tests: serves v4serve.v1.Inference/Generate (and health) and streams
// a scripted completion for every request, encoded with the given tokenizer. Lets tests make a worker
// fail before or during a stream, and observe cancellation. Hand-written fake, as CONVENTIONS.md asks.
#ifndef V4SERVE_TESTS_TESTING_FAKE_WORKER_H_
#define V4SERVE_TESTS_TESTING_FAKE_WORKER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "services/admin_service.h"
#include "services/grpc_server.h"
#include "services/shutdown.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve::testing {

class FakeWorker : public v1::Inference::CallbackService {
 public:
  // `completion_ids`: what every request generates (one token per message), ending with FINISH_REASON_STOP.
  explicit FakeWorker(std::vector<int32_t> completion_ids);
  // Completion chosen per request (e.g. by what the prompt contains).
  explicit FakeWorker(std::function<std::vector<int32_t>(const v1::GenerateRequest&)> script);
  ~FakeWorker() override;

  std::string address() const { return "127.0.0.1:" + std::to_string(server_->port()); }

  // Before the first token: fail every request with UNAVAILABLE (a worker that is going away).
  void FailRequests(bool fail) { fail_ = fail; }
  // After sending `n` tokens, stop sending and wait until the caller cancels (a slow generation).
  void HangAfter(int n) { hang_after_ = n; }

  int requests() const { return requests_.load(); }
  int cancellations() const { return cancellations_.load(); }
  // The last request received.
  v1::GenerateRequest last_request() const;
  // Blocks until `n` cancellations were seen or `timeout`.
  bool WaitForCancellations(int n, absl::Duration timeout) const;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest*,
                                       v1::ListModelsResponse*) override;

  void RecordCancel();

 private:
  std::function<std::vector<int32_t>(const v1::GenerateRequest&)> script_;
  std::atomic<bool> fail_{false};
  std::atomic<int> hang_after_{-1};
  std::atomic<int> requests_{0};
  std::atomic<int> cancellations_{0};
  mutable absl::Mutex mu_;
  v1::GenerateRequest last_ ABSL_GUARDED_BY(mu_);
  services::ShutdownSignal shutdown_;
  std::unique_ptr<services::AdminService> admin_;
  std::unique_ptr<services::GrpcServer> server_;
};

}  // namespace v4serve::testing

#endif  // V4SERVE_TESTS_TESTING_FAKE_WORKER_H_
