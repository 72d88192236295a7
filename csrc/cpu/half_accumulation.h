// SPEC §4's `accumulate="half"`: a float16/bfloat16 input's channel statistics accumulated in
// the input's own type, so that the range limits of low precision can be shown per norm
// (python -m lpnorm half). A tool for evidence, not a fast path: scalar code, one task a
// channel.
//
// What "accumulated in half" means here, for every mean the statistics need:
//   - each term (x, d = x - mean, |d|^q, phi(d); in backward g and g * d) is rounded to the
//     half type, with the mean it subtracts already rounded to it;
//   - the terms are averaged pairwise in the half type: the mean of a range is
//     left * wl + right * wr, each weight the half's share of the count (1/2 for an even
//     count), every operation rounded, over a balanced split in index order.
// Averaging instead of summing keeps every intermediate at the scale of the terms: a sum in
// float16 overflows for every norm once m * mean(term) > 65504 (m >= 1e5 with unit-scale
// data), which would hide what the paper is about; with averaging the only range failures
// left are the terms' own (d^2 above 65504 or below float16's smallest subnormal, for L2).
// Extremes (linf, topk, range) are found by comparison, which no accumulator changes; the
// per-channel finish (a few scalars per channel) stays in float as in the default mode.
#pragma once

#include <cstdint>

#include "core/layout.h"
#include "core/norm.h"
#include "cpu/kernels.h"

namespace lpnorm::cpu {

// Per-channel means accumulated in half, as float64 values (exactly the half results).
struct HalfForwardMeans {
  double mean = 0;       // of x
  double deviation = 0;  // of |d|^q (dense norms; else 0)
  double phi = 0;        // of phi(d) (dense norms; else 0)
};

struct HalfGradMeans {
  double grad = 0;        // of g
  double grad_dev = 0;    // of g * d
};

// Channel c of x (dtype Float16 or BFloat16).
HalfForwardMeans half_forward_means(const core::ChannelLayout& layout, Dtype dtype, const void* x, int64_t c,
                                    const core::NormSpec& spec);

// Channel c of grad and x (one layout), d = x - mean with `mean` a value of the half type.
HalfGradMeans half_grad_means(const core::ChannelLayout& layout, Dtype dtype, const void* grad, const void* x,
                              int64_t c, double mean);

}  // namespace lpnorm::cpu
