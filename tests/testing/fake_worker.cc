#include "tests/testing/fake_worker.h"

#include <utility>

namespace v4serve::testing {
namespace {

// Writes one token per message, then the finish reason; or fails; or stops and waits for cancellation.
class Stream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  Stream(FakeWorker* worker, std::vector<int32_t> ids, int hang_after, int n_choices)
      : worker_(worker), ids_(std::move(ids)), hang_after_(hang_after), n_(n_choices) {
    absl::MutexLock lock(&mu_);
    Next();
  }
  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok || cancelled_) return FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    Next();
  }
  // A reactor must still Finish after a cancellation, or the server never shuts down.
  void OnCancel() override {
    worker_->RecordCancel();
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    if (!writing_) FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }
  void OnDone() override { delete this; }

 private:
  void FinishOnce(const grpc::Status& st) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(st);
  }

  void Next() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    int total = static_cast<int>(ids_.size()) * n_;
    if (hang_after_ >= 0 && sent_ >= hang_after_) return;  // wait for OnCancel; gRPC then ends the call
    if (sent_ == total) {
      msg_.Clear();
      msg_.mutable_usage()->set_prompt_tokens(7);
      msg_.mutable_usage()->set_completion_tokens(total);
      finished_ = true;
      return StartWriteAndFinish(&msg_, grpc::WriteOptions(), grpc::Status::OK);
    }
    msg_.Clear();
    int choice = sent_ / static_cast<int>(ids_.size());
    int pos = sent_ % static_cast<int>(ids_.size());
    msg_.set_choice_index(choice);
    v1::GeneratedToken* t = msg_.add_tokens();
    t->set_token_id(ids_[pos]);
    t->set_logprob(-0.5f);
    if (pos + 1 == static_cast<int>(ids_.size())) msg_.set_finish_reason(v1::FINISH_REASON_STOP);
    ++sent_;
    writing_ = true;
    StartWrite(&msg_);
  }

  FakeWorker* worker_;
  std::vector<int32_t> ids_;
  int hang_after_;
  int n_;
  int sent_ = 0;
  v1::GenerateResponse msg_;
  absl::Mutex mu_;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

class Failed : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit Failed(const grpc::Status& st) { Finish(st); }
  void OnDone() override { delete this; }
};

}  // namespace

FakeWorker::FakeWorker(std::vector<int32_t> completion_ids)
    : FakeWorker([ids = std::move(completion_ids)](const v1::GenerateRequest&) { return ids; }) {}

FakeWorker::FakeWorker(std::function<std::vector<int32_t>(const v1::GenerateRequest&)> script)
    : script_(std::move(script)) {
  admin_ = std::make_unique<services::AdminService>("decode", "", &shutdown_);
  services::GrpcServerOptions o;
  o.host = "127.0.0.1";
  server_ = *services::GrpcServer::Start(o, {this, admin_.get()});
}

FakeWorker::~FakeWorker() { server_->Shutdown(absl::Now()); }

v1::GenerateRequest FakeWorker::last_request() const {
  absl::MutexLock lock(&mu_);
  return last_;
}

void FakeWorker::RecordCancel() {
  absl::MutexLock lock(&mu_);
  cancellations_.fetch_add(1);
}

bool FakeWorker::WaitForCancellations(int n, absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  auto enough = [this, n] { return cancellations_.load() >= n; };
  return mu_.AwaitWithTimeout(absl::Condition(&enough), timeout);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* FakeWorker::Generate(grpc::CallbackServerContext*,
                                                                     const v1::GenerateRequest* request) {
  requests_.fetch_add(1);
  {
    absl::MutexLock lock(&mu_);
    last_ = *request;
  }
  if (fail_.load())
    return new Failed(grpc::Status(grpc::StatusCode::UNAVAILABLE, "fake worker is going away"));
  return new Stream(this, script_(*request), hang_after_.load(), std::max(1, request->sampling().n()));
}

grpc::ServerUnaryReactor* FakeWorker::ListModels(grpc::CallbackServerContext* ctx,
                                                 const v1::ListModelsRequest*, v1::ListModelsResponse*) {
  auto* r = ctx->DefaultReactor();
  r->Finish(grpc::Status::OK);
  return r;
}

}  // namespace v4serve::testing
