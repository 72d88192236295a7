// Walking a tile: the orders in which the passes visit a tile's elements (channel-major runs,
// channels-innermost rows and steps of rows), prefetch, and the fold of float lanes into
// double.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/isa/vector_io.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

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

// How a channel-major layout's runs are read, as compile-time choices handed to
// fn(unit, whole_tails): `unit` where every run is contiguous, so loads and stores have no
// strided fallback (with one in the loop GCC kept a dozen gather addresses live and stepped
// them every vector: (4, 512, 7, 7) backward 77 -> 63 us at 1 thread without it);
// `whole_tails` where the runs are also planes of at least W elements, which end with a whole
// vector instead of a masked partial one (see load_last), and the caller allows it.
template <typename T, typename Fn>
LPNORM_INLINE void with_run_kind(const Layout& l, bool allow_whole_tails, Fn&& fn) {
  const int64_t stride = l.S == 1 ? l.stride_n : l.stride_s;  // every run's (for_each_run)
  if (stride != 1) return fn(std::false_type{}, std::false_type{});
  if (allow_whole_tails && l.S >= kLanes<T>) return fn(std::true_type{}, std::true_type{});
  return fn(std::true_type{}, std::false_type{});
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

// Channel-major top-k lists start from floors (a first walk) where a channel's tile has at
// most this many elements: in longer ones few offers come after the first few thousand
// elements, and a first walk beyond the caches would read the channel twice from memory.
constexpr int64_t kFloorRows = 4096;

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
template <typename T>
bool beyond_caches(const Layout& l) {
  return l.count() * l.C * static_cast<int64_t>(sizeof(T)) >= kBeyondCachesBytes;
}
// Channels-innermost: elements from one row to the next within a sample.
inline int64_t row_stride(const Layout& l) { return l.S > 1 ? l.stride_s : l.stride_n; }

// Channels-innermost passes over whole rows of a tensor beyond the caches fetch the line
// fetch_distance further on in memory with every vector they read, where a vector is a whole
// line (AVX-512 float32, float64): a line per load in short row blocks, the passes read at a
// third of the speed of torch's x.sum(). Where two vectors share a line (bfloat16, AVX2
// float32) the reads kept up without help, and fetching made (32, 64, 56, 56) channels-last
// bfloat16 forward+backward 25-35% slower at 2 threads.
template <typename T>
bool fetches_ahead(const Layout& l, int64_t channels) {
  return kLanes<T> * sizeof(T) >= kLineBytes && channels == l.C && beyond_caches<T>(l);
}
// The distance in elements: 8 KiB, or a block of rows for rows wider than 512 bytes, whose
// walks take a block's rows a few vectors at a time (8 KiB was 4 rows of (32, 512, 20, 20),
// within the block: its sum pass 2.3 -> 2.6-2.7 x.sum()s, against 1.6 at 64 channels).
constexpr int64_t kFetchAheadBytes = int64_t{8} << 10;
constexpr int64_t kFetchAheadRows = 16;
template <typename T>
int64_t fetch_distance(const Layout& l) {
  return std::max<int64_t>(kFetchAheadBytes / static_cast<int64_t>(sizeof(T)), kFetchAheadRows * row_stride(l));
}
// A prefetch of the line at `at` (an address only: past the tensor it is harmless).
LPNORM_INLINE void fetch_line(uintptr_t at) {
#if defined(__x86_64__)
  // In asm: GCC 12 dropped most __builtin_prefetch calls of the walks where the distance was
  // not a constant, or where the fetch came after the vector's use.
  asm volatile("prefetcht0 (%0)" : : "r"(at));
#else
  __builtin_prefetch(reinterpret_cast<const void*>(at), 0);
#endif
}
template <typename T>
LPNORM_INLINE void fetch_ahead(const T* p, int64_t distance) {
  fetch_line(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(distance) * sizeof(T));
}
// Channel-major: runs of at least this many elements fetch ahead too, the run's own lines
// and, near its end, the first ones of the next run the walk takes, `next` elements on from
// this one's start (the channel's next plane, or the next channel's in memory order).
template <typename T>
constexpr int64_t kFetchRunElements = 1024 / sizeof(T);
// The lines of elements [i, i + kVectors * W) of a run, kFetchAheadBytes on.
template <int kVectors, typename T>
LPNORM_INLINE void fetch_run_ahead(const T* run, int64_t i, int64_t length, int64_t next) {
  const int64_t ahead = i + kFetchAheadBytes / static_cast<int64_t>(sizeof(T));
  const int64_t at = ahead < length ? ahead : next + (ahead - length);
  const uintptr_t p = reinterpret_cast<uintptr_t>(run) + static_cast<uintptr_t>(at) * sizeof(T);
  for (uintptr_t b = 0; b < kVectors * kLanes<T> * sizeof(T); b += kLineBytes) fetch_line(p + b);
}
// The top-k lists' walks over spans of wider rows fetch this many rows on (reductions.h).
constexpr int64_t kListFetchRows = 32;

// Whether a channels-innermost pass takes its rows one by one, in memory order, loading the
// per-channel state of every vector (`state_vectors` per vector of channels: parameters,
// accumulators, means) from L1: for wide rows (more than one chunk of vectors) of a tensor
// beyond the caches, while that state stays within `max_state_bytes` (measured at the callers).
template <typename T>
bool walks_row_by_row(const Layout& l, int64_t groups, int64_t state_vectors, int64_t max_state_bytes) {
  return beyond_caches<T>(l) && groups > kChunkGroups && groups * state_vectors * kBytes <= max_state_bytes;
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
  const Widened w = widen(v);
  add_widened(out, w.low);
  add_widened(out + Simd<double>::W, w.high);
}

// A thread's array of at least `count` values of T, kept from call to call, for a walk's
// per-tile state (accumulators, means, parameters), instead of a vector per array and tile
// (glibc consolidates its free lists before each allocation of 1 KiB or more): (4, 1024) l2 at
// 1 thread, forward 22.0 -> 19.9-20.6 us, backward 14.0 -> 12.7-13.0. `Tag` tells apart the
// arrays one walk holds at once; the contents are whatever the thread left there. An array
// past kKeptArrayBytes goes back when its holder ends (10^6 channels' parameters are 16 MB).
template <typename Tag, typename T>
class ThreadArray {
 public:
  static constexpr size_t kKeptArrayBytes = size_t{1} << 20;
  explicit ThreadArray(int64_t count) : array_(storage()) {
    if (array_.size() < static_cast<size_t>(count)) array_.resize(static_cast<size_t>(count));
  }
  ~ThreadArray() {
    if (array_.capacity() * sizeof(T) > kKeptArrayBytes) std::vector<T>().swap(array_);
  }
  ThreadArray(const ThreadArray&) = delete;
  ThreadArray& operator=(const ThreadArray&) = delete;
  T* data() const { return array_.data(); }

 private:
  static std::vector<T>& storage() {
    thread_local std::vector<T> array;
    return array;
  }
  std::vector<T>& array_;
};

// The fold of float lanes into double: every kFoldEvery vector steps, each lane has summed
// at most that many values in float.
constexpr int kFoldEvery = 64;

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
