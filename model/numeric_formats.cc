#include "model/numeric_formats.h"

#include <cmath>
#include <limits>

namespace v4serve::model {

float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

float Fp8E4m3ToFloat(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 7;
  if (exp == 0xf && man == 7) return std::numeric_limits<float>::quiet_NaN();
  float v =
      exp == 0 ? std::ldexp(static_cast<float>(man), -9) : std::ldexp(static_cast<float>(8 + man), exp - 10);
  return sign ? -v : v;
}

uint8_t FloatToFp8E4m3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // Saturate.
  // Exponent of the value (normal range starts at 2^-6); below that the step is 2^-9.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1).
  int exp_unbiased = e - 1;
  if (exp_unbiased < -6) exp_unbiased = -6;
  const float step = std::ldexp(1.0f, exp_unbiased - 3);
  float q = std::nearbyint(a / step) * step;  // Ties to even under the default rounding mode.
  if (q >= 448.0f) q = 448.0f;
  // Encode q exactly.
  if (q == 0) return sign;
  int qe;
  std::frexp(q, &qe);
  int ue = qe - 1;
  if (ue < -6) {  // Subnormal: q = man * 2^-9.
    return sign | static_cast<uint8_t>(std::lround(std::ldexp(q, 9)));
  }
  int man = static_cast<int>(std::lround(std::ldexp(q, 3 - ue))) - 8;
  return sign | static_cast<uint8_t>(((ue + 7) << 3) | man);
}

float E8m0ToFloat(uint8_t b) {
  if (b == 0xff) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(b) - 127);
}

float Fp4E2m1ToFloat(uint8_t code) {
  static constexpr float kTable[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float v = kTable[code & 7];
  return (code & 8) ? -v : v;
}

float RoundToFp4E2m1(float f) {
  static constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  if (std::isnan(f)) return f;
  const float a = std::fmin(std::fabs(f), 6.0f);
  int best = 0;
  for (int i = 1; i < 8; ++i) {
    const float d = std::fabs(a - kGrid[i]), db = std::fabs(a - kGrid[best]);
    // On a tie pick the code with an even mantissa (even index), as round-to-nearest-even does.
    if (d < db || (d == db && (i % 2) == 0)) best = i;
  }
  return std::signbit(f) ? -kGrid[best] : kGrid[best];
}

}  // namespace v4serve::model
