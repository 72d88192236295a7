"""python -m lpnorm bench: lpnorm's kernels against torch's batch norm.

Every norm of the library, torch's own batch norm (the baseline of every ratio) and the
composite PyTorch L1 batch norm as the paper's code writes it (mean, mean absolute deviation
times sqrt(pi/2), divide), each in training mode (batch statistics, running statistics
updated), forward alone and forward + backward, over input dtypes, memory formats and devices.
Times are medians of torch.utils.benchmark's blocked_autorange; ratios are time / torch's.
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import lpnorm

from . import _cli_args as cli

BASELINE = "torch bn"

# name -> lpnorm keyword arguments (None: not an lpnorm kernel)
IMPLEMENTATIONS: Dict[str, Optional[dict]] = {
    BASELINE: None,
    "composite l1": None,
    "l2": dict(norm="l2"),
    "l1": dict(norm="l1"),
    "linf": dict(norm="linf"),
    "topk k=10": dict(norm="topk", k=10),
    "range": dict(norm="range"),
    "p=3": dict(norm="p", p=3.0),
}

SHAPES = {  # default sweep: a mid conv layer, a late conv layer, a fully connected layer
    "full": [(64, 64, 28, 28), (128, 256, 7, 7), (512, 1024)],
    "quick": [(32, 64, 28, 28)],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
FORMATS = ("contiguous", "channels_last")
PASSES = ("forward", "forward+backward")


def composite_l1(x, running_mean, running_var, weight, bias, momentum=0.1, eps=1e-5):
    """L1 batch norm out of PyTorch operators, as the paper's code does it: the batch mean, the
    mean absolute deviation times sqrt(pi/2) as the scale, a division; running statistics
    updated like torch's (unbiased variance estimate scale^2 * m / (m - 1))."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    scale = centered.abs().mean(dims, keepdim=True) * math.sqrt(math.pi / 2)
    out = centered / (scale + eps)
    with torch.no_grad():
        m = x.numel() // x.shape[1]
        running_mean.mul_(1 - momentum).add_(mean.reshape(-1).to(running_mean.dtype), alpha=momentum)
        unbiased = scale.reshape(-1).to(running_var.dtype).square() * (m / (m - 1))
        running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    return out * weight.to(x.dtype).view(view) + bias.to(x.dtype).view(view)


def make_forward(name: str) -> Callable:
    """(x, running_mean, running_var, weight, bias) -> y, training mode, momentum 0.1."""
    if name == BASELINE:
        return lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    if name == "composite l1":
        return composite_l1
    options = IMPLEMENTATIONS[name]
    return lambda x, rm, rv, w, b: lpnorm.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, **options)


@dataclass
class Result:
    device: str
    shape: str
    dtype: str
    memory_format: str
    pass_: str
    impl: str
    median_s: float
    iqr_s: float
    runs: int
    ratio: Optional[float] = None  # median / torch bn's median under the same configuration


def memory_format_of(name: str, dim: int):
    if name == "contiguous":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[dim]


def configurations(shapes, dtypes, formats, devices):
    for device in devices:
        for shape in shapes:
            for dtype in dtypes:
                for fmt in formats:
                    if fmt != "contiguous" and len(shape) not in (4, 5):
                        continue  # channels-last exists for 4-d and 5-d tensors only
                    yield device, shape, dtype, fmt


def measure(fn: Callable, min_run_time: float, label: str) -> benchmark.Measurement:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(),
                            label=label)
    return timer.blocked_autorange(min_run_time=min_run_time)


def workload(name: str, pass_: str, shape, dtype, fmt: str, device: str) -> Callable:
    """A closure running one implementation once on fresh-looking but fixed tensors."""
    forward = make_forward(name)
    C = shape[1]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # mixed, as AMP
    x = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=memory_format_of(fmt, len(shape)))
    running_mean = torch.zeros(C, dtype=param_dtype, device=device)
    running_var = torch.ones(C, dtype=param_dtype, device=device)
    weight = torch.rand(C, dtype=param_dtype, device=device) + 0.5
    bias = torch.randn(C, dtype=param_dtype, device=device)
    if pass_ == "forward":
        def run():
            with torch.no_grad():
                return forward(x, running_mean, running_var, weight, bias)
        return run
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    grad = torch.randn_like(x)

    def run_backward():
        y = forward(x, running_mean, running_var, weight, bias)
        return torch.autograd.grad(y, (x, weight, bias), grad)
    return run_backward


class Progress:
    """One line on stderr: [done/total] what, elapsed time. Rewritten in place on a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        line = f"[{self.done:>{len(str(self.total))}}/{self.total}] {time.perf_counter() - self.start:6.1f}s  {what}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.done == self.total or self.done % 10 == 1:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run_bench(shapes, dtypes, formats, devices, impls, passes, min_run_time, progress=True) -> List[Result]:
    configs = list(configurations(shapes, dtypes, formats, devices))
    if BASELINE not in impls:
        impls = [BASELINE] + list(impls)
    bar = Progress(len(configs) * len(impls) * len(passes), enabled=progress)
    results: List[Result] = []
    for device, shape, dtype_name, fmt in configs:
        shape_text = "x".join(map(str, shape))
        for pass_ in passes:
            baseline = None
            for name in impls:
                fn = workload(name, pass_, shape, DTYPES[dtype_name], fmt, device)
                fn()  # warm-up: first-call allocations, lazy initializations
                m = measure(fn, min_run_time, f"{name} {pass_}")
                result = Result(device, shape_text, dtype_name, fmt, pass_, name, m.median, m.iqr,
                                len(m.times) * m.number_per_run)
                if name == BASELINE:
                    baseline = m.median
                result.ratio = result.median_s / baseline
                results.append(result)
                bar.step(f"{device} {shape_text} {dtype_name} {fmt} {pass_}: {name}")
                del fn
    return results


# ---------------------------------------------------------------------------------------------
# Reports

def _time_text(seconds: float) -> str:
    if seconds >= 1e-1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def markdown_tables(results: Sequence[Result]) -> str:
    """One table per pass: a row per configuration, torch's time, then each implementation's
    time and its ratio to torch's (below 1 is faster)."""
    impls = list(dict.fromkeys(r.impl for r in results))
    out = []
    for pass_ in dict.fromkeys(r.pass_ for r in results):
        rows = [r for r in results if r.pass_ == pass_]
        out.append(f"**{pass_}** (training mode; time, and in parentheses time / torch bn)\n")
        header = ["device", "shape", "dtype", "format"] + impls
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * 4 + "---:|" * len(impls))
        keys = list(dict.fromkeys((r.device, r.shape, r.dtype, r.memory_format) for r in rows))
        for key in keys:
            by_impl = {r.impl: r for r in rows if (r.device, r.shape, r.dtype, r.memory_format) == key}
            cells = []
            for name in impls:
                r = by_impl.get(name)
                if r is None:
                    cells.append("-")
                elif name == BASELINE:
                    cells.append(_time_text(r.median_s))
                else:
                    cells.append(f"{_time_text(r.median_s)} ({r.ratio:.2f}x)")
            out.append("| " + " | ".join(list(key) + cells) + " |")
        out.append("")
    return "\n".join(out)


def summary_lines(results: Sequence[Result]) -> str:
    """Geometric mean of the ratio to torch bn, per implementation and pass."""
    lines = ["**geometric mean of time / torch bn over all configurations**\n",
             "| implementation | " + " | ".join(dict.fromkeys(r.pass_ for r in results)) + " |",
             "|---|" + "---:|" * len(set(r.pass_ for r in results))]
    for name in dict.fromkeys(r.impl for r in results):
        if name == BASELINE:
            continue
        cells = []
        for pass_ in dict.fromkeys(r.pass_ for r in results):
            ratios = [r.ratio for r in results if r.impl == name and r.pass_ == pass_]
            cells.append(f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_text() -> str:
    build = lpnorm.build_info()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (f"lpnorm {build['version']} (cpu isa {build['cpu_isa']}), torch {torch.__version__}, "
            f"{cpu}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def plot(results: Sequence[Result], path: str) -> None:
    """Ratio to torch bn per implementation (bars), one panel per pass, configurations side by side."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install 'lpnorm[plot]')")
    passes = list(dict.fromkeys(r.pass_ for r in results))
    impls = [n for n in dict.fromkeys(r.impl for r in results) if n != BASELINE]
    keys = list(dict.fromkeys((r.device, r.shape, r.dtype, r.memory_format) for r in results))
    fig, axes = plt.subplots(len(passes), 1, figsize=(min(20, max(8, 0.9 * len(keys) * len(impls) / 4)), 3.6 * len(passes)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, pass_ in zip(axes[:, 0], passes):
        for j, name in enumerate(impls):
            ratios = []
            for key in keys:
                match = [r.ratio for r in results if r.pass_ == pass_ and r.impl == name
                         and (r.device, r.shape, r.dtype, r.memory_format) == key]
                ratios.append(match[0] if match else float("nan"))
            ax.bar([i + j * width for i in range(len(keys))], ratios, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / torch bn")
        ax.set_title(f"{pass_} (below 1: faster than torch's batch norm)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels(["\n".join(k[1:]) if k[0] == "cpu" else "\n".join(k) for k in keys], fontsize=7)
    axes[0, 0].legend(ncol=min(len(impls), 7), fontsize=7, loc="upper left")
    fig.suptitle(machine_text(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one shape, float32, both memory formats, short timings (under a minute)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help="input dtypes (default float32 bfloat16 float16; --quick: float32); "
                             "half inputs use float32 weight and running statistics, as autocast")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--norms", nargs="+", choices=[n for n in IMPLEMENTATIONS if n != BASELINE],
                        default=None, metavar="IMPL",
                        help="implementations besides torch bn: " + ", ".join(repr(n) for n in IMPLEMENTATIONS if n != BASELINE))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--shapes", nargs="+", type=cli.shape, default=None, metavar="NxCxHxW",
                        help="input shapes, e.g. 64x64x28x28 512x1024 (default: three layer shapes)")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: cpu, and cuda when available and lpnorm was built with it")
    parser.add_argument("--min-run-time", type=cli.positive_float, default=None,
                        help="seconds of timing per measurement (default 0.3; --quick 0.05)")
    parser.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratios (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    # Hidden: shrink every shape to at most this many elements (the smoke tests use it).
    parser.add_argument("--max-numel", type=cli.positive_int, default=None, help=argparse.SUPPRESS)


def _shrink(shape, max_numel):
    shape = list(shape)
    while math.prod(shape) > max_numel and shape[0] > 2:
        shape[0] //= 2
    for i in range(len(shape) - 1, 1, -1):
        while math.prod(shape) > max_numel and shape[i] > 2:
            shape[i] //= 2
    return tuple(shape)


def _record(result: Result) -> dict:
    record = asdict(result)
    record["pass"] = record.pop("pass_")
    return record


def main(args: argparse.Namespace) -> int:
    cli.check_outputs(args.parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or SHAPES["quick" if args.quick else "full"]
    if args.max_numel:
        shapes = [_shrink(s, args.max_numel) for s in shapes]
    dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16", "float16"])
    impls = [BASELINE] + (args.norms or [n for n in IMPLEMENTATIONS if n != BASELINE])
    for name in impls:
        k = (IMPLEMENTATIONS[name] or {}).get("k", 1)
        for s in shapes:
            values = s[0] * math.prod(s[2:])  # per channel
            if values < max(k, 2):
                args.parser.error(f"shape {'x'.join(map(str, s))} has {values} values per channel; "
                                  f"{name!r} needs at least {max(k, 2)} (give larger shapes, or --norms without it)")
    cuda_built = torch.cuda.is_available() and lpnorm.build_info()["cuda"]
    devices = args.devices
    if devices is None:
        devices = ["cpu"] + (["cuda"] if cuda_built else [])
    elif "cuda" in devices and not cuda_built:
        args.parser.error("--devices cuda: no CUDA device here, or this lpnorm was built without CUDA "
                          "(python -m lpnorm info)")
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.3)

    results = run_bench(shapes, dtypes, args.formats, devices, impls, args.passes, min_run_time,
                        progress=not args.no_progress)
    print(f"lpnorm bench on {machine_text()}\n")
    print(markdown_tables(results))
    print(summary_lines(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_text(), "min_run_time_s": min_run_time,
                       "results": [_record(r) for r in results]}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0
