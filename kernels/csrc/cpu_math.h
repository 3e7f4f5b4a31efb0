// Small vectorisable helpers for the CPU kernels (plain loops that gcc turns into AVX2 code).
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>

namespace esvit {

// exp(x) for float in a form the compiler vectorises (no libm call): 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, degree-6 polynomial; relative error ~2e-7. x is clamped to [-88, 88]: from about -87.7 down
// (-inf included) n = -127, whose biased exponent is 0, so the result is exactly 0 without a separate test.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -88.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline double exp_vec(double x) { return std::exp(x); }

}  // namespace esvit
