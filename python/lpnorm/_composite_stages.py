"""The stage operators (``torch.ops.lpnorm.batch_norm_collect`` ..., SyncLpBatchNorm's passes)
as compositions of ATen operators, registered for CUDA, which has no native stage kernels.

They keep the CPU kernels' contract (csrc/ops/cpu/batch_norm_stages.cpp):

- per-channel results in float64; sums in float64 of terms computed in the accumulation type
  (float64 for float64 inputs, float32 otherwise), as the CPU passes;
- candidate lists ``[C, 2, per_end]``, end 0 the largest x, end 1 the smallest (as -x), each
  largest first with ties to the lowest flat index (``n * S + s``, plus ``index_offset``);
  NaN and -inf never enter; empty slots hold -inf and INT64_MAX;
- elements the sparse gradient terms touch are recomputed in float64, as the CPU pass does.

What they cost over native kernels: a full-size temporary per element-wise step, and for
top-k's candidates a few passes over each channel (a selection, a running count of the ties
at its threshold) and a sort of the k chosen, where the CPU lists take one pass.
``batch_norm_finalize`` works on per-channel tensors only: it runs the CPU kernel on copies.

The tests run these functions on CPU tensors against the CPU kernels, and SyncLpBatchNorm
through them over gloo (tests/test_sync_batchnorm.py).
"""

import math

import torch

from ._fake import _EXTREMES_PER_END, _stats_dtype

_NO_INDEX = torch.iinfo(torch.int64).max
_NORMS = ("l2", "l1", "linf", "topk", "range", "p")
_DENSE_NORMS = ("l2", "l1", "p")


def _check(input: torch.Tensor, op: str, norm: str = "l2", grad_output=None) -> None:
    if input.dim() < 2:
        raise ValueError(f"lpnorm.{op}: input must have at least 2 dimensions (N, C, ...), got shape "
                         f"{tuple(input.shape)}")
    if input.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"lpnorm.{op}: input must be float64, float32, float16 or bfloat16, got {input.dtype}")
    if norm not in _NORMS:
        raise ValueError(f"lpnorm.{op}: norm must be one of {', '.join(repr(n) for n in _NORMS)}; got {norm!r}")
    if grad_output is not None and grad_output.shape != input.shape:
        raise ValueError(f"lpnorm.{op}: grad_output has shape {tuple(grad_output.shape)} but input has shape "
                         f"{tuple(input.shape)}")


def _reduced_dims(input: torch.Tensor) -> list:
    """Every dimension but the channels'."""
    return [0] + list(range(2, input.dim()))


def _per_channel(values: torch.Tensor, input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [C] tensor shaped to broadcast against input, in dtype."""
    return values.reshape(1, -1, *([1] * (input.dim() - 2))).to(dtype)


def _centered(input: torch.Tensor, mean: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """d = x - mean in the accumulation type, as the CPU passes compute it."""
    return input.to(acc) - _per_channel(mean, input, acc)


def _terms(d: torch.Tensor, norm: str, p: float):
    """|d|^q and phi(d) of a dense norm (csrc/cpu/isa/vectors.h, deviation_terms)."""
    if norm == "l2":
        return d * d, d
    if norm == "l1":
        return d.abs(), d.sign()
    magnitude = d.abs()
    below = magnitude.pow(p - 1.0)
    return below * magnitude, d.sign() * below


def collect(input, norm, k, index_offset):
    _check(input, "batch_norm_collect", norm)
    channels = input.shape[1]
    per_end = _EXTREMES_PER_END.get(norm, lambda k: 0)(k)
    if norm == "topk" and k < 1:
        raise ValueError(f"lpnorm.batch_norm_collect: k must be >= 1, got {k}")
    total = input.sum(dim=_reduced_dims(input), dtype=torch.float64)
    value = input.new_full((channels, 2, per_end), float("-inf"), dtype=torch.float64)
    index = input.new_full((channels, 2, per_end), _NO_INDEX, dtype=torch.int64)
    count = input.numel() // max(channels, 1)
    take = min(per_end, count)
    if take == 0:  # (no channels: no elements either)
        return total, value, index
    # Column n * S + s of channel c: the flat index the CPU lists keep.
    by_channel = input.transpose(0, 1).reshape(channels, -1).to(_stats_dtype(input))
    for end, values in enumerate((by_channel, -by_channel)):
        key = torch.where(values > float("-inf"), values, float("-inf"))  # NaN too: never enters
        top, at = _largest_first(key, take)
        entered = top > float("-inf")
        value[:, end, :take] = torch.where(entered, top.to(torch.float64), float("-inf"))
        index[:, end, :take] = torch.where(entered, at + index_offset, _NO_INDEX)
    return total, value, index


def _largest_first(key: torch.Tensor, take: int):
    """Each row's `take` largest keys and their columns, largest first, equal keys by column
    (torch.topk's choice among equal keys is unspecified): the take-th largest value T by
    topk, every key above it and the first columns equal to it, then those sorted (stable)."""
    if take == 1:
        top = key.amax(dim=1, keepdim=True)
        return top, (key == top).to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax: the first
    threshold = torch.topk(key, take, dim=1).values[:, -1:]
    above = key > threshold
    equal = key == threshold
    wanted = take - above.sum(dim=1, keepdim=True)  # at least 1, at most the equal keys
    chosen = above | (equal & (equal.cumsum(dim=1) <= wanted))  # exactly `take` a row
    at = chosen.nonzero()[:, 1].reshape(key.shape[0], take)  # column order
    top, order = torch.sort(key.gather(1, at), dim=1, descending=True, stable=True)
    return top, at.gather(1, order)


def deviations(input, mean, norm, p):
    _check(input, "batch_norm_deviations", norm)
    dims = _reduced_dims(input)
    if norm not in _DENSE_NORMS:
        zeros = input.new_zeros((input.shape[1],), dtype=torch.float64)
        return zeros, zeros.clone()
    # The general p norm in float64: |d|^p leaves float's range early (the CPU kernels redo
    # those channels in double).
    acc = torch.float64 if norm == "p" else _stats_dtype(input)
    d = _centered(input, mean, acc)
    magnitude_q, phi = _terms(d, norm, p)
    return magnitude_q.sum(dim=dims, dtype=torch.float64), phi.sum(dim=dims, dtype=torch.float64)


def finalize(count, sum, deviation_sum, phi_sum, extreme_value, extreme_index, eps, norm, k, p, constant):
    device = sum.device
    results = torch.ops.lpnorm.batch_norm_finalize(
        count, sum.cpu(), deviation_sum.cpu(), phi_sum.cpu(), extreme_value.cpu(), extreme_index.cpu(), eps, norm, k, p,
        constant)
    return tuple(t.to(device) for t in results)


def apply(input, mean, invstd, weight, bias):
    _check(input, "batch_norm_apply")
    acc = _stats_dtype(input)
    scale = invstd.to(torch.float64) * (weight.to(torch.float64) if weight is not None else 1.0)
    shift = bias if bias is not None else torch.zeros_like(scale)
    y = _centered(input, mean, acc) * _per_channel(scale, input, acc)
    return (y + _per_channel(shift, input, acc)).to(input.dtype)


def reduce_grad(grad_output, input, mean):
    _check(input, "batch_norm_reduce_grad", grad_output=grad_output)
    acc = _stats_dtype(input)
    dims = _reduced_dims(input)
    g = grad_output.to(acc)
    d = _centered(input, mean, acc)
    return g.sum(dim=dims, dtype=torch.float64), (g * d).sum(dim=dims, dtype=torch.float64)


def apply_grad(grad_output, input, weight, mean, invstd, save_coef, sparse_index, sparse_coef, sum_g, sum_gd, count,
               norm, p, index_offset):
    _check(input, "batch_norm_apply_grad", norm, grad_output)
    acc = _stats_dtype(input)
    f64 = torch.float64
    mean, invstd, sum_g, sum_gd = (t.to(f64).reshape(-1) for t in (mean, invstd, sum_g, sum_gd))
    coef = save_coef.to(f64).reshape(-1, 3)
    sigma, phi_scale, phi_offset = coef[:, 0], coef[:, 1], coef[:, 2]
    w = weight.to(f64) if weight is not None else torch.ones_like(invstd)
    # core::grad_coefficients, term by term in the same order (csrc/core/channel_math.h).
    scale_g = w * invstd
    if count > 0:
        dsigma = -w * sigma * invstd * invstd * invstd * sum_gd
        offset = -w * invstd * sum_g / float(count) + dsigma * phi_offset
        scale_phi = dsigma * phi_scale
    else:  # no batch: the statistics did not move
        dsigma = offset = scale_phi = torch.zeros_like(invstd)

    out = torch.empty_like(input, dtype=acc)  # in the input's layout, as the CPU kernels (not grad's)
    torch.mul(grad_output.to(acc), _per_channel(scale_g, input, acc), out=out)
    if norm in _DENSE_NORMS:
        _, phi = _terms(_centered(input, mean, acc), norm, p)
        out.add_(phi * _per_channel(scale_phi, input, acc))
    out.add_(_per_channel(offset, input, acc))

    if sparse_index.numel() > 0 and input.numel() > 0:
        _add_sparse_terms(out, grad_output, input, scale_g, offset, dsigma, sparse_index, sparse_coef, norm,
                          index_offset)
    return out.to(input.dtype)


def _add_sparse_terms(out, grad_output, input, scale_g, offset, dsigma, sparse_index, sparse_coef, norm, index_offset):
    """Writes into `out` the elements at this process's saved sparse indices, recomputed whole
    in float64 with their terms (the norms with sparse terms have no phi term): scale_g g +
    offset + dsigma sum(coef)."""
    channels = input.shape[1]
    channel_shape = (input.shape[0], *input.shape[2:])  # a channel's elements: flat index n * S + s
    local = sparse_index - index_offset
    coef = sparse_coef.to(torch.float64)
    if norm == "range":  # the arg-max and arg-min coincide on a constant channel: their terms add
        same = local.unsqueeze(2) == local.unsqueeze(1)
        coef = (coef.unsqueeze(1) * same).sum(dim=2)
    inside = (local >= 0) & (local < math.prod(channel_shape))
    channel = torch.arange(channels, device=local.device).unsqueeze(1).expand_as(local)[inside]
    local, coef = local[inside], coef[inside]
    n, *spatial = torch.unravel_index(local, channel_shape)
    at = (n, channel, *spatial)  # any strides: out keeps the input's layout
    g = grad_output[at].to(torch.float64)
    out[at] = (scale_g[channel] * g + offset[channel] + dsigma[channel] * coef).to(out.dtype)


_STAGES = {
    "batch_norm_collect": collect,
    "batch_norm_deviations": deviations,
    "batch_norm_finalize": finalize,
    "batch_norm_apply": apply,
    "batch_norm_reduce_grad": reduce_grad,
    "batch_norm_apply_grad": apply_grad,
}


def register(library: torch.library.Library, dispatch_key: str) -> None:
    """Registers the composites as the stage operators' kernels for dispatch_key."""
    for name, fn in _STAGES.items():
        library.impl(name, fn, dispatch_key)


_LIBRARY = torch.library.Library("lpnorm", "IMPL")
register(_LIBRARY, "CUDA")
