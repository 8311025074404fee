#include "model/cpu/expert_parallel.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/cpu/moe.h"

namespace v4serve::model::cpu {
namespace {

template <typename T>
void Append(std::string* out, const T* v, size_t n) {
  out->append(reinterpret_cast<const char*>(v), n * sizeof(T));
}
template <typename T>
const char* Read(const char* p, T* v, size_t n) {
  std::memcpy(v, p, n * sizeof(T));
  return p + n * sizeof(T);
}

}  // namespace

absl::StatusOr<ExpertPlacement> ExpertPlacement::Contiguous(int num_experts, int num_ranks) {
  if (num_ranks <= 0 || num_experts <= 0 || num_experts % num_ranks != 0) {
    return absl::InvalidArgumentError(absl::StrCat("expert parallelism over ", num_ranks,
                                                   " ranks needs a rank count that divides the ", num_experts,
                                                   " routed experts"));
  }
  return ExpertPlacement(num_experts, num_ranks);
}

InProcessAllToAll::InProcessAllToAll(int num_ranks)
    : n_(num_ranks), box_(static_cast<size_t>(num_ranks), std::vector<std::string>(num_ranks)) {}

std::vector<std::string> InProcessAllToAll::Exchange(int rank, std::vector<std::string> send) {
  absl::MutexLock l(&mu_);
  // Wait until the previous exchange has been collected by everyone.
  mu_.Await(absl::Condition(
      +[](InProcessAllToAll* self) ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) { return self->collected_ == 0; },
      this));
  const int64_t gen = generation_;
  for (int d = 0; d < n_; ++d) box_[d][rank] = std::move(send[d]);
  if (++arrived_ == n_) {
    arrived_ = 0;
    collected_ = n_;
    ++generation_;
  } else {
    struct Arg {
      InProcessAllToAll* self;
      int64_t gen;
    } arg{this, gen};
    mu_.Await(absl::Condition(
        +[](Arg* a) ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->self->generation_ != a->gen; }, &arg));
  }
  std::vector<std::string> recv = std::move(box_[rank]);
  box_[rank].assign(n_, std::string());
  --collected_;
  return recv;
}

absl::Status ExpertParallelMoeForward(const ModelConfig& c, const Numerics& num, const BlockWeights& w,
                                      bool hash, const ExpertPlacement& placement, int rank,
                                      AllToAll* all_to_all, const ExpertParallelOptions& options,
                                      const float* x, const int32_t* tokens, int64_t rows,
                                      std::vector<float>* out, ExpertLoad* load) {
  const int n = placement.num_ranks();
  if (placement.num_experts() != c.n_routed_experts)
    return absl::InvalidArgumentError("expert placement is for another expert count");
  if (all_to_all->num_ranks() != n || rank < 0 || rank >= n)
    return absl::InvalidArgumentError("rank or all-to-all does not match the expert placement");
  if (options.waves < 1) return absl::InvalidArgumentError("waves must be at least 1");
  const int64_t d = c.hidden_size;
  out->assign(static_cast<size_t>(rows * d), 0.0f);
  if (load != nullptr) load->rows_per_expert.assign(c.n_routed_experts, 0);
  const int first_local = placement.FirstExpertOn(rank), n_local = placement.ExpertsPerRank();

  for (int wave = 0; wave < options.waves; ++wave) {
    const int64_t r0 = rows * wave / options.waves, r1 = rows * (wave + 1) / options.waves;
    const int64_t wr = r1 - r0;
    const float* wx = x + r0 * d;
    MoeRouting routing;
    if (wr > 0) routing = RouteMoe(c, num, w, hash, wx, tokens + r0, wr);
    const int64_t k = routing.k;

    // Dispatch: per (row, slot) a record {expert, slot, weight, x row} to the expert's rank.
    std::vector<std::string> send(static_cast<size_t>(n));
    for (int64_t i = 0; i < wr; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = routing.expert[i * k + j];
        const int32_t slot = static_cast<int32_t>(i * k + j);
        std::string& b = send[placement.RankOf(e)];
        Append(&b, &e, 1);
        Append(&b, &slot, 1);
        Append(&b, &routing.weight[i * k + j], 1);
        Append(&b, wx + i * d, static_cast<size_t>(d));
      }
    }
    std::vector<std::string> recv = all_to_all->Exchange(rank, std::move(send));

    // Local experts on what arrived, in (source rank, record) order.
    const size_t record = 2 * sizeof(int32_t) + sizeof(float) + static_cast<size_t>(d) * sizeof(float);
    struct Item {
      int src;
      int32_t slot;
      int32_t expert;
      float weight;
      const char* row;
    };
    std::vector<Item> items;
    for (int s = 0; s < n; ++s) {
      if (recv[s].size() % record != 0) return absl::InternalError("expert dispatch: truncated record");
      for (const char* p = recv[s].data(); p < recv[s].data() + recv[s].size(); p += record) {
        Item it{s, 0, 0, 0.0f, nullptr};
        const char* q = Read(p, &it.expert, 1);
        q = Read(q, &it.slot, 1);
        q = Read(q, &it.weight, 1);
        it.row = q;
        if (it.expert < first_local || it.expert >= first_local + n_local)
          return absl::InternalError("expert dispatch: a row for an expert this rank does not hold");
        items.push_back(it);
      }
    }
    std::vector<std::vector<float>> y_of(items.size());
    std::vector<float> xin, wts, y;
    for (int e = first_local; e < first_local + n_local; ++e) {
      std::vector<size_t> idx;
      for (size_t i = 0; i < items.size(); ++i) {
        if (items[i].expert == e) idx.push_back(i);
      }
      if (load != nullptr) load->rows_per_expert[e] += static_cast<int64_t>(idx.size());
      if (idx.empty()) continue;
      xin.resize(idx.size() * d);
      wts.resize(idx.size());
      for (size_t i = 0; i < idx.size(); ++i) {
        std::memcpy(&xin[i * d], items[idx[i]].row, static_cast<size_t>(d) * sizeof(float));
        wts[i] = items[idx[i]].weight;
      }
      ExpertForward(c, num, w.experts[e], xin.data(), static_cast<int64_t>(idx.size()), wts.data(), &y);
      for (size_t i = 0; i < idx.size(); ++i) y_of[idx[i]].assign(y.begin() + i * d, y.begin() + (i + 1) * d);
    }

    // Combine: each output row goes back to its source as {slot, y row}.
    std::vector<std::string> back(static_cast<size_t>(n));
    for (size_t i = 0; i < items.size(); ++i) {
      Append(&back[items[i].src], &items[i].slot, 1);
      Append(&back[items[i].src], y_of[i].data(), static_cast<size_t>(d));
    }
    std::vector<std::string> returned = all_to_all->Exchange(rank, std::move(back));
    std::vector<std::vector<float>> routed(static_cast<size_t>(wr * k));
    const size_t ret = sizeof(int32_t) + static_cast<size_t>(d) * sizeof(float);
    for (int s = 0; s < n; ++s) {
      if (returned[s].size() % ret != 0) return absl::InternalError("expert combine: truncated record");
      for (const char* p = returned[s].data(); p < returned[s].data() + returned[s].size(); p += ret) {
        int32_t slot = 0;
        const char* q = Read(p, &slot, 1);
        if (slot < 0 || slot >= wr * k || !routed[slot].empty())
          return absl::InternalError("expert combine: bad or repeated slot");
        routed[slot].resize(static_cast<size_t>(d));
        Read(q, routed[slot].data(), static_cast<size_t>(d));
      }
    }

    // Shared expert, then the routed outputs added in ascending expert order per row, as MoeForward does.
    std::vector<float> shared;
    if (wr > 0) ExpertForward(c, num, w.shared, wx, wr, nullptr, &shared);
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t i = 0; i < wr; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        if (routed[i * k + j].empty())
          return absl::InternalError("expert combine: a routed output is missing");
        order[j] = j;
      }
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return routing.expert[i * k + a] < routing.expert[i * k + b];
      });
      float* o = out->data() + (r0 + i) * d;
      for (int64_t t = 0; t < d; ++t) {
        if (num.faithful) {
          double acc = shared[i * d + t];
          for (int64_t j : order) acc += routed[i * k + j][t];
          o[t] = static_cast<float>(acc);
        } else {
          float acc = shared[i * d + t];
          for (int64_t j : order) acc += routed[i * k + j][t];
          o[t] = acc;
        }
      }
    }
  }
  num.Bf(out);
  return absl::OkStatus();
}

}  // namespace v4serve::model::cpu
