// CPU kernels over raw pointers and strides (no torch). One source, kernels.cpp, is compiled
// once per instruction set; dispatch.cpp picks the best build this CPU runs at run time.
//
// Every norm goes through the same passes:
//   collect_stats       sums and per-chunk extreme values           (one read of x)
//   collect_deviations  sum |x - mean|^q and sum phi(x - mean)      (dense norms only)
//   apply_affine        y = x * alpha + beta, alpha and beta per channel
//   reduce_grad         sum g and sum g * (x - mean)
//   apply_grad          dx = a * g + b * phi(x - mean) + c, then the sparse terms
// Each works on a range of channels, so the caller can split channels across threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/channel_math.h"
#include "core/layout.h"
#include "core/norm.h"

namespace lpnorm::cpu {

enum class Dtype { Float64, Float32, Float16, BFloat16 };

using Layout = core::ChannelLayout;

struct StatsArgs {
  Layout layout;
  Dtype dtype;
  const void* x;
  int64_t chunks;                 // along the batch dimension
  int64_t per_end;                // extremes kept per end and chunk (0: none)
  double* sum;                    // [C]
  core::Candidate* largest;       // [C][chunks][per_end]
  core::Candidate* smallest;      // [C][chunks][per_end], values negated
};

struct DeviationArgs {
  Layout layout;
  Dtype dtype;
  const void* x;
  const double* mean;             // [C]
  core::PhiKind phi;
  double power;                   // q in sum |d|^q; for SignedPower phi also uses it
  double* deviation_sum;          // [C]
  double* phi_sum;                // [C]
};

struct AffineArgs {
  Layout layout;
  Dtype dtype;
  const void* x;
  void* y;
  const double* alpha;            // [C]
  const double* beta;             // [C]
};

struct GradReduceArgs {
  Layout layout;
  Dtype dtype;
  const void* grad;
  const void* x;
  const double* mean;             // [C]
  double* sum_g;                  // [C]
  double* sum_gd;                 // [C]
};

struct GradApplyArgs {
  Layout layout;
  Dtype dtype;
  const void* grad;
  const void* x;
  void* grad_x;
  const double* mean;             // [C]
  core::PhiKind phi;
  double power;
  const core::GradCoefficients* coef;  // [C]
  const int64_t* sparse_index;    // [C][sparse_per_channel], flat n * S + s
  const double* sparse_coef;      // [C][sparse_per_channel]
  int64_t sparse_per_channel;
};

struct Kernels {
  const char* isa;
  void (*collect_stats)(const StatsArgs&, int64_t c_begin, int64_t c_end);
  void (*collect_deviations)(const DeviationArgs&, int64_t c_begin, int64_t c_end);
  void (*apply_affine)(const AffineArgs&, int64_t c_begin, int64_t c_end);
  void (*reduce_grad)(const GradReduceArgs&, int64_t c_begin, int64_t c_end);
  void (*apply_grad)(const GradApplyArgs&, int64_t c_begin, int64_t c_end);
};

// The kernels for the best instruction set this CPU supports, or the one named by the
// environment variable LPNORM_CPU_ISA (baseline, avx2, avx512), read once.
const Kernels& kernels();

// Switches every later call to the named build; throws std::invalid_argument when this
// CPU cannot run it.
const Kernels& select_isa(const std::string& isa);

// Names of the instruction-set builds this CPU can run, baseline first.
std::vector<std::string> supported_isas();

}  // namespace lpnorm::cpu
