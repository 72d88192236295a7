"""The wheel's version and dependencies. The version is CMakeLists.txt's project(VERSION) plus a
local tag that names what the binaries need, `0.1.0+pt213cpu` (torch 2.13, no CUDA) or
`0.1.0+pt213cu130` (torch 2.13, CUDA 13.0); the dependencies pin that torch release (torch==2.13.*).

A scikit-build-core dynamic-metadata provider (`[[tool.dynamic-metadata]]` in pyproject.toml).
It runs before CMake, so it predicts CMake's CUDA decision (LPNORM_CUDA, a CUDA torch, nvcc);
CMakeLists.txt recomputes the tag from what it decided and refuses a wheel whose name would lie.
PyPI refuses local tags: tagged wheels go to a find-links index (docs/deployment.md).
"""

import os
import re
import shutil
from pathlib import Path

CMAKELISTS = Path(__file__).resolve().parent.parent / "CMakeLists.txt"


def project_version() -> str:
    match = re.search(r"project\(\s*lpnorm\s+VERSION\s+([0-9.]+)", CMAKELISTS.read_text())
    if not match:
        raise RuntimeError(f"no 'project(lpnorm VERSION x.y.z' in {CMAKELISTS}")
    return match.group(1)


def cuda_expected(torch_cuda) -> bool:
    choice = os.environ.get("LPNORM_CUDA", "AUTO").upper()
    if choice == "OFF" or not torch_cuda:
        return False
    return choice == "ON" or bool(os.environ.get("CUDACXX") or shutil.which("nvcc"))


def torch_build():
    """(major, minor, CUDA version or None) of the torch the build compiles against."""
    import torch  # --no-build-isolation: the installed one

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return major, minor, torch.version.cuda


def dynamic_metadata(settings, project):
    if settings:
        raise RuntimeError(f"lpnorm_version takes no settings, got {dict(settings)}")
    major, minor, cuda = torch_build()
    tag = f"pt{major}{minor}" + (f"cu{cuda.replace('.', '')}" if cuda_expected(cuda) else "cpu")
    return {
        "version": f"{project_version()}+{tag}",
        "dependencies": [f"torch=={major}.{minor}.*", "numpy"],
    }


if __name__ == "__main__":
    print(dynamic_metadata({}, {}))
