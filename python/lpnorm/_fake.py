"""Fake (meta) kernels: the shapes and dtypes of each operator's outputs, so that
torch.compile and torch.library.opcheck can trace the operators without running them."""

import torch

# Saved gradient entries per chunk, as csrc/core/norm.h's sparse_per_chunk().
_SPARSE_PER_CHUNK = {"linf": lambda k: 1, "topk": lambda k: k, "range": lambda k: 2}


def _stats_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _check_accumulate(accumulate):
    """The real kernels refuse any other value before they run; so does tracing."""
    if accumulate not in ("float", "half"):
        raise ValueError(f"lpnorm.batch_norm: accumulate must be 'float' or 'half'; got '{accumulate}'")


def _check_eps(training, eps):
    """torch's batch_norm refusals of eps, which the real kernels raise too."""
    if training and eps <= 0:
        raise ValueError(f"lpnorm.batch_norm: eps must be positive during training, got {eps}")
    if eps < 0:
        raise ValueError(f"lpnorm.batch_norm: eps must be non-negative, got {eps}")


def _check_devices(input, **tensors):
    """A tensor on the meta device routes the call here instead of to a real kernel, whose
    checks would refuse mixed devices: refuse them here too (SPEC §5)."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"lpnorm.batch_norm: {name} is on {tensor.device} but input is on {input.device}")


@torch.library.register_fake("lpnorm::batch_norm_forward")
def _batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                        norm, k, p, chunks, constant, accumulate="float"):
    _check_accumulate(accumulate)
    _check_eps(training, eps)
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    channels = input.shape[1]
    per_chunk = _SPARSE_PER_CHUNK.get(norm, lambda k: 0)(k)
    cols = chunks * per_chunk if training else 0
    stats = _stats_dtype(input)
    return (
        torch.empty_like(input),
        input.new_empty((channels,), dtype=stats),
        input.new_empty((channels,), dtype=stats),
        input.new_empty((channels, 3), dtype=stats),
        input.new_empty((channels, cols), dtype=torch.int64),
        input.new_empty((channels, cols), dtype=stats),
    )


@torch.library.register_fake("lpnorm::batch_norm_backward")
def _batch_norm_backward(grad_output, input, weight, save_mean, save_invstd, save_coef, sparse_index,
                         sparse_coef, training, norm, p, accumulate="float"):
    _check_accumulate(accumulate)
    _check_devices(input, grad_output=grad_output, weight=weight)
    channels = input.shape[1]
    param = weight.dtype if weight is not None else _stats_dtype(input)
    return (
        torch.empty_like(input),
        input.new_empty((channels,), dtype=param),
        input.new_empty((channels,), dtype=param),
    )


@torch.library.register_fake("lpnorm::batch_norm")
def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p,
                chunks, constant, accumulate="float"):
    _check_accumulate(accumulate)
    _check_eps(training, eps)
    _check_devices(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    return torch.empty_like(input)


# ---- the stage operators (lpnorm.nn.SyncLpBatchNorm; chunks == 1, float64 statistics) ----

_EXTREMES_PER_END = {"linf": lambda k: 1, "topk": lambda k: k, "range": lambda k: 1}


@torch.library.register_fake("lpnorm::batch_norm_collect")
def _batch_norm_collect(input, norm, k, index_offset):
    channels = input.shape[1]
    per_end = _EXTREMES_PER_END.get(norm, lambda k: 0)(k)
    return (
        input.new_empty((channels,), dtype=torch.float64),
        input.new_empty((channels, 2, per_end), dtype=torch.float64),
        input.new_empty((channels, 2, per_end), dtype=torch.int64),
    )


@torch.library.register_fake("lpnorm::batch_norm_deviations")
def _batch_norm_deviations(input, mean, norm, p):
    _check_devices(input, mean=mean)
    channels = input.shape[1]
    return (input.new_empty((channels,), dtype=torch.float64), input.new_empty((channels,), dtype=torch.float64))


@torch.library.register_fake("lpnorm::batch_norm_finalize")
def _batch_norm_finalize(count, sum, deviation_sum, phi_sum, extreme_value, extreme_index, eps, norm, k, p,
                         constant):
    channels = sum.shape[0]
    cols = _SPARSE_PER_CHUNK.get(norm, lambda k: 0)(k)
    per_channel = sum.new_empty((channels,), dtype=torch.float64)
    return (
        per_channel,
        sum.new_empty((channels,), dtype=torch.float64),
        sum.new_empty((channels, 3), dtype=torch.float64),
        sum.new_empty((channels, cols), dtype=torch.int64),
        sum.new_empty((channels, cols), dtype=torch.float64),
        sum.new_empty((channels,), dtype=torch.float64),
    )


@torch.library.register_fake("lpnorm::batch_norm_apply")
def _batch_norm_apply(input, mean, invstd, weight, bias):
    _check_devices(input, mean=mean, invstd=invstd, weight=weight, bias=bias)
    return torch.empty_like(input)


@torch.library.register_fake("lpnorm::batch_norm_reduce_grad")
def _batch_norm_reduce_grad(grad_output, input, mean):
    _check_devices(input, grad_output=grad_output, mean=mean)
    channels = input.shape[1]
    return (input.new_empty((channels,), dtype=torch.float64), input.new_empty((channels,), dtype=torch.float64))


@torch.library.register_fake("lpnorm::batch_norm_apply_grad")
def _batch_norm_apply_grad(grad_output, input, weight, mean, invstd, save_coef, sparse_index, sparse_coef, sum_g,
                           sum_gd, count, norm, p, index_offset):
    _check_devices(input, grad_output=grad_output, weight=weight, mean=mean, invstd=invstd)
    return torch.empty_like(input)
