// Drives an Engine on its own thread so that servers can submit and cancel from gRPC callbacks without
// ever waiting for a forward pass.
//
// Submit and Cancel only enqueue (O(1), never block on the model); the loop thread applies them before
// its next step, so a cancelled request's blocks are freed at the latest when the step in progress ends.
// Output callbacks run on the loop thread and must not block. An invalid request is reported through
// its callback (FinishReason::kError with the status).
//
// Thread-safe. Destruction stops the loop, cancels what is left (their callbacks see kCancelled) and
// joins the thread.
#ifndef V4SERVE_ENGINE_ENGINE_LOOP_H_
#define V4SERVE_ENGINE_ENGINE_LOOP_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <variant>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/engine.h"
#include "engine/engine_metrics.h"

namespace v4serve::engine {

class EngineLoop {
 public:
  // `metrics` may be null; it must outlive the loop.
  EngineLoop(std::unique_ptr<Engine> engine, EngineMetrics* metrics);
  ~EngineLoop();
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  void Submit(EngineRequest request);
  // Engine::SubmitPrefilled on the loop thread; errors reach the request's callback.
  void SubmitPrefilled(EngineRequest request, model::SequenceState state, SampledToken first,
                       int32_t cached_prompt_tokens, std::vector<std::string> kv_pages = {});
  void Cancel(const std::string& request_id);

  // A copy of the engine's counters after the latest step.
  EngineStats Stats() const;
  // The served model's config (immutable).
  const model::ModelConfig& config() const { return engine_->config(); }

 private:
  struct CancelOp {
    std::string request_id;
  };
  struct PrefilledOp {
    EngineRequest request;
    model::SequenceState state;
    SampledToken first;
    int32_t cached_prompt_tokens = 0;
    std::vector<std::string> kv_pages;
  };
  using Op = std::variant<EngineRequest, CancelOp, PrefilledOp>;
  void Run();

  std::unique_ptr<Engine> engine_;  // Used by the loop thread only (config() is immutable).
  EngineMetrics* const metrics_;
  mutable absl::Mutex mu_;
  std::deque<Op> inbox_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_ENGINE_LOOP_H_
