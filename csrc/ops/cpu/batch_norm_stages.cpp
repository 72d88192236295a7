// CPU kernels of the stage operators: the fused batch norm (batch_norm_kernel.cpp) cut at
// the points where a distributed caller (lpnorm.nn.SyncLpBatchNorm) reduces across
// processes. Each stage is one of the passes of cpu/kernels.h, or the per-channel math of
// core/channel_math.h, over statistics the caller has combined:
//
//   batch_norm_collect      sum x, and the per_end largest / smallest raw x with their flat
//                           indices shifted by index_offset (this process's first global index)
//   batch_norm_deviations   sum |x - mean|^q and sum phi(x - mean)        (dense norms)
//   batch_norm_finalize     merges the gathered candidate lists, then core::channel_statistics
//   batch_norm_apply        y = (x - mean) * invstd * weight + bias
//   batch_norm_reduce_grad  sum g and sum g * (x - mean)
//   batch_norm_apply_grad   core::grad_coefficients from the combined sums, then the element pass;
//                           sparse indices are global, only those in this process's slice apply
//
// Only chunks == 1 (a ghost batch split across processes has no meaning here). Statistics
// tensors are float64 throughout, whatever the input dtype. Each pass runs over the tiles of
// the split schedule (ops/cpu/plan.h) on torch's intra-op threads, its partial statistics
// combined in a fixed order, as the fused operator's split schedule does.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "core/channel_math.h"
#include "cpu/exact_power.h"
#include "cpu/kernels.h"
#include "ops/batch_norm.h"
#include "ops/cpu/plan.h"

namespace lpnorm::ops {
namespace {

using cpu::Tile;

cpu::Dtype stage_dtype(const Tensor& input, const char* op) {
  switch (input.scalar_type()) {
    case at::kDouble: return cpu::Dtype::Float64;
    case at::kFloat: return cpu::Dtype::Float32;
    case at::kHalf: return cpu::Dtype::Float16;
    case at::kBFloat16: return cpu::Dtype::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "lpnorm.", op, ": input must be float64, float32, float16 or bfloat16, got ",
                       input.scalar_type());
  }
}

void check_input(const Tensor& input, const char* op) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "lpnorm.", op, ": input must have at least 2 dimensions (N, C, ...), ",
                    "got shape ", input.sizes());
  stage_dtype(input, op);
}

// A per-channel tensor as `count` float64 values (contiguous), checked.
Tensor channel_values(const Tensor& t, int64_t count, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.numel() == count, "lpnorm.", op, ": ", name, " must have ", count, " values, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "lpnorm.", op, ": ", name, " is on ", t.device(),
                    " but the input is on cpu");
  return t.to(at::kDouble).contiguous().reshape({-1});
}

std::vector<double> optional_values(const OptionalTensor& t, int64_t count, double fallback, const char* name,
                                    const char* op) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(static_cast<size_t>(count), fallback);
  const Tensor v = channel_values(*t, count, name, op);
  return std::vector<double>(v.const_data_ptr<double>(), v.const_data_ptr<double>() + count);
}

Tensor doubles(int64_t count, const Tensor& like) { return at::empty({count}, like.options().dtype(at::kDouble)); }

// A [C] float64 tensor of part 0 of `parts` ([parts][C], combined into part 0).
Tensor combined(const std::vector<double>& parts, int64_t channels, const Tensor& like) {
  Tensor out = doubles(channels, like);
  std::copy_n(parts.data(), channels, out.mutable_data_ptr<double>());
  return out;
}

// A reduction with two sums per channel over the plan's tiles, each part into its own [C]
// slices (reduce(tile, first, second)), combined in part order.
template <typename Reduce>
std::tuple<Tensor, Tensor> two_sums(const Plan& plan, int64_t channels, const Tensor& like, const Reduce& reduce) {
  std::vector<double> first(plan.parts * channels), second(first.size());
  for_each_tile(plan, [&](const Tile& t, int64_t part) {
    reduce(t, first.data() + part * channels, second.data() + part * channels);
  });
  combine_sums(first.data(), channels, plan.parts);
  combine_sums(second.data(), channels, plan.parts);
  return {combined(first, channels, like), combined(second, channels, like)};
}

core::NormSpec stage_spec(c10::string_view norm, int64_t k, double p, c10::string_view constant, int64_t count) {
  return parse_norm_spec(norm, k, p, 1, constant, 1, count);
}

// ---- forward stages ------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> collect_cpu(const Tensor& input, c10::string_view norm, int64_t k,
                                               int64_t index_offset) {
  check_input(input, "batch_norm_collect");
  const core::NormSpec spec = stage_spec(norm, k, 2.0, "exact", 0);
  const auto [x, layout] = channel_view(input);
  const int64_t channels = layout.C;
  const int64_t per_end = spec.extremes_per_end();
  const cpu::Dtype dtype = stage_dtype(x, "batch_norm_collect");
  const Plan plan = make_plan(layout, x.element_size(), 1, per_end);
  // Sums of x - p around a pivot p from each channel's first elements, as the fused operator's,
  // then p * m added back in double (exact for a float pivot): the processes add plain sums,
  // and a constant channel's total is exact.
  std::vector<double> sums(plan.parts * channels), pivots(sums.size());
  std::vector<core::Candidate> largest(plan.parts * channels * per_end), smallest(largest.size());
  const cpu::Kernels& kernels = cpu::kernels();
  for_each_tile_run(plan, [&](const Tile* tiles, int64_t count, int64_t part) {
    cpu::StatsArgs args{layout, dtype, x.const_data_ptr(), 1, per_end, sums.data() + part * channels,
                        largest.data() + part * channels * per_end, smallest.data() + part * channels * per_end};
    args.pivot = pivots.data() + part * channels;
    kernels.collect_stats(args, tiles, count);
  });
  combine_sums(sums.data(), channels, plan.parts);
  for (int64_t c = 0; c < channels; ++c) sums[c] += pivots[c] * static_cast<double>(layout.count());
  if (per_end > 0) {
    combine_extremes(largest.data(), channels, plan.parts, per_end, per_end);
    combine_extremes(smallest.data(), channels, plan.parts, per_end, per_end);
  }
  Tensor sum = combined(sums, channels, x);

  // [C, 2, per_end]: end 0 the largest x (values x), end 1 the smallest (values -x), as the
  // passes keep them; empty slots have value -inf and index INT64_MAX.
  Tensor value = at::empty({channels, 2, per_end}, x.options().dtype(at::kDouble));
  Tensor index = at::empty({channels, 2, per_end}, x.options().dtype(at::kLong));
  double* vp = value.mutable_data_ptr<double>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t end = 0; end < 2; ++end) {
      const core::Candidate* list = (end == 0 ? largest.data() : smallest.data()) + c * per_end;
      for (int64_t i = 0; i < per_end; ++i) {
        const int64_t at = (c * 2 + end) * per_end + i;
        vp[at] = list[i].value;
        ip[at] = list[i].index == core::kNoIndex ? core::kNoIndex : list[i].index + index_offset;
      }
    }
  }
  return {sum, value, index};
}

std::tuple<Tensor, Tensor> deviations_cpu(const Tensor& input, const Tensor& mean, c10::string_view norm, double p) {
  check_input(input, "batch_norm_deviations");
  const core::NormSpec spec = stage_spec(norm, 1, p, "exact", 0);
  const auto [x, layout] = channel_view(input);
  const int64_t channels = layout.C;
  const Tensor mean_values = channel_values(mean, channels, "mean", "batch_norm_deviations");
  if (!spec.uses_deviation_sums()) {
    Tensor zeros = doubles(channels, x).zero_();
    return {zeros, zeros.clone()};
  }
  const cpu::Dtype dtype = stage_dtype(x, "batch_norm_deviations");
  const cpu::Kernels& kernels = cpu::kernels();
  const double* mp = mean_values.const_data_ptr<double>();
  const Plan plan = make_plan(layout, x.element_size(), 1);
  auto sums = two_sums(plan, channels, x, [&](const Tile& t, double* deviation, double* phi) {
    kernels.collect_deviations({layout, dtype, x.const_data_ptr(), mp, spec.phi(), spec.deviation_power(), deviation,
                                phi},
                               t);
  });
  // The general p norm's channels whose powers in float left its range, again in double (as
  // the fused operator: cpu/exact_power.h).
  if (spec.kind == core::NormKind::P) {
    cpu::redo_power_sums(layout, dtype, x.const_data_ptr(), 0, channels, mp, spec.p,
                         std::get<0>(sums).mutable_data_ptr<double>(), std::get<1>(sums).mutable_data_ptr<double>());
  }
  return sums;
}

using FinalizeResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

FinalizeResult finalize_cpu(int64_t count, const Tensor& sum, const Tensor& deviation_sum, const Tensor& phi_sum,
                            const Tensor& extreme_value, const Tensor& extreme_index, double eps,
                            c10::string_view norm, int64_t k, double p, c10::string_view constant) {
  const char* op = "batch_norm_finalize";
  TORCH_CHECK_VALUE(count >= 0, "lpnorm.", op, ": count must be >= 0, got ", count);
  TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got ", count,
                    " value per channel over the process group");
  TORCH_CHECK_VALUE(!(eps <= 0), "lpnorm.", op, ": eps must be positive during training, got ", eps);
  const core::NormSpec spec = stage_spec(norm, k, p, constant, count);
  TORCH_CHECK_VALUE(sum.dim() == 1, "lpnorm.", op, ": sum must have shape [C], got ", sum.sizes());
  const int64_t channels = sum.size(0);
  const Tensor sums = channel_values(sum, channels, "sum", op);
  const Tensor deviations = channel_values(deviation_sum, channels, "deviation_sum", op);
  const Tensor phis = channel_values(phi_sum, channels, "phi_sum", op);
  const int64_t per_end = spec.extremes_per_end();
  const int64_t cols = spec.sparse_per_chunk();
  TORCH_CHECK_VALUE(extreme_value.dim() == 3 && extreme_value.size(0) == channels && extreme_value.size(1) == 2 &&
                        extreme_index.sizes() == extreme_value.sizes(),
                    "lpnorm.", op, ": extreme_value and extreme_index must have the same shape [", channels,
                    ", 2, L], got ", extreme_value.sizes(), " and ", extreme_index.sizes());
  TORCH_CHECK_TYPE(extreme_index.scalar_type() == at::kLong, "lpnorm.", op, ": extreme_index must be int64");
  const Tensor values = extreme_value.to(at::kDouble).contiguous();
  const Tensor indices = extreme_index.contiguous();
  const int64_t offered = values.size(2);  // candidates of every process, concatenated
  const double* vp = values.const_data_ptr<double>();
  const int64_t* ip = indices.const_data_ptr<int64_t>();

  const auto options = sum.options().dtype(at::kDouble);
  Tensor mean = at::empty({channels}, options), invstd = at::empty({channels}, options);
  Tensor save_coef = at::empty({channels, 3}, options), unbiased = at::empty({channels}, options);
  Tensor sparse_index = at::empty({channels, cols}, options.dtype(at::kLong));
  Tensor sparse_coef = at::empty({channels, cols}, options);
  double* mp = mean.mutable_data_ptr<double>();
  double* rp = invstd.mutable_data_ptr<double>();
  double* cp = save_coef.mutable_data_ptr<double>();
  double* up = unbiased.mutable_data_ptr<double>();
  int64_t* sip = sparse_index.mutable_data_ptr<int64_t>();
  double* scp = sparse_coef.mutable_data_ptr<double>();

  const core::ChannelConstants constants = core::channel_constants(spec, count);
  std::vector<core::Deviation> pool(static_cast<size_t>(core::deviation_scratch_size(spec)));
  std::vector<core::Candidate> largest(per_end), smallest(per_end);
  // The pointers once: const_data_ptr checks the tensor at every call.
  const double* sum_values = sums.const_data_ptr<double>();
  const double* deviation_values = deviations.const_data_ptr<double>();
  const double* phi_values = phis.const_data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) {
    core::ChannelSums s;
    s.count = count;
    s.sum = sum_values[c];
    s.deviation_sum = deviation_values[c];
    s.phi_sum = phi_values[c];
    if (per_end > 0) {
      // The merge of the processes' lists: the same lists one process would have kept
      // (ties to the lowest global index, whatever the order offered).
      core::reset_extremes(largest.data(), per_end);
      core::reset_extremes(smallest.data(), per_end);
      for (int64_t end = 0; end < 2; ++end) {
        core::Candidate* list = end == 0 ? largest.data() : smallest.data();
        for (int64_t i = 0; i < offered; ++i) {
          const int64_t at = (c * 2 + end) * offered + i;
          if (ip[at] != core::kNoIndex) core::offer_extreme(list, per_end, vp[at], ip[at]);
        }
      }
      s.largest = largest.data();
      s.smallest = smallest.data();
    }
    const core::ChannelStatistics stats =
        core::channel_statistics_with(spec, s, eps, constants, sip + c * cols, scp + c * cols, pool.data());
    mp[c] = stats.mean;
    rp[c] = stats.invstd;
    cp[3 * c] = stats.sigma;
    cp[3 * c + 1] = stats.phi_scale;
    cp[3 * c + 2] = stats.phi_offset;
    up[c] = stats.unbiased_var;
  }
  return {mean, invstd, save_coef, sparse_index, sparse_coef, unbiased};
}

Tensor apply_cpu(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptionalTensor& weight,
                 const OptionalTensor& bias) {
  const char* op = "batch_norm_apply";
  check_input(input, op);
  const auto [x, layout] = channel_view(input);
  const int64_t channels = layout.C;
  const Tensor mean_values = channel_values(mean, channels, "mean", op);
  const Tensor invstd_values = channel_values(invstd, channels, "invstd", op);
  const std::vector<double> w = optional_values(weight, channels, 1.0, "weight", op);
  const std::vector<double> b = optional_values(bias, channels, 0.0, "bias", op);
  std::vector<double> scale(channels);
  const double* invstd_p = invstd_values.const_data_ptr<double>();  // once: each call checks the tensor
  for (int64_t c = 0; c < channels; ++c) scale[c] = invstd_p[c] * w[c];
  Tensor output = at::empty_like(x);
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::AffineArgs args{layout,
                             stage_dtype(x, op),
                             x.const_data_ptr(),
                             output.mutable_data_ptr(),
                             mean_values.const_data_ptr<double>(),
                             scale.data(),
                             b.data(),
                             streams_output(output.nbytes())};
  const Plan plan = make_apply_plan(layout, x.element_size(), make_plan(layout, x.element_size(), 1));
  for_each_tile(plan, [&](const Tile& t, int64_t) { kernels.apply_affine(args, t); });
  return in_layout_of(output, input);
}

// ---- backward stages -----------------------------------------------------------------------

std::tuple<Tensor, Tensor> reduce_grad_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& mean) {
  const char* op = "batch_norm_reduce_grad";
  check_input(input, op);
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "lpnorm.", op, ": grad_output has shape ",
                    grad_output.sizes(), " but input has shape ", input.sizes());
  const auto [x, layout] = channel_view(input);
  const Tensor grad = match_layout(grad_output.to(x.scalar_type()), x);
  const int64_t channels = layout.C;
  const Tensor mean_values = channel_values(mean, channels, "mean", op);
  const cpu::Dtype dtype = stage_dtype(x, op);
  const cpu::Kernels& kernels = cpu::kernels();
  return two_sums(make_plan(layout, x.element_size(), 2), channels, x, [&](const Tile& t, double* sum_g, double* sum_gd) {
    kernels.reduce_grad(
        {layout, dtype, grad.const_data_ptr(), x.const_data_ptr(), mean_values.const_data_ptr<double>(), sum_g, sum_gd},
        t);
  });
}

Tensor apply_grad_cpu(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                      const Tensor& mean, const Tensor& invstd, const Tensor& save_coef, const Tensor& sparse_index,
                      const Tensor& sparse_coef, const Tensor& sum_g, const Tensor& sum_gd, int64_t count,
                      c10::string_view norm, double p, int64_t index_offset) {
  const char* op = "batch_norm_apply_grad";
  check_input(input, op);
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "lpnorm.", op, ": grad_output has shape ",
                    grad_output.sizes(), " but input has shape ", input.sizes());
  const core::NormSpec spec = stage_spec(norm, 1, p, "exact", 0);
  const auto [x, layout] = channel_view(input);
  const Tensor grad = match_layout(grad_output.to(x.scalar_type()), x);
  const int64_t channels = layout.C;
  const int64_t m = layout.count();
  const Tensor mean_values = channel_values(mean, channels, "mean", op);
  const Tensor invstd_values = channel_values(invstd, channels, "invstd", op);
  const Tensor coef_values = channel_values(save_coef, channels * 3, "save_coef", op);
  const Tensor g_values = channel_values(sum_g, channels, "sum_g", op);
  const Tensor gd_values = channel_values(sum_gd, channels, "sum_gd", op);
  const std::vector<double> w = optional_values(weight, channels, 1.0, "weight", op);
  TORCH_CHECK_VALUE(sparse_index.dim() == 2 && sparse_index.size(0) == channels &&
                        sparse_coef.sizes() == sparse_index.sizes(),
                    "lpnorm.", op, ": sparse_index and sparse_coef must have the same shape [", channels,
                    ", cols], got ", sparse_index.sizes(), " and ", sparse_coef.sizes());
  TORCH_CHECK_TYPE(sparse_index.scalar_type() == at::kLong, "lpnorm.", op, ": sparse_index must be int64");
  const int64_t cols = sparse_index.size(1);

  // Global indices to this process's flat indices; those of other processes fall outside
  // [0, m) and the pass skips them.
  std::vector<int64_t> local_index(channels * cols);
  const Tensor global_index = sparse_index.contiguous();
  const int64_t* global = global_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < channels * cols; ++i) {
    const int64_t local = global[i] - index_offset;
    local_index[i] = local >= 0 && local < m ? local : -1;
  }
  const Tensor sparse_values = channel_values(sparse_coef, channels * cols, "sparse_coef", op);

  const double* mp = mean_values.const_data_ptr<double>();
  const double* rp = invstd_values.const_data_ptr<double>();
  const double* cp = coef_values.const_data_ptr<double>();
  const double* gp = g_values.const_data_ptr<double>();
  const double* gdp = gd_values.const_data_ptr<double>();
  std::vector<core::GradCoefficients> grad_coef(channels);
  for (int64_t c = 0; c < channels; ++c) {
    grad_coef[c] = core::grad_coefficients(true, count, w[c], rp[c], cp[3 * c], cp[3 * c + 1], cp[3 * c + 2], gp[c],
                                           gdp[c]);
  }
  Tensor grad_input = at::empty_like(x);
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::GradApplyArgs args{layout,
                                stage_dtype(x, op),
                                grad.const_data_ptr(),
                                x.const_data_ptr(),
                                grad_input.mutable_data_ptr(),
                                mp,
                                spec.phi(),
                                spec.p,
                                grad_coef.data(),
                                local_index.data(),
                                sparse_values.const_data_ptr<double>(),
                                cols,
                                spec.sparse_may_repeat(),
                                streams_output(grad_input.nbytes())};
  const Plan plan = make_apply_plan(layout, x.element_size(), make_plan(layout, x.element_size(), 2));
  for_each_tile(plan, [&](const Tile& t, int64_t) { kernels.apply_grad(args, t); });
  // The general p norm's channels whose |d|^(p - 1) in float leaves its range, again in double
  // (as the fused operator; the stages' statistics are float64, phi_scale included).
  if (spec.kind == core::NormKind::P && m > 0) {
    const double lp_constant = core::channel_constants(spec, count).lp_constant;
    for (const int64_t c : cpu::exact_power_grad_channels(args.dtype, cp, channels, spec.p, count, lp_constant)) {
      cpu::exact_power_grad(layout, args.dtype, args.grad, args.x, args.grad_x, c, mp[c], grad_coef[c], spec.p);
    }
  }
  return in_layout_of(grad_input, input);
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, CPU, m) {
  m.impl("batch_norm_collect", &collect_cpu);
  m.impl("batch_norm_deviations", &deviations_cpu);
  m.impl("batch_norm_apply", &apply_cpu);
  m.impl("batch_norm_reduce_grad", &reduce_grad_cpu);
  m.impl("batch_norm_apply_grad", &apply_grad_cpu);
  m.impl("batch_norm_finalize", &finalize_cpu);
}

}  // namespace lpnorm::ops
