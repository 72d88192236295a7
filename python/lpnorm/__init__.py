"""lpnorm: Lp batch normalization (L1, L-inf, top-k, Range, general p) for PyTorch.

The schemes of "Norm matters: efficient and accurate normalization schemes in deep
networks" (Hoffer, Banner, Golan, Soudry, NeurIPS 2018) as native operators
(torch.ops.lpnorm.*), a functional API and drop-in modules for nn.BatchNorm*d.
"""

import torch

from . import _library

_library.load()

from . import _fake  # noqa: E402  (registers fake kernels for the loaded operators)
from . import functional, nn  # noqa: E402
from ._C import build_info  # noqa: E402

__version__ = build_info()["version"]

__all__ = ["functional", "nn", "build_info", "__version__"]
