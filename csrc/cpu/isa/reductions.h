// The reductions: two sums per channel of a lane-wise op over x (and g), with the stats
// pass's extreme lists, channel-major or channels-innermost.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/isa/lane_lists.h"
#include "cpu/isa/tile_walks.h"
#include "cpu/isa/vector_lists.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

struct ShiftedSumsOp {  // around a pivot close to the mean, so the squares barely cancel
  static constexpr bool kRowsWhenFetched = true;  // see reduce_channels_innermost
  template <typename V>
  LPNORM_INLINE void operator()(V x, V, V pivot, V& s0, V& s1) const {
    const V d = x - pivot;
    s0 += d;
    s1 += d * d;
  }
};

struct ShiftedSumOp {  // the sum alone (every norm but l2's one pass; a pivot of 0: the sum of x)
  static constexpr bool kRowsWhenFetched = true;
  template <typename V>
  LPNORM_INLINE void operator()(V x, V, V pivot, V& s0, V&) const {
    s0 += x - pivot;
  }
};

struct GradSumsOp {
  static constexpr bool kRowsWhenFetched = true;  // see reduce_channels_innermost
  template <typename V>
  LPNORM_INLINE void operator()(V x, V g, V mean, V& s0, V& s1) const {
    s0 += g;
    s1 += g * (x - mean);
  }
};

template <PhiKind kPhi, typename A>
struct DeviationOp {
  static constexpr bool kRowsWhenFetched = false;
  Power<A> power;
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
  core::Deviation* picked = nullptr;  // StatsArgs::picked, [C][chunks][per_end]
  // The lists were not reset (collect_stats): a channels-innermost walk of one part writes
  // them whole at its first flush.
  bool unset = false;

  int64_t split() const { return chunks > 1 ? chunk_count : kNoSplit; }
  Candidate* lists(Candidate* base, int64_t c, int64_t flat) const {
    // (No division for one chunk: a flush asks once per lane and end, and the division's
    // latency was most of the (2, 4096) linf stats pass.)
    const int64_t chunk = chunks == 1 ? 0 : flat / chunk_count;
    return base + (c * chunks + chunk) * per_end;
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
  // unit, whole_tails: see with_run_kind. Planes shorter than W keep the masked tail load in
  // code of their own (their walk is all per-run overhead: a test per run made (256, 512, 2)
  // 15% slower). held: the kind of the extreme lists the walk keeps in registers for the
  // channel it is on (vector_lists.h), written back to their Candidates when it moves to
  // another list (chunk, channel); or ListsInMemory.
  const bool fetch_runs = !Ext::kActive && fetches_ahead<T>(l, l.C);  // see fetch_run_ahead
  auto walk = [&](auto unit, auto whole_tails, auto held) __attribute__((always_inline)) {
    using Held = decltype(held);
    constexpr bool in_registers = !std::is_same_v<Held, ListsInMemory>;
    // Elements [i, i + n) of a run (n = min(W, length - i)) in lanes [0, n), zeros past them.
    auto load_piece = [&](const T* run, int64_t stride, int64_t i, int64_t length) __attribute__((always_inline)) {
      const int n = static_cast<int>(std::min<int64_t>(W, length - i));
      if (decltype(whole_tails)::value && n < W && length >= W) return load_last(run + length, n);
      return load_run(run + i * stride, stride, n);
    };
    for (int64_t c = t.c_begin; c < t.c_end; ++c) {
      Held up_held, down_held;
      [[maybe_unused]] Candidate *held_up_list = nullptr, *held_down_list = nullptr;  // where they go back
      // Short channels' top-k lists start from floors: the per_end-th largest of the lanes'
      // largest values (of x, and of -x), which at least per_end elements reach, so nothing
      // below can enter. A first walk finds them while the channel comes into the caches; the
      // offers then take what reaches the floors only, not every lane that beats a list still
      // filling up (topk forward, 1 thread: (4, 512, 7, 7) 243 -> 226 us, (8, 512, 14, 14)
      // 751-787 -> 561-571 us).
      A up_floor = -std::numeric_limits<A>::infinity(), down_floor = up_floor;
      if constexpr (std::is_same_v<Held, VectorList<A>>) {
        if (ext.split() == kNoSplit && t.row_end - t.row_begin <= kFloorRows) {
          V top = splat<V>(up_floor), bottom = top;
          for_each_run(l, c, t.row_begin, t.row_end, kNoSplit, [&](int64_t offset, int64_t run_stride, int64_t length,
                                                                   int64_t) __attribute__((always_inline)) {
            const int64_t stride = decltype(unit)::value ? 1 : run_stride;
            for (int64_t i = 0; i < length; i += W) {
              const V v = load_piece(x + offset, stride, i, length);
              const auto valid = lanes_below<A>(static_cast<int>(std::min<int64_t>(W, length - i)));
              top = (valid & (v > top)) ? v : top;
              bottom = (valid & (-v > bottom)) ? -v : bottom;
            }
          });
          up_floor = largest_lane<A>(top, static_cast<int>(ext.per_end));
          down_floor = largest_lane<A>(bottom, static_cast<int>(ext.per_end));
        }
      }
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
      for_each_run(l, c, t.row_begin, t.row_end, ext.split(), [&](int64_t offset, int64_t run_stride, int64_t length,
                                                                  int64_t flat) __attribute__((always_inline)) {
        const int64_t stride = decltype(unit)::value ? 1 : run_stride;
        const T* px = x + offset;
        const T* pg = g != nullptr ? g + offset : nullptr;
        Candidate *up_list = nullptr, *down_list = nullptr;
        if constexpr (Ext::kActive) {
          up_list = ext.lists(ext.largest, c, flat);
          down_list = ext.lists(ext.smallest, c, flat);
          if constexpr (in_registers) {
            if (up_list != held_up_list) {
              if (held_up_list != nullptr) {
                up_held.store(held_up_list);
                down_held.store(held_down_list);
              }
              up_held.load(up_list, static_cast<int>(ext.per_end), up_floor);
              down_held.load(down_list, static_cast<int>(ext.per_end), down_floor);
              held_up_list = up_list;
              held_down_list = down_list;
            }
          } else {
            ext.thresholds(up_list, down_list, hi, lo);
          }
        }
        prefetch_next_plane(l, px, stride, length);
        // g's plane too where it spans lines ((32,2048,7,7) backward 3-5% faster; 64-byte planes
        // of (64,512,4,4) 5% slower).
        if (pg != nullptr && length * static_cast<int64_t>(sizeof(T)) > static_cast<int64_t>(kLineBytes)) {
          prefetch_next_plane(l, pg, stride, length);
        }
        auto check = [&](V v, int64_t first, uint32_t valid) {
          if constexpr (in_registers) {
            up_held.take(v, first, valid);
            down_held.take(-v, first, valid);  // the smallest values' list keeps -x
          } else if constexpr (Ext::kActive) {
            const uint32_t up = bitmask(v > hi) & valid, down = bitmask(v < lo) & valid;
            if ((up | down) != 0) {
              ext.offer(v, up, down, up_list, down_list, first);
              ext.thresholds(up_list, down_list, hi, lo);
            }
          }
        };
        const uint32_t all = W == 32 ? ~0u : (1u << W) - 1u;
        const bool fetch = fetch_runs && stride == 1 && length >= kFetchRunElements<T>;
        int64_t i = 0;
        for (; i + 2 * W <= length; i += 2 * W) {
          if (fetch) {
            fetch_run_ahead<2>(px, i, length, l.stride_n);
            if (pg != nullptr) fetch_run_ahead<2>(pg, i, length, l.stride_n);
          }
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
          const V x0 = load_piece(px, stride, i, length);
          const V g0 = pg != nullptr ? load_piece(pg, stride, i, length) : V{};
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
      if constexpr (in_registers) {
        if (held_up_list != nullptr) {
          up_held.store(held_up_list);
          down_held.store(held_down_list);
        }
      }
    }
  };
  with_run_kind<T>(l, true, [&](auto unit, auto whole_tails) {
    if constexpr (Ext::kActive) {
      if (LaneMaxima<A>::holds(ext.per_end, l.count())) return walk(unit, whole_tails, LaneMaxima<A>{});
      if (VectorList<A>::holds(ext.per_end, l.count())) return walk(unit, whole_tails, VectorList<A>{});
    }
    walk(unit, whole_tails, ListsInMemory{});
  });
}


// Per-channel values of a channels-innermost tile (zeros where `values` is null) into `out`,
// an accumulation-type array padded with zeros to whole vectors.
template <typename A>
void channel_values(const double* values, const Tile& t, int W, A* out) {
  const int64_t channels = t.c_end - t.c_begin;
  const int64_t padded = (channels + W - 1) / W * W;
  for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<A>(values != nullptr ? values[t.c_begin + c] : 0.0);
  std::fill(out + channels, out + padded, A(0));
}


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
  const ThreadArray<struct ChannelMeans, A> mean_values(groups * W);
  const ThreadArray<struct FloatSums0, V> float_sums0(groups);
  const ThreadArray<struct FloatSums1, V> float_sums1(groups);
  const ThreadArray<struct DoubleSums0, double> double_sums0(groups * W);
  const ThreadArray<struct DoubleSums1, double> double_sums1(groups * W);
  channel_values<A>(mean, t, W, mean_values.data());
  const A* const means = mean_values.data();
  V* const s0 = float_sums0.data();
  V* const s1 = float_sums1.data();
  std::fill(s0, s0 + groups, V{});
  std::fill(s1, s1 + groups, V{});
  // Lanes past the tile's channels (of the last vector) sum zeros.
  double* const t0 = double_sums0.data();
  double* const t1 = double_sums1.data();
  std::fill(t0, t0 + groups * W, 0.0);
  std::fill(t1, t1 + groups * W, 0.0);
  // The lists' buffers are the thread's, kept from call to call ((256, 1024) topk forward, 1
  // thread: allocating and clearing them per call was 3-5% of it). Reached through a local
  // reference: the lambdas below capture it, where each use of the thread_local itself looked
  // up the thread's copy ((32, 64, 56, 56) channels-last topk forward 15-20% slower).
  thread_local LaneLists<A> thread_lists;
  LaneLists<A>& lists = thread_lists;
  auto fold = [&] {
    for (int64_t gi = 0; gi < groups; ++gi) {
      add_widened(t0 + gi * W, s0[gi]);
      add_widened(t1 + gi * W, s1[gi]);
      s0[gi] = s1[gi] = V{};
    }
  };
  bool chunk_picks = false;  // set below, once the lists know the walk
  // Lists to the Candidates, restart at next_row; `same_chunk`: the next rows are of the same
  // chunk (see LaneLists::reset).
  auto flush = [&](int64_t next_row, bool same_chunk) {
    if constexpr (Ext::kActive) {
      // The last flush of a whole channel, where the caller needs only the largest |x - mean|
      // (t0: the sums of one part, all of the channel).
      if (ext.picked != nullptr && (ext.chunks == 1 || chunk_picks) && parts.count == 1 && next_row == t.row_end &&
          lists.base == 0 && t.row_end == l.count()) {
        // (`mean`: the stats pass's pivot, if any.)
        lists.cover_deviations(t0, mean != nullptr ? mean + t.c_begin : nullptr, channels, l.count(),
                               ext.chunks == 1);
      }
      if (chunk_picks && next_row == t.row_end && lists.by_deviation()) {
        lists.pick_chunks(ext, tail, t.c_begin, ext.picked + t.c_begin * ext.chunks * ext.per_end, ext.chunks,
                          ext.chunk_count);
        lists.reset(next_row, false);
        return;
      }
      lists.find_rows(tail, ext.picked != nullptr && ext.chunks == 1 ? ext.picked + t.c_begin * ext.per_end : nullptr);
      const bool whole = ext.unset && parts.count == 1 && lists.base == t.row_begin;  // the first flush
      for (int64_t gi = 0; gi < groups; ++gi) {
        lists.flush(ext, gi, t.c_begin + gi * W, gi + 1 < groups ? W : tail, whole);
      }
      lists.reset(next_row, same_chunk);
    }
  };
  auto mean_of = [&](int64_t gi) {
    V m;
    std::memcpy(&m, means + gi * W, sizeof m);
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
  // The lines fetch_distance past the row at `offset`'s vector gi, in x and g.
  const int64_t distance = fetch_distance<T>(l);
  auto fetch_vector = [&](int64_t offset, int64_t gi) {
    const int64_t at = offset + t.c_begin + gi * W;
    fetch_ahead(x + at, distance);
    if (g != nullptr) fetch_ahead(g + at, distance);
  };
  // Whole rows of a tensor beyond the caches are read in memory order and fetched ahead
  // ((32, 64, 56, 56) channels-last float32, 1 thread: l1's sum and deviation passes
  // 0.94-1.15 -> 0.49-0.52 ms, the backward's sums 1.78-1.88 -> 1.00-1.04 ms, against 0.40 ms
  // for torch's x.sum()). Spans of wider rows are not: their next rows' pieces are far apart.
  const bool fetch = fetches_ahead<T>(l, channels);
  // The lists' walks over spans of wider rows beyond the caches fetch their rows' pieces
  // kListFetchRows rows on, a block of rows at a time: pieces a row apart are streams too
  // short for the hardware prefetcher ((32, 128, 40, 40) channels-last float32 1 thread, stats
  // pass: linf 0.80-0.83 -> 0.73-0.77 ms, topk 1.52-1.60 -> 1.24-1.31). Not whole rows, which it
  // follows: (32, 64, 56, 56) 5-8% slower that way.
  const bool fetch_rows = Ext::kActive && channels < l.C && beyond_caches<T>(l);
  const uintptr_t fetch_rows_bytes = static_cast<uintptr_t>(kListFetchRows * row_stride(l)) * sizeof(T);
  const uintptr_t piece_bytes = static_cast<uintptr_t>(channels) * sizeof(T);
  int steps = 0;  // rows summed in float since the last fold
  if constexpr (Ext::kActive) lists.start(groups, ext.per_end, t.row_end - t.row_begin, t.row_begin);
  // Chunks of whole channels whose every row the lists copy: no flush where a chunk starts;
  // each chunk's k largest |x - mean| are picked at the end, once the mean is known
  // (LaneLists::pick_chunks; (256, 1024) topk with 4 chunks flushed both ends' lists every 64
  // rows, and core merged them channel by channel).
  if constexpr (Ext::kActive) {
    chunk_picks = ext.picked != nullptr && ext.chunks > 1 && parts.count == 1 && t.row_begin == 0 &&
                  t.row_end == l.count() && lists.dense && lists.levels > 1 && lists.levels <= LaneLists<A>::kMaxLevels;
  }
  const int64_t split = ext.split();
  // The rows of one part, each part's sums walked as if it were the only one.
  auto walk_part = [&](int64_t row_begin, int64_t row_end) {
    // Wide rows of a tensor far bigger than the caches row by row, in memory order, the
    // accumulators and means in L1: (32, C, H, W) channels-last float32, ~25 MB, 1 thread, the
    // sum pass took 1.9-2.5x torch's x.sum() in blocks and chunks, this 1.3-1.5x at C = 128-256
    // (the l1 deviation pass 3.0-3.6x -> 1.4-2.3x); at C = 512 neither order won, so at most
    // 4 KiB of the two accumulators and the mean. Fetched ahead, the sums read at memory speed
    // row by row up to 16 KiB of them (C = 512: the backward's sums 1.90-2.21 -> 0.93-1.03 ms,
    // torch.dot(x, g) 0.93-1.07), but the deviation pass in blocks (C = 128-256: 0.74-0.78 ->
    // 0.38-0.47 ms).
    const bool by_row = fetch ? Op::kRowsWhenFetched && walks_row_by_row<T>(l, groups, 3, 16 << 10)
                              : walks_row_by_row<T>(l, groups, 3, 4 << 10);
    // (The walk's state in locals, the accumulators copied in and out: reached through the
    // lambdas' captures, GCC reloaded x, g and the accumulators' addresses for every vector
    // once the code around it changed: (32, 128, 40, 40) sum pass 1.8 -> 2.3 x.sum()s. Now
    // (32, 512, 20, 20) 0.72-0.77 -> 0.44-0.45 ms, x.sum() 0.31.)
    auto walk_rows = [&](auto fetching, auto with_grad) {
      const T* const xt = x + t.c_begin;
      const T* const gt = decltype(with_grad)::value ? g + t.c_begin : nullptr;
      V* const acc0 = s0;
      V* const acc1 = s1;
      const A* const means_t = means;
      const int64_t vectors = groups, ahead = distance;
      const int last = tail;
      for_each_row(l, row_begin, row_end, [&](int64_t, int64_t offset) {
        if (++steps > kFoldEvery) {
          fold();
          steps = 1;
        }
        const T* const px = xt + offset;
        for (int64_t gi = 0; gi < vectors; ++gi) {
          const int64_t at = gi * W;
          if constexpr (decltype(fetching)::value) {
            fetch_ahead(px + at, ahead);
            if constexpr (decltype(with_grad)::value) fetch_ahead(gt + offset + at, ahead);
          }
          const int n = gi + 1 < vectors ? W : last;
          const V xv = n == W ? Io<T>::load(px + at) : load_first(px + at, n);
          V gv{};
          if constexpr (decltype(with_grad)::value) {
            gv = n == W ? Io<T>::load(gt + offset + at) : load_first(gt + offset + at, n);
          }
          V m, a0, a1;
          std::memcpy(&m, means_t + at, sizeof m);
          std::memcpy(&a0, acc0 + gi, sizeof a0);
          std::memcpy(&a1, acc1 + gi, sizeof a1);
          op(xv, gv, m, a0, a1);
          std::memcpy(acc0 + gi, &a0, sizeof a0);
          std::memcpy(acc1 + gi, &a1, sizeof a1);
        }
      });
    };
    if (!Ext::kActive && by_row) {
      auto with_fetch = [&](auto fetching) {
        if (g != nullptr) {
          walk_rows(fetching, std::true_type{});
        } else {
          walk_rows(fetching, std::false_type{});
        }
      };
      if (fetch) {
        with_fetch(std::true_type{});
      } else {
        with_fetch(std::false_type{});
      }
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
          const bool chunk_starts = split != kNoSplit && r0 % split == 0 && r0 != lists.base;
          if ((chunk_starts && !chunk_picks) || r0 + rows - lists.base > LaneLists<A>::kMaxSpan) flush(r0, !chunk_starts);
        }
        if (steps + rows > kFoldEvery) {
          fold();
          steps = 0;
        }
        if constexpr (Ext::kActive) {
          if (fetch_rows) {
            for (int q = 0; q < rows; ++q) {
              const uintptr_t piece = reinterpret_cast<uintptr_t>(x + offsets[q] + t.c_begin) + fetch_rows_bytes;
              for (uintptr_t b = 0; b < piece_bytes; b += kLineBytes) fetch_line(piece + b);
            }
          }
        }
        for (int64_t g0 = 0; g0 < groups; g0 += kChunkGroups) {
          // A chunk's walk is a function of its own: inlined into the block loop (as GCC did
          // once the network's code changed), its sums, bounds and one-level lists, which the
          // walks' lambdas share, stayed on the stack, a store and a load per vector ((5000, 64)
          // topk forward 1 thread 105 -> 113 us, linf 62 -> 73). Out of line they are registers:
          // 92 and 62 us; (32, 128, 28, 28) channels-last topk 1.02-1.11 -> 0.93-0.95 ms.
          with_chunk(groups - g0, tail != W, [&](auto chunk, auto short_last) __attribute__((noinline)) {
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
              if (fetch) {  // each vector's line fetched before the vector is read
                for (int q = 0; q < rows; ++q) {
                  unrolled<G>([&](auto gi) {
                    fetch_vector(offsets[q], g0 + gi);
                    visit(offsets[q], g0 + gi, lanes(gi), m[gi], a0[gi], a1[gi], [](V) {});
                  });
                }
              } else {
                each_row([](int, int, V) {});
              }
            } else if (lists.levels == 1) {  // the lists' two ends in registers too
              // (The lists' walks do not fetch ahead: that made the (32, 64, 56, 56)
              // channels-last linf and topk stats passes 15-60% slower at 1 thread.)
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
          if (lists.full) flush(r0 + rows, true);
        }
      });
    }
  };
  for (int64_t j = 0; j < parts.count; ++j) {
    walk_part(parts.tiles[j].row_begin, parts.tiles[j].row_end);
    fold();
    steps = 0;
    if (j + 1 == parts.count) flush(t.row_end, false);
    for (int64_t c = 0; c < channels; ++c) {
      out0[j * l.C + t.c_begin + c] = t0[c];
      if (out1 != nullptr) out1[j * l.C + t.c_begin + c] = t1[c];
      t0[c] = t1[c] = 0;
    }
  }
  if constexpr (Ext::kActive) lists.release_if_large();
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

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
