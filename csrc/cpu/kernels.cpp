// The CPU passes, written once. CMake compiles this file once per instruction set with
// LPNORM_ISA set to its name (baseline, avx2, avx512) and that set's compiler flags; each
// build lives in its own namespace and exports kernels_<isa>().
//
// The element loops use GCC/Clang vector extensions sized to the build's registers (16 bytes
// in the baseline build, which the compiler lowers to SSE2, NEON or scalars; 32 for AVX2; 64
// for AVX-512), so one source serves every build; x86 intrinsics appear only under the
// build's own __AVX2__ / __AVX512F__ macros (half-precision conversion, lane masks).
//
// Arithmetic runs in float for float/half data and in double for double. Sums of float lanes
// are folded into double every few thousand elements, so they stay accurate for m ~ 1e7.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core/half_types.h"
#include "cpu/kernels.h"

#ifndef LPNORM_ISA
#error "compile kernels.cpp with -DLPNORM_ISA=<name>"
#endif

#define LPNORM_CONCAT_(a, b) a##b
#define LPNORM_CONCAT(a, b) LPNORM_CONCAT_(a, b)
#define LPNORM_STRINGIFY_(a) #a
#define LPNORM_STRINGIFY(a) LPNORM_STRINGIFY_(a)

namespace lpnorm::cpu {
namespace LPNORM_CONCAT(isa_, LPNORM_ISA) {
namespace {

using core::BFloat16;
using core::Candidate;
using core::Half;
using core::PhiKind;

// ---------------------------------------------------------------------------------------
// Vectors of this build

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

template <typename V>
LPNORM_INLINE double hsum(V v) {
  double total = 0;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(v[0])); ++i) total += static_cast<double>(v[i]);
  return total;
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

// ---------------------------------------------------------------------------------------
// Loading and storing W elements of a storage type as vectors of its accumulation type

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

// The first n < W contiguous elements, the other lanes zero, without touching memory past
// them: masked loads and stores where the build has them, a small buffer otherwise.
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

constexpr uintptr_t kLineBytes = 64;
constexpr int64_t kStreamRunBytes = 4096;

// Orders this thread's non-temporal stores before whatever it stores next.
LPNORM_INLINE void stream_fence(bool stream) {
#if defined(__AVX2__) || defined(__AVX512F__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// ---------------------------------------------------------------------------------------
// Walking a tile

constexpr int64_t kNoSplit = std::numeric_limits<int64_t>::max();

Walk walk(const Layout& l) { return walk_of(l); }

// A reduction's rows, cut into consecutive parts summed apart (part j's sums to out + j * C):
// the split schedule's row parts that one call walks (Kernels::collect_stats).
struct Parts {
  const Tile* tiles;
  int64_t count;
  Tile whole() const { return {tiles[0].c_begin, tiles[0].c_end, tiles[0].row_begin, tiles[count - 1].row_end}; }
};

// Channel-major: the tile's elements of channel c as runs of evenly strided elements, in
// increasing flat order, never crossing a multiple of `split`. Calls
// run(offset, stride, length, flat).
template <typename Run>
LPNORM_INLINE void for_each_run(const Layout& l, int64_t c, int64_t row_begin, int64_t row_end, int64_t split,
                                Run&& run) {
  const int64_t count = l.count();
  int64_t length = l.S, stride = l.stride_s;  // one run per (n, c) plane ...
  if (l.S == 1) {                              // ... or the whole channel as one
    length = count;
    stride = l.stride_n;
  } else if (l.stride_n == l.S * l.stride_s) {
    length = count;
  }
  // Positions advance by addition: a division per run costs as much as a short plane.
  int64_t j = row_begin / length, i = row_begin % length;
  int64_t next_split = split == kNoSplit ? kNoSplit : (row_begin / split + 1) * split;
  int64_t offset = c * l.stride_c + j * l.stride_n;
  for (int64_t r = row_begin; r < row_end;) {
    const int64_t n = std::min({length - i, row_end - r, next_split - r});
    run(offset + i * stride, stride, n, r);
    r += n;
    i += n;
    if (i == length) {
      i = 0;
      offset += l.stride_n;
    }
    if (r == next_split) next_split += split;
  }
}

// Rows [row_begin, row_end) of a channels-innermost layout: calls row(r, offset of the
// row's channel 0).
template <typename Row>
LPNORM_INLINE void for_each_row(const Layout& l, int64_t row_begin, int64_t row_end, Row&& row) {
  int64_t n = row_begin / l.S, s = row_begin % l.S;
  for (int64_t r = row_begin; r < row_end; ++r) {
    row(r, n * l.stride_n + s * l.stride_s);
    if (++s == l.S) {
      s = 0;
      ++n;
    }
  }
}

// A channels-innermost element pass takes this many rows per step, so each vector of
// per-channel parameters is loaded once per step rather than once per row.
constexpr int kRowsPerStep = 4;

// Rows [row_begin, row_end) of a channels-innermost layout in steps of up to kRows rows that
// never cross a multiple of `split`: calls step(first row, offsets of the rows' channel 0,
// row count).
template <int kRows = kRowsPerStep, typename Step>
LPNORM_INLINE void for_each_row_step(const Layout& l, int64_t row_begin, int64_t row_end, int64_t split,
                                     Step&& step) {
  int64_t offsets[kRows];
  int count = 0;
  int64_t first = row_begin;
  int64_t next_split = split == kNoSplit ? kNoSplit : (row_begin / split + 1) * split;
  for_each_row(l, row_begin, row_end, [&](int64_t r, int64_t offset) {
    if (count == 0) first = r;
    offsets[count++] = offset;
    const bool boundary = r + 1 == next_split;
    if (boundary) next_split += split;
    if (count == kRows || boundary || r + 1 == row_end) {
      step(first, static_cast<const int64_t*>(offsets), count);
      count = 0;
    }
  });
}

// fn(count): a full step's row count as a compile-time constant (the row loop unrolls),
// a short step's as an int.
template <typename Fn>
LPNORM_INLINE void with_step_rows(int rows, Fn&& fn) {
  if (rows == kRowsPerStep) {
    fn(std::integral_constant<int, kRowsPerStep>{});
  } else {
    fn(rows);
  }
}

// Channel-major runs of one short plane each ((128,256,14,14): 392 bytes, the next plane of
// the channel 100 KB further) start a new stream every few vectors, too short for the
// hardware prefetcher: a run fetches the plane kPlanesAhead planes on.
constexpr int64_t kPlanesAhead = 4;
constexpr int64_t kShortRunBytes = 1024;

// kWrite: the lines are about to be written (fetched for ownership).
template <bool kWrite = false, typename T>
LPNORM_INLINE void prefetch_next_plane(const Layout& l, const T* run, int64_t stride, int64_t length) {
  const int64_t bytes = length * static_cast<int64_t>(sizeof(T));
  if (stride != 1 || length != l.S || bytes > kShortRunBytes) return;
  // Addresses only (a prefetch past the tensor is harmless; the pointer is never formed).
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(run) + kPlanesAhead * l.stride_n * sizeof(T);
  for (uintptr_t line = ahead & ~(kLineBytes - 1); line < ahead + bytes; line += kLineBytes) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), kWrite ? 1 : 0);
  }
}

// A channels-innermost reduction takes kBlockRows rows at a time, kChunkGroups vectors of
// channels at a time: fn(std::integral_constant<int, vectors in this chunk>,
// std::bool_constant<its last vector is the tile's short last one>).
constexpr int kBlockRows = 16;
constexpr int64_t kChunkGroups = 4;
template <typename Fn>
LPNORM_INLINE void with_chunk(int64_t vectors_left, bool short_tail, Fn&& fn) {
  auto with_short = [&](auto chunk) {
    if (short_tail && vectors_left == decltype(chunk)::value) return fn(chunk, std::true_type{});
    return fn(chunk, std::false_type{});
  };
  switch (vectors_left) {
    case 1: return with_short(std::integral_constant<int, 1>{});
    case 2: return with_short(std::integral_constant<int, 2>{});
    case 3: return with_short(std::integral_constant<int, 3>{});
    default: return with_short(std::integral_constant<int, 4>{});
  }
}

// fn(std::integral_constant<int, i>) for i in [0, N), unrolled.
template <typename Fn, int... I>
LPNORM_INLINE void unrolled(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
LPNORM_INLINE void unrolled(Fn&& fn) {
  unrolled(fn, std::make_integer_sequence<int, N>{});
}

// Tensors at least this big are read from memory, not from the caches (2 MiB L2 per core).
constexpr int64_t kBeyondCachesBytes = int64_t{4} << 20;

// Whether a channels-innermost pass takes its rows one by one, in memory order, loading the
// per-channel state of every vector (`state_vectors` per vector of channels: parameters,
// accumulators, means) from L1: for wide rows (more than one chunk of vectors) of a tensor
// beyond the caches, while that state stays within `max_state_bytes` (measured at the callers).
template <typename T>
bool walks_row_by_row(const Layout& l, int64_t groups, int64_t state_vectors, int64_t max_state_bytes) {
  const bool beyond_caches = l.count() * l.C * static_cast<int64_t>(sizeof(T)) >= kBeyondCachesBytes;
  return beyond_caches && groups > kChunkGroups && groups * state_vectors * kBytes <= max_state_bytes;
}

// out[i] += v[i] for every lane, in double, a vector at a time (lane by lane, the fold took a
// tenth of a 64-channel NHWC sum pass).
LPNORM_INLINE void add_widened(double* out, VD v) {
  VD sum;
  std::memcpy(&sum, out, sizeof sum);
  sum += v;
  std::memcpy(out, &sum, sizeof sum);
}
LPNORM_INLINE void add_widened(double* out, VF v) {
  typedef float HalfVF __attribute__((vector_size(kBytes / 2)));
  HalfVF half[2];
  std::memcpy(half, &v, sizeof v);
  add_widened(out, __builtin_convertvector(half[0], VD));
  add_widened(out + Simd<double>::W, __builtin_convertvector(half[1], VD));
}

// The fold of float lanes into double: every kFoldEvery vector steps, each lane has summed
// at most that many values in float.
constexpr int kFoldEvery = 64;

// ---------------------------------------------------------------------------------------
// The reductions: two sums per channel of a lane-wise op over x (and g)

struct SumOp {
  template <typename V>
  LPNORM_INLINE void operator()(V x, V, V, V& s0, V&) const {
    s0 += x;
  }
};

struct ShiftedSumsOp {  // around a pivot close to the mean, so the squares barely cancel
  template <typename V>
  LPNORM_INLINE void operator()(V x, V, V pivot, V& s0, V& s1) const {
    const V d = x - pivot;
    s0 += d;
    s1 += d * d;
  }
};

struct GradSumsOp {
  template <typename V>
  LPNORM_INLINE void operator()(V x, V g, V mean, V& s0, V& s1) const {
    s0 += g;
    s1 += g * (x - mean);
  }
};

// Lane-wise |d|^q and phi(d); `power` used by SignedPower only.
template <PhiKind kPhi, typename V, typename A>
LPNORM_INLINE void deviation_terms(V d, A power, V& magnitude_q, V& phi) {
  if constexpr (kPhi == PhiKind::Identity) {
    magnitude_q = d * d;
    phi = d;
  } else if constexpr (kPhi == PhiKind::Sign) {
    magnitude_q = vabs(d);
    phi = vsign(d);
  } else {
    const V magnitude = vabs(d);
    const V sign = vsign(d);
    for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(A)); ++i) {
      magnitude_q[i] = std::pow(magnitude[i], power);
      phi[i] = sign[i] * std::pow(magnitude[i], power - A(1));
    }
  }
}

template <PhiKind kPhi, typename A>
struct DeviationOp {
  A power;
  template <typename V>
  LPNORM_INLINE void operator()(V x, V, V mean, V& s0, V& s1) const {
    V q, phi;
    deviation_terms<kPhi>(x - mean, power, q, phi);
    s0 += q;
    s1 += phi;
  }
};

// Extreme lists of the stats pass behind a cheap filter: a vector is looked at lane by lane
// only when some lane beats the k-th largest or the k-th smallest value kept so far, which
// after the first few thousand elements is rare. Elements of one channel arrive in
// increasing flat order, so a value equal to the threshold never beats it.
struct NoExtremes {
  static constexpr bool kActive = false;
  int64_t split() const { return kNoSplit; }
};

template <typename A>
struct Extremes {
  static constexpr bool kActive = true;
  using V = typename Simd<A>::V;
  Candidate* largest;   // [C][chunks][per_end]
  Candidate* smallest;
  int64_t chunks, per_end, chunk_count;
  core::Deviation* picked = nullptr;  // StatsArgs::picked (null with chunks > 1)

  int64_t split() const { return chunks > 1 ? chunk_count : kNoSplit; }
  Candidate* lists(Candidate* base, int64_t c, int64_t flat) const {
    return base + (c * chunks + flat / chunk_count) * per_end;
  }
  // Largest values must beat hi, smallest must fall below lo (a run's lists: runs never cross
  // a chunk, so the lists are found once per run, without a division per offer).
  void thresholds(const Candidate* up_list, const Candidate* down_list, A& hi, A& lo) const {
    hi = static_cast<A>(up_list[per_end - 1].value);
    lo = static_cast<A>(-down_list[per_end - 1].value);
  }
  // Offers lane i of x (flat index flat + i) to the largest values for every bit of `up`, to
  // the smallest for every bit of `down`.
  void offer(V x, uint32_t up, uint32_t down, Candidate* up_list, Candidate* down_list, int64_t flat) const {
    for (; up != 0; up &= up - 1) {
      const int i = __builtin_ctz(up);
      core::offer_extreme(up_list, per_end, static_cast<double>(x[i]), flat + i);
    }
    for (; down != 0; down &= down - 1) {
      const int i = __builtin_ctz(down);
      core::offer_extreme(down_list, per_end, -static_cast<double>(x[i]), flat + i);
    }
  }
};

// Channel-major reduction of the tile into out0[c] / out1[c].
template <typename T, typename Op, typename Ext>
void reduce_channel_major(const Layout& l, const Tile& t, const T* x, const T* g, const double* mean, const Op& op,
                          const Ext& ext, double* out0, double* out1) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  for (int64_t c = t.c_begin; c < t.c_end; ++c) {
    const V m = splat<V>(static_cast<A>(mean != nullptr ? mean[c] : 0.0));
    V s0a{}, s0b{}, s1a{}, s1b{};
    double t0 = 0, t1 = 0;
    int steps = 0;
    auto fold = [&] {
      t0 += hsum(s0a + s0b);
      t1 += hsum(s1a + s1b);
      s0a = s0b = s1a = s1b = V{};
      steps = 0;
    };
    A hi = 0, lo = 0;
    // The walk's body always inlined: where GCC left it out of line (once this file grew), its
    // accumulators stayed in memory (bfloat16 NCHW deviation pass 2.3x slower).
    for_each_run(l, c, t.row_begin, t.row_end, ext.split(), [&](int64_t offset, int64_t stride, int64_t length,
                                                                int64_t flat) __attribute__((always_inline)) {
      const T* px = x + offset;
      const T* pg = g != nullptr ? g + offset : nullptr;
      Candidate *up_list = nullptr, *down_list = nullptr;
      if constexpr (Ext::kActive) {
        up_list = ext.lists(ext.largest, c, flat);
        down_list = ext.lists(ext.smallest, c, flat);
        ext.thresholds(up_list, down_list, hi, lo);
      }
      prefetch_next_plane(l, px, stride, length);
      auto check = [&](V v, int64_t first, uint32_t valid) {
        if constexpr (Ext::kActive) {
          const uint32_t up = bitmask(v > hi) & valid, down = bitmask(v < lo) & valid;
          if ((up | down) != 0) {
            ext.offer(v, up, down, up_list, down_list, first);
            ext.thresholds(up_list, down_list, hi, lo);
          }
        }
      };
      const uint32_t all = W == 32 ? ~0u : (1u << W) - 1u;
      int64_t i = 0;
      for (; i + 2 * W <= length; i += 2 * W) {
        const V x0 = load_run(px + i * stride, stride, W), x1 = load_run(px + (i + W) * stride, stride, W);
        V g0{}, g1{};
        if (pg != nullptr) {
          g0 = load_run(pg + i * stride, stride, W);
          g1 = load_run(pg + (i + W) * stride, stride, W);
        }
        op(x0, g0, m, s0a, s1a);
        op(x1, g1, m, s0b, s1b);
        check(x0, flat + i, all);
        check(x1, flat + i + W, all);
        if (++steps == kFoldEvery) fold();
      }
      for (; i < length; i += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, length - i));
        const V x0 = load_run(px + i * stride, stride, n);
        const V g0 = pg != nullptr ? load_run(pg + i * stride, stride, n) : V{};
        V q0{}, q1{};
        op(x0, g0, m, q0, q1);
        const auto valid = lanes_below<A>(n);
        s0a += valid ? q0 : V{};
        s1a += valid ? q1 : V{};
        check(x0, flat + i, n == W ? all : (1u << n) - 1u);
        if (++steps == kFoldEvery) fold();
      }
    });
    fold();
    out0[c] = t0;
    if (out1 != nullptr) out1[c] = t1;
  }
}

// Per-channel values of a channels-innermost tile as accumulation-type arrays, padded to
// whole vectors.
template <typename A>
std::vector<A> channel_values(const double* values, const Tile& t, int W, double fallback = 0.0) {
  const int64_t channels = t.c_end - t.c_begin;
  std::vector<A> out(static_cast<size_t>((channels + W - 1) / W * W), static_cast<A>(fallback));
  for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<A>(values != nullptr ? values[t.c_begin + c] : 0.0);
  return out;
}

// Extreme lists of a channels-innermost walk, one per vector lane (= channel), where a third
// of the elements may enter them (m = 256, k = 10): tracking rows in the lists cost a compare,
// four blends and a taken-or-not branch per level and made top-k 9x slower than l2 there.
//
// So the walk copies each vector that beats either end's running bound (a vector may be
// copied needlessly but never missed) into its group's buffer, and the lists are settled from
// the copies when they flush. The bound is kept by a branch-free network over all lanes,
// new[j] = max(old[j], min(old[j-1], x)), levels sorted largest first (the smallest values as
// -x, core's convention), in registers where k is small (compile-time level counts, the
// unused top levels +inf, which pass x through unchanged).
//
// Where k is small, the network takes the maximum of each block of a few copies, not every
// copy: its k-th value is then the k-th largest block maximum, a lower bound of the
// k-th largest copy (k blocks hold a value at or above it, all of earlier rows, so an element
// at or below it never enters: ties go to the lowest index, as core::offer_extreme). The
// flush puts each copy's lanes at or above the bound into per-lane slots, in row order
// (select_rows), and ranks the slots of all lanes at once. Where k is large the network takes
// every copy, so its k-th value is exact, and the flush places each row by counting the
// lane's values above it (find_rows_exact). The copies are sequential and in cache; the rows
// themselves may be 4 KiB apart ((N, C)) and evict each other from L1.
template <typename A>
struct LaneLists {
  using V = typename Simd<A>::V;
  using M = typename Simd<A>::Mask;
  using R = std::remove_reference_t<decltype(M{}[0])>;  // rows relative to `base`
  static constexpr int W = Simd<A>::W;
  static constexpr R kFree = -1;
  static constexpr int64_t kMaxSpan = int64_t{1} << 30;  // flushed before relative rows overflow
  // Copies per group before an early flush (which only costs a refill: lists of row ranges
  // merge exactly). A batch through the network is a few copies per level: the filter's
  // k-th values lag by a batch, and short lists (linf: one level) catch up fast.
  static constexpr int64_t kMaxCopies = 2048, kBatchPerLevel = 4;
  static constexpr int kMaxLevels = 16;  // in registers up to here, in memory above
  // Copies per network entry, at most, where the levels are in registers: a span of m rows
  // takes blocks of 4 where m / 4 >= kBlocksPerLevel * k, of 2 or 1 where it is shorter (the
  // k-th largest of too few block maxima is a loose bound: m = 64, k = 10, blocks of 4 leave
  // 13 candidates on average against 10). Slots per lane and end the flush ranks (more
  // candidates than that, mostly ties, take an exact scalar selection).
  static constexpr int64_t kMaxCopyBlock = 4, kBlocksPerLevel = 6;
  static constexpr int kSlots = 32;
  static constexpr A kLowest = -std::numeric_limits<A>::max();  // v >= it: v beats an unfilled -inf
  int64_t per_end = 0, levels = 0, base = 0, groups = 0, capacity = 0, stride = 0;
  int64_t copy_block = 1;  // copies per network entry
  bool dense = false;      // every vector is copied (see every_copy)
  bool full = false;
  std::vector<V> values;  // [group][end][levels], sorted largest first, the top levels - per_end +inf
  std::unique_ptr<V[]> copies;   // [group][stride]
  std::unique_ptr<R[]> copy_rows;  // the copies' rows, relative to `base` (not where dense: row_of)
  std::vector<int64_t> copied, inserted;  // per group
  std::vector<R> rows;  // [group][end][per_end][W], after find_rows, with the values found
  std::vector<A> found;
  std::vector<V> lane_values;  // [end][lane][vectors]: one group's lists, lane by lane
  std::vector<M> top_rows;     // [group][end], the rows of one-level lists
  std::vector<Candidate> merged;
  std::vector<R> kept_ids;  // [end][...]: select_rows' candidates, packed (copy * W + lane)
  std::vector<uint32_t> picked_lanes;  // [group]: the lanes pick_from_copies picked
  std::vector<A> slot_values;  // [kSlots + 1][W]: one end's candidates by lane, then the spill
  std::vector<R> slot_rows;
  // Set before the last flush where the lists need only cover the k largest |x - mean|
  // (StatsArgs::picked): the channels' means as core has them, [group][W].
  std::vector<double> exact_means;

  static int64_t levels_for(int64_t k) { return k == 1 ? 1 : k <= kMaxLevels ? (k + 1) / 2 * 2 : k; }
  // For a walk of `rows` rows, `group_count` vectors of channels wide.
  void start(int64_t group_count, int64_t k, int64_t rows, int64_t first_row) {
    groups = group_count;
    per_end = k;
    levels = levels_for(k);
    dense = rows <= kMaxCopies;
    if (levels > 1) {  // one level keeps its rows, no copies
      // A block of rows may run past the capacity before the walk looks at `full`.
      capacity = std::max<int64_t>(1, std::min(kMaxCopies, rows));
      stride = capacity + kBlockRows - 1;
      copies.reset(new V[static_cast<size_t>(groups * stride)]);
      if (!dense) copy_rows.reset(new R[static_cast<size_t>(groups * stride)]);
      copy_block = 1;
      while (levels <= kMaxLevels && copy_block < kMaxCopyBlock && rows >= 2 * copy_block * kBlocksPerLevel * k) {
        copy_block *= 2;
      }
    }
    values.resize(static_cast<size_t>(groups * 2 * levels));
    top_rows.resize(static_cast<size_t>(groups * 2));
    reset(first_row);
  }
  void reset(int64_t first_row) {
    base = first_row;
    full = false;
    for (int64_t l = 0; l < groups * 2; ++l) {
      for (int64_t j = 0; j < levels; ++j) {
        values[l * levels + j] = splat<V>((j < levels - per_end ? 1 : -1) * std::numeric_limits<A>::infinity());
      }
    }
    copied.assign(static_cast<size_t>(groups), 0);
    inserted.assign(static_cast<size_t>(groups), 0);
    exact_means.clear();
    picked_lanes.clear();
  }
  // The k largest |x - mean| need one network, not two, and fewer candidates than the two
  // ends' k largest values: a bound b on the k-th largest |x - mean| leaves the values with
  // |x - mean| at or above b, ranked by pick_from_copies. Only where the rows of every copy
  // since the last flush are the whole channel, before that flush, and the network keeps a
  // bound (select_rows).
  void cover_deviations(const double* sums, int64_t channels, int64_t count) {
    if (!dense || levels <= 1 || levels > kMaxLevels || count <= 0) return;
    exact_means.assign(static_cast<size_t>(groups * W), 0.0);
    for (int64_t c = 0; c < channels; ++c) exact_means[c] = sums[c] / static_cast<double>(count);  // core::channel_mean
  }
  bool by_deviation() const { return !exact_means.empty(); }
  // The means of `group` in the accumulation type.
  V lane_means(int64_t group) const {
    V mean;
    for (int i = 0; i < W; ++i) mean[i] = static_cast<A>(exact_means[group * W + i]);
    return mean;
  }

  // One-level lists (linf, range) keep their rows as cheaply as a copy: the walk holds a
  // group's two ends in registers for a block of rows (`Top`), and each row takes a compare and
  // two blends per end, no branch ((256, 1024) linf stats pass: a branch per row on whether
  // any lane beats mispredicted on a third of the rows).
  struct Top {
    V value[2];
    M row[2];
  };
  LPNORM_INLINE Top top(int64_t group) const {
    return {{values[group * 2], values[group * 2 + 1]}, {top_rows[group * 2], top_rows[group * 2 + 1]}};
  }
  LPNORM_INLINE void keep(int64_t group, const Top& t) {
    for (int end = 0; end < 2; ++end) {
      values[group * 2 + end] = t.value[end];
      top_rows[group * 2 + end] = t.row[end];
    }
  }
  LPNORM_INLINE void offer_top(Top& t, V x, int64_t r) const {
    const M row = splat<M>(static_cast<R>(r - base));
    for (int end = 0; end < 2; ++end) {
      const V v = end == 0 ? x : -x;
      const M beats = v > t.value[end];  // NaN never; an equal value of a later row never
      t.value[end] = beats ? v : t.value[end];
      t.row[end] = beats ? row : t.row[end];
    }
  }

  // The k-th values of `group`'s two ends, which a vector must beat to be copied: the walk
  // keeps them in registers and asks again after each copy (an insert may have raised them).
  struct Bounds {
    V up, down;
    // One test for both ends: after the first rows most vectors beat neither k-th value.
    LPNORM_INLINE bool beaten_by(V x) const { return bitmask((x > up) | (-x > down)) != 0; }
  };
  LPNORM_INLINE Bounds bounds(int64_t group) const {
    const V* up = values.data() + group * 2 * levels;
    return {up[levels - 1], up[2 * levels - 1]};
  }
  // x (row r) into `group`'s copies, where it beats bounds(group).
  LPNORM_INLINE void copy(int64_t group, V x, int64_t r) {
    int64_t& n = copied[group];
    copies[group * stride + n] = x;
    copy_rows[group * stride + n] = static_cast<R>(r - base);
    ++n;
    if (n - inserted[group] == kBatchPerLevel * levels) insert_copies(group);
    full |= n >= capacity;
  }
  // Spans of at most kMaxCopies rows (m = 256, k = 10: 3 in 4 vectors beat the bound) copy
  // every vector, without a test, a chunk's vectors one at a time over the block's rows
  // ((256, 1024) topk forward 10% faster: the test and the lists' state in memory, row by row,
  // cost more than the network saved). Long spans keep the test (NHWC (32,64,56,56): their
  // stats pass was 10-20% slower storing every vector). every_copy: where row r of `group`
  // goes (copy r - base, so its row needs no record: row_of).
  LPNORM_INLINE V* every_copy(int64_t group, int64_t r) { return copies.get() + group * stride + (r - base); }
  LPNORM_INLINE void copied_every(int64_t group, int64_t r_end) { copied[group] = r_end - base; }
  // The row (relative to base) of copy e of `group`.
  LPNORM_INLINE R row_of(int64_t group, int64_t e) const {
    return dense ? static_cast<R>(e) : copy_rows[group * stride + e];
  }

  // The copies of `group` not yet in its lists go through the network.
  void insert_copies(int64_t group) {
    with_levels([&](auto k) { insert_copies<decltype(k)::value>(group); });
  }
  template <int K>
  void insert_copies(int64_t group) {
    const V* x = copies.get() + group * stride;
    const int64_t block = K > 0 ? copy_block : 1;  // see the comment above LaneLists
    const bool deviations = by_deviation();  // one network, of |x - mean|
    const V mean = deviations ? lane_means(group) : V{};
    for (int end = 0; end < (deviations ? 1 : 2); ++end) {
      V* value = values.data() + (group * 2 + end) * levels;
      const A sign = end == 0 ? A(1) : A(-1);
      auto entry = [&](int64_t e) { return deviations ? vabs(x[e] - mean) : x[e] * sign; };
      // The block's maximum, NaN skipped (it never enters the lists).
      auto block_max = [&](int64_t e) {
        V m = entry(e);
        for (int64_t b = 1; b < block && e + b < copied[group]; ++b) {
          const V v = entry(e + b);
          m = v > m ? v : m;
          m = m == m ? m : v;
        }
        return m;
      };
      if constexpr (K > 0) {
        V level[K];
        for (int j = 0; j < K; ++j) level[j] = value[j];
        for (int64_t e = inserted[group]; e < copied[group]; e += block) insert<K>(level, K, block_max(e));
        for (int j = 0; j < K; ++j) value[j] = level[j];
      } else {
        for (int64_t e = inserted[group]; e < copied[group]; ++e) insert<K>(value, levels, x[e] * sign);
      }
    }
    inserted[group] = copied[group];
  }
  // Every level from the old list: no chain from level to level, no branch.
  template <int K>
  static LPNORM_INLINE void insert(V* value, int64_t count, V x) {
    V above = value[0];
    value[0] = x > above ? x : above;  // NaN never enters
#pragma GCC unroll 16
    for (int64_t j = 1; j < (K > 0 ? K : count); ++j) {
      const V old = value[j];
      const V down = above < x ? above : x;  // min(old[j-1], x), NaN when x is
      value[j] = down > old ? down : old;
      above = old;
    }
  }
  // fn(std::integral_constant<int, levels>), or with 0 where the levels stay in memory
  // (one level never gets here: it keeps its rows).
  template <typename Fn>
  void with_levels(Fn&& fn) const {
    switch (levels) {
      case 2: return fn(std::integral_constant<int, 2>{});
      case 4: return fn(std::integral_constant<int, 4>{});
      case 6: return fn(std::integral_constant<int, 6>{});
      case 8: return fn(std::integral_constant<int, 8>{});
      case 10: return fn(std::integral_constant<int, 10>{});
      case 12: return fn(std::integral_constant<int, 12>{});
      case 14: return fn(std::integral_constant<int, 14>{});
      case 16: return fn(std::integral_constant<int, 16>{});
      default: return fn(std::integral_constant<int, 0>{});
    }
  }

  // Lane i's index i, a vector: a copy's candidates are packed as ids copy * W + lane.
  static M lane_ids() {
    M id;
    for (int i = 0; i < W; ++i) id[i] = static_cast<R>(i);
    return id;
  }
  // Deals group gi's candidates kept[0, count) (ids copy * W + lane, in row order) to the
  // per-lane slots, each value times `sign`: lane i's s-th candidate to slot s, slot kSlots
  // taking every one past capacity. taken[i]: lane i's candidates.
  LPNORM_INLINE void deal_to_slots(int64_t gi, const R* kept, int64_t count, A sign, int* taken) {
    const A* copy_value = reinterpret_cast<const A*>(copies.get() + gi * stride);  // lane of copy e at e * W + lane
    std::fill(taken, taken + W, 0);
    for (int64_t q = 0; q < count; ++q) {
      const auto id = static_cast<size_t>(kept[q]);  // unsigned: / and % by W are shifts
      const size_t lane = id % W;
      const size_t at = static_cast<size_t>(std::min(taken[lane]++, kSlots)) * W + lane;
      slot_values[at] = sign * copy_value[id];
      slot_rows[at] = row_of(gi, static_cast<int64_t>(id / W));
    }
  }

  // The rows of the lists: one-level lists kept them; longer ones are settled from the copies.
  // Where the lists need only the largest |x - mean| (by_deviation), the lanes' picks go to
  // picks ([lane][per_end], the walk's channel 0 first) instead, where that is exact.
  void find_rows(int tail, core::Deviation* picks) {
    if (levels == 1) {
      rows.resize(static_cast<size_t>(groups * 2 * W));
      found.resize(rows.size());
      for (size_t l = 0; l < static_cast<size_t>(groups * 2); ++l) {
        for (int i = 0; i < W; ++i) {
          rows[l * W + i] = values[l][i] > -std::numeric_limits<A>::infinity() ? top_rows[l][i] : kFree;
          found[l * W + i] = values[l][i];
        }
      }
      return;
    }
    with_levels([&](auto k) {
      if constexpr (decltype(k)::value > 0) {
        select_rows<decltype(k)::value>(tail, picks);
      } else {
        find_rows_exact(tail);
      }
    });
  }

  // The lists from the copies where the network kept a bound: each end's lanes at or above
  // its bound are packed, in row order, into one list of ids per end (branch-free: a loop over
  // the lanes of each copy mispredicted its exit on nearly every one), then dealt to per-lane
  // slots; each slot's place is counted against the other slots of its lane, all lanes at once.
  template <int K>
  void select_rows(int tail, core::Deviation* picks) {
    constexpr int S = kSlots;
    const int64_t ids_capacity = (stride + 1) * W;  // every lane of every copy, and a vector of room
    rows.assign(static_cast<size_t>(groups * 2 * per_end * W), kFree);
    found.resize(rows.size());
    kept_ids.resize(static_cast<size_t>(2 * ids_capacity));
    slot_values.resize(static_cast<size_t>((S + 1) * W));
    slot_rows.resize(slot_values.size());
    picked_lanes.assign(static_cast<size_t>(groups), 0);
    for (int64_t gi = 0; gi < groups; ++gi) {
      insert_copies(gi);
      const M valid = gi + 1 < groups ? ~M{} : lanes_below<A>(tail);
      if (by_deviation() && picks != nullptr) {
        pick_from_copies(gi, valid, picks + gi * W * per_end);
        continue;
      }
      V bound[2];
      for (int end = 0; end < 2; ++end) {
        const V last = values[(gi * 2 + end) * levels + levels - 1];
        bound[end] = last > kLowest ? last : splat<V>(kLowest);
      }
      const V* x = copies.get() + gi * stride;
      R* kept[2] = {kept_ids.data(), kept_ids.data() + ids_capacity};
      int64_t kept_count[2] = {0, 0};
      // -x >= bound as x <= -bound; the lanes' mask as bits (one instruction per compare).
      const V upper = bound[0], lower = -bound[1];
      const uint32_t lanes = bitmask(valid);
      M id = lane_ids();
      const M step = splat<M>(static_cast<R>(W));
      for (int64_t e = 0, count = copied[gi]; e < count; ++e, id += step) {
        const V v = x[e];
        kept_count[0] += compress(id, bitmask(v >= upper) & lanes, kept[0] + kept_count[0]);
        kept_count[1] += compress(id, bitmask(v <= lower) & lanes, kept[1] + kept_count[1]);
      }
      for (int end = 0; end < 2; ++end) {
        int taken[W];
        deal_to_slots(gi, kept[end], kept_count[end], end == 0 ? A(1) : A(-1), taken);
        M count, overflow;
        int most = 0;
        for (int i = 0; i < W; ++i) {
          count[i] = static_cast<R>(std::min(taken[i], S));
          overflow[i] = taken[i] > S ? -1 : 0;
          most = std::max(most, static_cast<int>(count[i]));
        }
        V value[S];
        M row[S], place[S];
        for (int s = 0; s < most; ++s) {
          std::memcpy(&value[s], slot_values.data() + s * W, sizeof(V));
          std::memcpy(&row[s], slot_rows.data() + s * W, sizeof(M));
        }
        // A slot's place: the slots of its lane before it in (value descending, row ascending);
        // -1 for an empty slot and a lane that overflowed.
        M filled[S];
        for (int s = 0; s < most; ++s) filled[s] = (s < count) & ~overflow;
        for (int s = 0; s < most; ++s) {
          M before{};
          for (int t = 0; t < s; ++t) before -= value[t] >= value[s] & filled[t];
          for (int t = s + 1; t < most; ++t) before -= value[t] > value[s] & filled[t];
          place[s] = filled[s] ? before : splat<M>(-1);
        }
        R* out_row = rows.data() + (gi * 2 + end) * per_end * W;
        A* out_value = found.data() + (gi * 2 + end) * per_end * W;
        for (int64_t j = 0; j < per_end; ++j) {
          M r = splat<M>(kFree);
          V f{};
          for (int s = 0; s < most; ++s) {
            const M take = place[s] == static_cast<R>(j);
            r = take ? row[s] : r;
            f = take ? value[s] : f;
          }
          std::memcpy(out_row + j * W, &r, sizeof r);
          std::memcpy(out_value + j * W, &f, sizeof f);
        }
        for (int i = 0; i < W; ++i) {
          if (overflow[i] != 0) select_lane_exact(gi, end, i, bound[end][i]);
        }
      }
    }
  }

  // Lane i of `end` of group gi from its copies, one by one: where more than kSlots values
  // reach the bound (ties, mostly: a constant channel).
  void select_lane_exact(int64_t gi, int end, int i, A bound) {
    merged.assign(static_cast<size_t>(per_end), Candidate{});
    core::reset_extremes(merged.data(), per_end);
    const V* x = copies.get() + gi * stride;
    for (int64_t e = 0; e < copied[gi]; ++e) {
      const A v = end == 0 ? x[e][i] : -x[e][i];
      if (v >= bound) core::offer_extreme(merged.data(), per_end, static_cast<double>(v), row_of(gi, e));
    }
    for (int64_t j = 0; j < per_end; ++j) {
      const size_t at = static_cast<size_t>(((gi * 2 + end) * per_end + j) * W + i);
      const bool filled = merged[j].index != core::kNoIndex;
      rows[at] = filled ? static_cast<R>(merged[j].index) : kFree;
      found[at] = static_cast<A>(merged[j].value);
    }
  }

  // Where the network kept every copy (k > kMaxLevels), so its k-th values are exact. Rows of
  // the final values, from the copies in row order: lane i goes to the first free slot
  // of its value (the slots past those of larger values), a value equal to the k-th only while
  // such slots are left; it brings its own bits (the network may swap -0 and +0). The slot is
  // counted against the lane's own values, gathered into whole vectors (`lane_values`), so a
  // copy without hits costs two compares; both ends share one pass and one branch per copy.
  // Vectors are only read and written whole, the rows and found values only lane by lane: a
  // vector load of what a lane store just wrote waits for the store to retire.
  void find_rows_exact(int tail) {
    const int64_t per_lane = (per_end + W - 1) / W;  // vectors of a lane's values
    rows.assign(static_cast<size_t>(groups * 2 * per_end * W), kFree);
    found.resize(rows.size());
    lane_values.resize(static_cast<size_t>(2 * W * per_lane));
    for (int64_t gi = 0; gi < groups; ++gi) {
      insert_copies(gi);
      const M valid = gi + 1 < groups ? ~M{} : lanes_below<A>(tail);
      V kth[2];
      M ties_left[2];  // slots of values equal to the k-th, still free
      for (int end = 0; end < 2; ++end) {
        const V* list = values.data() + (gi * 2 + end) * levels + (levels - per_end);
        const V last = list[per_end - 1];
        kth[end] = last > kLowest ? last : splat<V>(kLowest);
        ties_left[end] = M{};
        A* lane = reinterpret_cast<A*>(lane_values.data() + end * W * per_lane);
        std::fill(lane, lane + W * per_lane * W, -std::numeric_limits<A>::infinity());
        for (int64_t j = 0; j < per_end; ++j) {
          ties_left[end] -= list[j] == last & last > kLowest;
          for (int i = 0; i < W; ++i) lane[(i * per_lane) * W + j] = list[j][i];
        }
      }
      const V* x = copies.get() + gi * stride;
      for (int64_t e = 0; e < copied[gi]; ++e) {
        const V v[2] = {x[e], -x[e]};
        if (bitmask(v[0] >= kth[0] | v[1] >= kth[1]) == 0) continue;  // most copies of long channels
        uint32_t hits = 0;
        for (int end = 0; end < 2; ++end) {
          const M tie = v[end] == kth[end] & ties_left[end] > 0;
          const M take = (v[end] > kth[end] | tie) & valid;
          ties_left[end] += tie & take;  // -1 where a tie was taken
          hits |= bitmask(take) << (end * W);
        }
        for (; hits != 0; hits &= hits - 1) {
          const int b = __builtin_ctz(hits), end = b / W, i = b % W;
          const A value = v[end][i];
          const V* lane = lane_values.data() + (end * W + i) * per_lane;
          int64_t j = 0;  // values above this one
          for (int64_t q = 0; q < per_lane; ++q) j += __builtin_popcount(bitmask(lane[q] > value));
          R* row = rows.data() + ((gi * 2 + end) * per_end) * W + i;
          while (row[j * W] != kFree) ++j;  // equal values of earlier rows
          row[j * W] = row_of(gi, e);
          found[static_cast<size_t>(row - rows.data()) + j * W] = value;
        }
      }
    }
  }

  // Where the lists need only the k largest |x - mean| of whole channels (cover_deviations):
  // group gi's picks straight from its copies, all lanes at once. The copies at or above the
  // network's bound b on |x - mean|, less a margin far above the rounding of |x - mean| in A
  // (a few ulps of |b| + |mean|), are dealt to per-lane slots in row order and ranked in core's
  // order (|x - mean| in double descending, ties to the lower row). That is core's pick of the
  // two ends' lists wherever an end's order (value descending, ties to the lower row) is the
  // |x - mean| order; a lane where it may not be (below), with too many candidates or a bound
  // that is not finite (NaN, inf) gets both ends' full lists instead (select_lane_exact), for
  // core's pick.
  // (One list instead of two ends' lists merged afterwards: (256, 1024) topk forward, 1 thread,
  // 339-355 -> 277-281 us.)
  void pick_from_copies(int64_t gi, M valid, core::Deviation* picks) {
    constexpr int S = kSlots;
    constexpr int D = Simd<double>::W;
    typedef A Lanes __attribute__((vector_size(D * sizeof(A))));  // D lanes, widened to double
    typedef R LaneRows __attribute__((vector_size(D * sizeof(R))));
    const int64_t P = per_end;
    const V mean = lane_means(gi), b = values[gi * 2 * levels + levels - 1];
    const V margin = (vabs(b) + vabs(mean)) * A(1.0 / (1 << 19));
    const uint32_t lanes = bitmask(valid);
    const uint32_t finite = bitmask(margin < std::numeric_limits<A>::infinity()) & lanes;  // NaN and -inf not
    const V near = b - margin;
    const V* x = copies.get() + gi * stride;
    R* kept = kept_ids.data();
    int64_t kept_count = 0;
    M id = lane_ids();
    const M step = splat<M>(static_cast<R>(W));
    for (int64_t e = 0, count = copied[gi]; e < count; ++e, id += step) {
      kept_count += compress(id, bitmask(vabs(x[e] - mean) >= near) & finite, kept + kept_count);
    }
    int taken[W];
    deal_to_slots(gi, kept, kept_count, A(1), taken);
    uint32_t pickable = finite;
    int most = 0;
    for (int i = 0; i < W; ++i) {
      if (taken[i] > S || taken[i] < P) pickable &= ~(1u << i);
      most = std::max(most, std::min(taken[i], S));
    }
    for (int h = 0; h * D < W; ++h) {  // D lanes at a time, in double
      VD lane_mean;
      std::memcpy(&lane_mean, exact_means.data() + gi * W + h * D, sizeof lane_mean);
      VI64 count;
      for (int l = 0; l < D; ++l) count[l] = taken[h * D + l];
      VD value[S], diff[S], key[S];
      VI64 row[S], filled[S];
      for (int s = 0; s < most; ++s) {
        Lanes narrow;
        LaneRows narrow_row;
        std::memcpy(&narrow, slot_values.data() + s * W + h * D, sizeof narrow);
        std::memcpy(&narrow_row, slot_rows.data() + s * W + h * D, sizeof narrow_row);
        value[s] = __builtin_convertvector(narrow, VD);
        row[s] = __builtin_convertvector(narrow_row, VI64) + base;
        diff[s] = value[s] - lane_mean;
        key[s] = vabs(diff[s]);
        filled[s] = s < count;
      }
      // A slot's place: the filled slots of its lane before it (larger key, or an equal key
      // in an earlier row); places from P on go to one spare entry per lane. Equal keys are
      // core's order too where they are equal values (an end's list orders them by row) or
      // mean +- d; `collapsed`: two values whose x - mean rounds to one double (1e-30 and
      // 2e-30 around a mean of 1), which core's lists would order by value.
      VI64 collapsed{}, place[S];
      for (int s = 0; s < most; ++s) {
        VI64 before{};
        for (int t = 0; t < s; ++t) {
          before -= key[t] >= key[s] & filled[t];
          collapsed |= diff[t] == diff[s] & value[t] != value[s] & filled[t] & filled[s];
        }
        for (int t = s + 1; t < most; ++t) before -= key[t] > key[s] & filled[t];
        place[s] = before;
      }
      // Straight into picks, lane by lane: a staging copy read back whole waited on its
      // scalar stores.
      const uint32_t ok = (pickable >> (h * D)) & ~bitmask(collapsed) & ((1u << D) - 1);
      for (uint32_t bits = ok; bits != 0; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        core::Deviation* out = picks + (h * D + l) * P;
        for (int s = 0; s < count[l]; ++s) {
          if (place[s][l] < P) out[place[s][l]] = {value[s][l], row[s][l], key[s][l]};
        }
      }
      picked_lanes[gi] |= ok << (h * D);
    }
    for (uint32_t bits = lanes & ~picked_lanes[gi]; bits != 0; bits &= bits - 1) {
      for (int end = 0; end < 2; ++end) select_lane_exact(gi, end, __builtin_ctz(bits), kLowest);
    }
  }
  // The lanes of `group` that pick_from_copies picked.
  uint32_t picked(int64_t group) const { return picked_lanes.empty() ? 0 : picked_lanes[group]; }

  // Hands lanes [0, n) of `group` (channels c0 ...) to the tile's Candidate lists. All of a
  // lane's entries go to one chunk's list, already in core's order (largest first, equal
  // values by row). A list still empty (the usual case: one flush per chunk and tile) takes
  // them as they are; one filled by an earlier flush of the chunk is merged with them in
  // O(k) (offering them one by one cost O(k^2), seconds for k ~ m ~ 10^4).
  // Lanes whose largest |x - mean| pick_from_copies picked are not handed over.
  template <typename Ext>
  void flush(const Ext& ext, int64_t group, int64_t c0, int n) {
    const uint32_t picked_here = picked(group);
    merged.resize(static_cast<size_t>(per_end));
    for (int end = 0; end < 2; ++end) {
      const size_t at = static_cast<size_t>((group * 2 + end) * per_end);
      for (int i = 0; i < n; ++i) {
        if ((picked_here >> i & 1) != 0) continue;
        auto entry = [&](int64_t j) {
          return Candidate{static_cast<double>(found[(at + j) * W + i]), base + rows[(at + j) * W + i]};
        };
        int64_t count = 0;
        while (count < per_end && rows[(at + count) * W + i] != kFree) ++count;
        if (count == 0) continue;
        Candidate* list = ext.lists(end == 0 ? ext.largest : ext.smallest, c0 + i, entry(0).index);
        if (list[0].index == core::kNoIndex) {
          for (int64_t j = 0; j < count; ++j) list[j] = entry(j);
          continue;
        }
        for (int64_t out = 0, old = 0, j = 0; out < per_end; ++out) {
          const bool take = j < count && core::candidate_beats(entry(j).value, entry(j).index, list[old]);
          merged[out] = take ? entry(j++) : list[old++];
        }
        std::copy(merged.begin(), merged.end(), list);
      }
    }
  }
};

// Channels-innermost reduction: rows of contiguous channels, a block of kBlockRows rows a few
// vectors of channels at a time, float lanes folded into double every kFoldEvery rows.
template <typename T, typename Op, typename Ext>
void reduce_channels_innermost(const Layout& l, const Parts& parts, const T* x, const T* g, const double* mean,
                               const Op& op, const Ext& ext, double* out0, double* out1) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  const Tile t = parts.whole();
  const int64_t channels = t.c_end - t.c_begin;
  const int64_t groups = (channels + W - 1) / W;
  const int tail = static_cast<int>(channels - (groups - 1) * W);
  const std::vector<A> means = channel_values<A>(mean, t, W);
  std::vector<V> s0(static_cast<size_t>(groups)), s1(static_cast<size_t>(groups));
  // Lanes past the tile's channels (of the last vector) sum zeros.
  std::vector<double> t0(static_cast<size_t>(groups * W)), t1(static_cast<size_t>(groups * W));
  LaneLists<A> lists;
  auto fold = [&] {
    for (int64_t gi = 0; gi < groups; ++gi) {
      add_widened(t0.data() + gi * W, s0[gi]);
      add_widened(t1.data() + gi * W, s1[gi]);
      s0[gi] = s1[gi] = V{};
    }
  };
  auto flush = [&](int64_t next_row) {  // lists to the Candidates, restart at next_row
    if constexpr (Ext::kActive) {
      // The last flush of a whole channel, where the caller needs only the largest |x - mean|
      // (t0: the sums of one part, all of the channel).
      if (ext.picked != nullptr && parts.count == 1 && next_row == t.row_end && lists.base == 0 &&
          t.row_end == l.count()) {
        lists.cover_deviations(t0.data(), channels, l.count());
      }
      lists.find_rows(tail, ext.picked != nullptr ? ext.picked + t.c_begin * ext.per_end : nullptr);
      for (int64_t gi = 0; gi < groups; ++gi) {
        lists.flush(ext, gi, t.c_begin + gi * W, gi + 1 < groups ? W : tail);
      }
      lists.reset(next_row);
    }
  };
  auto mean_of = [&](int64_t gi) {
    V m;
    std::memcpy(&m, means.data() + gi * W, sizeof m);
    return m;
  };
  // The row at `offset`, channel vector gi (n channels of it; lanes past them compute on
  // zeros, never folded), into the accumulators a0, a1.
  auto visit = [&](int64_t offset, int64_t gi, int n, V m, V& a0, V& a1, auto&& offer) {
    const T* px = x + offset + t.c_begin + gi * W;
    const V xv = n == W ? Io<T>::load(px) : load_first(px, n);
    V gv{};
    if (g != nullptr) {
      const T* pg = g + offset + t.c_begin + gi * W;
      gv = n == W ? Io<T>::load(pg) : load_first(pg, n);
    }
    op(xv, gv, m, a0, a1);
    offer(xv);
  };
  int steps = 0;  // rows summed in float since the last fold
  if constexpr (Ext::kActive) lists.start(groups, ext.per_end, t.row_end - t.row_begin, t.row_begin);
  const int64_t split = ext.split();
  // The rows of one part, each part's sums walked as if it were the only one.
  auto walk_part = [&](int64_t row_begin, int64_t row_end) {
    // Wide rows of a tensor far bigger than the caches row by row, in memory order, the
    // accumulators and means in L1: (32, C, H, W) channels-last float32, ~25 MB, 1 thread, the
    // sum pass took 1.9-2.5x torch's x.sum() in blocks and chunks, this 1.3-1.5x at C = 128-256
    // (the l1 deviation pass 3.0-3.6x -> 1.4-2.3x); at C = 512 neither order won, so at most
    // 4 KiB of the two accumulators and the mean.
    if (!Ext::kActive && walks_row_by_row<T>(l, groups, 3, 4 << 10)) {
      for_each_row(l, row_begin, row_end, [&](int64_t, int64_t offset) {
        if (++steps > kFoldEvery) {
          fold();
          steps = 1;
        }
        for (int64_t gi = 0; gi < groups; ++gi) {
          visit(offset, gi, gi + 1 < groups ? W : tail, mean_of(gi), s0[gi], s1[gi], [](V) {});
        }
      });
    } else {
      // A block of rows is taken a few vectors of channels at a time, over all its rows, the
      // accumulators, means and one-level lists of those vectors in registers. (One accumulator
      // per vector carried from step to step through memory, every vector of a 4-row step at a
      // time, left the 25 MB NHWC sum pass at C = 64 1.3-1.4x the time of torch's x.sum() and
      // its l1 deviation pass 1.2-1.4x; now 1.0-1.1x. The topk stats pass of the same tensor:
      // 2.8-3.5 -> 2.4-2.8x.)
      for_each_row_step<kBlockRows>(l, row_begin, row_end, split, [&](int64_t r0, const int64_t* offsets, int rows) {
        if constexpr (Ext::kActive) {
          // The lists restart where a chunk starts and before their relative rows would overflow.
          if ((split != kNoSplit && r0 % split == 0 && r0 != lists.base) ||
              r0 + rows - lists.base > LaneLists<A>::kMaxSpan) {
            flush(r0);
          }
        }
        if (steps + rows > kFoldEvery) {
          fold();
          steps = 0;
        }
        for (int64_t g0 = 0; g0 < groups; g0 += kChunkGroups) {
          with_chunk(groups - g0, tail != W, [&](auto chunk, auto short_last) {
            // (GCC keeps an array on the stack where a loop variable indexes it: the loops over
            // vectors are unrolled in the source.)
            constexpr int G = decltype(chunk)::value;
            auto lanes = [&](int gi) { return decltype(short_last)::value && gi == G - 1 ? tail : W; };
            V a0[G] = {}, a1[G] = {}, m[G];
            unrolled<G>([&](auto gi) { m[gi] = mean_of(g0 + gi); });
            // The block's rows in order, each vector of the chunk handed to offer(gi, q, vector).
            auto each_row = [&](auto&& offer) {
              for (int q = 0; q < rows; ++q) {
                unrolled<G>([&](auto gi) {
                  visit(offsets[q], g0 + gi, lanes(gi), m[gi], a0[gi], a1[gi], [&](V xv) { offer(gi, q, xv); });
                });
              }
            };
            // The same, vector by vector: copies written one group's at a time ((256, 1024) topk
            // forward 1 thread: 425 us in row order, 344 in this; a linf NHWC forward took 1.6x
            // as long in this order as in row order).
            auto each_vector = [&](auto&& offer) {
              unrolled<G>([&](auto gi) {
                for (int q = 0; q < rows; ++q) {
                  visit(offsets[q], g0 + gi, lanes(gi), m[gi], a0[gi], a1[gi], [&](V xv) { offer(gi, q, xv); });
                }
              });
            };
            if constexpr (!Ext::kActive) {
              each_row([](int, int, V) {});
            } else if (lists.levels == 1) {  // the lists' two ends in registers too
              typename LaneLists<A>::Top top[G];
              unrolled<G>([&](auto gi) { top[gi] = lists.top(g0 + gi); });
              each_row([&](int gi, int q, V xv) { lists.offer_top(top[gi], xv, r0 + q); });
              unrolled<G>([&](auto gi) { lists.keep(g0 + gi, top[gi]); });
            } else if (lists.dense) {  // every vector copied
              V* copy[G];
              unrolled<G>([&](auto gi) { copy[gi] = lists.every_copy(g0 + gi, r0); });
              each_vector([&](int gi, int q, V xv) { copy[gi][q] = xv; });
              unrolled<G>([&](auto gi) { lists.copied_every(g0 + gi, r0 + rows); });
            } else {
              typename LaneLists<A>::Bounds bounds[G];
              unrolled<G>([&](auto gi) { bounds[gi] = lists.bounds(g0 + gi); });
              each_row([&](auto gi, int q, V xv) {
                if (!bounds[gi].beaten_by(xv)) return;
                lists.copy(g0 + gi, xv, r0 + q);
                bounds[gi] = lists.bounds(g0 + gi);
              });
            }
            unrolled<G>([&](auto gi) {
              s0[g0 + gi] += a0[gi];
              s1[g0 + gi] += a1[gi];
            });
          });
        }
        steps += rows;
        if constexpr (Ext::kActive) {
          if (lists.full) flush(r0 + rows);
        }
      });
    }
  };
  for (int64_t j = 0; j < parts.count; ++j) {
    walk_part(parts.tiles[j].row_begin, parts.tiles[j].row_end);
    fold();
    steps = 0;
    if (j + 1 == parts.count) flush(t.row_end);
    for (int64_t c = 0; c < channels; ++c) {
      out0[j * l.C + t.c_begin + c] = t0[c];
      if (out1 != nullptr) out1[j * l.C + t.c_begin + c] = t1[c];
      t0[c] = t1[c] = 0;
    }
  }
}

template <typename T, typename Op, typename Ext>
void reduce(const Layout& l, const Tile& t, const void* x, const void* g, const double* mean, const Op& op,
            const Ext& ext, double* out0, double* out1) {
  const T* px = static_cast<const T*>(x);
  const T* pg = static_cast<const T*>(g);
  if (walk(l) == Walk::ChannelsInnermost) {
    reduce_channels_innermost(l, Parts{&t, 1}, px, pg, mean, op, ext, out0, out1);
  } else {
    reduce_channel_major(l, t, px, pg, mean, op, ext, out0, out1);
  }
}

// The same over row parts whose sums stay apart (Kernels::collect_stats). Channel-major lists
// live in the Candidates (ext's, part 0's for every part), so they go on from part to part by
// themselves: each part is walked alone.
template <typename T, typename Op, typename Ext>
void reduce_parts(const Layout& l, const Parts& parts, const void* x, const double* mean, const Op& op,
                  const Ext& ext, double* out0, double* out1) {
  const T* px = static_cast<const T*>(x);
  const T* no_grad = nullptr;
  if (walk(l) == Walk::ChannelsInnermost) {  // (one call site per instantiation: GCC inlines it)
    reduce_channels_innermost(l, parts, px, no_grad, mean, op, ext, out0, out1);
    return;
  }
  for (int64_t j = 0; j < parts.count; ++j) {
    double* part1 = out1 != nullptr ? out1 + j * l.C : nullptr;
    reduce_channel_major(l, parts.tiles[j], px, no_grad, mean, op, ext, out0 + j * l.C, part1);
  }
}

// ---------------------------------------------------------------------------------------
// The element-wise passes: out = op(x, g, four per-channel parameters)

struct AffineOp {  // (x - mean) * scale + bias: no cancellation when |mean| >> sigma
  template <typename V>
  LPNORM_INLINE V operator()(V x, V, const V* k) const {
    return (x - k[0]) * k[1] + k[2];
  }
};

template <PhiKind kPhi, typename A>
struct GradApplyOp {  // scale_g * g + scale_phi * phi(x - mean) + offset
  A power;
  template <typename V>
  LPNORM_INLINE V operator()(V x, V g, const V* k) const {
    if constexpr (kPhi == PhiKind::None) {
      return g * k[1] + k[3];
    } else {
      V q, phi;
      deviation_terms<kPhi>(x - k[0], power, q, phi);
      (void)q;
      return g * k[1] + phi * k[2] + k[3];
    }
  }
};

// params(c, j): the j-th of the four per-channel parameters of channel c.
template <typename T, typename Op, typename Params>
void map_channel_major(const Layout& l, const Tile& t, const T* x, const T* g, T* out, const Params& params,
                       const Op& op, bool stream) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  // A tile of several channels goes plane by plane in memory order (n outer, then c, as NCHW
  // lies); one channel's planes are C planes apart, and short ones wait on memory one by one
  // ((128,256,14,14) float32 evaluation: 2.7x torch channel by channel).
  const bool memory_order = t.c_end - t.c_begin > 1 && l.S > 1 && t.row_end - t.row_begin > l.S;
  auto channel_rows = [&](int64_t c, int64_t row_begin, int64_t row_end) {
    V k[4];
    for (int j = 0; j < 4; ++j) k[j] = splat<V>(static_cast<A>(params(c, j)));
    for_each_run(l, c, row_begin, row_end, kNoSplit, [&](int64_t offset, int64_t stride, int64_t length, int64_t) {
      const T* px = x + offset;
      const T* pg = g != nullptr ? g + offset : nullptr;
      T* po = out + offset;
      if (!memory_order) {
        prefetch_next_plane(l, px, stride, length);
        if (pg != nullptr) prefetch_next_plane(l, pg, stride, length);
        prefetch_next_plane<true>(l, po, stride, length);
      }
      // Elements [begin, end) of the run: whole vectors (streamed or not), then a partial one.
      // Inlined by force: with three callers GCC kept it out of line once this file grew, and
      // (64,32,32,32) bfloat16 l2 fwd+bwd at 2 threads went from 0.82 to 1.04-1.30x torch.
      auto span = [&](auto streamed, int64_t begin, int64_t end) __attribute__((always_inline)) {
        int64_t i = begin;
        for (; i + W <= end; i += W) {
          const V gv = pg != nullptr ? load_run(pg + i * stride, stride, W) : V{};
          const V v = op(load_run(px + i * stride, stride, W), gv, k);
          if constexpr (decltype(streamed)::value) {
            store_vector(po + i, v, true);
          } else {
            store_run(po + i * stride, stride, W, v);
          }
        }
        if (i < end) {
          const int n = static_cast<int>(end - i);
          const V gv = pg != nullptr ? load_run(pg + i * stride, stride, n) : V{};
          store_run(po + i * stride, stride, n, op(load_run(px + i * stride, stride, n), gv, k));
        }
      };
      // Stream whole cache lines of long contiguous runs only: a line written partly by
      // streaming stores and partly by ordinary ones (short planes, run ends) costs more
      // than it saves (measured: (128,256,14,14) bfloat16 forward 1.3 -> 2.3x torch).
      const auto address = reinterpret_cast<uintptr_t>(po);
      if (stream && stride == 1 && length * static_cast<int64_t>(sizeof(T)) >= kStreamRunBytes &&
          address % sizeof(T) == 0) {
        const int64_t head = static_cast<int64_t>((kLineBytes - address % kLineBytes) % kLineBytes / sizeof(T));
        const int64_t body_end = head + (length - head) / W * W;
        span(std::false_type{}, 0, head);
        span(std::true_type{}, head, body_end);
        span(std::false_type{}, body_end, length);
      } else {
        span(std::false_type{}, 0, length);
      }
    });
  };
  if (memory_order) {
    for (int64_t r = t.row_begin; r < t.row_end;) {
      const int64_t next = std::min(t.row_end, (r / l.S + 1) * l.S);
      for (int64_t c = t.c_begin; c < t.c_end; ++c) channel_rows(c, r, next);
      r = next;
    }
  } else {
    for (int64_t c = t.c_begin; c < t.c_end; ++c) channel_rows(c, t.row_begin, t.row_end);
  }
  stream_fence(stream);
}

template <typename T, typename Op, typename Params>
void map_channels_innermost(const Layout& l, const Tile& t, const T* x, const T* g, T* out, const Params& params,
                            const Op& op, bool stream) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  const int64_t channels = t.c_end - t.c_begin;
  const int64_t groups = (channels + W - 1) / W;
  const int tail = static_cast<int>(channels - (groups - 1) * W);
  // Streaming only where every row writes whole cache lines (see map_channel_major).
  const auto line_multiple = [](int64_t elements) { return elements * sizeof(T) % kLineBytes == 0; };
  stream = stream && line_multiple(channels) && (l.S == 1 || line_multiple(l.stride_s)) &&
           (l.N == 1 || line_multiple(l.stride_n));
  std::vector<V> k(static_cast<size_t>(groups * 4));  // [group][parameter], lanes = channels
  for (int64_t c = 0; c < channels; ++c) {
    for (int j = 0; j < 4; ++j) k[(c / W) * 4 + j][c % W] = static_cast<A>(params(t.c_begin + c, j));
  }
  // The row at `offset`, vector gi of channels.
  auto map_vector = [&](int64_t offset, int64_t gi, const V* kv) {
    const int64_t at = offset + t.c_begin + gi * W;
    if (gi + 1 < groups || tail == W) {
      const V gv = g != nullptr ? Io<T>::load(g + at) : V{};
      store_vector(out + at, op(Io<T>::load(x + at), gv, kv), stream);
    } else {
      const V gv = g != nullptr ? load_run(g + at, 1, tail) : V{};
      store_run(out + at, 1, tail, op(load_run(x + at, 1, tail), gv, kv));
    }
  };
  if (walks_row_by_row<T>(l, groups, 4, 8 << 10)) {  // four parameters per vector, at most 8 KiB
    // Wide rows of a tensor far bigger than the caches in memory order, the parameters loaded
    // from L1 for every vector: the steps below took 2.1-2.4x a copy of (32, C, H, W)
    // channels-last float32 (~25 MB) at C = 128-512, this 1.0-1.7x. (Blocks of rows a few
    // vectors at a time, their parameters in registers: 2.4-2.7x. At C = 1024, 16 KiB of
    // parameters, the steps win: 1.0-1.2x against 1.6-1.8x; within the caches, (256, 1024),
    // by 5-10%.)
    for_each_row(l, t.row_begin, t.row_end, [&](int64_t, int64_t offset) {
      for (int64_t gi = 0; gi < groups; ++gi) map_vector(offset, gi, k.data() + gi * 4);
    });
  } else {
    for_each_row_step(l, t.row_begin, t.row_end, kNoSplit, [&](int64_t, const int64_t* offsets, int rows) {
      with_step_rows(rows, [&](auto count) {
        for (int64_t gi = 0; gi < groups; ++gi) {
          const V kv[4] = {k[gi * 4], k[gi * 4 + 1], k[gi * 4 + 2], k[gi * 4 + 3]};  // in registers for the step
          for (int q = 0; q < count; ++q) map_vector(offsets[q], gi, kv);
        }
      });
    });
  }
  stream_fence(stream);
}

template <typename T, typename Op, typename Params>
void map(const Layout& l, const Tile& t, const void* x, const void* g, void* out, const Params& params,
         const Op& op, bool stream) {
  if (t.c_end <= t.c_begin || t.row_end <= t.row_begin) return;
  const T* px = static_cast<const T*>(x);
  const T* pg = static_cast<const T*>(g);
  T* po = static_cast<T*>(out);
  if (walk(l) == Walk::ChannelsInnermost) {
    map_channels_innermost(l, t, px, pg, po, params, op, stream);
  } else {
    map_channel_major(l, t, px, pg, po, params, op, stream);
  }
}

template <typename Fn>
void with_element_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float64: fn(double{}); break;
    case Dtype::Float32: fn(float{}); break;
    case Dtype::Float16: fn(Half{}); break;
    case Dtype::BFloat16: fn(BFloat16{}); break;
  }
}

template <typename Fn>
void with_phi(PhiKind phi, Fn&& fn) {
  switch (phi) {
    case PhiKind::Identity: fn(std::integral_constant<PhiKind, PhiKind::Identity>{}); break;
    case PhiKind::Sign: fn(std::integral_constant<PhiKind, PhiKind::Sign>{}); break;
    case PhiKind::SignedPower: fn(std::integral_constant<PhiKind, PhiKind::SignedPower>{}); break;
    default: fn(std::integral_constant<PhiKind, PhiKind::None>{}); break;
  }
}

// ---------------------------------------------------------------------------------------
// The passes

void collect_stats(const StatsArgs& a, const Tile* tiles, int64_t count) {
  const Parts parts{tiles, count};
  const Tile t = parts.whole();
  const int64_t C = a.layout.C;
  const int64_t lists = a.chunks * a.per_end;  // candidates per channel and end
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = t.c_begin; c < t.c_end; ++c) {
      a.sum[j * C + c] = 0;
      if (a.per_end > 0) {
        core::reset_extremes(a.largest + (j * C + c) * lists, lists);
        core::reset_extremes(a.smallest + (j * C + c) * lists, lists);
      }
    }
  }
  for (int64_t c = t.c_begin; a.picked != nullptr && c < t.c_end; ++c) {
    a.picked[c * a.per_end].index = -1;  // not picked (yet)
  }
  if (t.row_end <= t.row_begin) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.pivot != nullptr) {
      // Every tile of a channel picks the same pivot: the mean of its first (flat) elements,
      // rounded to the accumulation type the pass subtracts it in.
      const Layout& l = a.layout;
      const T* x = static_cast<const T*>(a.x);
      // Element by element outer, channel inner: a channels-last row is one contiguous read.
      const int64_t first = std::min<int64_t>(l.count(), 8);
      for (int64_t c = t.c_begin; c < t.c_end; ++c) a.pivot[c] = 0;
      for (int64_t f = 0; f < first; ++f) {
        const T* row = x + l.offset(f / l.S, 0, f % l.S);
        for (int64_t c = t.c_begin; c < t.c_end; ++c) {
          a.pivot[c] += static_cast<double>(core::Element<T>::load(row[c * l.stride_c]));
        }
      }
      for (int64_t c = t.c_begin; c < t.c_end; ++c) {
        a.pivot[c] = static_cast<double>(static_cast<AccOf<T>>(first > 0 ? a.pivot[c] / static_cast<double>(first) : 0.0));
        for (int64_t j = 1; j < count; ++j) a.pivot[j * C + c] = a.pivot[c];
      }
      reduce_parts<T>(a.layout, parts, a.x, a.pivot, ShiftedSumsOp{}, NoExtremes{}, a.sum, a.sum_sq);
    } else if (a.per_end > 0) {
      const Extremes<AccOf<T>> ext{a.largest, a.smallest, a.chunks, a.per_end, a.layout.count() / a.chunks,
                                   a.chunks == 1 ? a.picked : nullptr};
      reduce_parts<T>(a.layout, parts, a.x, nullptr, SumOp{}, ext, a.sum, nullptr);
    } else {
      reduce_parts<T>(a.layout, parts, a.x, nullptr, SumOp{}, NoExtremes{}, a.sum, nullptr);
    }
  });
}

void collect_deviations(const DeviationArgs& a, const Tile& t) {
  for (int64_t c = t.c_begin; c < t.c_end; ++c) a.deviation_sum[c] = a.phi_sum[c] = 0;
  if (t.row_end <= t.row_begin) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    with_phi(a.phi, [&](auto phi) {
      if constexpr (phi.value != PhiKind::None) {
        const DeviationOp<phi.value, A> op{static_cast<A>(a.power)};
        reduce<T>(a.layout, t, a.x, nullptr, a.mean, op, NoExtremes{}, a.deviation_sum, a.phi_sum);
      }
    });
  });
}

void apply_affine(const AffineArgs& a, const Tile& t) {
  const auto params = [&a](int64_t c, int j) { return j == 0 ? a.mean[c] : j == 1 ? a.scale[c] : a.bias[c]; };
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    map<T>(a.layout, t, a.x, nullptr, a.y, params, AffineOp{}, a.stream);
  });
}

void reduce_grad(const GradReduceArgs& a, const Tile& t) {
  for (int64_t c = t.c_begin; c < t.c_end; ++c) a.sum_g[c] = a.sum_gd[c] = 0;
  if (t.row_end <= t.row_begin) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    reduce<T>(a.layout, t, a.x, a.grad, a.mean, GradSumsOp{}, NoExtremes{}, a.sum_g, a.sum_gd);
  });
}

constexpr uint64_t kRepeatSlots = 1024;  // see apply_grad

void apply_grad(const GradApplyArgs& a, const Tile& t) {
  if (t.c_end <= t.c_begin || t.row_end <= t.row_begin) return;
  const auto params = [&a](int64_t c, int j) {
    const core::GradCoefficients& k = a.coef[c];
    return j == 0 ? a.mean[c] : j == 1 ? k.scale_g : j == 2 ? k.scale_phi : k.offset;
  };
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    with_phi(a.phi, [&](auto phi) {
      map<T>(a.layout, t, a.x, a.grad, a.grad_x, params, GradApplyOp<phi.value, A>{static_cast<A>(a.power)},
             a.stream);
      const int64_t per_channel = a.sparse_per_channel;
      if (per_channel == 0) return;
      // The sparse terms: those few elements are recomputed whole (in double), so they are
      // rounded once; phi known at compile time here too ((256, 1024) topk backward: a switch
      // on it per element cost 10%).
      const Layout& l = a.layout;
      const T* x = static_cast<const T*>(a.x);
      const T* g = static_cast<const T*>(a.grad);
      T* out = static_cast<T*>(a.grad_x);
      auto fix_up = [&](int64_t c, int64_t flat, double sparse) {
        const core::GradCoefficients& k = a.coef[c];
        // (N, C): one element per row and channel, no division.
        const int64_t offset = l.S == 1 ? l.offset(flat, c, 0) : l.offset(flat / l.S, c, flat % l.S);
        const double d = static_cast<double>(core::Element<T>::load(x[offset])) - a.mean[c];
        const double gv = static_cast<double>(core::Element<T>::load(g[offset]));
        const double dense = k.scale_g * gv + k.scale_phi * core::phi(phi.value, d, a.power) + k.offset;
        using acc = typename core::Element<T>::acc;
        out[offset] = core::Element<T>::store(static_cast<acc>(dense + k.sparse_scale * sparse));
      };
      for (int64_t c = t.c_begin; c < t.c_end; ++c) {
        const int64_t* index = a.sparse_index + c * per_channel;
        const double* coef = a.sparse_coef + c * per_channel;
        // An index can repeat (range of a constant chunk): its terms are summed at its first
        // entry. Only a channel that may have repeats searches for them per entry ((256, 1024)
        // topk backward: the search was 20% of its time): the indices are filed by their low
        // bits, and a filled slot (a repeat, or two indices that share the bits) sends the
        // channel to the search.
        bool repeats = false;
        {
          uint64_t filled[kRepeatSlots / 64] = {};
          for (int64_t i = 0; i < per_channel; ++i) {
            const auto slot = static_cast<uint64_t>(index[i]) % kRepeatSlots;
            repeats |= (filled[slot / 64] >> (slot % 64) & 1) != 0;
            filled[slot / 64] |= uint64_t{1} << (slot % 64);
          }
        }
        for (int64_t i = 0; i < per_channel; ++i) {
          if (index[i] < t.row_begin || index[i] >= t.row_end) continue;
          double sparse = coef[i];
          if (repeats) {
            bool first = true;
            for (int64_t j = 0; j < i; ++j) first = first && index[j] != index[i];
            if (!first) continue;
            for (int64_t j = i + 1; j < per_channel; ++j) sparse += index[j] == index[i] ? coef[j] : 0.0;
          }
          fix_up(c, index[i], sparse);
        }
      }
    });
  });
}

}  // namespace
}  // namespace LPNORM_CONCAT(isa_, LPNORM_ISA)

const Kernels& LPNORM_CONCAT(kernels_, LPNORM_ISA)() {
  namespace build = LPNORM_CONCAT(isa_, LPNORM_ISA);
  static const Kernels table{LPNORM_STRINGIFY(LPNORM_ISA), build::collect_stats,
                             build::collect_deviations, build::apply_affine, build::reduce_grad,
                             build::apply_grad};
  return table;
}

}  // namespace lpnorm::cpu
