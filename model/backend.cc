#include "model/backend.h"

#include <algorithm>

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

}  // namespace v4serve::model
