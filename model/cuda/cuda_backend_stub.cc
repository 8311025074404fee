// Built in place of cuda_backend.cu when V4SERVE_CUDA is off.
#include "model/cuda/cuda_backend.h"

namespace v4serve::model::cuda {
namespace {
absl::Status NotBuilt() { return absl::FailedPreconditionError("this binary was built without CUDA"); }
}  // namespace

absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeCudaBackend(const ModelConfig&, const cpu::ModelWeights&,
                                                                const cpu::RopeTable&, const cpu::RopeTable&,
                                                                CudaWeights) {
  return NotBuilt();
}
absl::StatusOr<std::unique_ptr<ForwardBackend>> MakeRandomCudaBackend(const ModelConfig&, CudaWeights,
                                                                      uint64_t) {
  return NotBuilt();
}
absl::StatusOr<ForwardCounters> LastForwardCounters(const ForwardBackend&) { return NotBuilt(); }
absl::StatusOr<std::string> DeviceKvPage(const ForwardBackend&, const SequenceState&, int64_t) {
  return NotBuilt();
}
absl::StatusOr<std::vector<int32_t>> ArgmaxRows(const std::vector<float>&, int64_t, int64_t) {
  return NotBuilt();
}
namespace testing {
absl::Status RmsNorm(std::vector<float>*, int64_t, int64_t, const std::vector<float>&, double) {
  return NotBuilt();
}
absl::StatusOr<std::vector<std::vector<int64_t>>> TopK(const std::vector<float>&, int64_t, int64_t, int64_t) {
  return NotBuilt();
}
absl::StatusOr<std::vector<float>> Linear(const std::vector<float>&, int64_t, int64_t,
                                          const std::vector<float>&, int64_t, CudaWeights, int, double*,
                                          Fp8Path) {
  return NotBuilt();
}
absl::StatusOr<std::vector<float>> LinearF32(const std::vector<float>&, int64_t, int64_t,
                                             const std::vector<float>&, int64_t, bool, int, double*) {
  return NotBuilt();
}
absl::Status Rope(std::vector<float>*, int64_t, int64_t, int64_t, const std::vector<double>&,
                  const std::vector<int64_t>&, bool) {
  return NotBuilt();
}
AttentionCase RandomAttentionCase(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint64_t) {
  return {};
}
absl::StatusOr<std::vector<float>> SparseAttention(const AttentionCase&, bool, int, double*) {
  return NotBuilt();
}
absl::StatusOr<std::vector<float>> IndexerScores(const std::vector<float>&, const std::vector<float>&,
                                                 const std::vector<float>&, const std::vector<int64_t>&,
                                                 const std::vector<int64_t>&, int64_t, int64_t, bool, int,
                                                 double*) {
  return NotBuilt();
}
absl::StatusOr<std::vector<float>> ExpertGemmFp4(const std::vector<float>&, int64_t,
                                                 const std::vector<float>&, int64_t,
                                                 const std::vector<int32_t>&, ExpertPath, int, double*, bool,
                                                 const std::vector<float>&, float) {
  return NotBuilt();
}
absl::StatusOr<Permutation> Permute(const std::vector<int32_t>&, const std::vector<float>&, int64_t, int64_t,
                                    int64_t, int32_t) {
  return NotBuilt();
}
}  // namespace testing
}  // namespace v4serve::model::cuda
