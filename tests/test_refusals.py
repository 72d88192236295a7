"""Inputs the library refuses (SPEC §5): a ValueError (bad values, shapes, devices) or a TypeError
(dtypes) whose message names the offending argument, raised before anything is computed or
mutated; and the near misses it must accept."""
import pytest
import torch

import lpnorm
from conftest import NORMS, norm_id


def call(input=None, running_mean=None, running_var=None, **kwargs):
    """lpnorm.functional.batch_norm as a valid training call (on a (4, 3, 5) input unless given),
    with the arguments given changed."""
    input = torch.randn(4, 3, 5) if input is None else input
    C = input.shape[1] if input.dim() >= 2 else 3
    running_mean = torch.zeros(C) if running_mean is None else running_mean
    running_var = torch.ones(C) if running_var is None else running_var
    kwargs = dict(dict(weight=torch.ones(C), bias=torch.zeros(C), training=True), **kwargs)
    return lpnorm.functional.batch_norm(input, running_mean, running_var, **kwargs)


REFUSED = {  # name: (arguments changed from the valid call, exception, what the message names)
    # shapes
    "1-d input": (dict(input=torch.randn(5)), ValueError, "input"),
    "0-d input": (dict(input=torch.tensor(1.0)), ValueError, "input"),
    "weight channels": (dict(weight=torch.ones(4)), ValueError, "weight"),
    "bias channels": (dict(bias=torch.zeros(2)), ValueError, "bias"),
    "running_mean channels": (dict(running_mean=torch.zeros(4)), ValueError, "running_mean"),
    "running_var channels": (dict(running_var=torch.ones(4)), ValueError, "running_var"),
    "one value per channel (N, C)": (
        dict(input=torch.randn(1, 3)), ValueError,
        "Expected more than 1 value per channel when training"),
    "one value per channel (N, C, 1, 1)": (
        dict(input=torch.randn(1, 3, 1, 1)), ValueError,
        "Expected more than 1 value per channel when training"),
    # the norm and its parameters
    "unknown norm": (dict(norm="l3"), ValueError, "norm"),
    "k = 0": (dict(norm="topk", k=0), ValueError, r"\bk\b"),
    "k < 0": (dict(norm="topk", k=-2), ValueError, r"\bk\b"),
    "k > m": (dict(norm="topk", k=21), ValueError, r"\bk\b"),
    "k > chunk size": (dict(norm="topk", k=11, chunks=2), ValueError, r"\bk\b"),
    "p < 1": (dict(norm="p", p=0.5), ValueError, r"\bp\b"),
    "p = 0.999": (dict(norm="p", p=0.999), ValueError, r"\bp\b"),
    "chunks not dividing N": (dict(norm="linf", chunks=3), ValueError, "chunks"),
    "chunks > N": (dict(norm="range", chunks=8), ValueError, "chunks"),
    "chunks = 0": (dict(norm="linf", chunks=0), ValueError, "chunks"),
    "range of one value per chunk": (dict(input=torch.randn(4, 3), norm="range", chunks=4), ValueError,
                                     "at least 2 values per channel in each of the chunks"),
    "paper multiplier of one value per chunk": (dict(input=torch.randn(4, 3), norm="linf", chunks=4,
                                                     constant="paper"), ValueError, "constant='paper'"),
    "chunks for l1": (dict(norm="l1", chunks=2), ValueError, "chunks"),
    "chunks for l2": (dict(norm="l2", chunks=2), ValueError, "chunks"),
    "chunks for p": (dict(norm="p", p=3.0, chunks=2), ValueError, "chunks"),
    "unknown constant": (dict(norm="linf", constant="exactly"), ValueError, "constant"),
    # eps, as torch's batch_norm
    "eps = 0 in training": (dict(eps=0.0), ValueError, "eps must be positive during training"),
    "eps < 0 in training": (dict(eps=-1e-5, norm="topk", k=3), ValueError, "eps must be positive"),
    "eps < 0 in eval": (dict(eps=-1e-5, training=False), ValueError, "eps must be non-negative"),
    # devices
    "weight on another device": (dict(weight=torch.ones(3, device="meta")), ValueError, "weight"),
    "bias on another device": (dict(bias=torch.zeros(3, device="meta")), ValueError, "bias"),
    "running_mean on another device": (
        dict(running_mean=torch.zeros(3, device="meta")), ValueError, "running_mean"),
    "running_mean requiring grad": (dict(running_mean=torch.zeros(3, requires_grad=True)), ValueError,
                                    "running_mean requires grad"),
    "running_var requiring grad in eval": (dict(running_var=torch.ones(3, requires_grad=True), training=False),
                                           ValueError, "running_var requires grad"),
    "running_var on another device": (
        dict(running_var=torch.ones(3, device="meta")), ValueError, "running_var"),
    # dtypes
    "integer input": (dict(input=torch.randint(0, 5, (4, 3, 5))), TypeError, "input"),
    "bool input": (dict(input=torch.rand(4, 3, 5) > 0.5), TypeError, "input"),
    "complex input": (dict(input=torch.randn(4, 3, 5, dtype=torch.complex64)), TypeError,
                      "input"),
    "integer weight": (dict(weight=torch.ones(3, dtype=torch.int64)), TypeError, "weight"),
    "integer running_mean": (dict(running_mean=torch.zeros(3, dtype=torch.int32)), TypeError,
                             "running_mean"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_functional_refuses(case):
    changes, error, names = REFUSED[case]
    changes = dict(dict(running_mean=torch.zeros(3), running_var=torch.ones(3)), **changes)
    before = [t.clone() for t in (changes["running_mean"], changes["running_var"])]
    with pytest.raises(error, match=names):
        call(**changes)
    for t, saved in zip((changes["running_mean"], changes["running_var"]), before):
        if t.device.type == "cpu":
            assert torch.equal(t, saved), "a refused call changed the running statistics"


def test_backward_op_refuses_an_input_of_one_dimension():
    saved = torch.ops.lpnorm.batch_norm_forward(torch.randn(4, 3), None, None, None, None, True, 0.1, 1e-5, "l1", 10,
                                                2.0, 1, "exact")[1:]
    with pytest.raises(ValueError, match="batch_norm_backward: input must have at least 2 dimensions"):
        torch.ops.lpnorm.batch_norm_backward(torch.randn(4), torch.randn(4), None, *saved, True, "l1", 2.0)


def test_eval_without_running_stats_is_refused_by_the_op():
    """The functional uses batch statistics when the running ones are None (as torch); the op,
    told to use running statistics that do not exist, refuses."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="running_mean|running_var"):
        torch.ops.lpnorm.batch_norm(x, None, None, None, None, False, 0.1, 1e-5, "l1", 10, 2.0,
                                    1, "exact")


@pytest.mark.parametrize("norm_kwargs", NORMS, ids=[norm_id(n) for n in NORMS])
def test_op_refuses_like_the_functional(norm_kwargs):
    """The op checks its arguments itself (C++ and TorchScript callers skip the Python layer)."""
    args = dict(dict(k=10, p=2.0, chunks=1, constant="exact"), **norm_kwargs)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.lpnorm.batch_norm(torch.randn(4, 3, 5), torch.ones(4), None, None, None, True,
                                    0.1, 1e-5, args["norm"], args["k"], args["p"],
                                    args["chunks"], args["constant"])


# ---------------------------------------------------------------------------------------------
# The boundaries: what is accepted

def test_accepted_boundaries():
    x = torch.randn(4, 3, 5)  # m = 20
    call(x, norm="topk", k=20)  # k == m
    call(x, norm="topk", k=10, chunks=2)  # k == chunk size
    call(x, norm="topk", k=1, chunks=4)  # chunk size 5
    call(x, norm="p", p=1.0)
    call(torch.randn(1, 3), training=False)  # one value per channel is fine in eval (torch)
    call(torch.randn(2, 3), training=True)
    call(x, eps=0.0, training=False)  # eps = 0 is fine in eval (torch)
    # evaluation splits no batch: ghost batches of a trained model meet any batch size
    for norm in ("linf", "topk", "range"):
        call(torch.randn(3, 3, 5), norm=norm, chunks=2, k=2, training=False)
        call(torch.randn(1, 3, 1, 1), norm=norm, chunks=4, k=2, training=False)


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "range", "p"])
def test_k_is_ignored_by_other_norms(norm):
    """k defaults to 10 even where a channel has fewer values; only topk reads it."""
    call(torch.randn(3, 2), norm=norm)


# ---------------------------------------------------------------------------------------------
# The same refusals through the modules (at construction or at the first forward)

MODULE_REFUSED = {  # name: (module, input, exception, what the message names)
    "unknown norm": (lambda: lpnorm.nn.LpBatchNorm2d(3, norm="l3"), (4, 3, 2, 2), ValueError,
                     "norm"),
    "k = 0": (lambda: lpnorm.nn.LpBatchNorm2d(3, norm="topk", k=0), (4, 3, 2, 2), ValueError,
              r"\bk\b"),
    "k > m": (lambda: lpnorm.nn.LpBatchNorm2d(3, norm="topk", k=17), (4, 3, 2, 2), ValueError,
              r"\bk\b"),
    "k > chunk size": (lambda: lpnorm.nn.LpBatchNorm1d(3, norm="topk", k=3, chunks=2), (4, 3),
                       ValueError, r"\bk\b"),
    "p < 1": (lambda: lpnorm.nn.LpBatchNorm1d(3, norm="p", p=0.5), (4, 3), ValueError, r"\bp\b"),
    "chunks not dividing N": (lambda: lpnorm.nn.LpBatchNorm3d(3, norm="linf", chunks=4),
                              (6, 3, 2, 2, 2), ValueError, "chunks"),
    "chunks for l1": (lambda: lpnorm.nn.LpBatchNorm2d(3, norm="l1", chunks=2), (4, 3, 2, 2),
                      ValueError, "chunks"),
    "unknown constant": (lambda: lpnorm.nn.LpBatchNorm2d(3, norm="linf", constant="bogus"),
                         (4, 3, 2, 2), ValueError, "constant"),
    "channels": (lambda: lpnorm.nn.LpBatchNorm2d(4), (4, 3, 2, 2), ValueError,
                 "weight|bias|running_mean|running_var|num_features|input"),
    "one value per channel": (lambda: lpnorm.nn.LpBatchNorm1d(3), (1, 3), ValueError,
                              "Expected more than 1 value per channel when training"),
    "rank (as torch)": (lambda: lpnorm.nn.LpBatchNorm2d(3), (4, 3, 5), ValueError, "input"),
    "rank 1d (as torch)": (lambda: lpnorm.nn.LpBatchNorm1d(3), (4, 3, 2, 2), ValueError, "input"),
    "rank 3d (as torch)": (lambda: lpnorm.nn.LpBatchNorm3d(3), (4, 3, 2, 2), ValueError, "input"),
    "parameters on another device": (lambda: lpnorm.nn.LpBatchNorm2d(3, device="meta"),
                                     (4, 3, 2, 2), ValueError,
                                     "weight|bias|running_mean|running_var"),
}


@pytest.mark.parametrize("case", list(MODULE_REFUSED))
def test_module_refuses(case):
    make, shape, error, names = MODULE_REFUSED[case]
    with pytest.raises(error, match=names):
        make()(torch.randn(shape))


def test_module_refuses_integer_input():
    with pytest.raises(TypeError, match="input"):
        lpnorm.nn.LpBatchNorm2d(3)(torch.randint(0, 5, (4, 3, 2, 2)))
