// Top-k lists of a channels-innermost walk, one per vector lane: the stats pass's extreme
// values (and, for the dense top-k forward, its k largest |x - mean|) with their rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/isa/tile_walks.h"

namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE {
namespace {

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
  // Networks of up to this many levels (k rounded up to even, or to 24, 32, 48 or 64 past 16)
  // are local arrays, in registers where they fit, and take block maxima; longer ones are in
  // memory and take every copy. (Levels in memory from k = 17 on made the (256, 1024) topk
  // forward 2.7x as long at k = 17 as at 16, a (32, 64, 56, 56) channels-last one 1.8x; from
  // k = 33 on, 1T forward at k = 40: (256, 1024) 1.38 ms against 0.55 as local arrays,
  // (32, 64, 28, 28) channels-last 3.4 against 0.87.)
  static constexpr int kMaxLevels = 64;
  // Copies per network entry, at most, where the levels are in registers: a span of m rows
  // takes blocks of 4 where m / 4 >= kBlocksPerLevel * k, of 2 or 1 where it is shorter (the
  // k-th largest of too few block maxima is a loose bound: m = 64, k = 10, blocks of 4 leave
  // 13 candidates on average against 10). Slots per lane and end the flush ranks (more
  // candidates than that, mostly ties, take an exact scalar selection).
  static constexpr int64_t kMaxCopyBlock = 4, kBlocksPerLevel = 6;
  static constexpr int kSlots = 96;  // k = 32 with blocks of 2-4 leaves ~35-40 per lane, k = 64 ~70
  static constexpr A kLowest = -std::numeric_limits<A>::max();  // v >= it: v beats an unfilled -inf
  int64_t per_end = 0, levels = 0, base = 0, groups = 0, capacity = 0, stride = 0;
  int64_t copy_block = 1;  // copies per network entry
  bool dense = false;      // every vector is copied (see every_copy)
  bool full = false;
  std::vector<V> values;  // [group][end][levels], sorted largest first, the top levels - per_end +inf
  std::unique_ptr<V[]> copies;   // [group][stride]
  std::unique_ptr<R[]> copy_rows;  // the copies' rows, relative to `base` (not where dense: row_of)
  int64_t copies_size = 0, copy_rows_size = 0;  // their lengths (they only grow: see start)
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
  std::vector<VD> sort_keys;  // sort_picks' |x - mean| and copies, D lanes of a group at a time
  std::vector<VI64> sort_rows;
  // Set before the last flush where the lists need only cover the k largest |x - mean|
  // (StatsArgs::picked): the channels' means as core has them, [group][W].
  std::vector<double> exact_means;

  // Copies per network entry for a span of `rows` rows and k per end (see kMaxCopyBlock).
  static int64_t block_for(int64_t rows, int64_t k) {
    int64_t block = 1;
    while (block < kMaxCopyBlock && rows >= 2 * block * kBlocksPerLevel * k) block *= 2;
    return block;
  }
  static int64_t levels_for(int64_t k) {
    if (k == 1 || k > kMaxLevels) return k;
    return k <= 16 ? (k + 1) / 2 * 2 : k <= 24 ? 24 : k <= 32 ? 32 : k <= 48 ? 48 : kMaxLevels;
  }
  // For a walk of `rows` rows, `group_count` vectors of channels wide. A thread keeps its
  // lists from walk to walk (see reduce_channels_innermost): the buffers grow as needed, and
  // nothing is read before this walk writes it.
  void start(int64_t group_count, int64_t k, int64_t rows, int64_t first_row) {
    groups = group_count;
    per_end = k;
    levels = levels_for(k);
    dense = rows <= kMaxCopies;
    // A block of rows may run past the capacity before the walk looks at `full`.
    capacity = std::max<int64_t>(1, std::min(kMaxCopies, rows));
    stride = capacity + kBlockRows - 1;
    copy_block = 1;
    if (levels > 1) {  // one level keeps its rows, no copies
      grow(copies, copies_size, groups * stride);
      if (!dense) grow(copy_rows, copy_rows_size, groups * stride);
      if (levels <= kMaxLevels) copy_block = block_for(rows, k);
    }
    values.resize(static_cast<size_t>(groups * 2 * levels));
    top_rows.resize(static_cast<size_t>(groups * 2));
    reset(first_row);
  }
  template <typename E>
  static void grow(std::unique_ptr<E[]>& array, int64_t& size, int64_t wanted) {
    if (wanted <= size) return;
    array.reset(new E[static_cast<size_t>(wanted)]);
    size = wanted;
  }
  // Buffers past kKeptBytes go back after a walk rather than stay with the thread.
  static constexpr int64_t kKeptBytes = int64_t{1} << 20;
  void release_if_large() {
    const auto bytes = [](const auto& v) { return static_cast<int64_t>(v.capacity() * sizeof(v[0])); };
    const int64_t kept = copies_size * static_cast<int64_t>(sizeof(V)) + copy_rows_size * static_cast<int64_t>(sizeof(R)) +
                         bytes(values) + bytes(kept_ids) + bytes(rows) + bytes(found) + bytes(lane_values) +
                         bytes(slot_values) + bytes(slot_rows) + bytes(sort_keys) + bytes(sort_rows);
    if (kept > kKeptBytes) *this = LaneLists{};
  }
  // One end's network empty: the top levels - per_end +inf (they pass x through), the rest -inf.
  void clear_network(V* network) const {
    for (int64_t j = 0; j < levels; ++j) {
      network[j] = splat<V>((j < levels - per_end ? 1 : -1) * std::numeric_limits<A>::infinity());
    }
  }
  // `same_chunk`: the rows from first_row on are of the chunk whose lists were just flushed.
  // Then a network of bounds (levels > 1, in registers: select_rows) keeps its values, each a
  // value of an earlier row already in the chunk's lists: the copies must still beat its k-th
  // value to matter (ties go to the earlier row), and the walk does not copy nearly every
  // vector again until the network refills ((32, 64, 56, 56) channels-last topk: a flush each
  // 2048 copies restarted from -inf).
  void reset(int64_t first_row, bool same_chunk = false) {
    base = first_row;
    full = false;
    const bool keep_bounds = same_chunk && !dense && levels > 1 && levels <= kMaxLevels;
    for (int64_t l = 0; l < groups * 2 && !keep_bounds; ++l) clear_network(values.data() + l * levels);
    copied.assign(static_cast<size_t>(groups), 0);
    inserted.assign(static_cast<size_t>(groups), 0);
    exact_means.clear();
    picked_lanes.clear();
  }
  // The k largest |x - mean| need one network, not two, and fewer candidates than the two
  // ends' k largest values: a bound b on the k-th largest |x - mean| leaves the values with
  // |x - mean| at or above b, ranked by pick_from_copies. Only where the rows of every copy
  // since the last flush are the whole channel, before that flush, and the network keeps a
  // bound (select_rows); past kMaxLevels, for one chunk (`one_chunk`), the copies are sorted
  // instead (sort_picks) where that pays.
  // The means are core's: pivot + sums / count (the sums of x - pivot; no pivot: of x).
  void cover_deviations(const double* sums, const double* pivot, int64_t channels, int64_t count, bool one_chunk) {
    if (!dense || levels <= 1 || count <= 0) return;
    if (levels > kMaxLevels && !(one_chunk && sorting_pays(count, per_end))) return;
    exact_means.assign(static_cast<size_t>(groups * W), 0.0);
    for (int64_t c = 0; c < channels; ++c) {
      exact_means[c] = (pivot != nullptr ? pivot[c] : 0.0) + sums[c] / static_cast<double>(count);
    }
  }
  bool by_deviation() const { return !exact_means.empty(); }
  // Sorting a lane's m copies (sort_picks: n log2(n) (log2(n) + 1) / 4 compare-exchanges, n = m
  // rounded up to a power of two) against the in-memory network over every copy and
  // find_rows_exact, whose cost grows with k: about even at k = 3/4 log2(n) (log2(n) + 1)
  // (1 thread, forward: m = 512 even at k = 65, m = 1024 near k = 110; m = 128, k = 65: 0.24
  // against 1.66 ms).
  static bool sorting_pays(int64_t rows, int64_t k) {
    int64_t log = 0;
    while ((int64_t{1} << log) < rows) ++log;
    return 4 * k >= 3 * log * (log + 1);
  }
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
    V up, low;  // the upper end's k-th value, and minus the lower end's (x < low beats it)
    // One test for both ends: after the first rows most vectors beat neither k-th value.
    // Compares into mask bits, and no negated x ((32, 64, 56, 56) channels-last topk stats
    // pass: a vector compare moved to mask bits and -x were 3 of its 10 instructions a vector).
    LPNORM_INLINE bool beaten_by(V x) const { return (lanes_above(x, up) | lanes_above(low, x)) != 0; }
  };
  LPNORM_INLINE Bounds bounds(int64_t group) const {
    const V* up = values.data() + group * 2 * levels;
    return {up[levels - 1], -up[2 * levels - 1]};
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
      // The block's maximum, pairwise (one max instruction each). A NaN may stand for the
      // block, or drop out of it: either way the block gives the network one of its values
      // or nothing (a NaN never enters), which leaves the k-th value a lower bound. (A chain
      // that skipped NaN exactly, compare and blend per element, was most of the network.)
      auto larger = [](V a, V b) { return a > b ? a : b; };
      auto block_max = [&](int64_t e) {
        const int64_t n = std::min(block, copied[group] - e);
        if (n == 4) return larger(larger(entry(e), entry(e + 1)), larger(entry(e + 2), entry(e + 3)));
        V m = entry(e);
        for (int64_t b = 1; b < n; ++b) m = larger(entry(e + b), m);
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
#pragma GCC unroll 32
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
      case 24: return fn(std::integral_constant<int, 24>{});
      case 32: return fn(std::integral_constant<int, 32>{});
      case 48: return fn(std::integral_constant<int, 48>{});
      case 64: return fn(std::integral_constant<int, 64>{});
      default: return fn(std::integral_constant<int, 0>{});
    }
  }

  // Lane i's index i, a vector: a copy's candidates are packed as ids copy * W + lane.
  static M lane_ids() {
    M id;
    for (int i = 0; i < W; ++i) id[i] = static_cast<R>(i);
    return id;
  }
  // One end's candidates of a group, packed in row order: each id (copy * W + lane, below
  // stride * W) carries its slot, the count of its lane's candidates before it, from bit
  // kIdBits on, counted lane-wise as they are packed. (Counted while dealing, in memory per
  // lane, a candidate waited on the last one of its lane: (256, 1024) topk forward, 1 thread,
  // 1/5 of pick_from_copies.)
  static constexpr int kIdBits = 16;
  static_assert((kMaxCopies + kBlockRows) * W <= (int64_t{1} << kIdBits), "ids fit below the slots");
  struct Kept {
    R* ids;
    int64_t count = 0;
    M before{};  // per lane: its candidates so far, << kIdBits
    LPNORM_INLINE void add(M id, uint32_t mask) {
      count += compress(id + before, mask, ids + count);
      before = add_where(before, mask, splat<M>(static_cast<R>(R{1} << kIdBits)));
    }
  };
  // Deals group gi's candidates to the per-lane slots, each value times `sign`: lane i's s-th
  // candidate to slot s, slot kSlots taking every one past capacity. taken[i]: lane i's
  // candidates.
  LPNORM_INLINE void deal_to_slots(int64_t gi, const Kept& kept, A sign, int* taken) {
    const A* copy_value = reinterpret_cast<const A*>(copies.get() + gi * stride);  // lane of copy e at e * W + lane
    for (int i = 0; i < W; ++i) taken[i] = static_cast<int>(kept.before[i] >> kIdBits);
    constexpr size_t kIdMask = (size_t{1} << kIdBits) - 1;
    for (int64_t q = 0; q < kept.count; ++q) {
      const auto packed = static_cast<size_t>(kept.ids[q]);  // unsigned: / and % by W are shifts
      const size_t id = packed & kIdMask, lane = id % W;
      const size_t at = std::min(packed >> kIdBits, static_cast<size_t>(kSlots)) * W + lane;
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
      } else if (by_deviation() && picks != nullptr) {
        sort_picks(tail, picks);
      } else {
        find_rows_exact(tail);
      }
    });
  }

  // The buffers the flush's selection fills (select_rows, pick_chunks): the lists' rows, the
  // candidates' ids, the slots; returns the room for one end's ids.
  int64_t prepare_selection() {
    const int64_t ids_capacity = (stride + 1) * W;  // every lane of every copy, and a vector of room
    rows.assign(static_cast<size_t>(groups * 2 * per_end * W), kFree);
    found.resize(rows.size());
    kept_ids.resize(static_cast<size_t>(2 * ids_capacity));
    slot_values.resize(static_cast<size_t>((kSlots + 1) * W));
    slot_rows.resize(slot_values.size());
    picked_lanes.assign(static_cast<size_t>(groups), 0);
    return ids_capacity;
  }
  // The lists from the copies where the network kept a bound: each end's lanes at or above
  // its bound are packed, in row order, into one list of ids per end (branch-free: a loop over
  // the lanes of each copy mispredicted its exit on nearly every one), then dealt to per-lane
  // slots; each slot's place is counted against the other slots of its lane, all lanes at once.
  template <int K>
  void select_rows(int tail, core::Deviation* picks) {
    constexpr int S = kSlots;
    const int64_t ids_capacity = prepare_selection();
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
      Kept kept[2] = {{kept_ids.data()}, {kept_ids.data() + ids_capacity}};
      // -x >= bound as x <= -bound; the lanes' mask as bits (one instruction per compare).
      const V upper = bound[0], lower = -bound[1];
      const uint32_t lanes = bitmask(valid);
      M id = lane_ids();
      const M step = splat<M>(static_cast<R>(W));
      for (int64_t e = 0, count = copied[gi]; e < count; ++e, id += step) {
        const V v = x[e];
        kept[0].add(id, lanes_at_least(v, upper) & lanes);
        kept[1].add(id, lanes_at_least(lower, v) & lanes);
      }
      for (int end = 0; end < 2; ++end) {
        int taken[W];
        deal_to_slots(gi, kept[end], end == 0 ? A(1) : A(-1), taken);
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
  // Copies [lo, hi) only where hi >= 0 (a chunk's range: pick_chunks).
  void select_lane_exact(int64_t gi, int end, int i, A bound, int64_t lo = 0, int64_t hi = -1) {
    merged.assign(static_cast<size_t>(per_end), Candidate{});
    core::reset_extremes(merged.data(), per_end);
    const V* x = copies.get() + gi * stride;
    for (int64_t e = lo, e_end = hi >= 0 ? hi : copied[gi]; e < e_end; ++e) {
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

  // Whether two different values may have one |x - mean| in double, D lanes at a time, from
  // the largest rounding of a key and the smallest gap between two values in A (see
  // pick_from_copies): where they may, a key order by row is not core's order.
  struct KeyCollisions {
    VD rounding = splat<VD>(std::numeric_limits<double>::denorm_min());
    VD gap = splat<VD>(std::numeric_limits<double>::infinity());
    LPNORM_INLINE void add(VD value, VD key, VI64 filled) {
      constexpr double kRounding = std::numeric_limits<double>::epsilon();
      constexpr double kGap = std::numeric_limits<A>::epsilon() / 2;
      const VD least_gap = splat<VD>(static_cast<double>(std::numeric_limits<A>::denorm_min()));
      const VD none = splat<VD>(std::numeric_limits<double>::infinity());
      const VD slot_rounding = key * kRounding;
      VD slot_gap = vabs(value) * kGap;
      slot_gap = slot_gap > least_gap ? slot_gap : least_gap;
      slot_gap = value != 0 & filled ? slot_gap : none;  // zero: the other value's gap
      rounding = slot_rounding > rounding & filled ? slot_rounding : rounding;
      gap = slot_gap < gap ? slot_gap : gap;
    }
    VI64 possible() const { return ~(rounding < gap); }
  };

  // Sorts entries [0, n) of each lane (n a power of two) into core's pick order: |x - mean|
  // descending, equal ones by row (rows distinct). A bitonic network: branch-free and the
  // same for every lane, n log2(n) (log2(n) + 1) / 4 compare-exchanges.
  static void sort_in_pick_order(VD* key, VI64* row, int64_t n) {
    for (int64_t size = 2; size <= n; size *= 2) {
      for (int64_t half = size / 2; half > 0; half /= 2) {
        for (int64_t i = 0; i < n; i += 2 * half) {
          const bool reversed = (i & size) != 0;  // blocks alternate, so each `size` block merges sorted
          for (int64_t a = i; a < i + half; ++a) {
            const int64_t b = a + half;
            const VD ka = key[a], kb = key[b];
            const VI64 ra = row[a], rb = row[b];
            const VI64 b_first = kb > ka | (kb == ka & rb < ra);
            const VI64 swap = reversed ? ~b_first : b_first;
            key[a] = swap ? kb : ka;
            key[b] = swap ? ka : kb;
            row[a] = swap ? rb : ra;
            row[b] = swap ? ra : rb;
          }
        }
      }
    }
  }

  // Where k > kMaxLevels and the copies hold every row of whole channels (cover_deviations):
  // group gi's picks by sorting each lane's copies, D lanes at a time (sort_in_pick_order),
  // without a network. Its bound would be exact only over every copy: the in-memory network
  // and the placement of each hit (find_rows_exact) cost O(m k) a lane, and (256, 1024) with
  // k = 128 took 8 ms at 1 thread, 50x k = 10. Lanes with NaN or inf, or whose keys may
  // collide (KeyCollisions), get both ends' exact lists for core's pick, as in
  // pick_from_copies.
  void sort_picks(int tail, core::Deviation* picks) {
    constexpr int D = Simd<double>::W;
    typedef A Lanes __attribute__((vector_size(D * sizeof(A))));  // D lanes, widened to double
    prepare_selection();
    const int64_t P = per_end;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint32_t lanes = bitmask(gi + 1 < groups ? ~M{} : lanes_below<A>(tail));
      const int64_t count = copied[gi];
      int64_t n = 1;
      while (n < count) n *= 2;
      sort_keys.resize(static_cast<size_t>(n));
      sort_rows.resize(static_cast<size_t>(n));
      const A* x = reinterpret_cast<const A*>(copies.get() + gi * stride);  // lane of copy e at e * W + lane
      for (int h = 0; h * D < W; ++h) {
        VD lane_mean;
        std::memcpy(&lane_mean, exact_means.data() + gi * W + h * D, sizeof lane_mean);
        KeyCollisions collisions;
        VI64 finite = ~VI64{};
        for (int64_t e = 0; e < count; ++e) {
          Lanes narrow;
          std::memcpy(&narrow, x + e * W + h * D, sizeof narrow);
          const VD value = __builtin_convertvector(narrow, VD);
          const VD key = vabs(value - lane_mean);
          sort_keys[e] = key;
          sort_rows[e] = splat<VI64>(e);  // the copies are the rows in order (dense)
          collisions.add(value, key, ~VI64{});
          finite &= key < std::numeric_limits<double>::infinity();  // NaN not
        }
        for (int64_t e = count; e < n; ++e) {  // after every key, in row order
          sort_keys[e] = splat<VD>(-1.0);
          sort_rows[e] = splat<VI64>(kMaxSpan + e);
        }
        sort_in_pick_order(sort_keys.data(), sort_rows.data(), n);
        const uint32_t ok = (lanes >> (h * D)) & bitmask(finite & ~collisions.possible()) & ((1u << D) - 1);
        for (uint32_t bits = ok; bits != 0; bits &= bits - 1) {
          const int l = __builtin_ctz(bits);
          core::Deviation* out = picks + (gi * W + h * D + l) * P;
          for (int64_t j = 0; j < P; ++j) {
            const int64_t e = sort_rows[j][l];
            out[j] = {static_cast<double>(x[e * W + h * D + l]), base + row_of(gi, e), sort_keys[j][l]};
          }
        }
        picked_lanes[gi] |= ok << (h * D);
      }
      for (uint32_t bits = lanes & ~picked_lanes[gi]; bits != 0; bits &= bits - 1) {
        for (int end = 0; end < 2; ++end) select_lane_exact(gi, end, __builtin_ctz(bits), kLowest);
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
  // The copies [lo, hi) where hi >= 0 (a chunk's: pick_chunks), lane i's picks at
  // picks + i * lane_stride (lane_stride 0: per_end).
  void pick_from_copies(int64_t gi, M valid, core::Deviation* picks, int64_t lo = 0, int64_t hi = -1,
                        int64_t lane_stride = 0) {
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
    Kept kept{kept_ids.data()};
    const int64_t first = lo, last = hi >= 0 ? hi : copied[gi];
    const M step = splat<M>(static_cast<R>(W));
    M id = lane_ids() + splat<M>(static_cast<R>(first * W));
    for (int64_t e = first; e < last; ++e, id += step) kept.add(id, lanes_at_least(vabs(x[e] - mean), near) & finite);
    int taken[W];
    deal_to_slots(gi, kept, A(1), taken);
    uint32_t pickable = finite;
    for (int i = 0; i < W; ++i) {
      if (taken[i] > S || taken[i] < P) pickable &= ~(1u << i);
    }
    for (int h = 0; h * D < W; ++h) {  // D lanes at a time, in double
      // Slots to rank: the most any pickable lane of these D holds (the others go to
      // select_lane_exact, whatever their slots say).
      int most = 0;
      for (int l = 0; l < D; ++l) most = (pickable >> (h * D + l) & 1) != 0 ? std::max(most, taken[h * D + l]) : most;
      VD lane_mean;
      std::memcpy(&lane_mean, exact_means.data() + gi * W + h * D, sizeof lane_mean);
      VI64 count;
      for (int l = 0; l < D; ++l) count[l] = taken[h * D + l];
      VD value[S], key[S];
      VI64 row[S], filled[S];
      for (int s = 0; s < most; ++s) {
        Lanes narrow;
        LaneRows narrow_row;
        std::memcpy(&narrow, slot_values.data() + s * W + h * D, sizeof narrow);
        std::memcpy(&narrow_row, slot_rows.data() + s * W + h * D, sizeof narrow_row);
        value[s] = __builtin_convertvector(narrow, VD);
        row[s] = __builtin_convertvector(narrow_row, VI64) + base;
        key[s] = vabs(value[s] - lane_mean);
        filled[s] = s < count;
      }
      // A slot's place: the filled slots of its lane before it (larger key, or an equal key
      // in an earlier row); places from P on go to one spare entry per lane.
      VI64 place[S];
      for (int s = 0; s < most; ++s) {
        VI64 before{};
        for (int t = 0; t < s; ++t) before -= key[t] >= key[s] & filled[t];
        for (int t = s + 1; t < most; ++t) before -= key[t] > key[s] & filled[t];
        place[s] = before;
      }
      // Equal keys are core's order too where they are equal values (an end's list orders them
      // by row) or mean +- d, not where two different values' x - mean round to one double
      // (1e-30 and 2e-30 around a mean of 1: core's lists order those by value). That needs
      // two values closer than an ulp of their d, at most 2^-52 |d| (or the least subnormal);
      // two different values in A are at least the smaller nonzero one's |x| * epsilon / 2 (or
      // A's least subnormal) apart. A lane whose largest such ulp is below its smallest such
      // gap has no such pair. (Comparing every pair's d and value was a third of the ranking.)
      KeyCollisions collisions;
      for (int s = 0; s < most; ++s) collisions.add(value[s], key[s], filled[s]);
      const VI64 collapsed = collisions.possible();
      // Straight into picks, lane by lane: a staging copy read back whole waited on its
      // scalar stores.
      const uint32_t ok = (pickable >> (h * D)) & ~bitmask(collapsed) & ((1u << D) - 1);
      for (uint32_t bits = ok; bits != 0; bits &= bits - 1) {
        const int l = __builtin_ctz(bits);
        core::Deviation* out = picks + (h * D + l) * (lane_stride > 0 ? lane_stride : P);
        for (int s = 0; s < count[l]; ++s) {
          if (place[s][l] < P) out[place[s][l]] = {value[s][l], row[s][l], key[s][l]};
        }
      }
      picked_lanes[gi] |= ok << (h * D);
    }
    for (uint32_t bits = lanes & ~picked_lanes[gi]; bits != 0; bits &= bits - 1) {
      for (int end = 0; end < 2; ++end) select_lane_exact(gi, end, __builtin_ctz(bits), kLowest, lo, hi);
    }
  }
  // Where the copies hold every row of whole channels cut into `chunks` chunks of `chunk_rows`
  // rows (cover_deviations; the walk did not flush where chunks start): each chunk's k largest
  // |x - mean| from its own copy range through its own network, into picks ([lane][chunks]
  // [per_end], the walk's channel c0 first). A chunk's lanes that pick_from_copies leaves get
  // both ends' exact lists of the chunk, written to ext's lists for it; a picked lane's lists
  // stay as collect_stats reset them.
  template <typename Ext>
  void pick_chunks(const Ext& ext, int tail, int64_t c0, core::Deviation* picks, int64_t chunks, int64_t chunk_rows) {
    prepare_selection();
    // Blocks for a chunk's rows, not the channel's (start): a chunk of 64 rows with k = 10
    // takes every copy, so its bound is exact and its lanes rank about k candidates.
    const int64_t channel_block = copy_block;
    copy_block = block_for(chunk_rows, per_end);
    for (int64_t gi = 0; gi < groups; ++gi) {
      const M valid = gi + 1 < groups ? ~M{} : lanes_below<A>(tail);
      const int64_t all = copied[gi];
      for (int64_t j = 0; j < chunks; ++j) {
        const int64_t lo = j * chunk_rows, hi = lo + chunk_rows;
        clear_network(values.data() + gi * 2 * levels);  // the |x - mean| network, afresh
        inserted[gi] = lo;
        copied[gi] = hi;
        insert_copies(gi);
        copied[gi] = all;
        picked_lanes[gi] = 0;
        pick_from_copies(gi, valid, picks + (gi * W * chunks + j) * per_end, lo, hi, chunks * per_end);
        // The lanes it left: the exact lists select_lane_exact found, written whole.
        flush(ext, gi, c0 + gi * W, gi + 1 < groups ? W : tail, true, base + lo);
      }
      inserted[gi] = all;
    }
    copy_block = channel_block;
  }
  // The lanes of `group` that pick_from_copies picked.
  uint32_t picked(int64_t group) const { return picked_lanes.empty() ? 0 : picked_lanes[group]; }

  // Hands lanes [0, n) of `group` (channels c0 ...) to the tile's Candidate lists. All of a
  // lane's entries go to one chunk's list, already in core's order (largest first, equal
  // values by row). A list still empty (the usual case: one flush per chunk and tile) takes
  // them as they are; one filled by an earlier flush of the chunk is merged with them in
  // O(k) (offering them one by one cost O(k^2), seconds for k ~ m ~ 10^4).
  // Lanes whose largest |x - mean| pick_from_copies picked are not handed over. `whole`: the
  // lists were never reset (one chunk), so each is written whole, its unfilled entries reset,
  // without reading it first (the picked lanes' lists, which nothing reads, are not written:
  // (256, 1024) topk forward, resetting 2k entries per channel was 5% of it).
  template <typename Ext>
  void flush(const Ext& ext, int64_t group, int64_t c0, int n, bool whole, int64_t chunk_row = -1) {
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
        if (count == 0 && !whole) continue;
        // A flush's rows lie in one chunk: the walk flushes where a chunk starts (pick_chunks
        // names the chunk: its lists hold only one chunk's rows).
        Candidate* list = ext.lists(end == 0 ? ext.largest : ext.smallest, c0 + i, chunk_row >= 0 ? chunk_row : base);
        if (whole || list[0].index == core::kNoIndex) {
          for (int64_t j = 0; j < count; ++j) list[j] = entry(j);
          if (whole) core::reset_extremes(list + count, per_end - count);
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

}  // namespace
}  // namespace lpnorm::cpu::LPNORM_ISA_NAMESPACE
