// Scalar conversions for the number formats of V4 checkpoints and of the faithful numeric mode:
// BF16, FP16, FP8 e4m3 (finite-only "fn" variant, max 448), E8M0 power-of-two scales and FP4 e2m1.
//
// Thread-safety: pure functions.
#ifndef V4SERVE_MODEL_NUMERIC_FORMATS_H_
#define V4SERVE_MODEL_NUMERIC_FORMATS_H_

#include <cstdint>
#include <cstring>

namespace v4serve::model {

inline float Bf16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even; NaN stays NaN.
inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

float Fp16ToFloat(uint16_t h);

// FP8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7f/0xff are NaN; no infinities.
float Fp8E4m3ToFloat(uint8_t b);
// Round-to-nearest-even with saturation to ±448 (as torch's .to(float8_e4m3fn) after clamping).
uint8_t FloatToFp8E4m3(float f);
inline float RoundToFp8E4m3(float f) { return Fp8E4m3ToFloat(FloatToFp8E4m3(f)); }

// E8M0: value 2^(b - 127); 0xff is NaN.
float E8m0ToFloat(uint8_t b);

// FP4 e2m1 code (low 4 bits): {0, .5, 1, 1.5, 2, 3, 4, 6} with the sign in bit 3.
float Fp4E2m1ToFloat(uint8_t code);
// Round-to-nearest-even onto the e2m1 grid with saturation to ±6.
float RoundToFp4E2m1(float f);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_NUMERIC_FORMATS_H_
