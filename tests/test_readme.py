"""README.md's usage block runs as written (against the installed package), so it stays true."""
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def usage_block() -> str:
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    return usage.split("```python", 1)[1].split("```", 1)[0]


def test_readme_usage_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it saves net.pt
    namespace = {}
    exec(compile(usage_block(), str(README) + " (Usage)", "exec"), namespace)
    import lpnorm

    assert (tmp_path / "net.pt").exists()
    assert any(isinstance(m, lpnorm.nn.SyncLpBatchNorm) for m in namespace["model"].modules())
    assert namespace["y"].shape == (8, 16, 4, 4)
