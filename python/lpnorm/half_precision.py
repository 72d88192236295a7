"""python -m lpnorm half: each norm's statistics in float16 against float64.

The paper's central claim: L2 batch norm computed on float16 values breaks when the squares of
the deviations leave float16's range (max 65504, so |x - mean| > 256 overflows; the smallest
normal is 6.1e-5, so |x - mean| < 7.8e-3 squares into subnormals and below 2.4e-4 to zero),
while L1 and L-inf, which never square an element, stay finite and accurate. bfloat16 has
float32's exponent range and hides the effect, so this is float16 only.

The sweep draws x = sigma * z (z standard normal, C channels of m values each), rounds it to
float16, and computes each norm's scale estimate in three modes:

- ``kernel-fp32acc``: lpnorm's kernels on the float16 tensor, float32 accumulation (SPEC §4's
  default for half inputs).
- ``kernel-fp16acc``: lpnorm's kernels with ``accumulate="half"`` (SPEC §4): every term and
  every partial mean in float16 (csrc/cpu/half_accumulation.h: terms rounded to float16 and
  averaged pairwise, so no sum outgrows the data's own scale).
- ``torch-fp16``: the statistic written in plain PyTorch float16 operators (x.mean(), d * d,
  d.abs(), amax, topk): float16 values and element-wise results, torch's reductions (which
  accumulate in float32 on CPU). Not lpnorm: the reference point of a naive half implementation,
  the paper's "fp16 values, fp32 accumulator" L2 configuration.

Every mode is compared with lpnorm's float64 kernel on the same float16 values (so the rounding
of the input to float16 is not counted as error): the relative error of sigma (worst channel),
the channels whose sigma is inf/NaN/0, and the non-finite elements of the normalized output.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

import lpnorm

from . import _cli_args as cli

NORMS: Dict[str, dict] = {
    "l2": dict(norm="l2"),
    "l1": dict(norm="l1"),
    "linf": dict(norm="linf"),
    "topk": dict(norm="topk", k=10),
    "range": dict(norm="range"),
}
MODES = ("kernel-fp32acc", "kernel-fp16acc", "torch-fp16")
SIGMAS = [10.0 ** e for e in range(-5, 4)]  # 1e-5 .. 1e3
MS = [10 ** e for e in range(2, 7)]  # 1e2 .. 1e6
EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# The modes: each returns (sigma per channel as float64, the normalized output)

def _forward(x: torch.Tensor, options: dict, **extra):
    """lpnorm's forward in training mode without running statistics or affine parameters:
    (output, save_mean, save_invstd, save_coef = (sigma, a, b), ...)."""
    opts = dict(dict(k=10, p=2.0, chunks=1, constant="exact"), **options)
    return torch.ops.lpnorm.batch_norm_forward(
        x, None, None, None, None, True, 0.1, EPS, opts["norm"], opts["k"], opts["p"], opts["chunks"],
        opts["constant"], **extra)


def kernel_float64(x16: torch.Tensor, options: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    out = _forward(x16.double(), options)
    return out[3][:, 0].double(), out[0]


def kernel_float32_accumulation(x16: torch.Tensor, options: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    out = _forward(x16, options)
    return out[3][:, 0].double(), out[0]


def kernel_half_accumulation(x16: torch.Tensor, options: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    out = _forward(x16, options, accumulate="half")
    return out[3][:, 0].double(), out[0]


def torch_float16(x16: torch.Tensor, options: dict, constant: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The raw statistic in plain PyTorch float16 operators over dim 0 of an (m, C) tensor, times
    the norm's consistency constant (taken from the float64 kernel, so only precision differs)."""
    norm = options["norm"]
    mean = x16.mean(0, keepdim=True)
    d = x16 - mean
    if norm == "l2":
        raw = (d * d).mean(0).sqrt()  # the squares are float16: the paper's point
    elif norm == "l1":
        raw = d.abs().mean(0)
    elif norm == "linf":
        raw = d.abs().amax(0)
    elif norm == "topk":
        raw = d.abs().topk(options["k"], dim=0).values.mean(0)
    elif norm == "range":
        raw = x16.amax(0) - x16.amin(0)
    else:
        raise ValueError(norm)
    sigma = raw * constant.to(torch.float16)
    # Per-channel scalars (C of them) in float32, as any implementation would: only the
    # per-element work above is float16.
    invstd = (sigma.float().square() + EPS).rsqrt()
    out = d * invstd.to(torch.float16)
    return sigma.double(), out


def raw_statistic_float64(x: torch.Tensor, options: dict) -> torch.Tensor:
    d = x - x.mean(0, keepdim=True)
    norm = options["norm"]
    if norm == "l2":
        return (d * d).mean(0).sqrt()
    if norm == "l1":
        return d.abs().mean(0)
    if norm == "linf":
        return d.abs().amax(0)
    if norm == "topk":
        return d.abs().topk(options["k"], dim=0).values.mean(0)
    return x.amax(0) - x.amin(0)


# ---------------------------------------------------------------------------------------------
# The sweep

@dataclass
class Point:
    mode: str
    norm: str
    sigma: float
    m: int
    rel_error: Optional[float]  # worst channel |sigma - sigma64| / sigma64; None: non-finite
    nonfinite_sigma: int  # channels whose sigma is inf or NaN
    zero_sigma: int  # channels whose sigma came out 0 (underflow)
    nonfinite_output: int  # elements of the normalized output that are inf or NaN
    output_elements: int
    output_error: Optional[float]  # max |y - y64| / max |y64|; None: non-finite output


def sweep(sigmas=SIGMAS, ms=MS, norms=tuple(NORMS), modes=MODES, channels: int = 2, seed: int = 0,
          progress: bool = True) -> Tuple[List[Point], Dict[str, str]]:
    unavailable: Dict[str, str] = {}  # modes this build cannot run, with why (none at present)
    points: List[Point] = []
    total, done, start = len(ms) * len(sigmas), 0, time.perf_counter()
    for m in ms:
        z = torch.randn(m, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for sigma in sigmas:
            done += 1
            if progress:
                line = f"[{done}/{total}] {time.perf_counter() - start:5.1f}s  m={m:.0e} sigma={sigma:.0e}"
                sys.stderr.write("\r\x1b[2K" + line if sys.stderr.isatty() else line + "\n")
                sys.stderr.flush()
            x16 = (z * sigma).to(torch.float16)
            for norm in norms:
                options = NORMS[norm]
                sigma64, y64 = kernel_float64(x16, options)
                for mode in modes:
                    if mode == "kernel-fp32acc":
                        s, out = kernel_float32_accumulation(x16, options)
                    elif mode == "kernel-fp16acc":
                        s, out = kernel_half_accumulation(x16, options)
                    else:
                        constant = sigma64 / raw_statistic_float64(x16.double(), options)
                        s, out = torch_float16(x16, options, constant)
                    finite = torch.isfinite(s)
                    rel = ((s - sigma64).abs() / sigma64).max().item() if bool(finite.all()) else None
                    bad_out = int((~torch.isfinite(out)).sum())
                    out_err = None if bad_out else ((out.double() - y64).abs().max() / y64.abs().max()).item()
                    points.append(Point(mode, norm, sigma, m, rel, int((~finite).sum()), int((s == 0).sum()),
                                        bad_out, out.numel(), out_err))
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    return points, unavailable


# ---------------------------------------------------------------------------------------------
# Reports

def _cell(points: List[Point]) -> str:
    """Worst over the given points (the m values): the relative error, 'inf'/'nan' when sigma is
    not finite, '0' marks when sigma underflowed to zero, '!' when the output has inf/NaN."""
    if any(p.rel_error is None for p in points):
        text = "inf/nan"
    else:
        worst = max(p.rel_error for p in points)
        text = "0" if worst == 0 else f"{worst:.0e}"
        if any(p.zero_sigma for p in points):
            text += " (0)"
    if any(p.nonfinite_output for p in points):
        text += " !"
    return text


def markdown_tables(points: List[Point], unavailable: Dict[str, str]) -> str:
    out = []
    sigmas = sorted(set(p.sigma for p in points))
    ms = sorted(set(p.m for p in points))
    for mode in dict.fromkeys(p.mode for p in points):
        out.append(f"**{mode}**: relative error of sigma against float64, worst over m in "
                   f"{ms[0]:.0e}..{ms[-1]:.0e} (inf/nan: sigma not finite; (0): sigma underflowed to 0; "
                   "!: inf/NaN in the output)\n")
        out.append("| norm | " + " | ".join(f"σ={s:.0e}" for s in sigmas) + " |")
        out.append("|---|" + "---:|" * len(sigmas))
        for norm in dict.fromkeys(p.norm for p in points):
            cells = [_cell([p for p in points if p.mode == mode and p.norm == norm and p.sigma == s]) for s in sigmas]
            out.append(f"| {norm} | " + " | ".join(cells) + " |")
        mine = [p for p in points if p.mode == mode]
        bad = [p for p in mine if p.nonfinite_sigma or p.nonfinite_output]
        wrong = [p for p in mine if p.output_error is not None and p.output_error > 0.1]
        out.append(f"\n{mode}: inf/NaN in {sum(p.nonfinite_sigma for p in bad)} channel sigmas and "
                   f"{sum(p.nonfinite_output for p in bad)} output elements"
                   + (" (" + ", ".join(sorted({p.norm for p in bad})) + ")" if bad else "")
                   + f"; normalized output off by more than 10% of its range at {len(wrong)} of {len(mine)} points"
                   + (" (" + ", ".join(f"{n}: {sum(p.norm == n for p in wrong)}" for n in dict.fromkeys(p.norm for p in wrong)) + ")"
                      if wrong else "") + "\n")
    for mode, why in unavailable.items():
        out.append(f"**{mode}**: {why}\n")
    return "\n".join(out)


def plot(points: List[Point], path: str, unavailable: Dict[str, str]) -> None:
    """A heat map per (mode, norm): log10 relative error over sigma (x) and m (y); non-finite
    cells marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install 'lpnorm[plot]')")
    modes = list(dict.fromkeys(p.mode for p in points))
    norms = list(dict.fromkeys(p.norm for p in points))
    sigmas = sorted(set(p.sigma for p in points))
    ms = sorted(set(p.m for p in points))
    fig, axes = plt.subplots(len(modes), len(norms), figsize=(2.6 * len(norms) + 1, 2.4 * len(modes) + 0.6),
                             squeeze=False)
    image = None
    for i, mode in enumerate(modes):
        for j, norm in enumerate(norms):
            ax = axes[i, j]
            grid = torch.full((len(ms), len(sigmas)), float("nan"))
            for p in points:
                if p.mode == mode and p.norm == norm:
                    r, c = ms.index(p.m), sigmas.index(p.sigma)
                    grid[r, c] = 1.0 if p.rel_error is None else math.log10(max(p.rel_error, 1e-9))
                    if p.rel_error is None or p.nonfinite_output:
                        ax.text(c, r, "inf", ha="center", va="center", fontsize=6, color="white")
                    elif p.zero_sigma:
                        ax.text(c, r, "0", ha="center", va="center", fontsize=6, color="white")
            image = ax.imshow(grid.numpy(), origin="lower", vmin=-9, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(sigmas)))
            ax.set_xticklabels([f"{math.log10(s):.0f}" for s in sigmas], fontsize=6)
            ax.set_yticks(range(len(ms)))
            ax.set_yticklabels([f"{math.log10(v):.0f}" for v in ms], fontsize=6)
            if i == len(modes) - 1:
                ax.set_xlabel("log10 sigma", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{mode}\nlog10 m", fontsize=7)
            ax.set_title(norm, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="log10 relative error of sigma (inf: non-finite)")
    note = "; ".join(f"{mode}: {why}" for mode, why in unavailable.items())
    fig.suptitle("float16 statistics against float64" + (f"\n{note}" if note else ""), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training in float16 with an injected activation scale

class CompositeBatchNorm2d(torch.nn.Module):
    """Batch norm out of plain PyTorch operators on the input's dtype, the way a float16 model
    written without lpnorm computes it: `l2` squares the float16 deviations ((d * d).mean()),
    `l1` is the paper's code (mean |d| * sqrt(pi/2)). Per-channel scalars in float32, running
    statistics in float32, evaluation from them as torch does."""

    def __init__(self, channels: int, norm: str, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.norm, self.eps, self.momentum = norm, eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(channels, dtype=torch.float32))

    def forward(self, x):
        view = (1, -1, 1, 1)
        if self.training:
            dims = (0, 2, 3)
            mean = x.mean(dims, keepdim=True)
            d = x - mean
            if self.norm == "l2":
                sigma = (d * d).mean(dims).float().sqrt()
            else:
                sigma = d.abs().mean(dims).float() * math.sqrt(math.pi / 2)
            with torch.no_grad():
                m = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean.reshape(-1).float(), self.momentum)
                self.running_var.lerp_(sigma.square() * (m / (m - 1)), self.momentum)
        else:
            d = x - self.running_mean.view(view).to(x.dtype)
            sigma = self.running_var.sqrt()
        scale = (sigma.float().square() + self.eps).rsqrt() * self.weight.float()
        return d * scale.to(x.dtype).view(view) + self.bias.view(view).to(x.dtype)


TRAIN_VARIANTS = {  # label -> (kind, options)
    "torch-fp16 composite l2": ("composite", dict(norm="l2")),
    "torch-fp16 composite l1": ("composite", dict(norm="l1")),
    "torch bn": ("torch", {}),
    "lpnorm l2 (fp32 acc)": ("lpnorm", dict(norm="l2")),
    "lpnorm l1 (fp32 acc)": ("lpnorm", dict(norm="l1")),
    "lpnorm linf (fp32 acc)": ("lpnorm", dict(norm="linf")),
    "lpnorm l2 (fp16 acc)": ("lpnorm-fp16acc", dict(norm="l2")),
    "lpnorm l1 (fp16 acc)": ("lpnorm-fp16acc", dict(norm="l1")),
    "lpnorm linf (fp16 acc)": ("lpnorm-fp16acc", dict(norm="linf")),
}


def train_variant_norm(kind: str, options: dict, eps: float):
    """The norm-layer factory of one TRAIN_VARIANTS entry (channels -> module)."""
    if kind == "composite":
        return lambda c: CompositeBatchNorm2d(c, options["norm"], eps)
    if kind == "torch":
        return lambda c: torch.nn.BatchNorm2d(c, eps=eps)
    if kind == "lpnorm":
        return lambda c: lpnorm.nn.LpBatchNorm2d(c, eps=eps, **options)
    return lambda c: lpnorm.nn.LpBatchNorm2d(c, eps=eps, accumulate="half", **options)


def train_sweep(scales, variants, epochs: int, seed: int = 0, dtype=torch.float16, eps: float = 1e-5,
                width: int = 16, train_limit: Optional[int] = None, progress: bool = True):
    """The demo net in `dtype` (parameters, activations, gradients; loss in float32), every
    conv output multiplied by `scale` before its norm, with eps and the initial running variance
    times scale^2 so that in exact arithmetic the network is the same function at every scale:
    what differs is rounding. Norm layers keep float32 parameters and running statistics (as
    autocast); convolutions, activations and their gradients are float16. Width 16 (half the
    demo's), because float16 convolutions on CPU are several times slower than float32."""
    from . import demo

    data = demo.load_digits_tensors()
    if train_limit:
        data = (data[0][:train_limit], data[1][:train_limit], data[2], data[3])
    rows, unavailable = [], {}  # variants this build cannot run, with why (none at present)
    total, start = len(scales) * len(variants), time.perf_counter()
    for scale in scales:
        for label in variants:
            factory = train_variant_norm(*TRAIN_VARIANTS[label], eps * scale * scale)
            if progress:
                line = f"[{len(rows) + 1}/{total}] {time.perf_counter() - start:5.1f}s  x{scale:g} {label}"
                sys.stderr.write("\r\x1b[2K" + line if sys.stderr.isatty() else line + "\n")
                sys.stderr.flush()
            torch.manual_seed(seed)
            net = demo.DigitsNet(factory, activation_scale=scale, width=width)
            with torch.no_grad():  # running variances start at scale^2, not 1: the same function
                for module in net.modules():
                    if getattr(module, "running_var", None) is not None:
                        module.running_var.fill_(scale * scale)
            run = demo.train(label, seed, data, epochs, dtype=dtype, net=net)
            first_bad = next((i + 1 for i, v in enumerate(run.train_loss_curve) if not math.isfinite(v)), None)
            rows.append(dict(variant=label, scale=scale, accuracy=run.accuracy, diverged_epoch=first_bad,
                             final_loss=run.train_loss_curve[-1], epoch_seconds=run.epoch_seconds,
                             test_accuracy_curve=run.test_accuracy_curve, train_loss_curve=run.train_loss_curve))
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    return rows, unavailable


def train_table(rows, unavailable) -> str:
    scales = list(dict.fromkeys(r["scale"] for r in rows))
    lines = ["| norm layer | " + " | ".join(f"x{s:g}" for s in scales) + " |", "|---|" + "---:|" * len(scales)]
    for label in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for s in scales:
            r = next((r for r in rows if r["variant"] == label and r["scale"] == s), None)
            if r is None:
                cells.append("-")
            elif r["diverged_epoch"]:
                cells.append(f"{100 * r['accuracy']:.1f} (NaN loss from epoch {r['diverged_epoch']})")
            else:
                cells.append(f"{100 * r['accuracy']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, why in unavailable.items():
        lines.append(f"| {label} | {why} |" + " |" * (len(scales) - 1))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="m up to 1e4 only")
    parser.add_argument("--norms", nargs="+", choices=list(NORMS), default=list(NORMS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-m", type=cli.positive_float, default=None,
                        help=f"largest m of the sweep, at least {MS[0]} (default 1e6)")
    parser.add_argument("--channels", type=cli.positive_int, default=2, help="channels per tensor (default 2)")
    parser.add_argument("--json", metavar="FILE", help="write every point of the sweep as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="heat maps of the relative error (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="torch threads (default 1, as the demo)")
    parser.add_argument("--train", action="store_true",
                        help="instead of the sweep: train the demo net in float16 with every conv output "
                             "scaled by --scales before its norm (eps scaled by scale^2)")
    parser.add_argument("--scales", nargs="+", type=cli.positive_float, default=[1.0, 256.0, 1e-4])
    parser.add_argument("--epochs", type=cli.positive_int, default=None, help="--train: epochs (default 4; --quick 2)")
    parser.add_argument("--variants", nargs="+", choices=list(TRAIN_VARIANTS), default=list(TRAIN_VARIANTS),
                        metavar="VARIANT", help="--train: norm layers: " + ", ".join(repr(v) for v in TRAIN_VARIANTS))


def main_train(args: argparse.Namespace) -> int:
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 4)
    rows, unavailable = train_sweep(args.scales, args.variants, epochs, progress=not args.no_progress)
    print(f"lpnorm half --train: the demo net in float16 on scikit-learn's digits, {epochs} epochs, seed 0, "
          f"width 16, every conv output multiplied by the scale before its norm (eps and initial "
          f"running variance times scale^2: the same function at every scale in exact arithmetic); final test "
          f"accuracy %; lpnorm {lpnorm.__version__}, torch {torch.__version__}\n")
    print(train_table(rows, unavailable))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": rows, "unavailable": unavailable, "epochs": epochs}, f, indent=1)
    return 0


def main(args: argparse.Namespace) -> int:
    cli.check_outputs(args.parser, args)
    if args.max_m is not None and args.max_m < MS[0]:
        args.parser.error(f"--max-m {args.max_m:g}: the sweep's smallest m is {MS[0]}")
    torch.set_num_threads(args.threads)
    if args.train:
        return main_train(args)
    max_m = args.max_m if args.max_m is not None else (1e4 if args.quick else 1e6)
    ms = [m for m in MS if m <= max_m]
    points, unavailable = sweep(SIGMAS, ms, args.norms, args.modes, args.channels, progress=not args.no_progress)
    print(f"lpnorm half: float16 statistics against float64, x = sigma * N(0, 1) rounded to float16, "
          f"{args.channels} channels of m values; lpnorm {lpnorm.__version__}, torch {torch.__version__}\n")
    print(markdown_tables(points, unavailable))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": [asdict(p) for p in points], "unavailable": unavailable}, f, indent=1)
    if args.plot:
        plot(points, args.plot, unavailable)
        print(f"plot written to {args.plot}")
    return 0
