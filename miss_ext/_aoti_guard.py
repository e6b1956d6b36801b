"""Refuses AOTInductor compilation of graphs with miss ops on torch releases whose AOTInductor
passes dtype arguments to custom ops wrongly.

Up to torch 2.11, AOTInductor's proxy executor (the runtime that calls custom ops from a
compiled package) cast the serialized dtype enum straight to c10::ScalarType, but the two
numberings differ (pytorch/pytorch#169157, fixed for 2.12 by #173562): a package asks
`miss.fold(..., dtype=torch.float32)` and the op receives torch.float64; float16 arrives as
float32 (silently); bfloat16 as a quantized type. `miss.linear` decomposes into such a fold call
inside Inductor, so nearly every model with MiSS layers is affected. Measured here on torch
2.11.0: the fold returned float64 and the package's next GEMM failed (tests/test_aoti.py); on
2.12.1 and later the package is correct.

So on torch < 2.12, `torch._inductor.aoti_compile_and_package` and `torch._inductor.aot_compile`
are wrapped, once, when miss_ext is imported: an exported program or graph module that contains a
miss op raises RuntimeError naming the op and the fix (a newer torch, or merged weights, which
leave no miss op). Everything else passes through unchanged. Not covered: Inductor's C++ wrapper
in JIT mode (`torch._inductor.config.cpp_wrapper = True` under torch.compile), and functions
imported from torch._inductor before miss_ext was imported.
"""
import functools
import importlib.abc
import importlib.util
import re
import sys
from typing import Iterable

import torch

FIXED_IN = (2, 12)


def affected(version: str = torch.__version__) -> bool:
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", version).groups())
    return (major, minor) < FIXED_IN


def _graphs(program) -> Iterable[torch.fx.Graph]:
    module = program.graph_module if hasattr(program, "graph_module") else program
    if isinstance(module, torch.fx.GraphModule):
        for sub in module.modules():
            if isinstance(sub, torch.fx.GraphModule):
                yield sub.graph


def miss_ops_in(program) -> list:
    """Names of the miss ops called in an ExportedProgram / GraphModule (sorted, unique)."""
    found = set()
    for graph in _graphs(program):
        for node in graph.nodes:
            if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "miss":
                found.add(str(node.target))
    return sorted(found)


def check(program) -> None:
    ops = miss_ops_in(program)
    if ops:
        raise RuntimeError(
            f"miss_ext: AOTInductor on torch {torch.__version__} would call {', '.join(ops)} with wrong dtype "
            f"arguments (torch < 2.12 mis-decodes custom ops' dtype arguments in compiled packages: "
            f"pytorch/pytorch#169157, fixed in 2.12). Use torch 2.12 or newer, or merge the adapters "
            f"(MissLinear.merge / miss_ext.merge_and_unload) so that no miss op is left in the graph.")


def _guarded(original):
    @functools.wraps(original)
    def wrapper(program, *args, **kwargs):
        check(program)
        return original(program, *args, **kwargs)

    wrapper._miss_ext_guard = True
    return wrapper


def _wrap_entry_points(inductor) -> None:
    for name in ("aoti_compile_and_package", "aot_compile"):
        original = getattr(inductor, name, None)
        if original is not None and not getattr(original, "_miss_ext_guard", False):
            setattr(inductor, name, _guarded(original))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after `name` is first imported. torch._inductor takes about
    two seconds to import, so miss_ext does not import it itself; torch imports it lazily on the
    first `torch._inductor` access, and this hook wraps it then."""

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)                 # let the other finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            callback(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Wraps the AOTInductor entry points on affected torch releases, now if torch._inductor is
    imported, else when it is (idempotent)."""
    if not affected():
        return
    name = "torch._inductor"
    if name in sys.modules:
        _wrap_entry_points(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, _wrap_entry_points))
