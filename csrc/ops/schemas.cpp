// Every operator of the lpnorm namespace, in one place. Backends register their kernels
// beside their code (cpu/, cuda/, autograd/); Python adds the fake kernels.
#include <torch/library.h>

TORCH_LIBRARY(lpnorm, m) {
  // The user-facing operator: normalized output, gradients through autograd (C++).
  // `training` selects batch statistics; running statistics are updated in place then.
  // `accumulate`: "float" (half inputs accumulate in float32) or "half" (in the input's own
  // type, SPEC §4; CPU only).
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str norm, int k, float p, "
      "int chunks, str constant, str accumulate=\"float\") -> Tensor");
  // The forward pass: output plus what the backward needs (per-channel statistics and the
  // sparse gradient terms of linf/topk/range).
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str norm, int k, float p, "
      "int chunks, str constant, str accumulate=\"float\") -> (Tensor output, Tensor save_mean, Tensor save_invstd, "
      "Tensor save_coef, Tensor sparse_index, Tensor sparse_coef)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, Tensor save_coef, Tensor sparse_index, Tensor sparse_coef, bool training, "
      "str norm, float p, str accumulate=\"float\") -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

// The stages of a training forward/backward, for callers that combine statistics across
// processes between them (lpnorm.nn.SyncLpBatchNorm; chunks == 1). Statistics are float64;
// extreme lists are [C, 2, L] (end 0: largest x, end 1: smallest x stored as -x) with flat
// indices n * S + s offset by `index_offset`, this process's first global flat index.
TORCH_LIBRARY_FRAGMENT(lpnorm, m) {
  m.def("batch_norm_collect(Tensor input, str norm, int k, int index_offset) -> "
        "(Tensor sum, Tensor extreme_value, Tensor extreme_index)");
  m.def("batch_norm_deviations(Tensor input, Tensor mean, str norm, float p) -> "
        "(Tensor deviation_sum, Tensor phi_sum)");
  m.def("batch_norm_finalize(int count, Tensor sum, Tensor deviation_sum, Tensor phi_sum, "
        "Tensor extreme_value, Tensor extreme_index, float eps, str norm, int k, float p, str constant) -> "
        "(Tensor mean, Tensor invstd, Tensor save_coef, Tensor sparse_index, Tensor sparse_coef, "
        "Tensor unbiased_var)");
  m.def("batch_norm_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> Tensor");
  m.def("batch_norm_reduce_grad(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_g, Tensor sum_gd)");
  m.def("batch_norm_apply_grad(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor save_coef, Tensor sparse_index, Tensor sparse_coef, Tensor sum_g, Tensor sum_gd, int count, "
        "str norm, float p, int index_offset) -> Tensor");
}
