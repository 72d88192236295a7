// CUDA kernels of the batch-norm operators: the torch side of csrc/cuda (which knows no
// torch). Checks, views and saved-tensor shapes come from ops/batch_norm.h like the CPU's;
// this file only hands pointers, strides, a workspace and the current stream to the
// launchers. Everything runs on the stream; nothing here waits for the GPU.
//
// Compiled by the C++ compiler (not nvcc): it needs torch's CUDA headers (a CUDA build of
// torch) and the CUDA runtime headers, which CMake adds when LPNORM_WITH_CUDA is on.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "core/channel_math.h"
#include "cuda/kernels.h"
#include "ops/batch_norm.h"

namespace lpnorm::ops {
namespace {

cuda::Dtype cuda_dtype(at::ScalarType type) {
  switch (type) {
    case at::kDouble: return cuda::Dtype::Float64;
    case at::kFloat: return cuda::Dtype::Float32;
    case at::kHalf: return cuda::Dtype::Float16;
    default: return cuda::Dtype::BFloat16;
  }
}

bool defined(const OptionalTensor& t) { return t.has_value() && t->defined(); }

// A per-channel tensor (already checked: [C], the input's device) as contiguous memory.
Tensor contiguous_or_undefined(const OptionalTensor& t) { return defined(t) ? t->contiguous() : Tensor(); }

cuda::ConstChannels const_channels(const Tensor& t) {
  if (!t.defined()) return {};
  return {t.const_data_ptr(), cuda_dtype(t.scalar_type())};
}

cuda::Channels channels(const Tensor& t) {
  if (!t.defined()) return {};
  return {t.mutable_data_ptr(), cuda_dtype(t.scalar_type())};
}

Tensor workspace(const Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// SPEC §4's accumulate="half" has only the CPU's scalar path (cpu/half_accumulation.h).
void refuse_half_accumulation(c10::string_view accumulate, const Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(!half_accumulation(accumulate, input),
                              "lpnorm.batch_norm: accumulate='half' is implemented on the CPU only");
}

ForwardResult batch_norm_forward_cuda(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                      const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                      bool training, double momentum, double eps, c10::string_view norm, int64_t k,
                                      double p, int64_t chunks, c10::string_view constant,
                                      c10::string_view accumulate) {
  const core::NormSpec spec =
      check_forward(input, weight, bias, running_mean, running_var, training, eps, norm, k, p, chunks,
                    constant);
  refuse_half_accumulation(accumulate, input);
  c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = channel_view(input);
  const int64_t cols = sparse_columns(spec, training);
  auto [save_mean, save_invstd, save_coef, sparse_index, sparse_coef] = empty_saved(x, cols);
  Tensor output = at::empty_like(x);
  // The kernels update running statistics in place through a contiguous buffer.
  const Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  Tensor rm = contiguous_or_undefined(running_mean), rv = contiguous_or_undefined(running_var);

  cuda::ForwardArgs args;
  args.layout = layout;
  args.dtype = cuda_dtype(x.scalar_type());
  args.x = x.const_data_ptr();
  args.y = output.mutable_data_ptr();
  args.spec = spec;
  args.batch_stats = training;
  if (training) args.constants = core::channel_constants(spec, layout.count());
  args.eps = eps;
  args.momentum = momentum;
  args.weight = const_channels(w);
  args.bias = const_channels(b);
  args.running_mean = channels(rm);
  args.running_var = channels(rv);
  args.stats_dtype = cuda_dtype(save_mean.scalar_type());
  args.save_mean = save_mean.mutable_data_ptr();
  args.save_invstd = save_invstd.mutable_data_ptr();
  args.save_coef = save_coef.mutable_data_ptr();
  args.sparse_index = sparse_index.mutable_data_ptr<int64_t>();
  args.sparse_coef = sparse_coef.mutable_data_ptr();
  args.sparse_cols = cols;
  const char* unsupported = cuda::forward_unsupported(args);
  TORCH_CHECK(unsupported == nullptr, unsupported);

  const Tensor scratch = workspace(x, cuda::forward_workspace_bytes(args));
  C10_CUDA_CHECK(cuda::batch_norm_forward(args, scratch.mutable_data_ptr(), current_stream(x)));
  if (training && rm.defined()) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {in_layout_of(output, input), save_mean, save_invstd, save_coef, sparse_index, sparse_coef};
}

BackwardResult batch_norm_backward_cuda(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                                        const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                                        const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                                        c10::string_view norm, double p, c10::string_view accumulate) {
  check_backward(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef);
  refuse_half_accumulation(accumulate, input);
  const core::NormSpec spec = parse_norm_spec(norm, 1, p, 1, "exact", 1, 0);
  c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = channel_view(input);
  const Tensor grad = match_layout(grad_output.to(x.scalar_type()), x);
  const int64_t channels_count = layout.C;
  const int64_t cols = training ? sparse_index.size(1) : 0;
  // Saved tensors as the forward made them: contiguous, on x's device, in the stats dtype.
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  const Tensor mean = save_mean.to(stats_options).contiguous();
  const Tensor invstd = save_invstd.to(stats_options).contiguous();
  const Tensor coef = save_coef.to(stats_options).contiguous();
  const Tensor index = sparse_index.to(x.device()).contiguous();
  const Tensor sparse = sparse_coef.to(stats_options).contiguous();
  const Tensor w = contiguous_or_undefined(weight);
  const auto param_dtype = w.defined() ? w.scalar_type() : stats_dtype(x.scalar_type());
  Tensor grad_input = at::empty_like(x);
  Tensor grad_weight = at::empty({channels_count}, x.options().dtype(param_dtype));
  Tensor grad_bias = at::empty({channels_count}, x.options().dtype(param_dtype));

  cuda::BackwardArgs args;
  args.layout = layout;
  args.dtype = cuda_dtype(x.scalar_type());
  args.grad = grad.const_data_ptr();
  args.x = x.const_data_ptr();
  args.grad_x = grad_input.mutable_data_ptr();
  args.phi = spec.phi();
  args.power = spec.p;
  args.batch_stats = training;
  args.weight = const_channels(w);
  args.stats_dtype = cuda_dtype(mean.scalar_type());
  args.save_mean = mean.const_data_ptr();
  args.save_invstd = invstd.const_data_ptr();
  args.save_coef = coef.const_data_ptr();
  args.sparse_index = index.const_data_ptr<int64_t>();
  args.sparse_coef = sparse.const_data_ptr();
  args.sparse_cols = cols;
  args.sparse_may_repeat = spec.sparse_may_repeat();
  args.grad_weight = channels(grad_weight);
  args.grad_bias = channels(grad_bias);
  const char* unsupported = cuda::backward_unsupported(args);
  TORCH_CHECK(unsupported == nullptr, unsupported);

  const Tensor scratch = workspace(x, cuda::backward_workspace_bytes(args));
  C10_CUDA_CHECK(cuda::batch_norm_backward(args, scratch.mutable_data_ptr(), current_stream(x)));
  return {in_layout_of(grad_input, input), grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, CUDA, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}

}  // namespace lpnorm::ops
