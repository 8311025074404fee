#include "model/backend.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "model/device.h"

namespace v4serve::model {

absl::StatusOr<Device> ParseDevice(absl::string_view name) {
  if (name == "auto") return Device::kAuto;
  if (name == "cpu") return Device::kCpu;
  if (name == "cuda") return Device::kCuda;
  return absl::InvalidArgumentError(absl::StrCat("--device must be auto, cpu or cuda, not '", name, "'"));
}

const char* DeviceName(Device device) {
  switch (device) {
    case Device::kAuto:
      return "auto";
    case Device::kCpu:
      return "cpu";
    case Device::kCuda:
      return "cuda";
  }
  return "?";
}

absl::StatusOr<Device> ResolveDevice(Device requested, std::string* why) {
  std::string reason;
  if (requested == Device::kCpu) {
    reason = "cpu: asked for";
  } else {
    absl::StatusOr<std::vector<GpuInfo>> gpus = ListGpus();
    if (gpus.ok() && !gpus->empty()) {
      reason = absl::StrCat("cuda: ", (*gpus)[0].name);
      if (why != nullptr) *why = reason;
      return Device::kCuda;
    }
    reason = !gpus.ok() ? std::string(gpus.status().message()) : std::string("no GPU visible");
    if (requested == Device::kCuda) {
      return absl::UnavailableError(absl::StrCat("--device=cuda, but ", reason));
    }
    reason = absl::StrCat("cpu: ", reason);
  }
  if (why != nullptr) *why = reason;
  return Device::kCpu;
}

std::vector<int32_t> ArgmaxOfRows(absl::Span<const float> logits, int64_t rows) {
  std::vector<int32_t> ids;
  if (rows <= 0) return ids;
  const size_t cols = logits.size() / static_cast<size_t>(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.data() + static_cast<size_t>(r) * cols;
    ids.push_back(static_cast<int32_t>(std::max_element(row, row + cols) - row));
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> ForwardBackend::ForwardGreedy(
    absl::Span<const ForwardSegment> segments, absl::Span<const int32_t> tokens,
    absl::Span<const int64_t> logit_rows) const {
  absl::StatusOr<std::vector<float>> logits = Forward(segments, tokens, logit_rows, nullptr);
  if (!logits.ok()) return logits.status();
  return ArgmaxOfRows(*logits, static_cast<int64_t>(logit_rows.size()));
}

double SoftmaxNormalizer(absl::Span<const float> x, float mx, float t) {
  double sum = 0;
  for (float v : x) sum += std::exp(static_cast<double>((v - mx) / t));
  return sum;
}

TopLogits TopOfRows(std::vector<float> logits, int64_t rows, absl::Span<const float> temperatures,
                    int64_t m) {
  TopLogits top;
  top.rows = rows;
  const int64_t vocab = rows > 0 ? static_cast<int64_t>(logits.size()) / rows : 0;
  top.vocab = vocab;
  top.m = std::min(m, vocab);
  auto shared = std::make_shared<std::vector<float>>(std::move(logits));
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = shared->data() + r * vocab;
    std::iota(idx.begin(), idx.end(), 0);
    auto by = [x](int32_t a, int32_t b) { return SamplingOrderBefore(x[a], a, x[b], b); };
    std::partial_sort(idx.begin(), idx.begin() + top.m, idx.end(), by);
    for (int64_t i = 0; i < top.m; ++i) {
      top.ids.push_back(idx[static_cast<size_t>(i)]);
      top.values.push_back(x[idx[static_cast<size_t>(i)]]);
    }
    const float mx = top.m > 0 ? x[idx[0]] : 0.0f;
    const float t = temperatures[static_cast<size_t>(r)] > 0.0f ? temperatures[static_cast<size_t>(r)] : 1.0f;
    const absl::Span<const float> row(x, static_cast<size_t>(vocab));
    top.norm.push_back(SoftmaxNormalizer(row, mx, t));
    top.norm1.push_back(SoftmaxNormalizer(row, mx, 1.0f));
  }
  top.full_row = [shared, vocab, rows](int64_t r) -> absl::StatusOr<std::vector<float>> {
    if (r < 0 || r >= rows) return absl::OutOfRangeError(absl::StrCat("logit row ", r, " of ", rows));
    return std::vector<float>(shared->begin() + r * vocab, shared->begin() + (r + 1) * vocab);
  };
  return top;
}

absl::Status ValidateTopRequest(size_t logit_rows, size_t temperatures, int64_t m) {
  if (temperatures != logit_rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling candidates need one temperature per logit row: ", temperatures, " for ", logit_rows));
  }
  if (m < 1) return absl::InvalidArgumentError("sampling candidates need at least one candidate a row");
  return absl::OkStatus();
}

absl::StatusOr<TopLogits> ForwardBackend::ForwardTop(absl::Span<const ForwardSegment> segments,
                                                     absl::Span<const int32_t> tokens,
                                                     absl::Span<const int64_t> logit_rows,
                                                     absl::Span<const float> temperatures, int64_t m) const {
  if (absl::Status s = ValidateTopRequest(logit_rows.size(), temperatures.size(), m); !s.ok()) return s;
  absl::StatusOr<std::vector<float>> logits = Forward(segments, tokens, logit_rows, nullptr);
  if (!logits.ok()) return logits.status();
  return TopOfRows(*std::move(logits), static_cast<int64_t>(logit_rows.size()), temperatures, m);
}

absl::Status ForwardBackend::AdoptKvPages(SequenceState*, absl::Span<const absl::string_view>) const {
  return absl::UnimplementedError("this backend reads sequence states from the host");
}

}  // namespace v4serve::model
