"""lpnorm.functional.batch_norm against the float64 reference of tests/reference.py.

SPEC §1 (outputs), §2 (running statistics, eval mode), §3 (gradients), §4 (dtypes), §5 (NaN, Inf,
empty batches). The designs below cover every norm with every dtype (one shape), every norm with
every rank and layout (float32 and float64), and the affine / running-statistics switches on a few
norms, rather than the full product.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lpnorm
import reference
from conftest import (DTYPES, assert_close, batch, channels_last, channels_last_3d, contiguous,
                      devices_param, norms_param, sliced, transposed)


# ---------------------------------------------------------------------------------------------
# The harness: train a few steps with the library and the reference side by side, then evaluate

def make_params(C, dtype, affine=True, track=True):
    weight = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    bias = torch.randn(C, dtype=torch.float64).to(dtype) if affine else None
    running_mean = torch.randn(C, dtype=torch.float64).to(dtype) if track else None
    running_var = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype) if track else None
    return weight, bias, running_mean, running_var


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def clone(t):
    return None if t is None else t.clone()


def on(t, device):
    return None if t is None else t.to(device)


def check_against_reference(batches, norm_kwargs, param_dtype, *, affine=True, track=True,
                            cumulative=False, eps=1e-5):
    """For each batch, one training step: the output, the gradients of input, weight and bias
    (for the same random grad_output) and the running statistics must match the reference.
    Then, with running statistics, one eval-mode forward. The batches' device (cpu or cuda) is
    where the library runs; the reference always runs on the CPU."""
    C = batches[0].shape[1]
    device = batches[0].device
    weight, bias, running_mean, running_var = make_params(C, param_dtype, affine, track)
    ref_mean, ref_var = clone(running_mean), clone(running_var)
    weight, bias = on(weight, device), on(bias, device)
    running_mean, running_var = on(running_mean, device), on(running_var, device)

    for step, x in enumerate(batches, start=1):
        momentum = 1.0 / step if cumulative else 0.1  # cumulative: what momentum=None does
        x = x.detach().requires_grad_()  # keeps x's strides
        w, b = leaf(weight), leaf(bias)
        y = lpnorm.functional.batch_norm(x, running_mean, running_var, w, b, training=True,
                                         momentum=momentum, eps=eps, **norm_kwargs)
        assert y.device == x.device
        grad_output = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
        y.backward(grad_output.to(device))
        expected = reference.forward_backward(x.cpu(), ref_mean, ref_var, on(weight, "cpu"),
                                              on(bias, "cpu"), grad_output, training=True,
                                              momentum=momentum, eps=eps, **norm_kwargs)

        assert y.dtype == x.dtype
        assert_close(y, expected[0], what=f"step {step}: output")
        assert_close(x.grad, expected[1], what=f"step {step}: grad of input")
        if affine:
            assert w.grad.dtype == param_dtype and b.grad.dtype == param_dtype
            assert_close(w.grad, expected[2], what=f"step {step}: grad of weight")
            assert_close(b.grad, expected[3], what=f"step {step}: grad of bias")
        if track:
            assert running_mean.dtype == param_dtype and running_var.dtype == param_dtype
            assert_close(running_mean, ref_mean, what=f"step {step}: running_mean")
            assert_close(running_var, ref_var, what=f"step {step}: running_var")

    if not track:
        return
    x = batches[-1]
    saved = clone(running_mean), clone(running_var)
    with torch.no_grad():
        y = lpnorm.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                         training=False, eps=eps, **norm_kwargs)
    expected = reference.batch_norm(x.cpu(), on(running_mean, "cpu"), on(running_var, "cpu"),
                                    on(weight, "cpu"), on(bias, "cpu"), training=False, eps=eps,
                                    **norm_kwargs)
    assert_close(y, expected, what="eval output")
    assert torch.equal(running_mean, saved[0]) and torch.equal(running_var, saved[1]), \
        "eval mode must leave the running statistics alone"


def batches_of(shape, dtype, layout=contiguous, steps=3, device="cpu"):
    """Batches on `device`, in `layout` there (.to() would not keep a non-dense view's)."""
    return [layout(batch(shape, dtype, step).to(device)) for step in range(steps)]


# ---------------------------------------------------------------------------------------------
# The reference itself: for norm="l2" it is torch's batch norm

@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 5, 6), (2, 3, 4, 3, 2)])
def test_reference_l2_is_torch_batch_norm(shape, dtype_name):
    dtype, param_dtype = DTYPES[dtype_name]
    weight, bias, running_mean, running_var = make_params(shape[1], param_dtype)
    ref_mean, ref_var = clone(running_mean), clone(running_var)
    for step in range(3):
        x = batch(shape, dtype, step).requires_grad_()
        w, b = leaf(weight), leaf(bias)
        y = F.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.1)
        grad_output = torch.randn(shape, dtype=torch.float64).to(dtype)
        y.backward(grad_output)
        ry, gx, gw, gb = reference.forward_backward(x, ref_mean, ref_var, weight, bias,
                                                    grad_output, training=True, momentum=0.1,
                                                    norm="l2")
        assert_close(y, ry, what="output")
        assert_close(x.grad, gx, what="grad of input")
        assert_close(w.grad, gw, what="grad of weight")
        assert_close(b.grad, gb, what="grad of bias")
        assert_close(running_mean, ref_mean, what="running_mean")
        assert_close(running_var, ref_var, what="running_var")
    y = F.batch_norm(x.detach(), running_mean, running_var, weight, bias, training=False)
    ry = reference.batch_norm(x.detach(), running_mean, running_var, weight, bias, norm="l2")
    assert_close(y, ry, what="eval output")


def test_core_constants_match_quadrature():
    """The reference computes SPEC §1's constants by its own quadrature; the core must agree
    (both are "exact"; Monte Carlo checks of either live in test_constants.py)."""
    core = lpnorm._C
    for m in (2, 3, 10, 60, 160, 2500, 5000):
        assert core.expected_max_abs(m) == pytest.approx(reference.expected_max_abs(m), rel=1e-9)
        assert core.expected_range(m) == pytest.approx(reference.expected_range(m), rel=1e-9)
        assert core.paper_linf_multiplier(m) == pytest.approx(
            reference.paper_linf_multiplier(m), rel=1e-12)
        for k in (1, 2, 3, 10):
            if k <= m:
                assert core.expected_topk_abs(m, k) == pytest.approx(
                    reference.expected_topk_abs(m, k), rel=1e-9), (m, k)
    for p in (1.0, 1.5, 2.0, 3.0, 4.5):
        assert core.lp_consistency(p) == pytest.approx(reference.lp_consistency(p), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Every norm against the reference

@norms_param()
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@devices_param()
def test_every_norm_every_dtype(norm_kwargs, dtype_name, device):
    """SPEC §1-§4 on one 4-D shape (m = 160 per channel) in every dtype, half with half or
    float32 parameters."""
    dtype, param_dtype = DTYPES[dtype_name]
    check_against_reference(batches_of((8, 3, 5, 4), dtype, device=device), norm_kwargs,
                            param_dtype)


LAYOUTS = {  # name: (shape, layout)
    "2d": ((64, 3), contiguous),
    "3d": ((6, 3, 7), contiguous),
    "4d": ((4, 3, 5, 6), contiguous),
    "4d-channels_last": ((4, 3, 5, 6), channels_last),
    "5d": ((2, 3, 3, 4, 5), contiguous),
    "5d-channels_last_3d": ((2, 3, 3, 4, 5), channels_last_3d),
    "3d-sliced": ((6, 3, 7), sliced),
    "4d-sliced": ((4, 3, 5, 6), sliced),
    "2d-transposed": ((64, 3), transposed),
    "4d-transposed": ((4, 3, 5, 6), transposed),
}


@norms_param()
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@devices_param()
def test_every_norm_every_layout(norm_kwargs, layout, dtype, device):
    """Ranks 2..5, channels-last and non-contiguous views: the same numbers as the reference."""
    shape, make = LAYOUTS[layout]
    check_against_reference(batches_of(shape, dtype, make, device=device), norm_kwargs, dtype)


SOME_NORMS = [dict(norm="l1"), dict(norm="topk", k=3), dict(norm="range", chunks=2),
              dict(norm="p", p=1.5)]


@pytest.mark.parametrize("norm_kwargs", SOME_NORMS, ids=lambda n: "-".join(map(str, n.values())))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@devices_param()
def test_affine_and_running_stats(norm_kwargs, affine, track, dtype_name, device):
    """weight / bias and running statistics optional, as in torch. A large eps (0.1) shows where
    eps enters."""
    dtype, param_dtype = DTYPES[dtype_name]
    check_against_reference(batches_of((6, 3, 10), dtype, device=device), norm_kwargs,
                            param_dtype, affine=affine, track=track, eps=0.1)


@pytest.mark.parametrize("norm_kwargs", SOME_NORMS, ids=lambda n: "-".join(map(str, n.values())))
@devices_param()
def test_eval_without_running_stats_is_refused_like_torch(norm_kwargs, device):
    """torch.nn.functional.batch_norm refuses training=False without running statistics (only
    the modules fall back to batch statistics); the functional keeps torch's contract."""
    x = batch((6, 3, 10), torch.float32).to(device)
    weight, bias = (t.to(device) for t in make_params(3, torch.float32)[:2])
    with pytest.raises(RuntimeError, match="running_mean"):
        torch.nn.functional.batch_norm(x, None, None, weight, bias, training=False)
    with pytest.raises(ValueError, match="running_mean"):
        lpnorm.functional.batch_norm(x, None, None, weight, bias, training=False, **norm_kwargs)
    # With training=True (what the modules pass when they hold no running statistics) the
    # batch statistics are used.
    y = lpnorm.functional.batch_norm(x, None, None, weight, bias, training=True, **norm_kwargs)
    expected = reference.batch_norm(x.cpu(), None, None, weight.cpu(), bias.cpu(), training=True,
                                    **norm_kwargs)
    assert_close(y, expected)


@norms_param()
@devices_param()
def test_cumulative_moving_average(norm_kwargs, device):
    """momentum = 1 / num_batches_tracked (what momentum=None means): the running statistics are
    the plain average of the batches' (unbiased) statistics."""
    check_against_reference(batches_of((6, 3, 10), torch.float64, steps=4, device=device),
                            norm_kwargs, torch.float64, cumulative=True)


@norms_param()
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@devices_param()
def test_large_channel(norm_kwargs, dtype_name, device):
    """m = 5000 elements per channel."""
    dtype, param_dtype = DTYPES[dtype_name]
    check_against_reference(batches_of((50, 2, 100), dtype, steps=2, device=device), norm_kwargs,
                            param_dtype)


TIE_NORMS = [dict(norm="linf"), dict(norm="topk", k=3), dict(norm="topk", k=2, chunks=2),
             dict(norm="linf", chunks=2), dict(norm="range"), dict(norm="range", chunks=2),
             dict(norm="l1")]


@pytest.mark.parametrize("norm_kwargs", TIE_NORMS, ids=lambda n: "-".join(map(str, n.values())))
@pytest.mark.parametrize("layout", [contiguous, channels_last, transposed])
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
@devices_param()
def test_ties_go_to_the_lowest_index(norm_kwargs, layout, dtype_name, device):
    """Integer-valued inputs: the largest |d| (and max x, min x) occur many times. The gradient
    goes to the lowest flat index n * S + s of the channel (of the chunk), whatever the memory
    order; d = 0 has sign 0 (as autograd's abs)."""
    dtype, param_dtype = DTYPES[dtype_name]
    batches = [layout(torch.randint(-4, 5, (4, 3, 5, 6)).to(dtype).to(device) * (1 + step))
               for step in range(2)]
    check_against_reference(batches, norm_kwargs, param_dtype)


# ---------------------------------------------------------------------------------------------
# Identities within the family (SPEC §1)

def outputs_and_grads(x, norm_kwargs, training=True):
    """Output and gradients of input, weight, bias for a fixed grad_output, plus running stats."""
    torch.manual_seed(1)
    C = x.shape[1]
    weight, bias, running_mean, running_var = make_params(C, x.dtype)
    x, w, b = leaf(x), leaf(weight), leaf(bias)
    y = lpnorm.functional.batch_norm(x, running_mean, running_var, w, b, training=training,
                                     **norm_kwargs)
    y.backward(torch.randn(y.shape, dtype=y.dtype))
    return y.detach(), x.grad, w.grad, b.grad, running_mean, running_var


def assert_same_results(x, norm_a, norm_b):
    for a, b in zip(outputs_and_grads(x, norm_a), outputs_and_grads(x, norm_b)):
        assert_close(a, b)


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("constant", ["exact", "paper"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_topk_with_k1_is_linf(chunks, constant, dtype):
    x = batch((8, 3, 5), dtype)
    assert_same_results(x, dict(norm="topk", k=1, chunks=chunks, constant=constant),
                        dict(norm="linf", chunks=chunks, constant=constant))


@pytest.mark.parametrize("p, norm", [(1.0, "l1"), (2.0, "l2")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_p1_is_l1_and_p2_is_l2(p, norm, dtype):
    x = batch((8, 3, 5), dtype)
    assert_same_results(x, dict(norm="p", p=p), dict(norm=norm))


def test_l2_is_torch_batch_norm():
    x = batch((8, 3, 5), torch.float32)
    expected = outputs_and_grads(x, dict(norm="l2"))
    torch.manual_seed(1)
    weight, bias, running_mean, running_var = make_params(3, x.dtype)
    x, w, b = leaf(x), leaf(weight), leaf(bias)
    y = F.batch_norm(x, running_mean, running_var, w, b, training=True)
    y.backward(torch.randn(y.shape, dtype=y.dtype))
    for actual, wanted in zip((y, x.grad, w.grad, b.grad, running_mean, running_var), expected):
        assert_close(actual.detach(), wanted)


# ---------------------------------------------------------------------------------------------
# Ghost batches (chunks): a worked example

@devices_param()
def test_chunks_average_the_per_chunk_estimates(device):
    """One channel, N = 4: [-1, 1 | -3, 3], mean 0. linf with chunks=2 estimates
    (1 + 3) / 2 / E_max(2) = 2 / E_max(2); with chunks=1, 3 / E_max(4). range with chunks=2:
    (2 + 6) / 2 / E_range(2)."""
    core = lpnorm._C
    x = torch.tensor([[-1.0], [1.0], [-3.0], [3.0]], dtype=torch.float64, device=device)
    cases = [
        (dict(norm="linf", chunks=2), 2 / core.expected_max_abs(2)),
        (dict(norm="linf", chunks=1), 3 / core.expected_max_abs(4)),
        (dict(norm="topk", k=2, chunks=2), 2 / core.expected_topk_abs(2, 2)),
        (dict(norm="range", chunks=2), 4 / core.expected_range(2)),
        (dict(norm="range", chunks=1), 6 / core.expected_range(4)),
        (dict(norm="linf", chunks=2, constant="paper"), 2 * core.paper_linf_multiplier(2)),
        (dict(norm="range", chunks=2, constant="paper"), 4 * 0.35 * core.paper_linf_multiplier(2)),
    ]
    for norm_kwargs, sigma in cases:
        y = lpnorm.functional.batch_norm(x, None, None, training=True, eps=1e-5, **norm_kwargs)
        expected = x / math.sqrt(sigma ** 2 + 1e-5)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=0, msg=str(norm_kwargs))


@pytest.mark.parametrize("layout", [contiguous, transposed])
@devices_param()
def test_chunks_are_groups_of_samples(layout, device):
    """Chunks are groups of whole samples, whatever the memory order: in this (4, 1, 2) input,
    samples 0-1 hold {0, 1, 2, 3} (range 3) and samples 2-3 hold {10, 14, 12, 13} (range 4).
    Grouping by spatial position or by alternate elements would give ranges 12 and 13."""
    x = torch.tensor([[[0.0, 1.0]], [[2.0, 3.0]], [[10.0, 14.0]], [[12.0, 13.0]]],
                     dtype=torch.float64, device=device)
    y = lpnorm.functional.batch_norm(layout(x), None, None, training=True, eps=1e-5,
                                     norm="range", chunks=2)
    sigma = (3.0 + 4.0) / 2 / lpnorm._C.expected_range(4)
    expected = (x - x.mean()) / math.sqrt(sigma ** 2 + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------
# Layout of the result

@norms_param()
@pytest.mark.parametrize("shape, memory_format", [
    ((4, 3, 5, 6), torch.channels_last), ((2, 3, 3, 4, 5), torch.channels_last_3d)],
    ids=["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@devices_param()
def test_output_keeps_channels_last(norm_kwargs, shape, memory_format, training, device):
    x = batch(shape, torch.float32).to(device).contiguous(memory_format=memory_format)
    y = lpnorm.functional.batch_norm(x, *(t.to(device) for t in (torch.zeros(3), torch.ones(3),
                                     torch.ones(3), torch.zeros(3))), training=training, **norm_kwargs)
    assert y.is_contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# Empty batches follow torch (SPEC §5): an empty output, zero parameter gradients,
# untouched running statistics, no error

@norms_param()
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (4, 3, 0)])
@pytest.mark.parametrize("training, track", [(True, True), (True, False), (False, True)],
                         ids=["train", "train-no_running_stats", "eval"])
@devices_param()
def test_empty_batch_follows_torch(norm_kwargs, shape, training, track, device):
    results = []
    for fn, kwargs in ((F.batch_norm, {}), (lpnorm.functional.batch_norm, norm_kwargs)):
        torch.manual_seed(2)
        params = make_params(shape[1], torch.float32, track=track)
        weight, bias, running_mean, running_var = (on(t, device) for t in params)
        x, w, b = torch.randn(shape, device=device, requires_grad=True), leaf(weight), leaf(bias)
        y = fn(x, running_mean, running_var, w, b, training=training, **kwargs)
        y.sum().backward()
        results.append((y, x.grad, w.grad, b.grad, running_mean, running_var))
    for name, expected, actual in zip(("output", "grad of input", "grad of weight",
                                       "grad of bias", "running_mean", "running_var"), *results):
        if expected is None:
            assert actual is None, name
        else:
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
            torch.testing.assert_close(actual, expected, msg=name)


# ---------------------------------------------------------------------------------------------
# NaN and Inf propagate within their channel only (SPEC §5)

@norms_param()
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@devices_param()
def test_non_finite_input_stays_in_its_channel(norm_kwargs, bad, device):
    x = batch((8, 3, 5), torch.float32)
    x[3, 1, 2] = bad
    weight, bias, running_mean, running_var = make_params(3, torch.float32)
    good = [0, 2]
    ref_mean, ref_var = running_mean[good], running_var[good]  # copies
    running_mean, running_var = running_mean.to(device), running_var.to(device)
    x, w, b = leaf(x.to(device)), leaf(weight.to(device)), leaf(bias.to(device))
    y = lpnorm.functional.batch_norm(x, running_mean, running_var, w, b, training=True,
                                     **norm_kwargs)
    grad_output = torch.randn(y.shape)
    y.backward(grad_output.to(device))
    assert y[:, 1].isnan().all(), "the bad channel's output must be NaN"
    if math.isnan(bad):  # and its statistics: never the scale of its other values (range's max - min was)
        assert running_var[1].isnan() and running_mean[1].isnan(), "the NaN channel's running statistics"

    ry, gx, gw, gb = reference.forward_backward(x[:, good].cpu(), ref_mean, ref_var,
                                                weight[good], bias[good], grad_output[:, good],
                                                training=True, **norm_kwargs)
    assert_close(y[:, good], ry, what="output of the other channels")
    assert_close(x.grad[:, good], gx, what="grad of input, other channels")
    assert_close(w.grad[good], gw, what="grad of weight, other channels")
    assert_close(b.grad[good], gb, what="grad of bias, other channels")
    assert_close(running_mean[good], ref_mean, what="running_mean, other channels")
    assert_close(running_var[good], ref_var, what="running_var, other channels")


@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf"), dict(norm="topk", k=1)], ids=["linf", "topk-k1"])
@pytest.mark.parametrize("shape", [(4, 3), (6, 5, 1, 1)], ids=["2d", "4d"])
def test_chunks_of_one_value(norm_kwargs, shape):
    """linf and top-k with the exact constants take a chunk of one value's |x - mean| (E_max(1) =
    sqrt(2 / pi)): every row its own ghost batch, forward, gradients and running statistics as
    the reference. (range, whose E_range(1) is 0, and the paper's multipliers refuse it.)"""
    x = batch(shape, torch.float64)
    weight, bias, running_mean, running_var = make_params(shape[1], torch.float64)
    kwargs = dict(norm_kwargs, chunks=shape[0])
    grad_output = torch.randn(shape, dtype=torch.float64)
    ours = [t.clone() for t in (running_mean, running_var)]
    xl, wl, bl = leaf(x), leaf(weight), leaf(bias)
    y = lpnorm.functional.batch_norm(xl, *ours, wl, bl, training=True, **kwargs)
    y.backward(grad_output)
    ry, gx, gw, gb = reference.forward_backward(x, running_mean, running_var, weight, bias, grad_output,
                                                training=True, **kwargs)
    assert_close(y, ry, what="output")
    assert_close(xl.grad, gx, what="grad of input")
    assert_close(wl.grad, gw, what="grad of weight")
    assert_close(bl.grad, gb, what="grad of bias")
    assert_close(ours[1], running_var, what="running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale,p", [(100.0, 20.0), (100.0, 40.0), (0.01, 40.0), (1e-3, 40.0), (1.0, 3.0)],
                         ids=["x100-p20", "x100-p40", "x0.01-p40", "x0.001-p40", "x1-p3"])
def test_p_norm_powers_beyond_float(scale, p, dtype):
    """The general p norm raises |x - mean| to p (and p - 1) in the accumulation type; for
    float32 and half inputs that left float's range (p = 20 with deviations of 100 overflowed,
    and every output was 0). Those channels are summed and differentiated again in double
    (cpu/exact_power.h): output and input gradient as the float64 reference, to the input's
    precision. (CPU: the CUDA kernels still power in float.)"""
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * scale
    x = x.to(dtype).double()  # values the input dtype holds
    grad_output = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    xl = leaf(x.to(dtype))
    y = lpnorm.functional.batch_norm(xl, None, None, training=True, norm="p", p=p)
    y.backward(grad_output.to(dtype))
    xr = leaf(x)
    expected = reference.batch_norm(xr, None, None, training=True, norm="p", p=p)
    expected.backward(grad_output)
    assert expected.abs().max() > 0.5  # far from the all-zero output
    assert_close(y, expected, dtype=dtype, what="output")
    assert_close(xl.grad, xr.grad, dtype=dtype, what="grad of input")


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="p", p=3.0), dict(norm="linf"),
                                         dict(norm="topk", k=4), dict(norm="range")],
                         ids=["l2", "l1", "p3", "linf", "topk", "range"])
@pytest.mark.parametrize("value", [12345.678, 0.1, -3.3e7], ids=str)
@pytest.mark.parametrize("shape,memory_format", [((7, 2, 3), None), ((32, 2, 8, 8), None),
                                                 ((32, 2, 8, 8), torch.channels_last), ((256, 2), None)],
                         ids=["7x2x3", "nchw", "nhwc", "256x2"])
@devices_param()
def test_constant_channel_of_a_large_value_normalizes_to_bias(norm_kwargs, value, shape, memory_format, device):
    """A constant channel's d is exactly 0 and its output the bias, as torch's, whatever its
    value: every norm sums x - p around a pivot from the channel's first elements, on the CPU
    and the GPU alike. (Float sums of x left the mean of 12345.678 a few ulps off, which l1
    normalized to -0.29 and linf on (32, 2, 8, 8) to -1.6.) Channel 1 is random, so the lists
    and sums run in their lanes."""
    x = torch.full(shape, value)
    x[:, 1] = torch.randn(x[:, 1].shape, generator=torch.Generator().manual_seed(0))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    bias = torch.tensor([0.25, -1.5], device=device)
    y = lpnorm.functional.batch_norm(x.to(device), None, None, None, bias, training=True, **norm_kwargs)
    assert torch.equal(y[:, 0], torch.full_like(y[:, 0], 0.25))
    assert y[:, 1].std() > 0.5


@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf"), dict(norm="topk", k=3), dict(norm="range"),
                                         dict(norm="p", p=3.0)], ids=["linf", "topk", "range", "p3"])
@pytest.mark.parametrize("schedule", ["fused", "split"])
def test_pivot_near_the_largest_float_is_not_taken(norm_kwargs, schedule, monkeypatch):
    """The sums are of x - p around a pivot from the channel's first elements, but not where p
    is near float's largest value: first elements of -3e38 and later ones of +3e38 gave
    x - p = inf, an inf mean and a NaN output, where the float64 result is +-O(1)."""
    monkeypatch.setenv("LPNORM_CPU_SCHEDULE", schedule)
    x = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[1, 0] = -3e38, 3e38
    y = lpnorm.functional.batch_norm(x, None, None, training=True, **norm_kwargs)
    expected = lpnorm.functional.batch_norm(x.double(), None, None, training=True, **norm_kwargs)
    assert expected[:, 0].abs().min() > 0.5
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def half_valued_draw():
    """(1, 255, 8, 14, 14) Gaussian channels (scales 0.5-3, means -1..2) that float16 holds: the
    draw where a fuzzing run found top-k's picks moved (below)."""
    torch.manual_seed(229866284)
    return batch((1, 255, 8, 14, 14), torch.float64).to(torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["ncdhw", "ndhwc", "rows"])
@pytest.mark.parametrize("schedule", ["fused", "split"])
@devices_param()
def test_mean_of_half_valued_input_is_float_exact(dtype, layout, schedule, device, monkeypatch):
    """Inputs on a coarse grid (half dtypes; float32 holding half values) sum x - p in float
    around a pivot p that is a coarse multiple (core::channel_pivot), so x - p has no bits below
    the data's. With every bit of the first elements' mean in p, the float sums dropped p's low
    bits term after term: on this draw means were up to 59 float ulps off (77 for bfloat16),
    which moved top-k's picks and l1's signs. running_mean with momentum 1 is the batch mean,
    rounded once to float32; measured in ulps of the mean, which for means near 0 is strict."""
    monkeypatch.setenv("LPNORM_CPU_SCHEDULE", schedule)
    x = half_valued_draw().to(dtype)
    if layout == "ndhwc":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "rows":
        x = x.reshape(255, 1568).t()  # (1568, 255): channels innermost
    channels = x.shape[1]
    exact = x.double().transpose(0, 1).reshape(channels, -1).mean(dim=1)
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(math.inf)) - exact.float().abs()).double()
    for norm in ("l2", "l1", "topk"):
        running_mean, running_var = torch.zeros(channels, device=device), torch.ones(channels, device=device)
        lpnorm.functional.batch_norm(x.to(device), running_mean, running_var, training=True, momentum=1.0, norm=norm)
        assert ((running_mean.cpu().double() - exact).abs() / ulp).max() <= 2, norm


def test_topk_picks_of_half_valued_input_follow_the_exact_mean():
    """A float16-valued channel of 1568 elements whose 64th and 65th largest |x - mean| differ by
    2.6e-7 (relative), on opposite sides of the mean: a mean 4.4e-7 off (the fine pivot) swapped
    them, and two elements' gradients were 0.33 off (of at most 10)."""
    x = half_valued_draw()[:, 78:79]
    grad_output = torch.randn(x.shape, dtype=torch.float64)
    expected = reference.forward_backward(x, None, None, None, None, grad_output, training=True, norm="topk", k=64)[1]
    for dtype in (torch.float16, torch.float32):
        leaf = x.to(dtype).detach().clone().requires_grad_()
        lpnorm.functional.batch_norm(leaf, None, None, training=True, norm="topk", k=64).backward(grad_output.to(dtype))
        assert_close(leaf.grad, expected, what=str(dtype))


@pytest.mark.parametrize("row", [0, 7], ids=["first-element", "last-element"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf], ids=["inf", "-inf"])
@devices_param()
def test_l2_running_mean_of_an_infinite_channel_is_torchs(row, bad, device):
    """norm='l2' is torch's batch norm: a channel holding one infinity has an infinite mean,
    running_mean included, wherever the infinity lies (its one-pass sums shift by a pivot taken
    from the first elements, which must not make the mean inf - inf)."""
    x = batch((8, 3, 5), torch.float32)
    x[row, 1, 0] = bad
    ours = (torch.zeros(3, device=device), torch.ones(3, device=device))
    theirs = (torch.zeros(3), torch.ones(3))
    lpnorm.functional.batch_norm(x.to(device), *ours, training=True, norm="l2")
    F.batch_norm(x, *theirs, training=True)
    assert ours[0][1].item() == theirs[0][1].item() == bad / 10  # momentum 0.1 of +-inf
    torch.testing.assert_close(ours[0].cpu(), theirs[0], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# No channels at all: an empty result, not a crash (the per-channel count is N * prod(spatial),
# which must not be computed as numel / C)

@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3), dict(norm="range")],
                         ids=lambda n: n["norm"])
@pytest.mark.parametrize("shape", [(4, 0, 5), (4, 0), (0, 0, 3)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@devices_param()
def test_zero_channels(norm_kwargs, shape, training, device):
    x = torch.randn(shape, device=device, requires_grad=True)
    weight = torch.ones(0, device=device, requires_grad=True)
    y = lpnorm.functional.batch_norm(x, torch.zeros(0, device=device), torch.ones(0, device=device),
                                     weight, torch.zeros(0, device=device), training=training,
                                     **norm_kwargs)
    assert y.shape == x.shape and y.device == x.device
    y.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.shape == (0,)
