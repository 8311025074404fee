#include "engine/engine_loop.h"

#include <utility>

#include "services/logging.h"

namespace v4serve::engine {

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, EngineMetrics* metrics)
    : engine_(std::move(engine)), metrics_(metrics) {
  {
    absl::MutexLock l(&mu_);
    stats_ = engine_->stats();
  }
  thread_ = std::thread([this] { Run(); });
}

EngineLoop::~EngineLoop() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void EngineLoop::Submit(EngineRequest request) {
  absl::MutexLock l(&mu_);
  inbox_.emplace_back(std::move(request));
}

void EngineLoop::SubmitPrefilled(EngineRequest request, model::SequenceState state, SampledToken first,
                                 int32_t cached_prompt_tokens, std::vector<std::string> kv_pages) {
  absl::MutexLock l(&mu_);
  inbox_.emplace_back(PrefilledOp{std::move(request), std::move(state), std::move(first),
                                  cached_prompt_tokens, std::move(kv_pages)});
}

void EngineLoop::Cancel(const std::string& request_id) {
  absl::MutexLock l(&mu_);
  inbox_.emplace_back(CancelOp{request_id});
}

EngineStats EngineLoop::Stats() const {
  absl::MutexLock l(&mu_);
  return stats_;
}

void EngineLoop::Run() {
  bool has_work = false;
  while (true) {
    std::deque<Op> ops;
    bool stop;
    {
      absl::MutexLock l(&mu_);
      if (!has_work) {
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !inbox_.empty(); };
        mu_.Await(absl::Condition(&ready));
      }
      ops.swap(inbox_);
      stop = stop_;
    }
    for (Op& op : ops) {
      EngineRequest* req = std::get_if<EngineRequest>(&op);
      PrefilledOp* pre = std::get_if<PrefilledOp>(&op);
      if (pre != nullptr) req = &pre->request;
      if (req != nullptr) {
        OutputCallback cb = req->on_output;
        const std::string id = req->request_id;
        absl::Status s = pre != nullptr ? engine_->SubmitPrefilled(
                                              std::move(pre->request), std::move(pre->state),
                                              std::move(pre->first), pre->cached_prompt_tokens, pre->kv_pages)
                                        : engine_->Submit(std::move(*req));
        if (!s.ok() && cb) {
          SequenceOutput out;
          out.request_id = id;
          out.finish = FinishReason::kError;
          out.status = s;
          cb(out);
        }
      } else {
        engine_->Cancel(std::get<CancelOp>(op).request_id).IgnoreError();  // NOT_FOUND: already finished.
      }
    }
    if (stop) {
      engine_->CancelAll();
      break;
    }
    if (engine_->HasWork()) {
      absl::Status s = engine_->Step();
      if (!s.ok()) {
        V4LOG(ERROR).With("status", s) << "engine step failed; its sequences were ended";
      }
    }
    has_work = engine_->HasWork();
    if (metrics_ != nullptr) {
      metrics_->Update(engine_->mutable_stats(), absl::Now());
    } else {
      engine_->mutable_stats()->ttft_s.clear();
      engine_->mutable_stats()->inter_token_s.clear();
    }
    absl::MutexLock l(&mu_);
    stats_ = engine_->stats();
  }
}

}  // namespace v4serve::engine
