"""Loading the native operators (liblpnorm_ops) and the build-info module (lpnorm._C).

The torch check comes first, from a plain JSON file CMake writes at install time: the binaries
link libtorch, so loading them under another torch release fails with an undefined symbol
before any check inside them could run.
"""

import json
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PATH = os.path.join(_HERE, "lib", "liblpnorm_ops.so")
BUILD_INFO_PATH = os.path.join(_HERE, "_build_info.json")
# find_package(lpnorm) looks here (lpnorm/share/cmake/lpnorm/lpnormConfig.cmake).
CMAKE_PREFIX_PATH = os.path.join(_HERE, "share", "cmake")
INCLUDE_DIR = os.path.join(_HERE, "include")


def _torch_release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13': the binary interface changes between minor releases."""
    return ".".join(version.split("+")[0].split(".")[:2])


def build_file() -> dict:
    """What the binaries were built for: version, torch_version, cuda, cuda_version, cuda_archs."""
    try:
        with open(BUILD_INFO_PATH) as file:
            return json.load(file)
    except FileNotFoundError:
        raise ImportError(
            f"{BUILD_INFO_PATH} is missing: this lpnorm is not an installed build (importing the source "
            "tree?); install it with pip install --no-build-isolation ."
        ) from None


def check_torch(built: dict, torch_version: str, torch_cuda) -> None:
    """Refuses a torch the binaries cannot load with, naming both sides."""
    fix = "install the lpnorm build for this torch, or rebuild it (pip install --no-build-isolation .)"
    if _torch_release(built["torch_version"]) != _torch_release(torch_version):
        raise ImportError(
            f"lpnorm {built['version']} was built for torch {built['torch_version']} but torch "
            f"{torch_version} is installed; {fix}"
        )
    if built["cuda"] and not torch_cuda:
        raise ImportError(
            f"lpnorm {built['version']} was built with CUDA {built['cuda_version']} but torch "
            f"{torch_version} is a CPU build; {fix}"
        )
    if built["cuda"] and built["cuda_version"].split(".")[0] != torch_cuda.split(".")[0]:
        raise ImportError(
            f"lpnorm {built['version']} was built with CUDA {built['cuda_version']} but torch "
            f"{torch_version} uses CUDA {torch_cuda}; {fix}"
        )


def load() -> None:
    """Registers torch.ops.lpnorm.* once, after checking the torch we were built for."""
    check_torch(build_file(), torch.__version__, torch.version.cuda)
    from . import _C  # noqa: F401  (links liblpnorm_ops: only now is it safe to load)

    torch.ops.load_library(LIBRARY_PATH)
