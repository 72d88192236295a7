"""Command line: python -m lpnorm info (versions and capabilities of this build)."""

import argparse
import json
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
        "operators": ", ".join(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lpnorm::"))),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(key) for key in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lpnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions, CPU instruction set, CUDA archs of this build")
    info_parser.add_argument("--json", action="store_true", help="print a JSON object")
    info_parser.set_defaults(run=info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
