#!/usr/bin/env bash
# Compile-checks the CUDA backend without a GPU:
#  1. every torch-free CUDA source (csrc/cuda/*.cu) with nvcc alone for sm_80 and sm_90, with
#     the flags the CMake build gives nvcc (torch's half-precision defines included);
#  2. the torch glue (csrc/ops/cuda/*.cpp) with the C++ compiler against the installed torch's
#     own c10/cuda and ATen headers and the toolkit's CUDA runtime headers, with the standard
#     and defines CMake uses for liblpnorm_ops (a CPU torch wheel ships those headers; it only
#     lacks the generated c10/cuda/impl/cuda_cmake_macros.h, which a stub stands in for);
#  3. the link contract between them: every lpnorm::cuda symbol the glue calls is defined, with
#     the same signature, by the nvcc objects (catches a launcher API changed on one side only).
# Each part says why it is skipped (no nvcc, no torch, no CUDA headers) and then succeeds.
# The compilations run in parallel (LPNORM_CHECK_JOBS, default: all at once).
set -euo pipefail
cd "$(dirname "$0")/.."

shopt -s nullglob
sources=(csrc/cuda/*.cu)
glue=(csrc/ops/cuda/*.cpp)
if [ ${#sources[@]} -eq 0 ]; then
  echo "CUDA check: no CUDA sources yet"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  echo "CUDA check: nvcc not found, skipped"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# ---- the glue's compiler flags, as CMakeLists.txt + find_package(Torch) give them ------------
# Where this nvcc finds the CUDA runtime headers (it may be a wrapper script outside the
# toolkit), as it reports itself; CUDA_HOME/include otherwise.
cuda_include=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 \
  | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n1 | sed 's/ *$//')
[ -n "$cuda_include" ] || cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
glue_reason=""
if [ ${#glue[@]} -eq 0 ]; then
  glue_reason="no sources in csrc/ops/cuda"
elif ! command -v "${CXX:-g++}" >/dev/null; then
  glue_reason="no C++ compiler (${CXX:-g++})"
elif [ ! -f "$cuda_include/cuda_runtime_api.h" ]; then
  glue_reason="no cuda_runtime_api.h in $cuda_include"
elif ! probe=$("${PYTHON:-python3}" -c \
    "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include')); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)" \
    2>/dev/null); then
  glue_reason="cannot import torch with ${PYTHON:-python3}"
else
  torch_include=$(sed -n 1p <<<"$probe")
  torch_abi=$(sed -n 2p <<<"$probe")
  torch_version=$(sed -n 3p <<<"$probe")
  if [ ! -f "$torch_include/c10/cuda/CUDAStream.h" ] || [ ! -f "$torch_include/c10/cuda/CUDAGuard.h" ]; then
    glue_reason="torch $torch_version ships no c10/cuda headers"
  fi
fi
glue_flags=()
if [ -z "$glue_reason" ]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  if [ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    # What a CUDA build of torch generates there (c10/cuda/impl/cuda_cmake_macros.h.in).
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  # CMake: C++17 with extensions, hidden visibility, torch's interface definitions
  # (Caffe2Targets.cmake: USE_DISTRIBUTED ...; a CUDA torch adds USE_C10D_NCCL), the ABI.
  # Warnings are errors in our sources only (torch's and CUDA's headers are -isystem).
  glue_flags=(-std=gnu++17 -O0 -fPIC -fvisibility=hidden -fvisibility-inlines-hidden
              -Wall -Wextra -Werror
              "-D_GLIBCXX_USE_CXX11_ABI=$torch_abi" -DUSE_C10D_GLOO -DUSE_DISTRIBUTED -DUSE_RPC
              -DUSE_TENSORPIPE -DUSE_C10D_NCCL -DUSE_CUDA -DLPNORM_WITH_CUDA=1
              '-DLPNORM_VERSION="check"' '-DLPNORM_TORCH_VERSION="check"'
              -Icsrc -Icsrc/include -isystem "$torch_include"
              -isystem "$torch_include/torch/csrc/api/include" -isystem "$out/stub"
              -isystem "$cuda_include")
fi

nvcc_flags=(-std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -Werror all-warnings
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
            "-D_GLIBCXX_USE_CXX11_ABI=${torch_abi:-1}"
            -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

jobs_max=${LPNORM_CHECK_JOBS:-$(( ${#sources[@]} + ${#glue[@]} ))}
pids=()
for source in "${sources[@]}"; do
  name=$(basename "$source")
  (nvcc "${nvcc_flags[@]}" -c "$source" -o "$out/$name.o" > "$out/$name.log" 2>&1) &
  pids+=("$!:$source")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
done
if [ -z "$glue_reason" ]; then
  for source in "${glue[@]}"; do
    name=$(basename "$source")
    ("${CXX:-g++}" "${glue_flags[@]}" -c "$source" -o "$out/glue-$name.o" > "$out/glue-$name.log" 2>&1) &
    pids+=("$!:$source")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
  done
fi

status=0
for entry in "${pids[@]}"; do
  pid=${entry%%:*}
  source=${entry#*:}
  name=$(basename "$source")
  log="$out/$name.log"
  what="compiles for sm_80 and sm_90"
  if [[ "$source" == *.cpp ]]; then
    log="$out/glue-$name.log"
    what="compiles against torch $torch_version's CUDA headers"
  fi
  if wait "$pid"; then
    echo "CUDA check: $source $what"
  else
    echo "CUDA check: $source FAILED" >&2
    cat "$log" >&2
    status=1
  fi
done

if [ -n "$glue_reason" ]; then
  echo "CUDA check: torch glue (csrc/ops/cuda) skipped: $glue_reason"
elif [ $status -eq 0 ]; then
  # The launchers the glue calls (undefined there) must exist in the nvcc objects, mangled
  # alike: a declaration in kernels.h that the .cu files define differently fails here.
  nm -C --undefined-only "$out"/glue-*.o | sed -n 's/^ *U //p' | grep '^lpnorm::cuda::' | sort -u > "$out/needed"
  objects=()
  for source in "${sources[@]}"; do objects+=("$out/$(basename "$source").o"); done
  nm -C --defined-only "${objects[@]}" | sed -n 's/^[0-9a-f]* [TW] //p' | sort -u > "$out/defined"
  missing=$(comm -23 "$out/needed" "$out/defined")
  if [ -n "$missing" ]; then
    echo "CUDA check: the glue calls launchers no .cu file defines (kernels.h and csrc/cuda disagree):" >&2
    echo "$missing" >&2
    status=1
  else
    echo "CUDA check: all $(wc -l < "$out/needed") lpnorm::cuda symbols the glue calls are defined by csrc/cuda"
  fi
fi
exit $status
