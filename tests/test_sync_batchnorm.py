"""SyncLpBatchNorm (SPEC §6, issue 5): two gloo processes with uneven batches give what one
process gives over the concatenated batch, for every norm: outputs, input gradients,
weight/bias gradients (summed over the processes, as DDP does), running statistics and the
evaluation output afterwards; on CPU through the CPU stage kernels and through the ATen
compositions that are the stage operators' CUDA kernels (lpnorm/_composite_stages.py), and on
a GPU where there is one. Plus the compositions against the CPU kernels stage by stage,
convert_sync_batchnorm and the single-process fallback.

The two processes run this file as a script (``--worker``), once for all cases, with a
bounded timeout; the parent compares their saved results with lpnorm.nn.LpBatchNorm2d.
"""
import os
import socket
import subprocess
import sys
import types
from datetime import timedelta

import pytest
import torch

from conftest import CUDA_UNAVAILABLE, DEVICES, FAKE_CUDA, GPU, NO_CUDA_REASON

ROWS = (3, 5)        # uneven batch sizes of rank 0 and rank 1 (8 rows in all)
CHANNELS = 4
TIMEOUT_S = 150

# (name, module options, input kind, dtype[, rows of rank 0 and rank 1])
CASES = [
    ("l2", dict(norm="l2"), "normal", torch.float64),
    ("l1", dict(norm="l1"), "normal", torch.float64),
    ("linf", dict(norm="linf"), "normal", torch.float64),
    ("topk3", dict(norm="topk", k=3), "normal", torch.float64),
    ("range", dict(norm="range"), "normal", torch.float64),
    ("p3", dict(norm="p", p=3.0), "normal", torch.float64),
    # integer-valued inputs: ties in the extremes, broken toward the lowest global index
    ("linf_ties", dict(norm="linf"), "ties", torch.float64),
    ("topk3_ties", dict(norm="topk", k=3), "ties", torch.float64),
    ("range_ties", dict(norm="range"), "ties", torch.float64),
    # float32, channels-last, momentum=None (cumulative average), the paper's constant
    ("l1_f32_cl", dict(norm="l1", momentum=None), "channels_last", torch.float32),
    ("topk2_paper", dict(norm="topk", k=2, constant="paper"), "normal", torch.float64),
    # a rank without rows, as nn.SyncBatchNorm allows
    ("l1_empty_rank", dict(norm="l1"), "normal", torch.float64, (0, 8)),
    ("topk3_empty_rank", dict(norm="topk", k=3), "normal", torch.float64, (8, 0)),
]


def _rows(case):
    return case[4] if len(case) > 4 else ROWS


def _data(index, kind, dtype):
    """The full batch (both ranks' rows), its output gradient, weight and bias."""
    gen = torch.Generator().manual_seed(1234 + index)
    shape = (sum(ROWS), CHANNELS, 3, 3)
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    else:
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if kind == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.rand(CHANNELS, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(CHANNELS, generator=gen, dtype=torch.float64).to(dtype)
    return x, g, w, b


def _run(module, x, g):
    """One training step and one evaluation forward; what is compared."""
    x = x.clone().requires_grad_()
    y = module(x)
    (y * g).sum().backward()
    module.eval()
    with torch.no_grad():
        y_eval = module(x.detach())
    return dict(out=y.detach(), grad_input=x.grad, grad_weight=module.weight.grad, grad_bias=module.bias.grad,
                running_mean=module.running_mean.clone(), running_var=module.running_var.clone(),
                num_batches_tracked=module.num_batches_tracked.clone(), eval_out=y_eval)


def _worker(rank, world, port, out_path, stages, device):
    torch.set_num_threads(1)
    import torch.distributed as dist

    import lpnorm

    if stages == "composite":  # CUDA's stage kernels, on CPU tensors in place of the CPU kernels
        library = _use_composite_stages_on_cpu()  # registered while it lives

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    for index, case in enumerate(CASES):
        name, options, kind, dtype = case[:4]
        begin = sum(_rows(case)[:rank])
        rows = slice(begin, begin + _rows(case)[rank])
        x, g, w, b = _data(index, kind, dtype)
        if index % 2 == 0:  # built directly
            module = lpnorm.nn.SyncLpBatchNorm(CHANNELS, dtype=dtype, **options)
        else:  # converted from an LpBatchNorm2d inside a model
            model = torch.nn.Sequential(lpnorm.nn.LpBatchNorm2d(CHANNELS, dtype=dtype, **options))
            module = lpnorm.nn.SyncLpBatchNorm.convert_sync_batchnorm(model)[0]
            assert type(module) is lpnorm.nn.SyncLpBatchNorm, type(module)
        module.to(device)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        results[name] = {key: value.cpu() for key, value in _run(module, x[rows].to(device), g[rows].to(device)).items()}
        if x[rows].shape[0] > 0:  # this rank's rows alone, to show the statistics were not those
            local = lpnorm.nn.LpBatchNorm2d(CHANNELS, dtype=dtype, **options)
            with torch.no_grad():
                results[name]["local_out"] = local(x[rows])
    if stages == "composite":
        results["composite_calls"] = _COMPOSITE_CALLS
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _use_composite_stages_on_cpu():
    """Registers lpnorm/_composite_stages.py's functions as the CPU kernels of the stage
    operators (their finalize runs the CPU kernel itself, so it stays)."""
    import warnings

    from lpnorm import _composite_stages

    def counted(name, fn):
        def call(*args):
            _COMPOSITE_CALLS[name] = _COMPOSITE_CALLS.get(name, 0) + 1
            return fn(*args)
        return call

    library = torch.library.Library("lpnorm", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")
        for name, fn in _composite_stages._STAGES.items():
            if name != "batch_norm_finalize":
                library.impl(name, counted(name, fn), "CPU")
    return library


_COMPOSITE_CALLS = {}  # stage name -> calls, in a worker that runs the compositions


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(actual, expected, dtype, what):
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("stages, device", [
    ("native", "cpu"),
    ("composite", "cpu"),
    pytest.param("native", GPU, id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        CUDA_UNAVAILABLE is not None and not FAKE_CUDA, reason=NO_CUDA_REASON)]),
])
def test_two_gloo_processes_equal_one_process_over_the_concatenated_batch(tmp_path, stages, device):
    """native: the CPU stage kernels; composite: the ATen compositions CUDA runs, here on CPU
    tensors (the same layer code and collectives as on GPUs, short of NCCL); cuda: CUDA
    tensors over gloo, both processes on one GPU (the stage operators' CUDA kernels are the
    compositions)."""
    import lpnorm

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(rank), "2", str(port),
                               str(tmp_path / f"rank{rank}.pt"), stages, device], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed (rc {proc.returncode}):\n{log}"
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    if stages == "composite":  # the compositions ran, every one of them, on both ranks
        for rank in ranks:
            assert set(rank.pop("composite_calls")) == {"batch_norm_collect", "batch_norm_deviations",
                                                        "batch_norm_apply", "batch_norm_reduce_grad",
                                                        "batch_norm_apply_grad"}

    for index, case in enumerate(CASES):
        name, options, kind, dtype = case[:4]
        x, g, w, b = _data(index, kind, dtype)
        reference = lpnorm.nn.LpBatchNorm2d(CHANNELS, dtype=dtype, **options)
        with torch.no_grad():
            reference.weight.copy_(w)
            reference.bias.copy_(b)
        expected = _run(reference, x, g)
        got = [r[name] for r in ranks]
        for key in ("out", "grad_input", "eval_out"):
            _close(torch.cat([got[0][key], got[1][key]]), expected[key], dtype, f"{name} {key}")
        for key in ("grad_weight", "grad_bias"):  # per-rank gradients; DDP sums them
            _close(got[0][key] + got[1][key], expected[key], dtype, f"{name} {key}")
        for rank in range(2):  # the statistics were synchronized: not those of the local rows
            if _rows(case)[rank] > 0:
                assert not torch.allclose(got[rank]["out"], got[rank]["local_out"]), f"{name}: rank {rank} not synced"
            for key in ("running_mean", "running_var"):
                _close(got[rank][key], expected[key], dtype, f"{name} {key} (rank {rank})")
            assert got[rank]["num_batches_tracked"].item() == 1
        if kind == "channels_last":
            assert got[0]["out"].is_contiguous(memory_format=torch.channels_last)


def test_single_process_falls_back_to_the_local_batch_norm():
    import lpnorm

    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    for options in (dict(norm="l1"), dict(norm="topk", k=3), dict(norm="p", p=3.0)):
        sync = lpnorm.nn.SyncLpBatchNorm(3, dtype=torch.float64, **options)
        local = lpnorm.nn.LpBatchNorm2d(3, dtype=torch.float64, **options)
        torch.testing.assert_close(sync(x), local(x))
        torch.testing.assert_close(sync.running_var, local.running_var)
        sync.eval()
        local.eval()
        torch.testing.assert_close(sync(x), local(x))
    # any rank >= 2, as nn.SyncBatchNorm
    assert lpnorm.nn.SyncLpBatchNorm(3)(torch.randn(5, 3)).shape == (5, 3)


def test_synchronized_calls_are_refused_before_any_communication(monkeypatch):
    # In a (pretended) process group of two, refused calls raise before any collective, on
    # every process alike: an input on a device without stage kernels (CPU and CUDA have
    # them; a meta tensor here) and the arguments LpBatchNorm2d refuses.
    import pytest
    import torch.distributed as dist

    import lpnorm

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "group", type("Groups", (), {"WORLD": object()}))
    layer = lpnorm.nn.SyncLpBatchNorm(3)
    with pytest.raises(NotImplementedError, match="CPU or CUDA tensors.*got input on meta"):
        layer(torch.empty(4, 3, 2, 2, device="meta"))
    # so are arguments LpBatchNorm2d refuses, with its messages, before any communication
    with pytest.raises(ValueError, match="weight must have one value per channel"):
        layer(torch.randn(4, 5, 2, 2))
    with pytest.raises(TypeError, match="weight has dtype Half"):
        lpnorm.nn.SyncLpBatchNorm(3, dtype=torch.float16)(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="eps must be positive"):
        lpnorm.nn.SyncLpBatchNorm(3, eps=0.0)(torch.randn(4, 3, 2, 2))
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    # the same layer in evaluation normalizes locally: no synchronization, nothing refused
    layer.eval()
    assert layer(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def test_chunks_are_refused():
    import pytest

    import lpnorm

    with pytest.raises(ValueError, match="chunks"):
        lpnorm.nn.SyncLpBatchNorm(3, norm="linf", chunks=2)
    model = torch.nn.Sequential(lpnorm.nn.LpBatchNorm2d(3, norm="range", chunks=2))
    with pytest.raises(ValueError, match="chunks"):
        lpnorm.nn.SyncLpBatchNorm.convert_sync_batchnorm(model)


def test_convert_sync_batchnorm_keeps_options_parameters_and_buffers():
    import lpnorm

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        lpnorm.nn.LpBatchNorm2d(4, eps=1e-3, momentum=0.2, norm="topk", k=3, constant="paper"),
        torch.nn.Sequential(lpnorm.nn.LpBatchNorm1d(4, norm="p", p=3.0, affine=False)),
        torch.nn.BatchNorm2d(4),
    )
    bn = model[1]
    bn.running_mean.fill_(0.5)
    model.eval()
    converted = lpnorm.nn.SyncLpBatchNorm.convert_sync_batchnorm(model, process_group="group")
    sync = converted[1]
    assert type(sync) is lpnorm.nn.SyncLpBatchNorm
    assert (sync.eps, sync.momentum, sync.norm, sync.k, sync.constant) == (1e-3, 0.2, "topk", 3, "paper")
    assert sync.weight is bn.weight and sync.bias is bn.bias and sync.running_mean is bn.running_mean
    assert sync.process_group == "group" and not sync.training
    inner = converted[2][0]
    assert type(inner) is lpnorm.nn.SyncLpBatchNorm and inner.p == 3.0 and inner.weight is None
    assert type(converted[3]) is torch.nn.BatchNorm2d  # torch's batch norm: torch's converter
    assert set(converted.state_dict()) == set(model.state_dict())


def test_stage_operators_have_fake_kernels():
    import lpnorm  # noqa: F401

    x = torch.empty(4, 3, 5, device="meta")
    total, value, index = torch.ops.lpnorm.batch_norm_collect(x, "topk", 3, 0)
    assert total.shape == (3,) and value.shape == (3, 2, 3) and index.dtype == torch.int64
    mean, invstd, coef, sparse_index, sparse_coef, var = torch.ops.lpnorm.batch_norm_finalize(
        20, total, total, total, value, index, 1e-5, "topk", 3, 2.0, "exact")
    assert coef.shape == (3, 3) and sparse_index.shape == (3, 3)
    assert torch.ops.lpnorm.batch_norm_apply(x, mean, invstd, None, None).shape == x.shape


def test_stage_operators_pass_opcheck_and_equal_the_fused_operator():
    """One process through the stages (index_offset 0) is the fused operator to rounding: both
    sum x - p (p a pivot from the channel's first elements; the fused l2 also (x - p)^2, in one
    pass), but the fused operator's mean is p + sum / m, the stages' the total p * m + sum,
    which the processes add, over m."""
    import lpnorm

    ops = torch.ops.lpnorm
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    g = torch.randn_like(x)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    m = 20
    for norm, k, p in [("l2", 1, 2.0), ("l1", 1, 2.0), ("linf", 1, 2.0), ("topk", 3, 2.0), ("range", 1, 2.0),
                       ("p", 1, 3.0)]:
        xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
        y = lpnorm.functional.batch_norm(xr, None, None, wr, br, True, 0.1, 1e-5, norm, k, p)
        y.backward(g)

        total, value, index = ops.batch_norm_collect(x, norm, k, 0)
        deviation, phi = ops.batch_norm_deviations(x, total / m, norm, p)
        finalize_args = (m, total, deviation, phi, value, index, 1e-5, norm, k, p, "exact")
        mean, invstd, coef, sparse_index, sparse_coef, _ = ops.batch_norm_finalize(*finalize_args)
        sum_g, sum_gd = ops.batch_norm_reduce_grad(g, x, mean)
        grad_args = (g, x, w, mean, invstd, coef, sparse_index, sparse_coef, sum_g, sum_gd, m, norm, p, 0)
        close = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ops.batch_norm_apply(x, mean, invstd, w, b), y, **close)
        torch.testing.assert_close(ops.batch_norm_apply_grad(*grad_args), xr.grad, **close)
        torch.testing.assert_close(sum_gd * invstd, wr.grad, **close)

        torch.library.opcheck(ops.batch_norm_collect, (x, norm, k, 7))
        torch.library.opcheck(ops.batch_norm_deviations, (x, total / m, norm, p))
        torch.library.opcheck(ops.batch_norm_finalize, finalize_args)
        torch.library.opcheck(ops.batch_norm_apply, (x, mean, invstd, w, b))
        torch.library.opcheck(ops.batch_norm_reduce_grad, (g, x, mean))
        torch.library.opcheck(ops.batch_norm_apply_grad, grad_args)


def _stage_input(kind, dtype, shape, channels_last):
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).to(dtype)
    else:
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if kind == "special":  # NaN never enters the candidate lists, nor does -inf (x) or +inf (-x)
        flat = x.view(-1)
        flat[::7], flat[3::11], flat[5::13] = float("nan"), float("inf"), float("-inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x, torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _composite_stages_on(device):
    """The compositions on `device`, results on the CPU: called directly on CPU tensors, and
    through the operators (the CUDA key) on a GPU."""
    from lpnorm import _composite_stages as composite

    if device == "cpu":
        return composite
    def through_operator(name):
        def run(*args):
            moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]  # layouts kept
            out = getattr(torch.ops.lpnorm, f"batch_norm_{name}")(*moved)
            return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
        return run
    return types.SimpleNamespace(**{name: through_operator(name) for name in
                                    ("collect", "deviations", "apply", "reduce_grad", "apply_grad")})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_composite_stages_equal_the_cpu_kernels(dtype, device):
    """The stage operators' CUDA kernels (lpnorm/_composite_stages.py, ATen compositions), on
    CPU tensors (and on the GPU where there is one) against the CPU kernels: the same
    candidates (values, global indices, ties to the lowest, NaN and infinities), sums and
    outputs to rounding, outputs in the input's layout, sparse terms only where a process's
    rows hold them."""
    composite = _composite_stages_on(device)
    ops = torch.ops.lpnorm
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [((6, 3, 4, 5), False), ((6, 3, 4, 5), True), ((9, 5), False), ((4, 3, 7), False),
              ((2, 2, 3, 2, 2), True), ((0, 3, 2, 2), False)]
    norms = [("l2", 1, 2.0), ("l1", 1, 2.0), ("linf", 1, 2.0), ("topk", 3, 2.0), ("range", 1, 2.0), ("p", 1, 3.0)]
    for shape, channels_last in shapes:
        channels = shape[1]
        m = torch.Size(shape).numel() // channels
        w = torch.rand(channels, dtype=params) + 0.5
        b = torch.randn(channels, dtype=params)
        for kind in ("normal", "ties", "special"):
            x, g = _stage_input(kind, dtype, shape, channels_last)
            for norm, k, p in norms + [("topk", 2 * m + 1, 2.0)]:  # more candidates than elements: empty slots
                where = f"{dtype} {shape} channels_last={channels_last} {kind} {norm} k={k}"
                native = ops.batch_norm_collect(x, norm, k, 5)
                ours = composite.collect(x, norm, k, 5)
                assert torch.equal(ours[1], native[1]) and torch.equal(ours[2], native[2]), where
                torch.testing.assert_close(ours[0], native[0], rtol=1e-12 if dtype == torch.float64 else 1e-6,
                                           atol=0 if dtype == torch.float64 else 1e-5, equal_nan=True, msg=where)
                if m == 0 or kind == "special" or k > m:
                    continue
                mean = native[0] / m
                deviation = ops.batch_norm_deviations(x, mean, norm, p)
                torch.testing.assert_close(composite.deviations(x, mean, norm, p), deviation, **tol, msg=where)
                mean, invstd, coef, index, sparse, _ = ops.batch_norm_finalize(
                    m, native[0], deviation[0], deviation[1], native[1], native[2], 1e-5, norm, k, p, "exact")
                for weight, bias in ((w, b), (None, None)):
                    expected = ops.batch_norm_apply(x, mean, invstd, weight, bias)
                    got = composite.apply(x, mean, invstd, weight, bias)
                    torch.testing.assert_close(got, expected, **tol, msg=where)
                    assert got.stride() == expected.stride(), where
                sums = ops.batch_norm_reduce_grad(g, x, mean)
                torch.testing.assert_close(composite.reduce_grad(g, x, mean), sums, **tol, msg=where)
                # indices of this process (offset 0), shifted so some fall in another's rows
                for shift, offset in ((0, 0), (5, 2)):
                    args = (g, x, w, mean, invstd, coef, index + shift, sparse, sums[0], sums[1], m, norm, p, offset)
                    expected = ops.batch_norm_apply_grad(*args)
                    got = composite.apply_grad(*args)
                    torch.testing.assert_close(got, expected, **tol, msg=where)
                    assert got.stride() == expected.stride(), where


def test_composite_stages_pass_opcheck():
    """The compositions as the stage operators' kernels (here CPU's, for the test's length)
    agree with the fake kernels and the schemas (torch.library.opcheck); the CPU kernels are
    back once the registration goes."""
    import lpnorm  # noqa: F401

    ops = torch.ops.lpnorm
    x, g = _stage_input("normal", torch.float32, (4, 3, 5), False)
    w = torch.rand(3) + 0.5
    library = _use_composite_stages_on_cpu()
    try:
        for norm, k, p in [("l1", 1, 2.0), ("topk", 3, 2.0), ("range", 1, 2.0), ("p", 1, 3.0)]:
            total, value, index = ops.batch_norm_collect(x, norm, k, 7)
            deviation, phi = ops.batch_norm_deviations(x, total / 20, norm, p)
            mean, invstd, coef, sparse_index, sparse_coef, _ = ops.batch_norm_finalize(
                20, total, deviation, phi, value, index - 7, 1e-5, norm, k, p, "exact")
            sum_g, sum_gd = ops.batch_norm_reduce_grad(g, x, mean)
            torch.library.opcheck(ops.batch_norm_collect, (x, norm, k, 7))
            torch.library.opcheck(ops.batch_norm_deviations, (x, total / 20, norm, p))
            torch.library.opcheck(ops.batch_norm_apply, (x, mean, invstd, w, None))
            torch.library.opcheck(ops.batch_norm_reduce_grad, (g, x, mean))
            torch.library.opcheck(ops.batch_norm_apply_grad, (g, x, w, mean, invstd, coef, sparse_index, sparse_coef,
                                                              sum_g, sum_gd, 20, norm, p, 0))
        assert _COMPOSITE_CALLS.get("batch_norm_apply_grad", 0) > 0
        with pytest.raises(ValueError, match="lpnorm.batch_norm_collect: norm must be one of"):
            ops.batch_norm_collect(x, "l3", 1, 0)
    finally:
        del library
    with pytest.raises(ValueError, match="lpnorm.batch_norm: norm must be one of"):  # the CPU kernel's message
        ops.batch_norm_collect(x, "l3", 1, 0)


def test_composite_stages_are_registered_for_cuda():
    """Not run on a GPU here: the CUDA key routes to the compositions, and finalize's runs the
    CPU kernel on copies of its per-channel tensors."""
    import lpnorm  # noqa: F401

    for name in ("batch_norm_collect", "batch_norm_deviations", "batch_norm_finalize", "batch_norm_apply",
                 "batch_norm_reduce_grad", "batch_norm_apply_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lpnorm::{name}", "CUDA"), name


def test_stage_collect_sums_a_constant_channel_exactly():
    """batch_norm_collect's total is what the processes add: for a constant float32 channel
    it is value * m exactly (sums of x - p, p * m added in double), so the mean, and d = 0,
    are exact across processes too. Float sums of x left 12345.678's total off."""
    import lpnorm  # noqa: F401  (registers the operators)

    ops = torch.ops.lpnorm
    x = torch.full((64, 2, 5), 12345.678)
    x[:, 1] = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    for norm in ("l1", "linf", "topk"):
        total, _, _ = ops.batch_norm_collect(x, norm, 3, 0)
        assert total[0].item() == float(x[0, 0, 0]) * 320, norm
        assert abs(total[1].item() - float(x[:, 1].double().sum())) < 1e-4, norm  # float lanes


def test_stage_operators_power_p_beyond_float_in_double():
    """float32 data of scale 100 with p = 20: |d|^20 overflows float. The stages redo those
    channels in double as the fused operator does (cpu/exact_power.h): the same output and
    input gradient, not zeros."""
    import lpnorm

    ops = torch.ops.lpnorm
    x = torch.randn(32, 3, 4, generator=torch.Generator().manual_seed(5)) * 100
    g = torch.randn(32, 3, 4, generator=torch.Generator().manual_seed(6))
    m, p = 128, 20.0
    xr = x.clone().requires_grad_()
    y = lpnorm.functional.batch_norm(xr, None, None, None, None, True, 0.1, 1e-5, "p", 1, p)
    y.backward(g)
    assert y.abs().max() > 0.5
    total, value, index = ops.batch_norm_collect(x, "p", 1, 0)
    deviation, phi = ops.batch_norm_deviations(x, total / m, "p", p)
    assert torch.isfinite(deviation).all() and torch.isfinite(phi).all()
    mean, invstd, coef, sparse_index, sparse_coef, _ = ops.batch_norm_finalize(
        m, total, deviation, phi, value, index, 1e-5, "p", 1, p, "exact")
    sum_g, sum_gd = ops.batch_norm_reduce_grad(g, x, mean)
    torch.testing.assert_close(ops.batch_norm_apply(x, mean, invstd, None, None), y)
    grad = ops.batch_norm_apply_grad(g, x, None, mean, invstd, coef, sparse_index, sparse_coef, sum_g, sum_gd, m,
                                     "p", p, 0)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-5, atol=1e-5 * float(xr.grad.abs().max()))


def test_stage_operators_split_channels_last_rows_across_threads(monkeypatch):
    """The stages run over the split schedule's tiles: a channels-last input is cut into row
    blocks, a count fixed by the shape, whose partial statistics are combined in block order.
    Every output equals the one-thread output bit for bit, the sparse terms of apply_grad
    included (topk's indices fall in both halves of the rows), and so do the element passes
    written with non-temporal stores (forced here: they start at 4 MiB); the combined
    statistics are the float64 sums."""
    import lpnorm  # noqa: F401  (registers the operators)

    ops = torch.ops.lpnorm
    x = torch.randn(8, 16, 40, 40).contiguous(memory_format=torch.channels_last)  # 12800 rows: 3 blocks
    g = torch.randn_like(x)
    w = torch.rand(16) + 0.5
    b = torch.randn(16)
    m = x.numel() // 16

    def stages():
        total, value, index = ops.batch_norm_collect(x, "topk", 3, 0)
        deviation, phi = ops.batch_norm_deviations(x, total / m, "topk", 2.0)
        mean, invstd, coef, sparse_index, sparse_coef, _ = ops.batch_norm_finalize(
            m, total, deviation, phi, value, index, 1e-5, "topk", 3, 2.0, "exact")
        l1_deviation, _ = ops.batch_norm_deviations(x, mean, "l1", 2.0)
        sum_g, sum_gd = ops.batch_norm_reduce_grad(g, x, mean)
        grad_args = (g, x, w, mean, invstd, coef, sparse_index, sparse_coef, sum_g, sum_gd, m, "topk", 2.0, 0)
        return dict(total=total, value=value, index=index, l1_deviation=l1_deviation, sum_g=sum_g,
                    sum_gd=sum_gd, sparse_index=sparse_index, y=ops.batch_norm_apply(x, mean, invstd, w, b),
                    dx=ops.batch_norm_apply_grad(*grad_args), mean=mean, invstd=invstd)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stages()
        torch.set_num_threads(2)
        two = stages()
        monkeypatch.setenv("LPNORM_CPU_STREAM", "1")
        streamed = stages()
    finally:
        torch.set_num_threads(threads)
    for name in one:
        assert torch.equal(one[name], two[name]), name
        assert torch.equal(one[name], streamed[name]), name
    assert (one["sparse_index"] < m // 2).any() and (one["sparse_index"] >= m // 2).any()
    # and what they compute (float32 lanes, folded into float64 every few rows)
    sums = dict(rtol=1e-5, atol=1e-3)
    xd, gd = x.double(), g.double()
    mean = xd.mean((0, 2, 3))
    torch.testing.assert_close(one["total"], xd.sum((0, 2, 3)), **sums)
    torch.testing.assert_close(one["l1_deviation"], (xd - one["mean"].view(1, -1, 1, 1)).abs().sum((0, 2, 3)),
                               **sums)
    torch.testing.assert_close(one["sum_g"], gd.sum((0, 2, 3)), **sums)
    torch.testing.assert_close(one["sum_gd"], (gd * (xd - one["mean"].view(1, -1, 1, 1))).sum((0, 2, 3)),
                               **sums)
    torch.testing.assert_close(one["mean"], mean, rtol=1e-5, atol=1e-7)
    reference = (xd - one["mean"].view(1, -1, 1, 1)) * (one["invstd"] * w).view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(one["y"].double(), reference, rtol=1e-5, atol=1e-5)
    # the largest values of channel 0, as collect keeps them
    top = xd[:, 0].flatten().topk(3).values
    torch.testing.assert_close(one["value"][0, 0], top)


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7])
