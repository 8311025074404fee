// One OpenAI completion request in flight: the prompt goes to a decode worker's Inference.Generate
// stream; the generated ids come back, become text, reasoning and tool calls (ChoiceStream), and reach the
// client as SSE chunks or one JSON body (ResponseBuilder).
//
// Failure handling: a worker that fails before anything was sent to the client (UNAVAILABLE: it died or
// drains) is reported to the pool and the request is retried once on another worker; later failures end
// the response with an error. A client that disconnects cancels the worker call. A stop string that
// matches cancels the worker call once every choice is done.
//
// Runs on gRPC callback threads; owns itself (freed when the last worker call is done and the response
// is sent). Start() returns at once.
#ifndef V4SERVE_ROUTER_COMPLETION_CALL_H_
#define V4SERVE_ROUTER_COMPLETION_CALL_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "router/http_server.h"
#include "router/openai_request.h"
#include "router/openai_response.h"
#include "router/served_model.h"
#include "router/worker_pool.h"
#include "v4serve/v1/inference.pb.h"

namespace v4serve::router {

// Where a completion's output goes: an HTTP response (SSE or one JSON body) or a gRPC stream.
// Called from one thread at a time (the worker stream's callbacks), never after End() or Error().
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  // One step of one choice: the parsed event and the worker's token behind it (null for a closing event).
  virtual void Event(const ChoiceEvent& event, const v1::GeneratedToken* token) = 0;
  virtual void End(const UsageOut& usage) = 0;
  virtual void Error(const absl::Status& status) = 0;
  // `callback` runs (on any thread) if the client goes away before End/Error.
  virtual void OnClientGone(std::function<void()> callback) = 0;
  // Whether anything reached the client (then a failed worker can no longer be retried silently).
  virtual bool sent_anything() const = 0;
};

// The HTTP sink: OpenAI SSE chunks or one JSON body, through the router's HttpResponder.
std::unique_ptr<CompletionSink> MakeHttpSink(const OpenAiRequest& request, const std::string& model_id,
                                             const std::string& request_id,
                                             std::shared_ptr<HttpResponder> responder);

struct CompletionContext {
  const ServedModel* model;  // must outlive every call
  WorkerPool* pool;          // must outlive every call
  absl::Duration request_timeout = absl::Minutes(10);
  int max_attempts = 2;
};

void StartCompletion(const CompletionContext& context, OpenAiRequest request, EncodedPrompt prompt,
                     std::string request_id, std::unique_ptr<CompletionSink> sink);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_COMPLETION_CALL_H_
