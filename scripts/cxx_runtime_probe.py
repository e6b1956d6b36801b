"""Which loaded objects serve the C++ runtime calls that error messages make (issue 9).

    python scripts/cxx_runtime_probe.py [--cuda]

Imports torch and miss_ext (and, with --cuda, initialises CUDA, which loads the driver's
libraries), then asks the dynamic linker which object the global scope resolves a few
libstdc++ symbols to (dlsym(RTLD_DEFAULT) + dladdr), and lists every loaded object that exports
std::ostream::_M_insert<long>. An exporter other than libstdc++ itself is a second C++ runtime:
the pytorch#109923 hazard. Prints one line per symbol; exit status 1 when a foreign provider is
found. scripts/gpu_check.sh saves its output, so a GPU run names the object, if any.
"""
import ctypes
import os
import subprocess
import sys

SYMBOLS = {
    "_ZNSo9_M_insertIlEERSoT_": "std::ostream::_M_insert<long>",
    "_ZNSo9_M_insertIdEERSoT_": "std::ostream::_M_insert<double>",
    "_ZNSt6localeC1Ev": "std::locale::locale()",
    "_ZNSt6locale7classicEv": "std::locale::classic()",
    "_ZNSt7num_putIcSt19ostreambuf_iteratorIcSt11char_traitsIcEEE2idE": "std::num_put<char>::id",
}
EXPECTED = ("libstdc++.so",)


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


def provider(symbol: str):
    libc = ctypes.CDLL(None)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    address = libc.dlsym(None, symbol.encode())
    info = _DlInfo()
    if not address or not libc.dladdr(address, ctypes.byref(info)):
        return None
    return info.fname.decode()


def exporters(symbol: str):
    with open("/proc/self/maps") as maps:
        objects = sorted({line.split()[-1] for line in maps if ".so" in line and line.split()[-1].startswith("/")})
    found = []
    for path in objects:
        try:
            out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ["(nm unavailable)"]
        if any(line.split()[-1].split("@")[0] == symbol for line in out.splitlines() if line.strip()):
            found.append(path)
    return found


def main() -> int:
    import torch

    import miss_ext

    if "--cuda" in sys.argv:
        torch.zeros(1, device="cuda")
    print("miss_ext", miss_ext.build_info())
    foreign = 0
    for symbol, name in SYMBOLS.items():
        where = provider(symbol)
        ok = where is None or os.path.basename(where).startswith(EXPECTED)
        foreign += not ok
        print(f"{'ok ' if ok else 'FOREIGN'} {name:34s} <- {where}")
    print("exporters of _M_insert<long>:", exporters("_ZNSo9_M_insertIlEERSoT_"))
    return 1 if foreign else 0


if __name__ == "__main__":
    sys.exit(main())
