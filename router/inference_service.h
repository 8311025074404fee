// The public gRPC Inference service on the router: same semantics as the HTTP API.
//
// Thread-safe. `backend` must outlive the service.
#ifndef V4SERVE_ROUTER_INFERENCE_SERVICE_H_
#define V4SERVE_ROUTER_INFERENCE_SERVICE_H_

#include "router/http_api.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve::router {

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
