// The server-stream reactor that turns engine outputs into v1::GenerateResponse messages, shared by
// Inference.Generate (generate_service.h) and Worker.Decode (decode_service.h).
//
// Each stream has at most one write in flight; engine outputs are queued to it from the engine thread and
// never block that thread. A client that goes away calls `cancel`, which frees the request's KV blocks
// (and, for Worker.Decode, cancels its remote prefill).
#ifndef V4SERVE_DECODE_GENERATE_STREAM_H_
#define V4SERVE_DECODE_GENERATE_STREAM_H_

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "engine/sequence.h"
#include "services/status_mapping.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve::decode {

class FailedStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit FailedStream(const absl::Status& status) { Finish(services::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

inline v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    default:
      return v1::FINISH_REASON_UNSPECIFIED;
  }
}

class GenerateStream;

// What the engine callback and the reactor share: the reactor may be gone (OnDone) while the engine
// still reports a cancelled sequence.
struct StreamLink {
  absl::Mutex mu;
  GenerateStream* stream ABSL_GUARDED_BY(mu) = nullptr;
};

class GenerateStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  // `cancel` stops the request wherever it is (engine, remote prefill); called from gRPC threads.
  GenerateStream(std::string public_id, int32_t choices, std::function<void()> cancel)
      : cancel_(std::move(cancel)),
        public_id_(std::move(public_id)),
        choices_left_(choices),
        link_(std::make_shared<StreamLink>()) {
    absl::MutexLock l(&link_->mu);
    link_->stream = this;
  }

  // The engine's callback for this stream.
  engine::OutputCallback Callback() {
    return [link = link_](const engine::SequenceOutput& out) {
      absl::MutexLock l(&link->mu);
      GenerateStream* stream = link->stream;
      if (stream == nullptr) return;
      stream->link_->mu.AssertHeld();  // the same mutex as link->mu; tells -Wthread-safety so
      stream->OnOutputLocked(out);
    };
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock l(&link_->mu);
    write_in_flight_ = false;
    if (!ok) {  // The client is gone: stop generating.
      cancel_();
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client stream closed"));
      return;
    }
    PumpLocked();
  }

  void OnCancel() override { cancel_(); }

  void OnDone() override {
    {
      absl::MutexLock l(&link_->mu);
      link_->stream = nullptr;
    }
    delete this;
  }

 private:
  void OnOutputLocked(const engine::SequenceOutput& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finishing_) return;
    if (out.finish == engine::FinishReason::kError) {
      cancel_();  // Other choices of the request stop too.
      final_status_ = services::ToGrpcStatus(out.status);
      done_ = true;
      queue_.clear();
      PumpLocked();
      return;
    }
    v1::GenerateResponse msg;
    msg.set_request_id(public_id_);
    msg.set_choice_index(out.choice_index);
    if (out.token) {
      v1::GeneratedToken* t = msg.add_tokens();
      t->set_token_id(out.token->id);
      t->set_logprob(out.token->logprob);
      for (const auto& [id, lp] : out.token->top) {
        v1::TokenLogprob* top = t->add_top_logprobs();
        top->set_token_id(id);
        top->set_logprob(lp);
      }
    }
    if (out.finish != engine::FinishReason::kNone) {
      msg.set_finish_reason(ToProto(out.finish));
      usage_.set_prompt_tokens(out.prompt_tokens);
      usage_.set_completion_tokens(usage_.completion_tokens() + out.completion_tokens);
      usage_.set_cached_prompt_tokens(std::max(usage_.cached_prompt_tokens(), out.cached_prompt_tokens));
      if (--choices_left_ == 0) {
        *msg.mutable_usage() = usage_;
        done_ = true;
      }
    }
    queue_.push_back(std::move(msg));
    PumpLocked();
  }

  // Starts the next write, or finishes once everything is written.
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (write_in_flight_ || finishing_) return;
    if (!queue_.empty()) {
      // Tokens queued while a write was in flight go out together (one message per choice change).
      current_ = std::move(queue_.front());
      queue_.pop_front();
      while (!queue_.empty() && queue_.front().choice_index() == current_.choice_index() &&
             current_.finish_reason() == v1::FINISH_REASON_UNSPECIFIED) {
        v1::GenerateResponse& next = queue_.front();
        for (const v1::GeneratedToken& t : next.tokens()) *current_.add_tokens() = t;
        current_.set_finish_reason(next.finish_reason());
        if (next.has_usage()) *current_.mutable_usage() = next.usage();
        queue_.pop_front();
      }
      write_in_flight_ = true;
      StartWrite(&current_);
      return;
    }
    if (done_) FinishLocked(final_status_);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(link_->mu) {
    if (finishing_) return;
    finishing_ = true;
    Finish(status);
  }

  const std::function<void()> cancel_;
  const std::string public_id_;
  int32_t choices_left_;
  std::shared_ptr<StreamLink> link_;
  std::deque<v1::GenerateResponse> queue_;
  v1::GenerateResponse current_;
  v1::Usage usage_;
  bool write_in_flight_ = false;
  bool done_ = false;
  bool finishing_ = false;
  grpc::Status final_status_ = grpc::Status::OK;
};

}  // namespace v4serve::decode

#endif  // V4SERVE_DECODE_GENERATE_STREAM_H_
