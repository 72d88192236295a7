"""The CPU wheel (docs/deployment.md): `pip wheel --no-build-isolation .` makes
lpnorm-0.1.0+pt213cpu-*.whl, named for the torch its binaries need and carrying them, the C++
header, the CMake package and the build-info file. Installed into a fresh environment (with this
torch) it passes the test suite from outside the source tree, and refuses another torch release
by name before loading any binary.

LPNORM_TEST_BUILD_DIR picks the CMake build folder (default: pyproject's build/{wheel_tag}, the
one `pip install .` used, so the wheel build is incremental). LPNORM_WHEEL_TESTS narrows the
re-run to the named test files ("test_module.py test_export.py"; default: all but the four below)."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

from lpnorm import _library

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# Not re-run from the wheel: this file (recursion), the C++ builds (minutes; they already run
# against the installed package), and the README's usage and tools/fuzz_reference.py (files of
# the source tree).
NOT_RERUN = {"test_wheel.py", "test_deploy_cpp.py", "test_readme.py", "test_fuzz_tool.py"}
TORCH_RELEASE = "".join(torch.__version__.split("+")[0].split(".")[:2])
LOCAL_TAG = f"pt{TORCH_RELEASE}" + (f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")

def run(command, **kwargs):
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if torch.version.cuda is not None:
        pytest.skip("the CPU wheel needs a CPU torch; CUDA wheels: tools/build_wheel.sh --cuda ARCHS --test")
    folder = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", folder, ROOT]
    if os.environ.get("LPNORM_TEST_BUILD_DIR"):
        command += ["-C", f"build-dir={os.environ['LPNORM_TEST_BUILD_DIR']}"]
    run(command)  # exactly the documented command: with a CPU torch, LPNORM_CUDA=AUTO builds no CUDA
    (path,) = folder.glob("lpnorm-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh environment with the wheel's lpnorm that sees this interpreter's torch, numpy and
    pytest through a .pth file, after its own packages. (--system-site-packages would show the
    base interpreter's packages where this one is itself a venv, not this one's.)"""
    folder = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", folder])
    python = folder / "bin" / "python"
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(venv_site, "builder.pth").write_text("\n".join(ours) + "\n")
    # --ignore-installed: the same version may already be installed outside the venv (the tree's
    # `pip install .`), and the venv must get the wheel's own copy.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel])
    return python


def test_wheel_is_named_for_its_torch_and_carries_the_cpp_package(wheel):
    assert wheel.name.startswith(f"lpnorm-0.1.0+{LOCAL_TAG}-"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        build = json.loads(archive.read("lpnorm/_build_info.json"))
        (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    for required in ("lpnorm/lib/liblpnorm_ops.so", "lpnorm/include/lpnorm/lpnorm.h",
                     "lpnorm/share/cmake/lpnorm/lpnormConfig.cmake",
                     "lpnorm/share/cmake/lpnorm/lpnormConfigVersion.cmake", "lpnorm/__init__.py"):
        assert required in names
    assert any(name.startswith("lpnorm/_C.") and name.endswith(".so") for name in names)
    assert build["version"] == f"0.1.0+{LOCAL_TAG}" and build["torch_version"] == torch.__version__
    assert build["cuda"] is False
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0].rsplit('.', 1)[0]}.*" in metadata


def test_suite_passes_from_the_installed_wheel(venv, tmp_path):
    where = run([venv, "-c", "import lpnorm; print(lpnorm.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv.parent.parent), where  # the wheel's, not the tree's
    info = run([venv, "-m", "lpnorm", "info"], cwd=tmp_path).stdout
    assert f"0.1.0+{LOCAL_TAG}" in info and str(venv.parent.parent / "lib") in info
    versions = run([venv, "-c", "import importlib.metadata, lpnorm; "
                    "print(lpnorm.__version__, importlib.metadata.version('lpnorm'))"], cwd=tmp_path).stdout.split()
    assert versions == [f"0.1.0+{LOCAL_TAG}"] * 2, versions  # __version__ is the wheel's

    tests = tmp_path / "tests"
    shutil.copytree(TESTS, tests, ignore=shutil.ignore_patterns("__pycache__", *NOT_RERUN))
    chosen = os.environ.get("LPNORM_WHEEL_TESTS", "").split()
    targets = [tests / name for name in chosen] if chosen else [tests]
    suite = subprocess.run([venv, "-m", "pytest", *targets, "-x", "-q", "-p", "no:cacheprovider"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert suite.returncode == 0, suite.stdout[-6000:] + suite.stderr[-2000:]


def test_another_torch_release_is_refused_by_name(venv, tmp_path):
    """The installed build-info file says torch 2.11: import fails naming both releases, before
    lpnorm._C (which links libtorch) is loaded, so never with an undefined symbol."""
    site = Path(run([venv, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    info_file = site / "lpnorm" / "_build_info.json"
    original = info_file.read_text()
    info_file.write_text(json.dumps(dict(json.loads(original), torch_version="2.11.0+cpu")))
    try:
        probe = ("import sys\ntry:\n    import lpnorm\nexcept ImportError as error:\n    print(error)\n"
                 "print('_C loaded' if 'lpnorm._C' in sys.modules else '_C not loaded')\n")
        out = run([venv, "-c", probe], cwd=tmp_path).stdout
    finally:
        info_file.write_text(original)
    assert f"built for torch 2.11.0+cpu but torch {torch.__version__} is installed" in out
    assert "_C not loaded" in out and "undefined symbol" not in out


@pytest.mark.parametrize("built, running, running_cuda, says", [
    (dict(torch_version="2.11.0+cpu", cuda=False), "2.13.0+cpu", None,
     "was built for torch 2.11.0+cpu but torch 2.13.0+cpu is installed"),
    (dict(torch_version="2.13.0+cu130", cuda=True, cuda_version="13.0"), "2.13.0+cpu", None,
     "was built with CUDA 13.0 but torch 2.13.0+cpu is a CPU build"),
    (dict(torch_version="2.13.0+cu130", cuda=True, cuda_version="13.0"), "2.13.0+cu126", "12.6",
     "was built with CUDA 13.0 but torch 2.13.0+cu126 uses CUDA 12.6"),
])
def test_torch_check_names_both_sides(built, running, running_cuda, says):
    with pytest.raises(ImportError, match=re.escape(says)):
        _library.check_torch(dict(built, version="0.1.0+test"), running, running_cuda)


def test_torch_check_accepts_another_patch_release():
    _library.check_torch(dict(version="0.1.0+pt213cpu", torch_version="2.13.0+cpu", cuda=False), "2.13.1+cpu", None)
    _library.check_torch(dict(version="0.1.0+pt213cu130", torch_version="2.13.0+cu130", cuda=True,
                              cuda_version="13.0"), "2.13.0+cu130", "13.0")
