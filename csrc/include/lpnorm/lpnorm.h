// lpnorm/lpnorm.h: the lpnorm operators for libtorch programs.
//
// Link the `lpnorm::lpnorm` target of the installed CMake package (find_package(lpnorm));
// it links liblpnorm_ops, whose load registers torch.ops.lpnorm.* with the dispatcher, so
// TorchScript models and AOTInductor packages that use lpnorm's modules run, and these
// functions can be called directly. Arguments, defaults and semantics are those of
// lpnorm.functional.batch_norm in Python (SPEC §2, §6).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#define LPNORM_API __attribute__((visibility("default")))

namespace lpnorm {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

// Lp batch normalization over dim 1, with gradients (the Autograd kernel is C++).
// `training` uses batch statistics and updates running_mean / running_var in place.
// norm: "l2", "l1", "linf", "topk" (k), "range", "p" (p); chunks: ghost batches of the
// extreme-value norms; constant: "exact" or "paper"; accumulate: "float" (half inputs
// accumulate in float32) or "half" (in their own type, SPEC §4; CPU only).
LPNORM_API Tensor batch_norm(const Tensor& input, const OptionalTensor& running_mean,
                             const OptionalTensor& running_var, const OptionalTensor& weight = std::nullopt,
                             const OptionalTensor& bias = std::nullopt, bool training = false,
                             double momentum = 0.1, double eps = 1e-5, const std::string& norm = "l1",
                             int64_t k = 10, double p = 2.0, int64_t chunks = 1,
                             const std::string& constant = "exact", const std::string& accumulate = "float");

// The two operators below autograd (lpnorm::batch_norm_forward / _backward):
// (output, save_mean, save_invstd, save_coef, sparse_index, sparse_coef).
LPNORM_API std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_forward(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training, double momentum,
    double eps, const std::string& norm, int64_t k, double p, int64_t chunks, const std::string& constant,
    const std::string& accumulate = "float");

// (grad_input, grad_weight, grad_bias) from what batch_norm_forward saved.
LPNORM_API std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(
    const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight, const Tensor& save_mean,
    const Tensor& save_invstd, const Tensor& save_coef, const Tensor& sparse_index, const Tensor& sparse_coef,
    bool training, const std::string& norm, double p, const std::string& accumulate = "float");

// "0.1.0" and the torch release the library was compiled against ("2.13.0+cpu").
LPNORM_API const char* version() noexcept;
LPNORM_API const char* torch_version() noexcept;

namespace detail {
// Every translation unit that includes this header refers to the library, so a linker
// that drops unreferenced shared libraries (--as-needed) keeps it, and its operator
// registrations run (the pytorch_scatter idiom). The CMake package also links it with
// --no-as-needed, for programs that only load models and never include this header.
LPNORM_API int link_anchor() noexcept;
inline const int linked = link_anchor();
}  // namespace detail

}  // namespace lpnorm
