"""What only a GPU can show (docs/cuda.md): the CUDA kernels against the CPU kernels on the same
data (saved tensors included, the same sparse_index), bit-identical reruns, the launch geometry's
edge cases (tails, misaligned and odd layouts, many blocks per channel, many channel tiles),
CUDA's own refusals (mixed devices, k > 32), the current stream, fp16 autocast, and the module
on the GPU.

The rest of the suite runs its device-parametrized tests on "cuda" too (conftest.DEVICES). Without
a GPU or without lpnorm's CUDA kernels every test here is skipped and says why.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lpnorm
from conftest import (CUDA_UNAVAILABLE, DTYPES, GPU, NO_CUDA_REASON, NORMS, assert_close, batch,
                      cuda_or_fake, norm_id, requires_cuda)

pytestmark = pytest.mark.cuda


def test_cuda_backend_is_testable():
    """The one test that reports, on a machine without a GPU, that the CUDA cases did not run."""
    if CUDA_UNAVAILABLE is not None:
        pytest.skip(NO_CUDA_REASON)
    assert lpnorm.build_info()["cuda"], "the CUDA kernels are registered but build_info says no CUDA"
    for op in ("batch_norm_forward", "batch_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lpnorm::{op}", "CUDA"), op


# ---------------------------------------------------------------------------------------------
# CUDA against CPU, through the operators, saved tensors included

def op_kwargs(norm_kwargs):
    return (norm_kwargs["norm"], norm_kwargs.get("k", 10), norm_kwargs.get("p", 2.0),
            norm_kwargs.get("chunks", 1), norm_kwargs.get("constant", "exact"))


SAVED = ("save_mean", "save_invstd", "save_coef", "sparse_index", "sparse_coef")


def run_ops(x, params, grad, norm_kwargs, training=True, device=None):
    """batch_norm_forward then batch_norm_backward on `device` (x's by default); all results,
    running statistics included, as a dict of CPU tensors."""
    device = device or x.device
    x = x.to(device)
    weight, bias, running_mean, running_var = (None if t is None else t.clone().to(device)
                                               for t in params)
    norm, k, p, chunks, constant = op_kwargs(norm_kwargs)
    y, *saved = torch.ops.lpnorm.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                    training, 0.1, 1e-5, norm, k, p, chunks,
                                                    constant)
    grad_x, grad_w, grad_b = torch.ops.lpnorm.batch_norm_backward(grad.to(device), x, weight,
                                                                  *saved, training, norm, p)
    out = dict(y=y, grad_x=grad_x, grad_weight=grad_w, grad_bias=grad_b,
               running_mean=running_mean, running_var=running_var, **dict(zip(SAVED, saved)))
    assert y.device == x.device and grad_x.device == x.device
    return {name: None if t is None else t.cpu() for name, t in out.items()}


def make_case(shape, dtype_name, layout=None, seed=0):
    torch.manual_seed(seed)
    dtype, param_dtype = DTYPES[dtype_name]
    x = batch(shape, dtype)
    if layout is not None:
        x = layout(x)
    C = shape[1]
    params = ((torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype),
              torch.randn(C, dtype=torch.float64).to(param_dtype),
              torch.randn(C, dtype=torch.float64).to(param_dtype),
              (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype))
    grad = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x, params, grad


def assert_same_selection(gpu, cpu, x, what):
    """The sparse entries pick the same elements. Exactly so for float32 / float64; a half input
    may tie two candidates' |x - mean| within the means' rounding difference (float32 against
    float64 accumulation), where either pick is right: then their |x - mean| must agree."""
    if torch.equal(gpu["sparse_index"], cpu["sparse_index"]):
        return
    assert x.dtype in (torch.float16, torch.bfloat16), f"{what}: sparse_index differs from the CPU's"
    rows = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    mean = cpu["save_mean"].double()[:, None]
    magnitude = lambda index: (rows.gather(1, index) - mean).abs().sort(dim=1).values
    assert_close(magnitude(gpu["sparse_index"]), magnitude(cpu["sparse_index"]), x.dtype,
                 what=f"{what}: |x - mean| at sparse_index")


def assert_cuda_matches_cpu(x, params, grad, norm_kwargs, training=True, what=""):
    cpu = run_ops(x, params, grad, norm_kwargs, training, device="cpu")
    gpu = run_ops(x, params, grad, norm_kwargs, training, device=GPU)
    for name, expected in cpu.items():
        if expected is None:
            assert gpu[name] is None, name
            continue
        assert gpu[name].dtype == expected.dtype and gpu[name].shape == expected.shape, name
        if name == "sparse_index":
            assert_same_selection(gpu, cpu, x, what)
        elif name == "sparse_coef" and not torch.equal(gpu["sparse_index"], cpu["sparse_index"]):
            continue  # a different (tied) pick: coefficients are compared through their sum below
        else:  # within the rounding of the result's own dtype (conftest.tolerance)
            assert_close(gpu[name], expected, what=f"{what}: {name}")
    return gpu, cpu


LAYOUT_CASES = {  # name: (shape, layout)
    "nchw": ((8, 5, 6, 7), None),
    "nhwc": ((8, 5, 6, 7), lambda x: x.contiguous(memory_format=torch.channels_last)),
    "nc": ((96, 6), None),
    "ncl": ((6, 4, 20), None),
    "ncdhw-channels_last_3d": ((2, 8, 3, 4, 5), lambda x: x.contiguous(memory_format=torch.channels_last_3d)),
    "transposed": ((40, 3), lambda x: x.t().contiguous().t()),
}


@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", NORMS, ids=[norm_id(n) for n in NORMS])
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("layout", list(LAYOUT_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_cpu(norm_kwargs, dtype_name, layout, training):
    shape, make = LAYOUT_CASES[layout]
    x, params, grad = make_case(shape, dtype_name, make)
    assert_cuda_matches_cpu(x, params, grad, norm_kwargs, training, what=f"{layout} {dtype_name}")


# Shapes that reach the launch plan's edge cases: several blocks per channel (> 16384 values),
# sizes that allow no vector loads (odd spatial size), vector widths that do not divide C
# (channels-last), more channels than one block's tile (> 32 vectors), one channel, 2-D inputs
# with many rows, chunks whose boundaries fall inside a block's share.
GEOMETRY_CASES = {
    "nchw-many_splits-odd_plane": ((32, 3, 31, 33), None),
    "nchw-many_splits-vectors": ((64, 4, 16, 16), None),
    "nhwc-many_splits": ((64, 24, 16, 16), "cl"),
    "nhwc-C5-no_vectors": ((16, 5, 12, 12), "cl"),
    "nhwc-C2": ((32, 2, 20, 20), "cl"),
    "nhwc-C264-two_tiles": ((8, 264, 5, 5), "cl"),
    "nc-many_rows": ((40000, 3), None),
    "nc-one_channel": ((40000, 1), None),
    "nc-wide": ((8, 4100), None),
    "ncl-long": ((4, 3, 9000), None),
}
GEOMETRY_NORMS = [dict(norm="l2"), dict(norm="l1"), dict(norm="linf"), dict(norm="topk", k=10),
                  dict(norm="topk", k=32), dict(norm="topk", k=5, chunks=4),
                  dict(norm="range", chunks=2), dict(norm="p", p=1.5)]


@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", GEOMETRY_NORMS, ids=[norm_id(n) for n in GEOMETRY_NORMS])
@pytest.mark.parametrize("dtype_name", ["float32", "float16-mixed", "bfloat16", "float64"])
@pytest.mark.parametrize("case", list(GEOMETRY_CASES))
def test_cuda_geometry_matches_cpu(norm_kwargs, dtype_name, case):
    shape, layout = GEOMETRY_CASES[case]
    chunks = norm_kwargs.get("chunks", 1)
    per_chunk = shape[0] // chunks * (shape[2] * shape[3] if len(shape) == 4 else
                                       shape[2] if len(shape) == 3 else 1)
    if shape[0] % chunks or norm_kwargs.get("k", 1) > per_chunk:
        pytest.skip("chunks must divide N and k fit in a chunk")
    make = (lambda x: x.contiguous(memory_format=torch.channels_last)) if layout == "cl" else None
    x, params, grad = make_case(shape, dtype_name, make)
    assert_cuda_matches_cpu(x, params, grad, norm_kwargs, what=f"{case} {dtype_name}")


@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", GEOMETRY_NORMS, ids=[norm_id(n) for n in GEOMETRY_NORMS])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("offset", [1, 3], ids=["offset1", "offset3"])
def test_cuda_misaligned_input(norm_kwargs, dtype_name, offset):
    """An input starting 1 or 3 elements into its storage cannot use 16-byte loads (nor can the
    output or gradients that empty_like gives it): the kernels must fall back, not fault."""
    dtype, _ = DTYPES[dtype_name]
    x, params, grad = make_case((8, 4, 16, 16), dtype_name)
    storage = torch.empty(x.numel() + offset, dtype=dtype)
    shifted = storage[offset:].view(x.shape).copy_(x)
    assert shifted.data_ptr() % 16 != 0
    gpu_storage = storage.to(GPU)
    gpu_x = gpu_storage[offset:].view(x.shape)
    assert gpu_x.data_ptr() % 16 != 0
    gpu = run_ops(gpu_x, params, grad, norm_kwargs)
    cpu = run_ops(shifted, params, grad, norm_kwargs)
    assert_close(gpu["y"], cpu["y"], dtype, what="y")
    assert_close(gpu["grad_x"], cpu["grad_x"], dtype, what="grad_x")


# ---------------------------------------------------------------------------------------------
# Determinism: the same input gives the same bits (no atomics, shape-only splits)

@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", GEOMETRY_NORMS, ids=[norm_id(n) for n in GEOMETRY_NORMS])
@pytest.mark.parametrize("dtype_name", ["float32", "float16-mixed"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_cuda_is_deterministic(norm_kwargs, dtype_name, layout):
    make = (lambda x: x.contiguous(memory_format=torch.channels_last)) if layout == "nhwc" else None
    x, params, grad = make_case((32, 16, 24, 24), dtype_name, make)
    x = x.to(GPU)
    first = run_ops(x, params, grad, norm_kwargs)
    if GPU == "cuda":
        torch.cuda.empty_cache()  # other workspace addresses
    second = run_ops(x, params, grad, norm_kwargs)
    for name, value in first.items():
        if value is not None:
            assert torch.equal(value, second[name]), f"{name} differs between two identical runs"


# ---------------------------------------------------------------------------------------------
# Refusals of the CUDA backend

def valid_call(**changes):
    args = dict(input=torch.randn(4, 3, 5, device="cuda"), running_mean=torch.zeros(3, device="cuda"),
                running_var=torch.ones(3, device="cuda"), weight=torch.ones(3, device="cuda"),
                bias=torch.zeros(3, device="cuda"), training=True)
    args.update(changes)
    return args


@requires_cuda
@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_cuda_refuses_mixed_devices(name):
    """A CUDA input with a CPU parameter (and a CPU input with a CUDA one): a ValueError naming
    it, before the running statistics change."""
    value = torch.ones(3) if name in ("weight", "running_var") else torch.zeros(3)
    args = valid_call(**{name: value})
    before = args["running_mean"].clone()
    with pytest.raises(ValueError, match=name):
        lpnorm.functional.batch_norm(**args)
    if name != "running_mean":
        assert torch.equal(args["running_mean"], before)
    args = valid_call(input=torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="weight|bias|running_mean|running_var"):
        lpnorm.functional.batch_norm(**args)


@requires_cuda
def test_cuda_backward_refuses_grad_on_another_device():
    x = torch.randn(4, 3, 5, device="cuda")
    _, *saved = torch.ops.lpnorm.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5,
                                                    "l1", 10, 2.0, 1, "exact")
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.lpnorm.batch_norm_backward(torch.randn(4, 3, 5), x, None, *saved, True, "l1", 2.0)


@requires_cuda
def test_cuda_refuses_topk_above_32():
    """The candidates live in registers: k <= 32 on CUDA, said clearly; the CPU takes any k, and
    eval mode (running statistics) does not need the candidates at all."""
    args = valid_call(input=torch.randn(8, 3, 10, device="cuda"))
    before = args["running_var"].clone()
    with pytest.raises(RuntimeError, match=r"k <= 32"):
        lpnorm.functional.batch_norm(**args, norm="topk", k=33)
    assert torch.equal(args["running_var"], before), "a refused call changed the running statistics"
    lpnorm.functional.batch_norm(**args, norm="topk", k=32)
    lpnorm.functional.batch_norm(**dict(args, training=False), norm="topk", k=33)
    cpu = {key: value.cpu() if torch.is_tensor(value) else value for key, value in args.items()}
    lpnorm.functional.batch_norm(**cpu, norm="topk", k=33)


@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", GEOMETRY_NORMS, ids=[norm_id(n) for n in GEOMETRY_NORMS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_mean_far_from_zero(norm_kwargs, training):
    """|mean| >> sigma (float32 data around 1000, spread 0.01; eval with running statistics
    alike): y = (x - mean) * scale + bias as on the CPU, where x * alpha + (bias - mean * alpha)
    would lose about 1e-2 of y to cancellation."""
    x, params, grad = make_case((8, 3, 5, 5), "float32")
    x = 1000.0 + 0.01 * x
    weight, bias, _, _ = params
    running = (torch.full((3,), 1000.0), torch.full((3,), 1e-4))
    assert_cuda_matches_cpu(x, (weight, bias) + running, grad, norm_kwargs, training, what="far from zero")


# ---------------------------------------------------------------------------------------------
# Empty and non-finite inputs on the GPU (beyond test_batch_norm's device-parametrized cases)

@cuda_or_fake
@pytest.mark.parametrize("norm_kwargs", GEOMETRY_NORMS, ids=[norm_id(n) for n in GEOMETRY_NORMS])
def test_cuda_all_nan_channel_and_chunk(norm_kwargs):
    """A channel (and, with chunks, one chunk of another channel) made only of NaN: no kernel
    faults, the NaN stays in its channel, the other channels match the CPU."""
    x, params, grad = make_case((8, 3, 6, 6), "float32")
    x[:, 1] = float("nan")
    x[:2, 2] = float("nan")
    gpu = run_ops(x.to(GPU), params, grad, norm_kwargs)
    cpu = run_ops(x, params, grad, norm_kwargs)
    assert gpu["y"][:, 1].isnan().all() and gpu["y"][:, 2].isnan().all()
    assert_close(gpu["y"][:, 0], cpu["y"][:, 0], what="y of the finite channel")
    assert_close(gpu["grad_x"][:, 0], cpu["grad_x"][:, 0], what="grad of the finite channel")
    assert torch.equal(gpu["sparse_index"], cpu["sparse_index"])


# ---------------------------------------------------------------------------------------------
# Streams and devices

@requires_cuda
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l1"), dict(norm="topk", k=10)], ids=norm_id)
def test_cuda_runs_on_the_current_stream(norm_kwargs):
    """The input is written on a side stream after a long sleep kernel, then normalized there:
    kernels launched on any other stream would read it before it is written."""
    x, params, grad = make_case((16, 8, 32, 32), "float32")
    expected = run_ops(x.cuda(), params, grad, norm_kwargs)
    source = x.cuda()
    params = [t.cuda() for t in params]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        target = torch.zeros_like(source)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on this stream
        target.copy_(source)
        y = lpnorm.functional.batch_norm(target, params[2], params[3], params[0], params[1],
                                         training=True, **norm_kwargs)
    side.synchronize()
    torch.testing.assert_close(y.cpu(), expected["y"], rtol=0, atol=0)


@requires_cuda
def test_cuda_second_device():
    """An input on cuda:1 while cuda:0 is current (the device guard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, params, grad = make_case((8, 4, 6, 6), "float32")
    expected = run_ops(x, params, grad, dict(norm="topk", k=3))
    with torch.cuda.device(0):
        got = run_ops(x.to("cuda:1"), params, grad, dict(norm="topk", k=3))
    assert_close(got["y"], expected["y"], what="y")
    assert_close(got["grad_x"], expected["grad_x"], what="grad_x")


@requires_cuda
def test_cuda_more_than_2_31_elements():
    """Offsets beyond 2^31 elements (a 4 GiB float16 tensor): norm='l2' is torch's batch norm."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of GPU memory")
    x = torch.randn(2, 2, 2 ** 29 + 4096, device="cuda", dtype=torch.float16)  # 2^31 + 16384 elements
    y = lpnorm.functional.batch_norm(x, None, None, training=True, norm="l2")
    expected = F.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y[:, 1, -10000:].float(), expected[:, 1, -10000:], rtol=0.01, atol=0.01)
    del y, expected
    torch.cuda.empty_cache()


@requires_cuda
def test_cuda_refuses_more_than_2_31_values_per_channel():
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of GPU memory")
    x = torch.empty(2 ** 31, 1, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="2\\^31"):
        lpnorm.functional.batch_norm(x, None, None, training=True)
    del x
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Modules on the GPU

@requires_cuda
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="topk", k=3)],
                         ids=norm_id)
def test_cuda_module_trains_like_on_cpu(norm_kwargs):
    """LpBatchNorm2d on the GPU: three training steps and an eval step give the CPU module's
    outputs, gradients and buffers."""
    modules = [lpnorm.nn.LpBatchNorm2d(6, **norm_kwargs) for _ in range(2)]
    modules[1].cuda()
    for step in range(3):
        x = batch((8, 6, 5, 5), torch.float32, step)
        grad = torch.randn_like(x)
        ys = []
        for module, device in zip(modules, ("cpu", "cuda")):
            module.zero_grad()
            y = module(x.to(device))
            y.backward(grad.to(device))
            ys.append(y.detach())
        assert_close(ys[1], ys[0].double(), torch.float32, what=f"step {step}: output")
        for (name, a), (_, b) in zip(modules[0].named_parameters(), modules[1].named_parameters()):
            assert_close(b.grad, a.grad.double(), torch.float32, what=f"step {step}: grad of {name}")
        for (name, a), (_, b) in zip(modules[0].named_buffers(), modules[1].named_buffers()):
            assert_close(b, a.double(), torch.float32, what=f"step {step}: {name}")
    for module in modules:
        module.eval()
    x = batch((8, 6, 5, 5), torch.float32, 9)
    assert_close(modules[1](x.cuda()), modules[0](x).double(), torch.float32, what="eval")


@requires_cuda
@pytest.mark.parametrize("norm_kwargs", [dict(norm="l2"), dict(norm="l1"), dict(norm="topk", k=3)],
                         ids=norm_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_autocast_float16_is_torch_batch_norm(norm_kwargs, training):
    """Under torch.autocast("cuda", float16) a conv's float16 output reaches the norm with float32
    parameters (the mixed mode), as torch's batch norm sees it; l2 (and eval, plain batch norm
    for every norm) gives torch's numbers."""
    reference = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).cuda()
    ours = lpnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
                          **norm_kwargs).cuda()
    ours.load_state_dict(reference.state_dict())
    x = batch((8, 3, 8, 8), torch.float32).cuda()
    results = []
    for model in (reference, ours):
        model.train(training)
        inp = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16):
            y = model(inp)
        y.float().square().mean().backward()
        results.append(dict(y=y, grad_x=inp.grad, grad_weight=model[1].weight.grad,
                            running_var=model[1].running_var))
    expected, actual = results
    assert expected["y"].dtype == torch.float16
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
    if norm_kwargs["norm"] == "l2" or not training:
        for key in expected:
            torch.testing.assert_close(actual[key].float(), expected[key].float(), rtol=0.02,
                                       atol=0.02, msg=lambda m: f"{key}: {m}")
