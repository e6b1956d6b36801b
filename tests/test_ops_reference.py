"""Forward values and every gradient of the `miss` ops against the float64 reference (reference.py).

Shapes: the edge cases of docs/miss.md: in=10/out=20 with r in {2, 3, 4};
the remainder case in=7/out=5/r=3; r > in (8, 6, r=16); r == in; the mini shapes; 1-D, 2-D,
3-D and empty x; float32/float64 and half-precision bases with a float32 block.
"""
import math

import pytest
import torch
import miss_ext
from hypothesis import given, settings, strategies as st

from conftest import CUDA_AVAILABLE, assert_within_ulp, needs_gpu, poison_heap, rand
from reference import (
    F64,
    delta_weight_ref,
    fold_errors_vs_torch_sum,
    fold_matrix,
    fold_ref,
    fold_scatter_ref,
    linear_lora_ref,
    linear_ref,
    merge_ref,
    peft_precision_linear_ref,
    recover_mask,
    tile_add_ref,
)

ops = torch.ops.miss

# (in_features, out_features, r, mini_r); mini_r None = default mode (block (r, out)).
SHAPES = [
    pytest.param(10, 20, 2, None, id="10x20-r2"),
    pytest.param(10, 20, 3, None, id="10x20-r3"),
    pytest.param(10, 20, 4, None, id="10x20-r4"),
    pytest.param(7, 5, 3, None, id="7x5-r3-remainder"),
    pytest.param(8, 6, 16, None, id="8x6-r16-r_gt_in"),
    pytest.param(10, 20, 10, None, id="10x20-r10-r_eq_in"),
    pytest.param(10, 20, 2, 4, id="mini-10x20-r2-m4"),
    pytest.param(10, 20, 3, 5, id="mini-10x20-r3-m5"),
    pytest.param(12, 6, 4, 1, id="mini-12x6-r4-m1"),
    pytest.param(8, 6, 16, 3, id="mini-8x6-r16-m3-r_gt_in"),
]

# Leading sizes of x: 1-D, 2-D, 3-D, and empty batches.
LEADING = [
    pytest.param((), id="1d"),
    pytest.param((5,), id="2d"),
    pytest.param((2, 3), id="3d"),
    pytest.param((0,), id="empty"),
    pytest.param((2, 0), id="empty3d"),
]

# name: (x dtype, block dtype, rtol, atol) against the exact float64 reference. Half bases keep
# a float32 block (PEFT's autocast_adapter_dtype=True); their tolerance covers two roundings of
# values of magnitude ~10 (the base GEMM's and the final one).
DTYPES = {
    "fp32": (torch.float32, torch.float32, 2e-5, 2e-5),
    "fp64": (torch.float64, torch.float64, 1e-11, 1e-11),
    "fp16": (torch.float16, torch.float32, 3e-3, 2e-2),
    "bf16": (torch.bfloat16, torch.float32, 2e-2, 1e-1),
}
DTYPE_PARAMS = [pytest.param(k, id=k) for k in DTYPES]

# Float tolerance of a result stored in `dtype` (one rounding of an fp32/fp64 accumulation).
STORE_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2 ** -10, 1e-4),
    torch.bfloat16: (2 ** -7, 1e-3),
}


def close(actual, expected, rtol, atol, msg=""):
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def f64_leaf(t):
    return None if t is None else t.detach().to(F64).requires_grad_(True)


def block_for(in_f, out_f, r, mini_r, dtype, device):
    return rand(r, out_f if mini_r is None else mini_r, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# reference self-checks (the oracle must be right before anything is compared with it)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
def test_reference_is_self_consistent(in_f, out_f, r, mini_r):
    x = rand(4, in_f, dtype=F64)
    w = rand(out_f, in_f, dtype=F64)
    b = rand(out_f, dtype=F64)
    blk = block_for(in_f, out_f, r, mini_r, F64, "cpu")
    # fold by matrix == fold by scatter == PEFT's pad-reshape-sum
    pad = (-in_f) % r
    peft_fold = torch.nn.functional.pad(x, (0, pad)).reshape(4, -1, r).sum(-2)
    torch.testing.assert_close(fold_ref(x, r), fold_scatter_ref(x, r))
    torch.testing.assert_close(fold_ref(x, r), peft_fold)
    # the shard update == a linear through W + dW (MiSS as a rank-r LoRA)
    torch.testing.assert_close(linear_ref(x, w, b, blk), linear_lora_ref(x, w, b, blk))
    # dW by explicit loops
    dw = torch.empty(out_f, in_f, dtype=F64)
    mr = blk.shape[1]
    for o in range(out_f):
        for i in range(in_f):
            dw[o, i] = blk[i % r, o % mr]
    assert torch.equal(delta_weight_ref(blk, out_f, in_f), dw)
    # autograd of the reference == the spec's explicit backward formulas
    xr, br = x.clone().requires_grad_(True), blk.clone().requires_grad_(True)
    g = rand(4, out_f, dtype=F64)
    gx, gb = torch.autograd.grad(linear_ref(xr, w, b, br), (xr, br), g)
    s = fold_ref(x, r)
    g_folded = g @ fold_matrix(out_f, mr).t()  # (T, mini_r): G folded along out with period mini_r
    torch.testing.assert_close(gb, s.t() @ g_folded)  # dD = S^T G (default), dM = S^T fold(G) (mini)
    d_full = blk[:, torch.arange(out_f) % mr]
    torch.testing.assert_close(gx, g @ w + (g @ d_full.t())[:, torch.arange(in_f) % r])


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------
FOLD_SIZES = [
    pytest.param(10, 2, id="in10-r2"),
    pytest.param(10, 3, id="in10-r3"),
    pytest.param(10, 4, id="in10-r4"),
    pytest.param(7, 3, id="in7-r3"),
    pytest.param(8, 16, id="in8-r16"),
    pytest.param(10, 10, id="in10-r10"),
    pytest.param(12, 4, id="in12-r4"),
    pytest.param(5, 1, id="in5-r1"),
    pytest.param(1, 3, id="in1-r3"),
    pytest.param(37, 5, id="in37-r5"),
]


@pytest.mark.parametrize("in_f,r", FOLD_SIZES)
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_fold_forward_and_backward(device, in_f, r, lead, dtype):
    x = rand(*lead, in_f, dtype=dtype, device=device, requires_grad=True)
    rows = math.prod(lead)
    poison_heap(rows * r, dtype, device)
    s = ops.fold(x, r)
    assert s.dtype == dtype and s.device == x.device
    assert s.shape == (*lead, r)
    close(s, fold_ref(x.detach(), r), *STORE_TOL[dtype], msg="fold forward")
    if r > in_f and rows:
        # shard columns j >= in get no term: exactly zero, not leftovers of the allocation
        assert torch.equal(s[..., in_f:].detach(), torch.zeros_like(s[..., in_f:])), "fold columns >= in not zero"

    g = rand(*lead, r, dtype=dtype, device=device)
    (gx,) = torch.autograd.grad(s, x, g)
    xr = f64_leaf(x)
    (gx_ref,) = torch.autograd.grad(fold_ref(xr, r), xr, g.to(F64))
    assert gx.dtype == dtype and gx.shape == x.shape
    # the adjoint is exact: each element of grad_x is one element of g
    close(gx, gx_ref, 0, 0, msg="fold backward")


@pytest.mark.parametrize("in_f,r", [(65536, 1), (11008, 16), (262144, 4)], ids=["in65536-r1", "in11008-r16", "in262144-r4"])
def test_long_folds_are_as_accurate_as_torch_sum(device, in_f, r):
    """A fold of in/r terms per column: the CPU kernel summed them in one running float32 sum, 3.9e-4
    off (relative) at in=65536, r=1 with x ~ 1000, where PEFT's torch.sum (a cascade) was 1.3e-7.
    Now within 4x of torch.sum's own error against float64 (the CPU sums long folds in a cascade;
    CUDA reduces in a tree)."""
    torch.manual_seed(0)
    x = (1000.0 + torch.rand(4, in_f)).to(device)
    ours, torch_sum = fold_errors_vs_torch_sum(ops.fold(x, r), x, r)
    assert ours <= 4 * torch_sum + 1e-8, f"fold error {ours:.3g}, torch.sum's {torch_sum:.3g}"


@pytest.mark.parametrize("in_f,r", [(1024, 16), (4096, 16), (4096, 64), (11008, 64)])
def test_float32_folds_of_dozens_of_shards_are_as_accurate_as_torch_sum(device, in_f, r):
    """Model-sized folds (64 to 256 shards per column). The CPU kept such sums as one running float32
    sum (a cascade only above 256 shards): 2.3x torch.sum's error at in=4096, r=64 and 4.8x at r=16,
    and a float32 MissLinear's output up to 2.5x PEFT's error (numerics review, 2026-12-02). Activations
    with a non-zero mean, as in a model; the error of all 64 rows together against float64."""
    torch.manual_seed(0)
    x = (torch.randn(64, in_f) + 0.5).to(device)
    ours, torch_sum = fold_errors_vs_torch_sum(ops.fold(x, r), x, r)
    assert ours <= 1.6 * torch_sum, f"fold error {ours:.3g}, torch.sum's {torch_sum:.3g}"


@pytest.mark.parametrize(
    "x_dtype,out_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
def test_fold_dtype_argument(device, x_dtype, out_dtype):
    x = rand(6, 37, dtype=x_dtype, device=device, requires_grad=True)
    s = ops.fold(x, 5, dtype=out_dtype)
    assert s.dtype == out_dtype and s.shape == (6, 5)
    # accumulation is float32 (float64 for float64 data or output), then one rounding to out_dtype
    rtol, atol = STORE_TOL[out_dtype]
    close(s, fold_ref(x.detach(), 5), rtol, atol, msg="fold(dtype=...)")
    g = rand(6, 5, dtype=out_dtype, device=device)
    (gx,) = torch.autograd.grad(s, x, g)
    assert gx.dtype == x_dtype
    idx = torch.arange(37, device=device) % 5
    close(gx, g.to(F64)[:, idx], *STORE_TOL[x_dtype], msg="fold(dtype=...) backward")


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)], ids=str)
def test_fold_dtype_argument_rounds_once(device, x_dtype, out_dtype):
    """fold accumulates in float32 and rounds once to `dtype`: asking for a wider or more precise
    output than x's dtype must not round the sums to x's dtype first."""
    x = rand(8, 64, dtype=x_dtype, device=device)
    s = ops.fold(x, 3, dtype=out_dtype)
    via_fp32 = ops.fold(x, 3, dtype=torch.float32)
    assert s.dtype == out_dtype
    close(s, via_fp32.to(out_dtype), 0, 0, msg=f"fold({x_dtype} -> {out_dtype}) is not the float32 sums rounded once")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fold_to_float64_sums_in_float64(device, x_dtype, p):
    """dtype=torch.float64 widens x first (torch.sum's convention): the sums of a float32 x carry
    no float32 rounding, with and without dropout (the mask does not depend on the dtype). Long
    rows of values near 1 with tiny parts: float32 sums lose the tiny parts."""
    x = (1 + rand(4, 3000, dtype=F64, device=device) * 1e-5).to(x_dtype)
    key = miss_ext.new_dropout_key(x.device) if p else None
    s = ops.fold(x, 3, p, key, dtype=F64)
    want = ops.fold(x.to(F64), 3, p, key)
    assert s.dtype == F64
    close(s, want, 0, 0, msg=f"fold({x_dtype}, dtype=float64) is not the float64 fold of x")
    if x_dtype == torch.float32:
        assert not torch.equal(ops.fold(x, 3, p, key).to(F64), want), "the case does not tell float32 sums apart"
    index = torch.tensor([0, -1, 1, 0], device=device)
    ranks = torch.tensor([3, 2], device=device)
    drop = torch.tensor([p, p / 2], dtype=F64, device=device) if p else None
    sb = ops.bank_fold(x, index, ranks, 3, drop, key, dtype=F64)
    close(sb, ops.bank_fold(x.to(F64), index, ranks, 3, drop, key), 0, 0, msg="bank_fold(dtype=float64)")


def test_fold_noncontiguous(device):
    base = rand(12, 6, 4, dtype=torch.float32, device=device)
    for x in (base.transpose(0, 2), base[:, ::2, :], base.permute(1, 0, 2), rand(1, 9, device=device).expand(5, 9),
              rand(9, 5, device=device).t()):
        assert not x.is_contiguous()
        for r in (2, 3, 11):
            close(ops.fold(x, r), fold_ref(x, r), *STORE_TOL[torch.float32], msg=f"fold stride {x.stride()}")
    xl = rand(5, 18, device=device, requires_grad=True)
    x = xl[:, ::2]
    g = rand(5, 4, device=device)
    (gx,) = torch.autograd.grad(ops.fold(x, 4), xl, g)
    ref = torch.zeros(5, 18, dtype=F64, device=device)
    ref[:, ::2] = g.to(F64)[:, torch.arange(9, device=device) % 4]
    close(gx, ref, 0, 0, msg="fold backward through a strided view")


def test_fold_zero_width_input(device):
    x = rand(3, 0, device=device)
    poison_heap(3 * 4, torch.float32, device)
    s = ops.fold(x, 4)
    assert s.shape == (3, 4) and torch.equal(s, torch.zeros(3, 4, device=device))


@settings(max_examples=40, deadline=None, database=None)
@given(
    rows=st.integers(0, 6),
    in_f=st.integers(1, 40),
    r=st.integers(1, 45),
    alpha=st.floats(-3, 3, allow_nan=False).filter(lambda a: abs(a) > 1e-3),
)
def test_fold_and_tile_add_are_adjoint(rows, in_f, r, alpha):
    """<fold(x), s> == <x, tile_add_(0, s)>, and both match the reference, on random sizes."""
    x = rand(rows, in_f, dtype=F64)
    s = rand(rows, r, dtype=F64)
    out = torch.zeros(rows, in_f, dtype=F64)
    ops.tile_add_(out, s, alpha)
    torch.testing.assert_close(out, tile_add_ref(torch.zeros(rows, in_f, dtype=F64), s, alpha))
    lhs = (ops.fold(x, r) * s).sum() * alpha
    rhs = (x * out).sum()
    torch.testing.assert_close(lhs, rhs)


# ---------------------------------------------------------------------------------------------
# tile_add_
# ---------------------------------------------------------------------------------------------
TILE_SIZES = [  # (C, Q): out's last size, src's last size
    pytest.param(10, 3, id="C10-Q3"),
    pytest.param(20, 4, id="C20-Q4"),
    pytest.param(5, 7, id="C5-Q7-Q_gt_C"),
    pytest.param(6, 6, id="C6-Q6"),
    pytest.param(12, 1, id="C12-Q1"),
    pytest.param(13, 4, id="C13-Q4"),
]
TILE_DTYPES = [  # (out dtype, src dtype)
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize("C,Q", TILE_SIZES)
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("out_dtype,src_dtype", TILE_DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [1.0, -0.75])
def test_tile_add_per_row(device, C, Q, lead, out_dtype, src_dtype, alpha):
    out = rand(*lead, C, dtype=out_dtype, device=device)  # starts random: every element is checked
    src = rand(*lead, Q, dtype=src_dtype, device=device)
    out0 = out.clone()
    src0 = src.clone()
    assert ops.tile_add_(out, src, alpha) is None
    assert torch.equal(src, src0), "tile_add_ modified src"
    # fp32/fp64 accumulation, one rounding to out's dtype
    rtol, atol = STORE_TOL[out_dtype]
    close(out, tile_add_ref(out0, src0, alpha), rtol, atol, msg="tile_add_ per row")


@pytest.mark.parametrize("rows,C,P,Q", [(7, 10, 3, 4), (6, 20, 6, 5), (5, 5, 8, 2), (12, 9, 1, 9), (4, 3, 2, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_tile_add_matrices(device, rows, C, P, Q, dtype):
    """Both matrices: src rows tile out's rows too (merge's use)."""
    out = rand(rows, C, dtype=dtype, device=device)
    src = rand(P, Q, dtype=dtype, device=device)
    out0 = out.clone()
    ops.tile_add_(out, src, 0.5)
    close(out, tile_add_ref(out0, src, 0.5), *STORE_TOL[dtype], msg="tile_add_ matrices")


def test_tile_add_noncontiguous_out_is_updated_in_place(device):
    storage = rand(10, 7, device=device)
    out = storage.t()  # (7, 10), non-contiguous view
    before = storage.clone()
    src = rand(7, 3, device=device)
    ops.tile_add_(out, src, 2.0)
    close(storage, tile_add_ref(before.t(), src, 2.0).t(), *STORE_TOL[torch.float32], msg="strided out")
    # a strided slice: the untouched columns of the storage stay as they were
    storage = rand(4, 12, device=device)
    before = storage.clone()
    out = storage[:, 1::2]
    ops.tile_add_(out, rand(4, 5, device=device).contiguous(), 1.0)
    assert torch.equal(storage[:, 0::2], before[:, 0::2]), "tile_add_ wrote outside the view"
    assert not torch.equal(storage[:, 1::2], before[:, 1::2])


def test_tile_add_noncontiguous_src(device):
    out = rand(6, 10, device=device)
    out0 = out.clone()
    src = rand(4, 6, device=device).t()  # (6, 4) non-contiguous
    ops.tile_add_(out, src, 1.0)
    close(out, tile_add_ref(out0, src, 1.0), *STORE_TOL[torch.float32], msg="strided src")


def test_tile_add_empty_is_a_no_op(device):
    out = rand(3, 0, device=device)
    ops.tile_add_(out, rand(3, 2, device=device))
    out = rand(0, 5, device=device)
    ops.tile_add_(out, rand(0, 2, device=device))
    assert out.shape == (0, 5)


def _assert_refused_in_grad_mode(call, *unchanged):
    """tile_add_ has no derivative: in grad mode it refuses, at the call, tensors that require grad
    (RuntimeError "without autograd support"), and changes nothing. (Until 2026-12-03 these tests
    also accepted a gradient formula instead; the refusal is what the op does, so it is pinned.)"""
    before = [t.detach().clone() for t in unchanged]
    with pytest.raises(RuntimeError, match="without autograd support"):
        call()
    for t, b in zip(unchanged, before):
        assert torch.equal(t.detach(), b)


def test_tile_add_bumps_the_version_counter(device):
    """An in-place op must tell autograd it modified a tensor (as every aten in-place op does)."""
    out = rand(4, 6, device=device)
    v = out._version
    ops.tile_add_(out, rand(4, 2, device=device))
    assert out._version > v, "tile_add_ did not bump out._version"


def test_tile_add_on_a_tensor_saved_for_backward_is_refused(device):
    """y = exp(x) saves y: modifying y in place would corrupt its backward; refused at the call."""
    x = rand(4, 6, device=device, requires_grad=True)
    y = x.exp()
    _assert_refused_in_grad_mode(lambda: ops.tile_add_(y, rand(4, 2, device=device)), y)
    y.sum().backward()
    close(x.grad, x.detach().exp(), 0, 0, msg="exp's gradient after the refused call")


def test_tile_add_with_a_src_that_requires_grad_is_refused(device):
    """A src that requires grad would lose its gradient silently: refused at the call."""
    src = rand(4, 2, device=device, requires_grad=True)
    out = rand(4, 6, device=device)
    _assert_refused_in_grad_mode(lambda: ops.tile_add_(out, src), out, src)
    with torch.no_grad():  # without grad mode it runs: out += tile(src)
        want = out + src.repeat(1, 3)
        ops.tile_add_(out, src)
    close(out, want, 1e-6, 1e-6, msg="tile_add_ under no_grad")


def test_tile_add_into_an_out_that_requires_grad_is_refused(device):
    a = rand(4, 6, device=device, requires_grad=True)
    out = a * 3.0
    _assert_refused_in_grad_mode(lambda: ops.tile_add_(out, rand(4, 2, device=device)), out)
    g = rand(4, 6, device=device)
    out.backward(g)
    close(a.grad, g.to(F64) * 3.0, 1e-6, 1e-6, msg="grad through out after the refused call")


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
def _linear_case(in_f, out_f, r, mini_r, lead, name, device, bias=True):
    x_dtype, b_dtype, rtol, atol = DTYPES[name]
    x = rand(*lead, in_f, dtype=x_dtype, device=device, requires_grad=True)
    w = rand(out_f, in_f, dtype=x_dtype, device=device, requires_grad=True)
    b = rand(out_f, dtype=x_dtype, device=device, requires_grad=True) if bias else None
    blk = block_for(in_f, out_f, r, mini_r, b_dtype, device).requires_grad_(True)
    return x, w, b, blk, rtol, atol


@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("name", DTYPE_PARAMS)
def test_linear_forward_and_all_grads(device, in_f, out_f, r, mini_r, lead, name):
    x, w, b, blk, rtol, atol = _linear_case(in_f, out_f, r, mini_r, lead, name, device)
    y = ops.linear(x, w, b, blk)
    assert y.shape == (*lead, out_f) and y.dtype == x.dtype and y.device == x.device
    xr, wr, br, blkr = map(f64_leaf, (x, w, b, blk))
    y_ref = linear_ref(xr, wr, br, blkr)
    close(y, y_ref, rtol, atol, msg="linear forward")

    g = rand(*y.shape, dtype=y.dtype, device=device)
    grads = torch.autograd.grad(y, (x, w, b, blk), g)
    grads_ref = torch.autograd.grad(y_ref, (xr, wr, br, blkr), g.to(F64))
    for n, ga, gr, t in zip(("x", "weight", "bias", "miss_block"), grads, grads_ref, (x, w, b, blk)):
        assert ga.dtype == t.dtype and ga.shape == t.shape, f"grad {n}: {ga.dtype}{tuple(ga.shape)}"
        close(ga, gr, rtol, atol, msg=f"linear grad wrt {n}")
    if r > in_f:
        # block rows j >= in never see an input: their gradient is exactly zero
        assert torch.equal(grads[3][in_f:], torch.zeros_like(grads[3][in_f:]))


@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
@pytest.mark.parametrize("name", DTYPE_PARAMS)
def test_linear_frozen_base_no_bias(device, in_f, out_f, r, mini_r, name):
    """The usual fine-tuning case: only the block (and x) require grad; no bias."""
    x, _, _, blk, rtol, atol = _linear_case(in_f, out_f, r, mini_r, (3, 2), name, device, bias=False)
    w = rand(out_f, in_f, dtype=x.dtype, device=device)
    y = ops.linear(x, w, None, blk)
    xr, blkr = f64_leaf(x), f64_leaf(blk)
    y_ref = linear_ref(xr, w, None, blkr)
    close(y, y_ref, rtol, atol, msg="linear forward, no bias")
    g = rand(*y.shape, dtype=y.dtype, device=device)
    gx, gb = torch.autograd.grad(y, (x, blk), g)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (xr, blkr), g.to(F64))
    close(gx, gx_ref, rtol, atol, msg="grad x")
    close(gb, gb_ref, rtol, atol, msg="grad block")
    # only the block requires grad
    y = ops.linear(x.detach(), w, None, blk)
    (gb2,) = torch.autograd.grad(y, blk, g)
    close(gb2, gb_ref, rtol, atol, msg="grad block (x frozen)")


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
def test_linear_half_precision_follows_peft(device, name, in_f, out_f, r, mini_r):
    """Base GEMM rounded in x's dtype, adapter in the fp32 block dtype, one final rounding: the
    op is within one unit in the last place of PEFT's computation."""
    x_dtype, b_dtype, _, _ = DTYPES[name]
    x = rand(4, 3, in_f, dtype=x_dtype, device=device)
    w = rand(out_f, in_f, dtype=x_dtype, device=device)
    b = rand(out_f, dtype=x_dtype, device=device)
    blk = block_for(in_f, out_f, r, mini_r, b_dtype, device)
    y = ops.linear(x, w, b, blk)
    ulp = 2.0 ** -10 if x_dtype == torch.float16 else 2.0 ** -7
    close(y, peft_precision_linear_ref(x, w, b, blk), ulp, 1e-6, msg="PEFT rounding")


# Shapes with few output tiles for a long K, where cuBLAS splits K: the bf16 tensor-core path's
# y += S D (split_gemm.h; K = 6 r) must still round once. An H200's cuBLAS (2026-12-04), under the
# split add's fp32-reduction guard, rounded the product to bf16 before adding y in three of these
# shapes (the 11 failures all fit round(base + round(term)); 12 x 6 rounded once): these shapes now
# take an fp32 product added apart (split_gemm.cpp, kFp32ProductBytes). Decoding (1 row, wide
# layers) is the real case.
@pytest.mark.parametrize("rows,in_f,out_f,r", [(1, 1024, 1024, 64), (3, 64, 64, 128), (2, 4096, 256, 64),
                                               (12, 8, 6, 16)], ids=str)
# (False, False) is refused by torch where cuBLASLt is not the backend (the H200 run of 2026-12-04:
# "allow_splitk=False requires the cuBLASLt backend"), a setting a user cannot make there either.
@pytest.mark.parametrize("reduction", [(True, True), (False, True)], ids=str)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_linear_bf16_rounds_once_whatever_cublas_reduction(device, rows, in_f, out_f, r, reduction, compiled,
                                                           dynamo_reset):
    """PEFT's rounding at every torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    setting, eager and in a compiled graph (which calls miss.split_addmm_ on CUDA), and the setting
    the user chose is the one in force after the op, forward and backward."""
    before = torch._C._get_cublas_allow_bf16_reduced_precision_reduction()
    linear = torch.compile(ops.linear, backend="aot_eager", fullgraph=True) if compiled else ops.linear
    try:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduction
        x = rand(rows, in_f, dtype=torch.bfloat16, device=device, requires_grad=True)
        w = rand(out_f, in_f, dtype=torch.bfloat16, device=device) / math.sqrt(in_f)
        blk = rand(r, out_f, dtype=torch.float32, device=device, requires_grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = linear(x, w, None, blk)
        if device == "cuda":  # the fp32 product added apart, not in the GEMM's epilogue (split_gemm.cpp)
            names = {e.name for e in prof.events()}
            assert "aten::add_" in names and "aten::addmm_" not in names, sorted(names)
        assert torch._C._get_cublas_allow_bf16_reduced_precision_reduction() == reduction
        close(y, peft_precision_linear_ref(x.detach(), w, None, blk.detach()), 2.0 ** -7, 1e-6, msg="PEFT rounding")
        y.backward(torch.ones_like(y))
        assert torch._C._get_cublas_allow_bf16_reduced_precision_reduction() == reduction
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = before


# Above 16 MiB of fp32 output the split path's y += S D is added in the GEMM's epilogue, in place
# (split_gemm.cpp, kFp32ProductBytes); below it the product is written in fp32 and added apart,
# because an H200's cuBLAS rounded the product to bf16 before adding y in small shapes (the 11
# rounding failures of test_linear_bf16_rounds_once_whatever_cublas_reduction on 2026-12-04 all fit
# round(base + round(term)) from the tests' seeds). These shapes (32 and 48 MiB of fp32
# output: 2048 rows of 4096, 1024 of 11008) check the epilogue of the large GEMMs that training
# runs, forward only (the backward's products have fp32 outputs).
@needs_gpu
@pytest.mark.parametrize("rows,in_f,out_f,r", [(2048, 1024, 4096, 64), (1024, 4096, 11008, 64)], ids=str)
def test_linear_bf16_rounds_once_in_large_gemms(rows, in_f, out_f, r):
    x = rand(rows, in_f, dtype=torch.bfloat16, device="cuda")
    w = rand(out_f, in_f, dtype=torch.bfloat16, device="cuda") / math.sqrt(in_f)
    blk = rand(r, out_f, dtype=torch.float32, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = ops.linear(x, w, None, blk)
    names = {e.name for e in prof.events()}
    assert "miss::split_bf16" in names and "aten::addmm_" in names, sorted(names)  # the in-place GEMM
    # One ulp plus fp32 noise where base and term cancel (the CPU's split path, rounding once by
    # construction, is a few elements past a bare ulp on these seeds; rounding the product first
    # is tens of thousands).
    assert_within_ulp(y, peft_precision_linear_ref(x, w, None, blk), "y vs PEFT's rounding")


@pytest.mark.parametrize(
    "x_dtype,b_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
     (torch.float64, torch.float32), (torch.float16, torch.float64)],
    ids=str,
)
@pytest.mark.parametrize("mini_r", [None, 4])
def test_linear_other_block_dtypes(device, x_dtype, b_dtype, mini_r):
    in_f, out_f, r = 10, 20, 3
    x = rand(5, in_f, dtype=x_dtype, device=device, requires_grad=True)
    w = rand(out_f, in_f, dtype=x_dtype, device=device)
    b = rand(out_f, dtype=x_dtype, device=device)
    blk = block_for(in_f, out_f, r, mini_r, b_dtype, device).requires_grad_(True)
    y = ops.linear(x, w, b, blk)
    assert y.dtype == x_dtype
    coarse = {torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 1e-1), torch.float32: (2e-5, 2e-5),
              torch.float64: (2e-5, 2e-5)}
    rtol = max(coarse[x_dtype][0], coarse[b_dtype][0])
    atol = max(coarse[x_dtype][1], coarse[b_dtype][1])
    xr, blkr = f64_leaf(x), f64_leaf(blk)
    y_ref = linear_ref(xr, w, b, blkr)
    close(y, y_ref, rtol, atol, msg="linear forward")
    g = rand(5, out_f, dtype=x_dtype, device=device)
    gx, gb = torch.autograd.grad(y, (x, blk), g)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (xr, blkr), g.to(F64))
    assert gx.dtype == x_dtype and gb.dtype == b_dtype
    close(gx, gx_ref, rtol, atol, msg="grad x")
    close(gb, gb_ref, rtol, atol, msg="grad block")


def test_linear_noncontiguous_inputs(device):
    in_f, out_f, r = 10, 20, 3
    # (leaf shape, view of the leaf that is x)
    cases = [
        ((in_f, 6), lambda t: t.t()),
        ((6, 2 * in_f), lambda t: t[:, ::2]),
        ((3, in_f, 4), lambda t: t.transpose(1, 2)),
        ((1, in_f), lambda t: t.expand(5, in_f)),
    ]
    w = rand(in_f, out_f, device=device).t()
    b = rand(2 * out_f, device=device)[::2]
    for mini in (None, 5):
        blk = rand(out_f if mini is None else mini, r, device=device).t()
        assert not (w.is_contiguous() or b.is_contiguous() or blk.is_contiguous())
        for shape, view in cases:
            leaf = rand(*shape, device=device, requires_grad=True)
            x = view(leaf)
            assert not x.is_contiguous()
            wl, bl, kl = (t.detach().requires_grad_(True) for t in (w, b, blk))
            y = ops.linear(x, wl, bl, kl)
            refs = [f64_leaf(t) for t in (leaf, w, b, blk)]
            y_ref = linear_ref(view(refs[0]), *refs[1:])
            close(y, y_ref, 2e-5, 2e-5, msg=f"x stride {x.stride()}")
            g = rand(*y.shape, device=device)
            got = torch.autograd.grad(y, (leaf, wl, bl, kl), g)
            want = torch.autograd.grad(y_ref, refs, g.to(F64))
            for n, ga, gr in zip(("x", "w", "b", "block"), got, want):
                close(ga, gr, 2e-5, 2e-5, msg=f"grad {n}, x stride {x.stride()}")


def test_linear_noncontiguous_grad_output(device):
    x = rand(6, 10, device=device, requires_grad=True)
    w = rand(20, 10, device=device)
    blk = rand(3, 20, device=device, requires_grad=True)
    y = ops.linear(x, w, None, blk)
    g = rand(20, 6, device=device).t()
    gx, gb = torch.autograd.grad(y, (x, blk), g)
    xr, br = f64_leaf(x), f64_leaf(blk)
    gx_ref, gb_ref = torch.autograd.grad(linear_ref(xr, w, None, br), (xr, br), g.to(F64))
    close(gx, gx_ref, 2e-5, 2e-5, msg="grad x")
    close(gb, gb_ref, 2e-5, 2e-5, msg="grad block")


@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
def test_linear_equals_linear_through_merged_weight(device, in_f, out_f, r, mini_r):
    """Cross-op consistency: x W^T + b + adapter == x (merge(W, block))^T + b."""
    x = rand(4, in_f, dtype=F64, device=device)
    w = rand(out_f, in_f, dtype=F64, device=device)
    b = rand(out_f, dtype=F64, device=device)
    blk = block_for(in_f, out_f, r, mini_r, F64, device)
    torch.testing.assert_close(ops.linear(x, w, b, blk), torch.nn.functional.linear(x, ops.merge(w, blk), b))


def test_linear_inference_mode_and_no_grad(device):
    x = rand(2, 3, 10, device=device)
    w = rand(20, 10, device=device)
    b = rand(20, device=device)
    blk = rand(4, 5, device=device, requires_grad=True)
    ref = linear_ref(x, w, b, blk.detach())
    with torch.no_grad():
        y1 = ops.linear(x, w, b, blk)
    with torch.inference_mode():
        y2 = ops.linear(x, w, b, blk)
    assert not y1.requires_grad and not y2.requires_grad
    close(y1, ref, 2e-5, 2e-5, msg="no_grad")
    close(y2, ref, 2e-5, 2e-5, msg="inference_mode")


# ---------------------------------------------------------------------------------------------
# merge / merge_
# ---------------------------------------------------------------------------------------------
MERGE_DTYPES = {  # weight dtype, block dtype, rtol, atol
    "fp32": (torch.float32, torch.float32, 2e-6, 1e-5),
    "fp64": (torch.float64, torch.float64, 1e-13, 1e-13),
    "fp16-w_fp32-block": (torch.float16, torch.float32, 2 ** -10, 1e-4),
    "bf16-w_fp32-block": (torch.bfloat16, torch.float32, 2 ** -7, 1e-3),
    "fp32-w_fp64-block": (torch.float32, torch.float64, 2e-6, 1e-5),
    "fp32-w_fp16-block": (torch.float32, torch.float16, 2e-6, 1e-5),
}


@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
@pytest.mark.parametrize("name", list(MERGE_DTYPES))
@pytest.mark.parametrize("reverse", [False, True])
def test_merge_forward_and_grads(device, in_f, out_f, r, mini_r, name, reverse):
    w_dtype, b_dtype, rtol, atol = MERGE_DTYPES[name]
    w = rand(out_f, in_f, dtype=w_dtype, device=device, requires_grad=True)
    blk = block_for(in_f, out_f, r, mini_r, b_dtype, device).requires_grad_(True)
    w0 = w.detach().clone()
    poison_heap(out_f * in_f, w_dtype, device)
    merged = ops.merge(w, blk, reverse)
    assert merged.shape == w.shape and merged.dtype == w_dtype
    assert torch.equal(w.detach(), w0), "merge modified its weight argument"
    assert merged.data_ptr() != w.data_ptr()
    wr, br = f64_leaf(w), f64_leaf(blk)
    m_ref = merge_ref(wr, br, reverse)
    close(merged, m_ref, rtol, atol, msg="merge forward")

    g = rand(out_f, in_f, dtype=w_dtype, device=device)
    gw, gb = torch.autograd.grad(merged, (w, blk), g)
    gw_ref, gb_ref = torch.autograd.grad(m_ref, (wr, br), g.to(F64))
    assert gw.dtype == w_dtype and gb.dtype == b_dtype and gb.shape == blk.shape
    close(gw, gw_ref, 0, 0, msg="merge grad wrt weight (identity)")
    # block grad: sums of up to in*out/(r*mini_r) entries of g, accumulated in fp32 (fp64 only when
    # the gradient itself is fp64), rounded to the block's dtype
    if b_dtype == F64 and w_dtype == F64:
        grtol, gatol = 1e-12, 1e-12
    elif b_dtype == torch.float16:
        grtol, gatol = 2e-3, 2e-3
    else:
        grtol, gatol = 1e-5, 1e-5
    close(gb, gb_ref, grtol, gatol, msg="merge grad wrt block")
    if r > in_f:
        assert torch.equal(gb[in_f:], torch.zeros_like(gb[in_f:]))


@pytest.mark.parametrize("mini_r", [None, 3])
def test_merge_saves_no_tensor_for_default_and_mini(device, mini_r):
    """The default/mini merge's gradients need only the block's shape and dtype, like weight + delta
    in plain torch: the weight and the block may change in place between the merge and backward
    (no version error) and the gradients stay those of the merge as it ran. Bat reads W and B in
    backward, so there the version check still refuses the change."""
    in_f, out_f, r = 10, 12, 4
    w = rand(out_f, in_f, device=device, requires_grad=True)
    blk = block_for(in_f, out_f, r, mini_r or out_f, torch.float32, device).requires_grad_(True)
    g = rand(out_f, in_f, device=device)
    b64 = f64_leaf(blk)
    (want,) = torch.autograd.grad(merge_ref(f64_leaf(w), b64, False), (b64,), g.to(F64))
    merged = ops.merge(w, blk)
    with torch.no_grad():
        w.mul_(3), blk.add_(5)
    gw, gb = torch.autograd.grad(merged, (w, blk), g)
    assert torch.equal(gw, g)
    close(gb, want, 1e-5, 1e-5, msg="block grad after in-place changes")
    (gb_only,) = torch.autograd.grad(ops.merge(w, blk), (blk,), g)  # the weight's gradient is not asked for
    close(gb_only, want, 1e-5, 1e-5, msg="block grad alone")

    wb = rand(8, 8, device=device, requires_grad=True)
    bat = rand(2, 4, 4, device=device, requires_grad=True)
    merged = ops.merge(wb, bat)
    with torch.no_grad():
        bat.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        merged.backward(torch.ones_like(merged))


@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
@pytest.mark.parametrize("name", list(MERGE_DTYPES))
def test_merge_inplace(device, in_f, out_f, r, mini_r, name):
    w_dtype, b_dtype, rtol, atol = MERGE_DTYPES[name]
    w = rand(out_f, in_f, dtype=w_dtype, device=device)
    blk = block_for(in_f, out_f, r, mini_r, b_dtype, device)
    w0 = w.clone()
    blk0 = blk.clone()
    ptr = w.data_ptr()
    assert ops.merge_(w, blk) is None
    assert w.data_ptr() == ptr
    assert torch.equal(blk, blk0), "merge_ modified the block"
    close(w, merge_ref(w0, blk), rtol, atol, msg="merge_")
    assert torch.equal(w, ops.merge(w0, blk)), "merge_ and merge disagree"
    ops.merge_(w, blk, True)
    # unmerge restores the weight up to rounding (two roundings in w's dtype)
    close(w, w0, 2 * rtol, 2 * atol + 4 * rtol, msg="merge_ then unmerge")


def test_merge_inplace_noncontiguous_weight(device):
    storage = rand(10, 20, device=device)  # weight (20, 10) as a transposed view
    w = storage.t()
    blk = rand(3, 5, device=device)
    w0 = w.clone()
    ops.merge_(w, blk)
    close(storage.t(), merge_ref(w0, blk), 2e-6, 1e-5, msg="merge_ through a strided view")
    close(ops.merge(w0.t().contiguous().t(), blk), merge_ref(w0, blk), 2e-6, 1e-5, msg="merge of strided weight")
    blk_nc = rand(5, 3, device=device).t()
    close(ops.merge(w0, blk_nc), merge_ref(w0, blk_nc), 2e-6, 1e-5, msg="merge of strided block")


def test_merge_inplace_bumps_the_version_counter(device):
    w = rand(6, 8, device=device)
    v = w._version
    ops.merge_(w, rand(2, 6, device=device))
    assert w._version > v, "merge_ did not bump weight._version"


def test_merge_inplace_of_a_weight_saved_by_linear_is_detected(device):
    """linear saves the weight for grad_x; merging into it before backward must not silently
    give gradients computed with the merged weight."""
    x = rand(4, 8, device=device, requires_grad=True)
    w = rand(6, 8, device=device)
    blk = rand(2, 6, device=device, requires_grad=True)
    y = ops.linear(x, w, None, blk)
    ops.merge_(w, blk.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_merges_commute_and_unmerge(device):
    w = rand(20, 10, dtype=F64, device=device)
    a = rand(3, 20, dtype=F64, device=device)
    b = rand(4, 5, dtype=F64, device=device)
    ab = ops.merge(ops.merge(w, a), b)
    ba = ops.merge(ops.merge(w, b), a)
    torch.testing.assert_close(ab, ba)
    torch.testing.assert_close(ops.merge(ops.merge(ab, a, True), b, True), w)


@pytest.mark.parametrize("mask", range(1, 16), ids=lambda m: "+".join(n for i, n in enumerate("xwbk") if m >> i & 1))
def test_linear_every_subset_of_inputs_requiring_grad(device, mask):
    """Each combination of x / weight / bias / block requiring grad gets exactly those grads."""
    needs = [bool(mask >> i & 1) for i in range(4)]
    shapes = [(2, 3, 7), (5, 7), (5,), (3, 5)]
    ts = [rand(*s, dtype=F64, device=device, requires_grad=n) for s, n in zip(shapes, needs)]
    y = ops.linear(*ts, 0.3, torch.tensor([3, 4], device=device))
    wanted = [t for t, n in zip(ts, needs) if n]
    g = rand(*y.shape, dtype=F64, device=device)
    got = torch.autograd.grad(y, wanted, g)
    refs = [t.detach().clone().requires_grad_(n) for t, n in zip(ts, needs)]
    m = recover_mask(6, 7, 0.3, torch.tensor([3, 4], device=device), device)
    want = torch.autograd.grad(linear_ref(*refs, mask=m, p=0.3), [r for r, n in zip(refs, needs) if n], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# ---- from a mutation test of the host-side C++ (2026-12-06): each kills a mutant that passed the suite ----

# M58 (checks.cpp check_tile_add_args: the out.shape[-1] == 0 exception dropped). A src with no
# columns is valid beside an out with no columns; only ever checked with empty rows.
@pytest.mark.parametrize("shapes", [((4, 0), (4, 0)), ((2, 3, 0), (2, 3, 0)), ((5, 0), (2, 0))])
def test_tile_add_of_no_columns_is_a_no_op(shapes):
    out, src = rand(*shapes[0]), rand(*shapes[1])
    assert ops.tile_add(out, src).shape == out.shape
    ops.tile_add_(out, src)
