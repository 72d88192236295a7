"""python -m lpnorm bench | demo | half: smoke runs on tiny inputs, the JSON each writes, and the
claims the evidence rests on (the composite L1 is the paper's L1; float16 L2 statistics overflow
where L1's do not; the demo's data loads with the network off). No timing is asserted."""
import json
import math
import socket
import subprocess
import sys

import pytest
import torch

import lpnorm
from lpnorm import bench, demo, half_precision
from lpnorm.__main__ import main


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# info

def test_info_reports_this_build(capsys):
    """`python -m lpnorm info --json`: the build's facts as the library has them."""
    report = json.loads(run_cli(capsys, "info", "--json"))
    build = lpnorm.build_info()
    assert report["lpnorm"] == build["version"] and report["built for torch"] == build["torch_version"]
    assert report["cpu isa in use"] == build["cpu_isa"] and report["cpu isa in use"] in report["cpu isas available"]
    assert report["cuda compiled"] == build["cuda"] and report["running torch"] == torch.__version__
    assert {"lpnorm::batch_norm", "lpnorm::batch_norm_forward", "lpnorm::batch_norm_backward"} <= set(
        report["operators"].split(", "))
    assert report["c++ header"].endswith("lpnorm.h") and report["installed as"] == lpnorm.__version__


# ---------------------------------------------------------------------------------------------
# bench

def test_bench_quick_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    out = run_cli(capsys, "bench", "--quick", "--max-numel", "4096", "--min-run-time", "0.001",
                  "--norms", "composite l1", "l1", "topk k=10", "--no-progress", "--json", str(path))
    results = json.loads(path.read_text())["results"]
    # torch bn, composite l1, l1, topk; forward and forward+backward; contiguous and channels-last
    assert len(results) == 4 * 2 * 2
    assert {r["impl"] for r in results} == {"torch bn", "composite l1", "l1", "topk k=10"}
    assert {r["pass"] for r in results} == {"forward", "forward+backward"}
    assert {r["memory_format"] for r in results} == {"contiguous", "channels_last"}
    for r in results:
        assert r["median_s"] > 0 and r["runs"] >= 1 and math.prod(map(int, r["shape"].split("x"))) <= 4096
        baseline = next(b for b in results if b["impl"] == "torch bn" and b["pass"] == r["pass"]
                        and b["memory_format"] == r["memory_format"])
        assert r["ratio"] == pytest.approx(r["median_s"] / baseline["median_s"])
    assert "| device | shape | dtype | format | torch bn | composite l1 | l1 | topk k=10 |" in out
    assert "geometric mean" in out


@pytest.mark.parametrize("argv,says", [
    (["bench", "--shapes", "8x4"], "needs at least 10"),
    (["bench", "--shapes", "8"], "expected a shape"),
    (["bench", "--shapes", "64xabc"], "expected a shape"),
    (["bench", "--min-run-time", "-1"], "expected a finite number > 0"),
    (["bench", "--threads", "0"], "expected a whole number >= 1"),
    (["bench", "--shapes", "64x8", "--json", "/nonexistent-folder/x.json"], "does not exist or is not writable"),
    (["half", "--train", "--epochs", "0"], "expected a whole number >= 1"),
    (["half", "--channels", "0"], "expected a whole number >= 1"),
    (["half", "--train", "--scales", "0"], "expected a finite number > 0"),
    (["half", "--max-m", "1"], "smallest m is 100"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_are_usage_errors_before_any_run(argv, says, capsys):
    """A bad value is an argparse error (exit status 2, the message on stderr) before anything
    runs, not a traceback after minutes of benchmark, nor a silent default (--epochs 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_bench_refuses_cuda_without_it(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--devices", "cuda", "--shapes", "64x8"])
    assert "--devices cuda" in capsys.readouterr().err


def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    run_cli(capsys, "bench", "--quick", "--max-numel", "2048", "--min-run-time", "0.001", "--norms", "l1",
            "--formats", "contiguous", "--passes", "forward", "--no-progress", "--plot", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (16, 5)], ids=["4d", "2d"])
def test_composite_l1_is_the_l1_norm(shape):
    """The composite baseline computes what lpnorm's l1 computes (output and running statistics),
    so the bench compares the same math."""
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    weight, bias = torch.rand(shape[1], dtype=torch.float64) + 0.5, torch.randn(shape[1], dtype=torch.float64)
    stats = [torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)]
    expected_stats = [s.clone() for s in stats]
    # eps enters the two differently (scale + eps against sqrt(scale^2 + eps)): one so small
    # that neither sees it (eps must be positive in training, as torch's)
    y = bench.composite_l1(x, *stats, weight, bias, eps=1e-300)
    expected = lpnorm.functional.batch_norm(x, *expected_stats, weight, bias, True, 0.1, 1e-300, norm="l1")
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(stats, expected_stats)


def test_bench_shrink_keeps_channels():
    assert bench._shrink((64, 64, 28, 28), 4096)[1] == 64
    assert math.prod(bench._shrink((64, 64, 28, 28), 4096)) <= 4096


# ---------------------------------------------------------------------------------------------
# demo

def test_demo_data_loads_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    x_train, y_train, x_test, y_test = demo.load_digits_tensors()
    assert x_train.shape == (1257, 1, 8, 8) and x_test.shape == (540, 1, 8, 8)
    assert y_train.shape == (1257,) and set(y_test.tolist()) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-4 and float(x_train.std()) == pytest.approx(1.0, abs=1e-4)


def test_demo_json_schema(tmp_path, capsys):
    path = tmp_path / "demo.json"
    out = run_cli(capsys, "demo", "--epochs", "1", "--seeds", "2", "--train-limit", "128", "--threads", "1",
                  "--norms", "torch_bn", "l1", "range", "bounded_wn", "--no-progress", "--json", str(path))
    report = json.loads(path.read_text())
    runs = report["runs"]
    has_bwn = demo.bounded_weight_norm_fn()[0] is not None
    expected = {"torch_bn", "l1", "range"} | ({"bounded_wn"} if has_bwn else set())
    assert {r["norm"] for r in runs} == expected
    assert sorted((r["norm"], r["seed"]) for r in runs) == sorted((n, s) for n in expected for s in (0, 1))
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["epoch_seconds"] > 0
        assert len(r["test_accuracy_curve"]) == 1 and r["accuracy"] == r["test_accuracy_curve"][-1]
    if not has_bwn:
        assert "not available in this build" in report["unavailable"]["bounded_wn"]
    assert "L1 - L2" not in out  # no l2 run, no gap claimed
    assert "lpnorm l1" in out and "test accuracy" in out


def test_demo_nets_differ_only_in_the_norm():
    """Same seed, same conv initialization; the norm layers are the variant's."""
    a, b = demo.build_net("torch_bn", 3), demo.build_net("l1", 3)
    convs = [(m, n) for m, n in zip(a.modules(), b.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(torch.equal(m.weight, n.weight) for m, n in convs)
    norms = [m for m in b.modules() if isinstance(m, lpnorm.nn.LpBatchNorm2d)]
    assert len(norms) == 4 and all(m.norm == "l1" for m in norms)
    ranged = [m for m in demo.build_net("range", 0).modules() if isinstance(m, lpnorm.nn.LpBatchNorm2d)]
    assert all(m.norm == "range" and m.chunks == 4 for m in ranged)


def test_demo_trains():
    """A few steps of l1 on half the training set learn something (far above 10% chance)."""
    data = demo.load_digits_tensors()
    run = demo.train("l1", 0, (data[0][:640], data[1][:640], data[2], data[3]), epochs=2, width=16)
    assert run.accuracy > 0.5 and not run.diverged
    assert run.train_loss_curve[1] < run.train_loss_curve[0]


# ---------------------------------------------------------------------------------------------
# half precision

def test_half_sweep_shows_l2_overflow_and_l1_not():
    """float16 values: L2's squares overflow at sigma = 1e3 in plain PyTorch float16 operators,
    L1/L-inf stay accurate; lpnorm's kernels (float32 accumulation) stay accurate for all."""
    points, unavailable = half_precision.sweep(sigmas=[1e-5, 1.0, 1e3], ms=[1000], progress=False)
    at = {(p.mode, p.norm, p.sigma): p for p in points}
    for norm in half_precision.NORMS:
        for sigma in (1e-5, 1.0, 1e3):
            p = at["kernel-fp32acc", norm, sigma]
            assert p.rel_error is not None and p.rel_error < 1e-5 and p.nonfinite_output == 0, p
    assert at["torch-fp16", "l2", 1e3].rel_error is None and at["torch-fp16", "l2", 1e3].nonfinite_sigma == 2
    assert at["torch-fp16", "l2", 1e-5].zero_sigma == 2  # the squares underflow to zero
    for norm in ("l1", "linf", "topk", "range"):
        for sigma in (1e-5, 1.0, 1e3):
            assert at["torch-fp16", norm, sigma].rel_error < 1e-2
    assert not unavailable
    # lpnorm's kernels accumulating in float16: L2's squares overflow, L1/L-inf/top-k do not
    assert at["kernel-fp16acc", "l2", 1e3].nonfinite_sigma == 2
    for norm in ("l1", "linf", "topk"):
        for sigma in (1.0, 1e3):
            assert at["kernel-fp16acc", norm, sigma].rel_error < 1e-2


def test_half_train_l2_composite_diverges_at_x256():
    variants = ["torch-fp16 composite l2", "lpnorm l1 (fp32 acc)", "lpnorm l2 (fp16 acc)", "lpnorm l1 (fp16 acc)"]
    rows, _ = half_precision.train_sweep([256.0], variants, epochs=1, width=8, train_limit=256, progress=False)
    by = {r["variant"]: r for r in rows}
    assert by["torch-fp16 composite l2"]["diverged_epoch"] == 1
    for survivor in ("lpnorm l1 (fp32 acc)", "lpnorm l1 (fp16 acc)"):
        assert by[survivor]["diverged_epoch"] is None, survivor
        assert math.isfinite(by[survivor]["final_loss"]), survivor


def test_half_command_line(tmp_path):
    """The real entry point, as a user runs it."""
    path = tmp_path / "half.json"
    result = subprocess.run([sys.executable, "-m", "lpnorm", "half", "--max-m", "100", "--norms", "l1", "l2",
                             "--no-progress", "--json", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "**kernel-fp32acc**" in result.stdout and "**torch-fp16**" in result.stdout
    points = json.loads(path.read_text())["points"]
    assert len(points) == 9 * 2 * 3
    assert set(points[0]) >= {"mode", "norm", "sigma", "m", "rel_error", "nonfinite_sigma", "nonfinite_output"}
