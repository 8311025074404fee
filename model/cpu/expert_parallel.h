// Expert parallelism for a MoE layer (issue 10), the CPU reference of what the GPU path runs over NCCL:
// N ranks each hold their own rows (data-parallel attention) and 1/N of the routed experts; every rank
// routes its rows, dispatches each (row, expert) pair to the expert's rank through an all-to-all, runs its
// local experts on what it received, sends the outputs back through a second all-to-all, and combines them
// with its shared expert's output. Rows go in `waves`; the GPU schedule overlaps dispatch of wave i+1, the
// expert GEMMs of wave i and the combine of wave i-1 (docs/EXPERT_PARALLEL.md), here they run in order.
//
// The output equals MoeForward's bit for bit in both numeric modes (the combine adds the routed outputs in
// the same order), which tests/model/expert_parallel_test.cc checks for N = 1, 2, 4 and several wave counts.
#ifndef V4SERVE_MODEL_CPU_EXPERT_PARALLEL_H_
#define V4SERVE_MODEL_CPU_EXPERT_PARALLEL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "model/config.h"
#include "model/cpu/numerics.h"
#include "model/cpu/weights.h"

namespace v4serve::model::cpu {

// Which rank holds each routed expert: rank r holds experts [r*E/N, (r+1)*E/N).
class ExpertPlacement {
 public:
  // INVALID_ARGUMENT unless 0 < num_ranks and num_ranks divides num_experts.
  static absl::StatusOr<ExpertPlacement> Contiguous(int num_experts, int num_ranks);
  int num_ranks() const { return num_ranks_; }
  int num_experts() const { return num_experts_; }
  int RankOf(int expert) const { return expert / (num_experts_ / num_ranks_); }
  int FirstExpertOn(int rank) const { return rank * (num_experts_ / num_ranks_); }
  int ExpertsPerRank() const { return num_experts_ / num_ranks_; }

 private:
  ExpertPlacement(int e, int n) : num_experts_(e), num_ranks_(n) {}
  int num_experts_, num_ranks_;
};

// The exchange between ranks: every rank calls Exchange at the same point with one buffer per destination
// and gets one buffer per source. On GPUs this is NCCL send/recv in a group; InProcessAllToAll is the
// stand-in for ranks that are threads of one process.
class AllToAll {
 public:
  virtual ~AllToAll() = default;
  virtual int num_ranks() const = 0;
  virtual std::vector<std::string> Exchange(int rank, std::vector<std::string> send) = 0;
};

class InProcessAllToAll final : public AllToAll {
 public:
  explicit InProcessAllToAll(int num_ranks);
  int num_ranks() const override { return n_; }
  std::vector<std::string> Exchange(int rank, std::vector<std::string> send) override;

 private:
  const int n_;
  absl::Mutex mu_;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int collected_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::vector<std::string>> box_ ABSL_GUARDED_BY(mu_);  // [dest][source]
};

// Tokens each expert of this layer received on this rank (summed over waves): the load statistics that
// EPLB-style replication of hot experts would read.
struct ExpertLoad {
  std::vector<int64_t> rows_per_expert;
};

struct ExpertParallelOptions {
  int waves = 1;  // Every rank must give the same number; a rank's wave may be empty.
};

// This rank's part of an expert-parallel MoE layer: `x` [rows, D] (ffn_norm'd), `tokens` [rows] (hash
// routing); writes `out` [rows, D]. Every rank calls it at once with its own rows.
absl::Status ExpertParallelMoeForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w,
                                      bool hash, const ExpertPlacement& placement, int rank,
                                      AllToAll* all_to_all, const ExpertParallelOptions& options,
                                      const float* x, const int32_t* tokens, int64_t rows,
                                      std::vector<float>* out, ExpertLoad* load);

}  // namespace v4serve::model::cpu

#endif  // V4SERVE_MODEL_CPU_EXPERT_PARALLEL_H_
