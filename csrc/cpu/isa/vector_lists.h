// One channel's extreme lists in registers while the channel-major walk is on it: the largest
// values (or the largest -x, for the smallest), as core::offer_extreme keeps them in a
// Candidate list (largest first, ties to the lowest index), loaded from and written back to
// that list. Values arrive in increasing flat order, so one equal to a kept value never
// displaces it. Both kinds take(v, first, valid): the lanes `valid` of v, flat indices
// first + lane.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu/isa/vectors.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

// The `size` (2..W) largest values offered, in one vector, with their flat indices. In the
// Candidate list every offer walked the list in memory with a compare and a branch per entry
// ((4, 512, 7, 7) topk forward, 1 thread: 800 us, 6x torch's); here an offer is a shift and
// two compares (235 us). Lanes past `size` hold what fell off the list, never written back.
template <typename A>
struct VectorList {
  using V = typename Simd<A>::V;
  using I = typename Simd<A>::Mask;  // lanes of A's width: flat indices, -1 for no element
  using Index = std::remove_reference_t<decltype(I{}[0])>;
  static constexpr int W = Simd<A>::W;

  V values;
  I index;
  V bar;    // what an offer must beat to enter: values[size - 1] in every lane, or the floor
  V floor;  // just below a value that at least `size` elements of the walk reach
  int size;

  // Flat indices must fit the index lanes (int32 for float lists).
  static bool holds(int64_t size, int64_t count) {
    return size > 1 && size <= W && count <= std::numeric_limits<Index>::max();
  }

  // `reached`: at least n of the elements to come are at or above it (or -inf).
  void load(const Candidate* list, int n, A reached) {
    size = n;
    floor = splat<V>(std::nextafter(reached, -std::numeric_limits<A>::infinity()));
    values = splat<V>(-std::numeric_limits<A>::infinity());
    index = I{} - 1;
    for (int i = 0; i < n; ++i) {
      values[i] = static_cast<A>(list[i].value);  // a value of x, exact in A
      if (list[i].index != core::kNoIndex) index[i] = static_cast<Index>(list[i].index);
    }
    update_bar();
  }

  void store(Candidate* list) const {
    for (int i = 0; i < size; ++i) {
      list[i] = {static_cast<double>(values[i]), index[i] < 0 ? core::kNoIndex : static_cast<int64_t>(index[i])};
    }
  }

  LPNORM_INLINE void take(V v, int64_t first, uint32_t valid) {
    uint32_t lanes = lanes_above(v, bar) & valid;  // (NaN never enters)
    if (lanes == 0) return;
    I previous;  // lane i <- lane i - 1; lane 0 <- the second operand's lane 0
    for (int i = 0; i < W; ++i) previous[i] = i > 0 ? i - 1 : W;
    const V above_all = splat<V>(std::numeric_limits<A>::infinity());
    for (; lanes != 0; lanes &= lanes - 1) {
      const int lane = __builtin_ctz(lanes);
      const V x = splat<V>(v[lane]);
      // Lane i keeps its entry, takes x, or takes lane i - 1's entry (values descending: x
      // displaces a suffix of the lanes). No mask is moved between lanes: only values.
      const V ahead = __builtin_shuffle(values, above_all, previous);
      const I moved = x > ahead, displaced = x > values;
      values = moved ? ahead : (displaced ? x : values);
      index = moved ? __builtin_shuffle(index, previous) : (displaced ? splat<I>(static_cast<Index>(first + lane)) : index);
    }
    update_bar();
  }

 private:
  LPNORM_INLINE void update_bar() {
    const V last = __builtin_shuffle(values, splat<I>(size - 1));
    bar = last > floor ? last : floor;
  }
};

// The k-th largest lane of v (1 <= k <= W; no NaN lanes): the smallest lane that fewer than k
// lanes exceed, counted against each rotation of v (rotations unrolled: with the rotation
// built in a loop, GCC made this cost as much as the walk it serves).
template <typename A, int... R>
LPNORM_INLINE A largest_lane(typename Simd<A>::V v, int k, std::integer_sequence<int, R...>) {
  using V = typename Simd<A>::V;
  using I = typename Simd<A>::Mask;
  constexpr int W = Simd<A>::W;
  auto rotated = [&](auto r) {
    I rotation;
    for (int i = 0; i < W; ++i) rotation[i] = (i + decltype(r)::value + 1) % W;
    return __builtin_shuffle(v, rotation);
  };
  I exceeded_by{};
  ((exceeded_by -= rotated(std::integral_constant<int, R>{}) > v), ...);  // (true is -1)
  const V candidates = exceeded_by < k ? v : splat<V>(std::numeric_limits<A>::infinity());
  A result = candidates[0];
  for (int i = 1; i < W; ++i) result = std::min(result, candidates[i]);
  return result;
}
template <typename A>
LPNORM_INLINE A largest_lane(typename Simd<A>::V v, int k) {
  return largest_lane<A>(v, k, std::make_integer_sequence<int, Simd<A>::W - 1>{});
}

// A list of one entry (linf's, range's): the largest value and its index lane by lane, three
// operations a vector and no branch ((4, 512, 7, 7) linf forward, 1 thread: 115 us, 130 with
// the scalar list's offers), the lanes merged when written back.
template <typename A>
struct LaneMaxima {
  using V = typename Simd<A>::V;
  using I = typename Simd<A>::Mask;  // flat indices, -1 for no element
  using Index = typename VectorList<A>::Index;
  static constexpr int W = Simd<A>::W;

  V values;
  I index;

  static bool holds(int64_t size, int64_t count) { return size == 1 && count <= std::numeric_limits<Index>::max(); }

  void load(const Candidate* list, int, A) {
    values = splat<V>(-std::numeric_limits<A>::infinity());
    index = I{} - 1;
    values[0] = static_cast<A>(list[0].value);
    if (list[0].index != core::kNoIndex) index[0] = static_cast<Index>(list[0].index);
  }

  // The largest lane, the lowest index among equal ones.
  void store(Candidate* list) const {
    int best = 0;
    for (int i = 1; i < W; ++i) {
      if (index[i] < 0) continue;
      if (index[best] < 0 || values[i] > values[best] || (values[i] == values[best] && index[i] < index[best])) best = i;
    }
    list[0] = {static_cast<double>(values[best]), index[best] < 0 ? core::kNoIndex : static_cast<int64_t>(index[best])};
  }

  LPNORM_INLINE void take(V v, int64_t first, uint32_t valid) {
    I lane;
    for (int i = 0; i < W; ++i) lane[i] = i;
    const I beats = (v > values) & (lane < __builtin_popcount(valid));  // valid: lanes [0, n)
    values = beats ? v : values;
    index = beats ? splat<I>(static_cast<Index>(first)) + lane : index;
  }
};

// The lists stay in memory (longer than a vector, or indices beyond the index lanes).
struct ListsInMemory {};

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
