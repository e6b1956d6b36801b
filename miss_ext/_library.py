"""Loads the compiled op library and describes how it was built."""
import sys
from typing import Dict, List

import torch

# A second registration of the `miss` namespace (the CMake-built libmiss_ext.so loaded with
# torch.ops.load_library, then this package) aborts the whole process inside torch: refuse first.
if "miss_ext._C" not in sys.modules and "miss::fold" in torch._C._dispatch_get_all_op_names():
    raise ImportError("the miss ops are already registered in this process (by torch.ops.load_library of the CMake-built "
                      "libmiss_ext.so?): importing miss_ext would register them a second time, which aborts the "
                      "process. Use one of the two per process")

try:
    from . import _C  # noqa: F401  (registers the `miss` ops as a side effect)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "miss_ext's compiled op library (miss_ext._C) is missing or does not match this torch. "
        "Build it from the repository root with `pip install --no-build-isolation -e .`"
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
