#include "router/inference_service.h"

#include "absl/strings/str_cat.h"
#include "services/status_mapping.h"

namespace v4serve::router {
namespace {

// A stream that ends at once with an error status.
class FailedStream : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit FailedStream(const absl::Status& status) { Finish(services::ToGrpcStatus(status)); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  absl::Status ready = backend_->Ready();
  if (!ready.ok()) return new FailedStream(absl::UnavailableError(ready.message()));
  return new FailedStream(absl::UnimplementedError("Generate is served once disaggregated serving lands"));
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* ctx,
                                                       const v1::ListModelsRequest*,
                                                       v1::ListModelsResponse* response) {
  for (const std::string& id : backend_->ModelIds()) {
    v1::ModelCard* card = response->add_models();
    card->set_id(id);
    card->set_owned_by("v4serve");
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace v4serve::router
