"""The implementation choices of issue 11 (csrc/ops/impl_choice.h), checked on the CPU.

- MISS_EXT_GEMM=split forces the fp32 products of a bf16 layer with an fp32 block (PEFT's default
  precision) onto bf16 parts of the fp32 operands (csrc/ops/split_gemm.h): the adapter products
  of miss::linear, and bat_linear's GEMMs. "auto" takes this path on CUDA (linear: default mode).
- MISS_EXT_BAT_TRANSFORM=gemm forces the bat transform onto one batched GEMM
  (csrc/ops/bat_gemm.cpp), the path "auto" takes on CUDA.

On the CPU both run the same ATen arithmetic as on a GPU (there the bf16 GEMMs write fp32
themselves; here the bf16 operands are widened first, which is exact), so these tests check what
a GPU computes except cuBLAS itself. Every test also checks, from the profiler's op names, that the
path it asked for was the one taken, so it cannot pass on the other path. The GPU tests at the end
check "auto" on CUDA against the CPU.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import miss_ext
from conftest import BF16_ULP, CUDA_AVAILABLE, assert_within_ulp, needs_gpu
from reference import (TILE_ADD_TOL, bat_weight_ref, fold_error_scale, fold_ref, fold_within, linear_ref,
                       peft_precision_linear_ref, recover_mask)

ops = torch.ops.miss
F64 = torch.float64


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one test; restored afterwards."""
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def op_names(fn):
    """The names of the ops that fn() runs (nested calls included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def rel_err(a, b):
    """max |a - b| / max |b|; the absolute difference where b is all zero (or empty: 0)."""
    a, b = a.to(F64), b.to(F64)
    if not b.numel():
        return 0.0
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff / scale if scale else diff


def run_linear(x, w, b, block, p, key, grad):
    """y and (dx, dblock) of miss.linear, with the op names seen in the forward and the backward."""
    x = x.detach().requires_grad_()
    block = block.detach().requires_grad_()
    out = {}

    def forward():
        out["y"] = ops.linear(x, w, b, block, p, key)

    fw = op_names(forward)
    bw = op_names(lambda: out["y"].backward(grad))
    return out["y"].detach(), x.grad, block.grad, fw, bw


# (leading shape of x, in, out, r, mini_r or None, p): remainders (in % r != 0), r > in, an empty
# batch, a 3-D input, mini mode, dropout.
CASES = [
    ((37,), 96, 80, 16, None, 0.0),
    ((37,), 96, 80, 16, 20, 0.0),
    ((5,), 10, 24, 16, None, 0.3),
    ((0,), 12, 8, 4, None, 0.0),
    ((2, 7), 33, 18, 5, None, 0.2),
    ((9,), 40, 60, 8, 12, 0.5),
]


def make_linear_inputs(lead, fin, fout, r, mini_r, p):
    x = torch.randn(*lead, fin).bfloat16()
    w = (torch.randn(fout, fin) / fin ** 0.5).bfloat16()
    b = torch.randn(fout).bfloat16()
    block = torch.randn(r, mini_r or fout)  # fp32, as PEFT keeps it
    key = miss_ext.new_dropout_key("cpu") if p else None
    grad = torch.randn(*lead, fout).bfloat16()
    return x, w, b, block, key, grad


@pytest.mark.parametrize("lead,fin,fout,r,mini_r,p", CASES)
def test_split_products_match_the_float64_reference(lead, fin, fout, r, mini_r, p, monkeypatch, matmul_precision):
    matmul_precision("highest")
    x, w, b, block, key, grad = make_linear_inputs(lead, fin, fout, r, mini_r, p)
    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    y, dx, dblock, fw, bw = run_linear(x, w, b, block, p, key, grad)
    monkeypatch.setenv("MISS_EXT_GEMM", "fp32")
    y32, dx32, dblock32, fw32, bw32 = run_linear(x, w, b, block, p, key, grad)
    rows = x.numel() // fin
    if rows:  # the path taken: split cuts its operands by miss.split_bf16, fp32 adds (rows, out) by tile_add_
        assert "miss::split_bf16" in fw and "miss::tile_add_" not in fw, sorted(fw)
        assert "miss::split_bf16" in bw, sorted(bw)
        assert "miss::tile_add_" in fw32 and "miss::split_bf16" not in fw32 | bw32

    # float64 reference with the same dropout mask; the forward with PEFT's rounding (base GEMM
    # rounded to bf16, adapter term exact, one final rounding): one bf16 ulp at most.
    x2 = x.reshape(rows, fin)
    mask = recover_mask(rows, fin, p, key) if p else None
    y_peft = peft_precision_linear_ref(x2, w, b, block, mask, p).reshape(y.shape)
    assert_within_ulp(y, y_peft, "y vs PEFT's rounding")
    # dblock = S^T G (folded along out for mini), S and G exact inputs: fp32 accuracy, as the fp32 path.
    s_ref = fold_ref(x2, r, mask, p)
    g = grad.reshape(rows, fout).to(F64)
    gfull = s_ref.t() @ g
    dblock_ref = gfull if mini_r is None else gfull.reshape(r, fout // mini_r, mini_r).sum(1)
    assert rel_err(dblock, dblock_ref) <= max(4 * rel_err(dblock32, dblock_ref), 1e-6)
    # dx: the base part is the same bf16 GEMM; the adapter part differs by fp32 rounding only.
    xr = x2.to(F64).requires_grad_()
    linear_ref(xr, w, b, block, mask, p).backward(g)
    assert rel_err(dx, xr.grad.reshape(dx.shape)) <= 2 * BF16_ULP
    if rows:
        assert_within_ulp(dx, dx32, "dx split vs fp32")
        assert_within_ulp(y, y32, "y split vs fp32")


def wide_fold_inputs():
    """bf16 x whose folds need more than 16 significant bits (values over 24 binary orders of
    magnitude, 64 per shard column), so two bf16 parts of S lose bits that three keep."""
    x = (torch.randn(64, 1024) * torch.exp2(torch.randint(-12, 12, (64, 1024)).float())).bfloat16()
    return x, torch.randn(80, 1024).bfloat16(), torch.randn(16, 80), torch.randn(64, 80).bfloat16()


def test_split_follows_the_float32_matmul_precision(monkeypatch, matmul_precision):
    """highest (ieee): three bf16 parts, fp32-accurate; high and medium (tf32 on CUDA): two parts,
    below 2^-16. The block gradient shows it: S^T G with S in fp32 and G exact in bf16."""
    x, w, block, grad = wide_fold_inputs()
    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    dblock_ref = fold_ref(x, 16).t() @ grad.to(F64)
    errors = {}
    for precision in ("highest", "high", "medium"):
        matmul_precision(precision)
        errors[precision] = rel_err(run_linear(x, w, None, block, 0.0, None, grad)[2], dblock_ref)
    assert errors["highest"] < 1e-6, errors
    for two_parts in ("high", "medium"):  # measured 4e-6 to 8e-6 (seeds 0-4); 2^-16 = 1.5e-5
        assert 1e-6 < errors[two_parts] < 3e-5, errors


NEW_PRECISION_API = """
import sys, torch, miss_ext
from reference import fold_ref
from test_impl_choice import wide_fold_inputs
torch.manual_seed(0)
x, w, block, grad = wide_fold_inputs()
block.requires_grad_()
ref = fold_ref(x, 16).t() @ grad.double()
for setting in ("ieee", "tf32"):
    torch.backends.cuda.matmul.fp32_precision = setting  # the newer API; legacy getters then raise
    block.grad = None
    torch.ops.miss.linear(x, w, None, block, 0.0, None).backward(grad)
    print(setting, ((block.grad.double() - ref).abs().max() / ref.abs().max()).item())
"""


def test_split_follows_the_newer_precision_api():
    """torch.backends.cuda.matmul.fp32_precision ("ieee", "tf32") sets the parts too, and mixing
    it with the legacy API raises nothing (torch's legacy getter would). In a child process: the
    mix would leave this one's legacy getters raising."""
    env = dict(os.environ, MISS_EXT_GEMM="split", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", NEW_PRECISION_API], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    errors = {line.split()[0]: float(line.split()[1]) for line in out.stdout.split("\n") if line.strip()}
    assert errors["ieee"] < 1e-6, errors
    assert 1e-6 < errors["tf32"] < 3e-5, errors  # two parts: the setting was honoured


def test_split_is_not_used_for_a_recorded_backward(monkeypatch):
    """create_graph=True records the backward, and the split products have no derivative: the
    fp32 path is taken there, and second derivatives equal the fp32 path's."""
    x, w, b, block, key, grad = make_linear_inputs((6,), 12, 10, 4, None, 0.0)
    results = []
    for choice in ("split", "fp32"):
        monkeypatch.setenv("MISS_EXT_GEMM", choice)
        xr = x.detach().requires_grad_()
        br = block.detach().requires_grad_()
        y = ops.linear(xr, w, b, br, 0.0, None)
        out = {}
        names = op_names(lambda: out.update(gx=torch.autograd.grad(y, xr, grad, create_graph=True)[0]))
        assert "miss::split_bf16" not in names, sorted(names)  # the fp32 path, whatever was asked
        (gb,) = torch.autograd.grad(out["gx"].float().square().sum(), br)
        results.append((out["gx"].detach(), gb))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_split_stays_exact_under_torch_compile(monkeypatch, matmul_precision, dynamo_reset):
    """Inductor keeps bf16 intermediates in fp32, so parts cut by rounding through bf16 would
    collapse to one (t - float(bf16(t)) folded to 0): a training step compiled with Inductor must
    be as accurate as eager. Compile caches off: a cached graph would carry another test's choice."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    matmul_precision("highest")
    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    x, w, b, block, key, grad = make_linear_inputs((24,), 64, 48, 8, None, 0.0)

    def step(x, w, b, block, grad):
        y = ops.linear(x, w, b, block, 0.0, None)
        y.backward(grad)
        return y

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        # The split path is what AOTAutograd traced (miss.split_bf16 in the forward and backward graphs) ...
        torch.compile(step, backend=aot_autograd(fw_compiler=record, bw_compiler=record))(
            x, w, b, block.clone().requires_grad_(), grad)
        targets = [{str(n.target) for n in g.graph.nodes} for g in graphs]
        assert len(targets) == 2 and all("miss.split_bf16.default" in ts for ts in targets), targets
        # ... and Inductor keeps its arithmetic exact.
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="inductor", fullgraph=False)
        br = block.clone().requires_grad_()
        y = compiled(x, w, b, br, grad)
    dblock_ref = fold_ref(x, 8).t() @ grad.to(F64)
    assert rel_err(br.grad, dblock_ref) < 1e-6  # one part would give ~1e-3
    assert_within_ulp(y.detach(), peft_precision_linear_ref(x, w, b, block), "compiled y")


def test_auto_keeps_the_fp32_path_on_the_cpu(monkeypatch):
    monkeypatch.delenv("MISS_EXT_GEMM", raising=False)
    x, w, b, block, key, grad = make_linear_inputs((8,), 16, 24, 4, None, 0.0)
    fw = run_linear(x, w, b, block, 0.0, None, grad)[3]
    assert "miss::tile_add_" in fw and "miss::split_bf16" not in fw


def test_other_dtypes_never_take_the_split_path(monkeypatch):
    """fp32 and fp16 layers, and a bf16 block, keep their own GEMMs even when split is asked for."""
    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    for xdt, bdt in ((torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        x = torch.randn(8, 16, dtype=xdt)
        w = torch.randn(24, 16, dtype=xdt)
        block = torch.randn(4, 24, dtype=bdt)
        fw = op_names(lambda: ops.linear(x, w, None, block, 0.0, None))
        assert "miss::split_bf16" not in fw, (xdt, bdt)


def _graph_ops(gm):
    """The ops a traced graph calls, the mutable ops inside auto_functionalized nodes included."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        names.append(str(node.target))
        if "auto_functionalized" in str(node.target):
            names.append(str(node.args[0]))
    return names


def test_split_add_is_one_op_in_traced_graphs(monkeypatch, dynamo_reset):
    """The split path's y += S D is miss.split_addmm_ (miss.split_addmm where nothing may be updated
    in place), never a plain aten.addmm: that op has cuBLAS reduce split-K parts in fp32 when the
    graph runs (split_gemm.cpp, Fp32SplitKReduction). With aten.addmm in the graph (before
    2026-12-04) the guard ran at trace time only, and a compiled step kept torch's bf16 reduction."""
    from torch._dynamo.backends.common import aot_autograd
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    x = torch.randn(12, 8).bfloat16().requires_grad_(True)
    w = torch.randn(6, 8).bfloat16()
    block = torch.randn(16, 6, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm

    compiled = torch.compile(lambda *a: ops.linear(*a), backend=aot_autograd(fw_compiler=record), fullgraph=True)
    y = compiled(x, w, None, block, 0.0, None)
    torch.testing.assert_close(y, ops.linear(x, w, None, block, 0.0, None), rtol=0, atol=0)
    forward = graphs[0]
    assert "miss.split_addmm_.default" in forward and not any("aten.addmm" in n for n in forward), forward
    traced = _graph_ops(make_fx(lambda *a: ops.linear(*a))(x.detach(), w, None, block.detach(), 0.0, None))
    assert "miss.split_addmm_.default" in traced and not any("aten.addmm" in n for n in traced), traced


def test_split_addmm_ops_refuse_bad_arguments_by_name():
    bf = dict(dtype=torch.bfloat16)
    y, a, b = torch.zeros(2, 3, **bf), torch.zeros(2, 4, **bf), torch.zeros(4, 3, **bf)
    torch.testing.assert_close(ops.split_addmm(y, a, b), y)
    with pytest.raises(ValueError, match="y, a and b must be bfloat16 .* got Float, BFloat16 and BFloat16"):
        ops.split_addmm(y.float(), a, b)
    with pytest.raises(ValueError, match=r"y \[2, 3\] != a \[2, 4\] @ b \[5, 3\]"):
        ops.split_addmm_(y, a, torch.zeros(5, 3, **bf))
    with pytest.raises(ValueError, match="must be matrices, got 1-D"):
        ops.split_addmm(y[0], a, b)
    with pytest.raises(RuntimeError, match="op without autograd support .* differentiable miss::linear"):
        ops.split_addmm(y, a.requires_grad_(True), b)
    with pytest.raises(ValueError, match="split_addmm_ a (overlaps|is a view of) y"):
        ops.split_addmm_(y[:, :2], y[:, :2], torch.zeros(2, 2, **bf))
    assert torch.equal(y, torch.zeros(2, 3, **bf))


@pytest.mark.parametrize("where", ["block", "x", "weight"])
def test_split_products_are_non_finite_exactly_where_the_float32_ones_are(where, monkeypatch):
    """An inf in a split operand comes out as NaN, not inf: its bf16 head is inf and the other
    part's zero remainders multiply it (inf * 0). A documented difference (common/bf16_parts.h); what
    this pins is that the split path makes non-finite exactly the outputs and gradients the
    float32 path (PEFT's arithmetic) makes non-finite, no more and no fewer."""
    x, w, b, block, key, grad = make_linear_inputs((6,), 16, 24, 4, None, 0.0)
    x = x.abs()  # positive folds: no inf - inf in the exact arithmetic either
    if where == "block":
        block[1, 5] = float("inf")
    elif where == "x":
        x[2, 3] = float("inf")
    else:  # W' of bat: here the base weight, whose inf reaches only the base GEMM
        w[7, 2] = float("inf")
    monkeypatch.setenv("MISS_EXT_GEMM", "split")
    split = run_linear(x, w, b, block, 0.0, None, grad)
    monkeypatch.setenv("MISS_EXT_GEMM", "fp32")
    fp32 = run_linear(x, w, b, block, 0.0, None, grad)
    assert "miss::split_bf16" in split[3] and "miss::split_bf16" not in fp32[3]  # the paths asked for
    for name, a, e in zip(["y", "dx", "dblock"], split[:3], fp32[:3]):
        assert not torch.isfinite(e).all() or name != "y", "the case makes y non-finite"
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{where}: {name} non-finite elsewhere"
        finite = torch.isfinite(e)
        assert torch.allclose(a[finite].float(), e[finite].float(), rtol=1e-2, atol=1e-2), f"{where}: {name}"


CPU_ISA_TESTS = "(transform or bat_weight_forward or unmerge_matches or matches_per_row or dtypes or strided) and not cuda"


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_cpu_instruction_set_version_matches_the_reference(isa):
    """The hand-tiled float32 loops (bat transform tiles, bank block products) have one version per
    instruction set with its own vector width (cpu/cpu_clones.h), picked once per process, so a
    process only ever runs one: the bat transform and bank tests run again in a child with
    MISS_EXT_CPU_ISA capping the choice (the AVX2 version was 4-5x slow once, the SSE one 2x: the
    widths differ by version, and so do the tile and tail loops' steps). A cap above what the CPU
    has runs the best it has."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, MISS_EXT_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                          os.path.join(here, "test_bat.py"), os.path.join(here, "test_bank.py"), "-k", CPU_ISA_TESTS],
                         env=env, capture_output=True, text=True, timeout=600, cwd=here)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_an_unknown_cpu_isa_raises_naming_it():
    env = dict(os.environ, MISS_EXT_CPU_ISA="avx3", PYTHONPATH=os.pathsep.join(sys.path))
    code = "import torch, miss_ext; torch.ops.miss.bat_weight(torch.randn(32, 32), torch.zeros(2, 16, 16))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "ValueError: miss: environment variable MISS_EXT_CPU_ISA must be one of auto, baseline, avx2, avx512; " \
           "got 'avx3'" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("variable,value,call", [
    ("MISS_EXT_GEMM", "fast",
     lambda: ops.linear(torch.randn(4, 8).bfloat16(), torch.randn(6, 8).bfloat16(), None, torch.randn(2, 6), 0.0, None)),
    ("MISS_EXT_BAT_TRANSFORM", "gpu", lambda: ops.bat_weight(torch.randn(8, 8), torch.zeros(4, 2, 2), None)),
])
def test_an_unknown_choice_raises_naming_it(variable, value, call, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=rf"{variable}.*'{value}'"):
        call()


# ----------------------------------------------------------------------------------------------
# bat: the batched GEMM against the kernel and the float64 reference
# ----------------------------------------------------------------------------------------------
def uses_bat_gemm(names) -> bool:
    """The bat transform ran as a batched GEMM (bat_gemm.cpp)."""
    return "aten::bmm" in set(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bat_gemm_matches_the_kernel_and_the_reference(dtype, monkeypatch):
    r, fout, fin = 4, 12, 20
    w = torch.randn(fout, fin, dtype=dtype)
    block = torch.randn(fout // r, r, r) * 0.1
    results = {}
    for choice in ("kernel", "gemm"):
        monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", choice)
        out = {}
        names = op_names(lambda: out.update(w=ops.bat_weight(w, block, None)))
        assert uses_bat_gemm(names) == (choice == "gemm"), sorted(names)
        results[choice] = out["w"]
    ref = bat_weight_ref(w, block)
    for choice, wp in results.items():
        assert wp.dtype == torch.float32  # the block's dtype (computed in float64 for a float64 weight)
        assert rel_err(wp, ref) <= 2e-6, choice
    monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", "gemm")
    if dtype == torch.float64:  # float64 throughout
        assert rel_err(ops.bat_weight(w, block.double(), None), ref) <= 1e-13
    # the GEMM's output rounded once to a half-precision compute dtype
    monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", "gemm")
    wp16 = ops.bat_weight(w, block, torch.bfloat16)
    assert wp16.dtype == torch.bfloat16
    assert_within_ulp(wp16, ref, "bf16 W'")


@pytest.mark.parametrize("contiguous", [True, False])
def test_bat_gemm_merges_and_unmerges_in_place(contiguous, monkeypatch):
    monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", "gemm")
    r = 4
    w0 = torch.randn(16, 24) if contiguous else torch.randn(24, 16).t()
    block = torch.randn(4, r, r) * 0.1
    w = w0.clone()
    assert uses_bat_gemm(op_names(lambda: ops.merge_(w, block, False)))  # the GEMM, as asked
    assert rel_err(w, bat_weight_ref(w0, block)) <= 2e-6
    ops.merge_(w, block, True)
    assert rel_err(w, w0) <= 1e-5
    assert w.stride() == w0.stride()


def test_bat_linear_gradients_with_the_gemm(monkeypatch):
    x = torch.randn(7, 12, dtype=F64, requires_grad=True)
    w = torch.randn(8, 12, dtype=F64, requires_grad=True)
    block = (torch.randn(2, 4, 4, dtype=F64) * 0.1).requires_grad_()
    monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", "gemm")
    names = op_names(lambda: torch.autograd.gradcheck(lambda *a: ops.bat_linear(*a, None), (x, w, None, block)))
    assert uses_bat_gemm(names), sorted(names)


@pytest.mark.parametrize("lead,bias", [((11,), True), ((2, 5), False), ((0,), True)])
def test_bat_linear_split_matches_the_float64_reference(lead, bias, monkeypatch, matmul_precision):
    """A bf16 bat layer at PEFT's precision (fp32 block, so W' and the GEMM in fp32): with
    MISS_EXT_GEMM=split, x W'^T and every gradient product run on bf16 parts; as accurate as the
    fp32 path."""
    matmul_precision("highest")
    r, fout, fin = 4, 16, 24
    x = torch.randn(*lead, fin).bfloat16()
    w = (torch.randn(fout, fin) / fin ** 0.5).bfloat16()
    b = torch.randn(fout).bfloat16() if bias else None
    block = torch.randn(fout // r, r, r) * 0.1
    grad = torch.randn(*lead, fout).bfloat16()
    results = {}
    for choice in ("split", "fp32"):
        monkeypatch.setenv("MISS_EXT_GEMM", choice)
        xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), block.clone().requires_grad_()
        out = {}
        fw = op_names(lambda: out.update(y=ops.bat_linear(xr, wr, b, br, None)))
        bw = op_names(lambda: out["y"].backward(grad))
        if x.numel():
            assert ("miss::split_bf16" in fw and "miss::split_bf16" in bw) == (choice == "split"), (choice, sorted(fw), sorted(bw))
        results[choice] = (out["y"], xr.grad, wr.grad, br.grad)
    # float64 reference: y = x W'^T + b, gradients by autograd
    x64, w64, b64 = x.to(F64).requires_grad_(), w.to(F64).requires_grad_(), block.to(F64).requires_grad_()
    y64 = x64 @ bat_weight_ref(w64, b64).t() + (b.to(F64) if bias else 0)
    y64.backward(grad.to(F64))
    for name, got, fp32, want in zip(("y", "dx", "dW", "dblock"), results["split"], results["fp32"],
                                     (y64.detach(), x64.grad, w64.grad, b64.grad)):
        if name in ("y", "dx", "dW"):  # rounded once to bf16
            assert_within_ulp(got, want, name)
            assert_within_ulp(got, fp32, name + " split vs fp32")
        else:
            assert rel_err(got, want) <= max(4 * rel_err(fp32, want), 1e-6), name


# ----------------------------------------------------------------------------------------------
# a GPU: "auto" takes the split and GEMM paths there, and agrees with the CPU
# ----------------------------------------------------------------------------------------------


# Decode-like shapes (few rows, a long inner dimension r * pairs in the split GEMM) where cuBLAS may
# pick split-K, whose partial sums torch lets it reduce in bf16 by default
# (torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction): the forward's "one rounding"
# must hold there too (a suspicion of the 2026-12-03 CUDA review, to be settled on a GPU).
GPU_DECODE_CASES = [((1,), 4096, 4096, 64, None, 0.0), ((16,), 4096, 4096, 1024, None, 0.0),
                    ((8,), 11008, 4096, 256, None, 0.0)]


@needs_gpu
@pytest.mark.parametrize("lead,fin,fout,r,mini_r,p", CASES + GPU_DECODE_CASES)
def test_cuda_auto_linear_matches_the_cpu(lead, fin, fout, r, mini_r, p, monkeypatch, matmul_precision):
    matmul_precision("highest")
    monkeypatch.delenv("MISS_EXT_GEMM", raising=False)
    x, w, b, block, key, grad = make_linear_inputs(lead, fin, fout, r, mini_r, p)
    y, dx, dblock, fw, _ = run_linear(x, w, b, block, p, key, grad)
    cuda = [t.cuda() if t is not None else None for t in (x, w, b, block, key, grad)]
    yc, dxc, dblockc, fwc, _ = run_linear(*cuda[:4], p, cuda[4], cuda[5])
    if x.numel():
        assert ("miss::split_bf16" in fwc) == (mini_r is None), sorted(fwc)  # split for the default mode
    # y against PEFT's rounding on CUDA's own base GEMM (CPU and CUDA GEMMs may round the base part
    # one ulp apart); dx within one ulp of the base part g W (rounded to bf16 on its own, maybe one
    # ulp apart on the two devices) plus two ulps of dx (the sum's rounding).
    rows = x.numel() // fin
    mask = recover_mask(rows, fin, p, key) if p else None
    y_peft = peft_precision_linear_ref(cuda[0].reshape(rows, fin), cuda[1], cuda[2], cuda[3],
                                       mask.cuda() if mask is not None else None, p)
    assert_within_ulp(yc.reshape(rows, fout), y_peft, "y cuda vs PEFT's rounding")
    base_dx = grad.to(F64) @ w.to(F64)
    assert_within_ulp(dxc.cpu(), dx, "dx cuda vs cpu", ulps=2, rounded_part=base_dx)
    assert rel_err(dblockc.cpu(), dblock) <= 1e-5


@needs_gpu
def test_cuda_auto_bat_uses_the_gemm_and_matches_the_cpu(monkeypatch, matmul_precision):
    matmul_precision("highest")  # no TF32 in the GEMM
    monkeypatch.delenv("MISS_EXT_BAT_TRANSFORM", raising=False)
    w = torch.randn(64, 96)
    block = torch.randn(8, 8, 8) * 0.1
    out = {}
    names = op_names(lambda: out.update(w=ops.bat_weight(w.cuda(), block.cuda(), None)))
    assert uses_bat_gemm(names), sorted(names)
    assert rel_err(out["w"].cpu(), bat_weight_ref(w, block)) <= 1e-5


# compute-sanitizer and the profiler's CUPTI do not mix: gpu_check.sh sets this for its memcheck run.
PROFILE_KERNELS = not os.environ.get("MISS_EXT_TEST_NO_PROFILER")


class CudaKernels:
    """The CUDA kernels launched inside the block, from the profiler (demangled names such as
    "void miss_ext::(anonymous namespace)::fold_kernel<c10::BFloat16, float, 8, false>(...)")."""

    def __enter__(self):
        self.prof = profile(activities=[ProfilerActivity.CUDA]) if PROFILE_KERNELS else None
        if self.prof is not None:
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(*exc)

    def ran(self, kernel):
        """Whether `kernel` ran (always true when not profiling)."""
        return self.prof is None or any(f"::{kernel}<" in e.name for e in self.prof.events())

    def names(self):
        return set() if self.prof is None else {e.name for e in self.prof.events()}


LAYOUTS = ["contiguous", "misaligned", "strided"]


def laid_out(buf, rows, cols, layout):
    """A (rows, cols) view of buf (which holds 2 * rows * cols + 1 elements): contiguous, at storage
    offset 1 (not aligned for vector loads), or every other column (not contiguous)."""
    if layout == "strided":
        return buf[:2 * rows * cols].view(rows, 2 * cols)[:, ::2]
    return buf[1:rows * cols + 1].view(rows, cols) if layout == "misaligned" else buf[:rows * cols].view(rows, cols)


# (rows, in, r): r below, at and above a vector's width, r = 32 and 256 vectors' worth, r > in,
# in not a multiple of the vector width (scalar loads), a single row, many rows.
FOLD_SHAPES = [(5, 64, 1), (7, 96, 2), (9, 200, 4), (33, 256, 8), (12, 4096, 64), (3, 512, 256), (4, 8, 64),
               (6, 100, 16), (1, 4096, 32), (4000, 128, 64)]


@needs_gpu
@pytest.mark.parametrize("kernel", ["columns", "rows", "warp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_fold_kernels_match_the_cpu(kernel, dtype, p, layout, monkeypatch):
    """Every CUDA fold kernel that MISS_EXT_FOLD_KERNEL can force, against the CPU kernel with the
    same dropout key, on contiguous, misaligned (storage offset 1) and strided x; the kernel that
    ran is read from the profiler's CUDA kernel names."""
    monkeypatch.setenv("MISS_EXT_FOLD_KERNEL", kernel)
    with CudaKernels() as kernels:  # one profiler session: each costs time
        checks = [_fold_on_both(rows, fin, r, dtype, p, layout) for rows, fin, r in FOLD_SHAPES]
    for (rows, fin, r), (got, want, scale) in zip(FOLD_SHAPES, checks):
        assert fold_within(got.cpu(), want, scale, rtol=1e-5), (rows, fin, r)
    expected = {"columns": "fold_kernel", "rows": "fold_rows_kernel", "warp": "fold_warp_kernel"}[kernel]
    assert kernels.ran(expected), kernels.names()


@needs_gpu
@pytest.mark.parametrize("dtype,rows,expected", [
    (torch.bfloat16, 8192, "fold_warp_kernel"), (torch.float16, 2048, "fold_warp_kernel"),
    (torch.bfloat16, 2047, "fold_rows_kernel"), (torch.bfloat16, 16, "fold_rows_kernel"),
    (torch.float32, 8192, "fold_rows_kernel")], ids=str)
def test_cuda_fold_auto_picks_by_dtype_and_rows(dtype, rows, expected, monkeypatch):
    """"auto" (shard_kernels.cu, launch_fold): the warp kernel for 2-byte x with at least 2048 rows
    (measured faster on an H200 there), the rows kernel for fewer rows and for fp32 (r=64)."""
    monkeypatch.delenv("MISS_EXT_FOLD_KERNEL", raising=False)
    with CudaKernels() as kernels:
        got, want, scale = _fold_on_both(rows, 4096, 64, dtype, 0.0, "contiguous")
    assert fold_within(got.cpu(), want, scale, rtol=1e-5)
    assert kernels.ran(expected), kernels.names()


def _fold_on_both(rows, fin, r, dtype, p, layout):
    """(CUDA fold, CPU fold, sum of |terms| per output) of one random x, with the same key."""
    buf = torch.randn(2 * rows * fin + 1, dtype=torch.float64).to(dtype)
    x = laid_out(buf, rows, fin, layout)
    key = miss_ext.new_dropout_key("cpu") if p else None
    out_dtype = torch.float32 if dtype != torch.float64 else dtype
    want = ops.fold(x, r, p, key, out_dtype)
    got = ops.fold(laid_out(buf.cuda(), rows, fin, layout), r, p, key.cuda() if key is not None else None, out_dtype)
    return got, want, fold_error_scale(x, r, p)


# (rows, cols, src rows, src cols): the linear's dx (src per row, q = r), mini's forward (q = mini_r
# not a multiple of a vector), merge (src rows tile out's rows), odd columns (scalar loads), rows
# beyond one grid's reach (the 2-D kernel's row loop), one row; and for the 2-D kernel's source row,
# kept by additions: 7 source rows wrapping under a row step of 16, 3 under a step that is a
# multiple of 3, and 1.
TILE_SHAPES = [(37, 96, 37, 16), (33, 120, 33, 20), (64, 48, 8, 12), (9, 27, 9, 5), (600_000, 8, 600_000, 4),
               (1, 4096, 1, 64), (100, 48, 7, 12), (600_000, 8, 3, 4), (50, 16, 1, 4)]


@needs_gpu
@pytest.mark.parametrize("kernel", ["flat", "grid2d"])
@pytest.mark.parametrize("dtype,src_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_tile_add_kernels_match_the_cpu(kernel, dtype, src_dtype, p, layout, monkeypatch):
    """Every CUDA tile_add kernel that MISS_EXT_TILE_ADD_KERNEL can force, against the CPU kernel
    with the same key and alpha, into a contiguous, misaligned or strided out (in place: the strided
    columns in between must keep their values); the kernel that ran is read from the profiler."""
    monkeypatch.setenv("MISS_EXT_TILE_ADD_KERNEL", kernel)
    checks = []
    with CudaKernels() as kernels:
        for rows, cols, prow, q in TILE_SHAPES:
            buf = torch.randn(2 * rows * cols + 1, dtype=torch.float64).to(dtype)
            src = torch.randn(prow, q, dtype=torch.float64).to(src_dtype)
            key = miss_ext.new_dropout_key("cpu") if p and prow == rows else None
            pp = p if key is not None else 0.0  # dropout is for per-row sources (tile_add's contract)
            want_buf = buf.clone()
            ops.tile_add_(laid_out(want_buf, rows, cols, layout), src, -0.5, pp, key)
            got_buf = buf.cuda()
            ops.tile_add_(laid_out(got_buf, rows, cols, layout), src.cuda(), -0.5, pp,
                          key.cuda() if key is not None else None)
            checks.append((got_buf, want_buf))
    tol = TILE_ADD_TOL[dtype]
    for (rows, cols, prow, q), (got, want) in zip(TILE_SHAPES, checks):
        assert torch.allclose(got.cpu(), want, rtol=tol, atol=4 * tol), (rows, cols, prow, q)
    assert kernels.ran({"flat": "tile_add_kernel", "grid2d": "tile_add_2d_kernel"}[kernel]), kernels.names()


@needs_gpu
@pytest.mark.parametrize("dtype,rows,src_rows,expected", [
    (torch.bfloat16, 8192, 8192, "tile_add_2d_kernel"), (torch.float16, 2048, 2048, "tile_add_2d_kernel"),
    (torch.bfloat16, 2047, 2047, "tile_add_kernel"), (torch.bfloat16, 8192, 64, "tile_add_kernel"),
    (torch.float32, 8192, 8192, "tile_add_kernel")], ids=str)
def test_cuda_tile_add_auto_picks_by_dtype_and_rows(dtype, rows, src_rows, expected, monkeypatch):
    """"auto" (shard_kernels.cu, launch_tile_add): the 2-D kernel for a 2-byte out with one source
    row per row and at least 2048 rows (measured faster on an H200 there), the flat one elsewhere."""
    monkeypatch.delenv("MISS_EXT_TILE_ADD_KERNEL", raising=False)
    out = torch.randn(rows, 512, dtype=torch.float64).to(dtype)
    src = torch.randn(src_rows, 64)
    want = out.clone()
    ops.tile_add_(want, src, -0.5, 0.0, None)
    with CudaKernels() as kernels:
        got = out.cuda()
        ops.tile_add_(got, src.cuda(), -0.5, 0.0, None)
    tol = TILE_ADD_TOL[dtype]
    assert torch.allclose(got.cpu(), want, rtol=tol, atol=4 * tol)
    assert kernels.ran(expected), kernels.names()


@needs_gpu
def test_cuda_auto_bat_linear_matches_the_cpu(monkeypatch, matmul_precision):
    """bf16 bat layer, fp32 block: CUDA's "auto" (W' by the batched GEMM, products on bf16 parts)
    against the CPU's (kernel, fp32 GEMMs)."""
    matmul_precision("highest")
    monkeypatch.delenv("MISS_EXT_GEMM", raising=False)
    monkeypatch.delenv("MISS_EXT_BAT_TRANSFORM", raising=False)
    x = torch.randn(37, 96).bfloat16()
    w = (torch.randn(64, 96) / 10).bfloat16()
    b = torch.randn(64).bfloat16()
    block = torch.randn(8, 8, 8) * 0.1
    grad = torch.randn(37, 64).bfloat16()
    results = []
    for device in ("cpu", "cuda"):
        # detach first: t.to("cuda") of a tensor that the CPU pass made require grad is a non-leaf,
        # whose .grad stays None
        xr, wr, br = (t.detach().to(device).requires_grad_() for t in (x, w, block))
        out = {}
        names = op_names(lambda: out.update(y=ops.bat_linear(xr, wr, b.to(device), br, None)))
        out["y"].backward(grad.to(device))
        if device == "cuda":
            assert "miss::split_bf16" in names and uses_bat_gemm(names), sorted(names)
        results.append([t.detach().cpu() for t in (out["y"], xr.grad, wr.grad, br.grad)])
    for name, got, want in zip(("y", "dx", "dW"), results[1][:3], results[0][:3]):
        assert_within_ulp(got, want, name)
    assert rel_err(results[1][3], results[0][3]) <= 1e-5


# ---- from a mutation test of the host-side C++ (2026-12-06): each kills a mutant that passed the suite ----

# M39 (impl_choice.cpp read_choice: exact match loosened to a prefix match). The existing cases
# ("fast", "gpu", "avx3") share no prefix with an option, so a parser that accepts "splitt" passed.
@pytest.mark.parametrize("variable,value,call", [
    ("MISS_EXT_GEMM", value,
     lambda: ops.linear(torch.randn(4, 8).bfloat16(), torch.randn(6, 8).bfloat16(), None, torch.randn(2, 6), 0.0, None))
    for value in ("splitt", "split ", "Split", "fp32x", "autox")
] + [("MISS_EXT_BAT_TRANSFORM", value, lambda: ops.bat_weight(torch.randn(8, 8), torch.zeros(4, 2, 2), None))
     for value in ("gemm2", "kernels", "Kernel")])
def test_a_choice_with_a_typo_is_refused(variable, value, call, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=rf"{variable} must be one of .*got '{value}'"):
        call()

# M49 (bat.cpp pick_bat_kernel: auto picks the batched GEMM on the CPU for a new W'). Only the
# explicit choices were checked; "auto" on the CPU must keep the kernel (no W-sized product).
def test_auto_bat_transform_keeps_the_kernel_on_the_cpu(monkeypatch):
    monkeypatch.delenv("MISS_EXT_BAT_TRANSFORM", raising=False)
    w, block = torch.randn(12, 20), torch.randn(3, 4, 4) * 0.1
    x = torch.randn(5, 20)
    for call in (lambda: ops.bat_weight(w, block, None), lambda: ops.bat_linear(x, w, None, block),
                 lambda: ops.merge(w, block), lambda: ops.merge_(w.clone(), block)):
        names = op_names(call)
        assert not uses_bat_gemm(names), sorted(names)
