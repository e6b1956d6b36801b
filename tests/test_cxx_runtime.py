"""The op library against a second C++ runtime in the process (issue 9).

On a GPU machine with g++ 13, every miss error message that formats a number crashed the process
in std::ostream::operator<<(long). The likely mechanism: a library that links libstdc++
statically and exports it (as in pytorch/pytorch#109923), loaded with RTLD_GLOBAL before
miss_ext, serves the ostream/locale calls of every library loaded after it, whose locale then
mixes two runtimes' facet ids. The default build links its own hidden copy of libstdc++
(setup.py, private_cxx_runtime), so no other object can serve those calls; on the GPU machine a
build with the shared runtime crashed on the error probe and the default build did not
(tests/GPU.md, 2026-11-29). This test builds such a library, checks that it really takes over
the global scope, and then raises every error kind.

What it can and cannot show here: with g++ 12 (this project's CI machines) a shared-runtime build
also passes it (checked 2026-11-30), so on CI it guards the private runtime only through
test_the_default_build_links_a_private_cxx_runtime and the raising of every error kind beside a
foreign runtime; the crash itself needs g++ 13's libstdc++ and is checked by scripts/gpu_check.sh
(its error probe) on the GPU machine.
"""
import ctypes  # noqa: F401  (used by the child)
import shutil
import subprocess
import textwrap

import pytest

import miss_ext
from conftest import DEVICES
from test_errors import assert_probe_passed, run_error_probe

FOREIGN_RUNTIME = textwrap.dedent("""
    // A library like the one in pytorch#109923: libstdc++ linked in statically, and (no version
    // script) exported, so it serves any later library's std:: references.
    #include <sstream>
    #include <string>
    extern "C" int foreign_format(long v) {
      std::ostringstream ss;
      ss << "foreign " << v << ' ' << 1.5;
      return static_cast<int>(ss.str().size());
    }
""")

PRELUDE = """
import ctypes, os
# Loaded before torch: torch 2.15 puts libstdc++ into the global scope when imported, so a
# library loaded after it no longer takes over (it did up to 2.14). Loaded first (as an
# application that loads a plugin before torch would), it serves every later library's std::
# references on every release.
lib = ctypes.CDLL({path!r}, mode=ctypes.RTLD_GLOBAL)
import torch
# (foreign_format is not called: the foreign library's own streams are broken beside torch's
# libstdc++, dropping numbers with g++ 12 and crashing with g++ 13, seen on the GPU machine.)
# The hazard is real: the global scope's std::ostream::_M_insert<long> is the foreign copy.
dl = ctypes.CDLL(None)
dl.dlsym.restype = ctypes.c_void_p
dl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]
info = Info()
dl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(Info)]
addr = dl.dlsym(None, b"_ZNSo9_M_insertIlEERSoT_")
assert addr and dl.dladdr(addr, ctypes.byref(info)), "no std::ostream::_M_insert<long> in the global scope"
provider = os.path.basename(info.fname.decode())
assert provider == os.path.basename({path!r}), f"the foreign runtime does not serve _M_insert<long>: {{provider}}"
"""


@pytest.fixture(scope="module")
def foreign_runtime(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:  # pragma: no cover - every build machine has one (it built miss_ext)
        pytest.skip("no C++ compiler on PATH to build the foreign runtime")
    folder = tmp_path_factory.mktemp("foreign_runtime")
    source = folder / "foreign.cpp"
    source.write_text(FOREIGN_RUNTIME)
    lib = folder / "libforeign.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-static-libstdc++", str(source), "-o", str(lib)], check=True,
                   capture_output=True, timeout=300)
    return lib


def test_the_default_build_links_a_private_cxx_runtime():
    assert miss_ext.build_info()["cxx_runtime"] == "private", miss_ext.build_info()


@pytest.mark.parametrize("device", DEVICES)
def test_errors_with_numbers_raise_beside_a_foreign_cxx_runtime(foreign_runtime, device):
    assert_probe_passed(run_error_probe(device, PRELUDE.format(path=str(foreign_runtime))))
