// The element-wise passes: out = op(x, g, four per-channel parameters), channel-major or
// channels-innermost.
#pragma once

#include <cstdint>

#include "cpu/isa/tile_walks.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

struct AffineOp {  // (x - mean) * scale + bias: no cancellation when |mean| >> sigma
  template <typename V>
  LPNORM_INLINE V operator()(V x, V, const V* k) const {
    return (x - k[0]) * k[1] + k[2];
  }
};

template <PhiKind kPhi, typename A>
struct GradApplyOp {  // scale_g * g + scale_phi * phi(x - mean) + offset
  Power<A> power;
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

// What a channels-innermost element pass adds to a vector of its output (row r, vector gi of
// the tile's channels): nothing ...
struct NoLaneTerms {
  template <typename V>
  LPNORM_INLINE V operator()(int64_t, int64_t, V v) const {
    return v;
  }
};

// ... or the backward's sparse terms, where each channel's are +-a_c: bits[(r - row_begin) *
// groups + gi] holds the vector's lanes whose term is +a_c (bits 0-15) and -a_c (bits 16-31),
// magnitude[gi] the a_c. (One by one, each element recomputed in double, a term waits on
// memory ~3 ns; filed into these words it costs ~1.7 ns, and the masked adds a few cycles a
// vector: see kLaneTermsFrom.)
template <typename V>
struct SignedLaneTerms {
  const uint32_t* bits;
  const V* magnitude;
  int64_t row_begin, groups;
  LPNORM_INLINE V operator()(int64_t r, int64_t gi, V v) const {
    return add_signed_in_lanes(v, bits[(r - row_begin) * groups + gi], magnitude[gi]);
  }
};

// Whole planes of channels [c_begin, c_end) of a contiguous NCHW tensor lie in one run per
// sample, and whole samples of every channel in one run: walked as such, a vector whose lanes
// straddle two planes takes each lane's channel's parameters (S >= W: at most two), and the
// output's whole lines can be streamed: every line of the run where the tile's planes are
// whole lines together (the fused tiles of plan.h). Plane by plane, a short plane's lines
// could not be (see kStreamRunBytes), so each was read before it was written, and the output
// evicted x from L3.
template <typename T, typename Op, typename Params>
void map_planes_as_one_run(const Layout& l, const Tile& t, const T* x, const T* g, T* out, const Params& params,
                           const Op& op, bool stream) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  const int64_t channels = t.c_end - t.c_begin;
  const bool samples_in_one_run = channels == l.C && l.stride_n == l.C * l.S;
  auto load_params = [&](int64_t c, V* k) {
    for (int j = 0; j < 4; ++j) k[j] = splat<V>(static_cast<A>(params(c, j)));
  };
  // One run: elements [begin, end), starting at channel t.c_begin's plane.
  auto run = [&](int64_t begin, int64_t end) {
    V here[4], next[4];
    int64_t c = t.c_begin;
    int64_t left = l.S;  // elements of channel c's plane from the walk's position on
    load_params(c, here);
    load_params(channels > 1 ? c + 1 : c, next);
    // n <= W elements at i: lanes [0, left) of channel c, the rest of the next one.
    auto piece = [&](auto streamed, int64_t i, int n) __attribute__((always_inline)) {
      const V gv = g != nullptr ? load_run(g + i, 1, n) : V{};
      V v;
      if (n <= left) {
        v = op(load_run(x + i, 1, n), gv, here);
      } else {
        const auto first = lanes_below<A>(static_cast<int>(left));
        const V k[4] = {first ? here[0] : next[0], first ? here[1] : next[1], first ? here[2] : next[2],
                        first ? here[3] : next[3]};
        v = op(load_run(x + i, 1, n), gv, k);
      }
      if constexpr (decltype(streamed)::value) {
        store_vector(out + i, v, true);
      } else {
        store_run(out + i, 1, n, v);
      }
      left -= n;
      if (left <= 0) {  // the next plane: channel c + 1, or channel t.c_begin of the next sample
        left += l.S;
        c = c + 1 == t.c_end ? t.c_begin : c + 1;
        for (int j = 0; j < 4; ++j) here[j] = next[j];
        load_params(c + 1 == t.c_end ? t.c_begin : c + 1, next);
      }
    };
    // Ordinary stores up to the first whole line, the whole lines streamed (a line is a whole
    // number of vectors), ordinary stores after.
    constexpr int64_t kLine = static_cast<int64_t>(kLineBytes / sizeof(T));
    const auto address = reinterpret_cast<uintptr_t>(out + begin);
    const int64_t lines_begin =
        stream ? std::min(end, begin + static_cast<int64_t>((kLineBytes - address % kLineBytes) % kLineBytes / sizeof(T)))
               : end;
    const int64_t lines_end = lines_begin + (end - lines_begin) / kLine * kLine;
    int64_t i = begin;
    for (; i < lines_begin; i += W) piece(std::false_type{}, i, static_cast<int>(std::min<int64_t>(W, lines_begin - i)));
    for (i = lines_begin; i < lines_end; i += W) piece(std::true_type{}, i, W);
    for (i = lines_end; i < end; i += W) piece(std::false_type{}, i, static_cast<int>(std::min<int64_t>(W, end - i)));
  };
  const int64_t n_begin = t.row_begin / l.S, n_end = t.row_end / l.S;
  if (samples_in_one_run) {
    run(n_begin * l.stride_n, n_end * l.stride_n);
  } else {
    for (int64_t n = n_begin; n < n_end; ++n) {
      run(n * l.stride_n + t.c_begin * l.S, n * l.stride_n + t.c_end * l.S);
    }
  }
}

// params(c, j): the j-th of the four per-channel parameters of channel c.
template <typename T, typename Op, typename Params>
void map_channel_major(const Layout& l, const Tile& t, const T* x, const T* g, T* out, const Params& params,
                       const Op& op, bool stream) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  if (t.c_end - t.c_begin > 1 && short_contiguous_planes(l, sizeof(T)) && l.S >= W && t.row_begin % l.S == 0 &&
      t.row_end % l.S == 0) {
    map_planes_as_one_run(l, t, x, g, out, params, op, stream);
    stream_fence(stream);
    return;
  }
  // A tile of several channels goes plane by plane in memory order (n outer, then c, as NCHW
  // lies); one channel's planes are C planes apart, and short ones wait on memory one by one
  // ((128,256,14,14) float32 evaluation: 2.7x torch channel by channel).
  const bool memory_order = t.c_end - t.c_begin > 1 && l.S > 1 && t.row_end - t.row_begin > l.S;
  // unit, whole_tails: see with_run_kind. A whole last vector is written whole (its first
  // lanes again, with the same values; never in place): a masked load of a plane's last
  // elements reads the line past it (see load_last). Shorter planes keep the masked one, in
  // code of their own (see reduce_channel_major).
  // Long runs beyond the caches fetch ahead (see fetch_run_ahead): the next run is the next
  // channel's plane in memory order, else the channel's next plane.
  const bool fetch_runs = fetches_ahead<T>(l, l.C);
  const int64_t next_run = memory_order ? l.stride_c : l.stride_n;
  auto channel_rows = [&](auto unit, auto whole_tails, int64_t c, int64_t row_begin, int64_t row_end) {
    V k[4];
    for (int j = 0; j < 4; ++j) k[j] = splat<V>(static_cast<A>(params(c, j)));
    for_each_run(l, c, row_begin, row_end, kNoSplit, [&](int64_t offset, int64_t run_stride, int64_t length, int64_t) {
      const int64_t stride = decltype(unit)::value ? 1 : run_stride;
      const T* px = x + offset;
      const T* pg = g != nullptr ? g + offset : nullptr;
      T* po = out + offset;
      // Streamed: whole cache lines of long contiguous runs, or of runs that are whole lines
      // (see kStreamRunBytes).
      const auto address = reinterpret_cast<uintptr_t>(po);
      const int64_t bytes = length * static_cast<int64_t>(sizeof(T));
      const bool streams_run = stream && stride == 1 &&
                            (bytes >= kStreamRunBytes || (address % kLineBytes == 0 && bytes % kLineBytes == 0));
      if (!memory_order) {
        prefetch_next_plane(l, px, stride, length);
        if (pg != nullptr) prefetch_next_plane(l, pg, stride, length);
        // The output's lines where it is written past the caches but not streamed:
        // (8,512,14,14) float32, 1 thread, backward 334-339 -> 301-328 us without them;
        // (32,2048,7,7) had been 10% slower without any.
        if (stream && !streams_run) prefetch_next_plane<true>(l, po, stride, length);
      }
      // Elements [begin, end) of the run: whole vectors (streamed or not), then a partial one.
      // Inlined by force: with three callers GCC kept it out of line once this file grew, and
      // (64,32,32,32) bfloat16 l2 fwd+bwd at 2 threads went from 0.82 to 1.04-1.30x torch.
      const bool fetch = fetch_runs && stride == 1 && length >= kFetchRunElements<T>;
      auto span = [&](auto streamed, int64_t begin, int64_t end) __attribute__((always_inline)) {
        int64_t i = begin;
        for (; i + W <= end; i += W) {
          if (fetch) {
            fetch_run_ahead<1>(px, i, length, next_run);
            if (pg != nullptr) fetch_run_ahead<1>(pg, i, length, next_run);
          }
          const V gv = pg != nullptr ? load_run(pg + i * stride, stride, W) : V{};
          const V v = op(load_run(px + i * stride, stride, W), gv, k);
          if constexpr (decltype(streamed)::value) {
            store_vector(po + i, v, true);
          } else {
            store_run(po + i * stride, stride, W, v);
          }
        }
        if (decltype(whole_tails)::value && i < end && end >= W) {  // the whole vector ending at `end`
          const int64_t last = end - W;
          const V gv = pg != nullptr ? Io<T>::load(pg + last) : V{};
          Io<T>::store(po + last, op(Io<T>::load(px + last), gv, k));
        } else if (i < end) {
          const int n = static_cast<int>(end - i);
          const V gv = pg != nullptr ? load_run(pg + i * stride, stride, n) : V{};
          store_run(po + i * stride, stride, n, op(load_run(px + i * stride, stride, n), gv, k));
        }
      };
      if (streams_run) {
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
  with_run_kind<T>(l, out != x && out != g, [&](auto unit, auto whole_tails) {
    if (memory_order) {
      for (int64_t r = t.row_begin; r < t.row_end;) {
        const int64_t next = std::min(t.row_end, (r / l.S + 1) * l.S);
        for (int64_t c = t.c_begin; c < t.c_end; ++c) channel_rows(unit, whole_tails, c, r, next);
        r = next;
      }
    } else {
      for (int64_t c = t.c_begin; c < t.c_end; ++c) channel_rows(unit, whole_tails, c, t.row_begin, t.row_end);
    }
  });
  stream_fence(stream);
}

template <typename T, typename Op, typename Params, typename Terms = NoLaneTerms>
void map_channels_innermost(const Layout& l, const Tile& t, const T* x, const T* g, T* out, const Params& params,
                            const Op& op, bool stream, const Terms& terms = Terms{}) {
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
  const ThreadArray<struct Parameters, V> parameters(groups * 4);
  V* const k = parameters.data();  // [group][parameter], lanes = channels
  std::fill(k + (groups - 1) * 4, k + groups * 4, V{});  // the last vector's lanes past the channels
  for (int64_t c = 0; c < channels; ++c) {
    for (int j = 0; j < 4; ++j) k[(c / W) * 4 + j][c % W] = static_cast<A>(params(t.c_begin + c, j));
  }
  // (32, 64, 56, 56) channels-last float32, 1 thread: 1.10-1.59 -> 0.80-0.95 ms, a copy 0.9.
  const bool fetch = fetches_ahead<T>(l, channels);
  const int64_t distance = fetch_distance<T>(l);
  // Row r (at `offset`), vector gi of channels.
  auto map_vector = [&](int64_t r, int64_t offset, int64_t gi, const V* kv) {
    const int64_t at = offset + t.c_begin + gi * W;
    if (fetch) {
      fetch_ahead(x + at, distance);
      if (g != nullptr) fetch_ahead(g + at, distance);
    }
    if (gi + 1 < groups || tail == W) {
      const V gv = g != nullptr ? Io<T>::load(g + at) : V{};
      store_vector(out + at, terms(r, gi, op(Io<T>::load(x + at), gv, kv)), stream);
    } else {
      const V gv = g != nullptr ? load_run(g + at, 1, tail) : V{};
      store_run(out + at, 1, tail, terms(r, gi, op(load_run(x + at, 1, tail), gv, kv)));
    }
  };
  // Four parameters per vector, at most 8 KiB of them; fetched ahead, 32 KiB ((32, 1024, 14,
  // 14) channels-last float32 forward's element pass, 1 thread: 0.78-0.86 -> 0.67-0.68 ms).
  if (walks_row_by_row<T>(l, groups, 4, fetch ? 32 << 10 : 8 << 10)) {
    // Wide rows of a tensor far bigger than the caches in memory order, the parameters loaded
    // from L1 for every vector: the steps below took 2.1-2.4x a copy of (32, C, H, W)
    // channels-last float32 (~25 MB) at C = 128-512, this 1.0-1.7x. (Blocks of rows a few
    // vectors at a time, their parameters in registers: 2.4-2.7x. At C = 1024, 16 KiB of
    // parameters, the steps win: 1.0-1.2x against 1.6-1.8x; within the caches, (256, 1024),
    // by 5-10%.)
    for_each_row(l, t.row_begin, t.row_end, [&](int64_t r, int64_t offset) {
      for (int64_t gi = 0; gi < groups; ++gi) map_vector(r, offset, gi, k + gi * 4);
    });
  } else {
    for_each_row_step(l, t.row_begin, t.row_end, kNoSplit, [&](int64_t r0, const int64_t* offsets, int rows) {
      with_step_rows(rows, [&](auto count) {
        for (int64_t gi = 0; gi < groups; ++gi) {
          const V kv[4] = {k[gi * 4], k[gi * 4 + 1], k[gi * 4 + 2], k[gi * 4 + 3]};  // in registers for the step
          for (int q = 0; q < count; ++q) map_vector(r0 + q, offsets[q], gi, kv);
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

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
