#include "ops/batch_norm.h"
#include "ops/clones.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sqrt.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace lpnorm::ops {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// weight, bias and running statistics: one value per channel, on the input's device, in
// the input's dtype or (for half inputs) float32, as torch's mixed mode.
void check_per_channel(const OptionalTensor& tensor, const char* name, const Tensor& input) {
  if (!tensor.has_value() || !tensor->defined()) return;
  const int64_t channels = input.size(1);
  TORCH_CHECK_VALUE(tensor->dim() == 1 && tensor->numel() == channels, "lpnorm.batch_norm: ", name,
                    " must have one value per channel (shape [", channels, "]), got shape ",
                    tensor->sizes());
  TORCH_CHECK_VALUE(tensor->device() == input.device(), "lpnorm.batch_norm: ", name, " is on ",
                    tensor->device(), " but input is on ", input.device());
  const bool same = tensor->scalar_type() == input.scalar_type();
  const bool mixed = tensor->scalar_type() == at::kFloat &&
                     (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16);
  TORCH_CHECK_TYPE(same || mixed, "lpnorm.batch_norm: ", name, " has dtype ", tensor->scalar_type(),
                   "; expected the input's dtype ", input.scalar_type(),
                   " (or float32 for a half-precision input)");
}

bool defined(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// Merges dimensions 2.. into one stride when memory allows (skipping size-1 dimensions).
bool spatial_stride(const Tensor& t, int64_t& stride) {
  stride = 1;
  int64_t previous = -1;
  for (int64_t d = 2; d < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (previous >= 0 && t.stride(previous) != t.stride(d) * t.size(d)) return false;
    previous = d;
    stride = t.stride(d);
  }
  return true;
}

}  // namespace

bool half_accumulation(c10::string_view accumulate, const Tensor& input) {
  TORCH_CHECK_VALUE(accumulate == "float" || accumulate == "half",
                    "lpnorm.batch_norm: accumulate must be 'float' or 'half'; got '", accumulate, "'");
  return accumulate == "half" && (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16);
}

core::NormSpec parse_norm_spec(c10::string_view norm, int64_t k, double p, int64_t chunks,
                               c10::string_view constant, int64_t batch, int64_t count) {
  const std::string norm_name(norm.data(), norm.size());
  const std::string constant_name(constant.data(), constant.size());
  const auto kind = core::parse_norm_kind(norm_name);
  TORCH_CHECK_VALUE(kind.has_value(), "lpnorm.batch_norm: norm must be one of 'l2', 'l1', 'linf', ",
                    "'topk', 'range', 'p'; got '", norm_name, "'");
  const auto mode = core::parse_constant_mode(constant_name);
  TORCH_CHECK_VALUE(mode.has_value(), "lpnorm.batch_norm: constant must be 'exact' or 'paper'; got '",
                    constant_name, "'");
  core::NormSpec spec;
  spec.kind = *kind;
  spec.constant = *mode;
  spec.k = k;
  spec.p = p;
  spec.chunks = chunks;

  TORCH_CHECK_VALUE(chunks >= 1, "lpnorm.batch_norm: chunks must be >= 1, got ", chunks);
  TORCH_CHECK_VALUE(chunks == 1 || spec.extremes_per_end() > 0, "lpnorm.batch_norm: chunks (ghost ",
                    "batches) apply to norm 'linf', 'topk' and 'range' only; got chunks=", chunks,
                    " with norm '", norm_name, "'");
  TORCH_CHECK_VALUE(batch % chunks == 0, "lpnorm.batch_norm: chunks=", chunks,
                    " must divide the batch size N=", batch);
  // A chunk of one value has a range of 0 (E_range(1) = 0) and no paper multiplier (it divides
  // by sqrt(2 ln m)); linf and top-k with the exact constants take its |d| (E_max(1) = sqrt(2/pi)).
  if (spec.kind == core::NormKind::Range || (spec.extremes_per_end() > 0 && spec.constant == core::ConstantMode::Paper)) {
    TORCH_CHECK_VALUE(count == 0 || count / chunks >= 2, "lpnorm.batch_norm: norm '", norm_name, "'",
                      spec.constant == core::ConstantMode::Paper ? " with constant='paper'" : "",
                      " needs at least 2 values per channel in each of the chunks=", chunks, ", got ",
                      count / chunks);
  }
  if (spec.kind == core::NormKind::P) {
    TORCH_CHECK_VALUE(std::isfinite(p) && p >= 1.0, "lpnorm.batch_norm: p must be a finite number >= 1",
                      " (use norm='linf' for p = inf), got p=", p);
  }
  if (spec.kind == core::NormKind::TopK) {
    TORCH_CHECK_VALUE(k >= 1, "lpnorm.batch_norm: k must be >= 1, got k=", k);
    const int64_t chunk_count = count / chunks;
    TORCH_CHECK_VALUE(count == 0 || k <= chunk_count, "lpnorm.batch_norm: k=", k,
                      " exceeds the values per channel", chunks > 1 ? " and chunk" : "", " (", chunk_count,
                      ")");
  }
  return spec;
}

core::NormSpec check_forward(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& running_mean, const OptionalTensor& running_var,
                             bool training, double eps, c10::string_view norm, int64_t k, double p,
                             int64_t chunks, c10::string_view constant) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "lpnorm.batch_norm: input must have at least 2 dimensions ",
                    "(N, C, ...), got shape ", input.sizes());
  TORCH_CHECK_TYPE(input.is_floating_point() && supported_dtype(input.scalar_type()),
                   "lpnorm.batch_norm: input must be float64, float32, float16 or bfloat16, got ",
                   input.scalar_type());
  check_per_channel(weight, "weight", input);
  check_per_channel(bias, "bias", input);
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var), "lpnorm.batch_norm: running_mean and ",
                    "running_var must be given together");
  TORCH_CHECK_VALUE(training || defined(running_mean), "lpnorm.batch_norm: running_mean and running_var ",
                    "must be defined when training=False (evaluation uses running statistics)");
  // As torch's batch_norm (NaN passes both, as there).
  TORCH_CHECK_VALUE(!(training && eps <= 0), "lpnorm.batch_norm: eps must be positive during training, got ", eps);
  TORCH_CHECK_VALUE(!(eps < 0), "lpnorm.batch_norm: eps must be non-negative, got ", eps);
  // m = N * prod(spatial), from the sizes: numel / C would divide by zero when C == 0.
  int64_t count = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) count *= input.size(d);
  if (training) {
    TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
  // Evaluation splits no batch: any N goes with any chunks, as a model trained with ghost
  // batches meets a last partial batch or a batch of one.
  return parse_norm_spec(norm, k, p, chunks, constant, training ? input.size(0) : 0, training ? count : 0);
}

void check_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                    const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                    const Tensor& sparse_index, const Tensor& sparse_coef) {
  TORCH_CHECK_VALUE(input.dim() >= 2, "lpnorm.batch_norm_backward: input must have at least 2 dimensions ",
                    "(N, C, ...), got shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "lpnorm.batch_norm_backward: grad_output has ",
                    "shape ", grad_output.sizes(), " but input has shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == input.device(), "lpnorm.batch_norm_backward: grad_output is on ",
                    grad_output.device(), " but input is on ", input.device());
  TORCH_CHECK_TYPE(supported_dtype(input.scalar_type()), "lpnorm.batch_norm_backward: input must be ",
                   "float64, float32, float16 or bfloat16, got ", input.scalar_type());
  check_per_channel(weight, "weight", input);
  const int64_t channels = input.size(1);
  for (const auto& [tensor, name] : {std::pair<const Tensor&, const char*>{save_mean, "save_mean"},
                                     {save_invstd, "save_invstd"}}) {
    TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == channels, "lpnorm.batch_norm_backward: ", name,
                      " must have shape [", channels, "], got ", tensor.sizes());
  }
  TORCH_CHECK_VALUE(save_coef.dim() == 2 && save_coef.size(0) == channels && save_coef.size(1) == 3,
                    "lpnorm.batch_norm_backward: save_coef must have shape [", channels, ", 3], got ",
                    save_coef.sizes());
  TORCH_CHECK_VALUE(sparse_index.dim() == 2 && sparse_index.size(0) == channels &&
                        sparse_coef.sizes() == sparse_index.sizes(),
                    "lpnorm.batch_norm_backward: sparse_index and sparse_coef must have the same shape [",
                    channels, ", cols], got ", sparse_index.sizes(), " and ", sparse_coef.sizes());
  TORCH_CHECK_TYPE(sparse_index.scalar_type() == at::kLong, "lpnorm.batch_norm_backward: sparse_index ",
                   "must be int64, got ", sparse_index.scalar_type());
}

at::ScalarType stats_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

int64_t sparse_columns(const core::NormSpec& spec, bool batch_stats) {
  return batch_stats ? spec.chunks * spec.sparse_per_chunk() : 0;
}

std::pair<Tensor, core::ChannelLayout> channel_view(const Tensor& input) {
  Tensor x = input;
  int64_t stride_s = 1;
  if (!x.is_non_overlapping_and_dense()) x = x.contiguous(x.suggest_memory_format());
  if (!spatial_stride(x, stride_s)) {
    x = x.contiguous();
    spatial_stride(x, stride_s);
  }
  core::ChannelLayout layout;
  layout.N = x.size(0);
  layout.C = x.size(1);
  layout.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) layout.S *= x.size(d);
  layout.stride_n = x.stride(0);
  layout.stride_c = x.stride(1);
  layout.stride_s = stride_s;
  return {x, layout};
}

Tensor match_layout(const Tensor& tensor, const Tensor& like) {
  if (tensor.strides() == like.strides()) return tensor;
  return at::empty_like(like).copy_(tensor);
}

Tensor in_layout_of(const Tensor& result, const Tensor& input) {
  // empty_like(input) keeps a dense input's strides; a non-dense input was made dense in
  // its suggested memory format by channel_view, which empty_like also picks.
  if (!input.is_non_overlapping_and_dense() || result.strides() == input.strides()) return result;
  return at::empty_like(input).copy_(result);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> empty_saved(const Tensor& input, int64_t cols) {
  const int64_t channels = input.size(1);
  const auto options = input.options().dtype(stats_dtype(input.scalar_type()));
  return {at::empty({channels}, options), at::empty({channels}, options), at::empty({channels, 3}, options),
          at::empty({channels, cols}, input.options().dtype(at::kLong)), at::empty({channels, cols}, options)};
}

namespace {

// std::fma is one instruction where the CPU has FMA and a libm call per element where it has
// not (2-3 ns a channel and buffer: 5 us of a (256, 1024) forward): one loop per target
// (LPNORM_FMA_CLONES), the bits the same either way.
// running[c * stride] = momentum * batch[c] + (1 - momentum) * running[c * stride], in double.
template <typename T>
LPNORM_FMA_CLONES void blend_running(T* running, int64_t stride, const double* batch, int64_t channels,
                                    double momentum) {
  const double keep = 1.0 - momentum;
  for (int64_t c = 0; c < channels; ++c) {
    running[c * stride] = static_cast<T>(std::fma(momentum, batch[c], static_cast<double>(running[c * stride]) * keep));
  }
}

}  // namespace

void update_running_stats(const OptionalTensor& running_mean, const OptionalTensor& running_var,
                          const double* mean, const double* unbiased_var, int64_t channels, double momentum) {
  if (!defined(running_mean)) return;
  const double keep = 1.0 - momentum;
  // CPU float32/float64 statistics (what nn modules hold) are blended on their data: the ATen
  // ops below cost a dispatcher round trip each (about 10 of them), more than the whole
  // (N, C) forward of a small batch. ATen's add(alpha) on double is a fused multiply-add, in
  // its vector and scalar loops alike (checked), so std::fma gives the same bits.
  const auto blend_in_place = [&](const Tensor& running, const double* batch) {
    if (running.scalar_type() == at::kDouble) {
      blend_running(running.mutable_data_ptr<double>(), running.stride(0), batch, channels, momentum);
    } else {
      blend_running(running.mutable_data_ptr<float>(), running.stride(0), batch, channels, momentum);
    }
  };
  // Other dtypes (bfloat16/float16 statistics of a half input round from double the way
  // ATen's copy_ does) and devices: ATen ops.
  const auto blend_with_ops = [&](const Tensor& running, const double* batch) {
    const Tensor values = at::empty({channels}, running.options().dtype(at::kDouble).device(at::kCPU));
    std::copy_n(batch, channels, values.mutable_data_ptr<double>());
    const Tensor updated = running.to(at::kDouble).mul(keep).add(values.to(running.device()), momentum);
    const_cast<Tensor&>(running).copy_(updated);
  };
  for (const auto& [running, batch] : {std::pair<const Tensor&, const double*>{*running_mean, mean},
                                       {*running_var, unbiased_var}}) {
    const bool direct = running.is_cpu() && (running.scalar_type() == at::kFloat || running.scalar_type() == at::kDouble);
    direct ? blend_in_place(running, batch) : blend_with_ops(running, batch);
  }
}

}  // namespace lpnorm::ops
