// Autograd of lpnorm::batch_norm, in C++ so gradients work from Python, TorchScript and C++
// alike. The forward runs below autograd through batch_norm_forward; the backward is its
// own operator, so torch.compile traces two ops with fake kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/batch_norm.h"

namespace lpnorm::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ForwardResult call_forward(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                           double momentum, double eps, c10::string_view norm, int64_t k, double p, int64_t chunks,
                           c10::string_view constant) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lpnorm::batch_norm_forward", "")
                             .typed<decltype(call_forward)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks,
                 constant);
}

BackwardResult call_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                             const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                             const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                             c10::string_view norm, double p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lpnorm::batch_norm_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef,
                 training, norm, p);
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, bool training, double momentum, double eps,
                        const std::string& norm, int64_t k, double p, int64_t chunks, const std::string& constant) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, save_mean, save_invstd, save_coef, sparse_index, sparse_coef] = call_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks, constant);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), save_mean, save_invstd, save_coef, sparse_index, sparse_coef});
    ctx->saved_data["training"] = training;
    ctx->saved_data["norm"] = norm;
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& weight = saved[1];
    variable_list grads(13);  // one per forward argument
    if (!grad_outputs[0].defined()) return grads;
    auto [grad_input, grad_weight, grad_bias] =
        call_backward(grad_outputs[0], saved[0], weight.defined() ? OptionalTensor(weight) : std::nullopt,
                      saved[2], saved[3], saved[4], saved[5], saved[6], ctx->saved_data["training"].toBool(),
                      ctx->saved_data["norm"].toStringRef(), ctx->saved_data["p"].toDouble());
    grads[0] = grad_input;
    if (weight.defined()) grads[1] = grad_weight;
    if (ctx->saved_data["has_bias"].toBool()) grads[2] = grad_bias;
    return grads;
  }
};

Tensor batch_norm_autograd(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                           const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                           double momentum, double eps, c10::string_view norm, int64_t k, double p, int64_t chunks,
                           c10::string_view constant) {
  return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                  std::string(norm), k, p, chunks, std::string(constant));
}

// Below autograd (inference, or dispatch keys past Autograd): just the forward's output.
Tensor batch_norm_inference(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                            double momentum, double eps, c10::string_view norm, int64_t k, double p,
                            int64_t chunks, c10::string_view constant) {
  return std::get<0>(call_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k,
                                  p, chunks, constant));
}

}  // namespace

TORCH_LIBRARY_IMPL(lpnorm, Autograd, m) { m.impl("batch_norm", &batch_norm_autograd); }

TORCH_LIBRARY_IMPL(lpnorm, CompositeExplicitAutograd, m) { m.impl("batch_norm", &batch_norm_inference); }

}  // namespace lpnorm::ops
