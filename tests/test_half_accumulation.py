"""accumulate="half" (SPEC §4): a float16/bfloat16 input's statistics accumulated in its own
type, as csrc/cpu/half_accumulation.h defines it, checked against a Python transcription of
that definition; and the paper's point, which it exists to show: L2's squares leave float16's
range where L1, L-inf and top-k do not."""
import math

import pytest
import torch

import lpnorm
import reference

HALF_DTYPES = [torch.float16, torch.bfloat16]
EPS = 1e-5


def forward(x, norm="l1", accumulate="half", training=True, **options):
    opts = dict(k=10, p=2.0, chunks=1, constant="exact")
    opts.update(options)
    return torch.ops.lpnorm.batch_norm_forward(x, None, None, None, None, training, 0.1, EPS, norm, opts["k"],
                                               opts["p"], opts["chunks"], opts["constant"], accumulate)


# ---------------------------------------------------------------------------------------------
# The definition, in Python: every operation's exact result rounded to the half type (Python
# floats hold the exact sums and products of half values; rounding them through float32 equals
# rounding them directly, as float32 has 2 * 11 + 2 bits).

def rounder(dtype):
    return lambda v: float(torch.tensor(v, dtype=torch.float32).to(dtype))


def pairwise_mean(terms, rnd):
    if not terms:
        return 0.0
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    left, right = pairwise_mean(terms[:half], rnd), pairwise_mean(terms[half:], rnd)
    n = len(terms)
    return rnd(rnd(left * rnd(half / n)) + rnd(right * rnd((n - half) / n)))


def channel_values(x, c):
    """Channel c's values in the flat order n * S + s, as Python floats."""
    return x[:, c].reshape(-1).double().tolist()


def expected_forward(x, c, norm, p=2.0):
    """(mean, sigma) of channel c of a dense norm under half accumulation."""
    rnd = rounder(x.dtype)
    values = channel_values(x, c)
    mean = pairwise_mean(values, rnd)
    d = [rnd(v - mean) for v in values]
    if norm == "l2":
        moment, q, constant = pairwise_mean([rnd(e * e) for e in d], rnd), 2.0, 1.0
    elif norm == "l1":
        moment, q, constant = pairwise_mean([abs(e) for e in d], rnd), 1.0, math.sqrt(math.pi / 2)
    else:
        moment, q, constant = pairwise_mean([rnd(abs(e) ** p) for e in d], rnd), p, 1 / reference.lp_consistency(p)
    return mean, constant * moment ** (1 / q)


# ---------------------------------------------------------------------------------------------
# The kernels against the definition

LAYOUTS = {
    "nchw": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("norm,p", [("l2", 2.0), ("l1", 2.0), ("p", 3.0), ("p", 1.5)])
def test_dense_statistics_follow_the_definition(dtype, layout, norm, p):
    x = LAYOUTS[layout]((torch.randn(5, 3, 3, 4) * 3 + 1).to(dtype))
    _, save_mean, _, save_coef, _, _ = forward(x, norm, p=p)
    for c in range(x.shape[1]):
        mean, sigma = expected_forward(x, c, norm, p)
        assert save_mean[c].item() == mean, f"channel {c} mean"
        # the pow of "p" is float's in the kernel, double's here: a rounding apart at most
        rel = 2e-3 if norm == "p" else 1e-6
        assert save_coef[c, 0].item() == pytest.approx(sigma, rel=rel), f"channel {c} sigma"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("norm,k,chunks", [("linf", 1, 1), ("topk", 3, 1), ("topk", 2, 2), ("range", 1, 2)])
def test_extreme_norms_use_the_half_mean(dtype, norm, k, chunks):
    """Extremes are found by comparison; only the mean they are measured from is the half one."""
    x = (torch.randn(6, 3, 7) * 5 - 2).to(dtype)
    _, save_mean, _, save_coef, _, _ = forward(x, norm, k=k, chunks=chunks)
    rnd = rounder(dtype)
    for c in range(x.shape[1]):
        mean = pairwise_mean(channel_values(x, c), rnd)
        assert save_mean[c].item() == mean
        rows = x[:, c].double().reshape(1, x.shape[0], -1)
        if norm == "range":  # no mean in it
            sigma = reference.sigma_of(rows, norm, chunks=chunks)[1].item()
        else:  # SPEC §1 with the half mean
            n = rows.numel() // chunks
            statistic = reference._topk_mean((rows - mean).abs().reshape(chunks, n), k)
            sigma = (statistic / reference.expected_topk_abs(n, k)).mean().item()
        assert save_coef[c, 0].item() == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["l2", "l1", "topk"])
def test_backward_sums_follow_the_definition(dtype, norm):
    x = (torch.randn(4, 3, 5) * 2).to(dtype)
    g = torch.randn(4, 3, 5).to(dtype)
    weight = torch.rand(3, dtype=dtype) + 0.5
    _, *saved = forward(x, norm, k=3)
    grad_input, grad_weight, grad_bias = torch.ops.lpnorm.batch_norm_backward(
        g, x, weight, *saved, True, norm, 2.0, "half")
    rnd = rounder(dtype)
    save_mean, save_invstd = saved[0], saved[1]
    for c in range(3):
        gs, xs = channel_values(g, c), channel_values(x, c)
        mean = save_mean[c].item()
        m = len(gs)
        sum_g = m * pairwise_mean(gs, rnd)
        sum_gd = m * pairwise_mean([rnd(gv * rnd(xv - mean)) for gv, xv in zip(gs, xs)], rnd)
        assert grad_bias[c].float().item() == pytest.approx(sum_g, rel=1e-2 if dtype == torch.bfloat16 else 1e-3)
        assert grad_weight[c].float().item() == pytest.approx(sum_gd * save_invstd[c].item(),
                                                              rel=1e-2 if dtype == torch.bfloat16 else 1e-3)
    # The input gradient from those sums stays close to float accumulation's at unit scale.
    float_grads = torch.ops.lpnorm.batch_norm_backward(g, x, weight, *saved, True, norm, 2.0, "float")
    torch.testing.assert_close(grad_input.float(), float_grads[0].float(), atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# What it shows (the paper's claim, SPEC §4)

def relative_sigma_error(x16, norm, accumulate):
    exact = forward(x16.double(), norm, accumulate="float")[3][:, 0]
    sigma = forward(x16, norm, accumulate=accumulate)[3][:, 0].double()
    return ((sigma - exact).abs() / exact).max().item(), sigma


def test_l2_squares_overflow_float16_where_l1_linf_topk_stay_accurate():
    x16 = (torch.randn(64, 2, 16, 16) * 1000).half()  # |d| > 256 is common: d^2 > 65504
    error, sigma = relative_sigma_error(x16, "l2", "half")
    assert torch.isinf(sigma).all()
    output = forward(x16, "l2")[0]
    assert not output.float().abs().gt(1e-3).any(), "an infinite sigma normalizes everything to 0"
    for norm in ("l1", "linf", "topk"):
        error, _ = relative_sigma_error(x16, norm, "half")
        assert error < 2e-3, norm
        assert torch.isfinite(forward(x16, norm)[0]).all()
    # float accumulation of the same float16 values is fine for L2 too
    assert relative_sigma_error(x16, "l2", "float")[0] < 1e-6


def test_l2_squares_underflow_float16_where_l1_stays_close():
    x16 = (torch.randn(64, 2, 16, 16) * 1e-4).half()  # d^2 ~ 1e-8: below float16's subnormals
    l2_error, _ = relative_sigma_error(x16, "l2", "half")
    l1_error, _ = relative_sigma_error(x16, "l1", "half")
    assert l2_error > 0.1
    assert l1_error < 0.02


def test_bfloat16_keeps_float32s_range():
    """bfloat16's exponent range is float32's: no overflow for L2 at the same scale."""
    x = (torch.randn(64, 2, 16, 16) * 1000).bfloat16()
    error, sigma = relative_sigma_error(x, "l2", "half")
    assert torch.isfinite(sigma).all() and error < 0.05


# ---------------------------------------------------------------------------------------------
# Contract

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_half_changes_nothing_for_float32_and_float64(dtype):
    x = torch.randn(8, 3, 5, dtype=dtype)
    for norm in ("l2", "l1", "topk"):
        a, b = forward(x, norm, accumulate="float"), forward(x, norm, accumulate="half")
        for left, right in zip(a, b):
            assert torch.equal(left, right)


def test_float_accumulation_is_the_default():
    x = (torch.randn(8, 3, 5) * 300).half()
    default = torch.ops.lpnorm.batch_norm_forward(x, None, None, None, None, True, 0.1, EPS, "l2", 10, 2.0, 1,
                                                  "exact")
    assert torch.equal(default[3], forward(x, "l2", accumulate="float")[3])
    assert torch.isfinite(default[3]).all()


def test_half_accumulation_does_not_depend_on_threads():
    x = (torch.randn(16, 20, 9, 9) * 4).half().contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out, *saved = forward(x, "l1")
        grads = torch.ops.lpnorm.batch_norm_backward(g, x, None, *saved, True, "l1", 2.0, "half")
        results.append((out, *saved, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_running_statistics_and_eval_with_half_accumulation():
    x = (torch.randn(8, 3, 6) + 2).half()
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    _, save_mean, _, save_coef, _, _ = torch.ops.lpnorm.batch_norm_forward(
        x, None, None, running_mean, running_var, True, 0.5, EPS, "l1", 10, 2.0, 1, "exact", "half")
    m = 8 * 6
    torch.testing.assert_close(running_mean, 0.5 * save_mean)
    torch.testing.assert_close(running_var, 0.5 + 0.5 * save_coef[:, 0] ** 2 * m / (m - 1))
    # eval: running statistics, nothing accumulated; same result either way
    a, b = (torch.ops.lpnorm.batch_norm_forward(x, None, None, running_mean, running_var, False, 0.5, EPS, "l1",
                                                10, 2.0, 1, "exact", accumulate)[0] for accumulate in ("half", "float"))
    assert torch.equal(a, b)


def test_empty_batch_with_half_accumulation():
    x = torch.empty(0, 3, 4, dtype=torch.float16)
    out = forward(x, "l2")[0]
    assert out.shape == x.shape


@pytest.mark.parametrize("bad", ["double", "HALF", ""])
def test_unknown_accumulator_is_refused_by_name(bad):
    x = torch.randn(4, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="accumulate must be 'float' or 'half'"):
        forward(x, "l1", accumulate=bad)
    with pytest.raises(ValueError, match="accumulate"):
        lpnorm.functional.batch_norm(x, None, None, training=True, accumulate=bad)
    with pytest.raises(ValueError, match="accumulate"):
        lpnorm.nn.LpBatchNorm1d(3, accumulate=bad)
    with pytest.raises(ValueError, match="accumulate"):
        lpnorm.convert(torch.nn.BatchNorm1d(3), accumulate=bad)
    _, *saved = forward(x, "l1", accumulate="float")
    with pytest.raises(ValueError, match="accumulate must be 'float' or 'half'"):
        torch.ops.lpnorm.batch_norm_backward(x, x, None, *saved, True, "l1", 2.0, bad)


def test_sync_batch_norm_refuses_half_accumulation():
    with pytest.raises(ValueError, match="accumulate='float' only"):
        lpnorm.nn.SyncLpBatchNorm(3, accumulate="half")
    with pytest.raises(ValueError, match="accumulate='float' only"):
        lpnorm.nn.SyncLpBatchNorm.convert_sync_batchnorm(lpnorm.nn.LpBatchNorm2d(3, accumulate="half"))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_opcheck_with_half_accumulation(dtype):
    x = (torch.randn(6, 3, 4) * 2).to(dtype)
    weight, bias = torch.rand(3, dtype=dtype) + 0.5, torch.randn(3, dtype=dtype)
    args = (x, weight, bias, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype), True, 0.1, EPS, "l1", 10,
            2.0, 1, "exact", "half")
    torch.library.opcheck(torch.ops.lpnorm.batch_norm_forward.default, args)
    torch.library.opcheck(torch.ops.lpnorm.batch_norm.default,
                          (x, weight.requires_grad_(), bias.requires_grad_()) + args[3:])
    _, *saved = torch.ops.lpnorm.batch_norm_forward(*args)
    torch.library.opcheck(torch.ops.lpnorm.batch_norm_backward.default,
                          (torch.randn_like(x), x, weight.detach(), *saved, True, "l1", 2.0, "half"))


def test_module_with_half_accumulation_trains_and_scripts():
    module = lpnorm.nn.LpBatchNorm2d(4, norm="l1", accumulate="half").half()
    assert "accumulate=half" in repr(module)
    assert set(module.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())
    x = (torch.randn(8, 4, 5, 5) * 500).half().requires_grad_()
    y = module(x)
    y.float().square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    scripted = torch.jit.script(module)
    module.eval(), scripted.eval()
    assert torch.equal(scripted(x.detach()), module(x.detach()))
    converted = lpnorm.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), norm="l2", accumulate="half")
    assert converted[0].accumulate == "half"
