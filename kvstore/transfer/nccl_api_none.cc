// MakeCudaNccl in a build without CUDA (V4SERVE_CUDA off): the NCCL transport is unavailable.
#include "kvstore/transfer/nccl_api.h"

namespace v4serve::kvstore {

absl::StatusOr<std::unique_ptr<NcclApi>> MakeCudaNccl(int) {
  return absl::UnimplementedError("the NCCL KV transport needs a CUDA build (V4SERVE_CUDA=ON)");
}

}  // namespace v4serve::kvstore
