"""Shared helpers of the lpnorm tests: the norms under test, dtypes and their tolerances, layouts."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference` from any mode


# ---------------------------------------------------------------------------------------------
# Devices (docs/cuda.md): every device-parametrized test runs on "cpu", and on "cuda" when a GPU
# is visible and lpnorm was built with its CUDA kernels. Without them no "cuda" items are
# generated at all (the suite stays as fast as before); tests/test_cuda.py holds the one test
# that is skipped to say so. Items on CUDA carry the `cuda` marker: `pytest -m cuda` runs
# exactly them.
#
# LPNORM_TEST_FAKE_CUDA=1 on a machine without CUDA generates the "cuda" items anyway, running
# on the CPU: it checks the tests' own device handling where no GPU is at hand (tests that need
# a real GPU skip themselves under it).


def _cuda_unavailable():
    """Why the CUDA cases cannot run, or None when they can."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    import lpnorm  # noqa: F401  (registers the operators)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lpnorm::batch_norm_forward", "CUDA"):
        return "lpnorm was built without its CUDA kernels (LPNORM_CUDA=ON)"
    return None


CUDA_UNAVAILABLE = _cuda_unavailable()
FAKE_CUDA = CUDA_UNAVAILABLE is not None and os.environ.get("LPNORM_TEST_FAKE_CUDA") == "1"
NO_CUDA_REASON = f"no CUDA device/kernels: {CUDA_UNAVAILABLE}"

DEVICES = ["cpu"]
if CUDA_UNAVAILABLE is None:
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
elif FAKE_CUDA:
    DEVICES.append(pytest.param("cpu", id="cuda", marks=pytest.mark.cuda))


# Where the CUDA-against-CPU comparisons of test_cuda.py run: "cuda", or the CPU under
# LPNORM_TEST_FAKE_CUDA=1 (CPU against CPU: it checks those tests' own code).
GPU = "cpu" if FAKE_CUDA else "cuda"


def cuda_or_fake(test):
    """For tests that compare the GPU with the CPU: they also run under LPNORM_TEST_FAKE_CUDA."""
    skip = pytest.mark.skipif(CUDA_UNAVAILABLE is not None and not FAKE_CUDA, reason=NO_CUDA_REASON)
    return pytest.mark.cuda(skip(test))


def requires_cuda(test):
    """For tests that only make sense on a real GPU (CUDA's own limits, streams, CUDA against
    CPU): skipped, with the reason, where there is none; marked `cuda` either way."""
    skip = pytest.mark.skipif(CUDA_UNAVAILABLE is not None, reason=NO_CUDA_REASON)
    return pytest.mark.cuda(skip(test))


def devices_param():
    return pytest.mark.parametrize("device", DEVICES)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on the GPU (select exactly these with -m cuda)")


def pytest_collection_modifyitems(config, items):
    """Without CUDA, the GPU-only tests (requires_cuda / cuda_or_fake, about a thousand
    parametrized cases) are deselected rather than each reported as skipped; the one test
    test_cuda.py::test_cuda_backend_is_testable stays and is skipped with the reason."""
    if CUDA_UNAVAILABLE is None:
        return
    keep, drop = [], []
    for item in items:
        gpu_only = any(mark.name == "skipif" and mark.kwargs.get("reason") == NO_CUDA_REASON and mark.args[0]
                       for mark in item.iter_markers())
        (drop if gpu_only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def seed():
    """Every test draws the same numbers, whatever ran before it."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# The norms (SPEC §1), each with the extra arguments that select it

NORMS = [
    dict(norm="l2"),
    dict(norm="l1"),
    dict(norm="linf"),
    dict(norm="topk", k=3),
    dict(norm="topk", k=10),
    dict(norm="range"),
    dict(norm="p", p=3.0),
    dict(norm="p", p=1.5),
    # ghost batches
    dict(norm="linf", chunks=2),
    dict(norm="topk", k=2, chunks=2),
    dict(norm="range", chunks=2),
    # the multipliers of the authors' code
    dict(norm="linf", constant="paper"),
    dict(norm="topk", k=3, constant="paper"),
    dict(norm="topk", k=3, chunks=2, constant="paper"),  # the multiplier of the chunk's m
    dict(norm="range", chunks=2, constant="paper"),
]


def norm_id(kwargs):
    """dict(norm="topk", k=3, chunks=2) -> "topk-k3-chunks2"."""
    return "-".join([kwargs["norm"]] + [f"{key}{value}" for key, value in kwargs.items()
                                         if key != "norm"])


NORM_IDS = [norm_id(n) for n in NORMS]


def norms_param():
    return pytest.mark.parametrize("norm_kwargs", NORMS, ids=NORM_IDS)


# ---------------------------------------------------------------------------------------------
# dtypes: (input dtype, weight / bias / running-stat dtype); mixed = half input, float32 params

DTYPES = {
    "float64": (torch.float64, torch.float64),
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bfloat16-mixed": (torch.bfloat16, torch.float32),
    "float16-mixed": (torch.float16, torch.float32),
}


def tolerance(dtype):
    """Relative tolerance for a result stored in `dtype`, compared with the float64 reference
    computed from the same input values. float64 and float32 allow for summation order over a
    few thousand elements; half formats are dominated by the final rounding (eps / 2), plus slack."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 4 * torch.finfo(dtype).eps


def assert_close(actual, expected, dtype=None, what=""):
    """actual (any dtype) against the float64 reference, relative to the reference's magnitude:
    |actual - expected| <= tol * (|expected| + max|expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()  # a CUDA result vs the CPU reference
    tol = tolerance(dtype or actual.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol,
                               atol=tol * max(scale, 1e-30), equal_nan=True,
                               msg=lambda message: f"{what}: {message}")


# ---------------------------------------------------------------------------------------------
# Layouts: the same logical tensor with other strides

def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def channels_last_3d(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def sliced(x):
    """A non-contiguous view with x's values: a slice of a larger tensor (batch step 2,
    channels 1..C, spatial offset)."""
    N, C = x.shape[:2]
    big = torch.zeros((2 * N, C + 2) + tuple(s + 1 for s in x.shape[2:]), dtype=x.dtype,
                      device=x.device)
    index = (slice(None, None, 2), slice(1, C + 1)) + tuple(slice(1, None) for _ in x.shape[2:])
    view = big[index]
    view.copy_(x)
    assert not view.is_contiguous()
    return view


def transposed(x):
    """A non-contiguous view with x's values, its dims in reverse memory order (the batch dim
    innermost, stride 1)."""
    reverse = list(range(x.dim()))[::-1]
    view = x.permute(reverse).contiguous().permute(reverse)
    assert torch.equal(view, x) and not view.is_contiguous()
    return view


def contiguous(x):
    return x.contiguous()


def batch(shape, dtype, step=0):
    """A batch of Gaussian data, per channel mean and scale differing, shifting with `step`."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    scale = torch.linspace(0.5, 3.0, C).view(view) * (1 + 0.25 * step)
    shift = torch.linspace(-1.0, 2.0, C).view(view) + 0.5 * step
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Some tests (the CLI's --threads) change torch's thread count; later tests compare against
    programs that run with the default, so every test starts from the same count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def distinct_input(shape, dtype=torch.float64):
    """Gaussian values whose |x - mean| and x differ by > 1e-3 within each channel and stay
    > 1e-3 away from the mean: the arg-max / top-k set and the signs do not change under
    gradcheck's perturbations (1e-6)."""
    while True:
        x = torch.randn(shape, dtype=dtype)
        rows = x.transpose(0, 1).reshape(shape[1], -1)
        d = (rows - rows.mean(dim=1, keepdim=True)).abs()
        gaps = [v.sort(dim=1).values.diff(dim=1).min() for v in (d, rows)]
        if min(gaps) > 1e-3 and d.min() > 1e-3:
            return x
