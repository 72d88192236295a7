"""CPU speed of lpnorm's batch norm against torch's, a clone of the input and the composite
PyTorch L1 batch norm (mean, absolute deviation, divide: what the paper's code does).

Every row is measured in one process, the contenders interleaved block by block (blocks of
~20 ms, the fastest block of each kept), so the ratios hold on a busy machine even when the
absolute times do not. Training mode (batch statistics, running statistics updated), affine.

    python benchmarks/bench_cpu.py                       # the table of docs/cpu-performance.md
    python benchmarks/bench_cpu.py --quick               # fewer rounds, float32 only
    LPNORM_CPU_ISA=avx2 python benchmarks/bench_cpu.py   # another kernel build
    LPNORM_CPU_SCHEDULE=split python benchmarks/bench_cpu.py --shapes nchw-56   # schedule choice
    # glibc's malloc keeps its pages (no page faults: steadier (256, 1024) rows):
    MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 python benchmarks/bench_cpu.py --shapes 1d
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

import lpnorm

CPU_TIME = False  # --cpu-time: one thread, timed by its CPU time (robust on a shared machine)

SHAPES = {
    "nchw-56": ((32, 64, 56, 56), torch.contiguous_format),
    "nhwc-56": ((32, 64, 56, 56), torch.channels_last),
    # not in issue 3's list: a channels-last ResNet stage with more channels per row
    "nhwc-28": ((32, 256, 28, 28), torch.channels_last),
    "nchw-14": ((128, 256, 14, 14), torch.contiguous_format),
    "nchw-32": ((64, 32, 32, 32), torch.contiguous_format),
    "1d": ((256, 1024), torch.contiguous_format),
}
NORMS = {"l2": dict(norm="l2"), "l1": dict(norm="l1"), "linf": dict(norm="linf"), "topk": dict(norm="topk", k=10)}


def composite_l1(x, running_mean, running_var, weight, bias, eps=1e-5):
    """The paper's L1 batch norm in plain PyTorch ops (its running statistics left out)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    scale = d.abs().mean(dim=dims, keepdim=True) * math.sqrt(math.pi / 2)
    return d / (scale + eps) * weight.view(shape) + bias.view(shape)


def contenders(norms):
    out = {"torch": lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, training=True)}
    for name in norms:
        kwargs = NORMS[name]
        out[name] = (lambda kw: lambda x, rm, rv, w, b: lpnorm.functional.batch_norm(
            x, rm, rv, w, b, training=True, **kw))(kwargs)
    out["composite-l1"] = composite_l1
    return out


def make_inputs(shape, memory_format, dtype):
    x = torch.randn(shape, dtype=torch.float32).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=memory_format)
    C = shape[1]
    params = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = torch.rand(C, dtype=params) + 0.5
    b = torch.randn(C, dtype=params)
    g = torch.randn(shape, dtype=torch.float32).to(dtype)
    if len(shape) == 4:
        g = g.contiguous(memory_format=memory_format)
    return x, w, b, g


def statements(fn, x, w, b, g):
    """(forward, forward+backward) callables."""
    C = x.shape[1]
    rm, rv = torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype)
    xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            fn(x, rm, rv, w, b)

    def forward_backward():
        xg.grad = wg.grad = bg.grad = None
        fn(xg, rm, rv, wg, bg).backward(g)

    return forward, forward_backward


def measure(stmts, rounds, min_run_time):
    """{name: seconds}: each round times every statement in short blocks, one block of each in
    turn (a burst of other work then slows every contender alike, not the one whose blocks it
    fell on); the fastest block over all rounds is kept, the estimate least disturbed by other
    processes."""
    clock = time.thread_time if CPU_TIME else time.perf_counter
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=clock)
              for name, fn in stmts.items()}
    number = {name: max(1, int(0.02 / max(t.timeit(1).mean, 1e-6))) for name, t in timers.items()}
    best = {}
    blocks = max(1, int(min_run_time / 0.02))
    for _ in range(rounds):
        for _ in range(blocks):
            for name, timer in timers.items():
                best[name] = min(best.get(name, math.inf), timer.timeit(number[name]).mean)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=list(NORMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round, float32 only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="1 thread, timed by the thread's CPU time: time other processes take is not counted")
    args = parser.parse_args()
    global CPU_TIME
    if args.cpu_time:
        CPU_TIME, args.threads = True, 1
    if args.quick:
        args.rounds, args.dtypes, args.min_run_time = 1, ["float32"], 0.2
    torch.set_num_threads(args.threads)

    print(f"lpnorm cpu isa {lpnorm._C.cpu_isa()} (of {', '.join(lpnorm._C.supported_cpu_isas())}), "
          f"schedule {os.environ.get('LPNORM_CPU_SCHEDULE', 'auto')}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} rounds, {'thread CPU time' if CPU_TIME else 'wall clock'}")
    print()
    header = ["shape", "dtype", "pass", "clone", "torch"] + [f"{n} /torch" for n in args.norms] + \
             [f"{n} /clone" for n in args.norms] + ["composite-l1 /l1" if "l1" in args.norms else "composite-l1"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for shape_name in args.shapes:
        shape, memory_format = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            x, w, b, g = make_inputs(shape, memory_format, dtype)
            stmts_f, stmts_fb = {"clone": lambda: x.clone(memory_format=torch.preserve_format)}, {}
            for name, fn in contenders(args.norms).items():
                stmts_f[name], stmts_fb[name] = statements(fn, x, w, b, g)
            timings = {"forward": measure(stmts_f, args.rounds, args.min_run_time),
                       "fwd+bwd": measure(stmts_fb, args.rounds, args.min_run_time)}
            clone = timings["forward"]["clone"]
            for pass_name, t in timings.items():
                row = [shape_name, dtype_name, pass_name, f"{clone * 1e3:.2f} ms", f"{t['torch'] * 1e3:.2f} ms"]
                row += [f"{t[n] / t['torch']:.2f}" for n in args.norms]
                row += [f"{t[n] / clone:.2f}" for n in args.norms]
                base = t["l1"] if "l1" in args.norms else 1.0
                row += [f"{t['composite-l1'] / base:.1f}x" if "l1" in args.norms else f"{t['composite-l1'] * 1e3:.2f} ms"]
                row[4] = f"{t['torch'] * 1e3:.2f} ms ({t['torch'] / clone:.1f} clones)"
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
