// The public C++ API (include/lpnorm/lpnorm.h): typed calls through the dispatcher, so a
// libtorch program gets the same kernels, autograd and checks as torch.ops.lpnorm.*.
// These are the only symbols of liblpnorm_ops with default visibility.
#include "lpnorm/lpnorm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#ifndef LPNORM_VERSION
#error "LPNORM_VERSION must be defined by the build"
#endif

namespace lpnorm {
namespace {

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor>;

// The schemas' C++ signatures (csrc/ops/schemas.cpp).
using BatchNormSignature = Tensor(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                  const OptionalTensor&, const OptionalTensor&, bool, double, double,
                                  c10::string_view, int64_t, double, int64_t, c10::string_view, c10::string_view);
using ForwardSignature = ForwardResult(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, bool, double, double,
                                       c10::string_view, int64_t, double, int64_t, c10::string_view,
                                       c10::string_view);
using BackwardSignature = BackwardResult(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                         c10::string_view, double, c10::string_view);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

Tensor batch_norm(const Tensor& input, const OptionalTensor& running_mean, const OptionalTensor& running_var,
                  const OptionalTensor& weight, const OptionalTensor& bias, bool training, double momentum,
                  double eps, const std::string& norm, int64_t k, double p, int64_t chunks,
                  const std::string& constant, const std::string& accumulate) {
  static const auto op = find<BatchNormSignature>("lpnorm::batch_norm");
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks,
                 constant, accumulate);
}

ForwardResult batch_norm_forward(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                                 const OptionalTensor& running_mean, const OptionalTensor& running_var,
                                 bool training, double momentum, double eps, const std::string& norm, int64_t k,
                                 double p, int64_t chunks, const std::string& constant,
                                 const std::string& accumulate) {
  static const auto op = find<ForwardSignature>("lpnorm::batch_norm_forward");
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks,
                 constant, accumulate);
}

BackwardResult batch_norm_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                                   const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                                   const Tensor& sparse_index, const Tensor& sparse_coef, bool training,
                                   const std::string& norm, double p, const std::string& accumulate) {
  static const auto op = find<BackwardSignature>("lpnorm::batch_norm_backward");
  return op.call(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index, sparse_coef,
                 training, norm, p, accumulate);
}

const char* version() noexcept { return LPNORM_VERSION; }
const char* torch_version() noexcept { return LPNORM_TORCH_VERSION; }

namespace detail {
int link_anchor() noexcept { return 1; }
}  // namespace detail

}  // namespace lpnorm
