"""Under torch.autocast("cpu", dtype=torch.bfloat16) our modules do what torch's batch norm does
there, which these tests observe rather than assume: batch norm is on none of autocast's cast
lists, so it runs in the dtype of its input (float32 input: float32; the bfloat16 output of an
autocast conv: bfloat16 with float32 parameters, the mixed mode); parameters and running
statistics stay float32. norm='l2' is torch's batch norm, so its values are compared too."""
import pytest
import torch
from torch import nn

import lpnorm
from conftest import batch


def pair(norm_kwargs, kind="2d"):
    torch_cls, lp_cls = {"1d": (nn.BatchNorm1d, lpnorm.nn.LpBatchNorm1d),
                         "2d": (nn.BatchNorm2d, lpnorm.nn.LpBatchNorm2d)}[kind]
    model = lambda bn: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn) if kind == "2d" else \
        nn.Sequential(nn.Linear(12, 4), bn)
    reference = model(torch_cls(4))
    ours = lpnorm.convert(model(torch_cls(4)), **norm_kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run(model, x, training):
    model.train(training)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)  # the conv / linear output is bfloat16: batch norm sees that
        direct = model[1](model[0](x).float().detach())  # a float32 input under autocast
    y.float().square().mean().backward()
    return dict(y=y, direct=direct, grad_x=x.grad, grad_weight=model[1].weight.grad,
                running_var=model[1].running_var)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["2d", "1d"])
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="topk", k=3)],
                         ids=lambda n: n["norm"])
def test_autocast_bfloat16_is_torch_batch_norm(norm_kwargs, kind, training):
    reference, ours = pair(norm_kwargs, kind)
    x = batch((8, 3, 4, 4) if kind == "2d" else (8, 12), torch.float32)
    expected, actual = run(reference, x, training), run(ours, x, training)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
    assert expected["y"].dtype == torch.bfloat16 and expected["direct"].dtype == torch.float32
    assert expected["grad_weight"].dtype == torch.float32 and expected["running_var"].dtype == torch.float32
    if norm_kwargs["norm"] == "l2" or not training:  # torch's numbers (eval: every norm is plain BN)
        for key in expected:
            torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=0.02, atol=0.02,
                                       msg=lambda m: f"{key}: {m}")


def test_functional_under_autocast_keeps_float32_input():
    x = batch((6, 3, 5), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lpnorm.functional.batch_norm(x, None, None, training=True, norm="l1")
        z = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert y.dtype == z.dtype == torch.float32
