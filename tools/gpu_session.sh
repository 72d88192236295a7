#!/usr/bin/env bash
# Everything a GPU session should do, in one call that fits a 10-minute command limit:
#
#   OUT=/some/dir bash tools/gpu_session.sh [--skip-build] [--budget SECONDS] [--quick]
#                                           [--steps smoke,tests,...]
#
# Steps, in this order (most telling first), each logged to $OUT/<step>.log; a failing step
# does not stop the next; each runs under a time cap and the whole under --budget (default
# 540 s), so later steps are skipped (and said to be) rather than the command killed. When the
# smoke run fails, memcheck runs right after it (it names the faulting kernel and line).
#   env        nvidia-smi, torch / CUDA versions, compute-sanitizer's version
#   build      TORCH_CUDA_ARCH_LIST=9.0 LPNORM_CUDA=ON pip install --no-build-isolation --no-deps
#              -C build-dir=build/gpu .   (skipped with --skip-build, or when lpnorm is already
#              installed from this tree with CUDA and LPNORM_REBUILD is not 1)
#   smoke      tools/cuda_smoke.py: every kernel once, results finite
#   tests      pytest -m cuda: the suite's CUDA cases (junit XML in $OUT/tests.xml)
#   bench      benchmarks/bench_gpu.py --verbose --out $OUT/bench: self-test against the CPU,
#              then the issue's table ($OUT/bench.md, $OUT/bench.json)
#   memcheck   compute-sanitizer --tool memcheck on tools/cuda_smoke.py (torch's caching
#              allocator off, so overruns between tensors are seen)
#   initcheck, racecheck, synccheck   compute-sanitizer's other tools on the quick smoke run
#   fuzz       tools/fuzz_reference.py --device cuda: random cases against the reference, 30 s
#              through the fused operator, 20 s through SyncLpBatchNorm's (composite) stages
#   nvidia-smi the GPU's state at the end
# $OUT/summary.md lists each step's status, time and last line; it is also printed.
# --quick: a short benchmark and the quick smoke run everywhere (about half the time).
# --steps: only these (env and build still run unless --skip-build), e.g. a second call
# `--steps memcheck,initcheck,racecheck,synccheck` for what the budget skipped in the first.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
rm -f "$OUT"/.done-*
BUDGET=540
SKIP_BUILD=0
QUICK=0
STEPS=",smoke,tests,bench,memcheck,initcheck,racecheck,synccheck,fuzz,nvidia-smi,"
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) SKIP_BUILD=1 ;;
    --budget) BUDGET=$2; shift ;;
    --quick) QUICK=1 ;;
    --steps) STEPS=",$2,"; shift ;;
    *) echo "gpu_session: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer; do
  [ -n "$SANITIZER" ] && break
  [ -x "$candidate" ] && SANITIZER=$candidate
done

SUMMARY="$OUT/summary.md"
printf '# GPU session %s\n\n| step | status | seconds | last line |\n|---|---|---|---|\n' "$(date -u +%FT%TZ)" > "$SUMMARY"
record() {  # step status seconds log
  local last=""
  [ -f "$4" ] && last=$(grep -v '^\s*$' "$4" | tail -n1 | cut -c1-160 | tr '|' '/')
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$last" >> "$SUMMARY"
  echo "gpu_session: $1: $2 (${3}s)"
}

# step NAME CAP COMMAND: runs COMMAND (a bash string) in the repo root with at most CAP seconds
# and what is left of the budget, output to $OUT/NAME.log.
step() {
  local name=$1 cap=$2 command=$3
  local log="$OUT/$name.log" left=$(( BUDGET - SECONDS ))
  case "$name" in env|build) ;; *) [[ "$STEPS" == *",$name,"* ]] || return 0 ;; esac
  [ -f "$OUT/.done-$name" ] && return 0  # memcheck may have run early
  touch "$OUT/.done-$name"
  if [ "$left" -lt 20 ]; then
    echo "skipped: the session's budget (${BUDGET}s) is spent" > "$log"
    record "$name" "SKIPPED (budget)" 0 "$log"
    return
  fi
  local limit=$(( cap < left ? cap : left )) start=$SECONDS
  echo "\$ $command   (limit ${limit}s)" > "$log"
  # SIGINT first (pytest and Python print what they have), SIGKILL 15 s later.
  timeout -s INT -k 15 "$limit" bash -c "$command" >> "$log" 2>&1
  local rc=$? status
  case $rc in
    0) status=ok ;;
    124|130|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  record "$name" "$status" $(( SECONDS - start )) "$log"
}

installed_with_cuda() {  # lpnorm importable (from outside the tree) and built with CUDA
  (cd /tmp && "$PYTHON" -c "import lpnorm, sys; sys.exit(0 if lpnorm.build_info()['cuda'] else 1)") >/dev/null 2>&1
}

step env 30 "nvidia-smi; $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; nvcc --version | tail -n2; ${SANITIZER:-echo no compute-sanitizer} --version | head -n2; nproc"

if [ "$SKIP_BUILD" = 1 ] || { [ "${LPNORM_REBUILD:-0}" != 1 ] && [ -d build/gpu ] && installed_with_cuda; }; then
  echo "build skipped (--skip-build, or already installed with CUDA from build/gpu)" > "$OUT/build.log"
  record build "skipped" 0 "$OUT/build.log"
else
  step build 330 "TORCH_CUDA_ARCH_LIST=9.0 LPNORM_CUDA=ON $PYTHON -m pip install -v --no-build-isolation --no-deps -C build-dir=build/gpu . && cd /tmp && $PYTHON -c 'import lpnorm; print(lpnorm.__file__, lpnorm.build_info())'"
fi

if ! installed_with_cuda; then
  echo "lpnorm with CUDA is not importable: nothing else can run" > "$OUT/stop.log"
  record stop "STOPPED" 0 "$OUT/stop.log"
  rm -f "$OUT"/.done-*
  cat "$SUMMARY"
  exit 1
fi

SMOKE="$PYTHON tools/cuda_smoke.py"
[ "$QUICK" = 1 ] && SMOKE="$SMOKE --quick"
memcheck() {
  if [ -n "$SANITIZER" ]; then
    step memcheck 150 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool memcheck --error-exitcode 86 --print-limit 30 $SMOKE"
  else
    echo "no compute-sanitizer found" > "$OUT/memcheck.log"; record memcheck "SKIPPED" 0 "$OUT/memcheck.log"
  fi
}
step smoke 60 "$SMOKE"
grep -q '^| smoke | ok' "$SUMMARY" || memcheck
step tests 200 "$PYTHON -m pytest tests -m cuda -q -p no:cacheprovider -rfEs --durations=15 --maxfail=100 --junitxml=$OUT/tests.xml"
BENCH="$PYTHON benchmarks/bench_gpu.py --verbose --out $OUT/bench"
[ "$QUICK" = 1 ] && BENCH="$BENCH --quick"
step bench 150 "$BENCH"
memcheck
if [ -n "$SANITIZER" ]; then
  step initcheck 60 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool initcheck --error-exitcode 86 --print-limit 30 $PYTHON tools/cuda_smoke.py --quick"
  step racecheck 60 "$SANITIZER --tool racecheck --error-exitcode 86 --print-limit 30 $PYTHON tools/cuda_smoke.py --quick"
  step synccheck 45 "$SANITIZER --tool synccheck --error-exitcode 86 --print-limit 30 $PYTHON tools/cuda_smoke.py --quick"
fi
FUZZ="$PYTHON tools/fuzz_reference.py --device cuda --max-elements 200000"
step fuzz 70 "$FUZZ --seconds 30; fused=\$?; $FUZZ --path stages --seconds 20; exit \$((fused | \$?))"
step nvidia-smi 20 "nvidia-smi -q -d MEMORY,UTILIZATION,CLOCK,PERFORMANCE | head -n 80"

echo >> "$SUMMARY"
[ -f "$OUT/bench.md" ] && grep -A1000 '^Targets' "$OUT/bench.md" >> "$SUMMARY"
grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/tests.log" 2>/dev/null | tail -n 40 | sed 's/^/    /' >> "$SUMMARY"
rm -f "$OUT"/.done-*
cat "$SUMMARY"
