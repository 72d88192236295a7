#!/usr/bin/env bash
# Compile every torch-free CUDA source for sm_80 and sm_90 with nvcc alone (no GPU, no
# CUDA torch needed). Says so and succeeds when there is no nvcc or no CUDA source.
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
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for source in "${sources[@]}"; do
  for arch in 80 90; do
    nvcc -std=c++17 -O3 -Icsrc --expt-relaxed-constexpr -gencode "arch=compute_${arch},code=sm_${arch}" \
      -c "$source" -o "$out/$(basename "$source").sm${arch}.o"
  done
  echo "CUDA check: $source compiles for sm_80 and sm_90"
done
