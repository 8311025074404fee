// Inference.Generate served straight from an engine (the colocated worker: one process prefills and
// decodes). Requests carry token ids (GenerateRequest.token_ids); text and chat prompts are the
// router's to tokenize, and stop strings are the router's to match on detokenized text
// (inference.proto), so this service ignores SamplingParams.stop.
//
// Each stream is a reactor with at most one write in flight; engine outputs are queued to it from the
// engine thread and never block that thread. A client that goes away cancels its request in the
// engine, which frees its KV blocks.
//
// Thread-safe. The loop must outlive the service.
#ifndef V4SERVE_DECODE_GENERATE_SERVICE_H_
#define V4SERVE_DECODE_GENERATE_SERVICE_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/engine_loop.h"
#include "v4serve/v1/inference.grpc.pb.h"

namespace v4serve::decode {

struct GenerateServiceOptions {
  std::string model_id;          // Reported by ListModels; requests naming another model get NOT_FOUND.
  int64_t max_total_tokens = 0;  // Prompt + output cap (context and KV pool); max_tokens 0 means up to it.
};

// The engine request for `request` (without id and callback). INVALID_ARGUMENT naming the field.
absl::StatusOr<engine::EngineRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                      const GenerateServiceOptions& options);

class GenerateService final : public v1::Inference::CallbackService {
 public:
  GenerateService(engine::EngineLoop* loop, GenerateServiceOptions options)
      : loop_(loop), options_(std::move(options)) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;

 private:
  engine::EngineLoop* const loop_;
  const GenerateServiceOptions options_;
  std::atomic<uint64_t> next_id_{0};
};

}  // namespace v4serve::decode

#endif  // V4SERVE_DECODE_GENERATE_SERVICE_H_
