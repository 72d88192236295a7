#include "channel_math.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "constants.h"

namespace lpnorm::core {
namespace {

constexpr double kSqrtHalfPi = 1.2533141373155002512;  // sqrt(pi / 2)

struct Deviation {
  double x;
  int64_t index;
  double magnitude;  // |x - mean|; NaN sorts last
};

// The `picks` largest |x - mean| of one chunk. They are among its largest and smallest raw
// values (KERNEL-NOTES), so the pass kept only those; ties go to the lowest index.
std::vector<Deviation> pick_largest_deviations(const Candidate* largest, const Candidate* smallest,
                                               int64_t per_end, int64_t picks, double mean) {
  std::vector<Deviation> pool;
  pool.reserve(static_cast<size_t>(2 * per_end));
  auto add = [&](double x, int64_t index) {
    if (index == kNoIndex) return;
    for (const Deviation& seen : pool) {
      if (seen.index == index) return;  // small chunks: both ends saw the same element
    }
    pool.push_back({x, index, std::abs(x - mean)});
  };
  for (int64_t i = 0; i < per_end; ++i) add(largest[i].value, largest[i].index);
  for (int64_t i = 0; i < per_end; ++i) add(-smallest[i].value, smallest[i].index);

  auto key = [](const Deviation& d) { return std::isnan(d.magnitude) ? -1.0 : d.magnitude; };
  const auto count = std::min<int64_t>(picks, static_cast<int64_t>(pool.size()));
  std::partial_sort(pool.begin(), pool.begin() + count, pool.end(), [&](const Deviation& a, const Deviation& b) {
    return key(a) > key(b) || (key(a) == key(b) && a.index < b.index);
  });
  pool.resize(static_cast<size_t>(count));
  return pool;
}

// linf, topk and range: sigma is the mean over chunks of a raw extreme statistic divided by
// its expected value for unit Gaussians; the gradient is sparse at the extremes.
void extreme_statistics(const NormSpec& spec, const ChannelSums& sums, ChannelStatistics& stats,
                        int64_t* sparse_index, double* sparse_coef) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t chunks = spec.chunks;
  const int64_t per_end = spec.extremes_per_end();
  const int64_t per_chunk = spec.sparse_per_chunk();
  const double divisor = extreme_divisor(spec, sums.count / chunks);
  const double unit = 1.0 / (static_cast<double>(chunks) * divisor);  // d sigma / d raw

  double sigma_sum = 0;
  double coef_sum = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const Candidate* largest = sums.largest + chunk * per_end;
    const Candidate* smallest = sums.smallest + chunk * per_end;
    int64_t* index = sparse_index + chunk * per_chunk;
    double* coef = sparse_coef + chunk * per_chunk;
    double raw;
    if (spec.kind == NormKind::Range) {
      // max - min needs no mean; a channel of NaNs has no candidates and gives NaN.
      const bool found = largest[0].index != kNoIndex && smallest[0].index != kNoIndex;
      raw = found ? largest[0].value + smallest[0].value : nan;
      index[0] = found ? largest[0].index : 0;
      index[1] = found ? smallest[0].index : 0;
      coef[0] = found ? unit : nan;
      coef[1] = found ? -unit : nan;
    } else {
      const std::vector<Deviation> top =
          pick_largest_deviations(largest, smallest, per_end, per_chunk, stats.mean);
      double total = 0;
      for (int64_t i = 0; i < per_chunk; ++i) {
        const bool found = i < static_cast<int64_t>(top.size());
        total += found ? top[i].magnitude : nan;
        index[i] = found ? top[i].index : 0;
        coef[i] = found ? sign_of(top[i].x - stats.mean) * unit / static_cast<double>(per_chunk) : nan;
      }
      raw = total / static_cast<double>(per_chunk);
    }
    sigma_sum += raw / divisor;
    for (int64_t i = 0; i < per_chunk; ++i) coef_sum += coef[i];
  }
  stats.sigma = sigma_sum / static_cast<double>(chunks);
  // Every d_i also moves through the mean: -(1/m) * sum of the sparse coefficients.
  stats.phi_offset = -coef_sum / static_cast<double>(sums.count);
}

}  // namespace

double extreme_divisor(const NormSpec& spec, int64_t chunk_count) {
  if (spec.constant == ConstantMode::Paper) {
    const double multiplier = paper_linf_multiplier(chunk_count);
    return 1.0 / (spec.kind == NormKind::Range ? 0.35 * multiplier : multiplier);
  }
  switch (spec.kind) {
    case NormKind::Linf: return expected_max_abs(chunk_count);
    case NormKind::TopK: return expected_topk_abs(chunk_count, spec.k);
    case NormKind::Range: return expected_range(chunk_count);
    default: return 1.0;
  }
}

ChannelStatistics channel_statistics(const NormSpec& spec, const ChannelSums& sums, double eps,
                                     int64_t* sparse_index, double* sparse_coef) {
  ChannelStatistics stats;
  stats.mean = channel_mean(sums);
  const int64_t sparse_count = spec.chunks * spec.sparse_per_chunk();
  if (sums.count == 0) {  // empty batch: nothing to normalize, nothing to differentiate
    std::fill(sparse_index, sparse_index + sparse_count, int64_t{0});
    std::fill(sparse_coef, sparse_coef + sparse_count, 0.0);
    stats.invstd = 1.0 / std::sqrt(eps);
    return stats;
  }
  const double m = static_cast<double>(sums.count);
  switch (spec.kind) {
    case NormKind::L2:
      stats.sigma = std::sqrt(sums.deviation_sum / m);
      stats.phi_scale = stats.sigma > 0 ? 1.0 / (m * stats.sigma) : 0.0;
      break;
    case NormKind::L1:
      stats.sigma = kSqrtHalfPi * sums.deviation_sum / m;
      stats.phi_scale = kSqrtHalfPi / m;
      stats.phi_offset = -stats.phi_scale * sums.phi_sum / m;
      break;
    case NormKind::P: {
      const double moment = sums.deviation_sum / m;
      const double c_p = lp_consistency(spec.p);
      stats.sigma = std::pow(moment, 1.0 / spec.p) / c_p;
      // d sigma = sigma / (p * moment) * d moment; zero spread has zero gradient.
      stats.phi_scale = moment > 0 ? std::pow(moment, 1.0 / spec.p - 1.0) / (m * c_p) : 0.0;
      stats.phi_offset = -stats.phi_scale * sums.phi_sum / m;
      break;
    }
    default:
      extreme_statistics(spec, sums, stats, sparse_index, sparse_coef);
  }
  const double variance = stats.sigma * stats.sigma;
  stats.invstd = 1.0 / std::sqrt(variance + eps);
  stats.unbiased_var = sums.count > 1 ? variance * m / (m - 1.0) : variance;
  return stats;
}

GradCoefficients grad_coefficients(bool batch_stats, int64_t count, double weight, double invstd,
                                   double sigma, double phi_scale, double phi_offset, double sum_g,
                                   double sum_gd) {
  GradCoefficients coef;
  coef.scale_g = weight * invstd;
  if (!batch_stats || count == 0) return coef;
  // dL/dsigma = -weight * sigma * invstd^3 * sum(g * d)   (SPEC §3)
  const double dsigma = -weight * sigma * invstd * invstd * invstd * sum_gd;
  coef.scale_phi = dsigma * phi_scale;
  coef.offset = -weight * invstd * sum_g / static_cast<double>(count) + dsigma * phi_offset;
  coef.sparse_scale = dsigma;
  return coef;
}

}  // namespace lpnorm::core
