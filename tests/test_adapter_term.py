"""MISS_EXT_ADAPTER_TERM (csrc/ops/impl_choice.h, linear.cpp): where miss.linear's adapter term meets
the base GEMM's output (issue 11).

- "after" (what "auto" takes): the base GEMM writes y (and dx), then the term is added in place,
  PEFT's order of roundings.
- "before": the term (with the bias) is written first, rounded to the output dtype, and the base
  GEMM adds its product onto it (beta = 1): one pass over (rows, out) fewer, a write instead of a
  read and a write. dx keeps "after" with dropout, with in % r != 0 and in a recorded backward.

Both orders round each term once and the sum once. These tests check "before" against float64
references on the CPU (its arithmetic is the GPU's but for cuBLAS itself), that it is the path
taken (profiler op names, so a test cannot pass on "after"), that autograd, a recorded backward,
opcheck and torch.compile see it, and, on a GPU, that CUDA's result is as accurate.
"""
import pytest
import torch

from conftest import assert_within_ulp, needs_gpu
from reference import fold_ref, linear_ref, recover_mask, tile_block
from test_base_modules import OpNames
from test_impl_choice import CASES, make_linear_inputs, matmul_precision, op_names, run_linear  # noqa: F401 (a fixture)

ops = torch.ops.miss
F64 = torch.float64


def dx_eligible(fin, r, p):
    return p == 0.0 and fin % r == 0


def assert_before_path(fw, bw, fin, r, p, what=""):
    """The forward wrote the term and let the base GEMM add onto it in place (no aten::linear, no
    add after it); the backward's dx did the same (no tile_add_) exactly where it may."""
    assert "aten::addmm_" in fw and "aten::linear" not in fw, (what, sorted(fw))
    assert not {"miss::tile_add_", "miss::split_addmm_"} & fw, (what, sorted(fw))
    assert ("miss::tile_add_" in bw) != dx_eligible(fin, r, p), (what, sorted(bw))


def references(x, w, b, block, p, key, grad):
    """float64 y, the float64 term added to the base product (bias + S D), dx, and dx's base part G W."""
    fin, fout, r = w.shape[1], w.shape[0], block.shape[0]
    rows = x.numel() // fin
    x2 = x.reshape(rows, fin)
    mask = recover_mask(rows, fin, p, key) if p else None
    term = fold_ref(x2, r, mask, p) @ tile_block(block.to(F64), fout)
    if b is not None:
        term = term + b.to(F64)
    xr = x2.to(F64).requires_grad_()
    y = linear_ref(xr, w, b, block, mask, p)
    g = grad.reshape(rows, fout).to(F64)
    y.backward(g)
    return y.detach(), term, xr.grad, g @ w.to(F64)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gemm", ["fp32", "split"])
@pytest.mark.parametrize("lead,fin,fout,r,mini_r,p", CASES)
def test_before_matches_the_float64_reference(lead, fin, fout, r, mini_r, p, gemm, bias, monkeypatch):
    x, w, b, block, key, grad = make_linear_inputs(lead, fin, fout, r, mini_r, p)
    b = b if bias else None
    monkeypatch.setenv("MISS_EXT_GEMM", gemm)
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "after")
    y_a, dx_a, dblock_a, fw_a, bw_a = run_linear(x, w, b, block, p, key, grad)
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    y, dx, dblock, fw, bw = run_linear(x, w, b, block, p, key, grad)
    rows = x.numel() // fin
    if rows:
        assert_before_path(fw, bw, fin, r, p)
        assert "aten::linear" in fw_a and "miss::tile_add_" in bw_a, (sorted(fw_a), sorted(bw_a))  # "after"
    y_ref, term, dx_ref, base_dx = references(x, w, b, block, p, key, grad)
    rows_y = y.reshape(rows, fout)
    # "before" rounds the term (with the bias) on its own; mini on the fp32 path with a bias rounds
    # its product first, then the sum with the bias.
    rounded = term.abs()
    if mini_r is not None and b is not None and gemm == "fp32":
        rounded = rounded + (term - b.to(F64)).abs()
    assert_within_ulp(rows_y, y_ref, "y before vs float64", rounded_part=rounded)
    assert_within_ulp(y_a.reshape(rows, fout), y_ref, "y after vs float64", rounded_part=y_ref - term + (
        0 if b is None else b.to(F64)))
    # dx: "before" rounds tile(dS) on its own, "after" G W.
    dx_rows = dx.reshape(rows, fin)
    rounded_dx = (dx_ref - base_dx) if dx_eligible(fin, r, p) else base_dx
    assert_within_ulp(dx_rows, dx_ref, "dx before vs float64", rounded_part=rounded_dx)
    # dD is computed as before, bit for bit.
    torch.testing.assert_close(dblock, dblock_a, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_before_in_other_dtypes(dtype, monkeypatch):
    """A float32 and a float64 layer with a block of their dtype (the term is one addmm), default
    and mini, against float64."""
    for mini_r, bias in ((None, True), (None, False), (6, True), (6, False)):
        x = torch.randn(13, 48).to(dtype)
        w = (torch.randn(36, 48) / 7).to(dtype)
        b = torch.randn(36).to(dtype) if bias else None
        block = torch.randn(8, mini_r or 36).to(dtype)
        grad = torch.randn(13, 36).to(dtype)
        monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
        y, dx, dblock, fw, bw = run_linear(x, w, b, block, 0.0, None, grad)
        assert_before_path(fw, bw, 48, 8, 0.0, (dtype, mini_r, bias))
        y_ref, term, dx_ref, base_dx = references(x, w, b, block, 0.0, None, grad)
        if mini_r is not None and b is not None:  # the product rounded, then its sum with the bias
            term = term.abs() + (term - b.to(F64)).abs()
        # float32's unit with room for its summation orders (2^-20), float64's likewise (2^-48).
        unit = 2.0 ** -20 if dtype == torch.float32 else 2.0 ** -48
        for got, want, part in ((y, y_ref, term), (dx, dx_ref, dx_ref - base_dx)):
            excess = (got.to(F64) - want).abs() - unit * (want.abs() + part.abs()) - unit * want.abs().max()
            assert excess.max().item() <= 0, (dtype, mini_r, excess.max().item())


@pytest.mark.parametrize("dtype,block_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                               (torch.float64, torch.float32), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("mini_r", [None, 4])
def test_before_with_a_block_narrower_than_the_layer_adds_the_bias_in_the_layer_dtype(dtype, block_dtype, mini_r,
                                                                                      monkeypatch):
    """The op takes a block of any floating dtype (autocast casts one). S D is then rounded in the
    block's dtype, as "after" and PEFT do, and the bias is added in the layer's: a review found
    "before" rounding the bias through the block's dtype (a float32 bias of 1000 + 1/3 off by 4.9
    through bf16; 7e4 made inf through float16). Against float64 of the same rounded product."""
    torch.manual_seed(0)
    x = (torch.randn(64, 16) / 8).to(dtype)
    w = (torch.randn(8, 16) / 8).to(dtype)
    block = (torch.randn(4, mini_r or 8) / 8).to(block_dtype)
    for b in ((torch.randn(8) * 1000 + 1 / 3).to(dtype), torch.full((8,), 7e4, dtype=dtype)):
        results = {}
        for order in ("after", "before"):
            monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", order)

            def forward():
                results[order] = ops.linear(x, w, b, block, 0.0, None)

            names = op_names(forward)
            assert ("aten::addmm_" in names) == (order == "before"), (order, sorted(names))
        # The product the op rounds in the block dtype (its fold and mm), then everything in float64.
        product = torch.mm(ops.fold(x, 4, 0.0, None, block_dtype), block).to(F64)
        product = product.repeat(1, 8 // product.shape[1])
        base = x.to(F64) @ w.to(F64).T + b.to(F64)
        want = base + product
        unit = torch.finfo(dtype).eps
        for order, y in results.items():
            assert torch.isfinite(y).all(), order
            # Each order rounds twice in the layer dtype (its two sums; the base GEMM's product a
            # third time in "after", the bias's sum with the product in "before").
            bound = unit * (want.abs() + base.abs() + (product + b.to(F64)).abs()) + unit * want.abs().max()
            excess = (y.to(F64) - want).abs() - bound
            assert excess.max().item() <= 0, (order, excess.max().item())


def test_a_float16_output_keeps_after(monkeypatch):
    """A float16 layer keeps PEFT's order under "before" (forward and dx): a term rounded to float16
    on its own can overflow where the sum is finite (a review: x of ones, weight entries -15000,
    block entries 17500: a term of 70000 over a base of -60000 gave inf, PEFT 10000). Bit for bit
    "after"'s results, and that example finite."""
    x, w, b, block, key, grad = make_linear_inputs((21,), 64, 40, 8, None, 0.0)
    x, w, b, grad = x.half(), w.half(), b.half(), grad.half()
    results = {}
    for order in ("after", "before"):
        monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", order)
        results[order] = run_linear(x, w, b, block.float(), 0.0, None, grad)
        assert "aten::addmm_" not in results[order][3] and "miss::tile_add_" in results[order][4], order
        y = ops.linear(torch.ones(1, 4).half(), torch.full((2, 4), -15000.0).half(), torch.zeros(2).half(),
                       torch.full((2, 2), 17500.0), 0.0, None)
        assert torch.equal(y, torch.full((1, 2), 10000.0).half()), (order, y)
    for a, c in zip(results["after"][:3], results["before"][:3]):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_auto_keeps_the_base_gemm_first(monkeypatch):
    """Until a GPU measures "before", "auto" is "after" on every device: bit for bit its results."""
    x, w, b, block, key, grad = make_linear_inputs((21,), 64, 40, 8, None, 0.0)
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "after")
    after = run_linear(x, w, b, block, 0.0, None, grad)
    monkeypatch.delenv("MISS_EXT_ADAPTER_TERM")
    auto = run_linear(x, w, b, block, 0.0, None, grad)
    for a, c in zip(after[:3], auto[:3]):
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    assert "aten::addmm_" not in auto[3] and "miss::tile_add_" in auto[3] | auto[4]


@pytest.mark.parametrize("mini_r,bias", [(None, True), (5, False), (None, False)])
def test_before_passes_gradcheck_and_gradgradcheck(mini_r, bias, monkeypatch):
    """float64 (no rounding): the reordered sum has the same derivatives, and the recorded backward
    (create_graph: the functional addmm) can be differentiated again."""
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    x = torch.randn(4, 12, dtype=F64, requires_grad=True)
    w = torch.randn(10, 12, dtype=F64, requires_grad=True)
    b = torch.randn(10, dtype=F64, requires_grad=True) if bias else None
    block = torch.randn(3, mini_r or 10, dtype=F64, requires_grad=True)
    args = (x, w, b, block)
    fn = lambda *a: ops.linear(*a, 0.0, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_a_recorded_backward_keeps_dx_after(monkeypatch):
    """create_graph=True: dx is formed after the GEMM (the functional tile_add), as "after" does,
    bit for bit, so the double backward's d/dD is the fp32 path's, not through a rounded tile."""
    x, w, b, block, key, grad = make_linear_inputs((17,), 64, 40, 8, None, 0.0)
    results = {}
    for order in ("after", "before"):
        monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", order)
        xr, br = x.clone().requires_grad_(), block.clone().requires_grad_()
        y = ops.linear(xr, w, b, br, 0.0, None)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            (dx,) = torch.autograd.grad(y, xr, grad, create_graph=True)
        names = {e.name for e in prof.events()}
        assert "miss::tile_add" in names and "aten::repeat" not in names, (order, sorted(names))
        (ddblock,) = torch.autograd.grad(dx.float().square().sum(), br)
        results[order] = (dx.detach(), ddblock)
    for a, c in zip(results["after"], results["before"]):
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_before_passes_opcheck(device, monkeypatch):
    from test_opcheck import linear_samples, run_opcheck

    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    run_opcheck(ops.linear.default, linear_samples(device))


def test_before_is_functional_under_a_dispatch_mode(monkeypatch):
    """Under a Python dispatch mode (selective activation checkpointing's) the composite updates
    nothing in place (common/in_place.h): the functional addmm, same values."""
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    x, w, b, block, key, grad = make_linear_inputs((9,), 32, 24, 8, None, 0.0)
    y_plain = ops.linear(x, w, b, block, 0.0, None)
    mode = OpNames()
    with mode:
        y = ops.linear(x, w, b, block, 0.0, None)
    assert "aten::addmm" in mode.names and "aten::addmm_" not in mode.names, sorted(mode.names)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)


def test_before_under_torch_compile_matches_eager(monkeypatch, dynamo_reset):
    """A compiled forward (fullgraph) of a bf16 layer with an fp32 block under "before": AOTAutograd
    traces the reordered sum (no tile_add or split_addmm in either graph), and Inductor gives
    eager's y and gradients. Compile caches off: a cached graph would carry another test's choice."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    x, w, b, block, key, grad = make_linear_inputs((24,), 64, 48, 8, None, 0.0)

    def forward(x, w, b, block):
        return ops.linear(x, w, b, block, 0.0, None)

    def step(fn, i):
        xr, br = x.clone().requires_grad_(), block.clone().requires_grad_()
        y = fn(xr, w, b, br)
        y.backward(grad)
        return y.detach(), xr.grad, br.grad

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    eager = step(forward, 0)
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        step(torch.compile(forward, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True), 1)
        targets = [{str(n.target) for n in g.graph.nodes} for g in graphs]
        assert len(targets) == 2, targets
        traced = targets[0] | targets[1]
        # miss.linear's composite is traced (its forward and backward ops), so the graphs hold the
        # reordered sum: the GEMM onto the term, the tile of dS repeated, no add after either GEMM.
        assert "aten.addmm.default" in targets[0] and "aten.addmm.default" in targets[1], targets
        assert "aten.repeat.default" in targets[1], targets
        assert not {"miss.tile_add_.default", "miss.tile_add.default", "miss.split_addmm_.default",
                    "miss.split_addmm.default", "miss.linear.default"} & traced, targets
        torch._dynamo.reset()
        compiled = step(torch.compile(forward, backend="inductor", fullgraph=True), 2)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["prefill", "Before", "before ", "afterwards"])
def test_a_bad_adapter_term_choice_is_refused_naming_it(value, monkeypatch):
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", value)
    with pytest.raises(ValueError, match=rf"MISS_EXT_ADAPTER_TERM must be one of auto, after, before; got '{value}'"):
        ops.linear(torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(2, 6), 0.0, None)


@needs_gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead,fin,fout,r,mini_r,p", CASES + [((4096,), 512, 1024, 64, None, 0.0)])
def test_cuda_before_matches_the_float64_reference(lead, fin, fout, r, mini_r, p, bias, monkeypatch, matmul_precision):
    """"auto"'s CUDA paths (the split GEMM for the default mode) under "before", against float64 as
    on the CPU: cuBLAS's beta = 1 epilogue may round G W or x W^T before adding (then within two
    units of the dtype), never more."""
    monkeypatch.delenv("MISS_EXT_GEMM", raising=False)
    monkeypatch.setenv("MISS_EXT_ADAPTER_TERM", "before")
    matmul_precision("highest")
    x, w, b, block, key, grad = make_linear_inputs(lead, fin, fout, r, mini_r, p)
    b = b if bias else None
    cuda = [t.cuda() if t is not None else None for t in (x, w, b, block, key, grad)]
    y, dx, dblock, fw, bw = run_linear(*cuda[:4], p, cuda[4], cuda[5])
    y_ref, term, dx_ref, base_dx = references(x, w, b, block, p, key, grad)
    rows = x.numel() // fin
    if rows:
        assert_before_path(fw, bw, fin, r, p, "cuda")
    base = y_ref - term + (0 if b is None else b.to(F64))  # x W^T + b
    rounded = term.abs() + base.abs()
    if mini_r is not None and b is not None:  # the product rounded, then its sum with the bias
        rounded = rounded + (term - b.to(F64)).abs()
    assert_within_ulp(y.cpu().reshape(rows, fout), y_ref, "y cuda before vs float64", rounded_part=rounded)
    assert_within_ulp(dx.cpu().reshape(rows, fin), dx_ref, "dx cuda before vs float64",
                      rounded_part=(dx_ref - base_dx).abs() + base_dx.abs())
