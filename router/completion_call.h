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

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "router/http_server.h"
#include "router/openai_request.h"
#include "router/served_model.h"
#include "router/worker_pool.h"

namespace v4serve::router {

struct CompletionContext {
  const ServedModel* model;  // must outlive every call
  WorkerPool* pool;          // must outlive every call
  absl::Duration request_timeout = absl::Minutes(10);
  int max_attempts = 2;
};

void StartCompletion(const CompletionContext& context, OpenAiRequest request, EncodedPrompt prompt,
                     std::string request_id, std::shared_ptr<HttpResponder> responder);

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_COMPLETION_CALL_H_
