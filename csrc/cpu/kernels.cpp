// The CPU passes, written once. CMake compiles this file once per instruction set with
// LPNORM_ISA set to its name (baseline, avx2, avx512) and that set's compiler flags; each
// build lives in its own namespace and exports kernels_<isa>().
#include <cmath>
#include <type_traits>

#include "core/half_types.h"
#include "cpu/kernels.h"

#ifndef LPNORM_ISA
#error "compile kernels.cpp with -DLPNORM_ISA=<name>"
#endif

#define LPNORM_CONCAT_(a, b) a##b
#define LPNORM_CONCAT(a, b) LPNORM_CONCAT_(a, b)
#define LPNORM_STRINGIFY_(a) #a
#define LPNORM_STRINGIFY(a) LPNORM_STRINGIFY_(a)

namespace lpnorm::cpu {
namespace LPNORM_CONCAT(isa_, LPNORM_ISA) {
namespace {

using core::Element;

// Visits every element of channels [c_begin, c_end) as body(c, flat, offset), where flat is
// n * S + s inside the channel and offset the element's position in memory. The loop order
// follows memory: channel by channel for NCHW-like layouts, row by row when the channels
// are the innermost dimension (channels-last, and (N, C) inputs).
template <typename Body>
void for_each_element(const Layout& l, int64_t c_begin, int64_t c_end, Body&& body) {
  const bool spatial_contiguous = l.S > 1 && l.stride_s == 1;
  if (l.stride_c == 1 && l.C > 1 && !spatial_contiguous) {
    for (int64_t n = 0; n < l.N; ++n) {
      for (int64_t s = 0; s < l.S; ++s) {
        const int64_t row = n * l.stride_n + s * l.stride_s;
        const int64_t flat = n * l.S + s;
        for (int64_t c = c_begin; c < c_end; ++c) body(c, flat, row + c);
      }
    }
    return;
  }
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t n = 0; n < l.N; ++n) {
      const int64_t plane = c * l.stride_c + n * l.stride_n;
      for (int64_t s = 0; s < l.S; ++s) body(c, n * l.S + s, plane + s * l.stride_s);
    }
  }
}

template <typename Fn>
void with_element_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float64: fn(double{}); break;
    case Dtype::Float32: fn(float{}); break;
    case Dtype::Float16: fn(core::Half{}); break;
    case Dtype::BFloat16: fn(core::BFloat16{}); break;
  }
}

template <typename T>
double load(const void* data, int64_t offset) {
  return static_cast<double>(Element<T>::load(static_cast<const T*>(data)[offset]));
}

template <typename T>
void store(void* data, int64_t offset, double value) {
  using acc = typename Element<T>::acc;
  static_cast<T*>(data)[offset] = Element<T>::store(static_cast<acc>(value));
}

void collect_stats(const StatsArgs& a, int64_t c_begin, int64_t c_end) {
  const int64_t chunk_count = a.layout.count() / a.chunks;
  const int64_t per_chunk = a.chunks * a.per_end;  // candidates per channel and end
  for (int64_t c = c_begin; c < c_end; ++c) {
    a.sum[c] = 0;
    if (a.per_end > 0) {
      core::reset_extremes(a.largest + c * per_chunk, per_chunk);
      core::reset_extremes(a.smallest + c * per_chunk, per_chunk);
    }
  }
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_element(a.layout, c_begin, c_end, [&](int64_t c, int64_t flat, int64_t offset) {
      const double v = load<T>(a.x, offset);
      a.sum[c] += v;
      if (a.per_end > 0) {
        const int64_t list = c * per_chunk + (flat / chunk_count) * a.per_end;
        core::offer_extreme(a.largest + list, a.per_end, v, flat);
        core::offer_extreme(a.smallest + list, a.per_end, -v, flat);
      }
    });
  });
}

void collect_deviations(const DeviationArgs& a, int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; ++c) a.deviation_sum[c] = a.phi_sum[c] = 0;
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_element(a.layout, c_begin, c_end, [&](int64_t c, int64_t, int64_t offset) {
      const double d = load<T>(a.x, offset) - a.mean[c];
      const double magnitude = std::abs(d);
      a.deviation_sum[c] += a.phi == core::PhiKind::Identity ? d * d
                            : a.phi == core::PhiKind::Sign   ? magnitude
                                                             : std::pow(magnitude, a.power);
      a.phi_sum[c] += core::phi(a.phi, d, a.power);
    });
  });
}

void apply_affine(const AffineArgs& a, int64_t c_begin, int64_t c_end) {
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = typename Element<T>::acc;
    for_each_element(a.layout, c_begin, c_end, [&](int64_t c, int64_t, int64_t offset) {
      const acc x = Element<T>::load(static_cast<const T*>(a.x)[offset]);
      static_cast<T*>(a.y)[offset] =
          Element<T>::store(x * static_cast<acc>(a.alpha[c]) + static_cast<acc>(a.beta[c]));
    });
  });
}

void reduce_grad(const GradReduceArgs& a, int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; ++c) a.sum_g[c] = a.sum_gd[c] = 0;
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_element(a.layout, c_begin, c_end, [&](int64_t c, int64_t, int64_t offset) {
      const double g = load<T>(a.grad, offset);
      a.sum_g[c] += g;
      a.sum_gd[c] += g * (load<T>(a.x, offset) - a.mean[c]);
    });
  });
}

void apply_grad(const GradApplyArgs& a, int64_t c_begin, int64_t c_end) {
  with_element_type(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto dense = [&](int64_t c, int64_t offset) {
      const core::GradCoefficients& k = a.coef[c];
      const double g = load<T>(a.grad, offset);
      const double d = load<T>(a.x, offset) - a.mean[c];
      return k.scale_g * g + k.scale_phi * core::phi(a.phi, d, a.power) + k.offset;
    };
    for_each_element(a.layout, c_begin, c_end, [&](int64_t c, int64_t, int64_t offset) {
      store<T>(a.grad_x, offset, dense(c, offset));
    });
    // The sparse terms: recompute those few elements whole, so they are rounded once.
    if (a.sparse_per_channel == 0 || a.layout.count() == 0) return;
    const Layout& l = a.layout;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t* index = a.sparse_index + c * a.sparse_per_channel;
      const double* coef = a.sparse_coef + c * a.sparse_per_channel;
      // An index can repeat (range of a constant chunk): sum its terms first.
      for (int64_t i = 0; i < a.sparse_per_channel; ++i) {
        bool first = true;
        for (int64_t j = 0; j < i; ++j) first = first && index[j] != index[i];
        if (!first) continue;
        double sparse = 0;
        for (int64_t j = i; j < a.sparse_per_channel; ++j) {
          if (index[j] == index[i]) sparse += coef[j];
        }
        const int64_t n = index[i] / l.S, s = index[i] % l.S;
        const int64_t offset = l.offset(n, c, s);
        store<T>(a.grad_x, offset, dense(c, offset) + a.coef[c].sparse_scale * sparse);
      }
    }
  });
}

}  // namespace
}  // namespace LPNORM_CONCAT(isa_, LPNORM_ISA)

const Kernels& LPNORM_CONCAT(kernels_, LPNORM_ISA)() {
  namespace build = LPNORM_CONCAT(isa_, LPNORM_ISA);
  static const Kernels table{LPNORM_STRINGIFY(LPNORM_ISA), build::collect_stats,
                             build::collect_deviations, build::apply_affine, build::reduce_grad,
                             build::apply_grad};
  return table;
}

}  // namespace lpnorm::cpu
