// The headers of this folder are the building blocks of kernels.cpp, which CMake compiles
// once per instruction set with LPNORM_ISA set to the build's name (baseline, avx2, avx512)
// and that set's flags. Only kernels.cpp includes them. Everything in them lives in the
// build's own namespace, lpnorm::cpu::LPNORM_ISA_NAMESPACE (isa_<name>), inside an unnamed
// one, so the three builds of one template never meet at link time.
#pragma once

#ifndef LPNORM_ISA
#error "compile kernels.cpp with -DLPNORM_ISA=<name>"
#endif

#define LPNORM_CONCAT_(a, b) a##b
#define LPNORM_CONCAT(a, b) LPNORM_CONCAT_(a, b)
#define LPNORM_STRINGIFY_(a) #a
#define LPNORM_STRINGIFY(a) LPNORM_STRINGIFY_(a)
#define LPNORM_ISA_NAMESPACE LPNORM_CONCAT(isa_, LPNORM_ISA)
