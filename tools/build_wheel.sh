#!/usr/bin/env bash
# Builds an lpnorm wheel against the torch installed for $PYTHON (default: python).
#
#   tools/build_wheel.sh                          CPU wheel, lpnorm-0.1.0+pt213cpu-*.whl
#   tools/build_wheel.sh --cuda "8.0;9.0+PTX"     CUDA wheel for those archs, +pt213cu130
#   ... --out DIR                                 where the wheel goes (default: dist/)
#   ... --test                                    then install it into a fresh environment and
#                                                 run the test suite from outside the tree
#                                                 (the CUDA tests too when a GPU is present)
#
# The tag names what the binaries need: the torch release built against and, for --cuda, its
# CUDA version. --cuda needs a CUDA build of torch and nvcc. PyPI refuses local tags: publish
# tagged wheels in a find-links index (docs/deployment.md).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
archs=""
out=dist
test_after=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) archs=${2:?--cuda needs an arch list, e.g. "8.0;9.0+PTX"}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --test) test_after=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$archs" ]; then
  "$python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else
    f"build_wheel.sh --cuda needs a CUDA build of torch; this is torch {torch.__version__}")'
  command -v nvcc >/dev/null || { echo "build_wheel.sh --cuda: no nvcc on PATH" >&2; exit 1; }
  export LPNORM_CUDA=ON TORCH_CUDA_ARCH_LIST="$archs"
  build_dir="build/{wheel_tag}-cuda"
else
  export LPNORM_CUDA=OFF
  build_dir="build/{wheel_tag}-cpu"
fi

mkdir -p "$out"
"$python" -m pip wheel --no-build-isolation --no-deps -C build-dir="$build_dir" -w "$out" .
wheel=$(ls -t "$out"/lpnorm-*.whl | head -n 1)
echo "build_wheel.sh: $wheel"
"$python" -c 'import json, sys, zipfile; print(zipfile.ZipFile(sys.argv[1]).read("lpnorm/_build_info.json").decode())' "$wheel"

if [ "$test_after" = 1 ]; then
  scratch=$(mktemp -d)
  # A fresh venv that sees this python's torch, numpy and pytest through a .pth file, after its
  # own packages (--system-site-packages shows the base interpreter's where $python is a venv).
  "$python" -m venv "$scratch/venv"
  "$python" -c 'import sysconfig; print("\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))))' \
    > "$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/builder.pth"
  "$scratch/venv/bin/python" -m pip install --no-deps --no-index --ignore-installed "$wheel"
  mkdir "$scratch/tests"
  cp tests/*.py "$scratch/tests/"
  rm -f "$scratch/tests/test_wheel.py"  # it builds a wheel itself
  cp -r examples "$scratch/"  # test_deploy_cpp.py builds examples/cpp against the wheel's CMake package
  (cd "$scratch" && "$scratch/venv/bin/python" -m lpnorm info &&
     "$scratch/venv/bin/python" -m pytest tests -q -p no:cacheprovider -rs)
  echo "build_wheel.sh: tested $wheel in $scratch/venv"
fi
