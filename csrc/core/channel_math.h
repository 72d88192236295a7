// The per-channel step between the statistics pass and the element-wise pass, shared by
// every backend: from what a pass collected, the channel's mean, sigma, 1/sqrt(sigma^2+eps)
// and the coefficients of its gradient (SPEC §1-§3). A norm's math lives here and only here.
#pragma once

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

LPNORM_INLINE void reset_extremes(Candidate* list, int64_t capacity) {
  for (int64_t i = 0; i < capacity; ++i) list[i] = {-std::numeric_limits<double>::infinity(), kNoIndex};
}

LPNORM_INLINE bool candidate_beats(double value, int64_t index, const Candidate& other) {
  return value > other.value || (value == other.value && index < other.index);
}

// Keeps the `capacity` largest values offered, largest first. Ties go to the lowest index,
// so the result does not depend on the order elements are visited in. NaN never enters.
// (The list of smallest values stores negated values and uses the same function.)
LPNORM_INLINE void offer_extreme(Candidate* list, int64_t capacity, double value, int64_t index) {
  if (!candidate_beats(value, index, list[capacity - 1])) return;
  int64_t pos = capacity - 1;
  while (pos > 0 && candidate_beats(value, index, list[pos - 1])) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = {value, index};
}

LPNORM_INLINE void merge_extremes(Candidate* into, const Candidate* from, int64_t capacity) {
  for (int64_t i = 0; i < capacity && from[i].index != kNoIndex; ++i) {
    offer_extreme(into, capacity, from[i].value, from[i].index);
  }
}

// What the statistics passes collected for one channel.
struct ChannelSums {
  int64_t count = 0;           // m, the elements of the channel
  double sum = 0;              // sum of x
  double deviation_sum = 0;    // sum |d|^q (dense norms, second pass)
  double phi_sum = 0;          // sum phi(d)  (dense norms, second pass)
  const Candidate* largest = nullptr;   // [chunks][extremes_per_end], values x
  const Candidate* smallest = nullptr;  // [chunks][extremes_per_end], values -x
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

inline double channel_mean(const ChannelSums& sums) {
  return sums.count > 0 ? sums.sum / static_cast<double>(sums.count) : 0.0;
}

// The divisor of a chunk's raw statistic (max |d|, mean of the top-k |d|, or max - min) that
// makes sigma consistent for Gaussian data; `chunk_count` is m / chunks.
double extreme_divisor(const NormSpec& spec, int64_t chunk_count);

// Computes the channel's statistics. For norms with sparse gradient terms, writes
// chunks * sparse_per_chunk() entries to sparse_index / sparse_coef (coefficient of
// dsigma/dx at that index, without the mean term, which goes into b).
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
GradCoefficients grad_coefficients(bool batch_stats, int64_t count, double weight, double invstd,
                                   double sigma, double phi_scale, double phi_offset, double sum_g,
                                   double sum_gd);

}  // namespace lpnorm::core
