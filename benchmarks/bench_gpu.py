"""GPU self-test and benchmark of lpnorm's CUDA kernels against torch's batch norm (cuDNN).

One command on a machine with a GPU and a CUDA build of lpnorm:

    python benchmarks/bench_gpu.py                 # self-test, then the benchmark table
    python benchmarks/bench_gpu.py --check-only    # the self-test alone
    python benchmarks/bench_gpu.py --json out.json # also write the numbers
    python benchmarks/bench_gpu.py --out bench     # bench.md (table, targets) and bench.json

The self-test compares every norm, dtype and layout against lpnorm's CPU kernels on the same
data (outputs, saved statistics, running statistics, all three gradients) and checks that two
runs give bit-identical results. The benchmark times training forward and forward+backward of
L2, L1, L-inf and top-k (k=10) against torch.nn.functional.batch_norm for the issue's shapes in
float16, bfloat16 and float32, NCHW and NHWC, and measures the device copy bandwidth in the same
run, so each time can be read as a multiple of the memory traffic floor.

Without CUDA (or without lpnorm's CUDA kernels) it says so and exits 0.
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [(32, 64, 56, 56), (128, 256, 14, 14), (256, 256, 28, 28)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICE = "cuda"  # --harness-on-cpu runs the self-test harness CPU against CPU
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

CHECK_NORMS = [
    dict(norm="l2"), dict(norm="l1"), dict(norm="linf"), dict(norm="topk", k=10),
    dict(norm="topk", k=3, chunks=2), dict(norm="range", chunks=2), dict(norm="p", p=3.0),
    dict(norm="linf", constant="paper"), dict(norm="topk", k=32),
]
# (rtol, atol) of CUDA against CPU per dtype: halves accumulate in float32 on the GPU and in
# float64 on the CPU, and their outputs are rounded to 8 or 11 bits.
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
             torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def cuda_kernels_available():
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        import lpnorm  # noqa: F401
    except Exception as error:  # pragma: no cover - reported, not raised
        return f"cannot import lpnorm: {error}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lpnorm::batch_norm_forward", "CUDA"):
        return "lpnorm was built without CUDA kernels (rebuild with LPNORM_CUDA=ON)"
    return None


# ---------------------------------------------------------------------------------------------
# Self-test

def run_once(x, weight, bias, norm_kwargs, training=True):
    """Forward (training, with running stats) and backward; everything as a dict of tensors."""
    import lpnorm.functional as LF
    channels = x.shape[1]
    rm = torch.zeros(channels, device=x.device, dtype=weight.dtype)
    rv = torch.ones(channels, device=x.device, dtype=weight.dtype)
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    y = LF.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5, **norm_kwargs)
    g = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=torch.float32).reshape(y.shape).to(y.dtype)
    y.backward(g)
    saved = torch.ops.lpnorm.batch_norm_forward(
        x.detach(), w.detach(), b.detach(), None, None, training, 0.1, 1e-5, norm_kwargs["norm"],
        norm_kwargs.get("k", 10), norm_kwargs.get("p", 2.0), norm_kwargs.get("chunks", 1),
        norm_kwargs.get("constant", "exact"))
    out = dict(y=y, grad_x=x.grad, grad_w=w.grad, grad_b=b.grad, running_mean=rm, running_var=rv)
    for name, tensor in zip(["save_mean", "save_invstd", "save_coef", "sparse_index", "sparse_coef"], saved[1:]):
        out[name] = tensor
    return out


def self_test(verbose=False):
    failures = []
    checks = 0
    torch.manual_seed(0)
    for dtype in [torch.float32, torch.float16, torch.bfloat16, torch.float64]:
        param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for layout_name, memory_format in LAYOUTS.items():
            for shape in [(8, 16, 12, 12), (6, 5, 7, 3), (16, 40)]:
                if len(shape) != 4 and layout_name == "nhwc":
                    continue
                for norm_kwargs in CHECK_NORMS:
                    m = shape[0] * (shape[2] * shape[3] if len(shape) == 4 else 1)
                    if norm_kwargs.get("k", 0) > m // norm_kwargs.get("chunks", 1):
                        continue
                    base = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
                    base = base.contiguous(memory_format=memory_format)
                    weight = torch.rand(shape[1], dtype=param_dtype) + 0.5
                    bias = torch.randn(shape[1], dtype=param_dtype)
                    cpu = run_once(base, weight, bias, norm_kwargs)
                    gpu = run_once(base.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), norm_kwargs)
                    again = run_once(base.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), norm_kwargs)
                    label = f"{dtype} {layout_name} {shape} {norm_kwargs}"
                    rtol, atol = TOLERANCE[dtype]
                    for name, expected in cpu.items():
                        got = gpu[name].cpu()
                        checks += 1
                        if name == "sparse_index":
                            # the same elements (ties broken alike); halves can legitimately
                            # differ only when two candidates are equal after rounding
                            ok = torch.equal(got, expected) or dtype in (torch.float16, torch.bfloat16)
                        else:
                            ok = got.shape == expected.shape and torch.allclose(
                                got.double(), expected.double(), rtol=rtol, atol=atol * (
                                    10 if name.startswith("grad") else 1), equal_nan=True)
                        if not ok:
                            failures.append(f"{label}: {name} differs from the CPU "
                                            f"(max abs diff {(got.double() - expected.double()).abs().max():.3g})")
                        if not torch.equal(gpu[name], again[name]) and not (
                                gpu[name].is_floating_point() and torch.equal(gpu[name].isnan(), again[name].isnan())
                                and torch.equal(gpu[name].nan_to_num(), again[name].nan_to_num())):
                            failures.append(f"{label}: {name} not bit-identical run to run")
                    if verbose:
                        print("ok" if not failures else "..", label)
    # NaN propagates and never crashes a kernel
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    x[1, 2, 3, 4] = float("nan")
    for norm_kwargs in CHECK_NORMS:
        y = run_once(x, torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE), norm_kwargs)["y"]
        checks += 1
        if not y[:, 2].isnan().all() or y[:, :2].isnan().any():
            failures.append(f"NaN in channel 2 with {norm_kwargs}: not confined to channel 2")
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return checks, failures


# ---------------------------------------------------------------------------------------------
# Benchmark

# The targets of the performance issue: time of lpnorm / time of torch's batch norm (cuDNN where
# torch uses it) at most this, per norm; and large float16 tensors moving their minimal traffic
# at >= 80% of the device's copy bandwidth measured in the same run.
NORM_ARGS = {"l2": dict(norm="l2"), "l1": dict(norm="l1"), "linf": dict(norm="linf"),
             "topk": dict(norm="topk", k=10)}
TARGET_RATIO = {"l2": 1.0, "l1": 1.1, "linf": 1.3, "topk": 1.3}
TARGET_BANDWIDTH = 0.8
LARGE_BYTES = 64 << 20  # "large": a float16 input of at least 64 MiB (the (256, 256, 28, 28) one)
FLUSH_BYTES = 256 << 20  # more than any GPU's L2 (H100: 50 MB): every timed call starts cold


def time_ms(fn, warmup=3, repeat=20):
    """Median GPU time of fn in ms, from CUDA events around each call. Before each call a sleep
    kernel keeps the GPU busy while the host enqueues the call (so host-side dispatch cost is
    not counted: this measures the kernels), and an L2-sized write evicts the previous call's
    data (so a small tensor is not timed out of the cache)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)  # ~1 ms at 2 GHz: longer than the host needs to enqueue fn
        flush.zero_()
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device-to-device copy: read + write of nbytes, in GB/s."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), warmup=2, repeat=10)
    del a, b
    return 2 * nbytes / (ms * 1e-3) / 1e9


def benchmark(norms=("l2", "l1", "linf", "topk"), shapes=SHAPES, dtypes=tuple(DTYPES), repeat=20):
    """Rows of (shape, dtype, layout, pass, impl): ms, ratio to torch, achieved GB/s of the
    minimal traffic and its fraction of the copy bandwidth, and the targets met or not."""
    import lpnorm.functional as LF
    rows = []
    bandwidth = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for layout_name, memory_format in LAYOUTS.items():
                x = torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
                channels = shape[1]
                # float32 parameters and statistics for every input dtype (torch's mixed mode)
                weight = torch.ones(channels, device=DEVICE, requires_grad=True)
                bias = torch.zeros(channels, device=DEVICE, requires_grad=True)
                rm = torch.zeros(channels, device=DEVICE)
                rv = torch.ones(channels, device=DEVICE)
                grad = torch.randn_like(x)
                xg = x.detach().requires_grad_(True)

                def torch_fwd():
                    return F.batch_norm(x, rm, rv, weight, bias, training=True)

                def torch_fwd_bwd():
                    F.batch_norm(xg, rm, rv, weight, bias, training=True).backward(grad)

                impls = {"torch": (torch_fwd, torch_fwd_bwd)}
                for norm in norms:
                    def fwd(kwargs=NORM_ARGS[norm]):
                        return LF.batch_norm(x, rm, rv, weight, bias, training=True, **kwargs)

                    def fwd_bwd(kwargs=NORM_ARGS[norm]):
                        LF.batch_norm(xg, rm, rv, weight, bias, training=True, **kwargs).backward(grad)

                    impls[norm] = (fwd, fwd_bwd)
                # Minimal traffic: forward reads x and writes y; backward reads x and dy and
                # writes dx (statistics passes re-reading x are the kernels' cost, not the floor).
                floor_bytes = {"forward": 2 * x.numel() * x.element_size(),
                               "fwd+bwd": 5 * x.numel() * x.element_size()}
                large = dtype == torch.float16 and x.numel() * x.element_size() >= LARGE_BYTES
                baseline = {}
                for impl, fns in impls.items():
                    for pass_name, fn in zip(["forward", "fwd+bwd"], fns):
                        with torch.no_grad() if pass_name == "forward" else torch.enable_grad():
                            ms = time_ms(fn, repeat=repeat)
                        if impl == "torch":
                            baseline[pass_name] = ms
                        ratio = ms / baseline[pass_name]
                        gbs = floor_bytes[pass_name] / (ms * 1e-3) / 1e9
                        target = TARGET_RATIO.get(impl)
                        row = dict(shape=list(shape), dtype=dtype_name, layout=layout_name, pass_=pass_name,
                                   impl=impl, ms=ms, vs_torch=ratio, floor_gbs=gbs, copy_gbs=bandwidth,
                                   of_copy=gbs / bandwidth, target_ratio=target,
                                   ratio_ok=None if target is None else ratio <= target,
                                   bandwidth_ok=(gbs / bandwidth >= TARGET_BANDWIDTH) if large and impl != "torch"
                                   else None)
                        rows.append(row)
                        print(format_row(row), flush=True)
                del x, grad, xg
    return rows


COLUMNS = ["shape", "dtype", "layout", "pass", "impl", "ms", "x torch", "target", "GB/s", "% copy", "bw>=80%"]


def format_cells(row):
    def mark(ok):
        return "-" if ok is None else ("yes" if ok else "NO")
    target = "" if row["target_ratio"] is None else f"<={row['target_ratio']:.1f} {mark(row['ratio_ok'])}"
    return ["x".join(map(str, row["shape"])), row["dtype"], row["layout"], row["pass_"], row["impl"],
            f"{row['ms']:.4f}", f"{row['vs_torch']:.2f}", target, f"{row['floor_gbs']:.0f}",
            f"{100 * row['of_copy']:.0f}", mark(row["bandwidth_ok"])]


def format_row(row):
    widths = [16, 8, 5, 7, 5, 8, 7, 10, 6, 6, 7]
    return " ".join(f"{cell:>{width}}" for cell, width in zip(format_cells(row), widths))


def markdown(rows, header_lines):
    """The table as markdown, then the targets missed (or that all were met)."""
    lines = list(header_lines) + ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_cells(row)) + " |" for row in rows]
    missed = [row for row in rows if row["ratio_ok"] is False or row["bandwidth_ok"] is False]
    checked = [row for row in rows if row["ratio_ok"] is not None or row["bandwidth_ok"] is not None]
    lines += ["", f"Targets: l2 <= 1.0x, l1 <= 1.1x, linf/topk <= 1.3x torch; large float16 inputs "
                  f">= {TARGET_BANDWIDTH:.0%} of the copy bandwidth. {len(checked) - len(missed)} of "
                  f"{len(checked)} rows meet theirs."]
    if missed:
        lines += ["", "Missed:", ""] + ["- " + " ".join(format_cells(row)) for row in missed]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true", help="run the self-test only")
    parser.add_argument("--no-check", action="store_true", help="skip the self-test")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--json", help="write the benchmark rows to this file")
    parser.add_argument("--out", help="write the benchmark as OUT.md (markdown table, targets) and "
                                      "OUT.json (the rows)")
    parser.add_argument("--quick", action="store_true",
                        help="one shape, float16 only, fewer repeats (a smoke run of the benchmark)")
    parser.add_argument("--harness-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.harness_on_cpu:  # exercises the self-test's own code where there is no GPU
        global DEVICE
        DEVICE = "cpu"
        checks, failures = self_test(args.verbose)
        print(f"self-test (CPU against CPU): {checks} checks, {len(failures)} failures")
        return 1 if failures else 0

    reason = cuda_kernels_available()
    if reason is not None:
        print(f"bench_gpu: skipped ({reason})")
        return 0
    status = 0
    if not args.no_check:
        checks, failures = self_test(args.verbose)
        for failure in failures:
            print("FAIL", failure)
        print(f"self-test: {checks} checks, {len(failures)} failures", flush=True)
        status = 1 if failures else 0
        if args.check_only:
            return status
    if args.quick:
        rows = benchmark(shapes=SHAPES[-1:], dtypes=("float16",), repeat=5)
    else:
        rows = benchmark()
    header = [f"# lpnorm CUDA benchmark: {torch.cuda.get_device_name()}, torch {torch.__version__}",
              "", f"Training-mode batch norm, float32 parameters; GPU time per call (CUDA events, median, "
              f"cold L2); copy bandwidth {rows[0]['copy_gbs']:.0f} GB/s (read + write) measured in the same run. "
              "GB/s: the minimal traffic (forward 2, fwd+bwd 5 tensor passes) over the time."]
    for path, text in ((args.json, None), (args.out and args.out + ".json", None),
                       (args.out and args.out + ".md", markdown(rows, header))):
        if path:
            with open(path, "w") as f:
                f.write(text if text is not None else json.dumps(rows, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
