// Small helpers used inside the per-instruction-set kernel builds must be inlined into each
// build: an out-of-line copy compiled with AVX-512 could otherwise be the one the linker
// keeps for every caller, and the baseline build would run instructions the CPU lacks.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define LPNORM_INLINE inline __attribute__((always_inline))
#else
#define LPNORM_INLINE inline
#endif

// Functions of the core that the CUDA kernels share with the CPU (the per-channel formulas)
// are marked LPNORM_HOST_DEVICE: __host__ __device__ under nvcc, nothing for plain C++.
#if defined(__CUDACC__)
#define LPNORM_HOST_DEVICE __host__ __device__
#else
#define LPNORM_HOST_DEVICE
#endif
