"""lpnorm: Lp batch normalization (L1, L-inf, top-k, Range, general p) for PyTorch.

The schemes of "Norm matters: efficient and accurate normalization schemes in deep
networks" (Hoffer, Banner, Golan, Soudry, NeurIPS 2018) as native operators
(torch.ops.lpnorm.*), a functional API and drop-in modules for nn.BatchNorm*d.
"""

import torch

from . import _library

_library.load()

# For find_package(lpnorm) in C++ projects, like torch.utils.cmake_prefix_path:
#   cmake -DCMAKE_PREFIX_PATH="$(python -c 'import lpnorm; print(lpnorm.cmake_prefix_path)')"
cmake_prefix_path = _library.CMAKE_PREFIX_PATH

from . import _fake  # noqa: E402  (registers fake kernels for the loaded operators)
from . import _composite_stages  # noqa: E402,F401  (the stage operators' CUDA kernels)
from . import functional, fx, nn  # noqa: E402
from .convert import convert, to_torch  # noqa: E402
from ._C import build_info  # noqa: E402

# The installed distribution's version, local tag included ("0.1.0+pt213cpu"), as torch's
# "2.13.0+cpu"; build_info()["version"] is the C++ library's ("0.1.0").
__version__ = _library.build_file()["version"]

__all__ = ["functional", "fx", "nn", "convert", "to_torch", "build_info", "__version__"]
