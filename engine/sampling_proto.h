// v4serve.v1.SamplingParams (inference.proto) -> engine SamplingParams: the one conversion both worker
// roles use (the decode worker for every request, the prefill worker for the first token).
#ifndef V4SERVE_ENGINE_SAMPLING_PROTO_H_
#define V4SERVE_ENGINE_SAMPLING_PROTO_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "engine/sampler.h"
#include "v4serve/v1/inference.pb.h"

namespace v4serve::engine {

// `room` is how many tokens may follow the prompt (max_tokens 0 means all of it). INVALID_ARGUMENT
// naming the field. Validation against the vocabulary happens at submission (SamplingParams::Validate).
absl::StatusOr<SamplingParams> SamplingFromProto(const v1::SamplingParams& s, int64_t room);

}  // namespace v4serve::engine

#endif  // V4SERVE_ENGINE_SAMPLING_PROTO_H_
