#include "channel_math.h"

#include <vector>

#include "constants.h"

namespace lpnorm::core {

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

ChannelConstants channel_constants(const NormSpec& spec, int64_t count) {
  ChannelConstants constants;
  if (count > 0 && spec.extremes_per_end() > 0) constants.extreme_divisor = extreme_divisor(spec, count / spec.chunks);
  if (spec.kind == NormKind::P) constants.lp_constant = lp_consistency(spec.p);
  return constants;
}

ChannelStatistics channel_statistics(const NormSpec& spec, const ChannelSums& sums, double eps,
                                     int64_t* sparse_index, double* sparse_coef) {
  std::vector<Deviation> pool(static_cast<size_t>(deviation_scratch_size(spec)));
  return channel_statistics_with(spec, sums, eps, channel_constants(spec, sums.count), sparse_index, sparse_coef,
                                 pool.data());
}

}  // namespace lpnorm::core
