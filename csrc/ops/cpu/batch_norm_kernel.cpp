// CPU kernels of the batch-norm operators: the passes of cpu/kernels.h split over channels
// with at::parallel_for, and the per-channel math of core/channel_math.h in between.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "core/channel_math.h"
#include "cpu/kernels.h"
#include "ops/batch_norm.h"

namespace lpnorm::ops {
namespace {

cpu::Dtype cpu_dtype(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return cpu::Dtype::Float64;
    case at::kFloat: return cpu::Dtype::Float32;
    case at::kHalf: return cpu::Dtype::Float16;
    default: return cpu::Dtype::BFloat16;
  }
}

// A per-channel tensor as float64 values (or `fallback` everywhere when it is absent).
std::vector<double> per_channel(const OptionalTensor& tensor, int64_t channels, double fallback) {
  std::vector<double> values(static_cast<size_t>(channels), fallback);
  if (tensor.has_value() && tensor->defined()) {
    const Tensor as_double = tensor->to(at::kDouble).contiguous();
    std::copy_n(as_double.const_data_ptr<double>(), channels, values.begin());
  }
  return values;
}

Tensor to_tensor(const std::vector<double>& values, const Tensor& like) {
  Tensor out = at::empty({static_cast<int64_t>(values.size())}, like.options().dtype(at::kDouble));
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<double>());
  return out;
}

// Channels are independent: split them over threads, in grains of about 32k elements.
template <typename Fn>
void for_channel_ranges(const core::ChannelLayout& layout, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, layout.count()));
  at::parallel_for(0, layout.C, grain, fn);
}

ForwardResult batch_norm_forward_cpu(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                     const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                     bool training, double momentum, double eps, c10::string_view norm, int64_t k,
                                     double p, int64_t chunks, c10::string_view constant) {
  const core::NormSpec spec =
      check_forward(input, weight, bias, running_mean, running_var, training, norm, k, p, chunks, constant);
  const auto [x, layout] = channel_view(input);
  const int64_t channels = layout.C;
  const int64_t cols = sparse_columns(spec, training);
  auto [save_mean, save_invstd, save_coef, sparse_index, sparse_coef] = empty_saved(x, cols);
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::Dtype dtype = cpu_dtype(x.scalar_type());

  std::vector<double> mean(channels), invstd(channels), coef(channels * 3, 0.0), sparse(channels * cols);
  if (training) {
    const int64_t per_end = spec.extremes_per_end();
    std::vector<double> sum(channels), deviation(channels), phi(channels), unbiased(channels);
    std::vector<core::Candidate> largest(channels * spec.chunks * per_end), smallest(largest.size());
    for_channel_ranges(layout, [&](int64_t begin, int64_t end) {
      kernels.collect_stats({layout, dtype, x.const_data_ptr(), spec.chunks, per_end, sum.data(), largest.data(),
                             smallest.data()},
                            begin, end);
    });
    for (int64_t c = 0; c < channels; ++c) mean[c] = core::channel_mean({layout.count(), sum[c]});
    if (spec.uses_deviation_sums()) {
      for_channel_ranges(layout, [&](int64_t begin, int64_t end) {
        kernels.collect_deviations({layout, dtype, x.const_data_ptr(), mean.data(), spec.phi(),
                                    spec.deviation_power(), deviation.data(), phi.data()},
                                   begin, end);
      });
    }
    int64_t* index = sparse_index.mutable_data_ptr<int64_t>();
    for (int64_t c = 0; c < channels; ++c) {
      core::ChannelSums sums;
      sums.count = layout.count();
      sums.sum = sum[c];
      sums.deviation_sum = deviation[c];
      sums.phi_sum = phi[c];
      sums.largest = largest.data() + c * spec.chunks * per_end;
      sums.smallest = smallest.data() + c * spec.chunks * per_end;
      const core::ChannelStatistics stats =
          core::channel_statistics(spec, sums, eps, index + c * cols, sparse.data() + c * cols);
      invstd[c] = stats.invstd;
      coef[3 * c] = stats.sigma;
      coef[3 * c + 1] = stats.phi_scale;
      coef[3 * c + 2] = stats.phi_offset;
      unbiased[c] = stats.unbiased_var;
    }
    if (layout.count() > 0) {  // an empty batch leaves the running statistics alone, as torch
      update_running_stats(running_mean, running_var, to_tensor(mean, x), to_tensor(unbiased, x), momentum);
    }
  } else {
    mean = per_channel(running_mean, channels, 0.0);
    const std::vector<double> var = per_channel(running_var, channels, 1.0);
    for (int64_t c = 0; c < channels; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + eps);
  }

  // y = (x - mean) * invstd * weight + bias = x * alpha + beta
  const std::vector<double> w = per_channel(weight, channels, 1.0), b = per_channel(bias, channels, 0.0);
  std::vector<double> alpha(channels), beta(channels);
  for (int64_t c = 0; c < channels; ++c) {
    alpha[c] = invstd[c] * w[c];
    beta[c] = b[c] - mean[c] * alpha[c];
  }
  Tensor output = at::empty_like(x);
  for_channel_ranges(layout, [&](int64_t begin, int64_t end) {
    kernels.apply_affine({layout, dtype, x.const_data_ptr(), output.mutable_data_ptr(), alpha.data(), beta.data()},
                         begin, end);
  });

  save_mean.copy_(to_tensor(mean, x));
  save_invstd.copy_(to_tensor(invstd, x));
  save_coef.copy_(to_tensor(coef, x).view({channels, 3}));
  sparse_coef.copy_(to_tensor(sparse, x).view({channels, cols}));
  return {in_layout_of(output, input), save_mean, save_invstd, save_coef, sparse_index, sparse_coef};
}

BackwardResult batch_norm_backward_cpu(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                                       const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                                       const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                                       c10::string_view norm, double p) {
  check_backward(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef);
  const core::NormSpec spec = parse_norm_spec(norm, 1, p, 1, "exact", 1, 0);
  const auto [x, layout] = channel_view(input);
  const Tensor grad = match_layout(grad_output.to(x.scalar_type()), x);
  const int64_t channels = layout.C;
  const int64_t cols = training ? sparse_index.size(1) : 0;
  const cpu::Kernels& kernels = cpu::kernels();
  const cpu::Dtype dtype = cpu_dtype(x.scalar_type());

  const std::vector<double> mean = per_channel(save_mean, channels, 0.0);
  const std::vector<double> invstd = per_channel(save_invstd, channels, 0.0);
  const std::vector<double> w = per_channel(weight, channels, 1.0);
  const std::vector<double> coef = per_channel(save_coef.reshape({-1}), channels * 3, 0.0);
  const std::vector<double> sparse = per_channel(sparse_coef.reshape({-1}), channels * cols, 0.0);
  const Tensor index = sparse_index.contiguous();

  std::vector<double> sum_g(channels), sum_gd(channels);
  for_channel_ranges(layout, [&](int64_t begin, int64_t end) {
    kernels.reduce_grad({layout, dtype, grad.const_data_ptr(), x.const_data_ptr(), mean.data(), sum_g.data(),
                         sum_gd.data()},
                        begin, end);
  });
  std::vector<core::GradCoefficients> grad_coef(channels);
  std::vector<double> grad_weight(channels);
  for (int64_t c = 0; c < channels; ++c) {
    grad_coef[c] = core::grad_coefficients(training, layout.count(), w[c], invstd[c], coef[3 * c], coef[3 * c + 1],
                                           coef[3 * c + 2], sum_g[c], sum_gd[c]);
    grad_weight[c] = sum_gd[c] * invstd[c];
  }
  Tensor grad_input = at::empty_like(x);
  for_channel_ranges(layout, [&](int64_t begin, int64_t end) {
    kernels.apply_grad({layout, dtype, grad.const_data_ptr(), x.const_data_ptr(), grad_input.mutable_data_ptr(),
                        mean.data(), spec.phi(), spec.p, grad_coef.data(), index.const_data_ptr<int64_t>(),
                        sparse.data(), cols},
                       begin, end);
  });
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type()
                                                                   : stats_dtype(x.scalar_type());
  return {in_layout_of(grad_input, input), to_tensor(grad_weight, x).to(param_dtype), to_tensor(sum_g, x).to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

}  // namespace lpnorm::ops
