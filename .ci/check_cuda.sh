#!/usr/bin/env bash
# Compile every torch-free CUDA source for sm_80 and sm_90 with nvcc alone (no GPU, no
# CUDA torch needed), with the flags the CMake build gives nvcc (torch's half-precision
# defines included). Says so and succeeds when there is no nvcc or no CUDA source.
# The sources compile in parallel (LPNORM_CHECK_JOBS, default: all at once).
set -euo pipefail
cd "$(dirname "$0")/.."

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "CUDA check: no CUDA sources yet"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  echo "CUDA check: nvcc not found, skipped"
  exit 0
fi
flags=(-std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -Werror all-warnings
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
jobs_max=${LPNORM_CHECK_JOBS:-${#sources[@]}}
pids=()
for source in "${sources[@]}"; do
  name=$(basename "$source")
  (nvcc "${flags[@]}" -c "$source" -o "$out/$name.o" > "$out/$name.log" 2>&1) &
  pids+=("$!:$source")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
done
status=0
for entry in "${pids[@]}"; do
  pid=${entry%%:*}
  source=${entry#*:}
  if wait "$pid"; then
    echo "CUDA check: $source compiles for sm_80 and sm_90"
  else
    echo "CUDA check: $source FAILED" >&2
    cat "$out/$(basename "$source").log" >&2
    status=1
  fi
done
exit $status
