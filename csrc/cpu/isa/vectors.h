// Vectors of this build. The element loops use GCC/Clang vector extensions sized to the
// build's registers (16 bytes in the baseline build, which the compiler lowers to SSE2, NEON
// or scalars; 32 for AVX2; 64 for AVX-512), so one source serves every build; x86 intrinsics
// appear only under the build's own __AVX2__ / __AVX512F__ macros (half-precision
// conversion, lane masks).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/half_types.h"
#include "core/inline.h"
#include "cpu/isa/build.h"
#include "cpu/kernels.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

using core::BFloat16;
using core::Candidate;
using core::Half;
using core::PhiKind;


#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX2__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

typedef float VF __attribute__((vector_size(kBytes)));
typedef double VD __attribute__((vector_size(kBytes)));
typedef int32_t VI32 __attribute__((vector_size(kBytes)));
typedef int64_t VI64 __attribute__((vector_size(kBytes)));
typedef uint32_t VU32 __attribute__((vector_size(kBytes)));
typedef uint64_t VU64 __attribute__((vector_size(kBytes)));
typedef uint16_t VU16 __attribute__((vector_size(kBytes / 2)));

template <typename A>
struct Simd;
template <>
struct Simd<float> {
  using V = VF;
  using Mask = VI32;
  static constexpr int W = kBytes / 4;
};
template <>
struct Simd<double> {
  using V = VD;
  using Mask = VI64;
  static constexpr int W = kBytes / 8;
};

LPNORM_INLINE uint32_t bitmask(VI32 m) {
#if defined(__AVX512F__)
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(m));
#elif defined(__AVX2__)
  return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256>(m)));
#else
  uint32_t bits = 0;
  for (int i = 0; i < Simd<float>::W; ++i) bits |= (m[i] != 0 ? 1u : 0u) << i;
  return bits;
#endif
}

LPNORM_INLINE uint32_t bitmask(VI64 m) {
#if defined(__AVX512F__)
  return _mm512_movepi64_mask(reinterpret_cast<__m512i>(m));
#elif defined(__AVX2__)
  return static_cast<uint32_t>(_mm256_movemask_pd(reinterpret_cast<__m256d>(m)));
#else
  uint32_t bits = 0;
  for (int i = 0; i < Simd<double>::W; ++i) bits |= (m[i] != 0 ? 1u : 0u) << i;
  return bits;
#endif
}

// Lanes where a > b (lanes_above) or a >= b (lanes_at_least), as bits; NaN never. AVX-512
// compares into a mask register: bitmask() of a vector compare moved the mask to a vector and
// back, two more instructions on the chain of the loops that pack lanes (compress).
template <bool kOrEqual, typename V>
LPNORM_INLINE uint32_t lanes_compared(V a, V b) {
#if defined(__AVX512F__)
  constexpr int kPredicate = kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ;
  if constexpr (sizeof(a[0]) == 4) {
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), kPredicate);
  } else {
    return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), kPredicate);
  }
#else
  if constexpr (kOrEqual) {
    return bitmask(a >= b);
  } else {
    return bitmask(a > b);
  }
#endif
}
template <typename V>
LPNORM_INLINE uint32_t lanes_above(V a, V b) {
  return lanes_compared<false>(a, b);
}
template <typename V>
LPNORM_INLINE uint32_t lanes_at_least(V a, V b) {
  return lanes_compared<true>(a, b);
}

// One broadcast: a - 0 is a for every value (-0 and NaN included). (A lane-by-lane loop
// compiled to one masked broadcast per lane in some callers.)
template <typename V, typename A>
LPNORM_INLINE V splat(A a) {
  using E = std::remove_reference_t<decltype(V{}[0])>;
  return static_cast<E>(a) - V{};
}

// Lanes [0, n) set.
template <typename A>
LPNORM_INLINE typename Simd<A>::Mask lanes_below(int n) {
  typename Simd<A>::Mask index;
  for (int i = 0; i < Simd<A>::W; ++i) index[i] = i;
  return index < n;
}

LPNORM_INLINE VF vabs(VF v) { return reinterpret_cast<VF>(reinterpret_cast<VU32>(v) & 0x7fffffffu); }
LPNORM_INLINE VD vabs(VD v) {
  return reinterpret_cast<VD>(reinterpret_cast<VU64>(v) & 0x7fffffffffffffffull);
}

// sign(d) with sign(0) = 0 and NaN kept (core::sign_of, lane-wise).
template <typename V>
LPNORM_INLINE V vsign(V d) {
  using A = std::remove_reference_t<decltype(d[0])>;
  const V zero{};
  return d > zero ? splat<V>(A(1)) : (d < zero ? splat<V>(A(-1)) : d * A(0));
}

#if defined(__AVX512F__)
// One instruction instead of two compares, two blends and a multiply (the l1 deviation pass
// is bound by its arithmetic on half inputs): vfixupimm maps each input class to a constant,
// a nibble per class (QNaN, SNaN, zero, +1, -inf, +inf, negative, positive) -> (itself, quiet
// NaN, +0, +1, -1, +1, -1, +1).
constexpr int32_t kSignTable = static_cast<int32_t>(0xA9A9A821u);
LPNORM_INLINE VF vsign(VF d) {
  const __m512 v = reinterpret_cast<__m512>(d);
  return reinterpret_cast<VF>(_mm512_fixupimm_ps(v, v, _mm512_set1_epi32(kSignTable), 0));
}
LPNORM_INLINE VD vsign(VD d) {
  const __m512d v = reinterpret_cast<__m512d>(d);
  return reinterpret_cast<VD>(_mm512_fixupimm_pd(v, v, _mm512_set1_epi64(kSignTable), 0));
}
#endif

// The sum of a vector's lanes in double, as a tree: the halves of a float vector widened and
// added, then halves of the double vector, log2(lanes) adds deep, in registers. (Lane after
// lane, 16 dependent adds, it was a third of the stats pass over planes of 49 elements: (1,
// 2048, 7, 7) on a Xeon. A loop over an array of lanes kept them on the stack.)
template <int kSize>  // bytes
struct Doubles {
  typedef double type __attribute__((vector_size(kSize)));
};
template <int kSize>
LPNORM_INLINE double hsum_doubles(typename Doubles<kSize>::type v) {
  if constexpr (kSize == 16) {
    return v[0] + v[1];
  } else {
    typename Doubles<kSize / 2>::type half[2];
    std::memcpy(half, &v, sizeof v);
    return hsum_doubles<kSize / 2>(half[0] + half[1]);
  }
}
LPNORM_INLINE double hsum(VD v) { return hsum_doubles<kBytes>(v); }

// A float vector's lanes in double: its first half in low, its second in high.
struct Widened {
  VD low, high;
};
LPNORM_INLINE Widened widen(VF v) {
  typedef float HalfVF __attribute__((vector_size(kBytes / 2)));
  HalfVF half[2];
  std::memcpy(half, &v, sizeof v);
  return {__builtin_convertvector(half[0], VD), __builtin_convertvector(half[1], VD)};
}
LPNORM_INLINE double hsum(VF v) {
  const Widened w = widen(v);
  return hsum(w.low + w.high);
}

// The lanes of `id` set in `mask`, packed to the front of out (which must have room for a
// whole vector past the last kept lane); returns how many. AVX-512 packs in registers (its
// compress to memory is slow on AMD); other builds loop.
template <typename M, typename R>
LPNORM_INLINE int compress(M id, uint32_t mask, R* out) {
#if defined(__AVX512F__)
  if constexpr (sizeof(R) == 4) {
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(static_cast<__mmask16>(mask), reinterpret_cast<__m512i>(id)));
  } else {
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi64(static_cast<__mmask8>(mask), reinterpret_cast<__m512i>(id)));
  }
  return __builtin_popcount(mask);
#else
  int n = 0;
  for (; mask != 0; mask &= mask - 1) out[n++] = id[__builtin_ctz(mask)];
  return n;
#endif
}

// acc + add in the lanes set in mask (AVX-512: one masked add, the mask straight from the
// compare's register).
template <typename M>
LPNORM_INLINE M add_where(M acc, uint32_t mask, M add) {
#if defined(__AVX512F__)
  const __m512i a = reinterpret_cast<__m512i>(acc), b = reinterpret_cast<__m512i>(add);
  if constexpr (sizeof(acc[0]) == 4) {
    return reinterpret_cast<M>(_mm512_mask_add_epi32(a, static_cast<__mmask16>(mask), a, b));
  } else {
    return reinterpret_cast<M>(_mm512_mask_add_epi64(a, static_cast<__mmask8>(mask), a, b));
  }
#else
  for (; mask != 0; mask &= mask - 1) acc[__builtin_ctz(mask)] += add[__builtin_ctz(mask)];
  return acc;
#endif
}

// Lane-wise square root (of |d|: no negative lanes).
template <typename V>
LPNORM_INLINE V vsqrt(V v) {
  using A = std::remove_reference_t<decltype(v[0])>;
#if defined(__AVX512F__)
  if constexpr (sizeof(A) == 4) return reinterpret_cast<V>(_mm512_sqrt_ps(reinterpret_cast<__m512>(v)));
  else return reinterpret_cast<V>(_mm512_sqrt_pd(reinterpret_cast<__m512d>(v)));
#elif defined(__AVX2__)
  if constexpr (sizeof(A) == 4) return reinterpret_cast<V>(_mm256_sqrt_ps(reinterpret_cast<__m256>(v)));
  else return reinterpret_cast<V>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(v)));
#elif defined(__SSE2__)
  if constexpr (sizeof(A) == 4) return reinterpret_cast<V>(_mm_sqrt_ps(reinterpret_cast<__m128>(v)));
  else return reinterpret_cast<V>(_mm_sqrt_pd(reinterpret_cast<__m128d>(v)));
#else
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(A)); ++i) v[i] = std::sqrt(v[i]);
  return v;
#endif
}

// The general-p norm's exponent as the element loops take it. |d|^(p - 1) is taken by
// multiplications where p - 1 is a whole number up to kMaxWhole, and times sqrt(|d|) where it
// is one and a half; other p through positive_power for float lanes, std::pow lane by lane for
// double. (std::pow twice an element, for |d|^p and |d|^(p - 1), made p = 3 six to 26 times as
// long as torch's batch norm.)
template <typename A>
struct Power {
  static constexpr int kMaxWhole = 64;
  A p = 0;
  int whole = -1;  // p - 1 = whole (+ 1/2 where half); -1: std::pow
  bool half = false;
  static Power of(double p) {
    Power power;
    power.p = static_cast<A>(p);
    const double e = static_cast<double>(power.p) - 1;  // the A-rounded p, as std::pow would take it
    if (e >= 0 && e <= kMaxWhole && 2 * e == std::floor(2 * e)) {
      power.whole = static_cast<int>(std::floor(e));
      power.half = e != std::floor(e);
    }
    return power;
  }
};

// |d|^n for a whole n >= 0, lane-wise: square and multiply (|d|^0 = 1, as std::pow).
template <typename V>
LPNORM_INLINE V whole_power(V magnitude, int n) {
  using A = std::remove_reference_t<decltype(magnitude[0])>;
  V result = splat<V>(A(1));
  for (V square = magnitude; n > 0; n >>= 1, square *= square) {
    if ((n & 1) != 0) result *= square;
  }
  return result;
}

// m = f * 2^k lane-wise, f in [sqrt(1/2), sqrt(2)) and k whole, for positive normal m. AVX-512
// reads both in one instruction each (getmant, getexp), the other builds from the bits.
LPNORM_INLINE void split_mantissa(VD m, VD& f, VD& k) {
#if defined(__AVX512F__)
  f = reinterpret_cast<VD>(_mm512_getmant_pd(reinterpret_cast<__m512d>(m), _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero));
  k = reinterpret_cast<VD>(_mm512_getexp_pd(reinterpret_cast<__m512d>(m)));
#else
  constexpr double kTwo52 = 4503599627370496.0;
  const VI64 bits = reinterpret_cast<VI64>(m);
  k = reinterpret_cast<VD>(((bits >> 52) & 0x7ff) | reinterpret_cast<VI64>(splat<VD>(kTwo52))) - (kTwo52 + 1023);
  f = reinterpret_cast<VD>((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);
#endif
  const VI64 above = f > 1.4142135623730951;
  f = above ? f * 0.5 : f;
  k = above ? k + 1 : k;
}

// 1.5 * 2^52: y + kRoundToWhole rounds y to a whole number (ties to even) for |y| < 2^51, and
// holds that number in the low bits of its mantissa.
constexpr double kRoundToWhole = 6755399441055744.0;

// y rounded to the nearest whole number (ties to even), for |y| < 2^51.
LPNORM_INLINE VD nearest_whole(VD y) {
#if defined(__AVX512F__)
  return reinterpret_cast<VD>(
      _mm512_roundscale_pd(reinterpret_cast<__m512d>(y), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  return (y + kRoundToWhole) - kRoundToWhole;
#endif
}

// v * 2^n lane-wise for whole n: inf or 0 past the doubles' range (AVX-512's scalef; the other
// builds multiply by two factors that are each a normal double, n clamped to +-1200 first).
LPNORM_INLINE VD times_two_to(VD v, VD n) {
#if defined(__AVX512F__)
  return reinterpret_cast<VD>(_mm512_scalef_pd(reinterpret_cast<__m512d>(v), reinterpret_cast<__m512d>(n)));
#else
  n = n < -1200 ? splat<VD>(-1200.0) : n;
  n = n > 1200 ? splat<VD>(1200.0) : n;
  const VI64 whole = reinterpret_cast<VI64>(n + kRoundToWhole) - reinterpret_cast<VI64>(splat<VD>(kRoundToWhole));
  const VI64 half = whole >> 1;
  return v * reinterpret_cast<VD>((half + 1023) << 52) * reinterpret_cast<VD>((whole - half + 1023) << 52);
#endif
}

// m^e lane-wise for e > 0, as 2^(e log2 m) in double: for float results (relative error
// below 1e-9 before the rounding to float, for e up to 64 and beyond). m = 0, inf and NaN
// give m, as std::pow would. log2 of m's mantissa f in [sqrt(1/2), sqrt(2)) is 2 atanh(t) /
// ln 2 with t = (f - 1) / (f + 1), |t| < 0.172 (a series to t^11); 2^g for |g| <= 1/2 a
// Taylor series to x^8 in x = g ln 2; whole parts through the exponent. (AVX-512's exponent
// instructions, in place of the bits' shifts and masks, took p = 2.7 fwd+bwd at 2 threads
// from 0.50 to 0.37 ms on (256, 1024) float32, 11.6 to 8.2 ms on (32, 64, 56, 56) float16.)
LPNORM_INLINE VD positive_power(VD m, double e) {
  VD f, k;
  split_mantissa(m, f, k);
  const VD t = (f - 1) / (f + 1), t2 = t * t;
  const VD series = 1 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 * (1.0 / 11)))));
  const VD y = e * (k + t * series * 2.8853900817779268);  // 2 / ln 2
  const VD whole = nearest_whole(y);
  const VD x = (y - whole) * 0.6931471805599453;  // ln 2
  const VD exp_x = 1 + x * (1 + x * (1.0 / 2 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 +
                   x * (1.0 / 5040 + x * (1.0 / 40320))))))));
  return m > 0 & m < std::numeric_limits<double>::infinity() ? times_two_to(exp_x, whole) : m;
}

// v + a in the lanes whose bit is set in bits [0, W), v - a in those set in bits [16, 16 + W):
// one word per vector carries both signs (W <= 16 in every build). A lane in both gets
// (v + a) - a.
template <typename V>
LPNORM_INLINE V add_signed_in_lanes(V v, uint32_t bits, V a) {
  using A = std::remove_reference_t<decltype(v[0])>;
  static_assert(Simd<A>::W <= 16);
#if defined(__AVX512F__)
  if constexpr (sizeof(A) == 4) {
    const __m512 x = reinterpret_cast<__m512>(v), y = reinterpret_cast<__m512>(a);
    const __m512 plus = _mm512_mask_add_ps(x, static_cast<__mmask16>(bits), x, y);
    return reinterpret_cast<V>(_mm512_mask_sub_ps(plus, static_cast<__mmask16>(bits >> 16), plus, y));
  } else {
    const __m512d x = reinterpret_cast<__m512d>(v), y = reinterpret_cast<__m512d>(a);
    const __m512d plus = _mm512_mask_add_pd(x, static_cast<__mmask8>(bits), x, y);
    return reinterpret_cast<V>(_mm512_mask_sub_pd(plus, static_cast<__mmask8>(bits >> 16), plus, y));
  }
#else
  using M = typename Simd<A>::Mask;
  using E = std::remove_reference_t<decltype(M{}[0])>;
  M plus_bit, minus_bit;
  for (int i = 0; i < Simd<A>::W; ++i) {
    plus_bit[i] = static_cast<E>(uint32_t{1} << i);
    minus_bit[i] = static_cast<E>(uint32_t{1} << (16 + i));
  }
  const M word = splat<M>(static_cast<E>(bits));
  v = (word & plus_bit) != 0 ? v + a : v;
  return (word & minus_bit) != 0 ? v - a : v;
#endif
}

// Lane-wise |d|^q and phi(d); `power` used by SignedPower only (q = p there: |d|^p is
// |d|^(p - 1) * |d|).
template <PhiKind kPhi, typename V, typename A>
LPNORM_INLINE void deviation_terms(V d, const Power<A>& power, V& magnitude_q, V& phi) {
  if constexpr (kPhi == PhiKind::Identity) {
    magnitude_q = d * d;
    phi = d;
  } else if constexpr (kPhi == PhiKind::Sign) {
    magnitude_q = vabs(d);
    phi = vsign(d);
  } else {
    const V magnitude = vabs(d);
    V below;  // |d|^(p - 1)
    if (power.whole >= 0) {
      below = whole_power(magnitude, power.whole);
      if (power.half) below *= vsqrt(magnitude);
    } else if constexpr (sizeof(A) == 4) {  // float lanes, in two halves of double
      typedef float Half __attribute__((vector_size(kBytes / 2)));
      Half part[2];
      std::memcpy(part, &magnitude, sizeof magnitude);
      for (Half& h : part) {
        h = __builtin_convertvector(positive_power(__builtin_convertvector(h, VD), power.p - 1.0), Half);
      }
      std::memcpy(&below, part, sizeof below);
    } else {
      for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(A)); ++i) {
        below[i] = std::pow(magnitude[i], power.p - A(1));
      }
    }
    magnitude_q = below * magnitude;
    phi = vsign(d) * below;
  }
}

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
