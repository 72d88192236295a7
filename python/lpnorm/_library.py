"""Loading the native operators (liblpnorm_ops) and the build-info module (lpnorm._C)."""

import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PATH = os.path.join(_HERE, "lib", "liblpnorm_ops.so")


def _torch_release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13': the binary interface changes between minor releases."""
    return ".".join(version.split("+")[0].split(".")[:2])


def load() -> None:
    """Registers torch.ops.lpnorm.* once, after checking the torch we were built for."""
    from . import _C

    built_for = _C.build_info()["torch_version"]
    if _torch_release(built_for) != _torch_release(torch.__version__):
        raise ImportError(
            f"lpnorm was built for torch {built_for} but torch {torch.__version__} is installed; "
            "install the lpnorm build for this torch, or rebuild it (pip install --no-build-isolation .)"
        )
    torch.ops.load_library(LIBRARY_PATH)
