#include "model/backend.h"

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

}  // namespace v4serve::model
