// The public gRPC Inference service on the router: the same pipeline as the HTTP API (validation, chat
// encoding, worker choice, retries, detokenization, tool-call parsing), streamed as GenerateResponse.
//
// Thread-safe. `backend` must outlive the service.
#ifndef V4SERVE_ROUTER_INFERENCE_SERVICE_H_
#define V4SERVE_ROUTER_INFERENCE_SERVICE_H_

#include "absl/status/statusor.h"
#include "router/http_api.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve::router {

// GenerateRequest -> the request the pipeline runs: text and token_ids prompts are completions, chat_json
// ({"messages": [...], "tools": [...]}) is a chat. INVALID_ARGUMENT names the field.
absl::StatusOr<OpenAiRequest> FromGenerateRequest(const v1::GenerateRequest& request);

class InferenceService final : public v4serve::v1::Inference::CallbackService {
 public:
  explicit InferenceService(RouterBackend* backend) : backend_(backend) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

 private:
  RouterBackend* backend_;
};

}  // namespace v4serve::router

#endif  // V4SERVE_ROUTER_INFERENCE_SERVICE_H_
