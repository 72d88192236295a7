// Autograd of lpnorm::batch_norm, in C++ so gradients work from Python, TorchScript and C++
// alike. The forward runs below autograd through batch_norm_forward; the backward is its
// own operator, so torch.compile traces two ops with fake kernels. When the backward itself
// must be differentiable (create_graph=True: gradient penalties, gradgradcheck), it is
// computed instead by differentiable_backward, a composite of ATen ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "core/constants.h"
#include "ops/batch_norm.h"

namespace lpnorm::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ForwardResult call_forward(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                           double momentum, double eps, c10::string_view norm, int64_t k, double p, int64_t chunks,
                           c10::string_view constant, c10::string_view accumulate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lpnorm::batch_norm_forward", "")
                             .typed<decltype(call_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks,
                 constant, accumulate);
}

BackwardResult call_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                             const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                             const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                             c10::string_view norm, double p, c10::string_view accumulate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lpnorm::batch_norm_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef,
                 training, norm, p, accumulate);
}

// The gradients of SPEC §3 as differentiable ATen ops of (grad_output, input, weight), so
// autograd can differentiate them again. The statistics are recomputed from the input
// rather than read from the saved tensors, which carry no graph; only what is locally
// constant is taken from the forward: the running statistics in eval mode, and for
// linf/topk/range the sparse entries (the arg-max / top-k set / arg-min with their signs and
// constants), through which sigma is linear in d:
//     sigma = sum_j sparse_coef_j * d[sparse_index_j]
// (linf/topk: coef_j = sign(d_j) / (chunks * per_chunk * E); range: +-1 / (chunks * E) at the
// arg-max and arg-min, whose sum per chunk is zero, so the mean drops out as it should).
// Per channel, with m values, r = 1 / sqrt(sigma^2 + eps):
//     dL/dx      = w r (g - mean(g)) - w r^3 sum(g d) * sigma dsigma/dx
//     dL/dweight = sum(g d) r,    dL/dbias = sum(g)
// written with sigma^2 and sigma * dsigma/dx, which stay finite (and have finite gradients)
// on a constant channel, sigma = 0 (a dead ReLU's): l2 needs no square root that way, and the
// p-norm's powers of 0 are kept out of the graph, whose gradient there is 0 as the native one.
// Work is done on a (C, m) view, in the saved statistics' dtype (float32 for half inputs).
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& weight, const Tensor& save_mean,
                                                           const Tensor& save_invstd, const Tensor& sparse_index,
                                                           const Tensor& sparse_coef, bool training,
                                                           const std::string& norm, double p, double eps) {
  constexpr double kSqrtHalfPi = 1.2533141373155002512;  // sqrt(pi / 2)
  const auto acc = save_mean.scalar_type();
  const int64_t channels = input.size(1);
  // (N, C, ...) -> (C, m); column n * S + s, the flat index of the saved sparse entries.
  const auto by_channel = [&](const Tensor& t) { return t.transpose(0, 1).reshape({channels, -1}).to(acc); };
  const auto positive_or_one = [](const Tensor& t) { return at::where(t > 0, t, 1.0); };
  const Tensor x = by_channel(input);
  const Tensor g = by_channel(grad_output);
  const double m = static_cast<double>(x.size(1));
  const Tensor w = weight.defined() ? weight.to(acc).unsqueeze(1) : at::ones({channels, 1}, x.options());

  Tensor d, r, grad_input;
  const Tensor sum_g = g.sum(1, /*keepdim=*/true);
  if (!training) {  // running statistics: constants, y is affine in x
    d = x - save_mean.to(acc).unsqueeze(1);
    r = save_invstd.to(acc).unsqueeze(1);
    grad_input = w * r * g;
  } else {
    d = x - x.mean(1, /*keepdim=*/true);
    Tensor variance, sigma_dsigma;  // sigma^2 [C, 1]; sigma * dsigma/dx [C, m], the mean's part included
    if (norm == "l2") {
      variance = d.square().mean(1, true);
      sigma_dsigma = d / m;
    } else if (norm == "l1") {
      const Tensor sigma = d.abs().mean(1, true) * kSqrtHalfPi;
      const Tensor sign = d.sign();
      variance = sigma.square();
      sigma_dsigma = sigma * (sign - sign.mean(1, true)) * (kSqrtHalfPi / m);
    } else if (norm == "p") {
      // sigma = moment^(1/p) / c_p, dsigma/dx = moment^(1/p - 1) / (m c_p) * (phi - mean(phi)),
      // phi = sign(d) |d|^(p-1)
      const double c_p2 = core::lp_consistency(p) * core::lp_consistency(p);
      const Tensor moment = d.abs().pow(p).mean(1, true);
      const Tensor spread = (moment > 0).to(acc), safe_moment = positive_or_one(moment);
      const Tensor phi = d.sign() * positive_or_one(d.abs()).pow(p - 1.0);
      variance = safe_moment.pow(2.0 / p) * spread / c_p2;
      sigma_dsigma = safe_moment.pow(2.0 / p - 1.0) * spread / (m * c_p2) * (phi - phi.mean(1, true));
    } else {  // linf, topk, range: sparse at the saved indices
      const Tensor coef = sparse_coef.to(acc);
      const Tensor sigma = (coef * d.gather(1, sparse_index)).sum(1, true);
      variance = sigma.square();
      sigma_dsigma = sigma * (at::zeros_like(d).scatter_add(1, sparse_index, coef) - coef.sum(1, true) / m);
    }
    r = (variance + eps).rsqrt();
    grad_input = w * r * (g - sum_g / m) - w * r.pow(3) * (g * d).sum(1, true) * sigma_dsigma;
  }
  // Back to (N, C, ...) and the input's dtype.
  std::vector<int64_t> shape = input.sizes().vec();
  std::swap(shape[0], shape[1]);
  grad_input = grad_input.reshape(shape).transpose(0, 1).to(input.scalar_type());
  const Tensor grad_weight = ((g * d).sum(1) * r.squeeze(1));
  const Tensor grad_bias = sum_g.squeeze(1);
  const auto param = weight.defined() ? weight.scalar_type() : acc;
  return {grad_input, grad_weight.to(param), grad_bias.to(param)};
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, bool training, double momentum, double eps,
                        const std::string& norm, int64_t k, double p, int64_t chunks, const std::string& constant,
                        const std::string& accumulate) {
    // As torch's batch_norm: the running statistics are buffers, not differentiable (updated in
    // place, a gradient through them would be silently dropped).
    for (const auto& [stats, name] : {std::pair<const OptionalTensor&, const char*>{running_mean, "running_mean"},
                                      {running_var, "running_var"}}) {
      TORCH_CHECK_VALUE(!(stats.has_value() && stats->defined() && stats->requires_grad()), "lpnorm.batch_norm: ",
                        name, " requires grad, but the running statistics are not differentiable (as torch's)");
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, save_coef, sparse_index, sparse_coef] = call_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks, constant,
        accumulate);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), save_mean, save_invstd, save_coef, sparse_index, sparse_coef});
    ctx->saved_data["training"] = training;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["p"] = p;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["accumulate"] = accumulate;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    variable_list grads(14);  // one per forward argument
    if (!grad_outputs[0].defined()) return grads;
    const bool training = ctx->saved_data["training"].toBool();
    const std::string& norm = ctx->saved_data["norm"].toStringRef();
    const double p = ctx->saved_data["p"].toDouble();
    // Grad mode is on in a backward only with create_graph=True: then the gradients must
    // themselves have gradients, which the native backward operator does not provide. (That
    // composite accumulates as ATen does, in float32 for half inputs, whatever `accumulate`.)
    const bool differentiable = at::GradMode::is_enabled() && saved[0].numel() > 0;
    auto [grad_input, grad_weight, grad_bias] =
        differentiable
            ? differentiable_backward(grad_outputs[0], saved[0], weight, saved[2], saved[3], saved[5], saved[6],
                                      training, norm, p, ctx->saved_data["eps"].toDouble())
            : call_backward(grad_outputs[0], saved[0], weight.defined() ? OptionalTensor(weight) : std::nullopt,
                            saved[2], saved[3], saved[4], saved[5], saved[6], training, norm, p,
                            ctx->saved_data["accumulate"].toStringRef());
    grads[0] = grad_input;
    if (weight.defined()) grads[1] = grad_weight;
    if (ctx->saved_data["has_bias"].toBool()) grads[2] = grad_bias;
    return grads;
  }
};

Tensor batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                           double momentum, double eps, c10::string_view norm, int64_t k, double p, int64_t chunks,
                           c10::string_view constant, c10::string_view accumulate) {
  return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                  std::string(norm), k, p, chunks, std::string(constant), std::string(accumulate));
}

// Below autograd (inference, or dispatch keys past Autograd): just the forward's output.
Tensor batch_norm_inference(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                            double momentum, double eps, c10::string_view norm, int64_t k, double p,
                            int64_t chunks, c10::string_view constant, c10::string_view accumulate) {
  return std::get<0>(call_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k,
                                  p, chunks, constant, accumulate));
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }

TORCH_LIBRARY_IMPL(lpnorm, CompositeExplicitAutograd, m) { m.impl("batch_norm", &batch_norm_inference); }

}  // namespace lpnorm::ops
