// The two kernel shapes every element pass is made of, forward and backward alike:
//
//   reduce_kernel<Op>  per channel (and chunk) of the block: Op::add over the thread's
//                      elements into Op::Acc, block_reduce, Op::write of one partial
//   apply_kernel<Op>   per element: Op::compute from what Op::load read, stored in vectors
//
// An Op says what it reads (load), its per-channel context (context(c)), and what it does
// with element i of a loaded vector; the kernels own the layout, the vectors and the order.
#pragma once

#include "cuda/common.cuh"

namespace lpnorm::cuda::detail {

template <typename Op, bool CL, int V>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Op op, Geometry g) {
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int CPT = CL ? V : 1;  // channels per thread
  using Acc = typename Op::Acc;
  using Ctx = typename Op::Ctx;
  int chunk;
  const int64_t c0 = thread_channel<CL, V>(g, chunk);
  Acc acc[CPT];
  Ctx ctx[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) acc[i] = Acc::identity();
  if (c0 >= 0) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) ctx[i] = op.context(c0 + i);
    walk<CL, V>(g, chunk, c0, op, [&](const typename Op::Loaded& loaded, int64_t, int32_t flat) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        // channels-last: element i is channel c0 + i at this row; planar: flat + i of c0
        const int slot = CL ? i : 0;
        op.add(acc[slot], ctx[slot], loaded, i, CL ? flat : flat + i);
      }
    });
  }
  block_reduce(acc, shared);
  if (threadIdx.y == 0 && c0 >= 0) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) op.write(acc[i], partial_index(g, c0 + i, chunk, blockIdx.y));
  }
}

template <typename Op, bool CL, int V>
__global__ void __launch_bounds__(kThreads) apply_kernel(Op op, Geometry g) {
  constexpr int CPT = CL ? V : 1;
  using A = typename Op::A;
  using Ctx = typename Op::Ctx;
  int chunk;
  const int64_t c0 = thread_channel<CL, V>(g, chunk);
  if (c0 < 0) return;
  Ctx ctx[CPT];
#pragma unroll
  for (int i = 0; i < CPT; ++i) ctx[i] = op.context(c0 + i);
  walk<CL, V>(g, chunk, c0, op, [&](const typename Op::Loaded& loaded, int64_t offset, int32_t) {
    A out[V];
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = op.compute(ctx[CL ? i : 0], loaded, i);
    store_pack<typename Op::Elem, V>(op.out + offset, out);
  });
}

template <typename Op, int V>
void launch_reduce(const Plan& plan, const Op& op, cudaStream_t stream) {
  const size_t shared = shared_bytes(plan, sizeof(typename Op::Acc));
  if (plan.channels_last) {
    reduce_kernel<Op, true, V><<<plan.grid(), plan.block(), shared, stream>>>(op, plan.geo);
  } else {
    reduce_kernel<Op, false, V><<<plan.grid(), plan.block(), shared, stream>>>(op, plan.geo);
  }
}

template <typename Op, int V>
void launch_apply(const Plan& plan, const Op& op, cudaStream_t stream) {
  if (plan.channels_last) {
    apply_kernel<Op, true, V><<<plan.grid(), plan.block(), 0, stream>>>(op, plan.geo);
  } else {
    apply_kernel<Op, false, V><<<plan.grid(), plan.block(), 0, stream>>>(op, plan.geo);
  }
}

}  // namespace lpnorm::cuda::detail
