"""The C++ deployment routes (SPEC §6, docs/deployment.md): examples/cpp, built against the
installed CMake package (find_package(lpnorm) through lpnorm.cmake_prefix_path), runs a
TorchScript model and an AOTInductor package that use lpnorm's modules, without Python, and
gets the numbers Python gets."""
import copy
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import lpnorm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"
LEARNING_RATE = 0.1  # lpnorm_run.cpp's SGD step

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")


def cmake_configure(source, build, *defines):
    """Configures `source` against the installed lpnorm and torch; returns the finished process."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    prefix = f"-DCMAKE_PREFIX_PATH={lpnorm.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    return subprocess.run(["cmake", "-S", str(source), "-B", str(build), *generator, prefix, *defines],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def lpnorm_run(tmp_path_factory):
    """examples/cpp built once per session, in a temporary folder."""
    build = tmp_path_factory.mktemp("lpnorm_run")
    configured = cmake_configure(EXAMPLE, build)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return build / "lpnorm_run"


def run_cpp(program, model, x, folder):
    """Runs lpnorm_run MODEL IN OUT; returns what it wrote, as a dict."""
    torch.save(x, folder / "input.pt")
    done = subprocess.run([str(program), str(model), str(folder / "input.pt"), str(folder / "output.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return dict(torch.load(folder / "output.pt"))


def trained_net():
    """Two lpnorm layers (L1, and ghost-batch top-k) with learned-looking parameters and
    running statistics away from their initial values, so evaluation checks them too."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        lpnorm.nn.LpBatchNorm2d(4, norm="l1"),
        torch.nn.ReLU(),
        lpnorm.nn.LpBatchNorm2d(4, norm="topk", k=3, chunks=2),
    )
    with torch.no_grad():
        for layer in (net[1], net[3]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        for _ in range(3):
            net(torch.randn(8, 3, 6, 6) * 2 + 1)
    return net


def python_run(net, x):
    """What lpnorm_run does with a TorchScript model, in Python (see lpnorm_run.cpp)."""
    out = {}
    net.eval()
    with torch.no_grad():
        out["eval"] = net(x)
    net.train()
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y * torch.linspace(-1.0, 1.0, y.numel()).view(y.shape)).sum().backward()
    out["train"], out["input_grad"] = y.detach(), x.grad
    with torch.no_grad():
        for name, param in net.named_parameters():
            out["grad." + name] = param.grad.clone()
            param -= LEARNING_RATE * param.grad
            out["param." + name] = param.clone()
        out.update({"buffer." + name: buffer.clone() for name, buffer in net.named_buffers()})
        out["direct"] = lpnorm.functional.batch_norm(x, None, None, training=True, norm="l1")
    return out


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated in 2.13, still supported
def test_torchscript_model_runs_from_cpp_as_in_python(lpnorm_run, tmp_path):
    net = trained_net()
    torch.jit.save(torch.jit.script(copy.deepcopy(net)), str(tmp_path / "net.pt"))
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    cpp = run_cpp(lpnorm_run, tmp_path / "net.pt", x, tmp_path)
    assert_same(cpp, python_run(net, x))
    # The training step did something: parameters and running statistics moved.
    for layer in ("1", "3"):
        assert not torch.equal(cpp[f"param.{layer}.weight"], before[f"{layer}.weight"])
        assert not torch.equal(cpp[f"buffer.{layer}.running_var"], before[f"{layer}.running_var"])
        assert int(cpp[f"buffer.{layer}.num_batches_tracked"]) == int(before[f"{layer}.num_batches_tracked"]) + 1


def test_aoti_package_runs_from_cpp_as_in_python(lpnorm_run, tmp_path):
    net = trained_net().eval()
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    program = torch.export.export(net, (x,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "net.pt2"))
    # The package calls our operator by name (a proxy call the C++ side resolves in the dispatcher),
    # rather than a copy of the kernel: it needs liblpnorm_ops at run time.
    with zipfile.ZipFile(package) as archive:
        assert any(b"lpnorm::batch_norm" in archive.read(name) for name in archive.namelist() if name.endswith(".json"))
    expected = net(x)
    torch.testing.assert_close(torch._inductor.aoti_load_package(package)(x), expected)
    cpp = run_cpp(lpnorm_run, package, x, tmp_path)
    assert sorted(cpp) == ["direct", "eval"]
    torch.testing.assert_close(cpp["eval"], expected)


def test_cpp_errors_are_clear(lpnorm_run, tmp_path):
    usage = subprocess.run([str(lpnorm_run)], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "MODEL" in usage.stderr and "built for torch " + torch.__version__ in usage.stderr
    missing = subprocess.run([str(lpnorm_run), "net.pt", str(tmp_path / "nowhere.pt"), str(tmp_path / "out.pt")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_cmake_package_links_the_ops_library_even_when_nothing_calls_it(tmp_path):
    """A program that only loads models never calls into liblpnorm_ops; --as-needed (Debian's
    default, and torch's link flags) would drop it and its registrations with it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.cpp").write_text("int main() { return 0; }\n")
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(bare LANGUAGES CXX)\nfind_package(lpnorm REQUIRED)\n"
        "add_executable(bare main.cpp)\ntarget_link_libraries(bare PRIVATE lpnorm::lpnorm)\n")
    build = tmp_path / "build"
    configured = cmake_configure(project, build, "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--as-needed")
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    dynamic = subprocess.run(["readelf", "-d", str(build / "bare")], capture_output=True, text=True).stdout
    assert "[liblpnorm_ops.so]" in dynamic
    assert subprocess.run([str(build / "bare")]).returncode == 0  # and it loads


def test_cmake_package_refuses_another_torch_release(tmp_path):
    """find_package(lpnorm) with a torch 2.11 on the path fails at configure time, naming both."""
    fake_torch = tmp_path / "fake-torch"
    fake_torch.mkdir()
    (fake_torch / "TorchConfig.cmake").write_text("add_library(torch INTERFACE IMPORTED)\n")
    (fake_torch / "TorchConfigVersion.cmake").write_text(
        'set(PACKAGE_VERSION "2.11.0")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(probe LANGUAGES NONE)\nfind_package(lpnorm REQUIRED)\n")
    configured = cmake_configure(project, tmp_path / "build", f"-DTorch_DIR={fake_torch}")
    assert configured.returncode != 0
    message = " ".join((configured.stdout + configured.stderr).split())
    assert f"built for torch {lpnorm._library.build_file()['torch_version']}" in message
    assert "found torch 2.11.0" in message
