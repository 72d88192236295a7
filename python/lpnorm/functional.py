"""Functional interface: torch.nn.functional.batch_norm's signature, then the norm's options."""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["batch_norm"]


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm: str = "l1",
    k: int = 10,
    p: float = 2.0,
    chunks: int = 1,
    constant: str = "exact",
    accumulate: str = "float",
) -> Tensor:
    """Lp batch normalization over the channel dimension (dim 1).

    Training (``training=True``) normalizes with the batch's mean and the ``norm``'s scale
    estimate and updates ``running_mean``/``running_var`` in place, as
    :func:`torch.nn.functional.batch_norm` does; evaluation uses the running statistics,
    which is plain batch norm whatever the norm.

    Args:
        norm: ``"l2"`` (torch's batch norm), ``"l1"``, ``"linf"``, ``"topk"``, ``"range"``
            or ``"p"``.
        k: how many of the largest absolute deviations ``"topk"`` averages.
        p: the exponent of ``"p"`` (>= 1).
        chunks: ghost batches for ``"linf"``, ``"topk"`` and ``"range"``: the scale is
            estimated in each of ``chunks`` equal parts of the batch and averaged.
        constant: ``"exact"`` expected order statistics, or ``"paper"`` for the
            multipliers of the authors' code.
        accumulate: ``"float"`` (half-precision inputs accumulate their statistics in
            float32) or ``"half"`` (in the input's own float16/bfloat16, SPEC §4: shows where
            each norm leaves the half range; CPU only, slower; no effect on float32/float64).
    """
    return torch.ops.lpnorm.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p, chunks,
        constant, accumulate,
    )
