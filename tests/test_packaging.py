"""The source distribution: everything a build, the CMake library and the tests read is in it.

setuptools puts only the extension's .cpp/.cu sources and the Python package into an sdist by
itself; before MANIFEST.in a build from one (`python -m build`, `pip install miss_ext-*.tar.gz`)
failed at the first `#include` of one of our headers."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tracked files that are not part of the sources (the CI driver, git's own file).
NOT_SHIPPED = {".ci/run", ".gitignore"}


# Files that running the build, the tests or the benchmarks leaves in a checkout: never shipped.
LEFT_BY_RUNS = ["csrc/setup_build_config.h", "miss_ext/_C.cpython-311-x86_64-linux-gnu.so",
                "miss_ext/__pycache__/modules.cpython-311.pyc", "tests/.hypothesis/examples/x", "bench/out/x.json",
                "examples/cpp/build/CMakeCache.txt"]


def tracked_files() -> set:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        out = git("ls-files")
    except (OSError, subprocess.CalledProcessError) as e:  # an unpacked sdist, or no git
        pytest.skip(f"the file list comes from git, and this checkout has none ({e})")
    if Path(top).resolve() != ROOT:  # an unpacked sdist inside another git work tree
        pytest.skip(f"the file list comes from git, and {ROOT} is not a git checkout's root")
    return set(out.split()) - NOT_SHIPPED


def build_sdist(tmp_path: Path, prelude: str = "") -> set:
    """Runs setup.py sdist in a child (after `prelude`) on a copy of the tracked files and returns
    the tarball's file names. A copy: in a checkout that was built, setuptools adds the files named
    by an earlier build's miss_ext.egg-info/SOURCES.txt, which would hide a missing MANIFEST.in line."""
    src = tmp_path / "src"
    for name in tracked_files() | {"MANIFEST.in"}:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    for name in LEFT_BY_RUNS:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("left by a run\n")
    code = (f"{prelude}\nimport sys, os\nos.chdir({str(src)!r})\n"
            f"sys.argv = ['setup.py', 'sdist', '--dist-dir', {str(tmp_path)!r}]\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MISS_EXT_CUDA": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (tarball,) = tmp_path.glob("miss_ext-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = names[0].split("/", 1)[0] + "/"
    return {n[len(prefix):] for n in names}


def test_sdist_holds_every_source_file(tmp_path):
    shipped = build_sdist(tmp_path)
    missing = sorted(tracked_files() - shipped)
    assert not missing, f"not in the sdist: {missing}"
    # Nothing a build, a test or a benchmark run leaves in the checkout (planted in the copy).
    left = sorted(set(LEFT_BY_RUNS) & shipped)
    assert not left, left


def test_sdist_needs_no_torch(tmp_path):
    # `python -m build --sdist` packages in an isolated environment without torch.
    shipped = build_sdist(tmp_path, prelude="import sys; sys.modules['torch'] = None  # import torch raises")
    assert "csrc/ops/common/checks.h" in shipped and "setup.py" in shipped


def test_only_packaging_commands_skip_the_build():
    """setup.py needs torch (and builds the library) for every command but packaging the sources:
    `sdist bdist_dumb` made a binary distribution without the library (a review, 2026-12-05)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("miss_setup_packaging", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)
    only = setup_module.packages_sources_only
    assert only(["setup.py", "sdist"]) and only(["setup.py", "egg_info"])
    assert only(["setup.py", "sdist", "--formats", "gztar", "--dist-dir", "/tmp/x"])
    for argv in (["bdist_dumb"], ["sdist", "bdist"], ["egg_info", "bdist_rpm"], ["sdist", "build_ext"],
                 ["install_lib"], ["develop"], ["editable_wheel"], ["dist_info"], ["bdist_wheel"], []):
        assert not only(["setup.py", *argv]), argv


def test_importing_an_unbuilt_source_tree_says_so(tmp_path):
    """`import miss_ext` from a checkout's root without a build: the error says the compiled
    library is missing and what to run. It used to quote Python's "partially initialized module
    ... (most likely due to a circular import)", which sent a new user looking for a circular
    import (a new-user pass, 2026-12-06)."""
    shutil.copytree(ROOT / "miss_ext", tmp_path / "miss_ext",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__", "*.so"))
    (tmp_path / "setup.py").write_text("# the source tree's marker\n")
    # Without the editable install's finder (this suite's own setup), which would hand out the
    # checkout's _C for the copy's `from . import _C`: a machine with only the source tree.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import miss_ext")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: miss_ext's compiled op library (miss_ext._C) is missing from"), last
    assert "no built _C file in that folder" in last and "circular import" not in last, last
    assert "pip install --no-build-isolation -e ." in last, last
