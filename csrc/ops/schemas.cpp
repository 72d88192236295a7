// Every operator of the lpnorm namespace, in one place. Backends register their kernels
// beside their code (cpu/, cuda/, autograd/); Python adds the fake kernels.
#include <torch/library.h>

TORCH_LIBRARY(lpnorm, m) {
  // The user-facing operator: normalized output, gradients through autograd (C++).
  // `training` selects batch statistics; running statistics are updated in place then.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str norm, int k, float p, "
      "int chunks, str constant) -> Tensor");
  // The forward pass: output plus what the backward needs (per-channel statistics and the
  // sparse gradient terms of linf/topk/range).
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str norm, int k, float p, "
      "int chunks, str constant) -> (Tensor output, Tensor save_mean, Tensor save_invstd, "
      "Tensor save_coef, Tensor sparse_index, Tensor sparse_coef)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, Tensor save_coef, Tensor sparse_index, Tensor sparse_coef, bool training, "
      "str norm, float p) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}
