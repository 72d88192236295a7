#include "cpu/half_accumulation.h"

#include <cmath>

#include "core/half_types.h"

namespace lpnorm::cpu {
namespace {

// Arithmetic of the half type T, emulated in float: every result rounded to T. A float has
// 24 bits, at least 2 * 11 + 2, so rounding the float result of +, -, * of two float16 (or
// bfloat16) values again to T gives the correctly rounded T result.
template <typename T>
struct HalfMath {
  static float round(float v) { return core::Element<T>::load(core::Element<T>::store(v)); }
  static float load(const void* data, int64_t offset) {
    return core::Element<T>::load(static_cast<const T*>(data)[offset]);
  }
};

// The mean over flat elements [begin, end) of a channel of term(i), pairwise in T.
template <typename T, typename Term>
float pairwise_mean(const Term& term, int64_t begin, int64_t end) {
  using M = HalfMath<T>;
  const int64_t count = end - begin;
  if (count <= 0) return 0.0f;
  if (count == 1) return term(begin);
  const int64_t middle = begin + count / 2;
  const float left = pairwise_mean<T>(term, begin, middle);
  const float right = pairwise_mean<T>(term, middle, end);
  // Each half weighted by its share of the count (1/2 each, exactly, for an even count): the
  // result never exceeds the larger half, and two infinite halves stay infinite.
  const float left_share = M::round(static_cast<float>(middle - begin) / static_cast<float>(count));
  const float right_share = M::round(static_cast<float>(end - middle) / static_cast<float>(count));
  return M::round(M::round(left * left_share) + M::round(right * right_share));
}

// Flat element i = n * S + s of channel c, as an offset into the data.
int64_t element_offset(const core::ChannelLayout& l, int64_t c, int64_t i) {
  return l.offset(i / l.S, c, i % l.S);
}

template <typename T>
HalfForwardMeans forward_means(const core::ChannelLayout& l, const void* x, int64_t c, const core::NormSpec& spec) {
  using M = HalfMath<T>;
  const int64_t m = l.count();
  auto value = [&](int64_t i) { return M::load(x, element_offset(l, c, i)); };
  HalfForwardMeans result;
  const float mean = pairwise_mean<T>(value, 0, m);
  result.mean = mean;
  if (!spec.uses_deviation_sums()) return result;

  const float q = static_cast<float>(spec.deviation_power());
  const core::PhiKind phi = spec.phi();
  auto deviation = [&](int64_t i) { return M::round(value(i) - mean); };
  auto power = [&](int64_t i) {
    const float d = std::abs(deviation(i));
    switch (spec.kind) {
      case core::NormKind::L2: return M::round(d * d);
      case core::NormKind::L1: return d;
      default: return M::round(std::pow(d, q));
    }
  };
  auto phi_term = [&](int64_t i) { return M::round(core::phi(phi, deviation(i), q)); };
  result.deviation = pairwise_mean<T>(power, 0, m);
  result.phi = pairwise_mean<T>(phi_term, 0, m);
  return result;
}

template <typename T>
HalfGradMeans grad_means(const core::ChannelLayout& l, const void* grad, const void* x, int64_t c, double mean) {
  using M = HalfMath<T>;
  const float mean_t = M::round(static_cast<float>(mean));
  auto g = [&](int64_t i) { return M::load(grad, element_offset(l, c, i)); };
  auto g_times_d = [&](int64_t i) {
    const int64_t offset = element_offset(l, c, i);
    return M::round(M::load(grad, offset) * M::round(M::load(x, offset) - mean_t));
  };
  return {pairwise_mean<T>(g, 0, l.count()), pairwise_mean<T>(g_times_d, 0, l.count())};
}

}  // namespace

HalfForwardMeans half_forward_means(const core::ChannelLayout& layout, Dtype dtype, const void* x, int64_t c,
                                    const core::NormSpec& spec) {
  return dtype == Dtype::Float16 ? forward_means<core::Half>(layout, x, c, spec)
                                 : forward_means<core::BFloat16>(layout, x, c, spec);
}

HalfGradMeans half_grad_means(const core::ChannelLayout& layout, Dtype dtype, const void* grad, const void* x,
                              int64_t c, double mean) {
  return dtype == Dtype::Float16 ? grad_means<core::Half>(layout, grad, x, c, mean)
                                 : grad_means<core::BFloat16>(layout, grad, x, c, mean);
}

}  // namespace lpnorm::cpu
