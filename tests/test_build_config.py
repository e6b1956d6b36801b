"""The build decisions of setup.py: CUDA on/off from MISS_EXT_CUDA, torch and the toolkit."""
import importlib.util
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("miss_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; setup() only runs as __main__
    monkeypatch.delenv("MISS_EXT_CUDA", raising=False)
    return module


class CpuTorch:
    __version__ = "2.13.0+cpu"

    class version:
        cuda = None


class CudaTorch:
    __version__ = "2.14.1+cu130"

    class version:
        cuda = "13.0"


@pytest.mark.parametrize("given, gpu, expected", [
    (None, False, "8.0;9.0"), ("", False, "8.0;9.0"), ("  ", False, "8.0;9.0"),  # no GPU: A100, H100/H200
    ("9.0", False, "9.0"), ("8.6 9.0+PTX", True, "8.6 9.0+PTX"),               # the user's list stays
    (None, True, None), ("  ", True, None),       # none: torch takes the visible GPU's (a blank one failed)
])
def test_the_cuda_architectures_default_to_a100_and_h100_without_a_gpu(setup_module, given, gpu, expected):
    """setup.py's TORCH_CUDA_ARCH_LIST decision (issue 2; README's build-knob table): nothing
    checked it, so a changed default built for other GPUs unnoticed (an audit, 2026-12-06). The
    build itself records what it compiled for: .ci/run compares build_info()'s cuda_archs with
    this default."""
    class Cuda:
        @staticmethod
        def is_available():
            return gpu

    class Torch(CudaTorch):
        cuda = Cuda

    assert setup_module.DEFAULT_ARCHS == "8.0;9.0"
    assert setup_module.cuda_arch_list(Torch, given) == expected
    environ = {"OTHER": "kept"} | ({} if given is None else {"TORCH_CUDA_ARCH_LIST": given})
    setup_module.set_cuda_arch_list(Torch, environ)  # what the build's environment then holds
    assert environ == {"OTHER": "kept"} | ({} if expected is None else {"TORCH_CUDA_ARCH_LIST": expected})


def test_forced_cuda_with_cpu_torch_fails_loudly(setup_module, monkeypatch):
    monkeypatch.setenv("MISS_EXT_CUDA", "1")
    with pytest.raises(RuntimeError, match="CPU-only build"):
        setup_module.decide_cuda(CpuTorch)


def test_forced_cuda_without_toolkit_fails_loudly(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("MISS_EXT_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # not a toolkit
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        setup_module.decide_cuda(CudaTorch)


def test_forced_off_and_bad_values(setup_module, monkeypatch):
    monkeypatch.setenv("MISS_EXT_CUDA", "0")
    assert setup_module.decide_cuda(CudaTorch) == (False, None)
    monkeypatch.setenv("MISS_EXT_CUDA", "yes")
    with pytest.raises(RuntimeError, match="must be 0, 1 or unset"):
        setup_module.decide_cuda(CudaTorch)


def test_debug_information_is_off_unless_asked(setup_module, monkeypatch):
    """-g0 by default (Python's own CFLAGS carry -g, which doubled the compile time of every C++
    file), nothing added with MISS_EXT_DEBUG_INFO=1, a clear error naming any other value."""
    monkeypatch.delenv("MISS_EXT_DEBUG_INFO", raising=False)
    assert setup_module.debug_info_flags() == ["-g0"]
    monkeypatch.setenv("MISS_EXT_DEBUG_INFO", "1")
    assert setup_module.debug_info_flags() == []
    monkeypatch.setenv("MISS_EXT_DEBUG_INFO", "yes")
    with pytest.raises(RuntimeError, match="MISS_EXT_DEBUG_INFO must be 0 or 1, got 'yes'"):
        setup_module.debug_info_flags()


def test_auto_never_builds_cuda_for_cpu_torch(setup_module):
    assert setup_module.decide_cuda(CpuTorch)[0] is False


def test_a_cpu_only_build_says_why(setup_module, monkeypatch):
    """The build's first line gives the reason for a CPU-only build (a CPU-only torch on a machine
    with a CUDA toolkit said only "building CPU-only kernels"; a new user's pass, 2026-12-05)."""
    monkeypatch.delenv("MISS_EXT_CUDA", raising=False)
    assert setup_module.cpu_only_reason(CpuTorch, "/usr/local/cuda") == "torch 2.13.0+cpu is a CPU-only build"
    assert "no CUDA toolkit found" in setup_module.cpu_only_reason(CudaTorch, None)
    monkeypatch.setenv("MISS_EXT_CUDA", "0")
    assert setup_module.cpu_only_reason(CudaTorch, "/usr/local/cuda") == "MISS_EXT_CUDA=0"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_toolkit_found_behind_an_nvcc_wrapper(setup_module, monkeypatch):
    """nvcc on PATH may be a wrapper script (it is on the CI machine): the real root is found."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root = setup_module.find_cuda_home()
    assert root is not None and os.path.isfile(os.path.join(root, "bin", "nvcc"))
    assert os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
    assert setup_module.decide_cuda(CudaTorch) == (True, root)


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0+cpu", "2.14.1+cu130", "2.15.0"])
def test_supported_torch_releases_build(setup_module, version):
    setup_module.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.2", "2.9.1+cu128", "2.16.0", "3.0.0"])
def test_torch_outside_the_range_is_refused_by_name(setup_module, version):
    with pytest.raises(RuntimeError, match=r"supports torch 2\.11 to 2\.15, but the installed torch is " + re.escape(version)):
        setup_module.check_torch_version(version)


@pytest.mark.parametrize("built, running, other", [
    ("2.14.1+cu130", "2.14.1+cu130", False), ("2.14.1+cu130", "2.14.1+cpu", True),
    ("2.14.1+cu130", "2.15.0+cu130", True), ("2.14.1+cu130", "2.14.1", True),
    ("2.14.1", "2.14.1+cu130", False),    # the CMake library records CMake's Torch_VERSION, no local part
    ("2.14.1", "2.14.2", True), ("", "2.14.1", False),
])
def test_a_build_for_another_torch_is_told_apart(built, running, other):
    from miss_ext._library import built_for_other_torch

    assert built_for_other_torch(built, running) is other


def test_importing_a_library_built_for_another_torch_is_refused_by_name():
    """A wheel built with torch 2.15 installed beside torch 2.14 (pip's requirement is a range)
    imported without a word (a new-user pass, 2026-12-07). Now an ImportError names both."""
    import subprocess
    import sys

    import torch

    from miss_ext._library import build_info

    code = ("import torch; torch.__version__ = '2.14.99+other'\n"
            "try:\n    import miss_ext\nexcept ImportError as e:\n    print('refused:', e)\nelse:\n    print('imported')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    built = build_info()["built_with_torch"]
    assert built in (str(torch.__version__), str(torch.__version__).split("+")[0])
    assert (f"refused: miss_ext's compiled op library was built against torch {built}, but this process runs torch "
            "2.14.99+other") in out.stdout, out.stdout + out.stderr
    ok = subprocess.run([sys.executable, "-c", "import miss_ext; print('imported')"], capture_output=True, text=True,
                        timeout=300)
    assert ok.stdout.strip() == "imported", ok.stderr


def test_a_build_that_cannot_import_torch_names_build_isolation(setup_module, monkeypatch):
    """A plain `pip install .` builds in an isolated environment without torch; the error said
    "none was found" to a user whose torch was installed (a new-user pass, 2026-12-07)."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    with pytest.raises(RuntimeError, match=r"cannot import torch\. If torch is installed, pip's build isolation hid "
                                           r"it .*pip install --no-build-isolation \."):
        setup_module.extensions()


def test_missing_optional_package_names_the_extra():
    from miss_ext._optional import require

    with pytest.raises(ImportError, match=r"miss_ext\.peft needs the 'no_such_pkg' package.*pip install 'miss_ext\[peft\]'"):
        require("no_such_pkg.sub", "peft", "miss_ext.peft")
    assert require("json", "peft", "x").__name__ == "json"


def test_a_peft_too_old_for_miss_ext_peft_is_refused_at_import():
    """PEFT 0.17-0.19 imported, accelerate() swapped the classes, and every call then crashed on
    a missing attribute; PEFT before 0.17 has no peft.tuners.miss (a bare ModuleNotFoundError).
    Review, 2026-12-03: ImportError naming the version now, before anything changes."""
    import subprocess
    import sys

    code = ("import peft; peft.__version__ = '0.19.1'\n"
            "try:\n    import miss_ext.peft\nexcept ImportError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: miss_ext.peft needs peft >= 0.21, found peft 0.19.1" in out.stdout, out.stdout + out.stderr
    assert "pip install 'peft>=0.21,<0.23'" in out.stdout


def test_a_peft_newer_than_miss_ext_peft_knows_is_refused_at_import():
    """PEFT 0.22.0 came out during a CI run (2026-12-07) and 23 tests of the accelerated layers
    and of PEFT parity failed against it (each adapter's own mode, a new modules_to_save rule):
    a release miss_ext.peft has not been checked against is refused by name."""
    import subprocess
    import sys

    code = ("import peft; peft.__version__ = '0.23.0'\n"
            "try:\n    import miss_ext.peft\nexcept ImportError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: miss_ext.peft needs peft older than 0.23, found peft 0.23.0" in out.stdout, out.stdout + out.stderr
    assert "pip install 'peft>=0.21,<0.23'" in out.stdout


@pytest.mark.parametrize("missing", ["transformers", "tqdm", "matplotlib", "peft"])
def test_demo_without_an_optional_package_names_the_extra(missing, monkeypatch):
    """The demo checks its packages before any work; a missing one names miss_ext[demo]."""
    import sys

    from miss_ext.demo._cli import build_parser
    from miss_ext.demo._driver import require_demo_packages

    monkeypatch.setitem(sys.modules, missing, None)     # `import missing` now raises ModuleNotFoundError
    args = build_parser().parse_args([])
    with pytest.raises(ImportError, match=r"miss_ext\[demo\]"):
        require_demo_packages(args)


def test_the_demo_names_every_missing_package_at_once_without_usage_text(monkeypatch, capsys):
    """One at a time, a user following the "(or pip install <package>)" hint met a failed run per
    package, each with the whole usage text before it (a new-user pass, 2026-12-05): one line now,
    every missing package, exit 2."""
    import sys

    from miss_ext.demo._driver import main

    for missing in ("tqdm", "matplotlib"):
        monkeypatch.setitem(sys.modules, missing, None)
    assert main(["--no-peft"]) == 2
    err = capsys.readouterr().err
    assert "needs the 'tqdm', 'matplotlib' packages, not installed" in err and "pip install tqdm matplotlib" in err
    assert "usage:" not in err and "miss_ext[demo]" in err


def test_mixed_demo_without_transformers_names_the_extra(monkeypatch):
    """The second demo checks its package too (it raised a bare ModuleNotFoundError)."""
    import sys

    from miss_ext.demo import mixed

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"miss_ext\.demo\.mixed needs the 'transformers' package.*miss_ext\[demo\]"):
        mixed.main([])


def test_the_info_report_says_the_versions_backends_and_each_op():
    """What `python -m miss_ext.info` promises (issue 2): torch's version, the backends and CUDA
    architectures of the build, and one row per registered op whose name never runs into its
    first key column (issue 13's fix). Only "miss::fold" was looked for before: an audit,
    2026-12-06, removed the version and architecture lines and brought the overflow back, and
    every test passed."""
    import torch

    from miss_ext import info
    from miss_ext._library import build_info, registered_ops

    text = info.report()
    lines = text.splitlines()
    built = build_info()
    assert lines[0].startswith(f"torch            {torch.__version__} (CUDA ")
    assert f"built with torch {built['built_with_torch']}" in lines
    assert f"backends         {', '.join(built['backends'])}" in lines
    if "CUDA" in built["backends"]:
        archs = ", ".join(built["cuda_archs"]) or "visible GPU"
        assert f"CUDA             {built['cuda_version']} for sm {archs}" in lines, text
    rows = {line.split()[0]: line for line in lines if line.startswith("miss::")}
    assert set(rows) == set(registered_ops()) and len(rows) > 10
    for name, line in rows.items():
        assert re.fullmatch(re.escape(name) + r" {2,}((yes|-) +)*(yes|-) *", line), line


def test_the_info_command_refuses_unknown_arguments():
    """`python -m miss_ext.info` prints its report; an argument it does not know exits 2 (it was
    ignored, exit 0: a review, 2026-12-05)."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "miss_ext.info"], capture_output=True, text=True)
    assert ok.returncode == 0 and "miss::fold" in ok.stdout, ok.stdout
    bad = subprocess.run([sys.executable, "-m", "miss_ext.info", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    stripped = subprocess.run([sys.executable, "-OO", "-m", "miss_ext.info"], capture_output=True, text=True)
    assert stripped.returncode == 0 and "miss::fold" in stripped.stdout, stripped.stderr  # no docstrings there
