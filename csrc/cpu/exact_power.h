// The general p norm's powers in double, one channel element by element, where the vector
// passes' powers in float would leave float's range: |d|^p overflows where p log10 |d| > 38
// (p = 20 with deviations of 100 normalized everything to 0) and loses deviations below about
// 10^(-38 / p). Float32 and half inputs only: float64 data is already powered in double.
#pragma once

#include <cstdint>
#include <vector>

#include "core/channel_math.h"
#include "core/layout.h"
#include "cpu/kernels.h"

namespace lpnorm::cpu {

// Whether channel sums of |d|^p (deviation_sum over m values) may have left float's range:
// an overflow (inf, NaN from inf - inf in phi) or a largest term too small to keep the rest.
bool power_sums_left_float(double deviation_sum, int64_t m);

// Whether |d|^(p - 1) at the channel's scale sigma * c_p, or at its largest possible |d|
// (sigma * c_p * m^(1/p)), leaves float's range.
bool power_grad_leaves_float(double sigma_cp, double p, int64_t m);

struct PowerSums {
  double deviation = 0;  // sum |d|^p
  double phi = 0;        // sum sign(d) |d|^(p - 1)
};

// Channel c of x (Float32, Float16 or BFloat16), d = x - mean in double.
PowerSums exact_power_sums(const core::ChannelLayout& layout, Dtype dtype, const void* x, int64_t c, double mean,
                           double p);

// Channels [begin, end) of x whose float sums (deviation[c], phi[c], around mean[c]) left
// float's range, summed again in double (exact_power_sums) in place; none for Float64 data or
// a non-finite mean.
void redo_power_sums(const core::ChannelLayout& layout, Dtype dtype, const void* x, int64_t begin, int64_t end,
                     const double* mean, double p, double* deviation, double* phi);

// The channels whose gradient exact_power_grad writes: those whose |d|^(p - 1) leaves float's
// range (power_grad_leaves_float at sigma * c_p; coef: [C][3] as saved, sigma first; m: the
// channel's elements over every process). None for Float64 data or an empty batch.
std::vector<int64_t> exact_power_grad_channels(Dtype dtype, const double* coef, int64_t channels, double p,
                                               int64_t m, double lp_constant);

// Channel c of grad_x = scale_g * g + scale_phi * sign(d) |d|^(p - 1) + offset, in double.
void exact_power_grad(const core::ChannelLayout& layout, Dtype dtype, const void* grad, const void* x, void* grad_x,
                      int64_t c, double mean, const core::GradCoefficients& k, double p);

}  // namespace lpnorm::cpu
