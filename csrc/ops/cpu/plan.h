// How the CPU operators cut their work into tiles (a channel range times a row range) over
// torch's intra-op threads, and combine the tiles' partial statistics. Two schedules, chosen
// per call from the shape alone (so results do not depend on the thread count):
//   fused  one task per channel runs every pass of the channel back to back, so the second
//          and third reads of its data hit the core's L2 cache (channel-major layouts whose
//          channel fits in the L2, with enough channels to keep every core busy);
//   split  each pass runs over all tiles before the next starts; a tile is a channel range
//          times a row range, channels with few siblings are cut into row parts and
//          channels-last inputs into row blocks, and the tiles' partial statistics are
//          combined exactly in a fixed order (sums in double, extreme lists merged).
// LPNORM_CPU_SCHEDULE=fused|split forces one (tests cover both; benchmarks measure both).
// Also which outputs are written with non-temporal stores. The fused operators
// (batch_norm_kernel.cpp) run either schedule; the stage operators (batch_norm_stages.cpp) run
// each pass over the split schedule's tiles.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "core/channel_math.h"
#include "cpu/kernels.h"
#include "ops/cpu/parallel.h"

namespace lpnorm::ops {

enum class Forced { None, Fused, Split };

inline Forced forced_schedule() {
  const char* value = std::getenv("LPNORM_CPU_SCHEDULE");
  if (value == nullptr) return Forced::None;
  if (std::strcmp(value, "fused") == 0) return Forced::Fused;
  if (std::strcmp(value, "split") == 0) return Forced::Split;
  return Forced::None;
}

inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t{512} << 10;
  }();
  return bytes;
}

constexpr int64_t kMinTasks = 16;          // channel-major: cut channels into row parts below this
constexpr int64_t kMinPartElements = 16384;
constexpr int64_t kFusedTileBytes = int64_t{32} << 10;      // channel-major fused tiles group channels up to this
constexpr int64_t kGroupedTensorBytes = int64_t{8} << 20;  // ... where the tensors it reads are at most this
constexpr int64_t kBlockElements = 65536;  // channels-innermost: elements per row block
// Channels-innermost: row blocks per span. The stats pass carries its top-k lists from block
// to block within a thread (for_each_tile_run): each block restarting them, where a list's
// first rows nearly all enter it, had made (32,64,56,56) channels-last topk forward at 1
// thread 6.1-8.3 ms at 16 blocks, 3.7-4.1 ms at 4.
constexpr int64_t kMaxBlocks = 16;
constexpr int64_t kChannelSpan = 64;  // channels-innermost: channels per tile (a multiple of every W)
// Fused channels-innermost spans read at least this much of each row (or all of it): 256-byte
// pieces of rows pages apart ((256, 1024)) kept every pass well below the speed of the caches
// (measurements in docs/cpu-performance.md).
constexpr int64_t kRowBytes = 1024;
constexpr int64_t kMinFusedSpans = 4;  // tasks of the fused channels-innermost schedule

// Outputs this big are written with non-temporal stores: they would not stay in the caches
// anyway, and the stores skip reading the lines first. LPNORM_CPU_STREAM=0|1 forces it.
constexpr int64_t kStreamBytes = int64_t{4} << 20;  // measured: helps from 4 MiB (float32, 2 MiB L2 in all)
// Evaluation reads x alone, and x and y both stay in the L3 (where the next layer finds y)
// longer. 2 threads, a 32 MiB L3, l1, float32, evaluation alone: (2,3,512,362), 4.4 MB,
// 0.049-0.053 ms, streamed 0.068 (torch 0.058-0.062); (64,32,32,32), 8.4 MB, 0.10-0.13 either
// way; (16,64,56,56), 12.8 MB, 0.24-0.30, streamed 0.17-0.18. A training step's x, y, grad
// and grad_x left the L3 from 8.4 MB (forward+backward 0.87-0.98 -> 0.57-0.65 ms streamed).
// (glibc's sysconf reported a 384 MiB L3 on this VM, the host's, so the sizes are fixed.)
constexpr int64_t kEvaluationStreamBytes = int64_t{10} << 20;

inline bool streams_output(int64_t output_bytes, bool evaluation = false) {
  const char* forced = std::getenv("LPNORM_CPU_STREAM");
  if (forced != nullptr && *forced != '\0') return forced[0] == '1';
  return output_bytes >= (evaluation ? kEvaluationStreamBytes : kStreamBytes);
}

struct Plan {
  bool fused = false;
  // Fused tiles that leave the element pass to a pass of its own over make_apply_plan's tiles
  // (see make_plan).
  bool apply_apart = false;
  int64_t parts = 1;           // partial buffers: row parts per channel
  std::vector<cpu::Tile> tiles;
  std::vector<int64_t> part;   // which partial buffer each tile writes
};

// Channels-innermost: spans of `span` channels, each cut into the same row blocks of about
// kBlockElements elements, kMinTasks tiles in all where there are enough elements (tile j of
// a span writes partial buffer j). Not fused.
inline Plan row_block_plan(const core::ChannelLayout& l, int64_t span) {
  Plan plan;
  const int64_t m = l.count();
  const int64_t spans = (l.C + span - 1) / span;
  const int64_t blocks = (kMinTasks + spans - 1) / spans;
  plan.parts = std::clamp<int64_t>(std::min(blocks, l.C * m / kBlockElements), 1,
                                   std::min<int64_t>(kMaxBlocks, std::max<int64_t>(m, 1)));
  for (int64_t c = 0; c < l.C; c += span) {
    for (int64_t p = 0; p < plan.parts; ++p) {
      plan.tiles.push_back({c, std::min(l.C, c + span), m * p / plan.parts, m * (p + 1) / plan.parts});
      plan.part.push_back(p);
    }
  }
  return plan;
}

// The share of a cache's sets that pieces of `span_bytes` of rows `row_bytes` apart can
// reach. Caches are indexed by the address bits above the line's; within a page those are
// the virtual address's, and the rows' pieces cover span_bytes / gcd(row_bytes, page) of
// them: a quarter for (256, 1024) float32 in 1 KiB spans. Above the page the physical pages
// spread over every set.
inline double cache_set_share(int64_t span_bytes, int64_t row_bytes) {
  constexpr int64_t kPageBytes = 4096;
  const int64_t period = std::gcd(std::max<int64_t>(row_bytes, 1), kPageBytes);
  return std::min(1.0, static_cast<double>(span_bytes) / static_cast<double>(period));
}

// `streams`: full-size tensors a fused channel reads (x; or grad and x). `per_end`: the
// extreme values per end the stats pass keeps for each channel (0: none; 2 and more: top-k
// lists).
inline Plan make_plan(const core::ChannelLayout& l, int64_t element_bytes, int64_t streams, int64_t per_end = 0) {
  const bool extreme_lists = per_end > 1;
  Plan plan;
  if (l.C == 0) return plan;  // no channels, no tiles (and no division by C below)
  const int64_t m = l.count();
  const Forced forced = forced_schedule();
  auto add = [&](int64_t c_begin, int64_t c_end, int64_t part) {
    plan.tiles.push_back({c_begin, c_end, m * part / plan.parts, m * (part + 1) / plan.parts});
    plan.part.push_back(part);
  };
  if (cpu::walk_of(l) == cpu::Walk::ChannelsInnermost) {
    const auto fits_l2 = [&](int64_t span) { return m * span * element_bytes * streams <= l2_cache_bytes() * 7 / 8; };
    // Spans whose rows fit the L2 run fused like channel-major channels ((N, C) with few
    // rows): kRowBytes of a row at a time where that leaves kMinFusedSpans tasks, in whole
    // kChannelSpan multiples (whole vectors of every build).
    const int64_t wanted = std::min(kRowBytes / element_bytes, l.C / kMinFusedSpans);
    const int64_t fused_span = std::max(kChannelSpan, wanted / kChannelSpan * kChannelSpan);
    // A pass without extreme lists fuses a span only where what it reads and writes fits the
    // L2 sets its pieces of the rows reach (cache_set_share). On a Xeon (2 MiB L2), 2 threads,
    // fused spans against row blocks, x torch: (8, 256, 14, 14) channels-last l2 forward 1.11
    // -> 0.69, backward 1.14 -> 0.76, l1 1.29 -> 0.83 and 1.18 -> 0.77, the linf and topk
    // backward (us) 207-239 -> 136-149 and 216-251 -> 147-167; (256, 1024) float32 l2 forward
    // 1.28 -> 1.05, backward 1.12 -> 1.03, linf backward 147-155 -> 108-124 us. A stats pass
    // that keeps extreme values does more per element, and row blocks lost there ((256, 1024)
    // linf forward 1.21 -> 1.37, topk 2.19 -> 2.31): it keeps the plain test. (Not measured on
    // Zen 4, whose 1 MiB L2 had chosen these spans.)
    const int64_t row_bytes = (l.S > 1 ? l.stride_s : l.stride_n) * element_bytes;
    const bool dense_span_fits =
        static_cast<double>(m * fused_span * element_bytes * (streams + 1)) <=
        static_cast<double>(l2_cache_bytes() * 7 / 8) * cache_set_share(fused_span * element_bytes, row_bytes);
    const bool span_fits = per_end > 0 ? fits_l2(fused_span) : dense_span_fits;
    if (forced != Forced::Split && (l.C + fused_span - 1) / fused_span >= kMinFusedSpans && span_fits) {
      plan.fused = true;
      // Where x and y overflow that share, the extreme norms' element pass runs apart, in
      // blocks of whole rows. In-process A/B on the Xeon, forward x torch: (256, 1024) topk
      // 2.08 -> 1.83, linf 1.11 -> 0.95; (8, 256, 14, 14) channels-last topk 1.77 -> 1.44, linf
      // 1.32 -> 0.99; (64, 1024), which fits, 2.42 -> 2.52 and 1.18 -> 1.22 apart.
      plan.apply_apart = !dense_span_fits;
      for (int64_t c = 0; c < l.C; c += fused_span) add(c, std::min(l.C, c + fused_span), 0);
      return plan;
    }
    // Otherwise row blocks of whole rows, read in memory order like a copy ((2048, 1024)
    // float32 forward at 1 thread: 1 KiB row pieces 1.11 ms, whole rows 0.84 ms, torch 0.86 ms).
    // Top-k lists keep spans of kChannelSpan channels over all rows where there are enough of
    // them (whole-row list tiles measured no better at 2 threads; docs/cpu-performance.md).
    const int64_t span = extreme_lists ? kChannelSpan : l.C;
    Plan blocks = row_block_plan(l, span);
    blocks.fused = blocks.parts == 1 && forced != Forced::Split && (fits_l2(std::min(l.C, span)) || forced == Forced::Fused);
    return blocks;
  }
  if (l.C < kMinTasks && forced != Forced::Fused) {
    plan.parts = std::clamp<int64_t>((kMinTasks + l.C - 1) / l.C, 1, std::max<int64_t>(1, m / kMinPartElements));
  }
  if (forced == Forced::Split && plan.parts == 1 && m >= 2) plan.parts = 2;  // tests: exercise the combine
  // Measured on Zen 4 (1 MiB L2): fusing pays even when grad and x of a channel fill 80% of it.
  const bool fits = m * element_bytes * streams <= l2_cache_bytes() * 7 / 8;
  plan.fused = plan.parts == 1 && forced != Forced::Split && (fits || forced == Forced::Fused);
  // Fused channels of a few KiB share a tile, still leaving kMinTasks tiles, where the
  // tensors are within a few MiB: a tile per channel cost more in calls than the channel's
  // passes. Float32 at 1 thread, forward / backward: (4, 512, 7, 7) 76 / 65 -> 43 / 54 us,
  // (8, 512, 14, 14) 178-190 / 263-275 -> 156-158 / 246-253 us; but (32, 2048, 7, 7), 25 MB
  // for the backward, 2.9-3.0 -> 3.05-3.35 ms, so larger tensors keep a tile per channel.
  const int64_t channel_bytes = std::max<int64_t>(1, m * element_bytes * streams);
  const bool group_channels = plan.fused && channel_bytes * l.C <= kGroupedTensorBytes;
  int64_t group =
      group_channels ? std::clamp<int64_t>(kFusedTileBytes / channel_bytes, 1, std::max<int64_t>(1, l.C / kMinTasks)) : 1;
  // A streamed output of short planes: a tile takes whole lines' worth of planes (from a
  // channel whose plane starts a line), so each sample's run of them is streamed whole
  // (map_planes_as_one_run); a plane at a time, y and grad_x were written with ordinary
  // stores, each line read first, and evicted x from L3. 2 threads, fused tiles of 1 -> G
  // channels: (128,256,14,14) float32 (G = 4) forward 1.31-1.36 -> 0.98-1.13 ms, backward
  // 1.98-2.00 -> 1.90-1.92; bfloat16 (G = 8) backward 1.02 -> 0.82-0.88; (512,256,7,7)
  // float32 (G = 16) backward 2.74-2.80 -> 2.32-2.73. Planes of fewer than 16 elements
  // (shorter than an AVX-512 vector) are left alone; 28 x 28 float32 planes are whole lines
  // (G = 1).
  const int64_t lines = cpu::planes_in_whole_lines(l, element_bytes);
  const int64_t whole_lines_group = (group + lines - 1) / lines * lines;
  if (plan.fused && lines > 1 && l.S >= 16 && l.C / whole_lines_group >= kMinTasks &&
      streams_output(m * l.C * element_bytes)) {
    group = whole_lines_group;
  }
  for (int64_t c = 0; c < l.C; c += group) {
    for (int64_t p = 0; p < plan.parts; ++p) add(c, std::min(l.C, c + group), p);
  }
  return plan;
}

// The tiles of an element-wise pass that runs alone (evaluation; the split schedule's last
// pass): channel-major layouts in blocks of whole samples across every channel (or, with
// fewer samples than blocks, of one sample's channels), which the kernels walk in memory
// order; a channel at a time, short planes C planes apart wait on memory one by one.
// Channels-innermost tiles already run in memory order.
constexpr int64_t kApplyTileBytes = int64_t{256} << 10;

// `plan` (the pass's own, its last use: moved in) is returned where it serves.
inline Plan make_apply_plan(const core::ChannelLayout& l, int64_t element_bytes, Plan plan) {
  if (cpu::walk_of(l) == cpu::Walk::ChannelsInnermost) {
    // Blocks of whole rows, in memory order like a copy. The top-k lists' spans and the fused
    // schedule's read part of each row: (32,128,28,28) channels-last topk forward at 2 threads
    // 2.2 -> 1.0-1.2 ms with whole rows. Evaluation had kept the fused spans of (N, C) and
    // small channels-last inputs, a 1 KiB piece of each row: on a Xeon (2 MiB L2) l1 at 2
    // threads, (256, 1024) 65 -> 49 us, (512, 512) 80 -> 41, (8, 256, 14, 14) channels-last
    // 130 -> 75 (torch 35, 34, 58). Pieces of rows a page apart reach a quarter of the L2's
    // sets, and their lines come from many pages at once.
    const bool whole_rows = plan.tiles.empty() || plan.tiles[0].c_end - plan.tiles[0].c_begin == l.C;
    return whole_rows ? plan : row_block_plan(l, l.C);
  }
  if (l.S == 1 || l.C < 2 || l.N == 0) return plan;
  // Whole planes: such a tile is one run in memory (or one per sample) where they are short
  // and contiguous (map_planes_as_one_run). Fewer planes than tiles ((1, 3, 512, 512)) keep
  // the pass's own tiles, which cut long channels into row parts.
  const int64_t blocks = std::clamp<int64_t>(l.N * l.S * l.C * element_bytes / kApplyTileBytes, 1, kMinTasks);
  if (l.N * l.C < blocks) return plan;
  Plan apply;
  auto add = [&](int64_t c_begin, int64_t c_end, int64_t n_begin, int64_t n_end) {
    apply.tiles.push_back({c_begin, c_end, n_begin * l.S, n_end * l.S});
    apply.part.push_back(0);
  };
  if (l.N >= blocks) {
    for (int64_t b = 0; b < blocks; ++b) add(0, l.C, l.N * b / blocks, l.N * (b + 1) / blocks);
  } else {
    const int64_t per_sample = (blocks + l.N - 1) / l.N;
    for (int64_t n = 0; n < l.N; ++n) {
      for (int64_t b = 0; b < per_sample; ++b) add(l.C * b / per_sample, l.C * (b + 1) / per_sample, n, n + 1);
    }
  }
  return apply;
}

template <typename Fn>
void for_each_tile(const Plan& plan, const Fn& fn) {
  cpu_parallel_for(0, static_cast<int64_t>(plan.tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(plan.tiles[i], plan.part[i]);
  });
}

// The tiles as for_each_tile, but each thread's consecutive tiles of one channel range (a
// span's row parts, in part order) come as one run: fn(tiles, count, first part). For passes
// that carry state from part to part (the stats pass's top-k lists, Kernels::collect_stats):
// the parts' sums stay apart, so the results do not depend on how the threads cut the runs.
template <typename Fn>
void for_each_tile_run(const Plan& plan, const Fn& fn) {
  cpu_parallel_for(0, static_cast<int64_t>(plan.tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      int64_t j = i + 1;
      while (j < end && plan.tiles[j].c_begin == plan.tiles[i].c_begin && plan.part[j] == plan.part[j - 1] + 1) ++j;
      fn(plan.tiles.data() + i, j - i, plan.part[i]);
      i = j;
    }
  });
}

// Adds the partial sums of parts 1.. into part 0 ([parts][C] buffers), in part order.
inline void combine_sums(double* parts, int64_t channels, int64_t count) {
  for (int64_t p = 1; p < count; ++p) {
    for (int64_t c = 0; c < channels; ++c) parts[c] += parts[p * channels + c];
  }
}

inline void combine_extremes(core::Candidate* parts, int64_t channels, int64_t count, int64_t lists,
                      int64_t per_end) {
  const int64_t stride = channels * lists;
  for (int64_t p = 1; p < count; ++p) {
    for (int64_t list = 0; list < stride; list += per_end) {
      core::merge_extremes(parts + list, parts + p * stride + list, per_end);
    }
  }
}

}  // namespace lpnorm::ops
