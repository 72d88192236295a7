"""LpBatchNorm1d/2d/3d: the arguments, buffers and state_dict keys of nn.BatchNorm*d, with
the scale estimate of any norm of the family. In evaluation they are plain batch norm."""

import inspect
import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from .. import functional

NORMS = ("l2", "l1", "linf", "topk", "range", "p")
# nn.BatchNorm*d's keyword-only `bias` (an affine weight without bias) is absent from older torch.
_TORCH_HAS_BIAS_FLAG = "bias" in inspect.signature(_NormBase.__init__).parameters
CHUNKED_NORMS = ("linf", "topk", "range")
ACCUMULATORS = ("float", "half")


_fx_trace = getattr(torch.fx, "_symbolic_trace", None)
_is_fx_symbolic_tracing = (getattr(_fx_trace, "is_fx_symbolic_tracing", None) or getattr(_fx_trace, "is_fx_tracing", None)
                           or (lambda: False))


@torch.jit.unused
def refuse_fx_symbolic_trace(module: torch.nn.Module) -> None:
    """torch's BatchNorm*d are leaves of torch.fx.symbolic_trace; traced through, an lpnorm layer
    would increment num_batches_tracked once, at trace time, and never in the graph (and its
    input checks meet a Proxy): refused, pointing at lpnorm.fx, whose tracer keeps it a leaf."""
    if _is_fx_symbolic_tracing():
        raise RuntimeError(
            f"{type(module).__name__} is a leaf of a symbolic trace, as torch's BatchNorm*d: trace with "
            f"lpnorm.fx.symbolic_trace(model), or give your tracer leaf_modules=list(lpnorm.fx.LEAF_MODULES)")


def check_norm_options(norm: str, k: int, p: float, chunks: int, constant: str, accumulate: str = "float") -> None:
    """Refuses bad options when a module is built, not at its first forward."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1 (use norm='linf' for p = inf), got {p!r}")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
    if chunks != 1 and norm not in CHUNKED_NORMS:
        raise ValueError(f"chunks (ghost batches) apply to norm 'linf', 'topk' and 'range' only; got chunks={chunks} with norm {norm!r}")
    if constant not in ("exact", "paper"):
        raise ValueError(f"constant must be 'exact' or 'paper'; got {constant!r}")
    if accumulate not in ACCUMULATORS:
        raise ValueError(f"accumulate must be 'float' or 'half'; got {accumulate!r}")


class _LpBatchNorm(_NormBase):
    """Shared by the 1d/2d/3d modules, which differ only in the input ranks they accept."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        norm: str = "l1",
        k: int = 10,
        p: float = 2.0,
        chunks: int = 1,
        constant: str = "exact",
        accumulate: str = "float",
    ) -> None:
        check_norm_options(norm, k, p, chunks, constant, accumulate)
        factory = dict(device=device, dtype=dtype)
        if not bias:  # only passed when asked for, so older torch keeps working without it
            if not _TORCH_HAS_BIAS_FLAG:
                raise TypeError("bias=False needs a torch whose nn.BatchNorm*d accepts bias=")
            factory["bias"] = False
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        self.norm = norm
        self.k = k
        self.p = float(p)
        self.chunks = chunks
        self.constant = constant
        self.accumulate = accumulate

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        options = f"norm={self.norm}"
        if self.norm == "topk":
            options += f", k={self.k}"
        if self.norm == "p":
            options += f", p={self.p}"
        if self.chunks != 1:
            options += f", chunks={self.chunks}"
        if self.constant != "exact":
            options += f", constant={self.constant}"
        if self.accumulate != "float":
            options += f", accumulate={self.accumulate}"
        return super().extra_repr() + ", " + options

    def _running_factor(self) -> float:
        """Counts a training batch and returns the running-statistics factor: the momentum, or
        1 / num_batches_tracked for momentum=None (a cumulative average), as torch does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            refuse_fx_symbolic_trace(self)
        self._check_input_dim(input)
        factor = self._running_factor()
        # Batch statistics in training, and in evaluation when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return functional.batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
            self.norm,
            self.k,
            self.p,
            self.chunks,
            self.constant,
            self.accumulate,
        )


class LpBatchNorm1d(_LpBatchNorm):
    """Lp batch norm over (N, C) or (N, C, L) inputs, like nn.BatchNorm1d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class LpBatchNorm2d(_LpBatchNorm):
    """Lp batch norm over (N, C, H, W) inputs, like nn.BatchNorm2d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class LpBatchNorm3d(_LpBatchNorm):
    """Lp batch norm over (N, C, D, H, W) inputs, like nn.BatchNorm3d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class LpBatchNormNd(_LpBatchNorm):
    """Lp batch norm over any input with at least 2 dimensions, as nn.SyncBatchNorm accepts.

    What :func:`lpnorm.convert` makes of an ``nn.SyncBatchNorm`` (whose input rank is not
    fixed), and what :func:`lpnorm.to_torch` turns back into one. It normalizes with the
    statistics of the local batch only: it is not synchronized across processes.
    ``process_group`` is only kept for that round trip.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
