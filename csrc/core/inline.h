// Small helpers used inside the per-instruction-set kernel builds must be inlined into each
// build: an out-of-line copy compiled with AVX-512 could otherwise be the one the linker
// keeps for every caller, and the baseline build would run instructions the CPU lacks.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define LPNORM_INLINE inline __attribute__((always_inline))
#else
#define LPNORM_INLINE inline
#endif
