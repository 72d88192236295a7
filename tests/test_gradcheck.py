"""Gradients by finite differences (SPEC §3) and the operator registrations (SPEC §6, opcheck)."""
import pytest
import torch

import lpnorm
import reference
from conftest import NORMS, channels_last, devices_param, distinct_input, norm_id

SHAPES = [(4, 3, 5), (6, 2)]


def chunk_size(shape, norm_kwargs):
    m = shape[0] * (shape[2] if len(shape) > 2 else 1)
    return m // norm_kwargs.get("chunks", 1)


CASES = [(n, s) for n in NORMS for s in SHAPES if n.get("k", 1) <= chunk_size(s, n)]


def inputs(shape, dtype=torch.float64, device="cpu"):
    C = shape[1]
    x = distinct_input(shape, dtype).to(device).requires_grad_()
    weight = (torch.rand(C, dtype=dtype) + 0.5).to(device).requires_grad_()
    bias = torch.randn(C, dtype=dtype).to(device).requires_grad_()
    return x, weight, bias


# ---------------------------------------------------------------------------------------------
# gradcheck

@pytest.mark.parametrize("norm_kwargs, shape", CASES,
                         ids=[f"{norm_id(n)}-{'x'.join(map(str, s))}" for n, s in CASES])
@devices_param()
def test_gradcheck_batch_statistics(norm_kwargs, shape, device):
    x, weight, bias = inputs(shape, device=device)

    def fn(x, weight, bias):
        return lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True,
                                            **norm_kwargs)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3, chunks=2)],
                         ids=norm_id)
@devices_param()
def test_gradcheck_training_with_running_stats(norm_kwargs, device):
    """Updating the running statistics does not change the gradients."""
    x, weight, bias = inputs((4, 3, 5), device=device)
    running_mean = torch.zeros(3, dtype=x.dtype, device=device)
    running_var = torch.ones(3, dtype=x.dtype, device=device)

    def fn(x, weight, bias):
        return lpnorm.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                            training=True, **norm_kwargs)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="linf"), dict(norm="range")],
                         ids=norm_id)
@devices_param()
def test_gradcheck_eval_with_running_stats(norm_kwargs, device):
    """Eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    x, weight, bias = inputs((4, 3, 5), device=device)
    running_mean = torch.randn(3, dtype=x.dtype).to(device)
    running_var = (torch.rand(3, dtype=x.dtype) + 0.5).to(device)

    def fn(x, weight, bias):
        return lpnorm.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                            training=False, **norm_kwargs)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("norm_kwargs, shape", CASES,
                         ids=[f"{norm_id(n)}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_gradcheck_reference(norm_kwargs, shape):
    """The reference's autograd (which the other tests trust) agrees with finite differences."""
    x, weight, bias = inputs(shape)

    def fn(x, weight, bias):
        return reference.batch_norm(x, None, None, weight, bias, training=True, **norm_kwargs)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


# ---------------------------------------------------------------------------------------------
# opcheck: schemas (mutated running statistics), autograd registration, fake kernels, AOT

def op_args(shape=(4, 3, 5), dtype=torch.float32, training=True, running_stats=True,
            affine=True, layout=None, requires_grad=False, norm="l1", k=10, p=2.0, chunks=1,
            constant="exact", momentum=0.1, eps=1e-5, device="cpu"):
    """Arguments of torch.ops.lpnorm.batch_norm / batch_norm_forward, in schema order."""
    C = shape[1]
    x = torch.randn(shape, dtype=dtype).to(device)
    if layout is not None:
        x = layout(x)
    weight = (torch.rand(C, dtype=dtype) + 0.5).to(device) if affine else None
    bias = torch.randn(C, dtype=dtype).to(device) if affine else None
    if requires_grad:
        x.requires_grad_()
        if affine:
            weight.requires_grad_()
            bias.requires_grad_()
    running_mean = torch.randn(C, dtype=dtype).to(device) if running_stats else None
    running_var = (torch.rand(C, dtype=dtype) + 0.5).to(device) if running_stats else None
    return (x, weight, bias, running_mean, running_var, training, momentum, eps, norm, k, p,
            chunks, constant)


OP_SAMPLES = {
    "l1-train-stats": dict(),
    "l1-train-no_stats-float64": dict(running_stats=False, dtype=torch.float64),
    "l1-eval-stats": dict(training=False),
    "l2-eval-stats-float64-no_affine": dict(training=False, norm="l2", affine=False,
                                            dtype=torch.float64),
    "linf-train-chunks2-channels_last": dict(shape=(4, 3, 5, 6), layout=channels_last,
                                             norm="linf", chunks=2),
    "topk-train-stats-float64": dict(norm="topk", k=3, dtype=torch.float64),
    "topk-paper-train-no_stats": dict(norm="topk", k=3, constant="paper", running_stats=False),
    "topk-chunks2-channels_last-float64": dict(shape=(4, 3, 5, 6), layout=channels_last,
                                               norm="topk", k=2, chunks=2, dtype=torch.float64),
    "range-chunks2-train-stats": dict(norm="range", chunks=2),
    "range-eval-stats-float64": dict(norm="range", training=False, dtype=torch.float64),
    "p1.5-train-no_affine": dict(norm="p", p=1.5, affine=False),
    "p3-train-2d-float64": dict(shape=(16, 3), norm="p", p=3.0, dtype=torch.float64),
}


@pytest.mark.parametrize("sample", list(OP_SAMPLES))
@devices_param()
def test_opcheck_batch_norm(sample, device):
    args = op_args(requires_grad=True, device=device, **OP_SAMPLES[sample])
    torch.library.opcheck(torch.ops.lpnorm.batch_norm.default, args)


@pytest.mark.parametrize("sample", list(OP_SAMPLES))
@devices_param()
def test_opcheck_batch_norm_forward(sample, device):
    args = op_args(device=device, **OP_SAMPLES[sample])
    torch.library.opcheck(torch.ops.lpnorm.batch_norm_forward.default, args)


@pytest.mark.parametrize("sample", list(OP_SAMPLES))
@devices_param()
def test_opcheck_batch_norm_backward(sample, device):
    """Sample inputs are what batch_norm_forward saves for the backward."""
    kwargs = OP_SAMPLES[sample]
    args = op_args(device=device, **kwargs)
    x, weight, training, norm, p = args[0], args[1], args[5], args[8], args[10]
    _, *saved = torch.ops.lpnorm.batch_norm_forward(*args)
    grad_output = torch.randn_like(x)
    backward_args = (grad_output, x, weight, *saved, training, norm, p)
    torch.library.opcheck(torch.ops.lpnorm.batch_norm_backward.default, backward_args)


@devices_param()
def test_backward_op_is_the_gradient(device):
    """batch_norm_backward, fed what batch_norm_forward saved, returns the autograd gradients."""
    args = op_args(dtype=torch.float64, norm="topk", k=3, running_stats=False, device=device)
    x, weight, bias = (t.clone().requires_grad_() for t in args[:3])
    y = torch.ops.lpnorm.batch_norm(x, weight, bias, *args[3:])
    grad_output = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, weight, bias), grad_output)
    output, *saved = torch.ops.lpnorm.batch_norm_forward(*args)
    torch.testing.assert_close(output, y.detach())
    grads = torch.ops.lpnorm.batch_norm_backward(grad_output, args[0], args[1], *saved, True,
                                                 "topk", 2.0)
    for actual, wanted in zip(grads, expected):
        torch.testing.assert_close(actual, wanted)
