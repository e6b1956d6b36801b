"""The CMake helpers a consumer meets through find_package(miss_ext), run without building
anything: cmake/MissCudaArchs.cmake in script mode (cmake -P), and the package config
(cmake/miss_extConfig.cmake.in) configured against a stand-in torch package and a stand-in
library target, in a configure-only project (LANGUAGES NONE).

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
