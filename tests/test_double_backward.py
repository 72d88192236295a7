"""Gradients of gradients (create_graph=True), as torch's batch norm supports them for gradient
penalties: gradgradcheck in float64 for every norm, in training and eval; the first-order
gradients of a plain backward are still those of the native backward operator."""
import pytest
import torch
import torch.nn.functional as F

import lpnorm
from conftest import NORMS, devices_param, distinct_input, norm_id, norms_param

SHAPE = (4, 3, 5)  # m = 20 values per channel: k=10 fits, and 10 per chunk with chunks=2


def leaves(shape=SHAPE, dtype=torch.float64, device="cpu"):
    C = shape[1]
    x = distinct_input(shape, dtype).to(device).requires_grad_()
    weight = (torch.rand(C, dtype=dtype) + 0.5).to(device).requires_grad_()
    bias = torch.randn(C, dtype=dtype).to(device).requires_grad_()
    return x, weight, bias


@norms_param()
@devices_param()
def test_gradgradcheck_batch_statistics(norm_kwargs, device):
    x, weight, bias = leaves(device=device)

    def fn(x, weight, bias):
        return lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True, **norm_kwargs)
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3, chunks=2)], ids=norm_id)
def test_gradgradcheck_2d_input_without_affine(norm_kwargs):
    x = distinct_input((12, 3)).requires_grad_()

    def fn(x):
        return lpnorm.functional.batch_norm(x, None, None, training=True, **norm_kwargs)
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="linf"), dict(norm="range", chunks=2)],
                         ids=norm_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_with_running_stats(norm_kwargs, training):
    """Eval uses the running statistics (constants); training updates them, which must not
    change the gradients."""
    x, weight, bias = leaves((4, 3, 2, 3))
    running_mean = torch.randn(3, dtype=x.dtype)
    running_var = torch.rand(3, dtype=x.dtype) + 0.5

    def fn(x, weight, bias):
        return lpnorm.functional.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                            training=training, **norm_kwargs)
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


@norms_param()
def test_constant_channel_gives_finite_second_derivatives(norm_kwargs):
    """A channel of one value (a dead ReLU's) has sigma = 0: the composite keeps square roots
    and powers of 0 out of the graph, so gradients of gradients stay finite, and the first-order
    ones are the native backward's."""
    x, weight, bias = leaves()
    with torch.no_grad():
        x[:, 1] = 0.25
    y = lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True, **norm_kwargs)
    g = torch.randn_like(y)
    plain = torch.autograd.grad(y, (x, weight, bias), g, retain_graph=True)
    graph = torch.autograd.grad(y, (x, weight, bias), g, create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(b.detach(), a, rtol=1e-10, atol=1e-10)
    second = torch.autograd.grad(sum(t.square().sum() for t in graph), (x, weight))
    assert all(torch.isfinite(t).all() for t in second)


def gradient_penalty(batch_norm, x, weight, bias):
    """The squared norm of dL/dx for L = sum(y^2 * c), differentiated again (WGAN-GP style)."""
    y = batch_norm(x, weight, bias)
    c = torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).view_as(y)
    (grad_x,) = torch.autograd.grad((y.square() * c).sum(), x, create_graph=True)
    penalty = grad_x.square().sum()
    return [penalty] + list(torch.autograd.grad(penalty, (x, weight, bias)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_l2_gradient_penalty_is_torch_batch_norm(training):
    """norm='l2' is torch's batch norm, also in its second derivatives."""
    x, weight, bias = leaves((6, 3, 4))
    running_mean, running_var = torch.randn(3, dtype=x.dtype), torch.rand(3, dtype=x.dtype) + 0.5
    ours = gradient_penalty(
        lambda x, w, b: lpnorm.functional.batch_norm(x, running_mean.clone(), running_var.clone(), w, b,
                                                     training=training, norm="l2"), x, weight, bias)
    theirs = gradient_penalty(
        lambda x, w, b: F.batch_norm(x, running_mean.clone(), running_var.clone(), w, b, training=training),
        x, weight, bias)
    for actual, expected, what in zip(ours, theirs, ["penalty", "d/dx", "d/dweight", "d/dbias"]):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("norm_kwargs", [NORMS[1], NORMS[3]], ids=norm_id)
def test_first_order_gradients_are_the_native_backward(norm_kwargs):
    """Without create_graph the backward is the native operator, bit for bit; with it, the
    differentiable composite gives the same values up to rounding."""
    x, weight, bias = leaves()
    options = dict(dict(k=10, p=2.0, chunks=1, constant="exact"), **norm_kwargs)
    y = lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True, **options)
    g = torch.randn_like(y)
    plain = torch.autograd.grad(y, (x, weight, bias), g, retain_graph=True)
    graph = torch.autograd.grad(y, (x, weight, bias), g, create_graph=True)
    assert all(t.grad_fn is not None for t in graph[:2])

    _, *saved = torch.ops.lpnorm.batch_norm_forward(
        x.detach(), weight.detach(), bias.detach(), None, None, True, 0.1, 1e-5, options["norm"],
        options["k"], options["p"], options["chunks"], options["constant"])
    native = torch.ops.lpnorm.batch_norm_backward(g, x.detach(), weight.detach(), *saved, True,
                                                  options["norm"], options["p"])
    for a, b, c in zip(plain, native, graph):
        assert torch.equal(a, b)
        torch.testing.assert_close(c.detach(), a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, param_dtype", [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32)], ids=["float32", "bfloat16-mixed"])
def test_create_graph_keeps_dtypes(dtype, param_dtype):
    """Gradients built with create_graph have the dtypes of a plain backward."""
    x = torch.randn(8, 3, 4).to(dtype).requires_grad_()
    weight = torch.rand(3, dtype=param_dtype).add_(0.5).requires_grad_()
    bias = torch.zeros(3, dtype=param_dtype).requires_grad_()
    y = lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True, norm="topk", k=3)
    plain = torch.autograd.grad(y.float().sum(), (x, weight, bias), retain_graph=True)
    graph = torch.autograd.grad(y.float().sum(), (x, weight, bias), create_graph=True)
    for a, b in zip(plain, graph):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.detach().double(), a.double(), rtol=0.02, atol=0.02)
