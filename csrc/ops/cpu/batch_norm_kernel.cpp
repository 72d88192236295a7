// CPU kernels of the batch-norm operators: the passes of cpu/kernels.h over the tiles of
// ops/cpu/plan.h (the fused or the split schedule), and the per-channel math of
// core/channel_math.h in between.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/channel_math.h"
#include "cpu/exact_power.h"
#include "cpu/half_accumulation.h"
#include "cpu/kernels.h"
#include "ops/batch_norm.h"
#include "ops/clones.h"
#include "ops/cpu/parallel.h"
#include "ops/cpu/plan.h"
#include "ops/cpu/scratch.h"


namespace lpnorm::ops {
namespace {

using cpu::Tile;


cpu::Dtype cpu_dtype(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return cpu::Dtype::Float64;
    case at::kFloat: return cpu::Dtype::Float32;
    case at::kHalf: return cpu::Dtype::Float16;
    default: return cpu::Dtype::BFloat16;
  }
}

// out[i] = p[i * stride] in double; a loop of its own where stride is 1, which vectorizes.
void widen(const float* p, int64_t stride, int64_t count, double* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < count; ++i) out[i] = p[i];
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = p[i * stride];
  }
}

// A per-channel tensor (1-d, any stride; or any shape, contiguous: the saved [C, cols]
// tensors, read without a reshape, which is a dispatcher call) as `count` float64 values, or
// `fallback` when it is absent.
Values<double> per_channel(Scratch& scratch, const OptionalTensor& tensor, int64_t count, double fallback) {
  if (!tensor.has_value() || !tensor->defined()) return scratch.take<double>(count, fallback);
  const Values<double> values = scratch.take_unset<double>(count);  // every branch below sets all
  const Tensor& t = *tensor;
  const bool direct = t.dim() == 1 || t.is_contiguous();
  const int64_t stride = t.dim() == 1 ? t.stride(0) : 1;
  if (direct && t.scalar_type() == at::kFloat) {
    widen(t.const_data_ptr<float>(), stride, count, values.data());
  } else if (direct && t.scalar_type() == at::kDouble) {
    const double* p = t.const_data_ptr<double>();
    for (int64_t i = 0; i < count; ++i) values[i] = p[i * stride];
  } else {
    const Tensor as_double = t.to(at::kDouble).contiguous();
    std::copy_n(as_double.const_data_ptr<double>(), count, values.data());
  }
  return values;
}

// Writes values into a fresh contiguous tensor (float32 or float64).
void write_values(const Tensor& out, Values<double> values) {
  if (out.scalar_type() == at::kDouble) {
    std::copy_n(values.data(), values.count, out.mutable_data_ptr<double>());
  } else {
    float* p = out.mutable_data_ptr<float>();
    for (size_t i = 0; i < values.size(); ++i) p[i] = static_cast<float>(values[i]);
  }
}

Tensor values_tensor(Values<double> values, const Tensor& like, at::ScalarType dtype) {
  const bool direct = dtype == at::kFloat || dtype == at::kDouble;
  Tensor out = at::empty({static_cast<int64_t>(values.size())}, like.options().dtype(direct ? dtype : at::kDouble));
  write_values(out, values);
  return direct ? out : out.to(dtype);
}

// ---- per-channel steps ---------------------------------------------------------------------
//
// Loops over a tile's channels and plain arrays that the compiler vectorizes. Channel by
// channel, each one's chain of divisions and square roots waited on the last: about 11 ns a
// channel for l2, 30 for linf, more than the passes themselves on (2, 4096). They are out of
// line (LPNORM_VECTOR_CLONES: built once per instruction set, with their pointers' __restrict;
// inlined into the schedules' lambdas, some copies lost it and were left scalar).

// Channels [begin, end): the means from collect_stats' sums (of x - p where pivot is not null),
// and where l2 took shifted squares too (sum_sq not null) its deviation sums:
// sum d^2 = sum (x - p)^2 - (sum (x - p))^2 / m, kept
// where that loses at most 2 bits (the shift p - mean at most sqrt(3) sigma; with p the mean
// of 8 elements, a Gaussian channel fails once in 10^6). Returns whether every channel's was
// kept; if not, the deviation pass sums them all again.
LPNORM_VECTOR_CLONES bool means_from_sums(int64_t begin, int64_t end, int64_t m, const double* __restrict sum,
                                          const double* __restrict pivot, const double* __restrict sum_sq,
                                          double* __restrict mean, double* __restrict deviation,
                                          double* __restrict phi) {
  if (m == 0) {
    std::fill(mean + begin, mean + end, 0.0);
    return false;
  }
  const double count = static_cast<double>(m);
  if (pivot == nullptr) {
    for (int64_t c = begin; c < end; ++c) mean[c] = sum[c] / count;
    return false;
  }
  if (sum_sq == nullptr) {
    for (int64_t c = begin; c < end; ++c) mean[c] = pivot[c] + sum[c] / count;
    return false;
  }
  double lossy = 0;  // a count, in double: with an integer count GCC 12 leaves the loop scalar
  for (int64_t c = begin; c < end; ++c) {
    const double shift = sum[c] / count;
    const double squares = sum_sq[c] - sum[c] * shift;
    mean[c] = pivot[c] + shift;
    deviation[c] = squares;
    phi[c] = 0;
    lossy += squares >= 0 && shift * shift * count <= 3 * squares ? 0.0 : 1.0;  // NaN too
  }
  return lossy == 0;
}

// Channel c's statistics into the per-channel arrays: sigma, a and b into coef[c][3], invstd,
// scale = invstd * weight and the unbiased variance.
LPNORM_INLINE void keep_channel(int64_t c, const core::ChannelStatistics& stats, const double* __restrict weight,
                                double* __restrict coef, double* __restrict invstd, double* __restrict scale,
                                double* __restrict unbiased) {
  coef[3 * c] = stats.sigma;
  coef[3 * c + 1] = stats.phi_scale;
  coef[3 * c + 2] = stats.phi_offset;
  invstd[c] = stats.invstd;
  scale[c] = stats.invstd * weight[c];
  unbiased[c] = stats.unbiased_var;
}

// A dense norm's channels [begin, end), m > 0 (core::dense_statistics, then
// core::spread_from_sigma), in one loop.
template <core::NormKind kKind>
LPNORM_VECTOR_CLONES void dense_channels(int64_t begin, int64_t end, int64_t m, double eps, double p,
                                         double lp_constant, const double* __restrict deviation,
                                         const double* __restrict phi, const double* __restrict weight,
                                         double* __restrict coef, double* __restrict invstd,
                                         double* __restrict scale, double* __restrict unbiased) {
  for (int64_t c = begin; c < end; ++c) {
    core::ChannelStatistics stats;
    core::dense_statistics(kKind, static_cast<double>(m), p, lp_constant, deviation[c], phi[c], stats);
    core::spread_from_sigma(m, eps, stats);
    keep_channel(c, stats, weight, coef, invstd, scale, unbiased);
  }
}

// The loops below take the chunk count as kChunks where it is known at compile time (1), 0
// where it is a variable: with one chunk the candidates lie side by side and are read as
// vectors, not gathered, and nothing divides by the count.

// An extreme norm's channels [begin, end), m > 0: sigma and b from each channel's sums over
// chunks (core::extreme_sums, or the loops below), then core::spread_from_sigma, in one loop
// (channel by channel, the divisions' chain made linf 30 ns a channel).
template <int64_t kChunks>
LPNORM_VECTOR_CLONES void extreme_channels(int64_t begin, int64_t end, int64_t m, double eps, int64_t chunks,
                                           const double* __restrict sigma_sum, const double* __restrict coef_sum,
                                           const double* __restrict weight, double* __restrict coef,
                                           double* __restrict invstd, double* __restrict scale,
                                           double* __restrict unbiased) {
  for (int64_t c = begin; c < end; ++c) {
    core::ChannelStatistics stats;
    core::extreme_sigma(sigma_sum[c], coef_sum[c], kChunks > 0 ? kChunks : chunks, m, stats);
    core::spread_from_sigma(m, eps, stats);
    keep_channel(c, stats, weight, coef, invstd, scale, unbiased);
  }
}

// Blocks of channels keep their candidates or picks in L1 while the loops below go over them
// once per chunk (and pick).
constexpr int64_t kChannelBlock = 64;

// topk channels [begin, end) whose every chunk's picks the stats pass made, all found
// (picked: [C][chunks][picks]): what core::extreme_sums gives them (the sums over chunks of the
// picks' mean |d| / divisor and of the coefficients, each pick's index and coefficient), in
// the same order, with the channels side by side. (Channel by channel, each pick's sign was a
// mispredicted branch: 30 ns a channel at k = 10.)
LPNORM_VECTOR_CLONES void picked_channels(int64_t begin, int64_t end, int64_t chunks, int64_t picks, int64_t cols,
                                          double per_pick, double divisor, const core::Deviation* __restrict picked,
                                          const double* __restrict mean, int64_t* __restrict index,
                                          double* __restrict coef, double* __restrict sigma_sum,
                                          double* __restrict coef_sum) {
  double total[kChannelBlock];  // a chunk's sum of |d|, per channel of the block
  for (int64_t block = begin; block < end; block += kChannelBlock) {
    const int64_t block_end = std::min(end, block + kChannelBlock);
    for (int64_t c = block; c < block_end; ++c) sigma_sum[c] = coef_sum[c] = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      for (int64_t c = block; c < block_end; ++c) total[c - block] = 0;
      for (int64_t i = 0; i < picks; ++i) {
        for (int64_t c = block; c < block_end; ++c) {
          const core::Deviation& d = picked[(c * chunks + j) * picks + i];
          const double s = core::pick_coefficient(d.x, mean[c], per_pick);
          total[c - block] += d.magnitude;
          coef_sum[c] += s;
          index[c * cols + j * picks + i] = d.index;
          coef[c * cols + j * picks + i] = s;
        }
      }
      for (int64_t c = block; c < block_end; ++c) {
        sigma_sum[c] += core::raw_statistic(core::NormKind::TopK, total[c - block], picks) / divisor;
      }
    }
  }
}

// linf channels [begin, end), one candidate per chunk and end (largest[c * chunks + j],
// smallest[...]): what core::extreme_sums gives them (each chunk's one pick: the larger |d| of
// its largest and smallest value, ties to the lower index) where in every chunk the largest
// lies at or above the mean and the smallest below it (core's merge), in loops over the
// channels; single[c] = 0 where not (NaN, no candidates, both ends on one side), for core to
// redo. (Channel by channel, the pick's branches took ~40 ns a channel and chunk: (16, 2048)
// linf forward, (256, 1024) with 8 chunks.)
template <int64_t kChunks>
LPNORM_VECTOR_CLONES void single_pick_channels(int64_t begin, int64_t end, int64_t chunks, int64_t cols,
                                               double per_pick, double divisor,
                                               const core::Candidate* __restrict largest,
                                               const core::Candidate* __restrict smallest,
                                               const double* __restrict mean, int64_t* __restrict index,
                                               double* __restrict coef, double* __restrict sigma_sum,
                                               double* __restrict coef_sum, int64_t* __restrict single) {
  const int64_t n = kChunks > 0 ? kChunks : chunks;
  // Chunk j of channel c: its pick's index and coefficient written, its terms of the sums
  // returned.
  struct Terms {
    int64_t fits;
    double sigma, coef;
  };
  auto pick = [&](int64_t c, int64_t j) __attribute__((always_inline)) {
    const core::Candidate up = largest[c * n + j], down = smallest[c * n + j];  // down.value is -x
    const double d_up = up.value - mean[c], d_down = -down.value - mean[c];
    const int64_t fits = (up.index != core::kNoIndex) & (down.index != core::kNoIndex) & (d_up >= 0) & (d_down < 0);
    const double a = std::abs(d_up), b = std::abs(d_down);
    const bool take_up = (a > b) | ((a == b) & (up.index < down.index));
    const double s = core::pick_coefficient(take_up ? up.value : -down.value, mean[c], per_pick);
    double total = 0;  // core's sum of one term
    total += take_up ? a : b;
    index[c * cols + j] = take_up ? up.index : down.index;
    coef[c * cols + j] = s;
    return Terms{fits, core::raw_statistic(core::NormKind::Linf, total, 1) / divisor, s};
  };
  // The first chunk's loop sets the sums (from core's zeros), the others' add to them. (Read
  // back for the first chunk too, they kept the loop scalar: GCC versioned it for aliasing, and
  // (2, 4096) linf forward at 1 thread took 94-98 us against 70-73.)
  const int64_t step = kChunks == 1 ? std::max<int64_t>(1, end - begin) : kChannelBlock;  // one chunk: no blocks
  for (int64_t block = begin; block < end; block += step) {
    const int64_t block_end = std::min(end, block + step);
    for (int64_t c = block; c < block_end; ++c) {
      const Terms t = pick(c, 0);
      single[c] = t.fits;
      sigma_sum[c] = 0.0 + t.sigma;
      coef_sum[c] = 0.0 + t.coef;
    }
    for (int64_t j = 1; j < n; ++j) {
      for (int64_t c = block; c < block_end; ++c) {
        const Terms t = pick(c, j);
        single[c] &= t.fits;
        sigma_sum[c] += t.sigma;
        coef_sum[c] += t.coef;
      }
    }
  }
}

// The backward's per-channel step (core::grad_coefficients) of channels [begin, end), and
// grad_weight = sum(g * d) * invstd.
LPNORM_VECTOR_CLONES void grad_channels(int64_t begin, int64_t end, bool batch_stats, int64_t m,
                                        const double* __restrict weight, const double* __restrict invstd,
                                        const double* __restrict coef, const double* __restrict sum_g,
                                        const double* __restrict sum_gd, core::GradCoefficients* __restrict grad_coef,
                                        double* __restrict grad_weight) {
  for (int64_t c = begin; c < end; ++c) {
    grad_coef[c] = core::grad_coefficients(batch_stats, m, weight[c], invstd[c], coef[3 * c], coef[3 * c + 1],
                                           coef[3 * c + 2], sum_g[c], sum_gd[c]);
    grad_weight[c] = sum_gd[c] * invstd[c];
  }
}

// ---- forward -------------------------------------------------------------------------------

ForwardResult batch_norm_forward_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                     bool training, double momentum, double eps, c10::string_view norm, int64_t k,
                                     double p, int64_t chunks, c10::string_view constant,
                                     c10::string_view accumulate) {
  const core::NormSpec spec =
      check_forward(input, weight, bias, running_mean, running_var, training, eps, norm, k, p, chunks,
                    constant);
  const bool in_half = half_accumulation(accumulate, input);
  const auto [x, layout] = channel_view(input);
  const int64_t channels = layout.C;
  const int64_t m = layout.count();
  const int64_t cols = sparse_columns(spec, training);
  auto [save_mean, save_invstd, save_coef, sparse_index, sparse_coef] = empty_saved(x, cols);
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::Dtype dtype = cpu_dtype(x.scalar_type());
  const void* xp = x.const_data_ptr();
  Tensor output = at::empty_like(x);
  void* yp = output.mutable_data_ptr();
  const bool stream = streams_output(x.nbytes(), !training);

  Scratch scratch;
  const Values<double> w = per_channel(scratch, weight, channels, 1.0), b = per_channel(scratch, bias, channels, 0.0);
  // Zeros only where a path may leave values unset and write them out: evaluation's coef
  // (sigma and the phi terms, none there). Training sets every channel's (finish_channels).
  Values<double> mean = scratch.take_unset<double>(channels);
  const Values<double> invstd = scratch.take_unset<double>(channels), scale = scratch.take_unset<double>(channels);
  const Values<double> coef = training ? scratch.take_unset<double>(channels * 3) : scratch.take<double>(channels * 3);
  const Values<double> sparse = scratch.take<double>(channels * cols);
  auto affine = [&](const Tile& t) {
    kernels.apply_affine({layout, dtype, xp, yp, mean.data(), scale.data(), b.data(), stream}, t);
  };
  Plan plan = make_plan(layout, x.element_size(), 1, training ? spec.extremes_per_end() : 0);
  plan.fused = plan.fused && !in_half;  // half accumulation replaces the split schedule's sums

  if (training) {
    const int64_t per_end = spec.extremes_per_end();
    const int64_t lists = spec.chunks * per_end;  // candidates per channel and end
    const bool dense = spec.uses_deviation_sums();
    const core::ChannelConstants constants = core::channel_constants(spec, m);  // once per call (host integration)
    const Values<double> unbiased = scratch.take_unset<double>(channels);
    int64_t* index = sparse_index.mutable_data_ptr<int64_t>();
    const int64_t buffers = plan.fused ? 1 : plan.parts;
    // The partial sums are set by the passes, every tile its channels' (a [parts][C] buffer of
    // the split schedule is 8 x 16 KiB for (256, 2048); with these fills and the passes' own
    // gone, its l2 forward at 2 threads went from 207-221 to 181 us).
    // The deviation sums have parts only where the split schedule's deviation pass may run;
    // the extreme norms never set theirs, which core reads (and ignores) as zeros.
    const Values<double> sum = scratch.take_unset<double>(buffers * channels);
    const bool deviation_parts = dense && !plan.fused;
    const Values<double> deviation = deviation_parts ? scratch.take_unset<double>(buffers * channels)
                                                     : scratch.take<double>(channels);
    const Values<double> phi = deviation_parts ? scratch.take_unset<double>(buffers * channels)
                                               : scratch.take<double>(channels);
    // Set by collect_stats (every tile resets its channels' lists and picks).
    const Values<core::Candidate> largest = scratch.take_unset<core::Candidate>(buffers * channels * lists);
    const Values<core::Candidate> smallest = scratch.take_unset<core::Candidate>(buffers * channels * lists);
    // Every norm sums x - p around a pivot p from each channel's first elements (l2 also
    // (x - p)^2, its one pass): a constant channel's mean is then exact, where float sums of x
    // left it ulps off, every d that error, normalized to O(1) (float32 12345.678: l1 -0.29,
    // linf -0.31, and 1.6 on (32, 16, 8, 8)).
    const bool shifted = !in_half;
    const bool one_pass_l2 = shifted && spec.kind == core::NormKind::L2;
    const Values<double> pivot = scratch.take_unset<double>(shifted ? buffers * channels : 0);
    const Values<double> sum_sq = scratch.take_unset<double>(one_pass_l2 ? pivot.count : 0);
    // The fused topk forward: the stats pass may pick each chunk's largest |x - mean| itself.
    const bool pick_in_pass = plan.fused && spec.kind == core::NormKind::TopK;
    const Values<core::Deviation> picked = scratch.take_unset<core::Deviation>(pick_in_pass ? channels * lists : 0);
    // Extreme norms: each channel's sums over chunks (core::extreme_sums).
    const Values<double> sigma_sum = scratch.take_unset<double>(dense ? 0 : channels);
    const Values<double> coef_sum = scratch.take_unset<double>(sigma_sum.count);
    const Values<int64_t> single = scratch.take_unset<int64_t>(spec.kind == core::NormKind::Linf ? channels : 0);

    auto stats_args = [&](int64_t part) -> cpu::StatsArgs {
      return {layout,
              dtype,
              xp,
              spec.chunks,
              per_end,
              sum.data() + part * channels,
              largest.data() + part * channels * lists,
              smallest.data() + part * channels * lists,
              shifted ? pivot.data() + part * channels : nullptr,
              one_pass_l2 ? sum_sq.data() + part * channels : nullptr,
              pick_in_pass ? picked.data() : nullptr};
    };
    // The means (and l2's one-pass deviation sums) of channels [begin, end).
    auto means = [&](int64_t begin, int64_t end) {
      return means_from_sums(begin, end, m, sum.data(), shifted ? pivot.data() : nullptr,
                             one_pass_l2 ? sum_sq.data() : nullptr, mean.data(), deviation.data(), phi.data());
    };
    auto deviation_args = [&](int64_t part) -> cpu::DeviationArgs {
      return {layout, dtype, xp, mean.data(), spec.phi(), spec.deviation_power(),
              deviation.data() + part * channels, phi.data() + part * channels};
    };
    // Channel c's chunks' largest |x - mean| where the stats pass picked them (null: from its
    // lists), which core tests chunk by chunk.
    auto picked_of = [&](int64_t c) -> const core::Deviation* {
      return pick_in_pass ? picked.data() + c * lists : nullptr;
    };
    // Whether the stats pass picked every chunk of channel c.
    auto all_picked = [&](int64_t c) {
      for (int64_t j = 0; pick_in_pass && j < spec.chunks; ++j) {
        if (picked[(c * spec.chunks + j) * per_end].index == core::kNotPicked) return false;
      }
      return pick_in_pass;
    };
    // What the passes collected for channel c (part 0 of each buffer: the combined sums).
    auto sums_of = [&](int64_t c) {
      core::ChannelSums sums;
      sums.count = m;
      sums.sum = shifted ? mean[c] * static_cast<double>(m) : sum[c];  // l2's sum is shifted
      sums.deviation_sum = deviation[c];
      sums.phi_sum = phi[c];
      sums.largest = largest.data() + c * lists;
      sums.smallest = smallest.data() + c * lists;
      sums.picked = picked_of(c);
      return sums;
    };
    // The statistics of channels [begin, end): the dense norms' and the extreme norms' divisions
    // and square roots in one vectorized loop, the extreme norms' picks in loops over channels
    // where they can, the rest channel by channel. `pool` is scratch for the top-k pick.
    auto finish_channels = [&](int64_t begin, int64_t end, core::Deviation* pool) {
      if (m == 0) {  // the empty batch
        for (int64_t c = begin; c < end; ++c) {
          keep_channel(c,
                       core::channel_statistics_with(spec, sums_of(c), eps, constants, index + c * cols,
                                                     sparse.data() + c * cols, pool),
                       w.data(), coef.data(), invstd.data(), scale.data(), unbiased.data());
        }
        return;
      }
      if (!dense) {
        const double divisor = constants.extreme_divisor;
        const double per_pick = core::extreme_scales(spec, divisor).per_pick;
        auto by_core = [&](int64_t c) {
          core::extreme_sums(spec, sums_of(c), mean[c], divisor, index + c * cols, sparse.data() + c * cols, pool,
                             sigma_sum[c], coef_sum[c]);
        };
        auto extreme_loops = [&](auto chunk_count) {
          constexpr int64_t kChunks = decltype(chunk_count)::value;
          if (spec.kind == core::NormKind::Linf) {
            single_pick_channels<kChunks>(begin, end, spec.chunks, cols, per_pick, divisor, largest.data(),
                                          smallest.data(), mean.data(), index, sparse.data(), sigma_sum.data(),
                                          coef_sum.data(), single.data());
            for (int64_t c = begin; c < end; ++c) {
              if (single[c] == 0) by_core(c);
            }
          } else {
            for (int64_t c = begin; c < end; ++c) {
              if (!all_picked(c)) {
                by_core(c);
                continue;
              }
              int64_t run_end = c + 1;  // the run of picked channels from c
              while (run_end < end && all_picked(run_end)) ++run_end;
              picked_channels(c, run_end, spec.chunks, per_end, cols, per_pick, divisor, picked.data(), mean.data(),
                              index, sparse.data(), sigma_sum.data(), coef_sum.data());
              c = run_end - 1;
            }
          }
          extreme_channels<kChunks>(begin, end, m, eps, spec.chunks, sigma_sum.data(), coef_sum.data(), w.data(),
                                    coef.data(), invstd.data(), scale.data(), unbiased.data());
        };
        if (spec.chunks == 1) {
          extreme_loops(std::integral_constant<int64_t, 1>{});
        } else {
          extreme_loops(std::integral_constant<int64_t, 0>{});
        }
        return;
      }
      auto dense_loop = [&](auto kind) {
        dense_channels<decltype(kind)::value>(begin, end, m, eps, spec.p, constants.lp_constant, deviation.data(),
                                              phi.data(), w.data(), coef.data(), invstd.data(), scale.data(),
                                              unbiased.data());
      };
      using Kind = core::NormKind;
      if (spec.kind == Kind::L2) return dense_loop(std::integral_constant<Kind, Kind::L2>{});
      if (spec.kind == Kind::L1) return dense_loop(std::integral_constant<Kind, Kind::L1>{});
      // |d|^p in float that left float's range: those channels' sums again, in double.
      if (!in_half) {
        cpu::redo_power_sums(layout, dtype, xp, begin, end, mean.data(), spec.p, deviation.data(), phi.data());
      }
      dense_loop(std::integral_constant<Kind, Kind::P>{});
    };

    if (plan.fused) {  // every pass of a tile (one channel, or a span of channels) while in cache
      const int64_t scratch = core::deviation_scratch_size(spec);
      for_each_tile(plan, [&](const Tile& t, int64_t) {
        kernels.collect_stats(stats_args(0), &t, 1);
        const bool one_pass = means(t.c_begin, t.c_end);
        if (dense && !one_pass) kernels.collect_deviations(deviation_args(0), t);
        core::Deviation pool_on_stack[64];  // the top-k pick's scratch (2k entries): no allocation up to k = 32
        std::vector<core::Deviation> pool_on_heap(scratch > 64 ? scratch : 0);
        finish_channels(t.c_begin, t.c_end, scratch > 64 ? pool_on_heap.data() : pool_on_stack);
        if (!plan.apply_apart) affine(t);
      });
      if (plan.apply_apart) {
        for_each_tile(make_apply_plan(layout, x.element_size(), std::move(plan)), [&](const Tile& t, int64_t) { affine(t); });
      }
    } else {
      for_each_tile_run(plan, [&](const Tile* tiles, int64_t count, int64_t part) {
        kernels.collect_stats(stats_args(part), tiles, count);
      });
      combine_sums(sum.data(), channels, plan.parts);
      if (one_pass_l2) combine_sums(sum_sq.data(), channels, plan.parts);
      if (per_end > 0) combine_extremes(largest.data(), channels, plan.parts, lists, per_end);
      if (per_end > 0) combine_extremes(smallest.data(), channels, plan.parts, lists, per_end);
      if (in_half) {  // the means in half as sums: m * mean is exact in double, so is sum / m
        cpu_parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const cpu::HalfForwardMeans half = cpu::half_forward_means(layout, dtype, xp, c, spec);
            sum[c] = half.mean * static_cast<double>(m);
            deviation[c] = half.deviation * static_cast<double>(m);
            phi[c] = half.phi * static_cast<double>(m);
          }
        });
      }
      const bool one_pass = means(0, channels);
      if (dense && !one_pass && !in_half) {
        for_each_tile(plan, [&](const Tile& t, int64_t part) { kernels.collect_deviations(deviation_args(part), t); });
        combine_sums(deviation.data(), channels, plan.parts);
        combine_sums(phi.data(), channels, plan.parts);
      }
      const Values<core::Deviation> pool = scratch.take<core::Deviation>(core::deviation_scratch_size(spec));
      finish_channels(0, channels, pool.data());
      for_each_tile(make_apply_plan(layout, x.element_size(), std::move(plan)), [&](const Tile& t, int64_t) { affine(t); });
    }
    if (m > 0) {  // an empty batch leaves the running statistics alone, as torch
      update_running_stats(running_mean, running_var, mean.data(), unbiased.data(), channels, momentum);
    }
  } else {
    mean = per_channel(scratch, running_mean, channels, 0.0);
    const Values<double> var = per_channel(scratch, running_var, channels, 1.0);
    for (int64_t c = 0; c < channels; ++c) {
      invstd[c] = 1.0 / std::sqrt(var[c] + eps);
      scale[c] = invstd[c] * w[c];
    }
    for_each_tile(make_apply_plan(layout, x.element_size(), std::move(plan)), [&](const Tile& t, int64_t) { affine(t); });
  }

  write_values(save_mean, mean);
  write_values(save_invstd, invstd);
  write_values(save_coef, coef);
  write_values(sparse_coef, sparse);
  return {in_layout_of(output, input), save_mean, save_invstd, save_coef, sparse_index, sparse_coef};
}

// ---- backward ------------------------------------------------------------------------------

BackwardResult batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                                       const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                                       const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                                       c10::string_view norm, double p, c10::string_view accumulate) {
  check_backward(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef);
  const bool in_half = half_accumulation(accumulate, input);
  const core::NormSpec spec = parse_norm_spec(norm, 1, p, 1, "exact", 1, 0);
  const auto [x, layout] = channel_view(input);
  // The passes walk grad and x with one set of strides: a copy only when they differ.
  const Tensor grad = match_layout(grad_output.to(x.scalar_type()), x);
  const int64_t channels = layout.C;
  const int64_t m = layout.count();
  const int64_t cols = training ? sparse_index.size(1) : 0;
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::Dtype dtype = cpu_dtype(x.scalar_type());

  Scratch scratch;
  const Values<double> mean = per_channel(scratch, save_mean, channels, 0.0);
  const Values<double> invstd = per_channel(scratch, save_invstd, channels, 0.0);
  const Values<double> w = per_channel(scratch, weight, channels, 1.0);
  const Values<double> coef = per_channel(scratch, save_coef, channels * 3, 0.0);
  const Values<double> sparse = per_channel(scratch, sparse_coef, channels * cols, 0.0);
  const Tensor index = sparse_index.contiguous();
  Tensor grad_input = at::empty_like(x);
  // The general p norm's channels whose |d|^(p - 1) leaves float's range (cpu/exact_power.h):
  // their phi_scale from sigma in double (saved in float32 it may be 0), their gradient
  // element by element in double after the vector pass.
  std::vector<int64_t> exact_channels;
  if (spec.kind == core::NormKind::P && training && !in_half) {
    const double lp_constant = core::channel_constants(spec, m).lp_constant;
    exact_channels = cpu::exact_power_grad_channels(dtype, coef.data(), channels, spec.p, m, lp_constant);
    for (const int64_t c : exact_channels) {
      coef[3 * c + 1] = std::pow(coef[3 * c] * lp_constant, 1.0 - spec.p) / (static_cast<double>(m) * lp_constant);
    }
  }
  // Pointers and the streaming choice once per call, not once per tile (a fused tile is one
  // channel; a getenv per channel was 3% of (4,512,7,7)).
  const void* gp = grad.const_data_ptr();
  const void* xp = x.const_data_ptr();
  void* gxp = grad_input.mutable_data_ptr();
  const int64_t* index_p = index.const_data_ptr<int64_t>();
  const bool stream = streams_output(x.nbytes());

  Plan plan = make_plan(layout, x.element_size(), 2);
  plan.fused = plan.fused && !in_half;
  const int64_t buffers = plan.fused ? 1 : plan.parts;
  // Set by the passes (reduce_grad, every tile its channels') and finish, every channel's.
  Values<double> sum_g = scratch.take_unset<double>(buffers * channels);
  const Values<double> sum_gd = scratch.take_unset<double>(buffers * channels);
  const Values<core::GradCoefficients> grad_coef = scratch.take_unset<core::GradCoefficients>(channels);
  const Values<double> grad_weight = scratch.take_unset<double>(channels);
  auto reduce = [&](const Tile& t, int64_t part) {
    kernels.reduce_grad({layout, dtype, gp, xp, mean.data(),
                         sum_g.data() + part * channels, sum_gd.data() + part * channels},
                        t);
  };
  auto finish = [&](int64_t begin, int64_t end) {
    grad_channels(begin, end, training, m, w.data(), invstd.data(), coef.data(), sum_g.data(), sum_gd.data(),
                  grad_coef.data(), grad_weight.data());
  };
  auto apply = [&](const Tile& t) {
    kernels.apply_grad({layout, dtype, gp, xp, gxp, mean.data(), spec.phi(), spec.p, grad_coef.data(), index_p,
                        sparse.data(), cols, spec.sparse_may_repeat(), stream},
                       t);
  };

  if (plan.fused) {
    for_each_tile(plan, [&](const Tile& t, int64_t) {
      reduce(t, 0);
      finish(t.c_begin, t.c_end);
      apply(t);
    });
  } else {
    if (in_half) {  // the means in half as sums (exact in double)
      cpu_parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const cpu::HalfGradMeans half =
              cpu::half_grad_means(layout, dtype, gp, xp, c, mean[c]);
          sum_g[c] = half.grad * static_cast<double>(m);
          sum_gd[c] = half.grad_dev * static_cast<double>(m);
        }
      });
    } else {
      for_each_tile(plan, reduce);
      combine_sums(sum_g.data(), channels, plan.parts);
      combine_sums(sum_gd.data(), channels, plan.parts);
    }
    finish(0, channels);
    for_each_tile(make_apply_plan(layout, x.element_size(), std::move(plan)), [&](const Tile& t, int64_t) { apply(t); });
  }
  cpu_parallel_for(0, static_cast<int64_t>(exact_channels.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = exact_channels[i];
      cpu::exact_power_grad(layout, dtype, gp, xp, gxp, c, mean[c], grad_coef[c], spec.p);
    }
  });
  sum_g.count = channels;  // part 0: the combined sums
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type()
                                                                   : stats_dtype(x.scalar_type());
  return {in_layout_of(grad_input, input), values_tensor(grad_weight, x, param_dtype),
          values_tensor(sum_g, x, param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace lpnorm::ops
