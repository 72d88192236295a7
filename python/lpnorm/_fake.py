"""Fake (meta) kernels: the shapes and dtypes of each operator's outputs, so that
torch.compile and torch.library.opcheck can trace the operators without running them."""

import torch

# Saved gradient entries per chunk, as csrc/core/norm.h's sparse_per_chunk().
_SPARSE_PER_CHUNK = {"linf": lambda k: 1, "topk": lambda k: k, "range": lambda k: 2}


def _stats_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.register_fake("lpnorm::batch_norm_forward")
def _batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                        norm, k, p, chunks, constant):
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
                         sparse_coef, training, norm, p):
    channels = input.shape[1]
    param = weight.dtype if weight is not None else _stats_dtype(input)
    return (
        torch.empty_like(input),
        input.new_empty((channels,), dtype=param),
        input.new_empty((channels,), dtype=param),
    )


@torch.library.register_fake("lpnorm::batch_norm")
def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p,
                chunks, constant):
    return torch.empty_like(input)
