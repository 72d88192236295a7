// The CPU passes, written once. CMake compiles this file once per instruction set with
// LPNORM_ISA set to its name (baseline, avx2, avx512) and that set's compiler flags; each
// build lives in its own namespace and exports kernels_<isa>().
//
// Arithmetic runs in float for float/half data and in double for double. Sums of float lanes
// are folded into double every few thousand elements, so they stay accurate for m ~ 1e7.
//
// The building blocks are in cpu/isa/ (vectors, loads and stores, tile walks, top-k lane lists,
// reductions, element-wise passes); this file puts them together into the five passes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/isa/build.h"
#include "cpu/isa/element_passes.h"
#include "cpu/isa/reductions.h"
#include "cpu/kernels.h"

namespace lpnorm::cpu {
namespace LPNORM_ISA_NAMESPACE {
namespace {

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
  // A channels-innermost walk of one part and one chunk writes its lists whole at its first
  // flush (Extremes::unset): they are its own (a run of parts shares part 0's lists).
  const bool unset = a.chunks == 1 && count == 1 && t.row_end > t.row_begin && walk(a.layout) == Walk::ChannelsInnermost;
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = t.c_begin; a.per_end > 0 && !unset && c < t.c_end; ++c) {
      core::reset_extremes(a.largest + (j * C + c) * lists, lists);
      core::reset_extremes(a.smallest + (j * C + c) * lists, lists);
    }
  }
  for (int64_t c = t.c_begin * a.chunks; a.picked != nullptr && c < t.c_end * a.chunks; ++c) {
    a.picked[c * a.per_end].index = core::kNotPicked;  // (yet)
  }
  // The walks below set every part's sums (and sum_sq); with no rows there is no walk.
  if (t.row_end <= t.row_begin) {
    for (int64_t j = 0; j < count; ++j) {
      std::fill(a.sum + j * C + t.c_begin, a.sum + j * C + t.c_end, 0.0);
      if (a.sum_sq != nullptr) std::fill(a.sum_sq + j * C + t.c_begin, a.sum_sq + j * C + t.c_end, 0.0);
    }
    return;
  }
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.pivot != nullptr) {
      // Every tile of a channel picks the same pivot: the mean of its first (flat) elements,
      // rounded to the accumulation type the pass subtracts it in.
      const Layout& l = a.layout;
      const T* x = static_cast<const T*>(a.x);
      // Element by element outer, channel inner: a channels-last row is one contiguous read.
      const int64_t first = std::min<int64_t>(l.count(), core::kPivotElements);
      const int64_t channels = t.c_end - t.c_begin, stride = l.stride_c;
      const ThreadArray<struct PivotRanges, double> range(2 * channels);  // least and largest per channel
      double* __restrict const sum = a.pivot + t.c_begin;
      double* __restrict const lowest = range.data();
      double* __restrict const highest = lowest + channels;
      const T* row = x + l.offset(0, t.c_begin, 0);  // (first >= 1: the tile has rows)
      for (int64_t c = 0; c < channels; ++c) sum[c] = lowest[c] = highest[c] = core::Element<T>::load(row[c * stride]);
      for (int64_t f = 1; f < first; ++f) {
        row = x + l.offset(f / l.S, t.c_begin, f % l.S);
        for (int64_t c = 0; c < channels; ++c) {
          const double v = core::Element<T>::load(row[c * stride]);
          sum[c] += v;
          lowest[c] = v < lowest[c] ? v : lowest[c];
          highest[c] = v > highest[c] ? v : highest[c];
        }
      }
      // The pivots, then their copies for the other parts.
      for (int64_t c = 0; c < channels; ++c) sum[c] = core::channel_pivot<AccOf<T>>(sum[c], first, lowest[c], highest[c]);
      for (int64_t j = 1; j < count; ++j) {
        std::copy(a.pivot + t.c_begin, a.pivot + t.c_end, a.pivot + j * C + t.c_begin);
      }
    }
    // Shifted whether or not there is a pivot (none: a shift by 0, the plain sum x), so each
    // walk is built once.
    if (a.per_end > 0) {
      const Extremes<AccOf<T>> ext{a.largest, a.smallest, a.chunks, a.per_end, a.layout.count() / a.chunks,
                                   a.picked, unset};
      reduce_parts<T>(a.layout, parts, a.x, a.pivot, ShiftedSumOp{}, ext, a.sum, nullptr);
    } else if (a.sum_sq != nullptr) {
      reduce_parts<T>(a.layout, parts, a.x, a.pivot, ShiftedSumsOp{}, NoExtremes{}, a.sum, a.sum_sq);
    } else {
      reduce_parts<T>(a.layout, parts, a.x, a.pivot, ShiftedSumOp{}, NoExtremes{}, a.sum, nullptr);
    }
  });
}

// (The reductions set their outputs; a tile without rows, or a norm without deviation sums,
// is left to zero them.)
void collect_deviations(const DeviationArgs& a, const Tile& t) {
  const auto zero = [&] {
    for (int64_t c = t.c_begin; c < t.c_end; ++c) a.deviation_sum[c] = a.phi_sum[c] = 0;
  };
  if (t.row_end <= t.row_begin) return zero();
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = AccOf<T>;
    with_phi(a.phi, [&](auto phi) {
      if constexpr (phi.value != PhiKind::None) {
        const DeviationOp<phi.value, A> op{Power<A>::of(a.power)};
        reduce<T>(a.layout, t, a.x, nullptr, a.mean, op, NoExtremes{}, a.deviation_sum, a.phi_sum);
      } else {
        zero();
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
  if (t.row_end <= t.row_begin) {
    for (int64_t c = t.c_begin; c < t.c_end; ++c) a.sum_g[c] = a.sum_gd[c] = 0;
    return;
  }
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    reduce<T>(a.layout, t, a.x, a.grad, a.mean, GradSumsOp{}, NoExtremes{}, a.sum_g, a.sum_gd);
  });
}

constexpr uint64_t kRepeatSlots = 1024;  // see apply_grad
// The terms go in the lanes (map_with_lane_terms) from this many per channel (top-k's k times
// its chunks), with at most kLaneWordsPerTerm words of lane bits (a row and vector of channels
// each) per term: (256, 1024) has 1.6 at k = 10; a channels-last tensor of many rows does not
// get them (its few terms cost little one by one). (256, 1024) topk backward, 1 thread: k = 20
// 129-145 -> 95-112 us; at k = 10 the two ways came out even (88-90 against 81-93).
constexpr int64_t kLaneTermsFrom = 16, kLaneWordsPerTerm = 8;

// The backward's element pass of a channels-innermost tile with its sparse terms in the lanes
// (SignedLaneTerms), where each channel's terms in the tile are +-a_c at distinct elements
// (top-k, L-inf, range of a chunk whose max and min differ) and the tile has few rows per
// term. The element gets dense + a_c (in the accumulation type), not the dense part and the
// term summed in double as the terms one by one do. False, having written nothing, where not.
template <typename T, typename Params, typename Op>
bool map_with_lane_terms(const GradApplyArgs& a, const Tile& t, const Params& params, const Op& op) {
  using A = AccOf<T>;
  using V = VecOf<T>;
  constexpr int W = kLanes<T>;
  const int64_t per_channel = a.sparse_per_channel;
  const int64_t channels = t.c_end - t.c_begin, rows = t.row_end - t.row_begin;
  const int64_t groups = (channels + W - 1) / W;
  if (per_channel < kLaneTermsFrom || rows * groups > kLaneWordsPerTerm * per_channel * channels) return false;
  const ThreadArray<struct LaneTermBits, uint32_t> bit_words(rows * groups);
  const ThreadArray<struct LaneTermMagnitudes, V> magnitudes(groups);
  uint32_t* const bits = bit_words.data();
  V* const magnitude = magnitudes.data();
  std::fill(bits, bits + rows * groups, 0u);
  std::fill(magnitude, magnitude + groups, V{});
  for (int64_t ci = 0; ci < channels; ++ci) {
    const int64_t c = t.c_begin + ci;
    const int64_t* index = a.sparse_index + c * per_channel;
    const double* coef = a.sparse_coef + c * per_channel;
    const double scale = a.coef[c].sparse_scale;
    double size = 0;  // a_c, once a term is nonzero
    for (int64_t i = 0; i < per_channel; ++i) {
      if (index[i] < t.row_begin || index[i] >= t.row_end) continue;
      const double term = scale * coef[i];
      if (term == 0) continue;
      if (size == 0) {
        size = std::abs(term);
      } else if (std::abs(term) != size) {  // NaN too
        return false;
      }
      // The sign from the bits, not a branch (mispredicted on every other term).
      uint64_t term_bits;
      std::memcpy(&term_bits, &term, sizeof term);
      uint32_t& word = bits[(index[i] - t.row_begin) * groups + ci / W];
      const uint32_t bit = uint32_t{1} << (ci % W + static_cast<int>(term_bits >> 63) * 16);
      if ((word & bit) != 0) return false;  // an index repeated
      word |= bit;
    }
    magnitude[ci / W][ci % W] = static_cast<A>(size);
  }
  map_channels_innermost(a.layout, t, static_cast<const T*>(a.x), static_cast<const T*>(a.grad),
                         static_cast<T*>(a.grad_x), params, op, a.stream,
                         SignedLaneTerms<V>{bits, magnitude, t.row_begin, groups});
  return true;
}

// Appends, at `listed`, the entries among one channel's `count` sparse indices that fall in
// rows [row_begin, row_begin + rows): its channel, and the entry (first + i). Whole vectors of
// indices at a time (compared into a mask, their entries packed), the rest one by one, both
// branch-free; both arrays need a vector's room past the last entry. (Each row block of an
// (N, C) input looks at every entry: one by one, (256, 1024) topk backward in 4 blocks spent
// 41 of its ~240 us at 1 thread, 22 of ~120 at 2, listing.)
LPNORM_INLINE int64_t list_terms_in_rows(const int64_t* index, int64_t count, int64_t row_begin, uint64_t rows,
                                         int64_t channel, int64_t first, int64_t* term_channel,
                                         int64_t* term_entry, int64_t listed) {
  constexpr int D = Simd<double>::W;
  VI64 lane;
  for (int i = 0; i < D; ++i) lane[i] = i;
  const VI64 owner = splat<VI64>(channel);
  int64_t i = 0;
  for (; i + D <= count; i += D) {
    VI64 at;
    std::memcpy(&at, index + i, sizeof at);
    const VU64 offset = reinterpret_cast<VU64>(at - splat<VI64>(row_begin));  // below the rows: huge
    const uint32_t inside = bitmask(reinterpret_cast<VI64>(offset < splat<VU64>(rows)));
    std::memcpy(term_channel + listed, &owner, sizeof owner);
    listed += compress(splat<VI64>(first + i) + lane, inside, term_entry + listed);
  }
  for (; i < count; ++i) {
    term_channel[listed] = channel;
    term_entry[listed] = first + i;
    listed += static_cast<uint64_t>(index[i] - row_begin) < rows ? 1 : 0;
  }
  return listed;
}

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
      const GradApplyOp<phi.value, A> op{Power<A>::of(a.power)};
      const int64_t per_channel = a.sparse_per_channel;
      const bool innermost = walk(a.layout) == Walk::ChannelsInnermost;
      if (per_channel > 0 && innermost && map_with_lane_terms<T>(a, t, params, op)) {
        return;
      }
      map<T>(a.layout, t, a.x, a.grad, a.grad_x, params, op, a.stream);
      if (per_channel == 0) return;
      // The sparse terms: those few elements are recomputed whole (in double), so they are
      // rounded once; phi known at compile time here too ((256, 1024) topk backward: a switch
      // on it per element cost 10%).
      const Layout& l = a.layout;
      const T* x = static_cast<const T*>(a.x);
      const T* g = static_cast<const T*>(a.grad);
      T* out = static_cast<T*>(a.grad_x);
      // Channel c's term at element `flat` of its plane (index order), with coefficient sum
      // `sparse`: the element recomputed whole.
      auto term = [&](int64_t c, int64_t flat, double sparse) __attribute__((always_inline)) {
        const core::GradCoefficients& k = a.coef[c];
        // (N, C): one element per row and channel, no division.
        const int64_t offset = c * l.stride_c +
                               (l.S == 1 ? flat * l.stride_n : flat / l.S * l.stride_n + flat % l.S * l.stride_s);
        const double d = static_cast<double>(core::Element<T>::load(x[offset])) - a.mean[c];
        const double gv = static_cast<double>(core::Element<T>::load(g[offset]));
        // As the dense pass (GradApplyOp): no phi term without a phi (the norms with sparse
        // terms), where scale_phi is dsigma * 0, NaN if dsigma is not finite.
        double phi_term = 0.0;
        if constexpr (phi.value != PhiKind::None) phi_term = k.scale_phi * core::phi(phi.value, d, a.power);
        const double dense = k.scale_g * gv + phi_term + k.offset;
        using acc = typename core::Element<T>::acc;
        out[offset] = core::Element<T>::store(static_cast<acc>(dense + k.sparse_scale * sparse));
      };
      // Channels that share a cache line are visited a line apart (c, c + L, ..., then c + 1):
      // where rows are a multiple of 4 KiB apart, all of a line's channels' elements fall in
      // one L1 set, and terms that follow each other there wait on each other. (256, 1024)
      // topk backward, 1 thread: 93-100 us before this loop was lean (no repeat search, the
      // channel's values in locals), 76-78 after, but 117-120 lean and channel by channel.
      const int64_t per_line = innermost ? static_cast<int64_t>(kLineBytes / sizeof(T)) : 1;
      // The tile's terms are listed first, without a branch, then updated in one loop: a row
      // block of an (N, C) input holds a few of each channel's terms, and a branch on each
      // mispredicted on most ((256, 1024) topk backward in 4 row blocks: 138-198 -> 227-241 us);
      // a loop per channel over its listed terms mispredicted its exit about once a channel
      // ((256, 1024) topk backward on a Xeon, 1 thread 236-241 -> 226-230 us, 2 threads 108 -> 101-104).
      // (Each listed term keeps its channel beside its entry, c * per_channel + i: deriving it
      // would divide once a term.)
      const int64_t tile_terms = (t.c_end - t.c_begin) * per_channel + Simd<double>::W;  // a vector's room
      const ThreadArray<struct TermChannels, int64_t> term_channels(tile_terms);
      const ThreadArray<struct TermEntries, int64_t> term_entries(tile_terms);
      int64_t* const term_channel = term_channels.data();
      int64_t* const term_entry = term_entries.data();
      int64_t listed = 0;
      const auto rows = static_cast<uint64_t>(t.row_end - t.row_begin);
      for (int64_t first = t.c_begin; first < std::min(t.c_end, t.c_begin + per_line); ++first) {
        for (int64_t c = first; c < t.c_end; c += per_line) {
          const int64_t* index = a.sparse_index + c * per_channel;
          // Where an index can repeat (sparse_may_repeat), its terms are summed at its
          // first entry. Only a channel that may have repeats searches for them per entry:
          // the indices are filed by their low bits, and a filled slot (a repeat, or two
          // indices that share the bits) sends the channel to the search, here.
          bool repeats = false;
          if (a.sparse_may_repeat) {
            uint64_t filled[kRepeatSlots / 64] = {};
            for (int64_t i = 0; i < per_channel; ++i) {
              const auto slot = static_cast<uint64_t>(index[i]) % kRepeatSlots;
              repeats |= (filled[slot / 64] >> (slot % 64) & 1) != 0;
              filled[slot / 64] |= uint64_t{1} << (slot % 64);
            }
          }
          if (repeats) {
            const double* coef = a.sparse_coef + c * per_channel;
            for (int64_t i = 0; i < per_channel; ++i) {
              const int64_t flat = index[i];
              if (static_cast<uint64_t>(flat - t.row_begin) >= rows) continue;
              bool first_entry = true;
              for (int64_t j = 0; j < i; ++j) first_entry = first_entry && index[j] != flat;
              if (!first_entry) continue;
              double sparse = coef[i];
              for (int64_t j = i + 1; j < per_channel; ++j) sparse += index[j] == flat ? coef[j] : 0.0;
              term(c, flat, sparse);
            }
            continue;
          }
          listed = list_terms_in_rows(index, per_channel, t.row_begin, rows, c, c * per_channel, term_channel,
                                      term_entry, listed);
        }
      }
      for (int64_t e = 0; e < listed; ++e) {
        const int64_t entry = term_entry[e];
        term(term_channel[e], a.sparse_index[entry], a.sparse_coef[entry]);
      }
    });
  });
}

}  // namespace
}  // namespace LPNORM_ISA_NAMESPACE

const Kernels& LPNORM_CONCAT(kernels_, LPNORM_ISA)() {
  namespace build = LPNORM_ISA_NAMESPACE;
  static const Kernels table{LPNORM_STRINGIFY(LPNORM_ISA), build::collect_stats,
                             build::collect_deviations, build::apply_affine, build::reduce_grad,
                             build::apply_grad};
  return table;
}

}  // namespace lpnorm::cpu
