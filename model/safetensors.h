// Memory-mapped safetensors checkpoints: one file or shards listed by `model.safetensors.index.json`.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data.
// Every header is fully checked (dtype known, shape × element size == byte range, ranges inside the
// file and non-overlapping) before any tensor is handed out, so a truncated or corrupt file is an error,
// never a crash.
//
// Weight formats of the released V4 checkpoints (see MODEL.md) are dequantized to FP32 by ReadFloat:
//   BF16 / F16 / F32 as stored;
//   F8_E4M3 `X` with `X.scale` (E8M0 or F32) per 128×128 tile;
//   MXFP4 `X` as I8/U8 [out, in/2] (element 2k in the low nibble) with `X.scale` (E8M0) [out, in/32].
//
// Thread-safety: a Checkpoint is immutable after Open; concurrent reads are safe. Views point into the
// mapping and are valid while the Checkpoint lives.
#ifndef V4SERVE_MODEL_SAFETENSORS_H_
#define V4SERVE_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace v4serve::model {

enum class DType { kBool, kU8, kI8, kI16, kI32, kI64, kF16, kBF16, kF32, kF64, kF8E4M3, kF8E5M2, kF8E8M0 };

std::string_view DTypeName(DType dtype);
int64_t DTypeSize(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // Offset into the data section.
  uint64_t end = 0;
  int64_t elements() const;
};

// Parses and validates a safetensors header (the JSON only, without the 8-byte length) against the size
// of the data section that follows it. Safe on arbitrary bytes (the fuzz target calls it).
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view header_json,
                                                               uint64_t data_size);

// A view of one stored tensor.
struct TensorView {
  const TensorInfo* info = nullptr;
  const uint8_t* data = nullptr;  // info->end - info->begin bytes.
  std::string_view file;          // Which shard holds it (for error messages).
};

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  const uint8_t* data(const TensorInfo& t) const { return data_ + t.begin; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

// A whole checkpoint directory: `model.safetensors.index.json` (weight_map name -> shard) when present,
// otherwise every `*.safetensors` file in the directory.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  bool Contains(std::string_view name) const;
  absl::StatusOr<TensorView> Get(std::string_view name) const;
  std::vector<std::string> Names() const;

  // Reads a floating-point tensor as FP32, dequantizing FP8/FP4 with their `.scale` companions. The
  // result must have `expected_shape` (the logical shape; for FP4 the unpacked [out, in]).
  absl::StatusOr<std::vector<float>> ReadFloat(std::string_view name,
                                               const std::vector<int64_t>& expected_shape) const;
  // Reads an integer tensor (I32/I64/I16/I8/U8) as int32 with the given shape.
  absl::StatusOr<std::vector<int32_t>> ReadInt(std::string_view name,
                                               const std::vector<int64_t>& expected_shape) const;

 private:
  Checkpoint() = default;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*, std::less<>> where_;
};

// Exact FP4 -> FP8 conversion of an MXFP4 weight as DeepSeek's convert.py does it: per 128×128 tile the
// FP8 scale is the largest FP4 scale / 2^6 and each FP4 value is multiplied by its scale's offset.
// `packed` is [out, in/2], `scale` E8M0 [out, in/32]. Outputs FP8 e4m3 bytes [out, in] and E8M0 tile scales
// [out/128, in/128]. Fails (InvalidArgument) when a value would not be exactly representable.
absl::Status ConvertFp4ToFp8(const uint8_t* packed, const uint8_t* scale, int64_t out, int64_t in,
                             std::vector<uint8_t>* fp8, std::vector<uint8_t>* fp8_scale);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_SAFETENSORS_H_
