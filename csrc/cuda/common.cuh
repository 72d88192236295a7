// The machinery every CUDA pass shares: element types, vector loads, the walk over one
// channel's elements for both memory layouts, the deterministic block reduction, and the
// launch plan. The passes themselves (forward.cu, backward.cu) are small "ops" plugged in.
//
// Launch shape (one plan, forward and backward alike):
//  - planar (NCHW-like, the spatial dimension contiguous): a block of 1 x 256 threads works
//    on one channel and chunk, a contiguous share of its N planes; threads stride over
//    V-element vectors (128-bit loads where strides and pointers allow).
//  - channels-last (channels innermost): a block of X x Y threads covers X * V neighbouring
//    channels (threadIdx.x, V channels per thread: coalesced vector loads along C) and a
//    share of the rows n * S + s (threadIdx.y).
//  - grid.x = channels (or channel tiles) x chunks, grid.y = splits of a channel: many blocks
//    per channel when a channel is large. Each block writes one partial per channel, which
//    a per-channel step sums in index order (the exact, deterministic second stage).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "core/layout.h"
#include "cuda/kernels.h"

namespace lpnorm::cuda::detail {

constexpr int kThreads = 256;            // threads per block of the element passes
constexpr int kUnroll = 4;               // independent vectors in flight per thread
constexpr int64_t kBlockElements = 16384;  // target elements per block (shape-only split)
constexpr int kMaxSplits = 65535;
constexpr int kSharedBudget = 40 * 1024;   // bytes of shared memory a block reduction may use

// ---- element types -------------------------------------------------------------------------

template <typename T>
struct Num;
template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, typename Num<T>::acc (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = Num<T>::load(pack.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const typename Num<T>::acc (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = Num<T>::store(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// A per-channel value of any supported dtype, as double.
__device__ __forceinline__ double load_channel(const void* data, Dtype dtype, int64_t c) {
  switch (dtype) {
    case Dtype::Float64: return static_cast<const double*>(data)[c];
    case Dtype::Float32: return static_cast<const float*>(data)[c];
    case Dtype::Float16: return __half2float(static_cast<const __half*>(data)[c]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[c]);
  }
}

__device__ __forceinline__ double load_channel(ConstChannels v, int64_t c, double fallback) {
  return v.data != nullptr ? load_channel(v.data, v.dtype, c) : fallback;
}

__device__ __forceinline__ void store_channel(void* data, Dtype dtype, int64_t c, double value) {
  switch (dtype) {
    case Dtype::Float64: static_cast<double*>(data)[c] = value; break;
    case Dtype::Float32: static_cast<float*>(data)[c] = static_cast<float>(value); break;
    // double -> float -> half, as torch's .to() of a float64 tensor does
    case Dtype::Float16: static_cast<__half*>(data)[c] = __float2half_rn(static_cast<float>(value)); break;
    default: static_cast<__nv_bfloat16*>(data)[c] = __float2bfloat16_rn(static_cast<float>(value)); break;
  }
}

// ---- index arithmetic ----------------------------------------------------------------------

// q = n / d and r = n % d for n < 2^31 with a multiply and a shift (division by invariant
// integers): the walk divides every vector position by the plane length.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = (__umulhi(n, multiplier) + n) >> shift;
    r = n - q * divisor;
  }
};

// Where one pass runs: the layout seen as (units, splits) of blocks.
struct Geometry {
  int64_t C = 0, S = 1;
  int64_t stride_n = 0, stride_c = 0, stride_s = 1;
  int64_t chunk_count = 0;  // flat elements n * S + s per chunk
  int64_t chunk_n = 0;      // batch entries per chunk
  int32_t chunks = 1;       // G
  int32_t splits = 1;       // B: blocks per (channel or tile, chunk)
  FastDivmod div;           // planar: by S / V (vectors per plane); channels-last: by S
  bool rows_dense = true;   // channels-last: offset of row n * S + s is row * stride_s
};

struct Plan {
  bool channels_last = false;
  int vec = 1;      // V
  int block_x = 1;  // X: channels-last thread columns
  int block_y = kThreads;
  int64_t units = 0;
  Geometry geo;

  dim3 grid() const { return dim3(static_cast<unsigned>(units), static_cast<unsigned>(geo.splits)); }
  dim3 block() const { return dim3(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y)); }
  int64_t partials() const { return geo.C * geo.chunks * geo.splits; }  // one per channel, chunk, split
};

inline bool is_channels_last(const core::ChannelLayout& l) {
  // as the CPU walk: channels innermost and no contiguous spatial run to prefer
  return l.stride_c == 1 && l.C > 1 && !(l.S > 1 && l.stride_s == 1);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launch plan of a pass over `layout` split into `chunks` ghost batches. `element_size`
// and `align` (the OR of every data pointer the pass touches) choose the vector width
// among {16 bytes, 8 bytes, one element}; max_vec caps it (1 for passes that keep extremes).
// `acc_bytes` is the per-channel reduction state the shared-memory step stores.
inline Plan make_plan(const core::ChannelLayout& l, int64_t chunks, int element_size, uintptr_t align,
                      int max_vec, int acc_bytes) {
  Plan plan;
  plan.channels_last = is_channels_last(l);
  Geometry& g = plan.geo;
  g.C = l.C;
  g.S = l.S;
  g.stride_n = l.stride_n;
  g.stride_c = l.stride_c;
  // Without spatial dimensions the row stride is the batch stride: (N, C) reads as rows.
  g.stride_s = l.S == 1 ? l.stride_n : l.stride_s;
  g.chunks = static_cast<int32_t>(chunks);
  g.chunk_n = l.N / chunks;
  g.chunk_count = g.chunk_n * l.S;

  const int widest = 16 / element_size;
  auto fits = [&](int v) {
    if (v == 1) return true;
    if (v > max_vec || align % (static_cast<uintptr_t>(v) * element_size) != 0) return false;
    if (plan.channels_last) return l.C % v == 0 && l.stride_n % v == 0 && g.stride_s % v == 0;
    return l.stride_s == 1 && l.S % v == 0 && l.stride_n % v == 0 && l.stride_c % v == 0;
  };
  plan.vec = fits(widest) ? widest : (widest / 2 > 1 && fits(widest / 2)) ? widest / 2 : 1;
  const int V = plan.vec;

  if (!plan.channels_last) {
    plan.block_x = 1;
    plan.block_y = kThreads;
    plan.units = l.C * chunks;
    g.splits = static_cast<int32_t>(std::min<int64_t>(
        std::max<int64_t>(1, std::min(ceil_div(g.chunk_count, kBlockElements), g.chunk_count / V / 32)), kMaxSplits));
    g.div = FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, l.S / V)));
  } else {
    const int64_t slots = ceil_div(l.C, V);
    int x = 1;
    while (x < 32 && x < slots) x *= 2;
    int y = kThreads / x;
    // The shared-memory step stores one state per warp and column: keep it in budget, but
    // the block at least one full warp.
    while (y > 1 && x * y > 32 && static_cast<int64_t>(x * y / 32) * x * V * acc_bytes > kSharedBudget) y /= 2;
    plan.block_x = x;
    plan.block_y = y;
    plan.units = ceil_div(slots, x) * chunks;
    g.splits = static_cast<int32_t>(std::min<int64_t>(
        std::max<int64_t>(1, std::min(ceil_div(g.chunk_count * x * V, kBlockElements), g.chunk_count / 4)),
        kMaxSplits));
    g.rows_dense = l.N == 1 || l.stride_n == l.S * g.stride_s;
    g.div = FastDivmod(static_cast<uint32_t>(std::max<int64_t>(1, l.S)));
  }
  return plan;
}

inline size_t shared_bytes(const Plan& plan, int acc_bytes) {
  const int threads = plan.block_x * plan.block_y;
  const int warps = (threads + 31) / 32;
  if (warps <= 1) return 0;
  const int per_thread = plan.channels_last ? plan.vec : 1;
  return static_cast<size_t>(warps) * plan.block_x * per_thread * acc_bytes;
}

// ---- the walk -------------------------------------------------------------------------------

// Visits this thread's share of the block's elements: op.load(offset) for up to kUnroll
// vectors, then visit(loaded, offset, flat) for each, in a fixed order. `c0` is the
// first channel of the thread (planar: the block's channel); flat = n * S + s of the first
// element of the vector.
template <bool CL, int V, typename Op, typename Visit>
__device__ __forceinline__ void walk(const Geometry& g, int chunk, int64_t c0, const Op& op, Visit&& visit) {
  using Loaded = typename Op::Loaded;
  const int64_t positions = CL ? g.chunk_count : g.chunk_count / V;
  const int64_t begin = positions * blockIdx.y / g.splits;
  const int64_t end = positions * (blockIdx.y + 1) / g.splits;
  const int64_t step = blockDim.y;
  for (int64_t base = begin + threadIdx.y; base < end; base += kUnroll * step) {
    int64_t offset[kUnroll];
    int32_t flat[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pos = base + u * step;
      valid[u] = pos < end;
      uint32_t q, r;
      if (CL) {
        const int64_t row = chunk * g.chunk_count + pos;
        if (g.rows_dense) {
          offset[u] = row * g.stride_s + c0 * g.stride_c;
        } else {
          g.div.divmod(static_cast<uint32_t>(row), q, r);
          offset[u] = q * g.stride_n + r * g.stride_s + c0 * g.stride_c;
        }
        flat[u] = static_cast<int32_t>(row);
      } else {
        g.div.divmod(static_cast<uint32_t>(pos), q, r);
        const int64_t n = chunk * g.chunk_n + q;
        const int64_t s = static_cast<int64_t>(r) * V;
        offset[u] = n * g.stride_n + c0 * g.stride_c + s * g.stride_s;
        flat[u] = static_cast<int32_t>(n * g.S + s);
      }
    }
    Loaded loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) loaded[u] = op.load(offset[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (valid[u]) visit(loaded[u], offset[u], flat[u]);
    }
  }
}

// Decodes the block's unit: chunk, and the thread's first channel (nullopt-like: -1 when the
// thread's column lies past the last channel).
template <bool CL, int V>
__device__ __forceinline__ int64_t thread_channel(const Geometry& g, int& chunk) {
  const int64_t unit = blockIdx.x;
  chunk = static_cast<int>(unit % g.chunks);
  const int64_t major = unit / g.chunks;
  if (!CL) return major;
  const int64_t c0 = (major * blockDim.x + threadIdx.x) * V;
  return c0 < g.C ? c0 : -1;
}

// ---- the deterministic block reduction ------------------------------------------------------

// Reduces the states of the threads that share threadIdx.x (planar: the whole block) into
// the thread with threadIdx.y == 0: a shuffle tree inside each warp, then that thread merges
// the other warps' results from shared memory in warp order.
template <typename Acc, int CPT>
__device__ __forceinline__ void block_reduce(Acc (&acc)[CPT], unsigned char* shared) {
  const int X = blockDim.x;
  const int linear = threadIdx.x + threadIdx.y * X;
  const int lane = linear & 31, warp = linear >> 5;
  const int warps = (X * blockDim.y + 31) / 32;
  for (int offset = 16; offset >= X; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) acc[i].merge(acc[i].shfl_down(offset));
  }
  if (warps == 1) return;
  Acc* states = reinterpret_cast<Acc*>(shared);
  if (lane < X) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) states[(warp * X + lane) * CPT + i] = acc[i];
  }
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int w = 1; w < warps; ++w) {
#pragma unroll
      for (int i = 0; i < CPT; ++i) acc[i].merge(states[(w * X + threadIdx.x) * CPT + i]);
    }
  }
}

// Two running sums (sum |d|^q and sum phi; sum g and sum g * d; or the sum of x alone).
template <typename A>
struct Sum2 {
  A a, b;
  static __device__ __forceinline__ Sum2 identity() { return {A(0), A(0)}; }
  __device__ __forceinline__ void merge(const Sum2& o) {
    a += o.a;
    b += o.b;
  }
  __device__ __forceinline__ Sum2 shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, a, offset), __shfl_down_sync(0xffffffffu, b, offset)};
  }
};

// The partials of a Sum2 pass: [C][chunks][splits] each, summed in index order per channel.
struct SumPartials {
  double* a = nullptr;
  double* b = nullptr;
};

__host__ __device__ __forceinline__ int64_t partial_index(const Geometry& g, int64_t c, int chunk, int split) {
  return (c * g.chunks + chunk) * g.splits + split;
}

// The exact second stage: the partials of channel c (all chunks), in index order.
__device__ __forceinline__ double combine(const double* partial, const Geometry& g, int64_t c) {
  double total = 0;
  const int64_t first = c * g.chunks * g.splits, count = static_cast<int64_t>(g.chunks) * g.splits;
  for (int64_t i = 0; i < count; ++i) total += partial[first + i];
  return total;
}

// ---- host helpers ---------------------------------------------------------------------------

// Type and vector-width dispatch: fn(T{}) for the storage type, then fn2 with V known.
template <typename Fn>
void with_type(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::Float64: fn(double{}); break;
    case Dtype::Float32: fn(float{}); break;
    case Dtype::Float16: fn(__half{}); break;
    case Dtype::BFloat16: fn(__nv_bfloat16{}); break;
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

// The widths make_plan picks: 16 bytes, 8 bytes, or one element.
template <typename T, typename Fn>
void with_vec(int v, Fn&& fn) {
  constexpr int widest = 16 / static_cast<int>(sizeof(T));
  if (v == widest) {
    fn(Int<widest>{});
  } else if constexpr (widest / 2 > 1) {
    if (v == widest / 2) {
      fn(Int<widest / 2>{});
    } else {
      fn(Int<1>{});
    }
  } else {
    fn(Int<1>{});
  }
}

template <typename Fn>
void with_phi(core::PhiKind phi, Fn&& fn) {
  switch (phi) {
    case core::PhiKind::Identity: fn(std::integral_constant<core::PhiKind, core::PhiKind::Identity>{}); break;
    case core::PhiKind::Sign: fn(std::integral_constant<core::PhiKind, core::PhiKind::Sign>{}); break;
    case core::PhiKind::SignedPower:
      fn(std::integral_constant<core::PhiKind, core::PhiKind::SignedPower>{});
      break;
    default: fn(std::integral_constant<core::PhiKind, core::PhiKind::None>{}); break;
  }
}

// phi(d) and |d|^q of the dense norms in the accumulation type, without a branch per element.
template <core::PhiKind PHI, typename A>
__device__ __forceinline__ A phi_of(A d, A power) {
  if constexpr (PHI == core::PhiKind::Identity) {
    return d;
  } else if constexpr (PHI == core::PhiKind::Sign) {
    return core::sign_of(d);
  } else if constexpr (PHI == core::PhiKind::SignedPower) {
    return core::sign_of(d) * pow(fabs(d), power - A(1));
  } else {
    return A(0);
  }
}

// Bump allocation of the workspace in 256-byte aligned pieces (size pass with base == 0).
struct Bump {
  unsigned char* base;
  size_t used = 0;
  template <typename U>
  U* take(int64_t count) {
    U* p = reinterpret_cast<U*>(base + used);
    used += (static_cast<size_t>(count) * sizeof(U) + 255) / 256 * 256;
    return base != nullptr ? p : nullptr;
  }
};

inline uintptr_t address_bits(const void* p) { return reinterpret_cast<uintptr_t>(p); }

inline unsigned channel_blocks(int64_t channels, int threads) {
  return static_cast<unsigned>(ceil_div(channels, threads));
}

}  // namespace lpnorm::cuda::detail
