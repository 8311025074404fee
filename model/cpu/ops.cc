#include "model/cpu/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace v4serve::model::cpu {
namespace {

// Set on pool threads (and on the caller while it runs a job): a nested ParallelFor runs inline instead of
// waiting for the pool it is running on.
thread_local bool in_pool_job = false;

// One ParallelFor call. Workers hold it by shared_ptr, so a worker that is still leaving an old job never
// touches the next one.
struct Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> pending{0};
  std::mutex mu;
  std::condition_variable done;
};

// A fixed pool; one job at a time (job_mu_ serializes callers).
class Pool {
 public:
  Pool() {
    const unsigned n = std::max(1u, std::thread::hardware_concurrency());
    for (unsigned i = 1; i < n; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int64_t size() const { return static_cast<int64_t>(threads_.size()) + 1; }

  void Run(int64_t chunks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> serialize(job_mu_);
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->chunks = chunks;
    job->pending.store(chunks);
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
    Work(*job);
    {
      std::unique_lock<std::mutex> l(job->mu);
      job->done.wait(l, [&] { return job->pending.load() == 0; });
    }
    std::lock_guard<std::mutex> l(mu_);
    job_.reset();
  }

 private:
  static void Work(Job& job) {
    in_pool_job = true;
    for (;;) {
      const int64_t i = job.next.fetch_add(1);
      if (i >= job.chunks) break;
      (*job.fn)(i);
      if (job.pending.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> l(job.mu);
        job.done.notify_all();
      }
    }
    in_pool_job = false;
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return stop_ || (generation_ != seen && job_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      Work(*job);
    }
  }

  std::mutex job_mu_;
  std::mutex mu_;  // Guards job_, generation_, stop_.
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& GlobalPool() {
  static Pool* pool = new Pool();  // Never destroyed: threads outlive static destruction order issues.
  return *pool;
}

}  // namespace

void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Pool& pool = GlobalPool();
  const int64_t chunks =
      std::min<int64_t>(pool.size() * 4, std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (chunks <= 1 || in_pool_job) {
    fn(0, n);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  pool.Run(chunks, [&](int64_t c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b < e) fn(b, e);
  });
}

namespace {

// y = x · wᵀ with Acc accumulators (four of them over k, summed pairwise). Parallel over output features;
// each weight row is streamed once for all m rows.
template <typename Acc>
void MatmulWtAcc(const float* x, int64_t m, int64_t in, const float* w, int64_t out, std::vector<float>* y) {
  y->assign(static_cast<size_t>(m * out), 0.0f);
  float* yp = y->data();
  ParallelFor(out, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in)), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const float* wr = w + o * in;
      for (int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * in;
        Acc acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
        int64_t k = 0;
        for (; k + 4 <= in; k += 4) {
          acc0 += static_cast<Acc>(xr[k]) * wr[k];
          acc1 += static_cast<Acc>(xr[k + 1]) * wr[k + 1];
          acc2 += static_cast<Acc>(xr[k + 2]) * wr[k + 2];
          acc3 += static_cast<Acc>(xr[k + 3]) * wr[k + 3];
        }
        for (; k < in; ++k) acc0 += static_cast<Acc>(xr[k]) * wr[k];
        yp[r * out + o] = static_cast<float>((acc0 + acc1) + (acc2 + acc3));
      }
    }
  });
}

}  // namespace

void MatmulWt(const float* x, int64_t m, int64_t in, const float* w, int64_t out, std::vector<float>* y) {
  MatmulWtAcc<float>(x, m, in, w, out, y);
}

void MatmulWtF64(const float* x, int64_t m, int64_t in, const float* w, int64_t out, std::vector<float>* y) {
  MatmulWtAcc<double>(x, m, in, w, out, y);
}

void RmsNorm(float* x, int64_t rows, int64_t dim, const float* weight, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(v[i]) * v[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
    for (int64_t i = 0; i < dim; ++i) v[i] = v[i] * inv * (weight ? weight[i] : 1.0f);
  }
}

RopeTable MakeRopeTable(int64_t rope_dim, double base, const RopeScaling* yarn) {
  RopeTable t;
  const int64_t half = rope_dim / 2;
  t.inv_freq.resize(static_cast<size_t>(half));
  // Frequencies are computed in FP32 like DeepSeek's code and transformers (torch.arange(...).float()), in
  // both modes: 1 / powf(base, 2i/d). glibc's powf and torch's FP32 pow give the same table for the tiny
  // model's bases (tools/golden/v4_reference.py computes it the same way; the faithful golden test would
  // see a difference), and an FP64 power would move exact mode away from transformers (3e-6 -> 1e-5).
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(rope_dim);
    t.inv_freq[i] = static_cast<double>(1.0f / std::pow(static_cast<float>(base), expo));
  }
  if (yarn != nullptr && yarn->original_max_position_embeddings > 0) {
    const double d = static_cast<double>(rope_dim),
                 orig = static_cast<double>(yarn->original_max_position_embeddings);
    auto corr_dim = [&](double rot) { return d * std::log(orig / (rot * 2 * M_PI)) / (2 * std::log(base)); };
    double low = std::max(0.0, std::floor(corr_dim(yarn->beta_fast)));
    double high = std::min(d - 1, std::ceil(corr_dim(yarn->beta_slow)));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float ramp =
          std::clamp(static_cast<float>((static_cast<double>(i) - low) / (high - low)), 0.0f, 1.0f);
      const float smooth = 1.0f - ramp;
      const float f = static_cast<float>(t.inv_freq[i]);
      t.inv_freq[i] =
          static_cast<double>(f / static_cast<float>(yarn->factor) * (1.0f - smooth) + f * smooth);
    }
  }
  return t;
}

void RopeTable::Apply(float* x, int64_t pos, bool inverse, bool f64) const {
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    // FP32 angle as the references compute it (position * inv_freq in float).
    const float ang = static_cast<float>(pos) * static_cast<float>(inv_freq[i]);
    if (f64) {  // cos, sin and the rotation in FP64, each result rounded once to FP32.
      const double c = std::cos(static_cast<double>(ang)),
                   s = inverse ? -std::sin(static_cast<double>(ang)) : std::sin(static_cast<double>(ang));
      const double a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = static_cast<float>(a * c - b * s);
      x[2 * i + 1] = static_cast<float>(a * s + b * c);
    } else {
      const float c = std::cos(ang), s = inverse ? -std::sin(ang) : std::sin(ang);
      const float a = x[2 * i], b = x[2 * i + 1];
      x[2 * i] = a * c - b * s;
      x[2 * i + 1] = a * s + b * c;
    }
  }
}

}  // namespace v4serve::model::cpu
