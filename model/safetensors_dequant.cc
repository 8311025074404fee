// Checkpoint::ReadFloat / ReadInt and the exact FP4 -> FP8 conversion (declared in safetensors.h).
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/numeric_formats.h"
#include "model/safetensors.h"
#include "services/status_macros.h"

namespace v4serve::model {
namespace {

constexpr int64_t kFp8Tile = 128;
constexpr int64_t kFp4Block = 32;

std::string Shape(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// The companion scale of "a.b.weight" is "a.b.scale"; of any other name X, "X.scale".
std::string ScaleName(std::string_view name) {
  constexpr std::string_view kSuffix = ".weight";
  if (name.size() > kSuffix.size() && name.substr(name.size() - kSuffix.size()) == kSuffix) {
    return absl::StrCat(std::string(name.substr(0, name.size() - kSuffix.size())), ".scale");
  }
  return absl::StrCat(std::string(name), ".scale");
}

absl::Status ShapeError(const TensorView& v, const std::vector<int64_t>& expected, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(
      "tensor '", v.info->name, "' in ", std::string(v.file), ": ", std::string(what), " shape ",
      Shape(v.info->shape), " (", std::string(DTypeName(v.info->dtype)), "), expected ", Shape(expected)));
}

// Reads a scale tensor (E8M0 or F32) of the given shape as floats.
absl::StatusOr<std::vector<float>> ReadScale(const Checkpoint& c, const std::string& name,
                                             const std::vector<int64_t>& shape) {
  absl::StatusOr<TensorView> v = c.Get(name);
  if (!v.ok())
    return absl::NotFoundError(absl::StrCat("quantized weight needs its scale tensor '", name, "'"));
  if (v->info->shape != shape) return ShapeError(*v, shape, "scale has");
  const int64_t n = v->info->elements();
  std::vector<float> out(static_cast<size_t>(n));
  if (v->info->dtype == DType::kF8E8M0 || v->info->dtype == DType::kU8) {
    for (int64_t i = 0; i < n; ++i) out[i] = E8m0ToFloat(v->data[i]);
  } else if (v->info->dtype == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) out[i] = Load<float>(v->data + 4 * i);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("scale '", name, "' has dtype ",
                                                   std::string(DTypeName(v->info->dtype)),
                                                   "; expected F8_E8M0 or F32"));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<float>> Checkpoint::ReadFloat(std::string_view name,
                                                         const std::vector<int64_t>& expected) const {
  ASSIGN_OR_RETURN(TensorView v, Get(name));
  const TensorInfo& t = *v.info;
  int64_t n = 1;
  for (int64_t d : expected) n *= d;
  std::vector<float> out(static_cast<size_t>(n));
  switch (t.dtype) {
    case DType::kF32:
    case DType::kBF16:
    case DType::kF16: {
      if (t.shape != expected) return ShapeError(v, expected, "has");
      for (int64_t i = 0; i < n; ++i) {
        out[i] = t.dtype == DType::kF32    ? Load<float>(v.data + 4 * i)
                 : t.dtype == DType::kBF16 ? Bf16ToFloat(Load<uint16_t>(v.data + 2 * i))
                                           : Fp16ToFloat(Load<uint16_t>(v.data + 2 * i));
      }
      return out;
    }
    case DType::kF8E4M3: {
      if (t.shape != expected || expected.size() != 2) return ShapeError(v, expected, "FP8 weight has");
      const int64_t rows = expected[0], cols = expected[1];
      const int64_t sr = (rows + kFp8Tile - 1) / kFp8Tile, sc = (cols + kFp8Tile - 1) / kFp8Tile;
      ASSIGN_OR_RETURN(std::vector<float> scale, ReadScale(*this, ScaleName(name), {sr, sc}));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t col = 0; col < cols; ++col) {
          out[r * cols + col] =
              Fp8E4m3ToFloat(v.data[r * cols + col]) * scale[(r / kFp8Tile) * sc + col / kFp8Tile];
        }
      }
      return out;
    }
    case DType::kI8:
    case DType::kU8: {
      if (expected.size() != 2 || expected[1] % kFp4Block != 0 ||
          t.shape != std::vector<int64_t>{expected[0], expected[1] / 2}) {
        return ShapeError(v, {expected[0], expected.size() == 2 ? expected[1] / 2 : -1},
                          "packed FP4 weight has");
      }
      const int64_t rows = expected[0], cols = expected[1];
      ASSIGN_OR_RETURN(std::vector<float> scale, ReadScale(*this, ScaleName(name), {rows, cols / kFp4Block}));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k = 0; k < cols / 2; ++k) {
          const uint8_t b = v.data[r * (cols / 2) + k];
          const float s = scale[r * (cols / kFp4Block) + (2 * k) / kFp4Block];
          out[r * cols + 2 * k] = Fp4E2m1ToFloat(b & 0xf) * s;
          out[r * cols + 2 * k + 1] = Fp4E2m1ToFloat(b >> 4) * s;
        }
      }
      return out;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' has dtype ", std::string(DTypeName(t.dtype)),
                       "; expected F32, BF16, F16, F8_E4M3 (+scale) or packed FP4"));
  }
}

absl::StatusOr<std::vector<int32_t>> Checkpoint::ReadInt(std::string_view name,
                                                         const std::vector<int64_t>& expected) const {
  ASSIGN_OR_RETURN(TensorView v, Get(name));
  const TensorInfo& t = *v.info;
  if (t.shape != expected) return ShapeError(v, expected, "has");
  const int64_t n = t.elements();
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype) {
      case DType::kI64: {
        const int64_t x = Load<int64_t>(v.data + 8 * i);
        if (x < INT32_MIN || x > INT32_MAX) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor '", t.name, "': value ", x, " out of range"));
        }
        out[i] = static_cast<int32_t>(x);
        break;
      }
      case DType::kI32:
        out[i] = Load<int32_t>(v.data + 4 * i);
        break;
      case DType::kI16:
        out[i] = Load<int16_t>(v.data + 2 * i);
        break;
      case DType::kI8: {
        const int byte = static_cast<unsigned char>(v.data[i]);  // two's complement int8
        out[i] = byte >= 128 ? byte - 256 : byte;
      } break;
      case DType::kU8:
        out[i] = v.data[i];
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has dtype ",
                                                       std::string(DTypeName(t.dtype)),
                                                       "; expected an integer type"));
    }
  }
  return out;
}

absl::Status ConvertFp4ToFp8(const uint8_t* packed, const uint8_t* scale, int64_t out, int64_t in,
                             std::vector<uint8_t>* fp8, std::vector<uint8_t>* fp8_scale) {
  if (out % kFp8Tile != 0 || in % kFp8Tile != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("FP4->FP8 needs dims divisible by 128, got ", out, "x", in));
  }
  const int64_t bo = out / kFp8Tile, bi = in / kFp8Tile, sc = in / kFp4Block;
  fp8->assign(static_cast<size_t>(out * in), 0);
  fp8_scale->assign(static_cast<size_t>(bo * bi), 0);
  for (int64_t tr = 0; tr < bo; ++tr) {
    for (int64_t tc = 0; tc < bi; ++tc) {
      // The tile scale is the largest E8M0 exponent in the tile minus 6 (6 * 2^6 = 384 <= 448).
      int max_e = 0;
      for (int64_t r = tr * kFp8Tile; r < (tr + 1) * kFp8Tile; ++r) {
        for (int64_t s = tc * (kFp8Tile / kFp4Block); s < (tc + 1) * (kFp8Tile / kFp4Block); ++s) {
          max_e = std::max(max_e, static_cast<int>(scale[r * sc + s]));
        }
      }
      if (max_e == 0xff) return absl::InvalidArgumentError("FP4 scale is NaN (E8M0 0xff)");
      const int tile_e = max_e - 6;
      if (tile_e < 0) return absl::InvalidArgumentError("FP4 scales too small for an E8M0 tile scale");
      (*fp8_scale)[tr * bi + tc] = static_cast<uint8_t>(tile_e);
      for (int64_t r = tr * kFp8Tile; r < (tr + 1) * kFp8Tile; ++r) {
        for (int64_t c = tc * kFp8Tile; c < (tc + 1) * kFp8Tile; ++c) {
          const uint8_t b = packed[r * (in / 2) + c / 2];
          const float v = Fp4E2m1ToFloat((c % 2) ? (b >> 4) : (b & 0xf));
          const float offset = std::ldexp(1.0f, static_cast<int>(scale[r * sc + c / kFp4Block]) - tile_e);
          const float x = v * offset;
          const uint8_t q = FloatToFp8E4m3(x);
          if (Fp8E4m3ToFloat(q) != x) {
            return absl::InvalidArgumentError(
                absl::StrCat("FP4 value at [", r, ", ", c,
                             "] is not exactly representable "
                             "in FP8 under the tile scale (scale spread too wide)"));
          }
          (*fp8)[r * in + c] = q;
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace v4serve::model
