// The forward passes on the GPU: collect_stats, channel_means and collect_deviations (dense
// norms), finish_channels (the core's per-channel math on the device), apply_affine. See
// kernels.h for the structure and common.cuh for the walk, the reduction and the launch plan.
#include "cuda/common.cuh"
#include "cuda/passes.cuh"

namespace lpnorm::cuda {
namespace detail {
namespace {

// ---- collect_stats: the sum and, per chunk, the largest and smallest values ------------------

// The CAP largest (value, index) offered, largest first, ties to the lowest index: the order
// of core::offer_extreme, kept in registers (every index static) by a compare-swap insertion.
template <typename A, int CAP>
struct TopList {
  static_assert((CAP & (CAP - 1)) == 0, "a power of two");
  static constexpr int32_t kEmpty = 0x7fffffff;
  A value[CAP];
  int32_t index[CAP];

  static __device__ __forceinline__ bool beats(A v, int32_t i, A ov, int32_t oi) {
    return v > ov || (v == ov && i < oi);
  }
  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      value[j] = -std::numeric_limits<A>::infinity();
      index[j] = kEmpty;
    }
  }
  __device__ __forceinline__ void offer(A v, int32_t i) {
    if (!beats(v, i, value[CAP - 1], index[CAP - 1])) return;  // the common case: NaN too
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      if (beats(v, i, value[j], index[j])) {
        const A tv = value[j];
        const int32_t ti = index[j];
        value[j] = v;
        index[j] = i;
        v = tv;
        i = ti;
      }
    }
  }
  // The CAP best of two sorted lists: the pairwise better of this[j] and o[CAP-1-j] are the
  // CAP best of the union as a bitonic sequence, which a half-cleaner cascade sorts
  // (CAP log CAP compare-swaps instead of CAP^2 insertions; CAP is a power of two).
  __device__ __forceinline__ void merge(const TopList& o) {
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      if (beats(o.value[CAP - 1 - j], o.index[CAP - 1 - j], value[j], index[j])) {
        value[j] = o.value[CAP - 1 - j];
        index[j] = o.index[CAP - 1 - j];
      }
    }
#pragma unroll
    for (int half = CAP / 2; half >= 1; half /= 2) {
#pragma unroll
      for (int j = 0; j < CAP; ++j) {
        if ((j & half) == 0 && beats(value[j + half], index[j + half], value[j], index[j])) {
          const A tv = value[j];
          const int32_t ti = index[j];
          value[j] = value[j + half];
          index[j] = index[j + half];
          value[j + half] = tv;
          index[j + half] = ti;
        }
      }
    }
  }
  __device__ __forceinline__ TopList shfl_down(int offset) const {
    TopList o;
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      o.value[j] = __shfl_down_sync(0xffffffffu, value[j], offset);
      o.index[j] = __shfl_down_sync(0xffffffffu, index[j], offset);
    }
    return o;
  }
  // The first `count` entries in the core's format (an empty slot has index kNoIndex).
  __device__ __forceinline__ void write(core::Candidate* out, int count) const {
#pragma unroll
    for (int j = 0; j < CAP; ++j) {
      if (j < count) out[j] = {static_cast<double>(value[j]), index[j] == kEmpty ? core::kNoIndex : index[j]};
    }
  }
};

// Per thread and channel: the sum, and with CAP > 0 the largest values and the largest
// negated values (the smallest), as the CPU's collect_stats.
template <typename A, int CAP>
struct StatsAcc {
  A sum;
  TopList<A, CAP> hi, lo;

  static __device__ __forceinline__ StatsAcc identity() {
    StatsAcc s;
    s.sum = A(0);
    s.hi.reset();
    s.lo.reset();
    return s;
  }
  __device__ __forceinline__ void merge(const StatsAcc& o) {
    sum += o.sum;
    hi.merge(o.hi);
    lo.merge(o.lo);
  }
  __device__ __forceinline__ StatsAcc shfl_down(int offset) const {
    StatsAcc o;
    o.sum = __shfl_down_sync(0xffffffffu, sum, offset);
    o.hi = hi.shfl_down(offset);
    o.lo = lo.shfl_down(offset);
    return o;
  }
};

// Dense norms: the sum alone.
template <typename A>
struct StatsAcc<A, 0> {
  A sum;
  static __device__ __forceinline__ StatsAcc identity() { return {A(0)}; }
  __device__ __forceinline__ void merge(const StatsAcc& o) { sum += o.sum; }
  __device__ __forceinline__ StatsAcc shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, sum, offset)};
  }
};

// ---- channel_pivots: the value collect_stats sums x - p around --------------------------------
// core::channel_pivot, as the CPU's. The partial sums are then of x - p, which a constant
// channel makes exact zeros (float sums of x left a large constant's mean ulps off, every d
// that error, normalized to O(1)), and which keep few of the mean's bits where |mean| >> sigma.

template <typename T>
__global__ void channel_pivots_kernel(const T* __restrict__ x, core::ChannelLayout layout, double* pivot) {
  using A = typename Num<T>::acc;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= layout.C) return;
  const int64_t first = layout.count() < core::kPivotElements ? layout.count() : core::kPivotElements;
  double sum = 0, lowest = 0, highest = 0;
  for (int64_t f = 0; f < first; ++f) {
    const double v = static_cast<double>(Num<T>::load(x[layout.offset(f / layout.S, c, f % layout.S)]));
    sum += v;
    lowest = f == 0 || v < lowest ? v : lowest;
    highest = f == 0 || v > highest ? v : highest;
  }
  pivot[c] = first > 0 ? core::channel_pivot<A>(sum, first, lowest, highest) : 0.0;
}

// The channel's total from its partial sums of x - p.
__device__ __forceinline__ double channel_total(const double* partial, const Geometry& g, const double* pivot,
                                                int64_t c, int64_t count) {
  return pivot[c] * static_cast<double>(count) + combine(partial, g, c);
}

template <typename T, int V, int CAP>
struct StatsOp {
  using A = typename Num<T>::acc;
  using Acc = StatsAcc<A, CAP>;
  struct Ctx {
    A pivot;
  };
  struct Loaded {
    A v[V];
  };

  const T* __restrict__ x;
  const double* pivot;           // [C], channel_pivots_kernel's
  double* partial_sum;           // [C][chunks][splits], of x - pivot
  core::Candidate* partial_hi;   // [C][chunks][splits][per_end]
  core::Candidate* partial_lo;
  int per_end;

  __device__ __forceinline__ Ctx context(int64_t c) const { return {static_cast<A>(pivot[c])}; }
  __device__ __forceinline__ Loaded load(int64_t offset) const {
    Loaded l;
    load_pack<T, V>(x + offset, l.v);
    return l;
  }
  __device__ __forceinline__ void add(Acc& acc, const Ctx& ctx, const Loaded& l, int i, int32_t flat) const {
    acc.sum += l.v[i] - ctx.pivot;
    if constexpr (CAP > 0) {
      acc.hi.offer(l.v[i], flat);
      acc.lo.offer(-l.v[i], flat);
    }
  }
  __device__ __forceinline__ void write(const Acc& acc, int64_t partial) const {
    partial_sum[partial] = static_cast<double>(acc.sum);
    if constexpr (CAP > 0) {
      acc.hi.write(partial_hi + partial * per_end, per_end);
      acc.lo.write(partial_lo + partial * per_end, per_end);
    }
  }
};

// ---- collect_deviations: sum |x - mean|^q and sum phi(x - mean) ------------------------------

template <typename T, int V, core::PhiKind PHI>
struct DeviationOp {
  using A = typename Num<T>::acc;
  using Acc = Sum2<A>;
  struct Ctx {
    A mean;
  };
  struct Loaded {
    A v[V];
  };

  const T* __restrict__ x;
  const double* mean;  // channel_means_kernel's
  A power;
  SumPartials out;

  __device__ __forceinline__ Ctx context(int64_t c) const { return {static_cast<A>(mean[c])}; }
  __device__ __forceinline__ Loaded load(int64_t offset) const {
    Loaded l;
    load_pack<T, V>(x + offset, l.v);
    return l;
  }
  __device__ __forceinline__ void add(Acc& acc, const Ctx& ctx, const Loaded& l, int i, int32_t) const {
    const A d = l.v[i] - ctx.mean;
    if constexpr (PHI == core::PhiKind::Identity) {
      acc.a += d * d;
      acc.b += d;
    } else if constexpr (PHI == core::PhiKind::Sign) {
      acc.a += fabs(d);
      acc.b += core::sign_of(d);
    } else {
      // |d|^p = |d|^(p-1) * |d|: one power per element for both sums
      const A magnitude = fabs(d);
      const A t = pow(magnitude, power - A(1));
      acc.a += t * magnitude;
      acc.b += core::sign_of(d) * t;
    }
  }
  __device__ __forceinline__ void write(const Acc& acc, int64_t partial) const {
    out.a[partial] = static_cast<double>(acc.a);
    out.b[partial] = static_cast<double>(acc.b);
  }
};

// ---- apply_affine: y = (x - mean) * scale + bias ---------------------------------------------
// As the CPU's: x * alpha + (bias - mean * alpha) cancels where |mean| >> sigma (a constant
// channel of 7.0 came out bias +- 2.4e-4 in float32).

template <typename T, int V>
struct AffineOp {
  using Elem = T;
  using A = typename Num<T>::acc;
  struct Ctx {
    A mean, scale, bias;
  };
  struct Loaded {
    A v[V];
  };

  const T* __restrict__ x;
  T* __restrict__ out;
  const double* mean;
  const double* scale;
  const double* bias;

  __device__ __forceinline__ Ctx context(int64_t c) const {
    return {static_cast<A>(mean[c]), static_cast<A>(scale[c]), static_cast<A>(bias[c])};
  }
  __device__ __forceinline__ Loaded load(int64_t offset) const {
    Loaded l;
    load_pack<T, V>(x + offset, l.v);
    return l;
  }
  __device__ __forceinline__ A compute(const Ctx& ctx, const Loaded& l, int i) const {
    return (l.v[i] - ctx.mean) * ctx.scale + ctx.bias;
  }
};

// ---- channel_means: each channel's batch mean, once, for the deviation pass ------------------
// (Each of its threads summing the channel's partials itself made the pass O(splits^2).)

struct MeansArgs {
  const double* sum_partial;  // of collect_stats
  const double* pivot;
  Geometry geo;
  int64_t count, channels;
  double* mean;
};

__global__ void channel_means_kernel(MeansArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.channels) return;
  core::ChannelSums sums;
  sums.count = a.count;
  sums.sum = channel_total(a.sum_partial, a.geo, a.pivot, c, a.count);
  a.mean[c] = core::channel_mean(sums);
}

// ---- finish_channels: the core's per-channel step, one thread per channel --------------------

struct FinishArgs {
  ForwardArgs f;
  Geometry stats_geo;
  const double* sum_partial;
  const double* pivot;
  const core::Candidate* partial_hi;
  const core::Candidate* partial_lo;
  Geometry dev_geo;
  SumPartials dev;
  core::Candidate* hi;   // [C][chunks][per_end], the merged lists
  core::Candidate* lo;
  core::Deviation* pool; // [C][2 per_end]
  double* mean;           // apply_affine's parameters
  double* scale;
  double* bias;
};

template <typename StatT>
__global__ void finish_channels_kernel(FinishArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const ForwardArgs& f = a.f;
  if (c >= f.layout.C) return;
  const int64_t m = f.layout.count();
  double mean, invstd, sigma = 0, phi_scale = 0, phi_offset = 0;
  if (f.batch_stats) {
    core::ChannelSums sums;
    sums.count = m;
    if (m > 0) sums.sum = channel_total(a.sum_partial, a.stats_geo, a.pivot, c, m);
    if (m > 0 && f.spec.uses_deviation_sums()) {
      sums.deviation_sum = combine(a.dev.a, a.dev_geo, c);
      sums.phi_sum = combine(a.dev.b, a.dev_geo, c);
    }
    const int64_t per_end = f.spec.extremes_per_end();
    if (per_end > 0) {
      const int chunks = a.stats_geo.chunks;
      for (int chunk = 0; chunk < chunks; ++chunk) {
        core::Candidate* hi = a.hi + (c * chunks + chunk) * per_end;
        core::Candidate* lo = a.lo + (c * chunks + chunk) * per_end;
        core::reset_extremes(hi, per_end);
        core::reset_extremes(lo, per_end);
        for (int split = 0; m > 0 && split < a.stats_geo.splits; ++split) {
          const int64_t partial = partial_index(a.stats_geo, c, chunk, split);
          core::merge_extremes(hi, a.partial_hi + partial * per_end, per_end);
          core::merge_extremes(lo, a.partial_lo + partial * per_end, per_end);
        }
      }
      sums.largest = a.hi + c * chunks * per_end;
      sums.smallest = a.lo + c * chunks * per_end;
    }
    const int64_t cols = f.sparse_cols;
    const core::ChannelStatistics stats = core::channel_statistics_with<StatT>(
        f.spec, sums, f.eps, f.constants, f.sparse_index + c * cols, static_cast<StatT*>(f.sparse_coef) + c * cols,
        a.pool + c * core::deviation_scratch_size(f.spec));
    mean = stats.mean;
    invstd = stats.invstd;
    sigma = stats.sigma;
    phi_scale = stats.phi_scale;
    phi_offset = stats.phi_offset;
    // SPEC §2, as ops::update_running_stats: fma(f, batch, r * (1 - f)) in double, the
    // rounding of ATen's add(alpha) and of the CPU path; an empty batch leaves them alone.
    if (m > 0 && f.running_mean.data != nullptr) {
      const double keep = 1.0 - f.momentum;
      const double rm = load_channel(f.running_mean.data, f.running_mean.dtype, c);
      const double rv = load_channel(f.running_var.data, f.running_var.dtype, c);
      store_channel(f.running_mean.data, f.running_mean.dtype, c,
                    __fma_rn(f.momentum, stats.mean, __dmul_rn(rm, keep)));
      store_channel(f.running_var.data, f.running_var.dtype, c,
                    __fma_rn(f.momentum, stats.unbiased_var, __dmul_rn(rv, keep)));
    }
  } else {
    mean = load_channel(f.running_mean.data, f.running_mean.dtype, c);
    invstd = 1.0 / sqrt(load_channel(f.running_var.data, f.running_var.dtype, c) + f.eps);
  }
  StatT* save_mean = static_cast<StatT*>(f.save_mean);
  StatT* save_invstd = static_cast<StatT*>(f.save_invstd);
  StatT* save_coef = static_cast<StatT*>(f.save_coef);
  save_mean[c] = static_cast<StatT>(mean);
  save_invstd[c] = static_cast<StatT>(invstd);
  save_coef[3 * c] = static_cast<StatT>(sigma);
  save_coef[3 * c + 1] = static_cast<StatT>(phi_scale);
  save_coef[3 * c + 2] = static_cast<StatT>(phi_offset);
  // y = (x - mean) * scale + bias, scale = invstd * weight (the CPU's keep_channel)
  a.mean[c] = mean;
  a.scale[c] = invstd * load_channel(f.weight, c, 1.0);
  a.bias[c] = load_channel(f.bias, c, 0.0);
}

// ---- the plan of one call --------------------------------------------------------------------

int extremes_capacity(int64_t per_end) {
  return per_end == 0 ? 0 : per_end == 1 ? 1 : per_end <= 4 ? 4 : per_end <= 16 ? 16 : 32;
}

template <typename Fn>
void with_capacity(int capacity, Fn&& fn) {
  switch (capacity) {
    case 0: fn(Int<0>{}); break;
    case 1: fn(Int<1>{}); break;
    case 4: fn(Int<4>{}); break;
    case 16: fn(Int<16>{}); break;
    default: fn(Int<32>{}); break;
  }
}

int element_size(Dtype dtype) { return dtype == Dtype::Float64 ? 8 : dtype == Dtype::Float32 ? 4 : 2; }

struct ForwardPlan {
  Plan stats, deviations, affine;
  int capacity = 0;
  int64_t per_end = 0;
  bool element_passes = false;  // batch statistics of a non-empty batch
};

ForwardPlan plan_forward(const ForwardArgs& a) {
  ForwardPlan p;
  const int size = element_size(a.dtype);
  const int acc = a.dtype == Dtype::Float64 ? 8 : 4;
  p.per_end = a.batch_stats ? a.spec.extremes_per_end() : 0;
  p.capacity = extremes_capacity(p.per_end);
  p.element_passes = a.batch_stats && a.layout.count() > 0;
  const uintptr_t x_bits = address_bits(a.x);
  // Lists of more than one candidate per end make vector loads pointless (registers).
  const int stats_acc = acc + (p.capacity == 0 ? 0 : 2 * p.capacity * (acc + 4));
  p.stats = make_plan(a.layout, a.batch_stats ? a.spec.chunks : 1, size, x_bits, p.capacity > 1 ? 1 : 16, stats_acc);
  p.deviations = make_plan(a.layout, 1, size, x_bits, 16, 2 * acc);
  p.affine = make_plan(a.layout, 1, size, x_bits | address_bits(a.y), 16, 0);
  return p;
}

struct ForwardWorkspace {
  double* pivot;  // [C]
  double* sum_partial;
  core::Candidate* partial_hi;
  core::Candidate* partial_lo;
  SumPartials dev;
  core::Candidate* hi;
  core::Candidate* lo;
  core::Deviation* pool;
  double* mean;  // [C]: the deviation pass's, then apply_affine's with scale and bias
  double* scale;
  double* bias;
  size_t bytes;
};

ForwardWorkspace carve_forward(const ForwardArgs& a, const ForwardPlan& p, void* base) {
  Bump bump{static_cast<unsigned char*>(base)};
  ForwardWorkspace w;
  const int64_t C = a.layout.C, chunks = p.stats.geo.chunks;
  w.pivot = bump.take<double>(p.element_passes ? C : 0);
  w.sum_partial = bump.take<double>(p.stats.partials());
  w.partial_hi = bump.take<core::Candidate>(p.stats.partials() * p.per_end);
  w.partial_lo = bump.take<core::Candidate>(p.stats.partials() * p.per_end);
  const bool dense = a.batch_stats && a.spec.uses_deviation_sums();
  w.dev.a = bump.take<double>(dense ? p.deviations.partials() : 0);
  w.dev.b = bump.take<double>(dense ? p.deviations.partials() : 0);
  w.hi = bump.take<core::Candidate>(C * chunks * p.per_end);
  w.lo = bump.take<core::Candidate>(C * chunks * p.per_end);
  w.pool = bump.take<core::Deviation>(a.batch_stats ? C * core::deviation_scratch_size(a.spec) : 0);
  w.mean = bump.take<double>(C);
  w.scale = bump.take<double>(C);
  w.bias = bump.take<double>(C);
  w.bytes = bump.used;
  return w;
}

}  // namespace
}  // namespace detail

const char* forward_unsupported(const ForwardArgs& a) {
  if (a.layout.count() > INT32_MAX) return "lpnorm (CUDA): at most 2^31 - 1 values per channel are supported";
  if (a.batch_stats && a.spec.extremes_per_end() > kMaxExtremesPerEnd) {
    return "lpnorm (CUDA): norm='topk' supports k <= 32 on CUDA (the candidates are kept in registers); "
           "use a smaller k or run this layer on the CPU";
  }
  if (a.layout.C * a.spec.chunks > INT32_MAX) return "lpnorm (CUDA): too many channels";
  return nullptr;
}

size_t forward_workspace_bytes(const ForwardArgs& a) {
  const detail::ForwardPlan plan = detail::plan_forward(a);
  return detail::carve_forward(a, plan, nullptr).bytes;
}

cudaError_t batch_norm_forward(const ForwardArgs& a, void* workspace, cudaStream_t stream) {
  using namespace detail;
  if (a.layout.C == 0) return cudaSuccess;
  const ForwardPlan plan = plan_forward(a);
  const ForwardWorkspace w = carve_forward(a, plan, workspace);
  const int64_t m = a.layout.count();
  constexpr int kChannelThreads = 128;  // the per-channel kernels'

  with_type(a.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    using A = typename Num<T>::acc;
    const T* x = static_cast<const T*>(a.x);
    if (plan.element_passes) {
      channel_pivots_kernel<T><<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(
          x, a.layout, w.pivot);
      // collect_stats
      with_capacity(plan.capacity, [&](auto cap_tag) {
        constexpr int CAP = decltype(cap_tag)::value;
        with_vec<T>(plan.stats.vec, [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          if constexpr (CAP <= 1 || V == 1) {
            using Op = StatsOp<T, V, CAP>;
            const Op op{x, w.pivot, w.sum_partial, w.partial_hi, w.partial_lo, static_cast<int>(plan.per_end)};
            launch_reduce<Op, V>(plan.stats, op, stream);
          }
        });
      });
      // collect_deviations (dense norms), around the means
      if (a.spec.uses_deviation_sums()) {
        const MeansArgs means{w.sum_partial, w.pivot, plan.stats.geo, m, a.layout.C, w.mean};
        channel_means_kernel<<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(means);
        with_phi(a.spec.phi(), [&](auto phi_tag) {
          constexpr core::PhiKind PHI = decltype(phi_tag)::value;
          if constexpr (PHI != core::PhiKind::None) {
            with_vec<T>(plan.deviations.vec, [&](auto vec_tag) {
              constexpr int V = decltype(vec_tag)::value;
              using Op = DeviationOp<T, V, PHI>;
              const Op op{x, w.mean, static_cast<A>(a.spec.deviation_power()), w.dev};
              launch_reduce<Op, V>(plan.deviations, op, stream);
            });
          }
        });
      }
    }
    // finish_channels
    FinishArgs finish{a, plan.stats.geo, w.sum_partial, w.pivot, w.partial_hi, w.partial_lo, plan.deviations.geo, w.dev,
                      w.hi, w.lo, w.pool, w.mean, w.scale, w.bias};
    if (a.stats_dtype == Dtype::Float64) {
      finish_channels_kernel<double><<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(finish);
    } else {
      finish_channels_kernel<float><<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(finish);
    }
    // apply_affine
    if (m > 0) {
      with_vec<T>(plan.affine.vec, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        using Op = AffineOp<T, V>;
        const Op op{x, static_cast<T*>(a.y), w.mean, w.scale, w.bias};
        launch_apply<Op, V>(plan.affine, op, stream);
      });
    }
  });
  return cudaGetLastError();
}

}  // namespace lpnorm::cuda
