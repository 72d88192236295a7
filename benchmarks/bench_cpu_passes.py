"""CPU speed of lpnorm's single passes over a channels-last tensor, against torch's x.sum() and
y.copy_(x) of the same tensor: how close each pass comes to the memory's speed.

The passes are the stage operators that SyncLpBatchNorm calls between its all-reduces; the
fused training operator runs the same kernels (collect = the statistics pass, with top-k lists
for linf and topk; deviations = l1's second pass; reduce_grad = the backward's sums over grad
and x; apply = the element pass writing y). The stage operators run each pass over the split
schedule's tiles, as the fused operator does: row blocks of all channels, spans of 64 channels
for the top-k lists (one thread carries a span's lists through its row blocks). One thread,
all contenders interleaved round by round in one process, the best round kept: the ratios hold
on a busy machine even when the absolute times move.

    python benchmarks/bench_cpu_passes.py                     # C = 64, 128, 256, 512, ~25 MB
    python benchmarks/bench_cpu_passes.py --channels 64 --dtype bfloat16
    LPNORM_CPU_ISA=avx2 python benchmarks/bench_cpu_passes.py
"""
import argparse
import time

import torch

import lpnorm  # noqa: F401  (registers torch.ops.lpnorm)

# (N, C, H, W) of about 25 MB of float32 for each channel count.
SHAPES = {64: (32, 64, 56, 56), 128: (32, 128, 40, 40), 256: (32, 256, 28, 28), 512: (32, 512, 20, 20),
          1024: (32, 1024, 14, 14)}


def contenders(x, g):
    C = x.shape[1]
    ops = torch.ops.lpnorm
    mean = torch.zeros(C, dtype=torch.float64)
    invstd = torch.ones(C, dtype=torch.float64)
    y = torch.empty_like(x)
    return {
        "x.sum()": lambda: x.sum(),
        "y.copy_(x)": lambda: y.copy_(x),
        "collect l1": lambda: ops.batch_norm_collect(x, "l1", 1, 0),
        "collect linf": lambda: ops.batch_norm_collect(x, "linf", 1, 0),
        "collect topk": lambda: ops.batch_norm_collect(x, "topk", 10, 0),
        "deviations l1": lambda: ops.batch_norm_deviations(x, mean, "l1", 1.0),
        "reduce_grad": lambda: ops.batch_norm_reduce_grad(g, x, mean),
        "apply": lambda: ops.batch_norm_apply(x, mean, invstd, None, None),
    }


def measure(fns, rounds, calls):
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 512], choices=list(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    print(f"lpnorm cpu isa {lpnorm._C.cpu_isa()}, torch {torch.__version__}, 1 thread, {args.dtype}, "
          f"channels-last, best of {args.rounds} rounds of {args.calls} calls; ratios to x.sum() (the passes "
          f"that read) and to y.copy_(x) (apply, which writes)\n")
    print("| C | shape | x.sum() | y.copy_(x) | collect l1 | collect linf | collect topk | deviations l1 | "
          "reduce_grad | apply |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for C in args.channels:
        shape = SHAPES[C]
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        best = measure(contenders(x, g), args.rounds, args.calls)
        read, copy = best["x.sum()"], best["y.copy_(x)"]
        cells = [f"{best[name] / read:.2f}" for name in ("collect l1", "collect linf", "collect topk",
                                                          "deviations l1", "reduce_grad")]
        print(f"| {C} | {tuple(shape)} | {read * 1e3:.2f} ms | {copy * 1e3:.2f} ms | " + " | ".join(cells) +
              f" | {best['apply'] / copy:.2f} |")


if __name__ == "__main__":
    main()
