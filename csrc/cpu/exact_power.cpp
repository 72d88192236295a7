#include "cpu/exact_power.h"

#include <cmath>

#include "core/half_types.h"
#include "core/norm.h"

namespace lpnorm::cpu {
namespace {

// Terms of a largest size below this, over m values, leave the smaller ones below float's
// least normal (2^-126): 2^-100 keeps 26 bits of room.
constexpr double kLeast = 0x1p-100;
// |d|^(p - 1) of the backward above this is near float's largest (2^128).
constexpr double kMost = 0x1p120;

template <typename T>
double load(const void* data, int64_t offset) {
  return static_cast<double>(core::Element<T>::load(static_cast<const T*>(data)[offset]));
}

template <typename Fn>
void with_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float32: return fn(float{});
    case Dtype::Float16: return fn(core::Half{});
    case Dtype::BFloat16: return fn(core::BFloat16{});
    default: return;  // float64: powered in double by the vector passes already
  }
}

// fn(offset) for every element of channel c, n-major as the data lies for one channel.
template <typename Fn>
void each_element(const core::ChannelLayout& l, int64_t c, Fn&& fn) {
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t s = 0; s < l.S; ++s) fn(l.offset(n, c, s));
  }
}

}  // namespace

bool power_sums_left_float(double deviation_sum, int64_t m) {
  return !std::isfinite(deviation_sum) || deviation_sum < static_cast<double>(m) * kLeast;
}

bool power_grad_leaves_float(double sigma_cp, double p, int64_t m) {
  if (!(sigma_cp > 0) || !std::isfinite(sigma_cp) || p <= 1) return false;
  const double low = std::pow(sigma_cp, p - 1);
  const double high = std::pow(sigma_cp * std::pow(static_cast<double>(m), 1 / p), p - 1);
  return low < kLeast || high > kMost;
}

PowerSums exact_power_sums(const core::ChannelLayout& l, Dtype dtype, const void* x, int64_t c, double mean,
                           double p) {
  PowerSums sums;
  with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    each_element(l, c, [&](int64_t offset) {
      const double d = load<T>(x, offset) - mean;
      if (d == 0) return;  // a constant channel costs a compare an element
      const double below = std::pow(std::abs(d), p - 1);
      sums.deviation += below * std::abs(d);
      sums.phi += core::sign_of(d) * below;
    });
  });
  return sums;
}

void redo_power_sums(const core::ChannelLayout& l, Dtype dtype, const void* x, int64_t begin, int64_t end,
                     const double* mean, double p, double* deviation, double* phi) {
  const int64_t m = l.count();
  if (dtype == Dtype::Float64 || m == 0) return;
  for (int64_t c = begin; c < end; ++c) {
    if (!std::isfinite(mean[c]) || !power_sums_left_float(deviation[c], m)) continue;
    const PowerSums exact = exact_power_sums(l, dtype, x, c, mean[c], p);
    deviation[c] = exact.deviation;
    phi[c] = exact.phi;
  }
}

std::vector<int64_t> exact_power_grad_channels(Dtype dtype, const double* coef, int64_t channels, double p,
                                               int64_t m, double lp_constant) {
  std::vector<int64_t> exact;
  if (dtype == Dtype::Float64 || m == 0) return exact;
  for (int64_t c = 0; c < channels; ++c) {
    if (power_grad_leaves_float(coef[3 * c] * lp_constant, p, m)) exact.push_back(c);
  }
  return exact;
}

void exact_power_grad(const core::ChannelLayout& l, Dtype dtype, const void* grad, const void* x, void* grad_x,
                      int64_t c, double mean, const core::GradCoefficients& k, double p) {
  with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(grad_x);
    each_element(l, c, [&](int64_t offset) {
      const double d = load<T>(x, offset) - mean;
      const double phi = core::phi(core::PhiKind::SignedPower, d, p);
      const double value = k.scale_g * load<T>(grad, offset) + k.scale_phi * phi + k.offset;
      out[offset] = core::Element<T>::store(static_cast<typename core::Element<T>::acc>(value));
    });
  });
}

}  // namespace lpnorm::cpu
