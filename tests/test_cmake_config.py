"""The CMake helpers a consumer meets through find_package(miss_ext), and the library's own
configure, run without building anything: cmake/MissCudaArchs.cmake in script mode (cmake -P),
the package config (cmake/miss_extConfig.cmake.in) configured against a stand-in torch package
and a stand-in library target, in a configure-only project (LANGUAGES NONE), and the library's
configure of its ctest checks.

The library's own build and install are tested by tests/test_cmake_library.py and ctest
(scripts/cmake_test.sh)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH")


def _env_without_arch_list():
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    return env


def _archs_for(tmp_path, cuda_architectures):
    script = tmp_path / "archs.cmake"
    script.write_text(f'include("{ROOT}/cmake/MissCudaArchs.cmake")\n'
                      'message("ARCHS=[${TORCH_CUDA_ARCH_LIST}]")\n')
    return subprocess.run([CMAKE, f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures}", "-P", str(script)],
                          capture_output=True, text=True, timeout=60, env=_env_without_arch_list())


@pytest.mark.parametrize("given, expected", [
    ("80;90", "8.0;9.0"),
    ("90a", "9.0a"),
    ("100a", "10.0a"),
    ("80-real;90-real", "8.0;9.0"),
    ("90-virtual", "9.0+PTX"),   # PTX kept: dropping the suffix would give machine code only
    ("native", "Auto"),          # CMake's special values, which torch's config stops on
    ("all", "All"),
    ("all-major", "All"),
])
def test_cmake_cuda_architectures_become_torch_arch_names(tmp_path, given, expected):
    done = _archs_for(tmp_path, given)
    assert done.returncode == 0, done.stderr
    assert f"ARCHS=[{expected}]" in done.stderr


def test_an_unknown_cmake_cuda_architecture_is_refused_by_name(tmp_path):
    done = _archs_for(tmp_path, "80;sm_90")
    assert done.returncode != 0
    assert "'sm_90' is not understood" in done.stderr


def test_a_second_configure_keeps_the_default_architectures(tmp_path):
    """CMake caches its compiler's default (75 for nvcc 13) in CMAKE_CUDA_ARCHITECTURES when CUDA is
    first enabled; the next configure of the same folder read it as the user's choice and built
    sm_75 code only (a new-user pass, 2026-12-05). A configure-only project doing what
    enable_language(CUDA) does to the cache: the default stays 8.0;9.0 on every configure, and an
    explicit choice still wins."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p LANGUAGES NONE)\n"
        f'include("{ROOT}/cmake/MissCudaArchs.cmake")\n'
        "if(NOT DEFINED CACHE{CMAKE_CUDA_ARCHITECTURES} AND DEFINED ENV{CUDAARCHS})\n"  # what enable_language
        "  set(CMAKE_CUDA_ARCHITECTURES $ENV{CUDAARCHS} CACHE STRING \"\")\n"           # (CUDA) does
        "elseif(NOT DEFINED CACHE{CMAKE_CUDA_ARCHITECTURES})\n"
        "  set(CMAKE_CUDA_ARCHITECTURES 75 CACHE STRING \"\")\n"
        "endif()\n"
        "miss_record_cmake_cuda_default()\n"
        'message("ARCHS=[${TORCH_CUDA_ARCH_LIST}]")\n')

    def configure(*args, build="build", cudaarchs=None):
        env = _env_without_arch_list()
        env.pop("CUDAARCHS", None)
        if cudaarchs:
            env["CUDAARCHS"] = cudaarchs  # CMake's own variable, which seeds the cache entry: a choice
        done = subprocess.run([CMAKE, "-S", str(project), "-B", str(tmp_path / build), *args], capture_output=True,
                              text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return re.search(r"ARCHS=\[([^\]]*)\]", done.stderr).group(1)

    assert configure() == "8.0;9.0"
    assert configure() == "8.0;9.0"
    assert configure("-DCMAKE_CUDA_ARCHITECTURES=90") == "9.0"
    assert configure(build="other", cudaarchs="86") == "8.6"
    assert configure(build="other", cudaarchs="86") == "8.6"


def test_the_python_probe_does_not_import_the_source_tree_it_is_configured_from(tmp_path):
    """The README configures from the source root (`cmake -S .`), where `python -c` imported the
    unbuilt miss_ext/ folder instead of the installed package, and the ctest checks went off with a
    status line only (a new-user pass, 2026-12-05). A configure-only project whose source root holds
    a miss_ext/ that cannot be imported, configured from that root: the probe finds the real one."""
    import sys
    import torch
    import miss_ext
    project = tmp_path / "project"
    (project / "miss_ext").mkdir(parents=True)
    (project / "miss_ext" / "__init__.py").write_text("raise ImportError('the unbuilt source tree')\n")
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p LANGUAGES NONE)\n"
        f'set(Torch_VERSION "{torch.__version__.split("+")[0]}")\n'
        f'include("{ROOT}/cmake/MissPythonProbe.cmake")\n'
        'message("OK=[${MISS_PYTHON_OK}] PROBLEM=[${MISS_PYTHON_PROBLEM}]")\n')
    env = _env_without_arch_list()
    # The package under test, where this process imports it from (the checkout or site-packages).
    env["PYTHONPATH"] = os.pathsep.join([str(Path(miss_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    # An interpreter whose path holds '=', as CI's legs have (build/legs/torch==2.15.0/.venv): `cmake -E
    # env` took it for a variable to set ("unknown option '-c'", the first CI run of this test).
    wrapper = tmp_path / "torch==0" / "python"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    done = subprocess.run([CMAKE, "-S", ".", "-B", str(tmp_path / "build"), f"-DMISS_EXT_PYTHON={wrapper}"],
                          cwd=project, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "OK=[TRUE]" in done.stderr, done.stderr


def _configure_consumer(tmp_path, torch_version, caller_arch_list=None):
    """Configures a project that find_package()s a miss_ext package built against torch 2.14.1
    while the torch found is `torch_version`; returns (completed process, printed variables)."""
    fake_torch = tmp_path / "torch"
    fake_torch.mkdir()
    (fake_torch / "TorchConfig.cmake").write_text("set(Torch_FOUND TRUE)\n")
    (fake_torch / "TorchConfigVersion.cmake").write_text(
        f'set(PACKAGE_VERSION "{torch_version}")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    project = tmp_path / "consumer"
    project.mkdir()
    set_caller = "" if caller_arch_list is None else f'set(TORCH_CUDA_ARCH_LIST "{caller_arch_list}")\n'
    (project / "CMakeLists.txt").write_text(f"""cmake_minimum_required(VERSION 3.18)
project(consumer LANGUAGES NONE)
include(CMakePackageConfigHelpers)
set(pkg "${{CMAKE_BINARY_DIR}}/pkg")
set(Torch_VERSION 2.14.1)
configure_package_config_file("{ROOT}/cmake/miss_extConfig.cmake.in" "${{pkg}}/miss_extConfig.cmake"
                              INSTALL_DESTINATION pkg)
unset(Torch_VERSION)
file(COPY "{ROOT}/cmake/MissCudaToolkit.cmake" "{ROOT}/cmake/MissCudaArchs.cmake" DESTINATION "${{pkg}}")
file(WRITE "${{pkg}}/miss_extTargets.cmake"
     "add_library(miss_ext::ops SHARED IMPORTED)\\nset_target_properties(miss_ext::ops PROPERTIES IMPORTED_LOCATION /stand-in/libmiss_ext.so)\\n")
{set_caller}find_package(miss_ext REQUIRED CONFIG PATHS "${{pkg}}" NO_DEFAULT_PATH)
if(DEFINED TORCH_CUDA_ARCH_LIST)
  message("ARCHS=[${{TORCH_CUDA_ARCH_LIST}}]")
else()
  message("ARCHS=undefined")
endif()
message("LIBRARY=[${{miss_ext_LIBRARY}}] LEFTOVERS=[${{_candidates}}${{_found_from}}${{_miss_caller_arch_list}}]")
""")
    done = subprocess.run([CMAKE, "-S", str(project), "-B", str(tmp_path / "build"), f"-DTorch_DIR={fake_torch}"],
                          capture_output=True, text=True, timeout=120, env=_env_without_arch_list())
    return done, dict(re.findall(r"(\w+)=(\[[^\]]*\]|undefined)", done.stderr))


@pytest.mark.parametrize("caller_arch_list", [None, "7.5"])
def test_find_package_leaves_the_callers_arch_list_as_it_was(tmp_path, caller_arch_list):
    done, printed = _configure_consumer(tmp_path, "2.14.1", caller_arch_list)
    assert done.returncode == 0, done.stderr
    assert printed["ARCHS"] == ("undefined" if caller_arch_list is None else f"[{caller_arch_list}]")
    assert printed["LIBRARY"] == "[/stand-in/libmiss_ext.so]"
    assert printed["LEFTOVERS"] == "[]"


def test_find_package_refuses_another_torch_naming_both_versions(tmp_path):
    done, _ = _configure_consumer(tmp_path, "2.15.0")
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "miss_ext was built against torch 2.14.1 but find_package(Torch) found torch 2.15.0" in message


def test_a_reconfigure_with_a_working_python_turns_the_ctest_checks_on(tmp_path):
    """The library's own configure (no build): a first configure whose Python probe fails turns the
    ctest checks off with a warning. option() cached that OFF, and a re-configure with a working
    -DMISS_EXT_PYTHON, as the warning advises, kept them off without a word: ctest found no tests
    (a C++ review, 2026-12-06). The default is decided at every configure; -DMISS_EXT_BUILD_TESTS=OFF
    given by the user is kept, with a status line."""
    import sys
    import torch
    import miss_ext
    env = _env_without_arch_list()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(miss_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    build = tmp_path / "build"
    tests = build / "CTestTestfile.cmake"

    def configure(*options):
        done = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), *options], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        return done

    done = configure(f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DMISS_EXT_WITH_CUDA=OFF",
                     "-DMISS_EXT_PYTHON=/bin/false")
    assert "ctest checks off (ctest will find no tests)" in done.stderr and not tests.exists()
    configure(f"-DMISS_EXT_PYTHON={sys.executable}")
    assert "serve_torchscript" in tests.read_text()
    done = configure("-DMISS_EXT_BUILD_TESTS=OFF")
    assert "miss_ext: ctest checks off (MISS_EXT_BUILD_TESTS=OFF)" in done.stdout


def test_a_project_that_adds_this_one_may_turn_the_ctest_checks_off(tmp_path):
    """A superproject's set(MISS_EXT_BUILD_TESTS OFF) before add_subdirectory() is the user's choice
    (option() honoured it; a check of the cache alone did not: a review, 2026-12-06)."""
    import sys
    import torch
    import miss_ext
    env = _env_without_arch_list()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(miss_ext.__file__).parents[1]), env.get("PYTHONPATH", "")])
    project = tmp_path / "super"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(super LANGUAGES CXX)\n"
        "set(MISS_EXT_BUILD_TESTS OFF)\n"
        f'add_subdirectory("{ROOT}" miss_ext)\n')
    done = subprocess.run([CMAKE, "-S", str(project), "-B", str(tmp_path / "build"),
                           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DMISS_EXT_WITH_CUDA=OFF",
                           f"-DMISS_EXT_PYTHON={sys.executable}"],  # a working probe: the checks could run
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "miss_ext: ctest checks off (MISS_EXT_BUILD_TESTS=OFF)" in done.stdout
    assert not (tmp_path / "build" / "miss_ext" / "CTestTestfile.cmake").exists()
