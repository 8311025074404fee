#include "decode/generate_service.h"

#include <deque>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "decode/generate_stream.h"
#include "engine/sampling_proto.h"
#include "kvstore/prefix_cache.h"
#include "services/logging.h"
#include "services/request_id.h"
#include "services/status_macros.h"
#include "services/status_mapping.h"

namespace v4serve::decode {

absl::StatusOr<engine::EngineRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                      const GenerateServiceOptions& options) {
  if (!request.has_token_ids()) {
    return absl::InvalidArgumentError(
        "prompt: this worker serves token_ids; text and chat_json are tokenized by the router");
  }
  if (!request.model().empty() && request.model() != options.model_id) {
    return absl::NotFoundError(
        absl::StrCat("model '", request.model(), "' is not served here (", options.model_id, ")"));
  }
  engine::EngineRequest r;
  r.prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
  if (r.prompt.empty()) return absl::InvalidArgumentError("token_ids: the prompt is empty");
  const int64_t room = options.max_total_tokens - static_cast<int64_t>(r.prompt.size());
  if (room <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token_ids: prompt of ", r.prompt.size(), " tokens leaves no room under ", options.max_total_tokens));
  }
  ASSIGN_OR_RETURN(r.sampling, engine::SamplingFromProto(request.sampling(), room));
  r.tenant_salt = kvstore::TenantSalt(request.tenant());
  return r;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerateService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* request) {
  absl::StatusOr<engine::EngineRequest> r = ToEngineRequest(*request, options_);
  if (!r.ok()) return new FailedStream(r.status());
  const std::string public_id = services::RequestIdFrom(*ctx);
  // Engine ids are unique per process even when clients reuse request ids.
  std::string engine_id = absl::StrCat(public_id, "#", next_id_.fetch_add(1));
  engine::EngineLoop* loop = loop_;
  auto* stream = new GenerateStream(public_id, r->sampling.n, [loop, engine_id] { loop->Cancel(engine_id); });
  r->request_id = std::move(engine_id);
  r->on_output = stream->Callback();
  V4LOG(DEBUG).With("request_id", public_id).With("prompt_tokens", r->prompt.size()) << "generate";
  loop_->Submit(*std::move(r));
  return stream;
}

grpc::ServerUnaryReactor* GenerateService::ListModels(grpc::CallbackServerContext* ctx,
                                                      const v1::ListModelsRequest*,
                                                      v1::ListModelsResponse* response) {
  v1::ModelCard* card = response->add_models();
  card->set_id(options_.model_id);
  card->set_owned_by("v4serve");
  card->set_max_context_tokens(static_cast<int32_t>(std::min<int64_t>(options_.max_total_tokens, INT32_MAX)));
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace v4serve::decode
