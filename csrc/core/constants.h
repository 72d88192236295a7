// Consistency constants of SPEC §1: the expected order statistics that turn the extreme-value scale
// estimates (linf, topk, range) and the Lp moment into estimates of a normal's standard deviation.
// Plain C++17. The order statistics are computed by numerical integration in double precision and
// cached, so the kernels may call these on every forward.
#pragma once

#include <cstdint>

namespace lpnorm::core {

// E[max of m i.i.d. |z|], z ~ N(0,1). Requires m >= 1; expected_max_abs(1) = sqrt(2/pi).
double expected_max_abs(int64_t m);

// E[mean of the k largest of m i.i.d. |z|]. Requires 1 <= k <= m. k = 1 equals expected_max_abs(m);
// k = m gives E|z| = sqrt(2/pi).
double expected_topk_abs(int64_t m, int64_t k);

// E[max - min of n i.i.d. z] (the d2 constant of control charts). Requires n >= 1; n = 1 gives 0.
double expected_range(int64_t n);

// c_p = (2^(p/2) Gamma((p+1)/2) / sqrt(pi))^(1/p) = (E|z|^p)^(1/p). Requires finite p >= 1;
// c_1 = sqrt(2/pi), c_2 = 1.
double lp_consistency(double p);

// The multiplier the paper's authors' code used for L-inf / top-k, 0.5*(1+sqrt(pi*ln 4))/sqrt(2*ln m),
// with sigma = max|d| * multiplier; their Range BN used 0.35 times this with m the chunk size.
// Requires m >= 1; m = 1 gives +inf (ln 1 = 0), as their formula does.
double paper_linf_multiplier(int64_t m);

}  // namespace lpnorm::core
