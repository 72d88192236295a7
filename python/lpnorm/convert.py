"""One-line model conversion: every torch batch norm to Lp batch norm (`convert`), and back
(`to_torch`) for deployment.

Semantics, both ways:

- In place: each batch-norm module is replaced inside its parent (nested containers included)
  and the model is returned. A model that *is* a batch norm cannot be replaced in place: the
  replacement is returned, so always use the result (``model = lpnorm.convert(model)``).
- The replacement holds the very same ``Parameter`` and buffer tensors (``weight``, ``bias``,
  ``running_mean``, ``running_var``, ``num_batches_tracked``), as torch's
  ``SyncBatchNorm.convert_sync_batchnorm`` does: device, dtype, ``requires_grad`` and values
  are kept by construction, and an optimizer built before the conversion still updates them.
  (The old module, if the caller kept it, shares them.)
- ``num_features``, ``eps``, ``momentum`` (``None`` too), ``affine``, ``bias``,
  ``track_running_stats``, the train/eval flag and ``qconfig`` are copied. Hooks are not carried over.
- A module met twice (shared) gets one replacement, still shared.
- Classes: ``nn.BatchNorm1d/2d/3d`` (and subclasses) <-> ``LpBatchNorm1d/2d/3d``;
  ``nn.SyncBatchNorm`` <-> ``lpnorm.nn.SyncLpBatchNorm`` (statistics over the same
  ``process_group``; any input rank >= 2, as SyncBatchNorm; ``chunks`` must be 1 there).
  ``to_torch`` also turns an ``LpBatchNormNd`` (local statistics, any rank) into an
  ``nn.SyncBatchNorm`` with its recorded process group.
- ``convert`` leaves modules that are already Lp batch norms alone, whatever their norm
  (to change the norm: ``convert(to_torch(model), norm=...)``).

In eval mode every Lp batch norm computes plain batch norm from its running statistics
(SPEC §2), so ``to_torch(model)`` gives the same eval outputs (except for modules built with
``track_running_stats=False``, which use batch statistics in eval too, so their norm matters);
it forgets the norm, and training the result trains torch's L2 batch norm.
"""

from typing import Callable, Dict, Optional, Type

from torch import nn
from torch.nn.modules.batchnorm import _LazyNormBase

from .nn.sync_batchnorm import SyncLpBatchNorm
from .nn.batchnorm import (LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, LpBatchNormNd, _LpBatchNorm,
                           check_norm_options)

__all__ = ["convert", "to_torch"]

# torch class -> Lp class, and back. SyncBatchNorm is not a subclass of BatchNorm1d/2d/3d.
_TO_LP = ((nn.SyncBatchNorm, SyncLpBatchNorm), (nn.BatchNorm1d, LpBatchNorm1d),
          (nn.BatchNorm2d, LpBatchNorm2d), (nn.BatchNorm3d, LpBatchNorm3d))
_TO_TORCH = ((SyncLpBatchNorm, nn.SyncBatchNorm), (LpBatchNormNd, nn.SyncBatchNorm), (LpBatchNorm1d, nn.BatchNorm1d),
             (LpBatchNorm2d, nn.BatchNorm2d), (LpBatchNorm3d, nn.BatchNorm3d))

_OPTIONS = ("k", "p", "chunks", "constant", "accumulate")
_DEFAULTS = dict(k=10, p=2.0, chunks=1, constant="exact", accumulate="float")


def convert(model: nn.Module, norm: str = "l1", **options) -> nn.Module:
    """Replaces every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` of ``model`` by an Lp
    batch norm with ``norm`` and ``options`` (``k``, ``p``, ``chunks``, ``constant``, ``accumulate``, as the
    ``LpBatchNorm*d`` constructors take), in place; returns ``model``, or the replacement when
    ``model`` itself is a batch norm. See the module's documentation for what is kept.

    Example::

        model = lpnorm.convert(torchvision.models.resnet18(), norm="l1")
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"lpnorm.convert: unexpected option(s) {', '.join(unknown)}; "
                        f"the options are {', '.join(_OPTIONS)}")
    options = {**_DEFAULTS, **options}
    check_norm_options(norm, **options)

    def replace(module: nn.Module) -> Optional[nn.Module]:
        if isinstance(module, _LpBatchNorm):
            return None
        if isinstance(module, _LazyNormBase):  # becomes an nn.BatchNorm*d at its first forward
            raise ValueError(f"lpnorm.convert: {type(module).__name__} is uninitialized; run a forward pass "
                             "first so that it knows its number of features")
        target = _target(module, _TO_LP)
        if target is None:
            return None
        extra = dict(norm=norm, **options)
        if target is SyncLpBatchNorm:
            extra["process_group"] = module.process_group
        return _rebuild(module, target, extra)

    return _replace_all(model, replace)


def to_torch(model: nn.Module) -> nn.Module:
    """Replaces every Lp batch norm of ``model`` by the torch batch norm it stands in for
    (``LpBatchNorm1d/2d/3d`` -> ``nn.BatchNorm1d/2d/3d``, ``SyncLpBatchNorm`` and ``LpBatchNormNd`` ->
    ``nn.SyncBatchNorm``), in place, keeping parameters, buffers and options as
    :func:`convert` does; returns ``model``, or the replacement when ``model`` itself is one.
    Eval outputs are unchanged: in eval mode every Lp batch norm is plain batch norm."""

    def replace(module: nn.Module) -> Optional[nn.Module]:
        target = _target(module, _TO_TORCH)
        if target is None:
            return None
        extra = {"process_group": module.process_group} if target is nn.SyncBatchNorm else {}
        return _rebuild(module, target, extra)

    return _replace_all(model, replace)


def _target(module: nn.Module, table) -> Optional[Type[nn.Module]]:
    for source, target in table:
        if isinstance(module, source):
            return target
    return None


def _replace_all(model: nn.Module, replace: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Walks the module tree once, replacing where `replace` returns a module; each module
    object is considered once, so shared modules stay shared."""
    done: Dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        key = id(module)
        if key in done:
            return done[key]
        new = replace(module)
        if new is None:
            done[key] = module
            for name, child in list(module._modules.items()):
                if child is not None:
                    replacement = visit(child)
                    if replacement is not child:
                        module._modules[name] = replacement
            return module
        done[key] = new
        return new

    return visit(model)


def _rebuild(old: nn.Module, cls: Type[nn.Module], extra: dict) -> nn.Module:
    """A `cls` with `old`'s options, train/eval flag, and its very parameter and buffer objects."""
    like = next((t for t in (old.weight, old.running_mean) if t is not None), None)
    factory = {} if like is None else dict(device=like.device, dtype=like.dtype)
    if old.affine and old.bias is None:  # torch's bias=False (a weight without bias)
        factory["bias"] = False
    new = cls(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
              track_running_stats=old.track_running_stats, **factory, **extra)
    for name in ("weight", "bias"):
        new._parameters[name] = old._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
