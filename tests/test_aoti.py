"""AOTInductor round trip on CPU: export a model with MissLinear layers (all three modes, dynamic
batch), compile it to a .pt2 package, load the package and compare with eager at two batch sizes.

The compiled code calls the miss ops through the dispatcher (AOTInductor's proxy executor for
C++ custom ops), so the loading process needs the op library: here the imported miss_ext; a C++
server links the CMake-built library instead (README, "Deploy without Python")."""
import zipfile

import pytest
import torch
from torch.export import Dim

import miss_ext
from miss_ext import _aoti_guard
from deploy_models import IN_FEATURES, ThreeModes


@pytest.mark.skipif(_aoti_guard.affected(), reason=f"torch {torch.__version__} < 2.12 mis-decodes custom ops' dtype "
                    "arguments in AOTInductor packages; miss_ext refuses (tested below)")
def test_aoti_package_round_trip(tmp_path):
    model = ThreeModes().eval()
    x = torch.randn(5, 3, IN_FEATURES)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch", min=2, max=64)}}, strict=False)

    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "miss_three_modes.pt2"))
    # The package calls the hand-written kernels by op name. Inductor traces miss.linear through
    # its C++ autograd, which is a composition of dispatcher calls (miss.fold, a GEMM,
    # miss.tile_add_; README "Design decisions"), so fold and tile_add_ appear rather than linear.
    with zipfile.ZipFile(path) as package:
        text = b"".join(package.read(n) for n in package.namelist() if n.endswith(".json"))
    for op in (b"miss::fold", b"miss::tile_add_", b"miss::bat_linear"):
        assert b'"target": "' + op + b'"' in text, op

    runner = torch._inductor.aoti_load_package(path)
    for batch in (3, 17):  # neither is the traced batch size
        xb = torch.randn(batch, 3, IN_FEATURES)
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(runner(xb), expected, rtol=1e-5, atol=1e-5)


# ---- torch < 2.12: AOTInductor mis-decodes custom ops' dtype arguments (miss_ext/_aoti_guard.py) ----
GUARD_CHILD = """
import sys
import torch
{before}
import miss_ext
from miss_ext import _aoti_guard
_aoti_guard.FIXED_IN = (99, 0)      # pretend this torch is affected
_aoti_guard.install()
sys.path.insert(0, {tests!r})
from deploy_models import IN_FEATURES, ThreeModes
import torch._inductor
ep = torch.export.export(ThreeModes().eval(), (torch.randn(5, 3, IN_FEATURES),), strict=False)
for name in ("aoti_compile_and_package", "aot_compile"):
    try:
        getattr(torch._inductor, name)(ep)
    except RuntimeError as e:
        assert "pytorch/pytorch#169157" in str(e) and "miss.bat_linear" in str(e), str(e)
    else:
        raise SystemExit(name + " was not refused")
print("refused")
"""


@pytest.mark.parametrize("inductor_first", [False, True], ids=["inductor-imported-later", "inductor-imported-first"])
def test_aoti_with_miss_ops_is_refused_where_torch_mis_decodes_dtypes(inductor_first):
    """The guard's mechanism, on any torch: installed before or after torch._inductor is imported,
    both entry points refuse a program with miss ops, naming the ops and the torch issue."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    code = GUARD_CHILD.format(before="import torch._inductor" if inductor_first else "", tests=tests)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("refused"), out.stdout + out.stderr[-3000:]


def test_aoti_guard_version_bound():
    assert _aoti_guard.affected("2.11.0+cu130") and _aoti_guard.affected("2.9.1")
    assert not _aoti_guard.affected("2.12.1") and not _aoti_guard.affected("2.15.0+cu132")


def test_merged_models_pass_the_guard_and_round_trip(tmp_path):
    """A merged model holds no miss op, so the guard lets it through on every torch, and its
    package gives the unmerged model's output (README: "merged models too"; only the guard was
    checked before: an audit, 2026-12-06)."""
    model = ThreeModes().eval()
    xs = [torch.randn(batch, 3, IN_FEATURES) for batch in (3, 17)]  # neither is the traced batch size
    with torch.no_grad():
        expected = [model(x) for x in xs]
    for m in model.modules():
        if isinstance(m, miss_ext.MissLinear):
            m.merge()
    ep = torch.export.export(model, (torch.randn(5, 3, IN_FEATURES),),
                             dynamic_shapes={"x": {0: Dim("batch", min=2, max=64)}}, strict=False)
    assert _aoti_guard.miss_ops_in(ep) == []
    _aoti_guard.check(ep)
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "merged.pt2")))
    for x, want in zip(xs, expected):
        torch.testing.assert_close(runner(x), want, rtol=1e-5, atol=1e-5)
