"""The CMake-built op library on its own: loaded with torch.ops.load_library in a Python process
that never imports miss_ext, it gives the ops with autograd and meta kernels, and the same
kernels per dispatch key as the setup.py build imported here.

Which library: $MISS_EXT_CMAKE_LIB when set (.ci/run builds the CMake variant before pytest and
sets it). Otherwise this test builds it itself, CPU-only with -j2, into build/cmake-pytest/ and
reuses that directory next time (CMake rebuilds only what changed). Decision: building here,
rather than skipping without the variable, keeps `python -m pytest tests` a complete check of the
repository; the price is a few minutes on the first run of a fresh checkout.

Everything touching the CMake library runs in a subprocess: loading it next to miss_ext._C would
register the `miss` namespace twice, which aborts the process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import miss_ext

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("cmake_library_child.py")
CACHED_BUILD = ROOT / "build" / "cmake-pytest"
KEYS = ("CPU", "CUDA", "Meta", "Autograd", "AutocastCPU", "AutocastCUDA")


def _run(cmd, timeout):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _build_cmake_library() -> Path:
    configure = ["cmake", "-S", str(ROOT), "-B", str(CACHED_BUILD), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DMISS_EXT_WITH_CUDA=OFF", "-DMISS_EXT_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    _run(configure, timeout=600)
    _run(["cmake", "--build", str(CACHED_BUILD), "--target", "miss_ext", "-j", os.environ.get("MAX_JOBS", "2")],
         timeout=1800)
    return CACHED_BUILD / "libmiss_ext.so"


@pytest.fixture(scope="session")
def cmake_library() -> Path:
    given = os.environ.get("MISS_EXT_CMAKE_LIB")
    if given:
        path = Path(given)
        assert path.is_file(), f"MISS_EXT_CMAKE_LIB={given} does not exist"
        return path
    path = _build_cmake_library()
    assert path.is_file(), f"the CMake build did not produce {path}"
    return path


def _keys_here():
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("miss::"))
    return {n: [k for k in KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(n, k)] for n in names}


def test_cmake_library_alone_in_subprocess(cmake_library):
    result = _run([sys.executable, str(CHILD), str(cmake_library)], timeout=600)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "OK", result.stdout
    child = json.loads(lines[-2])

    # Same ops, and the same kernels per key as the setup.py build; CUDA only compared when both
    # builds have it (CI builds the CMake variant CPU-only).
    here = _keys_here()
    assert sorted(child["keys"]) == sorted(here) and len(here) >= 10, (child["keys"], here)
    both_cuda = "CUDA" in child["build_info"] and "CUDA" in miss_ext.build_info()["backends"]
    for name, keys in here.items():
        want = [k for k in keys if both_cuda or k != "CUDA"]
        got = [k for k in child["keys"][name] if both_cuda or k != "CUDA"]
        assert got == want, (name, got, want)
        if name != "miss::build_info":  # a catch-all kernel, no per-backend ones
            assert "CPU" in got and "Meta" in got, (name, got)
    assert "Autograd" in child["keys"]["miss::linear"] and "Autograd" in child["keys"]["miss::bat_linear"]
