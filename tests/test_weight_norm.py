"""lpnorm.nn.utils.bounded_weight_norm (SPEC §6): w = rho * v / ||v||_p per output channel, rho a
fixed scalar per layer, as a torch.nn.utils.parametrize parametrization."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lpnorm.nn.utils import BoundedWeightNorm, bounded_weight_norm

P = [1, 2, math.inf]
LAYERS = {  # name: (a fresh layer, the dim of its output channels, an input)
    "linear": (lambda: nn.Linear(5, 4), 0, (3, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), 0, (2, 2, 6)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), 0, (2, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), 0, (1, 2, 3, 3, 3)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 2), 1, (2, 3, 3, 3)),
}


def channel_norms(w, p, dim):
    """||w||_p per slice along dim (all of w when dim is None), written out."""
    if dim is None:
        flat = w.reshape(1, -1)
    else:
        flat = w.transpose(0, dim).reshape(w.shape[dim], -1)
    return flat.abs().max(dim=1).values if p == math.inf else flat.abs().pow(p).sum(dim=1).pow(1 / p)


@pytest.mark.parametrize("p", P, ids=str)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_channel_has_norm_rho_through_optimizer_steps(layer, p):
    make, dim, shape = LAYERS[layer]
    module = make()
    initial = module.weight.detach().clone()
    bounded_weight_norm(module, p=p, dim=dim)
    rho = float(channel_norms(initial, p, dim).mean())  # the default: the mean initial norm
    assert float(module.parametrizations.weight[0].rho) == pytest.approx(rho, rel=1e-6)
    assert torch.equal(module.parametrizations.weight.original, initial)  # v starts as the weight
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    for step in range(4):
        optimizer.zero_grad()
        module(torch.randn(shape)).pow(2).sum().backward()
        optimizer.step()
        norms = channel_norms(module.weight.detach(), p, dim)
        torch.testing.assert_close(norms, torch.full_like(norms, rho), rtol=1e-5, atol=0)
    assert not torch.equal(module.parametrizations.weight.original, initial)  # v did move
    assert all(b.requires_grad is False for b in module.buffers())  # rho is not learned
    assert "parametrizations.weight.0.rho" in module.state_dict()


@pytest.mark.parametrize("p", P, ids=str)
@pytest.mark.parametrize("dim", [0, 1, None], ids=["dim0", "dim1", "whole"])
def test_gradients_are_autograd_of_the_formula(p, dim):
    module = nn.Conv2d(3, 4, 3).double()
    bounded_weight_norm(module, p=p, dim=dim, rho=1.7)
    v = module.parametrizations.weight.original
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    module(x).sin().sum().backward()

    v_ref = v.detach().clone().requires_grad_()
    norms = channel_norms(v_ref, p, dim)
    shape = [1] * v.dim()
    if dim is not None:
        shape[dim] = -1
    w = 1.7 * v_ref / norms.view(shape)
    torch.nn.functional.conv2d(x, w, module.bias.detach()).sin().sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(BoundedWeightNorm(p, dim, 1.7).double(), (v_ref.detach().requires_grad_(),))


def test_dim_is_torch_weight_norm_dim():
    """p=2 with rho=1 gives the direction v / ||v|| of torch's weight_norm for the same dim
    (None and -1: one norm over the whole tensor, as torch)."""
    for dim in [0, 1, 2, -2, None, -1]:
        ours = nn.Conv2d(3, 4, 3)
        theirs = nn.Conv2d(3, 4, 3)
        theirs.load_state_dict(ours.state_dict())
        bounded_weight_norm(ours, p=2, dim=dim, rho=1.0)
        torch.nn.utils.parametrizations.weight_norm(theirs, dim=dim)
        with torch.no_grad():
            theirs.parametrizations.weight.original0.fill_(1.0)  # g = 1
        torch.testing.assert_close(ours.weight, theirs.weight, msg=lambda m: f"dim={dim}: {m}")
    # a 1-d parameter along dim 0: a norm per element, as torch (not one over the vector)
    ours, theirs = nn.Linear(4, 3), nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    bounded_weight_norm(ours, name="bias", p=2, dim=0, rho=1.0)
    torch.nn.utils.parametrizations.weight_norm(theirs, name="bias", dim=0)
    with torch.no_grad():
        theirs.parametrizations.bias.original0.fill_(1.0)
    torch.testing.assert_close(ours.bias, theirs.bias)
    # a dim outside the tensor's: IndexError, as torch's weight_norm
    for dim in [2, 3, -3]:
        with pytest.raises(IndexError, match=f"dim={dim} is out of range"):
            bounded_weight_norm(nn.Linear(4, 3), dim=dim)
        with pytest.raises(IndexError):
            torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3), dim=dim)


@pytest.mark.parametrize("p", P, ids=str)
def test_removal_leaves_the_effective_weight(p):
    module = nn.Linear(6, 3)
    bounded_weight_norm(module, p=p)
    with torch.no_grad():
        module.parametrizations.weight.original.mul_(torch.tensor([[1.0], [2.0], [0.5]]))
    effective = module.weight.detach().clone()
    x = torch.randn(4, 6)
    y = module(x)
    parametrize.remove_parametrizations(module, "weight")
    assert not parametrize.is_parametrized(module)
    assert isinstance(module.weight, nn.Parameter) and torch.equal(module.weight, effective)
    torch.testing.assert_close(module(x), y)


def test_options_and_refusals():
    module = bounded_weight_norm(nn.Linear(3, 2), p="inf", rho=2.5)
    assert float(module.parametrizations.weight[0].rho) == 2.5
    assert "p=inf, dim=0, rho=2.5" in repr(module)
    # assigning a weight sets v to it; the effective weight is then its projection
    with torch.no_grad():
        module.weight = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(module.weight, torch.tensor([[0.625, -2.5, 1.25], [2.5, 2.5, 0.0]]))
    for bad in [3, 0.5, "l2", True]:
        with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
            bounded_weight_norm(nn.Linear(3, 2), p=bad)
    with pytest.raises(ValueError, match="rho must be"):
        bounded_weight_norm(nn.Linear(3, 2), rho=0.0)
    with pytest.raises(ValueError, match="no tensor"):
        bounded_weight_norm(nn.Linear(3, 2), name="scale")
    # bias too, and dtype follows the parameter
    layer = bounded_weight_norm(nn.Linear(3, 2).double(), name="bias", dim=None)
    assert layer.parametrizations.bias[0].rho.dtype == torch.float64
