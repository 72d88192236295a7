"""lpnorm's CPU operators against torch's on the batch-norm shapes of ResNet-50 at one batch size.

Each row times one training forward and one backward operator call back to back (lpnorm's
batch_norm_forward and batch_norm_backward; torch's native_batch_norm and
native_batch_norm_backward), without autograd, whose own cost both would share. The
contenders of a row are interleaved block by block and the fastest block of each is kept.

    python benchmarks/bench_cpu_resnet.py                    # batch 8, float32, both layouts
    python benchmarks/bench_cpu_resnet.py --batch 1 --dtype bfloat16 --norms l2 l1
"""
import argparse

import torch
import torch.utils.benchmark as benchmark

import lpnorm  # noqa: F401  (registers torch.ops.lpnorm)

# (channels, height = width) of every batch-norm layer shape in ResNet-50.
STAGES = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14), (1024, 14),
          (512, 14), (512, 7), (2048, 7)]
K = 10  # top-k's k, the paper's


def contenders(x, norms):
    C = x.shape[1]
    params = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    w, b = torch.rand(C, dtype=params) + 0.5, torch.randn(C, dtype=params)
    rm, rv = torch.zeros(C, dtype=params), torch.ones(C, dtype=params)
    g = torch.randn_like(x)
    _, save_mean, save_invstd = torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)

    def torch_step():
        torch.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        torch.ops.aten.native_batch_norm_backward(g, x, w, rm, rv, save_mean, save_invstd, True, 1e-5,
                                                  [True, True, True])

    out = {"torch": torch_step}
    for norm in norms:
        saved = torch.ops.lpnorm.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, norm, K, 2.0, 1, "exact")

        def step(norm=norm, saved=saved):
            torch.ops.lpnorm.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, norm, K, 2.0, 1, "exact")
            torch.ops.lpnorm.batch_norm_backward(g, x, w, *saved[1:], True, norm, 2.0)

        out[norm] = step
    return out


def fastest(stmts, rounds):
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for name, fn in stmts.items()}
    number = {name: max(1, int(0.01 / max(t.timeit(2).mean, 1e-7))) for name, t in timers.items()}
    best = {}
    for _ in range(rounds):
        for name, timer in timers.items():
            best[name] = min(best.get(name, float("inf")), timer.timeit(number[name]).mean)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--norms", nargs="+", default=["l2", "l1", "linf", "topk"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"lpnorm cpu isa {lpnorm._C.cpu_isa()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.dtype}, forward+backward operators, time / torch's\n")
    print("| shape | layout | torch | " + " | ".join(args.norms) + " |")
    print("|---|---|---|" + "---|" * len(args.norms))
    for channels, size in STAGES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(args.batch, channels, size, size).to(dtype).contiguous(memory_format=layout)
            if K > x.numel() // channels:
                continue
            best = fastest(contenders(x, args.norms), args.rounds)
            ratios = " | ".join(f"{best[n] / best['torch']:.2f}" for n in args.norms)
            name = "NCHW" if layout == torch.contiguous_format else "NHWC"
            print(f"| ({args.batch},{channels},{size},{size}) | {name} | {best['torch'] * 1e6:.0f} us | {ratios} |",
                  flush=True)


if __name__ == "__main__":
    main()
