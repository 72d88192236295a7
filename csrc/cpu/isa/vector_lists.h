// One channel's extreme list in a vector: the channel-major walk's lists of the largest
// values (or of the largest -x, for the smallest) while it walks one channel, in registers.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/isa/vectors.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

// The `size` (<= W) largest values offered, largest first, with their flat indices, as
// core::offer_extreme keeps them in a Candidate list: there every offer walked the list in
// memory with a compare and a branch per entry ((4, 512, 7, 7) topk forward: 6x torch's, the
// offers most of it); here an offer is a few whole-vector operations. Values must arrive in
// increasing flat order, so one equal to a kept value never displaces it (ties to the lowest
// index, as core's order). Lanes past `size` hold what fell off the list, never written back.
template <typename A>
struct VectorList {
  using V = typename Simd<A>::V;
  using I = typename Simd<A>::Mask;  // lanes of A's width: flat indices, -1 for no element
  using Index = std::remove_reference_t<decltype(I{}[0])>;
  static constexpr int W = Simd<A>::W;

  V values;
  I index;
  V bar;  // values[size - 1] in every lane: what an offer must beat to enter
  int size;

  // Flat indices must fit the index lanes (int32 for float lists).
  static bool holds(int64_t size, int64_t count) { return size <= W && count <= std::numeric_limits<Index>::max(); }

  void load(const Candidate* list, int n) {
    size = n;
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

  // Lanes of v that enter the list (NaN never does).
  LPNORM_INLINE uint32_t entering(V v) const { return bitmask(v > bar); }

  // Offers the given lanes of v (flat indices first + lane), in lane order.
  LPNORM_INLINE void offer(V v, uint32_t lanes, int64_t first) {
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
  LPNORM_INLINE void update_bar() { bar = __builtin_shuffle(values, splat<I>(size - 1)); }
};

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
