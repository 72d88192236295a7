"""tools/fuzz_reference.py: it runs, passes on lpnorm, and fails where the results are wrong."""
import os
import subprocess
import sys

import pytest

import lpnorm

# A file of the source tree: not re-run from the wheel (test_wheel.py's NOT_RERUN).
TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "fuzz_reference.py")


def load_tool():
    sys.path.insert(0, os.path.dirname(TOOL))
    try:
        import fuzz_reference
    finally:
        sys.path.pop(0)
    return fuzz_reference


@pytest.mark.parametrize("path", ["fused", "stages"])
def test_small_cases_pass(path):
    result = subprocess.run([sys.executable, TOOL, "--cases", "12", "--seed", "1", "--max-elements", "20000",
                             "--path", path], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"12 cases, 0 failed (cpu, {path})" in result.stdout


def test_a_wrong_output_fails(monkeypatch):
    """The tool's check sees a float32 output 0.1% off, and draws the same case from the same seed."""
    tool = load_tool()
    seed = next(s for s in range(1000) if (tool.draw(s, 20000) or {}).get("dtype") == "float32"
                and tool.draw(s, 20000)["data"] == "gauss")
    assert tool.draw(seed, 20000) == tool.draw(seed, 20000)
    assert tool.run(tool.draw(seed, 20000), "cpu") is None
    right = lpnorm.functional.batch_norm
    monkeypatch.setattr(lpnorm.functional, "batch_norm", lambda *a, **k: right(*a, **k) * 1.001)
    error = tool.run(tool.draw(seed, 20000), "cpu")
    assert error is not None and "output" in error
