// 16-bit floating-point storage types for the torch-free kernels.
//
// Their layout is that of IEEE binary16 and bfloat16 (the same bits as at::Half and
// at::BFloat16), so the torch layer can hand us its data pointers. Arithmetic happens in
// float: these only load and store, rounding to nearest-even like torch does.
#pragma once

#include <cstdint>
#include <cstring>

#include "inline.h"

namespace lpnorm::core {

LPNORM_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

LPNORM_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Half {
  uint16_t bits;

  LPNORM_INLINE static Half from_float(float f) {
    const uint32_t x = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t mag = x & 0x7fffffffu;
    if (mag >= 0x7f800000u) {  // inf stays inf; NaN stays a (quiet) NaN
      return {static_cast<uint16_t>(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0u))};
    }
    if (mag >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
    if (mag < 0x38800000u) {
      // Below 2^-14 the result is subnormal: adding 0.5 makes float's rounding (to the
      // 2^-24 grid of [0.5, 1)) do the half rounding for us.
      const float shifted = bits_float(mag) + 0.5f;
      return {static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u))};
    }
    // Normal: re-bias the exponent (127 -> 15) and round the 13 dropped bits to nearest-even.
    const uint32_t odd = (mag >> 13) & 1u;
    return {static_cast<uint16_t>(sign | ((mag - (112u << 23) + 0xfffu + odd) >> 13))};
  }

  LPNORM_INLINE float to_float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1fu;
    const uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: exact in float
      const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
      return bits_float(float_bits(value) | sign);
    }
    if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
};

struct BFloat16 {
  uint16_t bits;

  LPNORM_INLINE static BFloat16 from_float(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
      return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // keep NaN a NaN
    }
    const uint32_t odd = (x >> 16) & 1u;
    return {static_cast<uint16_t>((x + 0x7fffu + odd) >> 16)};
  }

  LPNORM_INLINE float to_float() const { return bits_float(static_cast<uint32_t>(bits) << 16); }
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types");

// Loading and storing any supported element type through its accumulation type.
template <typename T>
struct Element {
  using acc = T;  // float and double compute in themselves
  LPNORM_INLINE static acc load(T v) { return v; }
  LPNORM_INLINE static T store(acc v) { return v; }
};

template <>
struct Element<Half> {
  using acc = float;
  LPNORM_INLINE static float load(Half v) { return v.to_float(); }
  LPNORM_INLINE static Half store(float v) { return Half::from_float(v); }
};

template <>
struct Element<BFloat16> {
  using acc = float;
  LPNORM_INLINE static float load(BFloat16 v) { return v.to_float(); }
  LPNORM_INLINE static BFloat16 store(float v) { return BFloat16::from_float(v); }
};

}  // namespace lpnorm::core
