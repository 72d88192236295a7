// CPU kernels over raw pointers and strides (no torch). One source, kernels.cpp, is compiled
// once per instruction set; dispatch.cpp picks the best build this CPU runs at run time.
//
// Every norm goes through the same passes:
//   collect_stats       sums of x - p around a pivot p (l2: and of (x - p)^2) and
//                       per-chunk extreme values                    (one read of x)
//   collect_deviations  sum |x - mean|^q and sum phi(x - mean)      (dense norms only)
//   apply_affine        y = (x - mean) * scale + bias, per channel
//   reduce_grad         sum g and sum g * (x - mean)
//   apply_grad          dx = a * g + b * phi(x - mean) + c, then the sparse terms
// Each works on a Tile: a range of channels times a range of the channel's m elements (flat
// index n * S + s), so the caller can split channels, rows, or both across threads. The
// reductions write the tile's own totals (indexed by channel) and the caller combines the
// tiles of one channel: sums add, extreme lists merge, both exactly and in a fixed order.
#pragma once

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "core/channel_math.h"
#include "core/layout.h"
#include "core/norm.h"

namespace lpnorm::cpu {

enum class Dtype { Float64, Float32, Float16, BFloat16 };

using Layout = core::ChannelLayout;

// Channels [c_begin, c_end) times flat elements [row_begin, row_end) of each channel.
struct Tile {
  int64_t c_begin, c_end;
  int64_t row_begin, row_end;
};

struct StatsArgs {
  Layout layout;
  Dtype dtype;
  const void* x;
  int64_t chunks;                 // along the batch dimension
  int64_t per_end;                // extremes kept per end and chunk (0: none)
  double* sum;                    // [C]
  core::Candidate* largest;       // [C][chunks][per_end]
  core::Candidate* smallest;      // [C][chunks][per_end], values negated
  // The shifted sums: with a pivot, the pass picks p per channel (the mean of its first
  // elements, written here), and `sum` gets sum (x - p); with sum_sq too (l2's one pass),
  // sum (x - p)^2. Without, `sum` gets sum x.
  double* pivot = nullptr;        // [C]
  double* sum_sq = nullptr;       // [C]
  // The fused forward's pick (tiles that hold whole channels), [C][chunks][per_end]: the
  // pass may pick a chunk's per_end largest |x - mean| itself (core::ChannelSums::picked;
  // entry 0's index stays core::kNotPicked where it does not), and with one chunk the lists
  // need only hold what can be among them, the mean being pivot + sum / count: a list may stop
  // early, always at a prefix of the full list.
  core::Deviation* picked = nullptr;
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
  const double* mean;             // [C]
  const double* scale;            // [C], invstd * weight
  const double* bias;             // [C]
  bool stream = false;            // non-temporal stores: y is far bigger than the caches
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
  // core::NormSpec::sparse_may_repeat: each element's terms are summed first.
  bool sparse_may_repeat = true;
  bool stream = false;            // non-temporal stores: grad_x is far bigger than the caches
};

// How a layout is walked: along each channel's contiguous spatial run (NCHW and anything
// whose channel elements are evenly strided), or along rows of contiguous channels
// (channels-last and (N, C) inputs).
enum class Walk { ChannelMajor, ChannelsInnermost };
Walk walk_of(const Layout& layout);

constexpr uintptr_t kLineBytes = 64;

// Where the output is streamed, the element passes stream the whole lines of runs at least
// this long, and of runs that are whole lines. A shorter run's partial lines, written with
// ordinary stores, cost more than streaming the rest saves ((128,256,14,14) bfloat16 forward:
// 1.3 -> 2.3x torch streaming 392-byte planes; float32 784-byte planes twice as slow).
constexpr int64_t kStreamRunBytes = 4096;

// Contiguous channel-major planes shorter than kStreamRunBytes: the element passes walk a
// tile's whole planes of several channels as one run (one per sample).
inline bool short_contiguous_planes(const Layout& l, int64_t element_bytes) {
  return l.S > 1 && l.stride_s == 1 && l.stride_c == l.S && l.S * element_bytes < kStreamRunBytes;
}
// The fewest consecutive such planes that are whole lines together (from a line's start):
// 4 planes of 14 x 14 float32, 8 of bfloat16, 1 of 28 x 28 float32; 1 for long planes.
inline int64_t planes_in_whole_lines(const Layout& l, int64_t element_bytes) {
  if (!short_contiguous_planes(l, element_bytes)) return 1;
  return static_cast<int64_t>(kLineBytes) / std::gcd(l.S * element_bytes, static_cast<int64_t>(kLineBytes));
}

struct Kernels {
  const char* isa;
  // Over `count` consecutive row parts of one channel range (tiles[j + 1] starts where
  // tiles[j] ends): part j's sums go to sum + j * C (and pivot, sum_sq), and the extreme lists,
  // which merge exactly however the rows are cut, run through all the parts without
  // restarting, into part 0's lists (the other parts' are left empty). One thread walking the
  // split schedule's row blocks of a channels-last span refilled its lists at each block.
  void (*collect_stats)(const StatsArgs&, const Tile* tiles, int64_t count);
  void (*collect_deviations)(const DeviationArgs&, const Tile&);
  void (*apply_affine)(const AffineArgs&, const Tile&);
  void (*reduce_grad)(const GradReduceArgs&, const Tile&);
  void (*apply_grad)(const GradApplyArgs&, const Tile&);
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
