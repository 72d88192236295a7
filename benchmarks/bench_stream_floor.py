"""How close lpnorm's CPU batch norm is to the machine's stream rate, and why a clone is a
moving yardstick for it.

A training step's batch norm must at least read x for the statistics, read x and write y,
then read x and grad for the backward's sums, and read both again to write grad_input: four
passes, eight tensor-sized streams (a clone is two). This script compiles those four passes as
plain C loops (OpenMP over rows, the compiler's vectors, once with ordinary stores and once
with streaming stores for y and grad_input, as lpnorm writes outputs of 4 MiB and more) and
times them in one process against x.clone(), torch's batch norm and lpnorm's l2 and l1,
interleaved round by round. Medians in ms, and each contender's ratio to the clone and to the
floor with streaming stores.

    python benchmarks/bench_stream_floor.py                  # (32, 64, 56, 56) channels-last float32
    python benchmarks/bench_stream_floor.py --channels-first # the same tensor in NCHW

Needs a C compiler with OpenMP (`cc`, or $CC). The floor's loops treat the tensor as rows of C
channels whatever its layout (the traffic is the same; NCHW's planes would only be easier).
"""
import argparse
import ctypes
import os
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

import lpnorm
from bench_cpu import statements  # the same forward and forward+backward calls as bench_cpu.py

FLOOR_SOURCE = r"""
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#define C 64
#define V (C / 16)
typedef float vf __attribute__((vector_size(64)));

static void store(float* p, vf v, int stream) {
#if defined(__AVX512F__)
  if (stream) { _mm512_stream_ps(p, (__m512)v); return; }
#elif defined(__AVX2__)
  if (stream) {
    __m256 h[2];
    __builtin_memcpy(h, &v, sizeof v);
    _mm256_stream_ps(p, h[0]);
    _mm256_stream_ps(p + 8, h[1]);
    return;
  }
#endif
  __builtin_memcpy(p, &v, sizeof v);
}
static vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }

/* The rows [lo, hi) of this thread. */
#define ROWS(rows) int t = omp_get_thread_num(), n = omp_get_num_threads(); \
  long lo = (rows) * t / n, hi = (rows) * (t + 1) / n

static void sums(const float* x, const float* g, long rows, float* out) {
#pragma omp parallel
  {
    ROWS(rows);
    vf s[V] = {0}, q[V] = {0};
    for (long r = lo; r < hi; ++r) {
      for (int j = 0; j < V; ++j) {
        vf a = load(x + r * C + 16 * j);
        vf b = g ? load(g + r * C + 16 * j) : a;
        s[j] += b;
        q[j] += a * b;
      }
    }
    for (int j = 0; j < V; ++j) store(out + (t * V + j) * 16, s[j] + q[j], 0);  /* kept: not dead code */
  }
}

static void element(const float* x, const float* g, float* y, long rows, int stream) {
#pragma omp parallel
  {
    ROWS(rows);
    vf a = {0}, b = {0};
    for (int i = 0; i < 16; ++i) a[i] = 1.0f + i / 64.0f, b[i] = 0.25f - i / 32.0f;
    for (long r = lo; r < hi; ++r) {
      for (int j = 0; j < V; ++j) {
        vf v = load(x + r * C + 16 * j) * a + b;
        if (g) v += load(g + r * C + 16 * j) * b;
        store(y + r * C + 16 * j, v, stream);
      }
    }
#if defined(__AVX512F__) || defined(__AVX2__)
    _mm_sfence();
#endif
  }
}

void floor_forward(const float* x, float* y, long rows, int stream, float* out) {
  sums(x, 0, rows, out);
  element(x, 0, y, rows, stream);
}

void floor_forward_backward(const float* x, const float* g, float* y, float* dx, long rows, int stream,
                            float* out) {
  floor_forward(x, y, rows, stream, out);
  sums(x, g, rows, out);
  element(x, g, dx, rows, stream);
}

void floor_threads(int n) { omp_set_num_threads(n); }
"""


def build_floor(directory):
    source = os.path.join(directory, "floor.c")
    library = os.path.join(directory, "libfloor.so")
    with open(source, "w") as f:
        f.write(FLOOR_SOURCE)
    compiler = os.environ.get("CC", "cc")
    subprocess.run([compiler, "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC", source, "-o", library],
                   check=True)
    lib = ctypes.CDLL(library)
    lib.floor_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    lib.floor_forward_backward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    lib.floor_threads.argtypes = [ctypes.c_int]
    return lib


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels-first", action="store_true", help="NCHW instead of channels-last")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5, help="calls per contender and round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = (32, 64, 56, 56)
    layout = torch.contiguous_format if args.channels_first else torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=layout)
    g = torch.randn(shape).contiguous(memory_format=layout)
    channels = shape[1]
    rows = x.numel() // channels
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)

    with tempfile.TemporaryDirectory() as directory:
        lib = build_floor(directory)
        lib.floor_threads(args.threads)
        scratch = torch.empty(4096)

        def floor(stream, backward):
            def run():
                y = torch.empty_like(x)
                if backward:
                    dx = torch.empty_like(x)
                    lib.floor_forward_backward(x.data_ptr(), g.data_ptr(), y.data_ptr(), dx.data_ptr(), rows, stream,
                                               scratch.data_ptr())
                else:
                    lib.floor_forward(x.data_ptr(), y.data_ptr(), rows, stream, scratch.data_ptr())
            return run

        def norm(fn, backward):
            return statements(fn, x, weight, bias, g)[1 if backward else 0]

        batch_norms = {
            "torch": lambda *a: F.batch_norm(*a, training=True),
            "lpnorm l2": lambda *a: lpnorm.functional.batch_norm(*a, training=True, norm="l2"),
            "lpnorm l1": lambda *a: lpnorm.functional.batch_norm(*a, training=True, norm="l1"),
        }
        print(f"{tuple(shape)} {'NCHW' if args.channels_first else 'channels-last'} float32, {args.threads} threads, "
              f"{args.rounds} rounds of {args.calls} calls; medians")
        for backward in (False, True):
            contenders = {"clone": lambda: x.clone(memory_format=torch.preserve_format),
                          "floor": floor(0, backward), "floor, streaming stores": floor(1, backward)}
            contenders.update({name: norm(fn, backward) for name, fn in batch_norms.items()})
            times = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    fn()
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            print(f"\n{'forward+backward' if backward else 'forward'}")
            print("| contender | ms | /clone | /floor (streaming) |")
            print("|---|---:|---:|---:|")
            for name, t in median.items():
                print(f"| {name} | {t * 1e3:.3f} | {t / median['clone']:.2f} | "
                      f"{t / median['floor, streaming stores']:.2f} |")


if __name__ == "__main__":
    main()
