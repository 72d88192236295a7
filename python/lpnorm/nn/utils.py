"""The paper's bounded weight normalization (SPEC §6), as a torch.nn.utils.parametrize
parametrization: w = rho * v / ||v||_p per output channel, rho one fixed scalar per layer."""

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["BoundedWeightNorm", "bounded_weight_norm"]


def _norm_order(p: Union[int, float, str]) -> float:
    try:
        order = math.nan if isinstance(p, bool) else float(p)  # float("inf") and "inf" alike
    except (TypeError, ValueError):
        order = math.nan
    if order not in (1.0, 2.0, math.inf):
        raise ValueError(f"bounded_weight_norm: p must be 1, 2 or inf, got {p!r}")
    return order


class BoundedWeightNorm(nn.Module):
    """The parametrization ``v -> rho * v / ||v||_p``, the norm taken over every dimension but
    ``dim`` (one norm per slice along ``dim``; the whole tensor when ``dim`` is None or -1, as
    torch's ``weight_norm``). ``rho`` is a buffer: saved in the state_dict, moved with the
    module, never learned. A slice that is all zeros has no direction and gives NaN (torch's
    weight_norm divides by the norm alike)."""

    def __init__(self, p: Union[int, float, str] = 2, dim: Optional[int] = 0, rho: Union[float, Tensor] = 1.0,
                 *, like: Optional[Tensor] = None) -> None:
        super().__init__()
        self.p = _norm_order(p)
        self.dim = -1 if dim is None else int(dim)
        factory = {} if like is None else dict(device=like.device, dtype=like.dtype)
        self.register_buffer("rho", torch.as_tensor(rho, **factory).detach().clone().reshape(()))

    def norms(self, v: Tensor) -> Tensor:
        """||v||_p per slice along `dim`, shaped to broadcast against v (whole tensor: a scalar)."""
        if self.dim == -1 or v.dim() == 0:
            return torch.linalg.vector_norm(v, ord=self.p)
        dim = self.dim % v.dim()
        others = [d for d in range(v.dim()) if d != dim]
        if not others:  # a 1-d tensor: each element is a slice (vector_norm would take dim=[] as all)
            return v.abs()
        return torch.linalg.vector_norm(v, ord=self.p, dim=others, keepdim=True)

    def forward(self, v: Tensor) -> Tensor:
        return v * (self.rho / self.norms(v))

    def right_inverse(self, weight: Tensor) -> Tensor:
        # Any v in the direction of `weight` parametrizes it; take the weight itself.
        return weight

    def extra_repr(self) -> str:
        p = "inf" if self.p == math.inf else int(self.p)
        return f"p={p}, dim={None if self.dim == -1 else self.dim}, rho={float(self.rho):.6g}"


def bounded_weight_norm(module: nn.Module, name: str = "weight", p: Union[int, float, str] = 2,
                        dim: Optional[int] = 0, rho: Optional[float] = None) -> nn.Module:
    """Bounded weight normalization of "Norm matters" (Hoffer et al., 2018) on ``module.<name>``
    (Linear, Conv*d, any module with such a parameter), as a ``torch.nn.utils.parametrize``
    parametrization: ``w = rho * v / ||v||_p`` per output channel, so each channel's Lp norm
    stays ``rho`` whatever the optimizer does to ``v``.

    Args:
        p: 1, 2 or ``inf`` (the largest absolute value).
        dim: the dimension kept, as in ``torch.nn.utils.parametrizations.weight_norm``: one
            norm per slice along ``dim`` (0: per output channel of Linear / Conv; 1 for
            ConvTranspose); None (or -1, as torch) for one norm over the whole tensor.
        rho: the fixed, not learned, norm; by default the mean of the initial per-slice
            p-norms of the weight.

    The parameter ``v`` lives at ``module.parametrizations.<name>.original`` (initialized to the
    current weight) and ``rho`` is a buffer of the parametrization. Remove it with
    ``torch.nn.utils.parametrize.remove_parametrizations(module, name)``, which leaves the
    effective weight as a plain parameter. Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"bounded_weight_norm: module has no tensor '{name}'")
    if dim is not None and dim != -1 and not -weight.dim() <= dim < weight.dim():
        raise IndexError(f"bounded_weight_norm: dim={dim} is out of range for '{name}' of {weight.dim()} "
                         f"dimensions (expected [{-weight.dim()}, {weight.dim() - 1}], or None / -1 for the whole tensor)")
    parametrization = BoundedWeightNorm(p, dim, like=weight)
    if rho is None:
        with torch.no_grad():
            rho = parametrization.norms(weight).mean()
    rho = float(rho)
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"bounded_weight_norm: rho must be a finite number > 0, got {rho!r}")
    parametrization.rho.fill_(rho)
    parametrize.register_parametrization(module, name, parametrization)
    return module
