// The normalization family of SPEC §1: which scale estimate, and what each backend must
// collect for it. Every backend reads these descriptions instead of branching on names.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "inline.h"

namespace lpnorm::core {

enum class NormKind { L2, L1, Linf, TopK, Range, P };
enum class ConstantMode { Exact, Paper };

// The per-element function phi(d) whose mean the gradient of sigma needs (SPEC §3):
// dsigma/dx_i = a * phi(d_i) + b + (sparse terms at saved indices).
enum class PhiKind { None, Identity, Sign, SignedPower };

struct NormSpec {
  NormKind kind = NormKind::L1;
  int64_t k = 10;       // topk: how many of the largest |d| per chunk
  double p = 2.0;       // p: the exponent
  int64_t chunks = 1;   // ghost batches along the batch dimension (linf, topk, range)
  ConstantMode constant = ConstantMode::Exact;

  // Dense norms sum a power of |d| in a second pass once the mean is known.
  LPNORM_HOST_DEVICE bool uses_deviation_sums() const {
    return kind == NormKind::L2 || kind == NormKind::L1 || kind == NormKind::P;
  }
  // Extreme norms keep, per chunk, this many of the largest and of the smallest raw values.
  LPNORM_HOST_DEVICE int64_t extremes_per_end() const {
    switch (kind) {
      case NormKind::TopK: return k;
      case NormKind::Linf:
      case NormKind::Range: return 1;
      default: return 0;
    }
  }
  // Indices per chunk whose gradient gets a sparse term: the top-k set, the arg-max, or
  // the arg-max and arg-min of the range.
  LPNORM_HOST_DEVICE int64_t sparse_per_chunk() const {
    switch (kind) {
      case NormKind::TopK: return k;
      case NormKind::Linf: return 1;
      case NormKind::Range: return 2;
      default: return 0;
    }
  }
  // Whether one chunk's sparse indices may name one element twice with finite coefficients:
  // range's max and min of a constant chunk. Top-k and L-inf picks are distinct elements (a
  // chunk without enough picks repeats index 0 with NaN coefficients, in a channel whose
  // gradient is NaN throughout anyway).
  LPNORM_HOST_DEVICE bool sparse_may_repeat() const { return kind == NormKind::Range; }
  LPNORM_HOST_DEVICE PhiKind phi() const {
    switch (kind) {
      case NormKind::L2: return PhiKind::Identity;
      case NormKind::L1: return PhiKind::Sign;
      case NormKind::P: return PhiKind::SignedPower;
      default: return PhiKind::None;
    }
  }
  // The exponent q of the deviation sum, sum |d|^q.
  LPNORM_HOST_DEVICE double deviation_power() const {
    switch (kind) {
      case NormKind::L2: return 2.0;
      case NormKind::L1: return 1.0;
      default: return p;
    }
  }
};

inline std::optional<NormKind> parse_norm_kind(std::string_view name) {
  if (name == "l2") return NormKind::L2;
  if (name == "l1") return NormKind::L1;
  if (name == "linf") return NormKind::Linf;
  if (name == "topk") return NormKind::TopK;
  if (name == "range") return NormKind::Range;
  if (name == "p") return NormKind::P;
  return std::nullopt;
}

inline std::optional<ConstantMode> parse_constant_mode(std::string_view name) {
  if (name == "exact") return ConstantMode::Exact;
  if (name == "paper") return ConstantMode::Paper;
  return std::nullopt;
}

// sign with sign(0) = 0, as autograd of abs; NaN stays NaN. The +-1 from compares rather than
// branches: the signs of a top-k pick's deviations are random, and chunk by chunk each branch
// was mispredicted ((256, 1024) topk with 4 chunks: 18% of its forward). Zero and NaN (rare)
// give d * 0.
template <typename T>
LPNORM_HOST_DEVICE LPNORM_INLINE T sign_of(T d) {
  const T unit = static_cast<T>(static_cast<int>(d > T(0)) - static_cast<int>(d < T(0)));
  return d != T(0) && d == d ? unit : d * T(0);
}

template <typename T>
LPNORM_HOST_DEVICE LPNORM_INLINE T phi(PhiKind kind, T d, T p) {
  switch (kind) {
    case PhiKind::Identity: return d;
    case PhiKind::Sign: return sign_of(d);
    case PhiKind::SignedPower: return sign_of(d) * std::pow(std::abs(d), p - T(1));
    default: return T(0);
  }
}

}  // namespace lpnorm::core
