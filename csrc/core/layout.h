// How a backend sees an input: (N, C, S) with the spatial dimensions flattened into one.
#pragma once

#include <cstdint>

#include "inline.h"

namespace lpnorm::core {

// Strides are in elements. NCHW has stride_s == 1; channels-last has stride_c == 1 and
// stride_s == C. Every tensor of one pass (x, y, grad) shares the layout.
struct ChannelLayout {
  int64_t N = 0, C = 0, S = 1;
  int64_t stride_n = 0, stride_c = 0, stride_s = 1;

  LPNORM_HOST_DEVICE int64_t count() const { return N * S; }  // elements per channel, m
  LPNORM_HOST_DEVICE int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return n * stride_n + c * stride_c + s * stride_s;
  }
};

}  // namespace lpnorm::core
