"""Command line: python -m lpnorm info | bench | demo | half."""

import argparse
import json
import os
import platform
import sys


def info(args: argparse.Namespace) -> int:
    import torch

    import lpnorm
    from lpnorm import _C, _library

    build = _C.build_info()
    report = {
        "lpnorm": build["version"],
        "built for torch": build["torch_version"],
        "running torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": build["compiler"],
        "cpu isa in use": build["cpu_isa"],
        "cpu isas available": ", ".join(build["cpu_isas"]),
        "torch threads": torch.get_num_threads(),
        "cuda compiled": build["cuda"],
        "cuda archs": build["cuda_archs"] or "-",
        "cuda available": torch.cuda.is_available(),
        "ops library": _library.LIBRARY_PATH,
        "installed as": _library.build_file()["version"],
        "cmake package": os.path.join(lpnorm.cmake_prefix_path, "lpnorm"),
        "c++ header": os.path.join(_library.INCLUDE_DIR, "lpnorm", "lpnorm.h"),
        "operators": ", ".join(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lpnorm::"))),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(key) for key in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def add_evidence_commands(commands) -> None:
    """bench, demo and half: each lives in its own module, which adds its arguments and runs it."""
    import importlib

    def lazy(module):
        return lambda args: importlib.import_module(f"lpnorm.{module}").main(args)

    for name, module, text in (
        ("bench", "bench", "time every norm's kernels against torch's batch norm (markdown table, --plot, --json)"),
        ("demo", "demo", "the paper's claims, small: a conv net on scikit-learn's digits with each norm"),
        ("half", "half_precision", "float16 statistics of each norm against float64 over input scale and size"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        importlib.import_module(f"lpnorm.{module}").add_arguments(sub)
        sub.set_defaults(run=lazy(module), parser=sub)  # parser: for errors found before the run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lpnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions, CPU instruction set, CUDA archs of this build")
    info_parser.add_argument("--json", action="store_true", help="print a JSON object")
    info_parser.set_defaults(run=info)
    add_evidence_commands(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
