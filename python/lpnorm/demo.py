"""python -m lpnorm demo: the paper's claims, small and honest.

A small conv net trained on scikit-learn's bundled digits (1797 8x8 images, shipped inside the
scikit-learn package: nothing is downloaded) with torch's batch norm and with lpnorm's l2, l1,
linf, topk (k=10), range (4 ghost batches) and with bounded weight normalization, over several
seeds. Printed: test accuracy (mean, spread), time per epoch, and the L1 - L2 gap the paper
says is small. Same split, schedule and initialization seed for every variant; only the
normalization differs.
"""

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import lpnorm

# variant -> what normalizes: ("torch", {}), ("lpnorm", options) or ("bounded_wn", {})
VARIANTS: Dict[str, Tuple[str, dict]] = {
    "torch_bn": ("torch", {}),
    "l2": ("lpnorm", dict(norm="l2")),
    "l1": ("lpnorm", dict(norm="l1")),
    "linf": ("lpnorm", dict(norm="linf")),
    "topk": ("lpnorm", dict(norm="topk", k=10)),
    "range": ("lpnorm", dict(norm="range", chunks=4)),
    "bounded_wn": ("bounded_wn", dict(p=2)),
}
DESCRIPTIONS = {
    "torch_bn": "torch.nn.BatchNorm2d",
    "l2": "lpnorm l2",
    "l1": "lpnorm l1",
    "linf": "lpnorm linf",
    "topk": "lpnorm topk, k=10",
    "range": "lpnorm range, chunks=4",
    "bounded_wn": "bounded weight norm (p=2, fixed rho) + mean-only batch norm",
}


# ---------------------------------------------------------------------------------------------
# Data: scikit-learn's digits, bundled with the package

def load_digits_tensors(test_fraction: float = 0.3, split_seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) standardized with the training
    set's mean and standard deviation, a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("the demo trains on scikit-learn's bundled digits: pip install scikit-learn")
    digits = load_digits()  # read from the installed package's data folder, no network
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target)
    x_train = torch.tensor(x_train, dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(x_test, dtype=torch.float32).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test))


# ---------------------------------------------------------------------------------------------
# The net

class MeanOnlyBatchNorm2d(nn.Module):
    """Centering only (batch mean in training, running mean in evaluation) and a learned bias:
    the companion of weight normalization (Salimans & Kingma 2016), which fixes the scale."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x):
        if self.training:
            mean = x.mean((0, 2, 3))
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean.to(x.dtype)
        return x - (mean - self.bias.to(x.dtype)).view(1, -1, 1, 1)


def bounded_weight_norm_fn() -> Tuple[Optional[Callable], str]:
    """lpnorm.nn.utils.bounded_weight_norm when this build has it, else (None, why not)."""
    try:
        from lpnorm.nn.utils import bounded_weight_norm
    except ImportError as error:
        return None, f"not available in this build (lpnorm.nn.utils.bounded_weight_norm: {error})"
    return bounded_weight_norm, ""


def make_norm_factory(variant: str) -> Callable[[int], nn.Module]:
    kind, options = VARIANTS[variant]
    if kind == "torch":
        return nn.BatchNorm2d
    if kind == "lpnorm":
        return lambda channels: lpnorm.nn.LpBatchNorm2d(channels, **options)
    return MeanOnlyBatchNorm2d


class Scale(nn.Module):
    """Multiplies by a constant: the injected activation scale of `python -m lpnorm half --train`."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"{self.factor:g}"


class DigitsNet(nn.Module):
    """conv-norm-relu x2, max-pool to 4x4, conv-norm-relu x2, global average pool, linear.
    activation_scale != 1 multiplies every conv's output by it before the norm (which removes
    it again, up to eps and rounding)."""

    def __init__(self, norm: Callable[[int], nn.Module], width: int = 32, classes: int = 10,
                 activation_scale: float = 1.0):
        super().__init__()

        def block(cin, cout):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
            if activation_scale != 1.0:
                layers.append(Scale(activation_scale))
            return layers + [norm(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def build_net(variant: str, seed: int, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)  # the same initial conv weights for every variant of a seed
    net = DigitsNet(make_norm_factory(variant), width)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            # He initialization, variance-preserving through ReLU: what a net whose norm layers do
            # not rescale (bounded weight norm + mean-only batch norm) needs; the others don't care.
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
    if VARIANTS[variant][0] == "bounded_wn":
        bounded_weight_norm, why = bounded_weight_norm_fn()
        if bounded_weight_norm is None:
            raise RuntimeError(why)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                bounded_weight_norm(module, "weight", p=VARIANTS[variant][1]["p"], dim=0)
    return net


# ---------------------------------------------------------------------------------------------
# Training

@dataclass
class Run:
    norm: str
    seed: int
    accuracy: float  # final test accuracy, a fraction
    epoch_seconds: float  # mean training time of an epoch (evaluation not included)
    test_accuracy_curve: List[float] = field(default_factory=list)  # after each epoch
    train_loss_curve: List[float] = field(default_factory=list)  # mean over each epoch's batches
    diverged: bool = False


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train(variant: str, seed: int, data, epochs: int, batch_size: int = 64, lr: float = 0.1,
          weight_decay: float = 5e-4, width: int = 32, dtype=torch.float32,
          net: Optional[nn.Module] = None) -> Run:
    """SGD with Nesterov momentum and a cosine schedule; batches drawn by a seeded generator,
    the last incomplete batch dropped (every batch divides into range's 4 ghost batches).
    `net` replaces the variant's net (its name is then only a label); `dtype` is that of the
    parameters and activations (the loss is computed in float32)."""
    x_train, y_train, x_test, y_test = data
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    net = net if net is not None else build_net(variant, seed, width)
    # Norm layers keep float32 parameters and statistics, as autocast does (their state is
    # copied around the conversion, so no value passes through the half dtype).
    norms = [m for m in net.modules() if getattr(m, "running_mean", None) is not None]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    net.to(dtype)
    for module, state in zip(norms, states):
        module.float().load_state_dict(state)
    steps_per_epoch = len(x_train) // batch_size
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    run = Run(variant, seed, 0.0, 0.0)
    train_seconds = 0.0
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        start = time.perf_counter()
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            loss = loss_fn(net(x_train[index]).float(), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        train_seconds += time.perf_counter() - start
        mean_loss = float(torch.stack(losses).mean())
        run.train_loss_curve.append(mean_loss)
        run.test_accuracy_curve.append(evaluate(net, x_test, y_test))
        if not math.isfinite(mean_loss):
            run.diverged = True
    run.accuracy = run.test_accuracy_curve[-1]
    run.epoch_seconds = train_seconds / epochs
    return run


# ---------------------------------------------------------------------------------------------
# Reports

def summarize(runs: List[Run], variants: List[str]) -> List[dict]:
    rows = []
    for variant in variants:
        mine = [r for r in runs if r.norm == variant]
        if not mine:
            continue
        acc = [100 * r.accuracy for r in mine]
        rows.append(dict(
            norm=variant, seeds=len(mine), mean=statistics.mean(acc),
            std=statistics.stdev(acc) if len(acc) > 1 else 0.0, low=min(acc), high=max(acc),
            epoch_seconds=statistics.median(r.epoch_seconds for r in mine),
            diverged=sum(r.diverged for r in mine)))
    return rows


def markdown_table(rows: List[dict], unavailable: Dict[str, str]) -> str:
    base = next((r["epoch_seconds"] for r in rows if r["norm"] == "torch_bn"), None)
    lines = ["| normalization | test accuracy % (mean ± std) | min - max | seeds | s / epoch | vs torch bn |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['epoch_seconds'] / base:.2f}x" if base else "-"
        note = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {DESCRIPTIONS[r['norm']]} | {r['mean']:.2f} ± {r['std']:.2f}{note} | "
                     f"{r['low']:.2f} - {r['high']:.2f} | {r['seeds']} | {r['epoch_seconds']:.3f} | {ratio} |")
    for variant, why in unavailable.items():
        lines.append(f"| {DESCRIPTIONS[variant]} | {why} | - | 0 | - | - |")
    return "\n".join(lines)


def claims_text(rows: List[dict], runs: List[Run]) -> str:
    """The paper's claims as numbers, with the seed-to-seed spread beside them."""
    by = {r["norm"]: r for r in rows}
    lines = []
    if "l1" in by and "l2" in by:
        gap = by["l1"]["mean"] - by["l2"]["mean"]
        paired = [100 * (a.accuracy - b.accuracy) for a in runs if a.norm == "l1"
                  for b in runs if b.norm == "l2" and b.seed == a.seed]
        spread = max(by["l1"]["std"], by["l2"]["std"])
        lines.append(f"L1 - L2 test accuracy: {gap:+.2f} points (per seed: "
                     + ", ".join(f"{d:+.2f}" for d in paired)
                     + f"; seed-to-seed std {spread:.2f}). The paper: L1 within about a point of L2.")
    if "torch_bn" in by and "l2" in by:
        lines.append(f"lpnorm l2 - torch batch norm: {by['l2']['mean'] - by['torch_bn']['mean']:+.2f} points "
                     "(same math; differences are summation order over training).")
    for name in ("linf", "topk", "range", "bounded_wn"):
        if name in by and "l2" in by:
            lines.append(f"{name} - L2: {by[name]['mean'] - by['l2']['mean']:+.2f} points.")
    return "\n".join(lines)


def plot_curves(runs: List[Run], variants: List[str], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install 'lpnorm[plot]')")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in variants:
        mine = [r for r in runs if r.norm == variant]
        if not mine:
            continue
        epochs = range(1, len(mine[0].test_accuracy_curve) + 1)
        acc = torch.tensor([r.test_accuracy_curve for r in mine]) * 100
        loss = torch.tensor([r.train_loss_curve for r in mine])
        line, = ax_acc.plot(epochs, acc.mean(0), label=DESCRIPTIONS[variant],
                            linestyle="--" if variant == "torch_bn" else "-")
        ax_acc.fill_between(epochs, acc.min(0).values, acc.max(0).values, color=line.get_color(), alpha=0.15)
        ax_loss.plot(epochs, loss.mean(0), color=line.get_color())
    ax_acc.set(xlabel="epoch", ylabel="test accuracy % (mean, min-max band over seeds)")
    ax_acc.set_ylim(bottom=max(0.0, ax_acc.get_ylim()[0]))
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over seeds)", yscale="log")
    ax_acc.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="3 epochs, 2 seeds (under a minute on 2 cores)")
    parser.add_argument("--epochs", type=int, default=None, help="default 10; --quick: 3")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; --quick: 2)")
    parser.add_argument("--norms", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to train (default: all)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: this net's layers are too small to gain from more, "
                             "and on a busy machine extra threads only wait for each other)")
    parser.add_argument("--json", metavar="FILE", help='write {"runs": [{"norm", "seed", "accuracy", "epoch_seconds", ...}]}')
    parser.add_argument("--plot", metavar="FILE.png", help="training curves (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    # Hidden: train on the first N training images only (the smoke tests use it).
    parser.add_argument("--train-limit", type=int, default=None, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs or (3 if args.quick else 10)
    seeds = args.seeds or (2 if args.quick else 3)
    data = load_digits_tensors()
    if args.train_limit:
        data = (data[0][:args.train_limit], data[1][:args.train_limit], data[2], data[3])

    variants, unavailable = [], {}
    for variant in args.norms:
        if VARIANTS[variant][0] == "bounded_wn":
            fn, why = bounded_weight_norm_fn()
            if fn is None:
                unavailable[variant] = why
                continue
        variants.append(variant)

    runs: List[Run] = []
    total = len(variants) * seeds
    start = time.perf_counter()
    for seed in range(seeds):
        for variant in variants:
            if not args.no_progress:
                sys.stderr.write(f"\r\x1b[2K[{len(runs) + 1}/{total}] {time.perf_counter() - start:6.1f}s  "
                                 f"{variant}, seed {seed}" if sys.stderr.isatty()
                                 else f"[{len(runs) + 1}/{total}] {variant}, seed {seed}\n")
                sys.stderr.flush()
            runs.append(train(variant, seed, data, epochs))
    if not args.no_progress and sys.stderr.isatty():
        sys.stderr.write("\n")

    x_train, _, x_test, _ = data
    title = (f"digits (scikit-learn), {len(x_train)} train / {len(x_test)} test images, {epochs} epochs, "
             f"{seeds} seeds; torch {torch.__version__}, lpnorm {lpnorm.__version__}, "
             f"{torch.get_num_threads()} threads")
    rows = summarize(runs, variants)
    print(f"lpnorm demo: {title}\n")
    print(markdown_table(rows, unavailable))
    print()
    print(claims_text(rows, runs))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": [asdict(r) for r in runs], "unavailable": unavailable,
                       "config": {"epochs": epochs, "seeds": seeds, "train_images": len(x_train),
                                  "test_images": len(x_test), "batch_size": 64, "threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "lpnorm": lpnorm.__version__}}, f, indent=1)
    if args.plot:
        plot_curves(runs, variants, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0
