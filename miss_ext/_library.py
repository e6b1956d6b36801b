"""Loads the compiled op library and describes how it was built."""
import sys
from typing import Dict, List

import torch

# A second registration of the `miss` namespace (the CMake-built libmiss_ext.so loaded with
# torch.ops.load_library, or another copy of this package, then this one) aborts the whole process
# inside torch: refuse first. This package's own _C (a reload of this module) is the one case that
# registers nothing new. Keyed by this package's name: a vendored copy under another name saw
# "miss_ext._C" loaded and registered again (a review, 2026-12-05: SIGABRT). The same files
# imported under a second name (a path alias) are refused too: their classes would be a second
# set, whose layers the first set's functions do not see.
if f"{__package__}._C" not in sys.modules and "miss::fold" in torch._C._dispatch_get_all_op_names():
    raise ImportError(f"the miss ops are already registered in this process (by another copy of miss_ext, or the same "
                      f"one imported under another name than {__package__!r}, or torch.ops.load_library of the "
                      "CMake-built libmiss_ext.so): importing this package would register them a second time, which "
                      "aborts the process. Use one per process")

try:
    from . import _C  # noqa: F401  (registers the `miss` ops as a side effect)
except ImportError as exc:  # pragma: no cover - only without a build
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    _source = os.path.isfile(os.path.join(os.path.dirname(_here), "setup.py"))
    # Without a built file Python's own text says "partially initialized module ... (most likely due
    # to a circular import)", which sent a new user looking for a circular import (2026-12-06).
    import importlib.machinery

    # A build for this interpreter (a stale one for another Python reads as none).
    _built = any(os.path.isfile(os.path.join(_here, "_C" + suffix))
                 for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    raise ImportError(
        f"miss_ext's compiled op library (miss_ext._C) is missing from {_here} or does not match this torch "
        f"{torch.__version__} ({exc if _built else 'no built _C file in that folder'}). "
        + ("That folder is the source tree (setup.py sits beside it), which Python imports first when the current "
           "directory is the repository root, hiding a `pip install .` copy: run from another directory (the tests of "
           "an installed copy: `pytest tests` or `PYTHONSAFEPATH=1 python -m pytest tests`; `python -m` puts the "
           "current directory first), or build in place with `pip install --no-build-isolation -e .` (or "
           "`python setup.py build_ext --inplace`)"
           if _source else
           "Reinstall it against this torch: `pip install --no-build-isolation .` from the repository root")
    ) from exc

# Dispatch keys a `miss` op may have kernels for, in the order `python -m miss_ext.info` shows.
DISPATCH_KEYS = ("CPU", "CUDA", "Meta", "Autograd")


def build_info() -> Dict[str, object]:
    """How the op library was built, as a dict: "backends" (list, "CPU" and "CUDA" when the CUDA
    kernels are in), "cuda_version" (str, "" without CUDA), "cuda_archs" (list such as ["8.0",
    "9.0"]), "built_with_torch" (the torch version it was compiled against), "cxx_runtime"
    ("private": libstdc++ linked in and hidden; "shared") and "sanitize" ("address,undefined"
    in a sanitizer build, else "")."""
    info: Dict[str, object] = {}
    for item in torch.ops.miss.build_info().split(";"):
        name, _, value = item.partition("=")
        info[name] = value
    info.setdefault("cuda_version", "")  # a CPU-only build does not write the key
    info["backends"] = str(info.get("backends", "")).split(",")
    info["cuda_archs"] = [a for a in str(info.get("cuda_archs", "")).split(",") if a]
    return info


def registered_ops() -> Dict[str, List[str]]:
    """Each `miss::` op with the dispatch keys it has a kernel for."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("miss::"))
    return {
        name: [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        for name in names
    }


def built_for_other_torch(built: str, running: str) -> bool:
    """True when the library's build torch (`built`, "" when unrecorded) is not the running torch
    (`running`, torch.__version__). Compared whole, the local part too ("2.14.1+cu130"): a CUDA
    and a CPU build of one release are different libraries. A build that recorded no local part
    (the CMake library records CMake's Torch_VERSION, "2.14.1") is compared without one."""
    if not built:
        return False
    return built != (running if "+" in built else running.split("+")[0])


def _check_built_torch() -> None:
    """ImportError when the op library was compiled against another torch than the one running.
    A custom op library is compiled against one torch's C++ API and op registry: pip accepts a
    wheel built with torch 2.15 in an environment holding 2.14 (its requirement is a range), and
    the import then went through without a word (a new-user pass, 2026-12-07), where a mismatch
    can crash or compute wrong results. The CMake package refuses the same case by name."""
    built = str(build_info().get("built_with_torch", ""))
    running = str(torch.__version__)
    if built_for_other_torch(built, running):
        raise ImportError(f"miss_ext's compiled op library was built against torch {built}, but this process runs "
                          f"torch {running}: a custom op library works only with the torch it was compiled against "
                          "(its C++ API and op registry), and a mismatch can crash or compute wrong results. Rebuild "
                          "miss_ext against this torch (`pip install --no-build-isolation .` from its sources, or "
                          f"`pip install --no-build-isolation -e .` in a clone), or install torch {built}")


_check_built_torch()
