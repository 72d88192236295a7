// The backward passes on the GPU: reduce_grad, grad_channels (the per-channel coefficients of
// core::grad_coefficients, once per channel), apply_grad (the dense formula) and finish_grad
// (parameter gradients and the sparse entries recomputed whole).
#include "cuda/common.cuh"
#include "cuda/passes.cuh"

namespace lpnorm::cuda {
namespace detail {
namespace {

template <typename A>
__device__ __forceinline__ A saved(const void* data, Dtype dtype, int64_t c) {
  return static_cast<A>(load_channel(data, dtype, c));
}

// ---- reduce_grad: sum g and sum g * (x - mean) ----------------------------------------------

template <typename T, int V>
struct GradReduceOp {
  using A = typename Num<T>::acc;
  using Acc = Sum2<A>;
  struct Ctx {
    A mean;
  };
  struct Loaded {
    A g[V], x[V];
  };

  const T* __restrict__ grad;
  const T* __restrict__ x;
  const void* save_mean;
  Dtype stats_dtype;
  SumPartials out;

  __device__ __forceinline__ Ctx context(int64_t c) const { return {saved<A>(save_mean, stats_dtype, c)}; }
  __device__ __forceinline__ Loaded load(int64_t offset) const {
    Loaded l;
    load_pack<T, V>(grad + offset, l.g);
    load_pack<T, V>(x + offset, l.x);
    return l;
  }
  __device__ __forceinline__ void add(Acc& acc, const Ctx& ctx, const Loaded& l, int i, int32_t) const {
    acc.a += l.g[i];
    acc.b += l.g[i] * (l.x[i] - ctx.mean);
  }
  __device__ __forceinline__ void write(const Acc& acc, int64_t partial) const {
    out.a[partial] = static_cast<double>(acc.a);
    out.b[partial] = static_cast<double>(acc.b);
  }
};

struct ChannelGrad {
  core::GradCoefficients coef;
  double mean, invstd, sum_g, sum_gd;
};

// What grad_channels needs to build a channel's coefficients, and where it writes them
// (`channel`, which apply_grad and finish_grad read).
struct GradSetup {
  BackwardArgs b;
  Geometry geo;          // of reduce_grad (its partials)
  SumPartials sums;      // sum g, sum g * d
  ChannelGrad* channel;  // [C]
};

__device__ __forceinline__ ChannelGrad channel_grad(const GradSetup& s, int64_t c) {
  const BackwardArgs& b = s.b;
  const int64_t m = b.layout.count();
  ChannelGrad r;
  r.sum_g = m > 0 ? combine(s.sums.a, s.geo, c) : 0.0;
  r.sum_gd = m > 0 ? combine(s.sums.b, s.geo, c) : 0.0;
  r.mean = load_channel(b.save_mean, b.stats_dtype, c);
  r.invstd = load_channel(b.save_invstd, b.stats_dtype, c);
  const double sigma = load_channel(b.save_coef, b.stats_dtype, 3 * c);
  const double phi_scale = load_channel(b.save_coef, b.stats_dtype, 3 * c + 1);
  const double phi_offset = load_channel(b.save_coef, b.stats_dtype, 3 * c + 2);
  r.coef = core::grad_coefficients(b.batch_stats, m, load_channel(b.weight, c, 1.0), r.invstd, sigma, phi_scale,
                                   phi_offset, r.sum_g, r.sum_gd);
  return r;
}

// ---- grad_channels: one thread per channel ----------------------------------------------------
// (Each thread of apply_grad summing its channel's partials itself made it O(splits^2).)

__global__ void grad_channels_kernel(GradSetup s) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < s.b.layout.C) s.channel[c] = channel_grad(s, c);
}

// ---- apply_grad: dx = scale_g * g + scale_phi * phi(x - mean) + offset ------------------------

template <typename T, int V, core::PhiKind PHI>
struct GradApplyOp {
  using Elem = T;
  using A = typename Num<T>::acc;
  struct Ctx {
    A mean, scale_g, scale_phi, offset;
  };
  struct Loaded {
    A g[V], x[V];
  };

  const T* __restrict__ grad;
  const T* __restrict__ x;
  T* __restrict__ out;
  const ChannelGrad* channel;  // grad_channels_kernel's
  A power;

  __device__ __forceinline__ Ctx context(int64_t c) const {
    const ChannelGrad& r = channel[c];
    return {static_cast<A>(r.mean), static_cast<A>(r.coef.scale_g), static_cast<A>(r.coef.scale_phi),
            static_cast<A>(r.coef.offset)};
  }
  __device__ __forceinline__ Loaded load(int64_t offset) const {
    Loaded l;
    load_pack<T, V>(grad + offset, l.g);
    load_pack<T, V>(x + offset, l.x);
    return l;
  }
  __device__ __forceinline__ A compute(const Ctx& ctx, const Loaded& l, int i) const {
    // No phi term at all without one (linf, topk, range): there scale_phi is dsigma * 0, NaN
    // where dsigma is not finite (the CPU's GradApplyOp drops it too).
    if constexpr (PHI == core::PhiKind::None) return ctx.scale_g * l.g[i] + ctx.offset;
    return ctx.scale_g * l.g[i] + ctx.scale_phi * phi_of<PHI>(l.x[i] - ctx.mean, power) + ctx.offset;
  }
};

// ---- finish_grad: one thread per channel ----------------------------------------------------

template <typename T>
__global__ void finish_grad_kernel(GradSetup s) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const BackwardArgs& b = s.b;
  if (c >= b.layout.C) return;
  const ChannelGrad& r = s.channel[c];
  if (b.grad_weight.data != nullptr) store_channel(b.grad_weight.data, b.grad_weight.dtype, c, r.sum_gd * r.invstd);
  if (b.grad_bias.data != nullptr) store_channel(b.grad_bias.data, b.grad_bias.dtype, c, r.sum_g);

  // The sparse terms: those few elements recomputed whole in double, so they are rounded once.
  const int64_t cols = b.sparse_cols;
  const core::ChannelLayout& l = b.layout;
  if (cols == 0 || l.count() == 0) return;
  const int64_t* index = b.sparse_index + c * cols;
  const T* grad = static_cast<const T*>(b.grad);
  const T* x = static_cast<const T*>(b.x);
  T* grad_x = static_cast<T*>(b.grad_x);
  for (int64_t i = 0; i < cols; ++i) {
    double sparse = load_channel(b.sparse_coef, b.stats_dtype, c * cols + i);
    // Where an index can repeat (range of a constant chunk), its terms are summed at its first
    // entry; elsewhere the search would make the loop O(cols^2) for nothing.
    if (b.sparse_may_repeat) {
      bool first = true;
      for (int64_t j = 0; j < i; ++j) first = first && index[j] != index[i];
      if (!first) continue;
      for (int64_t j = i + 1; j < cols; ++j) {
        if (index[j] == index[i]) sparse += load_channel(b.sparse_coef, b.stats_dtype, c * cols + j);
      }
    }
    const int64_t offset = l.offset(index[i] / l.S, c, index[i] % l.S);
    const double g = Num<T>::load(grad[offset]);
    const double d = static_cast<double>(Num<T>::load(x[offset])) - r.mean;
    // (The norms with sparse terms have no phi: as apply_grad, no phi term.)
    const double phi_term = b.phi == core::PhiKind::None ? 0.0 : r.coef.scale_phi * core::phi(b.phi, d, b.power);
    const double dense = r.coef.scale_g * g + phi_term + r.coef.offset;
    grad_x[offset] = Num<T>::store(static_cast<typename Num<T>::acc>(dense + r.coef.sparse_scale * sparse));
  }
}

int element_size(Dtype dtype) { return dtype == Dtype::Float64 ? 8 : dtype == Dtype::Float32 ? 4 : 2; }

struct BackwardPlan {
  Plan reduce, apply;
};

BackwardPlan plan_backward(const BackwardArgs& a) {
  const int size = element_size(a.dtype);
  const int acc = a.dtype == Dtype::Float64 ? 8 : 4;
  const uintptr_t in_bits = address_bits(a.grad) | address_bits(a.x);
  return {make_plan(a.layout, 1, size, in_bits, 16, 2 * acc),
          make_plan(a.layout, 1, size, in_bits | address_bits(a.grad_x), 16, 0)};
}

struct BackwardWorkspace {
  SumPartials sums;
  ChannelGrad* channel;
};

BackwardWorkspace carve_backward(const BackwardArgs& a, const BackwardPlan& p, void* base, size_t* bytes) {
  Bump bump{static_cast<unsigned char*>(base)};
  BackwardWorkspace w;
  w.sums.a = bump.take<double>(p.reduce.partials());
  w.sums.b = bump.take<double>(p.reduce.partials());
  w.channel = bump.take<ChannelGrad>(a.layout.C);
  if (bytes != nullptr) *bytes = bump.used;
  return w;
}

}  // namespace
}  // namespace detail

const char* backward_unsupported(const BackwardArgs& a) {
  if (a.layout.count() > INT32_MAX) return "lpnorm (CUDA): at most 2^31 - 1 values per channel are supported";
  if (a.layout.C > INT32_MAX) return "lpnorm (CUDA): too many channels";
  return nullptr;
}

size_t backward_workspace_bytes(const BackwardArgs& a) {
  size_t bytes = 0;
  detail::carve_backward(a, detail::plan_backward(a), nullptr, &bytes);
  return bytes;
}

cudaError_t batch_norm_backward(const BackwardArgs& a, void* workspace, cudaStream_t stream) {
  using namespace detail;
  if (a.layout.C == 0) return cudaSuccess;
  const BackwardPlan plan = plan_backward(a);
  const BackwardWorkspace w = carve_backward(a, plan, workspace, nullptr);
  const SumPartials sums = w.sums;
  const GradSetup setup{a, plan.reduce.geo, sums, w.channel};
  const bool elements = a.layout.count() > 0;
  constexpr int kChannelThreads = 128;  // the per-channel kernels'

  with_type(a.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    using A = typename Num<T>::acc;
    const T* grad = static_cast<const T*>(a.grad);
    const T* x = static_cast<const T*>(a.x);
    if (elements) {
      with_vec<T>(plan.reduce.vec, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        using Op = GradReduceOp<T, V>;
        launch_reduce<Op, V>(plan.reduce, Op{grad, x, a.save_mean, a.stats_dtype, sums}, stream);
      });
    }
    grad_channels_kernel<<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(setup);
    if (elements) {
      with_phi(a.phi, [&](auto phi_tag) {
        constexpr core::PhiKind PHI = decltype(phi_tag)::value;
        with_vec<T>(plan.apply.vec, [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          using Op = GradApplyOp<T, V, PHI>;
          launch_apply<Op, V>(plan.apply, Op{grad, x, static_cast<T*>(a.grad_x), w.channel, static_cast<A>(a.power)},
                              stream);
        });
      });
    }
    finish_grad_kernel<T><<<channel_blocks(a.layout.C, kChannelThreads), kChannelThreads, 0, stream>>>(setup);
  });
  return cudaGetLastError();
}

}  // namespace lpnorm::cuda
