"""Argument types and up-front checks of the command line (python -m lpnorm ...): bad values
become argparse errors before a benchmark runs for minutes, not tracebacks after it."""

import argparse
import importlib.util
import os


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def shape(text: str) -> tuple:
    """'64x64x28x28' -> (64, 64, 28, 28): N, C and any spatial sizes, each >= 1."""
    try:
        sizes = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape NxC[xHxW...] of sizes >= 1, e.g. 64x64x28x28; got {text!r}")
    return sizes


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--json and --plot: a writable folder, and matplotlib for a plot, checked before the run."""
    for option in ("json", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--{option} {path}: the folder {folder} does not exist or is not writable")
    if getattr(args, "plot", None) is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib)")
