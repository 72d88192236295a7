// The torch layer's shared pieces: argument checks (SPEC §5), the shapes of the saved
// tensors, and the (N, C, S) view of an input. Backends (cpu/, cuda/) and the autograd
// kernel use these, so every dispatch key refuses and allocates alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "core/layout.h"
#include "core/norm.h"

namespace lpnorm::ops {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor>;

// Parses and checks the norm options; `batch` is N and `count` is m where batch statistics split
// them (0 skips the checks that need data).
core::NormSpec parse_norm_spec(c10::string_view norm, int64_t k, double p, int64_t chunks,
                               c10::string_view constant, int64_t batch, int64_t count);

// Every refusal of SPEC §5 for a forward call (and torch's of eps), raised before any kernel runs.
core::NormSpec check_forward(const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
                             const OptionalTensor& running_mean, const OptionalTensor& running_var,
                             bool training, double eps, c10::string_view norm, int64_t k, double p,
                             int64_t chunks, c10::string_view constant);

// SPEC §4's accumulator option: "float" or "half" (anything else is refused). True when a
// half-precision input is to accumulate in its own type; "half" changes nothing for float32
// and float64 inputs, which have no narrower accumulator.
bool half_accumulation(c10::string_view accumulate, const Tensor& input);

// The checks of a backward call: saved tensors that fit the input.
void check_backward(const Tensor& grad_output, const Tensor& input, const OptionalTensor& weight,
                    const Tensor& save_mean, const Tensor& save_invstd, const Tensor& save_coef,
                    const Tensor& sparse_index, const Tensor& sparse_coef);

// dtype of the saved per-channel statistics: float64 for float64 input, else float32.
at::ScalarType stats_dtype(at::ScalarType input);

// Sparse gradient entries saved per channel (0 with running statistics).
int64_t sparse_columns(const core::NormSpec& spec, bool batch_stats);

// The input, copied only when its spatial dimensions cannot be seen as one strided
// dimension, and its (N, C, S) layout. empty_like of the returned tensor has the same layout.
std::pair<Tensor, core::ChannelLayout> channel_view(const Tensor& input);

// `tensor` in the exact layout of `like` (a copy only when the strides differ).
Tensor match_layout(const Tensor& tensor, const Tensor& like);

// A result computed in channel_view's layout, in the layout empty_like(input) has (what the
// fake kernels promise): a copy only for dense inputs whose spatial dims do not merge.
Tensor in_layout_of(const Tensor& result, const Tensor& input);

// Saved tensors of a forward call, allocated alike by every backend:
// (save_mean [C], save_invstd [C], save_coef [C, 3] = sigma, a, b,
//  sparse_index [C, cols] int64, sparse_coef [C, cols]).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> empty_saved(const Tensor& input, int64_t cols);

// Running statistics update of SPEC §2, from per-channel float64 mean and unbiased variance
// (host arrays of `channels` values): running * (1 - f) rounded, then + f * batch fused, in
// double, as ATen's mul and add(alpha) compute it.
void update_running_stats(const OptionalTensor& running_mean, const OptionalTensor& running_var,
                          const double* mean, const double* unbiased_var, int64_t channels, double momentum);

}  // namespace lpnorm::ops
