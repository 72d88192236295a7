// The per-channel step between the statistics pass and the element-wise pass, shared by
// every backend: from what a pass collected, the channel's mean, sigma, 1/sqrt(sigma^2+eps)
// and the coefficients of its gradient (SPEC §1-§3). A norm's math lives here and only here.
//
// The formulas are inline and LPNORM_HOST_DEVICE, so the CUDA kernels run the very same code
// on the device (csrc/cuda). What needs the host (the cached numerical integration of the
// consistency constants) stays out of them: `channel_statistics_with` takes the constants as
// arguments, `channel_statistics` computes them and calls it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "norm.h"

namespace lpnorm::core {

// One value offered to an extreme list, with its flat index n * S + s inside the channel.
struct Candidate {
  double value;
  int64_t index;
};

constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();
// The index of a pick list's entry 0 where a backend did not pick that chunk
// (ChannelSums::picked).
constexpr int64_t kNotPicked = -1;

LPNORM_HOST_DEVICE LPNORM_INLINE void reset_extremes(Candidate* list, int64_t capacity) {
  for (int64_t i = 0; i < capacity; ++i) list[i] = {-std::numeric_limits<double>::infinity(), kNoIndex};
}

LPNORM_HOST_DEVICE LPNORM_INLINE bool candidate_beats(double value, int64_t index, const Candidate& other) {
  return value > other.value || (value == other.value && index < other.index);
}

// Keeps the `capacity` largest values offered, largest first. Ties go to the lowest index,
// so the result does not depend on the order elements are visited in. NaN never enters.
// (The list of smallest values stores negated values and uses the same function.)
LPNORM_HOST_DEVICE LPNORM_INLINE void offer_extreme(Candidate* list, int64_t capacity, double value, int64_t index) {
  if (!candidate_beats(value, index, list[capacity - 1])) return;
  int64_t pos = capacity - 1;
  while (pos > 0 && candidate_beats(value, index, list[pos - 1])) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = {value, index};
}

LPNORM_HOST_DEVICE LPNORM_INLINE void merge_extremes(Candidate* into, const Candidate* from, int64_t capacity) {
  for (int64_t i = 0; i < capacity && from[i].index != kNoIndex; ++i) {
    offer_extreme(into, capacity, from[i].value, from[i].index);
  }
}

// An element of the pool from which the largest |x - mean| of a chunk are picked.
struct Deviation {
  double x;
  int64_t index;
  double magnitude;  // |x - mean|; NaN sorts last
};

// What the statistics passes collected for one channel.
struct ChannelSums {
  int64_t count = 0;           // m, the elements of the channel
  double sum = 0;              // sum of x
  double deviation_sum = 0;    // sum |d|^q (dense norms, second pass)
  double phi_sum = 0;          // sum phi(d)  (dense norms, second pass)
  const Candidate* largest = nullptr;   // [chunks][extremes_per_end], values x
  const Candidate* smallest = nullptr;  // [chunks][extremes_per_end], values -x
  // topk, where a backend picked the largest |x - mean| itself, [chunks][extremes_per_end]:
  // what pick_largest_deviations would return for each chunk, in its order, index kNoIndex
  // past the last; a chunk whose entry 0 has index kNotPicked was not picked.
  const Deviation* picked = nullptr;
};

// The channel's statistics and the coefficients of dsigma/dx_i = a * phi(d_i) + b + sparse_i.
struct ChannelStatistics {
  double mean = 0;
  double sigma = 0;
  double invstd = 0;
  double phi_scale = 0;      // a
  double phi_offset = 0;     // b
  double unbiased_var = 0;   // sigma^2 * m / (m - 1), what running_var averages
};

LPNORM_HOST_DEVICE inline double channel_mean(const ChannelSums& sums) {
  return sums.count > 0 ? sums.sum / static_cast<double>(sums.count) : 0.0;
}

// The pivot p the stats passes sum x - p around, every backend alike: the mean of a channel's
// first min(m, kPivotElements) flat elements (their sum, least and largest value given, in
// double), rounded to a multiple of 2^(e - 6), 2^e <= their spread, then to the accumulation
// type A the passes subtract it in. The coarse multiple leaves x - p no bits below the data's
// own where x lies on a coarse grid (half inputs, float32 holding half values): with every bit
// of the mean in p, the float sums of x - p rounded the same low bits of p away term after
// term (float16-valued channels of 1568 elements: means up to 10 float ulps of sigma off,
// where random rounding leaves a fraction of one, and top-k picks and l1's signs moved). 0
// (no shift) where that is not finite (every x - p NaN, the mean NaN where torch's is inf)
// or near A's largest value (x - p of the other sign would overflow: -3e38 then +3e38 in
// float32 gave an inf mean).
constexpr int64_t kPivotElements = 8;
template <typename A>
LPNORM_HOST_DEVICE inline double channel_pivot(double sum_of_first, int64_t first, double lowest, double highest) {
  double p = sum_of_first / static_cast<double>(first);
  const double spread = highest - lowest;  // 0 where they are equal (a constant channel keeps its exact p)
  if (spread > 0 && spread <= std::numeric_limits<double>::max()) {
    // 2^e from spread's exponent bits (0 where it is subnormal), and p / grid rounded to an
    // integer by adding and subtracting 1.5 * 2^52: no libm call per channel (ilogb, ldexp and
    // nearbyint made (256, 1024)'s pivots a few us of a 70 us forward).
    uint64_t bits;
    __builtin_memcpy(&bits, &spread, sizeof bits);
    bits &= 0x7FF0000000000000ull;
    double unit;
    __builtin_memcpy(&unit, &bits, sizeof unit);
    const double grid = unit / 64, steps = p / grid;
    constexpr double kRounder = 6755399441055744.0, kExact = 2251799813685248.0;  // 1.5 * 2^52, 2^51
    if (grid > 0 && std::abs(steps) < kExact) p = ((steps + kRounder) - kRounder) * grid;
  }
  p = static_cast<double>(static_cast<A>(p));
  return std::abs(p) <= static_cast<double>(std::numeric_limits<A>::max()) / 4 ? p : 0.0;  // NaN too
}

// The divisor of a chunk's raw statistic (max |d|, mean of the top-k |d|, or max - min) that
// makes sigma consistent for Gaussian data; `chunk_count` is m / chunks. Host only (cached
// numerical integration): a backend computes it once per call, it depends on the chunk size only.
double extreme_divisor(const NormSpec& spec, int64_t chunk_count);

// The host-computed constants channel_statistics_with needs (1 where a norm has none).
struct ChannelConstants {
  double extreme_divisor = 1.0;  // extreme_divisor(spec, m / chunks): linf, topk, range
  double lp_constant = 1.0;      // lp_consistency(p): norm p
};

// Host only: the constants of `spec` for channels of `count` elements.
ChannelConstants channel_constants(const NormSpec& spec, int64_t count);

// Scratch entries channel_statistics_with needs: the pool of one chunk.
LPNORM_HOST_DEVICE inline int64_t deviation_scratch_size(const NormSpec& spec) { return 2 * spec.extremes_per_end(); }

namespace detail {

LPNORM_HOST_DEVICE inline double deviation_key(const Deviation& d) {
  return std::isnan(d.magnitude) ? -1.0 : d.magnitude;
}

LPNORM_HOST_DEVICE inline bool deviation_before(const Deviation& a, const Deviation& b) {
  const double ka = deviation_key(a), kb = deviation_key(b);
  return ka > kb || (ka == kb && a.index < b.index);
}

// Lists up to this long have their |d| computed before the merge (pick_largest_deviations).
constexpr int64_t kShortList = 16;

// The `picks` largest |x - mean| of one chunk, largest first, into pool[0, returned count).
// They are among its largest and smallest raw values (KERNEL-NOTES), so the pass kept only
// those; ties go to the lowest index. `pool` holds 2 * per_end entries. The result is the
// pool of both lists' entries ordered by deviation_before, cut after `picks`.
LPNORM_HOST_DEVICE inline int64_t pick_largest_deviations(const Candidate* largest, const Candidate* smallest,
                                                          int64_t per_end, int64_t picks, double mean,
                                                          Deviation* pool) {
  // Usually every kept large value lies at or above the mean and every kept small value below
  // it. Then |x - mean| does not increase along either list (rounding is monotone), the lists
  // share no element, and the ordered pool is their merge: O(per_end) per chunk, where the
  // selection below is O(per_end * picks) (for topk with k = 10 it was most of the per-channel
  // math). Lists that reach across the mean (chunks barely larger than per_end) or meet NaN or
  // Inf take the selection.
  int64_t upper = 0, lower = 0;  // filled entries (the lists fill from the front)
  bool merge = true;
  // Each list must also be in the pool's order: equal |d| of different values (rounded
  // together) with their indices in increasing order, which the list's order by value does
  // not promise.
  for (; upper < per_end && largest[upper].index != kNoIndex; ++upper) {
    const double d = largest[upper].value - mean;
    if (!(d >= 0)) merge = false;
    if (upper > 0 && d == largest[upper - 1].value - mean && largest[upper].index < largest[upper - 1].index) {
      merge = false;
    }
  }
  for (; lower < per_end && smallest[lower].index != kNoIndex; ++lower) {
    const double d = -smallest[lower].value - mean;
    if (!(d < 0)) merge = false;
    if (lower > 0 && d == -smallest[lower - 1].value - mean && smallest[lower].index < smallest[lower - 1].index) {
      merge = false;
    }
  }
  // The merge by (|d| descending, index ascending); up_key(i) and down_key(j) are -1 past the
  // end of their list, below every |d|.
  auto merge_by = [&](auto up_key, auto down_key) {
    const int64_t size = upper + lower < picks ? upper + lower : picks;
    int64_t i = 0, j = 0;
    for (int64_t out = 0; out < size; ++out) {
      const Candidate& up = largest[i < upper ? i : 0];
      const Candidate& down = smallest[j < lower ? j : 0];
      const double a = up_key(i), b = down_key(j);
      const bool take_up = (a > b) | ((a == b) & (up.index < down.index));
      pool[out].x = take_up ? up.value : -down.value;
      pool[out].index = take_up ? up.index : down.index;
      pool[out].magnitude = take_up ? a : b;
      i += take_up;
      j += !take_up;
    }
    return size;
  };
  if (merge && upper <= kShortList && lower <= kShortList) {
    // Short lists (topk, k = 10): the |d| computed first, so the chain from pick to pick is a
    // load, a compare and an add ((256, 1024) topk: 25% less time in this function).
    double up[kShortList + 1], down[kShortList + 1];
    for (int64_t i = 0; i < upper; ++i) up[i] = std::abs(largest[i].value - mean);
    for (int64_t j = 0; j < lower; ++j) down[j] = std::abs(-smallest[j].value - mean);
    up[upper] = down[lower] = -1.0;
    return merge_by([&](int64_t i) { return up[i]; }, [&](int64_t j) { return down[j]; });
  }
  if (merge) {
    return merge_by([&](int64_t i) { return i < upper ? std::abs(largest[i].value - mean) : -1.0; },
                    [&](int64_t j) { return j < lower ? std::abs(-smallest[j].value - mean) : -1.0; });
  }

  // The pool of both lists, ordered by a heap whose root is the first in deviation_before's
  // order: O(size + picks log size). (A selection, with a search for the element both lists
  // hold, was O(size * picks): where k is near m / 2 every list crosses the mean, and
  // (256, 1024) topk with k = 128 took 300x torch's time.)
  int64_t size = 0;
  for (int64_t i = 0; i < per_end; ++i) {
    if (largest[i].index != kNoIndex) pool[size++] = {largest[i].value, largest[i].index, std::abs(largest[i].value - mean)};
  }
  for (int64_t i = 0; i < per_end; ++i) {
    if (smallest[i].index != kNoIndex) pool[size++] = {-smallest[i].value, smallest[i].index, std::abs(-smallest[i].value - mean)};
  }
  auto sift_down = [&](int64_t node, int64_t end) {
    for (int64_t child = 2 * node + 1; child < end; node = child, child = 2 * node + 1) {
      if (child + 1 < end && deviation_before(pool[child + 1], pool[child])) ++child;
      if (!deviation_before(pool[child], pool[node])) return;
      const Deviation held = pool[node];
      pool[node] = pool[child];
      pool[child] = held;
    }
  };
  for (int64_t node = size / 2 - 1; node >= 0; --node) sift_down(node, size);
  // Each pop moves the root to the slot the heap gives up at its end, so the picks gather at
  // the back, the first last. An element both lists hold (a small chunk) pops twice in a row:
  // equal in the order, nothing falls between them.
  int64_t end = size, count = 0;
  while (end > 0 && count < picks) {
    const Deviation first = pool[0];
    pool[0] = pool[--end];
    sift_down(0, end);
    if (count > 0 && pool[size - count].index == first.index) continue;
    pool[size - 1 - count++] = first;
  }
  for (int64_t i = size - count, j = size - 1; i < j; ++i, --j) {  // the first first
    const Deviation held = pool[i];
    pool[i] = pool[j];
    pool[j] = held;
  }
  for (int64_t i = 0; i < count; ++i) pool[i] = pool[size - count + i];  // to the front
  return count;
}

}  // namespace detail

// The sparse coefficients' scales of an extreme norm, the same for every channel: d sigma / d
// raw per chunk (`unit`), and per pick where raw is the mean of sparse_per_chunk |d|.
struct ExtremeScales {
  double unit;
  double per_pick;
};
LPNORM_HOST_DEVICE LPNORM_INLINE ExtremeScales extreme_scales(const NormSpec& spec, double divisor) {
  const double unit = 1.0 / (static_cast<double>(spec.chunks) * divisor);
  return {unit, unit / static_cast<double>(spec.sparse_per_chunk())};
}

// A pick's coefficient of dsigma/dx (without the mean term): the sign of its d times the
// weight of one pick.
LPNORM_HOST_DEVICE LPNORM_INLINE double pick_coefficient(double x, double mean, double per_pick) {
  return sign_of(x - mean) * per_pick;
}

// One chunk of an extreme norm: its picks (the largest |x - mean|: `picked` where the backend
// picked them, else from its lists) or its max and min, into the chunk's sparse terms, each
// coefficient also added to coef_sum in order. Returns the chunk's raw statistic before the
// division by the picks' count (raw_statistic): the sum of their |d|, or max - min.
template <typename Coef>
LPNORM_HOST_DEVICE double chunk_extremes(const NormSpec& spec, const Candidate* largest, const Candidate* smallest,
                                         const Deviation* picked, double mean, double unit, double per_pick,
                                         int64_t* index, Coef* coef, Deviation* pool, double& coef_sum) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t per_end = spec.extremes_per_end();
  const int64_t per_chunk = spec.sparse_per_chunk();
  if (spec.kind == NormKind::Range) {
    // max - min needs no mean, but NaN never enters the lists: a channel with a NaN (whose mean
    // is NaN) gives NaN, as every other norm, not the range of its other values (SPEC §5); a
    // channel of NaNs has no candidates.
    const bool found = largest[0].index != kNoIndex && smallest[0].index != kNoIndex && mean == mean;
    index[0] = found ? largest[0].index : 0;
    index[1] = found ? smallest[0].index : 0;
    const double c0 = found ? unit : nan, c1 = found ? -unit : nan;
    coef[0] = static_cast<Coef>(c0);
    coef[1] = static_cast<Coef>(c1);
    coef_sum += c0;
    coef_sum += c1;
    return found ? largest[0].value + smallest[0].value : nan;
  }
  int64_t top = 0;
  if (picked != nullptr) {
    while (top < per_chunk && picked[top].index != kNoIndex) ++top;
  } else {
    top = detail::pick_largest_deviations(largest, smallest, per_end, per_chunk, mean, pool);
    picked = pool;
  }
  double total = 0;
  // The running sum in a local: through the reference, which may alias coef, each addition
  // waited on the last one's store ((256, 1024) topk with 4 chunks: 13% of its forward).
  double sum = coef_sum;
  for (int64_t i = 0; i < per_chunk; ++i) {
    const bool found = i < top;
    total += found ? picked[i].magnitude : nan;
    index[i] = found ? picked[i].index : 0;
    const double c = found ? pick_coefficient(picked[i].x, mean, per_pick) : nan;
    coef[i] = static_cast<Coef>(c);
    sum += c;
  }
  coef_sum = sum;
  return total;
}

// A chunk's raw statistic from chunk_extremes' result: the mean of the picks' |d|, or max - min.
LPNORM_HOST_DEVICE LPNORM_INLINE double raw_statistic(NormKind kind, double numerator, int64_t per_chunk) {
  return kind == NormKind::Range ? numerator : numerator / static_cast<double>(per_chunk);
}

// sigma, the mean over chunks of raw / divisor (summed in sigma_sum), and b: every d_i also
// moves through the mean, -(1/m) * the sum of the sparse coefficients.
LPNORM_HOST_DEVICE LPNORM_INLINE void extreme_sigma(double sigma_sum, double coef_sum, int64_t chunks, int64_t count,
                                                    ChannelStatistics& stats) {
  stats.sigma = sigma_sum / static_cast<double>(chunks);
  stats.phi_offset = -coef_sum / static_cast<double>(count);
}

// linf, topk and range, the chunks of one channel (mean: channel_mean): the sum over chunks of
// raw / divisor into sigma_sum, the sparse coefficients' sum into coef_sum, each chunk's sparse
// terms. A backend may compute the same sums for many channels at once, chunk by chunk in this
// order (the additions' order is the result's), and hand the channels to extreme_sigma.
template <typename Coef>
LPNORM_HOST_DEVICE void extreme_sums(const NormSpec& spec, const ChannelSums& sums, double mean, double divisor,
                                     int64_t* sparse_index, Coef* sparse_coef, Deviation* pool, double& sigma_sum,
                                     double& coef_sum) {
  const int64_t per_end = spec.extremes_per_end();
  const int64_t per_chunk = spec.sparse_per_chunk();
  const ExtremeScales scales = extreme_scales(spec, divisor);
  // A chunk's picks where the backend picked them.
  auto chunk_picks = [&](int64_t chunk) -> const Deviation* {
    const Deviation* picks = sums.picked != nullptr ? sums.picked + chunk * per_end : nullptr;
    return picks != nullptr && picks[0].index != kNotPicked ? picks : nullptr;
  };
  double sigma = 0, coefs = 0;
  for (int64_t chunk = 0; chunk < spec.chunks; ++chunk) {
    const double numerator =
        chunk_extremes(spec, sums.largest + chunk * per_end, sums.smallest + chunk * per_end, chunk_picks(chunk), mean,
                       scales.unit, scales.per_pick, sparse_index + chunk * per_chunk, sparse_coef + chunk * per_chunk,
                       pool, coefs);
    sigma += raw_statistic(spec.kind, numerator, per_chunk) / divisor;
  }
  sigma_sum = sigma;
  coef_sum = coefs;
}

// linf, topk and range: sigma is the mean over chunks of a raw extreme statistic divided by
// its expected value for unit Gaussians; the gradient is sparse at the extremes.
template <typename Coef>
LPNORM_HOST_DEVICE void extreme_statistics(const NormSpec& spec, const ChannelSums& sums, double divisor,
                                           ChannelStatistics& stats, int64_t* sparse_index, Coef* sparse_coef,
                                           Deviation* pool) {
  double sigma_sum = 0, coef_sum = 0;
  extreme_sums(spec, sums, stats.mean, divisor, sparse_index, sparse_coef, pool, sigma_sum, coef_sum);
  extreme_sigma(sigma_sum, coef_sum, spec.chunks, sums.count, stats);
}

// Dense norms (l2, l1, p): sigma and the gradient's a and b from a channel's m elements and
// its sums of |d|^q and phi(d). Plain values in and out, so a backend can run it over many
// channels in one loop that the compiler vectorizes (with `kind` a constant there).
LPNORM_HOST_DEVICE LPNORM_INLINE void dense_statistics(NormKind kind, double m, double p, double lp_constant,
                                                       double deviation_sum, double phi_sum, ChannelStatistics& stats) {
  constexpr double kSqrtHalfPi = 1.2533141373155002512;  // sqrt(pi / 2)
  switch (kind) {
    case NormKind::L2:
      stats.sigma = std::sqrt(deviation_sum / m);
      stats.phi_scale = stats.sigma > 0 ? 1.0 / (m * stats.sigma) : 0.0;
      break;
    case NormKind::L1:
      stats.sigma = kSqrtHalfPi * deviation_sum / m;
      stats.phi_scale = kSqrtHalfPi / m;
      stats.phi_offset = -stats.phi_scale * phi_sum / m;
      break;
    default: {  // NormKind::P
      const double moment = deviation_sum / m;
      stats.sigma = std::pow(moment, 1.0 / p) / lp_constant;
      // d sigma = sigma / (p * moment) * d moment; zero spread has zero gradient.
      stats.phi_scale = moment > 0 ? std::pow(moment, 1.0 / p - 1.0) / (m * lp_constant) : 0.0;
      stats.phi_offset = -stats.phi_scale * phi_sum / m;
    }
  }
}

// invstd and the unbiased variance from sigma, for a channel of count > 0 elements.
LPNORM_HOST_DEVICE LPNORM_INLINE void spread_from_sigma(int64_t count, double eps, ChannelStatistics& stats) {
  const double variance = stats.sigma * stats.sigma;
  stats.invstd = 1.0 / std::sqrt(variance + eps);
  const double m = static_cast<double>(count);
  stats.unbiased_var = count > 1 ? variance * m / (m - 1.0) : variance;
}

// Computes the channel's statistics from the host-computed `constants`. For norms with
// sparse gradient terms, writes chunks * sparse_per_chunk() entries to sparse_index /
// sparse_coef (coefficient of dsigma/dx at that index, without the mean term, which goes
// into b); `pool` is scratch of deviation_scratch_size(spec) entries.
template <typename Coef>
LPNORM_HOST_DEVICE ChannelStatistics channel_statistics_with(const NormSpec& spec, const ChannelSums& sums, double eps,
                                                             const ChannelConstants& constants, int64_t* sparse_index,
                                                             Coef* sparse_coef, Deviation* pool) {
  ChannelStatistics stats;
  stats.mean = channel_mean(sums);
  if (sums.count == 0) {  // empty batch: nothing to normalize, nothing to differentiate
    const int64_t sparse_count = spec.chunks * spec.sparse_per_chunk();
    for (int64_t i = 0; i < sparse_count; ++i) {
      sparse_index[i] = 0;
      sparse_coef[i] = Coef(0);
    }
    stats.invstd = 1.0 / std::sqrt(eps);
    return stats;
  }
  if (spec.uses_deviation_sums()) {
    dense_statistics(spec.kind, static_cast<double>(sums.count), spec.p, constants.lp_constant, sums.deviation_sum,
                     sums.phi_sum, stats);
  } else {
    extreme_statistics(spec, sums, constants.extreme_divisor, stats, sparse_index, sparse_coef, pool);
  }
  spread_from_sigma(sums.count, eps, stats);
  return stats;
}

// Computes the channel's statistics (the constants included). For norms with sparse
// gradient terms, writes chunks * sparse_per_chunk() entries to sparse_index / sparse_coef
// (coefficient of dsigma/dx at that index, without the mean term, which goes into b).
ChannelStatistics channel_statistics(const NormSpec& spec, const ChannelSums& sums, double eps,
                                     int64_t* sparse_index, double* sparse_coef);

// Coefficients of dL/dx_i = scale_g * g_i + scale_phi * phi(d_i) + offset + sparse_scale * sparse_coef_i.
struct GradCoefficients {
  double scale_g = 0;
  double scale_phi = 0;
  double offset = 0;
  double sparse_scale = 0;
};

// From the reductions sum(g) and sum(g * d) of one channel. With batch statistics the mean
// and sigma depend on x (SPEC §3); with running statistics they are constants.
LPNORM_HOST_DEVICE inline GradCoefficients grad_coefficients(bool batch_stats, int64_t count, double weight,
                                                             double invstd, double sigma, double phi_scale,
                                                             double phi_offset, double sum_g, double sum_gd) {
  GradCoefficients coef;
  coef.scale_g = weight * invstd;
  // Selects, not an early return, so a backend's loop over channels vectorizes (the terms of
  // an empty batch are computed and dropped).
  const bool moves = batch_stats && count > 0;
  // dL/dsigma = -weight * sigma * invstd^3 * sum(g * d)   (SPEC §3)
  const double dsigma = -weight * sigma * invstd * invstd * invstd * sum_gd;
  const double offset = -weight * invstd * sum_g / static_cast<double>(count) + dsigma * phi_offset;
  coef.scale_phi = moves ? dsigma * phi_scale : 0.0;
  coef.offset = moves ? offset : 0.0;
  coef.sparse_scale = moves ? dsigma : 0.0;
  return coef;
}

}  // namespace lpnorm::core
