// Loading and storing W elements of a storage type (float, double, bfloat16, half) as vectors
// of its accumulation type: whole vectors, the first n elements, strided runs, and
// non-temporal stores.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/isa/vectors.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

template <typename T>
struct Io;

// float and double load and store as themselves.
template <typename T, typename V>
struct NativeIo {
  using A = T;
  LPNORM_INLINE static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  LPNORM_INLINE static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
  LPNORM_INLINE static V bits(V v) { return v; }
};

template <>
struct Io<float> : NativeIo<float, VF> {};

template <>
struct Io<double> : NativeIo<double, VD> {};

template <>
struct Io<BFloat16> {
  using A = float;
  LPNORM_INLINE static VF load(const BFloat16* p) {
#if defined(__AVX512F__)  // one vpmovzxwd zmm (the vector-extension form splits it in two)
    return reinterpret_cast<VF>(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(__AVX2__)
    return reinterpret_cast<VF>(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
    VU16 h;
    std::memcpy(&h, p, sizeof h);
    return reinterpret_cast<VF>(__builtin_convertvector(h, VU32) << 16);
#endif
  }
  // Round to nearest-even; NaN stays a quiet NaN (BFloat16::from_float, lane-wise).
  LPNORM_INLINE static VU16 bits(VF v) {
    const VU32 u = reinterpret_cast<VU32>(v);
    const VU32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const VU32 b = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded;
    return __builtin_convertvector(b, VU16);
  }
  LPNORM_INLINE static void store(BFloat16* p, VF v) {
    const VU16 h = bits(v);
    std::memcpy(p, &h, sizeof h);
  }
};

template <>
struct Io<Half> {
  using A = float;
  LPNORM_INLINE static VF load(const Half* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<VF>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__)
    return reinterpret_cast<VF>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    VF v;
    for (int i = 0; i < Simd<float>::W; ++i) v[i] = p[i].to_float();
    return v;
#endif
  }
  LPNORM_INLINE static void store(Half* p, VF v) {
#if defined(__AVX512F__) || defined(__AVX2__)
    const VU16 h = bits(v);
    std::memcpy(p, &h, sizeof h);
#else
    for (int i = 0; i < Simd<float>::W; ++i) p[i] = Half::from_float(v[i]);
#endif
  }
#if defined(__AVX512F__)
  LPNORM_INLINE static VU16 bits(VF v) {
    return reinterpret_cast<VU16>(
        _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#elif defined(__AVX2__)
  LPNORM_INLINE static VU16 bits(VF v) {
    return reinterpret_cast<VU16>(
        _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
};

template <typename T>
using AccOf = typename Io<T>::A;
template <typename T>
using VecOf = typename Simd<AccOf<T>>::V;
template <typename T>
constexpr int kLanes = Simd<AccOf<T>>::W;

// The first n < W contiguous elements, the other lanes zero, without faulting on memory past
// them: masked loads and stores where the build has them, a small buffer otherwise. (A masked
// load still reads the lines of the whole vector's span on Zen 4: see load_last.)
template <typename T>
LPNORM_INLINE VecOf<T> load_first(const T* p, int n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return reinterpret_cast<VF>(_mm512_maskz_loadu_ps((1u << n) - 1, p));
  if constexpr (std::is_same_v<T, double>) return reinterpret_cast<VD>(_mm512_maskz_loadu_pd((1u << n) - 1, p));
  if constexpr (std::is_same_v<T, BFloat16>) {  // widen in registers: a tail in every short plane
    const __m256i bits = _mm256_maskz_loadu_epi16((1u << n) - 1, p);
    return reinterpret_cast<VF>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  if constexpr (std::is_same_v<T, Half>) {
    return reinterpret_cast<VF>(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16((1u << n) - 1, p)));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i mask = reinterpret_cast<__m256i>(lanes_below<float>(n));
    return reinterpret_cast<VF>(_mm256_maskload_ps(p, mask));
  }
  if constexpr (std::is_same_v<T, double>) {
    const __m256i mask = reinterpret_cast<__m256i>(lanes_below<double>(n));
    return reinterpret_cast<VD>(_mm256_maskload_pd(p, mask));
  }
#endif
  T buffer[kLanes<T>] = {};
  std::memcpy(buffer, p, static_cast<size_t>(n) * sizeof(T));
  return Io<T>::load(buffer);
}

template <typename T>
LPNORM_INLINE void store_first(T* p, int n, VecOf<T> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_mask_storeu_ps(p, (1u << n) - 1, reinterpret_cast<__m512>(v));
  if constexpr (std::is_same_v<T, double>) {
    return _mm512_mask_storeu_pd(p, (1u << n) - 1, reinterpret_cast<__m512d>(v));
  }
  if constexpr (sizeof(T) == 2) {  // round in registers, store the n halves with a mask
    return _mm256_mask_storeu_epi16(p, (1u << n) - 1, reinterpret_cast<__m256i>(Io<T>::bits(v)));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskstore_ps(p, reinterpret_cast<__m256i>(lanes_below<float>(n)), reinterpret_cast<__m256>(v));
  }
  if constexpr (std::is_same_v<T, double>) {
    return _mm256_maskstore_pd(p, reinterpret_cast<__m256i>(lanes_below<double>(n)), reinterpret_cast<__m256d>(v));
  }
#endif
  T buffer[kLanes<T>];
  Io<T>::store(buffer, v);
  std::memcpy(p, buffer, static_cast<size_t>(n) * sizeof(T));
}

// The last n < W elements of a run of at least W, ending at `end`, in lanes [0, n) and the
// others zero, from the whole vector that ends there. A masked load of a short plane's last
// elements reads the whole vector's span on Zen 4, and waits on the line past the plane,
// which nothing prefetched.
template <typename T>
LPNORM_INLINE VecOf<T> load_last(const T* end, int n) {
  using A = AccOf<T>;
  constexpr int W = kLanes<T>;
  typename Simd<A>::Mask index;
  for (int i = 0; i < W; ++i) index[i] = static_cast<std::remove_reference_t<decltype(index[0])>>(i + W - n);
  const VecOf<T> moved = __builtin_shuffle(Io<T>::load(end - W), index);
  return lanes_below<A>(n) ? moved : VecOf<T>{};
}

// n <= W elements `stride` apart; missing lanes read as zero.
template <typename T>
LPNORM_INLINE VecOf<T> load_run(const T* p, int64_t stride, int n) {
  constexpr int W = kLanes<T>;
  if (stride == 1) return n == W ? Io<T>::load(p) : load_first(p, n);
  T buffer[W] = {};
  for (int i = 0; i < n; ++i) buffer[i] = p[i * stride];
  return Io<T>::load(buffer);
}

template <typename T>
LPNORM_INLINE void store_run(T* p, int64_t stride, int n, VecOf<T> v) {
  constexpr int W = kLanes<T>;
  if (stride == 1) return n == W ? Io<T>::store(p, v) : store_first(p, n, v);
  T buffer[W];
  Io<T>::store(buffer, v);
  for (int i = 0; i < n; ++i) p[i * stride] = buffer[i];
}

// A whole vector at p; with `stream`, a non-temporal store where p is aligned to the vector
// (the output then does not evict x, and skips the read-for-ownership of its lines).
template <typename T>
LPNORM_INLINE void store_vector(T* p, VecOf<T> v, bool stream) {
#if defined(__AVX2__) || defined(__AVX512F__)
  const auto b = Io<T>::bits(v);
  if (stream && reinterpret_cast<uintptr_t>(p) % sizeof(b) == 0) {
    if constexpr (sizeof(b) == 64) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), reinterpret_cast<__m512i>(b));
    } else if constexpr (sizeof(b) == 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(b));
    } else {
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(b));
    }
    return;
  }
#else
  (void)stream;
#endif
  Io<T>::store(p, v);
}

// Orders this thread's non-temporal stores before whatever it stores next.
LPNORM_INLINE void stream_fence(bool stream) {
#if defined(__AVX2__) || defined(__AVX512F__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
