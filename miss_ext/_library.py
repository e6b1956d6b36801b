"""Loads the compiled op library and describes how it was built."""
from typing import Dict, List

import torch

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
    """Backends, CUDA version and architectures compiled into the op library."""
    info: Dict[str, object] = {}
    for item in torch.ops.miss.build_info().split(";"):
        name, _, value = item.partition("=")
        info[name] = value
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
