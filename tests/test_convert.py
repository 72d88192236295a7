"""lpnorm.convert / lpnorm.to_torch (SPEC §6): every torch batch norm of a model becomes an Lp
batch norm in place, keeping parameters, buffers, options and modes, and comes back to torch
with the same eval outputs."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lpnorm
from lpnorm.nn.batchnorm import LpBatchNormNd
from conftest import batch


class Net(nn.Module):
    """Batch norms of every kind, nested in Sequential, ModuleList, ModuleDict and a submodule."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=dtype), nn.BatchNorm2d(4, dtype=dtype),
                                  nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv3d(4, 4, 1, dtype=dtype), nn.BatchNorm3d(4, momentum=None, dtype=dtype)),
            nn.BatchNorm1d(4, affine=False, dtype=dtype),
        ])
        self.heads = nn.ModuleDict({
            "a": nn.BatchNorm1d(8, track_running_stats=False, dtype=dtype),
            "b": nn.BatchNorm1d(8, bias=False, eps=1e-3, dtype=dtype),
        })
        self.fc = nn.Linear(4 * 16, 8, dtype=dtype)

    def forward(self, x):                              # x: (N, 3, 4, 4)
        x = self.stem(x)
        x = self.blocks[0](x.unsqueeze(2)).squeeze(2)  # (N, 4, 4, 4) through 3d
        x = self.blocks[1](x.flatten(2))               # (N, 4, 16) through 1d
        x = self.fc(x.flatten(1))
        return self.heads["a"](x) + self.heads["b"](x)


def batch_norms(model):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, lpnorm.nn.batchnorm._LpBatchNorm))]


def train_a_little(model, steps=2):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        optimizer.zero_grad()
        model(batch((6, 3, 4, 4), next(model.parameters()).dtype, step)).square().mean().backward()
        optimizer.step()


def test_every_torch_batch_norm_is_replaced_in_place_keeping_everything():
    model = Net()
    train_a_little(model)
    model.blocks[0][1].eval()                  # mixed modes are kept
    model.stem[1].weight.requires_grad_(False)  # and requires_grad flags
    before = dict(batch_norms(model))
    tensors = {name: (m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked)
               for name, m in before.items()}
    state = copy.deepcopy(model.state_dict())

    result = lpnorm.convert(model, norm="topk", k=3)
    assert result is model
    after = dict(batch_norms(model))
    assert list(after) == list(before)
    expected_classes = {"stem.1": lpnorm.nn.LpBatchNorm2d, "blocks.0.1": lpnorm.nn.LpBatchNorm3d,
                        "blocks.1": lpnorm.nn.LpBatchNorm1d, "heads.a": lpnorm.nn.LpBatchNorm1d,
                        "heads.b": lpnorm.nn.LpBatchNorm1d}
    for name, new in after.items():
        old = before[name]
        assert type(new) is expected_classes[name], name
        assert (new.norm, new.k) == ("topk", 3)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
        # the very same tensors: an optimizer built before the conversion keeps working
        now = (new.weight, new.bias, new.running_mean, new.running_var, new.num_batches_tracked)
        assert all(a is b for a, b in zip(now, tensors[name])), name
    assert model.stem[1].weight.requires_grad is False and model.stem[1].bias.requires_grad is True
    assert model.heads["b"].bias is None and model.heads["b"].weight is not None
    assert model.blocks[0][1].momentum is None and model.blocks[0][1].training is False
    for key, value in model.state_dict().items():  # same keys, same values
        assert torch.equal(value, state[key]), key
    assert list(model.state_dict()) == list(state)
    model(batch((6, 3, 4, 4), torch.float32))  # and it runs


def test_options_and_refusals():
    model = lpnorm.convert(nn.Sequential(nn.BatchNorm2d(2)), norm="range", chunks=2, constant="paper")
    assert (model[0].norm, model[0].chunks, model[0].constant) == ("range", 2, "paper")
    assert lpnorm.convert(nn.Sequential(nn.BatchNorm2d(2)))[0].norm == "l1"  # the default
    with pytest.raises(ValueError, match="norm must be one of"):
        lpnorm.convert(nn.BatchNorm2d(2), norm="l3")
    with pytest.raises(ValueError, match="chunks"):
        lpnorm.convert(nn.BatchNorm2d(2), norm="l1", chunks=2)
    with pytest.raises(TypeError, match="unexpected option"):
        lpnorm.convert(nn.BatchNorm2d(2), momentum=0.5)
    with pytest.raises(ValueError, match="uninitialized"):
        lpnorm.convert(nn.Sequential(nn.LazyBatchNorm2d()))


def test_a_batch_norm_model_returns_its_replacement():
    bn = nn.BatchNorm1d(5)
    new = lpnorm.convert(bn, norm="linf")
    assert isinstance(new, lpnorm.nn.LpBatchNorm1d) and new.weight is bn.weight
    back = lpnorm.to_torch(new)
    assert type(back) is nn.BatchNorm1d and back.running_var is bn.running_var


def test_shared_modules_stay_shared_and_lp_modules_are_left_alone():
    shared = nn.BatchNorm1d(3)
    already = lpnorm.nn.LpBatchNorm1d(3, norm="linf")
    model = nn.Sequential(shared, nn.Sequential(shared), already)
    lpnorm.convert(model, norm="l1")
    assert model[0] is model[1][0] and isinstance(model[0], lpnorm.nn.LpBatchNorm1d)
    assert model[2] is already and already.norm == "linf"
    assert type(lpnorm.convert(nn.Linear(2, 2))) is nn.Linear  # nothing to do


def test_device_and_dtype_are_kept():
    model = Net(dtype=torch.float64)
    lpnorm.convert(model)
    for name, m in batch_norms(model):
        for t in (m.weight, m.running_mean):
            if t is not None:
                assert t.dtype == torch.float64 and t.device.type == "cpu", name
    assert model(batch((6, 3, 4, 4), torch.float64)).dtype == torch.float64


def test_an_optimizer_built_before_the_conversion_still_trains_it():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    lpnorm.convert(model, norm="l1")
    weight = model[1].weight.detach().clone()
    model(torch.randn(8, 4)).pow(3).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, weight)


@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=3), dict(norm="range", chunks=2)],
                         ids=lambda n: n["norm"])
def test_to_torch_gives_the_same_eval_outputs(norm_kwargs):
    """(A batch norm without running statistics normalizes with batch statistics in eval too,
    so its norm matters there: that one is left out.)"""
    torch_model = Net(dtype=torch.float64)  # float64: only summation order differs
    torch_model.heads["a"] = nn.BatchNorm1d(8, dtype=torch.float64)
    lp_model = lpnorm.convert(copy.deepcopy(torch_model), **norm_kwargs)
    train_a_little(lp_model, steps=3)  # running statistics of the Lp norm
    lp_model.eval()
    x = batch((6, 3, 4, 4), torch.float64, step=5)
    expected = lp_model(x)

    deployed = lpnorm.to_torch(lp_model)
    assert deployed is lp_model
    kinds = {type(m) for _, m in batch_norms(deployed)}
    assert kinds == {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}
    assert not deployed.training and all(not m.training for m in deployed.modules())
    torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)
    # and a plain torch model of the original architecture loads the trained state
    torch_model.load_state_dict(deployed.state_dict())
    torch.testing.assert_close(torch_model.eval()(x), expected, rtol=1e-12, atol=1e-12)


def test_sync_batch_norm_round_trip():
    """SyncBatchNorm becomes SyncLpBatchNorm over the same process group (any rank >= 2; without
    an initialized process group it normalizes the local batch), and to_torch gives back a
    SyncBatchNorm with that group."""
    sync = nn.SyncBatchNorm(3, momentum=None, eps=1e-4)
    sync.process_group = marker = object()  # whatever the caller had
    model = lpnorm.convert(nn.Sequential(sync), norm="linf")
    lp = model[0]
    assert type(lp) is lpnorm.nn.SyncLpBatchNorm and lp.process_group is marker and lp.weight is sync.weight
    assert lp.momentum is None and lp.eps == 1e-4 and lp.norm == "linf"
    for shape in [(8, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 2)]:
        assert lp(batch(shape, torch.float32)).shape == shape
    with pytest.raises(ValueError, match="expected at least 2D input"):
        lp(torch.randn(3))
    with pytest.raises(ValueError, match="chunks"):
        lpnorm.convert(nn.SyncBatchNorm(3), norm="range", chunks=2)

    lpnorm.to_torch(model)
    back = model[0]
    assert type(back) is nn.SyncBatchNorm and back.process_group is marker
    assert back.running_mean is sync.running_mean and back.momentum is None and back.eps == 1e-4


def test_sync_batch_norm_without_bias_round_trip():
    """torch's bias=False (a weight without bias) survives SyncBatchNorm -> SyncLpBatchNorm ->
    back, and LpBatchNorm2d(bias=False) -> SyncLpBatchNorm.convert_sync_batchnorm."""
    sync = nn.SyncBatchNorm(3, bias=False)
    lp = lpnorm.convert(sync, norm="l1")
    assert type(lp) is lpnorm.nn.SyncLpBatchNorm and lp.bias is None and lp.weight is sync.weight
    x = batch((4, 3, 5), torch.float32).requires_grad_()
    lp(x).square().sum().backward()
    assert lp.weight.grad is not None and x.grad is not None
    back = lpnorm.to_torch(lp)
    assert type(back) is nn.SyncBatchNorm and back.bias is None and back.weight is sync.weight
    converted = lpnorm.nn.SyncLpBatchNorm.convert_sync_batchnorm(lpnorm.nn.LpBatchNorm2d(3, bias=False))
    assert converted.bias is None and converted.weight is not None


def test_lp_batch_norm_nd_goes_back_to_sync_batch_norm():
    nd = LpBatchNormNd(3, process_group=None, norm="l1")
    back = lpnorm.to_torch(nd)
    assert type(back) is nn.SyncBatchNorm and back.running_var is nd.running_var


def test_converted_model_scripts():
    model = lpnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                         nn.BatchNorm2d(4)))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_torch_state_dicts_load_both_ways_also_without_num_batches_tracked():
    bn = nn.BatchNorm2d(4)
    bn(batch((4, 4, 3, 3), torch.float32))
    lp = lpnorm.nn.LpBatchNorm2d(4, norm="l1")
    lp.load_state_dict(bn.state_dict())
    assert torch.equal(lp.running_var, bn.running_var) and int(lp.num_batches_tracked) == 1

    old = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}  # a pre-1.0 file
    old = torch.nn.modules.module.OrderedDict(old)
    old._metadata = {"": {"version": 1}}
    fresh = lpnorm.nn.LpBatchNorm2d(4)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0 and torch.equal(fresh.running_mean, bn.running_mean)

    lp(batch((4, 4, 3, 3), torch.float32, step=1))
    torch_bn = nn.BatchNorm2d(4)
    torch_bn.load_state_dict(lp.state_dict())
    assert int(torch_bn.num_batches_tracked) == 2 and torch.equal(torch_bn.running_mean, lp.running_mean)


def test_bias_false_and_module_arguments():
    """torch's keyword-only bias=False, reset_parameters / reset_running_stats, extra_repr."""
    lp = lpnorm.nn.LpBatchNorm2d(4, bias=False, norm="topk", k=3)
    bn = nn.BatchNorm2d(4, bias=False)
    assert lp.bias is None and list(lp.state_dict()) == list(bn.state_dict())
    assert repr(lp) == repr(bn).replace("BatchNorm2d", "LpBatchNorm2d")[:-1] + ", norm=topk, k=3)"
    x = batch((4, 4, 3, 3), torch.float32)
    lp(x).sum().backward()
    assert lp.weight.grad is not None
    with torch.no_grad():
        lp.weight.mul_(3)
    lp.reset_parameters()
    assert torch.equal(lp.weight, torch.ones(4)) and int(lp.num_batches_tracked) == 0
    assert torch.equal(lp.running_var, torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(lpnorm.to_torch(lp)) is nn.BatchNorm2d
