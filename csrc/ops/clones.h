// Loops of the glue built for several x86 instruction sets, one chosen when the library loads
// (GCC's target_clones, resolved through an ifunc): the glue itself is compiled for the
// baseline x86-64. lpnorm_ops compiles with -ffp-contract=off, so every build of a loop gives
// the same bits. Elsewhere (other CPUs, a libc without ifuncs) a loop is built once.
#pragma once

#include <cstdint>  // defines __GLIBC__ where the libc is glibc

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
// The per-channel loops: double-precision divisions and square roots, 2, 4 or 8 at a time.
#define LPNORM_VECTOR_CLONES __attribute__((noinline, target_clones("avx512f", "avx2", "default")))
// std::fma as one instruction, not a libm call per element.
#define LPNORM_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define LPNORM_VECTOR_CLONES __attribute__((noinline))
#define LPNORM_FMA_CLONES
#endif
