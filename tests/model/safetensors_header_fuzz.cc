// libFuzzer target for the safetensors header parser (built with the clang preset, V4SERVE_FUZZ=ON).
// Input: 8 bytes of data-section size, then the header JSON.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t data_size;
  std::memcpy(&data_size, data, 8);
  data_size %= (1u << 20);
  auto r = v4serve::model::ParseSafetensorsHeader(
      std::string_view(reinterpret_cast<const char*>(data + 8), size - 8), data_size);
  if (r.ok()) {
    for (const auto& t : *r) {
      if (t.end > data_size || t.begin > t.end) __builtin_trap();
    }
  }
  return 0;
}
