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


def tracked_files() -> set:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # an unpacked sdist, or no git
        pytest.skip(f"the file list comes from git, and this checkout has none ({e})")
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
    # Nothing a build writes (the generated config header, compiled objects, caches).
    generated = sorted(n for n in shipped if n.endswith((".so", ".pyc", ".o")) or n == "csrc/setup_build_config.h")
    assert not generated, generated


def test_sdist_needs_no_torch(tmp_path):
    # `python -m build --sdist` packages in an isolated environment without torch.
    shipped = build_sdist(tmp_path, prelude="import sys; sys.modules['torch'] = None  # import torch raises")
    assert "csrc/ops/common/checks.h" in shipped and "setup.py" in shipped
