"""lpnorm.nn.LpBatchNorm1d/2d/3d: torch.nn.BatchNorm*d's arguments, buffers, state_dict and
train/eval behaviour (SPEC §2, §6), and TorchScript."""
import copy

import pytest
import torch
from torch import nn

import lpnorm
import reference
from conftest import NORMS, assert_close, batch, devices_param, norms_param

KINDS = {  # name: (lpnorm module, torch module, an input shape with 4 channels, m >= 20)
    "1d": (lpnorm.nn.LpBatchNorm1d, nn.BatchNorm1d, (20, 4)),
    "1d-seq": (lpnorm.nn.LpBatchNorm1d, nn.BatchNorm1d, (4, 4, 6)),
    "2d": (lpnorm.nn.LpBatchNorm2d, nn.BatchNorm2d, (4, 4, 3, 3)),
    "3d": (lpnorm.nn.LpBatchNorm3d, nn.BatchNorm3d, (2, 4, 2, 3, 3)),
}
kinds_param = pytest.mark.parametrize("kind", list(KINDS))


def trained_torch_module(torch_cls, shape, **kwargs):
    """A torch BatchNorm with non-trivial parameters and running statistics."""
    bn = torch_cls(shape[1], **kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    for step in range(3):
        bn(batch(shape, torch.float32, step))
    return bn


# ---------------------------------------------------------------------------------------------
# Buffers, parameters, state_dict

@kinds_param
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_state_dict_is_torch_batch_norm(kind, affine, track, momentum):
    lp_cls, torch_cls, shape = KINDS[kind]
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    lp = lp_cls(4, norm="topk", k=3, **kwargs)
    bn = trained_torch_module(torch_cls, shape, **kwargs)
    expected = bn.state_dict()
    assert list(lp.state_dict()) == list(expected)
    for key, value in lp.state_dict().items():
        assert value.shape == expected[key].shape and value.dtype == expected[key].dtype, key
    assert [name for name, _ in lp.named_parameters()] == [n for n, _ in bn.named_parameters()]
    assert lp.momentum == momentum and lp.eps == bn.eps and lp.num_features == 4

    lp.load_state_dict(expected)  # strict
    for key, value in lp.state_dict().items():
        assert torch.equal(value, expected[key]), key


@kinds_param
def test_fresh_module_is_a_fresh_torch_batch_norm(kind):
    """weight 1, bias 0, running_mean 0, running_var 1, num_batches_tracked 0."""
    lp_cls, torch_cls, _ = KINDS[kind]
    for key, value in torch_cls(4).state_dict().items():
        assert torch.equal(lp_cls(4).state_dict()[key], value), key


@kinds_param
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_device_and_dtype_arguments(kind, dtype):
    lp_cls, _, shape = KINDS[kind]
    lp = lp_cls(4, device="cpu", dtype=dtype)
    assert all(t.dtype == dtype for t in (lp.weight, lp.bias, lp.running_mean, lp.running_var))
    y = lp(batch(shape, dtype))
    assert y.dtype == dtype


# ---------------------------------------------------------------------------------------------
# Eval mode: every norm deploys as plain batch norm (SPEC §2)

@norms_param()
@kinds_param
@devices_param()
def test_eval_is_torch_batch_norm_with_the_same_buffers(norm_kwargs, kind, device):
    lp_cls, torch_cls, shape = KINDS[kind]
    bn = trained_torch_module(torch_cls, shape).eval()
    lp = lp_cls(4, **norm_kwargs)
    lp.load_state_dict(bn.state_dict())
    lp.eval().to(device)
    x = batch(shape, torch.float32, step=5)
    y = lp(x.to(device))
    assert y.device.type == torch.device(device).type
    assert_close(y, bn(x).double())


@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf"), dict(norm="topk", k=3, chunks=2)])
def test_lp_state_dict_loads_into_torch(norm_kwargs):
    """A model trained with any norm converts back to torch.nn.BatchNorm2d losslessly."""
    lp = lpnorm.nn.LpBatchNorm2d(4, **norm_kwargs)
    for step in range(3):
        lp(batch((4, 4, 3, 3), torch.float32, step))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(lp.state_dict())
    lp.eval()
    bn.eval()
    x = batch((4, 4, 3, 3), torch.float32, step=5)
    assert_close(lp(x), bn(x).double())


# ---------------------------------------------------------------------------------------------
# Training mode: batch statistics, running-statistic updates, num_batches_tracked

@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3),
                                         dict(norm="range", chunks=2), dict(norm="p", p=1.5)],
                         ids=lambda n: "-".join(map(str, n.values())))
@kinds_param
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@devices_param()
def test_training_updates_running_stats(norm_kwargs, kind, momentum, device):
    """Per step: the output is the reference's with batch statistics, running_mean / running_var
    follow SPEC §2 (momentum=None: the cumulative average), num_batches_tracked counts; eval
    forwards use the running statistics and do not count."""
    lp_cls, _, shape = KINDS[kind]
    lp = lp_cls(4, momentum=momentum, **norm_kwargs)
    with torch.no_grad():
        lp.weight.uniform_(0.5, 1.5)
        lp.bias.normal_()
    ref_mean, ref_var = lp.running_mean.clone(), lp.running_var.clone()
    weight, bias = lp.weight.detach().clone(), lp.bias.detach().clone()  # the reference's, on the CPU
    lp.to(device)
    for step in range(1, 4):
        x = batch(shape, torch.float32, step)
        y = lp(x.to(device))
        f = 1.0 / step if momentum is None else momentum
        expected = reference.batch_norm(x, ref_mean, ref_var, weight, bias, training=True,
                                        momentum=f, **norm_kwargs)
        assert_close(y.detach(), expected, what="output")
        assert_close(lp.running_mean, ref_mean, what="running_mean")
        assert_close(lp.running_var, ref_var, what="running_var")
        assert lp.num_batches_tracked.item() == step

    lp.eval()
    x = batch(shape, torch.float32, 7)
    expected = reference.batch_norm(x, ref_mean, ref_var, weight, bias, training=False)
    assert_close(lp(x.to(device)).detach(), expected, what="eval output")
    assert lp.num_batches_tracked.item() == 3


@kinds_param
def test_default_norm_is_l1(kind):
    lp_cls, _, shape = KINDS[kind]
    x = batch(shape, torch.float32)
    expected = reference.batch_norm(x, None, None, training=True, norm="l1")
    assert_close(lp_cls(4)(x).detach(), expected)


def test_functional_is_torchs_signature_then_the_options():
    """lpnorm.functional.batch_norm takes F.batch_norm's arguments in F.batch_norm's order and
    defaults (SPEC §6), then the options, whose defaults are l1, k = 10, p = 2, one chunk: a
    call written for torch, positional arguments included, is an l1 batch norm."""
    import inspect

    ours = inspect.signature(lpnorm.functional.batch_norm).parameters
    theirs = inspect.signature(nn.functional.batch_norm).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all(ours[name].default == theirs[name].default for name in theirs)
    assert [(name, ours[name].default) for name in list(ours)[len(theirs):]] == [
        ("norm", "l1"), ("k", 10), ("p", 2.0), ("chunks", 1), ("constant", "exact"), ("accumulate", "float")]
    x = batch((6, 4, 3), torch.float64)
    stats = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    weight, bias = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    y = lpnorm.functional.batch_norm(x, *stats, weight, bias, True, 0.3, 1e-3)  # all positional
    expected_stats = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    expected = reference.batch_norm(x, *expected_stats, weight, bias, training=True, momentum=0.3, eps=1e-3,
                                    norm="l1")
    assert_close(y, expected)
    assert_close(stats[1], expected_stats[1])


@kinds_param
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="linf", chunks=2)],
                         ids=["l1", "linf-chunks2"])
def test_without_running_stats_uses_batch_stats_also_in_eval(kind, norm_kwargs):
    """track_running_stats=False: no buffers, batch statistics in train and eval (as torch)."""
    lp_cls, torch_cls, shape = KINDS[kind]
    lp = lp_cls(4, track_running_stats=False, **norm_kwargs)
    assert lp.running_mean is None and lp.running_var is None
    assert lp.num_batches_tracked is None
    assert list(lp.buffers()) == []
    x = batch(shape, torch.float32)
    expected = reference.batch_norm(x, None, None, training=True, **norm_kwargs)
    assert_close(lp(x).detach(), expected, what="train")
    lp.eval()
    assert_close(lp(x).detach(), expected, what="eval")


@kinds_param
def test_without_affine(kind):
    lp_cls, torch_cls, shape = KINDS[kind]
    lp = lp_cls(4, affine=False, norm="topk", k=3)
    assert lp.weight is None and lp.bias is None and list(lp.parameters()) == []
    x = batch(shape, torch.float32)
    expected = reference.batch_norm(x, None, None, training=True, norm="topk", k=3)
    assert_close(lp(x).detach(), expected)


def test_module_gradients_are_the_references():
    lp = lpnorm.nn.LpBatchNorm2d(4, norm="topk", k=3, chunks=2)
    x = batch((4, 4, 3, 3), torch.float64).requires_grad_()
    lp = lp.double()
    y = lp(x)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    _, gx, gw, gb = reference.forward_backward(x, None, None, lp.weight, lp.bias, grad_output,
                                               training=True, norm="topk", k=3, chunks=2)
    assert_close(x.grad, gx)
    assert_close(lp.weight.grad, gw)
    assert_close(lp.bias.grad, gb)


# ---------------------------------------------------------------------------------------------
# TorchScript: script, save, load, and the same numbers as eager

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = lpnorm.nn.LpBatchNorm2d(4, norm="topk", k=3)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = lpnorm.nn.LpBatchNorm2d(5, norm="range", chunks=2, momentum=None)
        self.fc = nn.Linear(5 * 6 * 6, 7)
        self.bn3 = lpnorm.nn.LpBatchNorm1d(7, norm="p", p=1.5)
        self.bn4 = lpnorm.nn.LpBatchNorm1d(7, norm="linf", constant="paper", affine=False)

    def forward(self, x):
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.bn4(self.bn3(self.fc(x.flatten(1))))


def test_scripted_net_saves_loads_and_matches_eager(tmp_path):
    eager = Net()
    torch.jit.save(torch.jit.script(copy.deepcopy(eager)), str(tmp_path / "net.pt"))
    loaded = torch.jit.load(str(tmp_path / "net.pt"))

    for step in range(2):  # training: outputs, gradients, running statistics
        x = torch.randn(8, 3, 6, 6)
        grad_output = torch.randn(8, 7)
        outputs = []
        for net in (eager, loaded):
            net.zero_grad()
            y = net(x)
            y.backward(grad_output)
            outputs.append(y.detach())
        torch.testing.assert_close(outputs[1], outputs[0])
        for (name, p), (name_l, p_l) in zip(eager.named_parameters(), loaded.named_parameters()):
            assert name == name_l
            assert p_l.grad is not None and p_l.grad.abs().sum() > 0, name
            torch.testing.assert_close(p_l.grad, p.grad, msg=name)
        for (name, b), (_, b_l) in zip(eager.named_buffers(), loaded.named_buffers()):
            torch.testing.assert_close(b_l, b, msg=name)

    eager.eval()
    loaded.eval()
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(loaded(x), eager(x))


@pytest.mark.parametrize("norm_kwargs", NORMS[:8], ids=lambda n: "-".join(map(str, n.values())))
def test_scripted_module_3d(norm_kwargs):
    eager = lpnorm.nn.LpBatchNorm3d(4, **norm_kwargs)
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = batch((2, 4, 2, 3, 3), torch.float32)
    torch.testing.assert_close(scripted(x), eager(x))
    torch.testing.assert_close(scripted.running_var, eager.running_var)
    eager.eval()
    scripted.eval()
    torch.testing.assert_close(scripted(x), eager(x))


@pytest.mark.parametrize("norm_kwargs", [dict(norm="linf", chunks=4), dict(norm="topk", k=2, chunks=4),
                                         dict(norm="range", chunks=2)], ids=["linf", "topk", "range"])
def test_eval_takes_any_batch_after_ghost_batch_training(norm_kwargs):
    """Ghost batches split the training batch only: a trained layer evaluates a batch of one or
    a last partial batch as torch's BatchNorm2d with the same buffers does."""
    ours = lpnorm.nn.LpBatchNorm2d(3, **norm_kwargs)
    ours(torch.randn(8, 3, 4, 4))
    ours.eval()
    theirs = nn.BatchNorm2d(3).eval()
    theirs.load_state_dict(ours.state_dict())
    for n in (1, 3):
        x = torch.randn(n, 3, 2, 2)
        torch.testing.assert_close(ours(x), theirs(x))


def test_fx_symbolic_trace_keeps_layers_leaves():
    """torch's BatchNorm*d are leaves of torch.fx.symbolic_trace; lpnorm.fx's tracer keeps ours
    leaves too (the graph calls the module, which counts batches and updates its running
    statistics when the graph runs), and a plain trace through one is refused with a message
    saying so, not a TraceError from inside it."""
    import torch.fx

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), lpnorm.nn.LpBatchNorm2d(4, momentum=None), nn.ReLU(),
                             nn.Flatten(), lpnorm.nn.LpBatchNorm1d(64, norm="topk", k=2))

    with pytest.raises(RuntimeError, match="lpnorm.fx.symbolic_trace"):
        torch.fx.symbolic_trace(model())
    traced, eager = lpnorm.fx.symbolic_trace(model()), model()
    assert [n.op for n in traced.graph.nodes].count("call_module") == 5
    x = torch.randn(6, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(traced(x), eager(x))
    for name in ("1", "4"):
        assert traced.get_submodule(name).num_batches_tracked.item() == 2
        torch.testing.assert_close(traced.get_submodule(name).running_var, eager.get_submodule(name).running_var)
    traced.eval()
    eager.eval()
    torch.testing.assert_close(traced(x), eager(x))
