// CUDA kernels of the batch-norm operators over raw pointers, strides and a stream (no torch,
// SPEC §7). Plain C++ declarations: the torch glue (csrc/ops/cuda) includes this header
// without nvcc. The passes are those of the CPU (cpu/kernels.h), and the per-channel step
// between them runs on the device with the core's own formulas (core/channel_math.h), so a
// forward or backward call never waits for the GPU.
//
// Forward, batch statistics:
//   channel_pivots       each channel's pivot p (the mean of its first 8 elements, as the CPU's)
//   collect_stats        per (channel, chunk): sum of x - p and, for linf/topk/range, the
//                        per_end largest and smallest values with their flat indices
//   channel_means        dense norms: each channel's mean, once
//   collect_deviations   dense norms: sum |x - mean|^q and sum phi(x - mean)
//   finish_channels      core::channel_statistics_with per channel: saved tensors, sparse
//                        entries, running statistics, mean, scale = invstd * w, bias
//   apply_affine         y = (x - mean) * scale + bias
// Backward:
//   reduce_grad          sum g and sum g * (x - mean)
//   grad_channels        core::grad_coefficients per channel
//   apply_grad           dx = scale_g * g + scale_phi * phi(x - mean) + offset
//   finish_grad          dweight, dbias, and the few sparse entries recomputed whole
//
// Every reduction runs in a fixed order (per-thread loops, warp shuffles, a shared-memory
// step, then the per-block partials summed in index order): the same input gives the same
// bits on every run. The split into blocks and the per-thread order depend on the shape and
// on the vector width, which the pointers' alignment picks (a view at an odd offset loads
// one element at a time), not on the GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/channel_math.h"
#include "core/layout.h"
#include "core/norm.h"

namespace lpnorm::cuda {

enum class Dtype { Float64, Float32, Float16, BFloat16 };

// A per-channel vector of C contiguous values in its own dtype (weight, bias, running or
// saved statistics, parameter gradients). data == nullptr: absent.
struct ConstChannels {
  const void* data = nullptr;
  Dtype dtype = Dtype::Float32;
};
struct Channels {
  void* data = nullptr;
  Dtype dtype = Dtype::Float32;
};

struct ForwardArgs {
  core::ChannelLayout layout;       // of x and y alike
  Dtype dtype;                      // of x and y
  const void* x = nullptr;
  void* y = nullptr;
  core::NormSpec spec;
  core::ChannelConstants constants; // core::channel_constants(spec, m), computed on the host
  bool batch_stats = true;          // false: normalize with the running statistics
  double eps = 1e-5;
  double momentum = 0.1;
  ConstChannels weight, bias;       // absent: 1 and 0
  Channels running_mean, running_var;  // updated in place with batch statistics (if present)
  // The saved tensors of batch_norm_forward, contiguous, in `stats_dtype` (float32/float64):
  // save_mean [C], save_invstd [C], save_coef [C, 3], sparse_index [C, cols], sparse_coef [C, cols].
  Dtype stats_dtype = Dtype::Float32;
  void* save_mean = nullptr;
  void* save_invstd = nullptr;
  void* save_coef = nullptr;
  int64_t* sparse_index = nullptr;
  void* sparse_coef = nullptr;
  int64_t sparse_cols = 0;
};

struct BackwardArgs {
  core::ChannelLayout layout;       // of grad, x and grad_x alike
  Dtype dtype;
  const void* grad = nullptr;
  const void* x = nullptr;
  void* grad_x = nullptr;
  core::PhiKind phi = core::PhiKind::None;
  double power = 2.0;               // the exponent p of norm 'p'
  bool batch_stats = true;
  ConstChannels weight;             // absent: 1
  Dtype stats_dtype = Dtype::Float32;
  const void* save_mean = nullptr;
  const void* save_invstd = nullptr;
  const void* save_coef = nullptr;
  const int64_t* sparse_index = nullptr;
  const void* sparse_coef = nullptr;
  int64_t sparse_cols = 0;
  bool sparse_may_repeat = true;    // core::NormSpec::sparse_may_repeat: sum an index's terms first
  Channels grad_weight, grad_bias;  // written when present
};

// Largest extremes_per_end() (top-k's k) the kernels keep per thread.
constexpr int64_t kMaxExtremesPerEnd = 32;

// nullptr when the kernels support these arguments, else why not (the torch layer raises it).
const char* forward_unsupported(const ForwardArgs& args);
const char* backward_unsupported(const BackwardArgs& args);

// Device scratch each call needs (bytes, 256-aligned pieces); the caller allocates it on the
// stream's device (the caching allocator) and keeps it alive until the stream is done.
size_t forward_workspace_bytes(const ForwardArgs& args);
size_t backward_workspace_bytes(const BackwardArgs& args);

// Enqueue the passes on `stream`; return the launch status (cudaGetLastError).
cudaError_t batch_norm_forward(const ForwardArgs& args, void* workspace, cudaStream_t stream);
cudaError_t batch_norm_backward(const BackwardArgs& args, void* workspace, cudaStream_t stream);

}  // namespace lpnorm::cuda
