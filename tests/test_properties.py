"""Property-based tests (hypothesis) of every `miss` op and of MissLinear against the float64
reference (tests/reference.py).

Each property draws sizes, modes, dtypes, dropout and memory layouts, runs the op and compares it
with the independent float64 reference, element by element, within a bound derived from the
dtypes' machine epsilon (see `bound` below): one rounding of the result in its storage dtype plus
an accumulation term proportional to the same computation on absolute values. Nothing is compared
with the op itself only, so every property can fail.

What is drawn:
- sizes including 0, 1 and primes; r in 1..in+3 (r > in included); mini_r among the divisors
  of out; for fold / tile_add / linear also a "chunked" regime whose row count exceeds the CPU
  kernels' task grain (row_grain = 65536 // cols rows, csrc/ops/cpu/shard_kernels.cpp) and a
  "wide" one (cols > 65536, one row per task), always at most ~200k elements;
- dtypes float64 / float32 / float16 / bfloat16 (half bases with a float32 block, as PEFT);
- dropout p in {0, 0.1, 0.5, 1.0} with a fixed key; the mask comes from `reference.recover_mask`
  for fold / linear and from the pure-Python Philox `reference.philox_mask` for tile_add (which
  recover_mask itself is built on);
- layouts: contiguous, every other element of the last dim (x[..., ::2]), transposed (all dims
  reversed) and a storage offset of one element; unused elements of the buffers are NaN, so a
  kernel reading or writing outside the view shows up;
- 1-, 2- and 3-D inputs;
- the device: "cpu", and "cuda" when a GPU is visible (skipped otherwise).

Budget (deterministic in CI):
- default profile "miss_ext-ci": derandomize=True (the same examples on every run), 25 examples per
  test, no deadline, no example database;
- MISS_EXT_HYPOTHESIS_EXAMPLES=1000 pytest tests/test_properties.py  runs 1000 examples per test
  (profile "miss_ext-deep", still derandomized unless MISS_EXT_HYPOTHESIS_RANDOM=1 is also set,
  which draws new examples each run and prints the seed of a failure).

A failure these properties find is to be kept as an explicit @example on its test (none so far).
"""
import copy
import math
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import miss_ext
from conftest import DEVICES
from reference import (F64, bat_transform_ref, bat_weight_ref, fold_ref, linear_ref, merge_ref, philox_mask,
                       recover_mask, tile_add_ref)

ops = torch.ops.miss

# ---------------------------------------------------------------------------------------------
# hypothesis profiles
# ---------------------------------------------------------------------------------------------
settings.register_profile(
    "miss_ext-ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
_DEEP = os.environ.get("MISS_EXT_HYPOTHESIS_EXAMPLES")
if _DEEP:
    settings.register_profile("miss_ext-deep", parent=settings.get_profile("miss_ext-ci"),
                              max_examples=int(_DEEP),
                              derandomize=os.environ.get("MISS_EXT_HYPOTHESIS_RANDOM") != "1")
# Loaded per test (as a decorator) rather than with settings.load_profile, so the profile does not
# leak into the hypothesis tests of other modules.
PROFILE = settings(settings.get_profile("miss_ext-deep" if _DEEP else "miss_ext-ci"))

# ---------------------------------------------------------------------------------------------
# tolerances
# ---------------------------------------------------------------------------------------------
EPS = {F64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
HALF = (torch.float16, torch.bfloat16)
C_ACC = 16.0  # accumulation slack, in units of eps * (the same sum of absolute values)


def acc_dtype(*dtypes):
    """The kernels accumulate in float64 when every operand is float64, else in float32."""
    return F64 if all(d == F64 for d in dtypes) else torch.float32


def bound(ref, mag, store, acc, c=C_ACC, extra=None):
    """|got - ref| allowed: one rounding to `store`, accumulation error c * eps(acc) * mag, an
    optional extra term, and the smallest normal number of `store`."""
    b = EPS[store] * ref.detach().abs().to(F64) + c * EPS[acc] * mag.detach().abs().to(F64)
    if extra is not None:
        b = b + extra
    return b + torch.finfo(store).tiny


def assert_within(got, ref, tol, msg):
    assert tuple(got.shape) == tuple(ref.shape), f"{msg}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    a = got.detach().to(F64).cpu()
    e = ref.detach().to(F64).cpu()
    b = torch.as_tensor(tol).to(F64).cpu().expand(e.shape)
    bad = ~((a - e).abs() <= b)  # NaN counts as bad
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{msg}: {int(bad.sum())} of {e.numel()} elements off; first at {idx}: got "
                             f"{a[idx].item()!r}, want {e[idx].item()!r} (bound {b[idx].item():.3g})")


# ---------------------------------------------------------------------------------------------
# data and layouts
# ---------------------------------------------------------------------------------------------
def rnd(shape, dtype, device, scale=1.0):
    """Never-zero data (magnitudes in [0.25, 1.5) * scale, random signs) from torch's global
    generator, which each example seeds; rounded to `dtype` (the reference sees the rounded values)."""
    mag = torch.empty(shape, dtype=F64).uniform_(0.25, 1.5)
    sign = torch.randint(0, 2, shape, dtype=F64) * 2 - 1
    return (mag * sign * scale).to(dtype=dtype, device=device)


LAYOUTS = ["contiguous", "step2", "transposed", "offset1"]


def _layout(shape, kind):
    """(buffer shape, view of a buffer of that shape that has `shape`)."""
    shape = tuple(shape)
    if kind == "step2" and len(shape) >= 1:
        return (*shape[:-1], 2 * shape[-1]), lambda b: b[..., ::2]
    if kind == "transposed" and len(shape) >= 2:
        perm = tuple(reversed(range(len(shape))))
        return tuple(shape[p] for p in perm), lambda b: b.permute(perm)
    if kind == "offset1":
        return (math.prod(shape) + 1,), lambda b: b[1:].view(shape)
    return shape, lambda b: b


def place(t, kind, requires_grad=False):
    """A view equal to `t` with layout `kind`, in a NaN-filled buffer: returns (view, buffer, fn)
    with fn(buffer) == view. With requires_grad, the buffer is a leaf and the view a node of it."""
    buf_shape, fn = _layout(t.shape, kind)
    buf = torch.full(buf_shape, float("nan"), dtype=t.dtype, device=t.device)
    fn(buf).copy_(t)
    if requires_grad:
        buf.requires_grad_(True)
    view = fn(buf)
    assert view.shape == t.shape
    return view, buf, fn


def assert_gaps_untouched(buf, fn, msg):
    """Every element of `buf` outside fn(buf) is still NaN (nothing wrote outside the view)."""
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=buf.device)
    fn(inside).fill_(True)
    outside = buf.detach()[~inside]
    assert torch.isnan(outside).all(), f"{msg}: an element outside the view was written"


def abs_(t):
    return None if t is None else t.detach().to(F64).abs()


def f64_leaf(t):
    return None if t is None else t.detach().to(F64).requires_grad_(True)


def grain(cols):
    """The CPU kernels' rows per task (csrc/ops/cpu/shard_kernels.cpp, row_grain)."""
    return max(1, 65536 // max(cols, 1))


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------
MAX_ELEMENTS = 200_000
PS = [0.0, 0.1, 0.5, 1.0]
NOTABLE_SIZES = [0, 1, 2, 3, 5, 7, 11, 13, 17, 31, 37]


def sizes(lo=0, hi=40):
    """Sizes in [lo, hi], often 0, 1 or a prime."""
    return st.one_of(st.sampled_from([v for v in NOTABLE_SIZES if lo <= v <= hi]), st.integers(lo, hi))


SMALL_SIZES = sizes()
seeds = st.integers(0, 2 ** 31 - 1)
keys = st.tuples(st.integers(0, 2 ** 62 - 1), st.integers(0, 2 ** 62 - 1))
layouts = st.sampled_from(LAYOUTS)


@st.composite
def row_shapes(draw, regime, max_cols_small=40, out_cols=1):
    """(leading sizes, cols) of the regime: small 1-3-D, chunked (rows > the kernels' grain) or
    wide (cols > 65536); rows * max(cols, out_cols) stays <= MAX_ELEMENTS."""
    if regime == "small":
        cols = draw(sizes(0, max_cols_small))
        ndim = draw(st.integers(1, 3))
        lead = tuple(draw(st.sampled_from([0, 1, 2, 3, 5, 7])) for _ in range(ndim - 1))
        return lead, cols
    if regime == "chunked":
        cols = draw(st.integers(1, 8))
        width = max(cols, out_cols)
        lo = grain(cols) + 1
        hi = max(lo, min(MAX_ELEMENTS // width, 2 * grain(cols) + 7))
        rows = draw(st.integers(lo, hi))
        if draw(st.booleans()):  # 3-D: (2, rows // 2 + 1)
            return (2, rows // 2 + 1), cols
        return (rows,), cols
    cols = draw(st.integers(65537, 65537 + 30000))
    rows = draw(st.integers(1, 2))
    return (rows,), cols


def device_params():
    return pytest.mark.parametrize("device", DEVICES)


# A pytest parameter rather than a draw, so that each regime gets the whole example budget
# (derandomized hypothesis favours the first choice of a sampled_from).
REGIMES = ["small", "chunked", "wide"]


def regime_params():
    return pytest.mark.parametrize("regime", REGIMES)


# ---------------------------------------------------------------------------------------------
# fold
# ---------------------------------------------------------------------------------------------
@regime_params()
@device_params()
@PROFILE
@given(data=st.data(), seed=seeds, key=keys,
       x_dtype=st.sampled_from([F64, torch.float32, torch.float16, torch.bfloat16]),
       out_dtype=st.sampled_from([None, None, torch.float32, F64]), p=st.sampled_from(PS), layout=layouts)
def test_fold_matches_reference(regime, device, data, seed, key, x_dtype, out_dtype, p, layout):
    lead, in_f = data.draw(row_shapes(regime), label="shape")
    r = data.draw(st.integers(1, in_f + 3) if in_f <= 64 else st.integers(1, 64), label="r")
    torch.manual_seed(seed)
    x, _, _ = place(rnd((*lead, in_f), x_dtype, device), layout)
    rows = math.prod(lead)
    key_t = torch.tensor(key, dtype=torch.int64, device=device) if p > 0 else None
    mask = recover_mask(rows, in_f, p, key_t, device) if p > 0 else None

    s = ops.fold(x, r, p, key_t, out_dtype)
    store = out_dtype or x_dtype
    assert s.shape == (*lead, r) and s.dtype == store and s.device == x.device
    ref = fold_ref(x, r, mask, p)
    mag = fold_ref(abs_(x), r, mask, p)
    acc = F64 if (x_dtype == F64 and store == F64) else torch.float32
    assert_within(s, ref, bound(ref, mag, store, acc), f"fold(r={r}, p={p})")


@regime_params()
@device_params()
@PROFILE
@given(data=st.data(), seed=seeds, key=keys, dtype=st.sampled_from([F64, torch.float32]),
       p=st.sampled_from(PS), layout=layouts)
def test_fold_gradient_matches_reference(regime, device, data, seed, key, dtype, p, layout):
    lead, in_f = data.draw(row_shapes(regime), label="shape")
    r = data.draw(st.integers(1, in_f + 3) if in_f <= 64 else st.integers(1, 64), label="r")
    torch.manual_seed(seed)
    x, _, _ = place(rnd((*lead, in_f), dtype, device), layout, requires_grad=True)
    rows = math.prod(lead)
    key_t = torch.tensor(key, dtype=torch.int64, device=device) if p > 0 else None
    mask = recover_mask(rows, in_f, p, key_t, device) if p > 0 else None
    g = rnd((*lead, r), dtype, device)

    (gx,) = torch.autograd.grad(ops.fold(x, r, p, key_t), x, g)
    xr = f64_leaf(x)
    (gx_ref,) = torch.autograd.grad(fold_ref(xr, r, mask, p), xr, g.to(F64))
    assert gx.dtype == dtype and gx.shape == x.shape
    # each element of grad_x is one element of g times the keep factor: one rounding at most
    assert_within(gx, gx_ref, bound(gx_ref, gx_ref, dtype, dtype, c=1.0), f"fold backward (r={r}, p={p})")


# ---------------------------------------------------------------------------------------------
# tile_add_ / tile_add
# ---------------------------------------------------------------------------------------------
TILE_DTYPES = [(F64, F64), (torch.float32, torch.float32), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (F64, torch.float32),
               (torch.float32, F64)]
PHILOX_MAX = 4096  # elements of out above which dropout is not drawn (the pure-Python mask is slow)


def tile_ref(out, src, alpha, mask, p):
    """reference.tile_add_ref; an empty out (which it cannot reshape) stays as it is."""
    if out.numel() == 0:
        return out.to(F64) + 0 * src.to(F64).sum()
    return tile_add_ref(out, src, alpha, mask, p)


@regime_params()
@device_params()
@PROFILE
@given(data=st.data(), seed=seeds, key=keys, dtypes=st.sampled_from(TILE_DTYPES),
       matrices=st.booleans(), alpha=st.sampled_from([1.0, -0.75, 0.5, 2.5]), p=st.sampled_from(PS),
       out_layout=layouts, src_layout=layouts)
def test_tile_add_matches_reference(regime, device, data, seed, key, dtypes, matrices, alpha, p, out_layout,
                                    src_layout):
    lead, C = data.draw(row_shapes(regime), label="shape")
    out_dtype, src_dtype = dtypes
    Q = data.draw(st.integers(1, C + 3) if C <= 64 else st.integers(1, 64), label="Q")
    if matrices:  # out (rows, C), src (P, Q): src tiles both axes
        rows = math.prod(lead)
        lead = (rows,)
        src_shape = (data.draw(st.integers(1, min(rows, 64) + 3), label="P"), Q)
    else:  # per row: src (*lead, Q)
        rows = math.prod(lead)
        src_shape = (*lead, Q)
    if rows * C > PHILOX_MAX:
        p = 0.0
    torch.manual_seed(seed)
    out0 = rnd((*lead, C), out_dtype, device)
    src, _, _ = place(rnd(src_shape, src_dtype, device), src_layout)
    key_t = torch.tensor(key, dtype=torch.int64, device=device) if p > 0 else None
    mask = philox_mask(key[0], key[1], rows, C, p).to(device) if p > 0 else None

    ref = tile_ref(out0, src, alpha, mask, p)
    mag = tile_ref(abs_(out0), abs_(src), abs(alpha), mask, p)
    tol = bound(ref, mag, out_dtype, acc_dtype(out_dtype, src_dtype), c=2.0)
    what = f"({'matrices' if matrices else 'per row'}, out {tuple(out0.shape)}, src {tuple(src.shape)}, p={p})"

    y = ops.tile_add(out0, src, alpha, p, key_t)
    assert y.dtype == out_dtype
    assert_within(y, ref, tol, f"tile_add {what}")

    src0 = src.clone()
    out, buf, fn = place(out0, out_layout)
    ptr = out.data_ptr()
    assert ops.tile_add_(out, src, alpha, p, key_t) is None
    assert out.data_ptr() == ptr
    assert_within(fn(buf), ref, tol, f"tile_add_ {what}")
    assert_gaps_untouched(buf, fn, f"tile_add_ {what}")
    assert torch.equal(src, src0), "tile_add_ modified src"

    if out_dtype == F64 and src_dtype == F64:  # gradients wrt out (identity) and src (the fold adjoint)
        o, s = f64_leaf(out0), f64_leaf(src)
        g = rnd(tuple(out0.shape), F64, device)
        kw = dict(allow_unused=True, materialize_grads=True)
        got = torch.autograd.grad(ops.tile_add(o, s, alpha, p, key_t), (o, s), g, **kw)
        o2, s2 = f64_leaf(out0), f64_leaf(src)
        want = torch.autograd.grad(tile_ref(o2, s2, alpha, mask, p), (o2, s2), g, **kw)
        gmag = torch.autograd.grad(tile_ref(o2, s2, abs(alpha), mask, p), (o2, s2), g.abs(), **kw)
        for name, a, e, m in zip(("out", "src"), got, want, gmag):
            assert_within(a, e, bound(e, m, F64, F64), f"tile_add grad wrt {name} {what}")


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
LINEAR_DTYPES = [(F64, F64), (torch.float32, torch.float32), (torch.float32, F64), (torch.float16, torch.float32),
                 (torch.bfloat16, torch.float32)]


@st.composite
def linear_configs(draw, regime):
    lead, in_f = draw(row_shapes(regime, max_cols_small=24, out_cols=4))
    if in_f > 65536:  # wide: keep x @ W^T small
        out_f = draw(st.integers(1, 2))
    elif math.prod(lead) > 64:
        out_f = draw(st.integers(1, 4))
    else:
        out_f = draw(sizes(1, 24))
    r = draw(st.integers(1, in_f + 3) if in_f <= 64 else st.integers(1, 32))
    mini_r = draw(st.one_of(st.none(), st.sampled_from(divisors(out_f))))
    return lead, in_f, out_f, r, mini_r


def _linear_inputs(cfg, dtypes, bias, device, x_layout, w_layout, grads=False):
    lead, in_f, out_f, r, mini_r = cfg
    x_dtype, b_dtype = dtypes
    x, _, _ = place(rnd((*lead, in_f), x_dtype, device), x_layout, requires_grad=grads)
    w, _, _ = place(rnd((out_f, in_f), x_dtype, device), w_layout, requires_grad=grads)
    b = rnd((out_f,), x_dtype, device).requires_grad_(grads) if bias else None
    blk = rnd((r, out_f if mini_r is None else mini_r), b_dtype, device).requires_grad_(grads)
    return x, w, b, blk


@regime_params()
@device_params()
@PROFILE
@given(data=st.data(), seed=seeds, key=keys, dtypes=st.sampled_from(LINEAR_DTYPES), bias=st.booleans(),
       p=st.sampled_from(PS), x_layout=layouts, w_layout=layouts)
def test_linear_matches_reference(regime, device, data, seed, key, dtypes, bias, p, x_layout, w_layout):
    cfg = data.draw(linear_configs(regime), label="config")
    lead, in_f, out_f, r, mini_r = cfg
    x_dtype, b_dtype = dtypes
    torch.manual_seed(seed)
    x, w, b, blk = _linear_inputs(cfg, dtypes, bias, device, x_layout, w_layout)
    rows = math.prod(lead)
    key_t = torch.tensor(key, dtype=torch.int64, device=device) if p > 0 else None
    mask = recover_mask(rows, in_f, p, key_t, device) if p > 0 else None

    y = ops.linear(x, w, b, blk, p, key_t)
    assert y.shape == (*lead, out_f) and y.dtype == x_dtype and y.device == x.device
    ref = linear_ref(x, w, b, blk, mask, p)
    mag = linear_ref(abs_(x), abs_(w), abs_(b), abs_(blk), mask, p)
    extra = None
    if x_dtype in HALF:  # the base GEMM rounds in x's dtype before the final rounding (PEFT's precision)
        base_mag = abs_(x) @ abs_(w).t() + (0 if b is None else abs_(b))
        extra = 2 * EPS[x_dtype] * base_mag
    tol = bound(ref, mag, x_dtype, acc_dtype(x_dtype, b_dtype), extra=extra)
    what = f"linear(x {tuple(x.shape)}, W {tuple(w.shape)}, block {tuple(blk.shape)}, bias={bias}, p={p})"
    assert_within(y, ref, tol, what)


@regime_params()
@device_params()
@PROFILE
@given(data=st.data(), seed=seeds, key=keys, dtype=st.sampled_from([F64, torch.float32]), bias=st.booleans(),
       p=st.sampled_from(PS), x_layout=layouts, w_layout=layouts, g_layout=layouts)
def test_linear_gradients_match_reference(regime, device, data, seed, key, dtype, bias, p, x_layout, w_layout,
                                          g_layout):
    cfg = data.draw(linear_configs(regime), label="config")
    lead, in_f, out_f, r, mini_r = cfg
    torch.manual_seed(seed)
    x, w, b, blk = _linear_inputs(cfg, (dtype, dtype), bias, device, x_layout, w_layout, grads=True)
    rows = math.prod(lead)
    key_t = torch.tensor(key, dtype=torch.int64, device=device) if p > 0 else None
    mask = recover_mask(rows, in_f, p, key_t, device) if p > 0 else None
    g, _, _ = place(rnd((*lead, out_f), dtype, device), g_layout)

    inputs = [t for t in (x, w, b, blk) if t is not None]
    got = torch.autograd.grad(ops.linear(x, w, b, blk, p, key_t), inputs, g)
    refs = [f64_leaf(t) for t in (x, w, b, blk)]
    want = torch.autograd.grad(linear_ref(*refs, mask, p), [t for t in refs if t is not None], g.to(F64))
    mrefs = [None if t is None else abs_(t).requires_grad_(True) for t in (x, w, b, blk)]
    mags = torch.autograd.grad(linear_ref(*mrefs, mask, p), [t for t in mrefs if t is not None], abs_(g))
    names = [n for n, t in zip(("x", "weight", "bias", "block"), (x, w, b, blk)) if t is not None]
    what = f"linear(x {tuple(x.shape)}, W {tuple(w.shape)}, block {tuple(blk.shape)}, p={p})"
    for name, a, e, m, t in zip(names, got, want, mags, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_within(a, e, bound(e, m, dtype, dtype), f"grad wrt {name} of {what}")


# ---------------------------------------------------------------------------------------------
# merge / merge_ (default and mini)
# ---------------------------------------------------------------------------------------------
MERGE_DTYPES = [(F64, F64), (torch.float32, torch.float32), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float32), (torch.float32, F64), (torch.float32, torch.float16)]


@device_params()
@PROFILE
@given(out_f=sizes(1, 40), in_f=SMALL_SIZES, data=st.data(), seed=seeds,
       dtypes=st.sampled_from(MERGE_DTYPES), reverse=st.booleans(), w_layout=layouts, blk_layout=layouts)
def test_merge_matches_reference_and_unmerge_restores(device, out_f, in_f, data, seed, dtypes, reverse, w_layout,
                                                      blk_layout):
    w_dtype, b_dtype = dtypes
    r = data.draw(st.integers(1, in_f + 3), label="r")
    mini_r = data.draw(st.one_of(st.none(), st.sampled_from(divisors(out_f))), label="mini_r")
    torch.manual_seed(seed)
    w0 = rnd((out_f, in_f), w_dtype, device)
    blk, _, _ = place(rnd((r, out_f if mini_r is None else mini_r), b_dtype, device), blk_layout)
    ref = merge_ref(w0, blk, reverse)
    mag = merge_ref(abs_(w0), abs_(blk))
    tol = bound(ref, mag, w_dtype, acc_dtype(w_dtype, b_dtype), c=2.0)
    what = f"merge(W {tuple(w0.shape)}, block {tuple(blk.shape)}, reverse={reverse})"

    wv, _, _ = place(w0, w_layout)
    merged = ops.merge(wv, blk, reverse)
    assert merged.dtype == w_dtype and merged.shape == w0.shape
    assert torch.equal(wv, w0), "merge modified its weight argument"
    assert_within(merged, ref, tol, what)

    w, buf, fn = place(w0, w_layout)
    blk0 = blk.clone()
    assert ops.merge_(w, blk, reverse) is None
    assert_within(fn(buf), ref, tol, f"merge_ {what}")
    assert_gaps_untouched(buf, fn, f"merge_ {what}")
    assert torch.equal(blk, blk0), "merge_ modified the block"
    # round trip: the opposite merge restores W up to two roundings in W's dtype
    ops.merge_(w, blk, not reverse)
    assert_within(fn(buf), w0, 2 * bound(w0, mag, w_dtype, acc_dtype(w_dtype, b_dtype), c=2.0),
                  f"merge_ then the opposite merge_ of {what}")
    assert_gaps_untouched(buf, fn, f"merge_ round trip {what}")


# ---------------------------------------------------------------------------------------------
# bat: bat_weight, bat_linear, merge / unmerge with a 3-D block
# ---------------------------------------------------------------------------------------------
@st.composite
def bat_shapes(draw):
    r = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8]))
    out_f = r * draw(st.integers(1, 6))
    in_f = r * draw(st.integers(1, 6))
    lead = tuple(draw(st.sampled_from([0, 1, 2, 5])) for _ in range(draw(st.integers(0, 2))))
    return lead, in_f, out_f, r


BAT_DTYPES = [(F64, F64), (torch.float32, torch.float32), (torch.float16, torch.float32),
              (torch.bfloat16, torch.float32)]


@device_params()
@PROFILE
@given(shape=bat_shapes(), seed=seeds, dtypes=st.sampled_from(BAT_DTYPES),
       out_dtype=st.sampled_from([None, F64, torch.float32]), w_layout=layouts, blk_layout=layouts)
def test_bat_weight_matches_reference(device, shape, seed, dtypes, out_dtype, w_layout, blk_layout):
    _, in_f, out_f, r = shape
    w_dtype, b_dtype = dtypes
    torch.manual_seed(seed)
    w, _, _ = place(rnd((out_f, in_f), w_dtype, device), w_layout)
    blk, _, _ = place(rnd((out_f // r, r, r), b_dtype, device, scale=0.5), blk_layout)
    wp = ops.bat_weight(w, blk, out_dtype)
    store = out_dtype or b_dtype
    assert wp.dtype == store and wp.shape == w.shape
    ref = bat_weight_ref(w, blk)
    mag = bat_weight_ref(abs_(w), abs_(blk))
    acc = acc_dtype(w_dtype, b_dtype)
    assert_within(wp, ref, bound(ref, mag, store, acc), f"bat_weight(W {tuple(w.shape)}, r={r}, dtype={out_dtype})")


@device_params()
@PROFILE
@given(shape=bat_shapes(), seed=seeds, w_dtype=st.sampled_from([F64, torch.float32, torch.float16, torch.bfloat16]),
       mp_dtype=st.sampled_from([F64, torch.float32]), out_dtype=st.sampled_from([None, F64, torch.float32]),
       w_layout=layouts, m_layout=layouts, residual=st.booleans())
def test_bat_transform_matches_reference(device, shape, seed, w_dtype, mp_dtype, out_dtype, w_layout, m_layout,
                                         residual):
    """bat_transform and bat_transform_ (the per-tile affine map behind bat, merge and unmerge)."""
    _, cols, rows, r = shape
    torch.manual_seed(seed)
    w, _, _ = place(rnd((rows, cols), w_dtype, device), w_layout)
    m, _, _ = place(rnd((rows // r, r, r), mp_dtype, device, scale=0.5), m_layout)
    p = rnd((rows // r, r, r), mp_dtype, device)
    got = ops.bat_transform(w, m, p, out_dtype, residual)
    store = out_dtype or w_dtype
    assert got.dtype == store and got.shape == w.shape
    ref = bat_transform_ref(w, m, p, residual)
    mag = bat_transform_ref(abs_(w), abs_(m), abs_(p), residual)
    assert_within(got, ref, bound(ref, mag, store, acc_dtype(w_dtype, mp_dtype)),
                  f"bat_transform(w {tuple(w.shape)}, r={r}, dtype={out_dtype}, residual={residual})")
    inplace = w.clone()
    ops.bat_transform_(inplace, m, p, residual)
    if device == "cpu":  # one kernel both ways: bit for bit
        assert torch.equal(inplace, ops.bat_transform(w, m, p, None, residual))
    else:  # CUDA's "auto": a batched GEMM out of place, the kernel in place (impl_choice.h; H200, 2026-12-04)
        assert_within(inplace, ref, bound(ref, mag, w_dtype, acc_dtype(w_dtype, mp_dtype)),
                      f"bat_transform_(w {tuple(w.shape)}, r={r}, residual={residual})")


@device_params()
@PROFILE
@given(shape=bat_shapes(), seed=seeds, dtype=st.sampled_from([F64, torch.float32]), bias=st.booleans(),
       x_layout=layouts, w_layout=layouts)
def test_bat_linear_matches_reference(device, shape, seed, dtype, bias, x_layout, w_layout):
    lead, in_f, out_f, r = shape
    torch.manual_seed(seed)
    x, _, _ = place(rnd((*lead, in_f), dtype, device), x_layout, requires_grad=True)
    w, _, _ = place(rnd((out_f, in_f), dtype, device), w_layout)
    b = rnd((out_f,), dtype, device) if bias else None
    blk = rnd((out_f // r, r, r), dtype, device, scale=0.5).requires_grad_(True)
    y = ops.bat_linear(x, w, b, blk)
    assert y.shape == (*lead, out_f) and y.dtype == dtype

    xr, blkr = f64_leaf(x), f64_leaf(blk)
    ref = xr @ bat_weight_ref(w, blkr).t() + (0 if b is None else b.to(F64))
    xm, bm = abs_(x).requires_grad_(True), abs_(blk).requires_grad_(True)
    mag = xm @ bat_weight_ref(abs_(w), bm).t() + (0 if b is None else abs_(b))
    what = f"bat_linear(x {tuple(x.shape)}, W {tuple(w.shape)}, r={r}, bias={bias})"
    assert_within(y, ref, bound(ref, mag, dtype, dtype), what)

    g = rnd(tuple(y.shape), dtype, device)
    got = torch.autograd.grad(y, (x, blk), g)
    want = torch.autograd.grad(ref, (xr, blkr), g.to(F64))
    mags = torch.autograd.grad(mag, (xm, bm), abs_(g))
    for name, a, e, m in zip(("x", "block"), got, want, mags):
        assert_within(a, e, bound(e, m, dtype, dtype), f"grad wrt {name} of {what}")


@device_params()
@PROFILE
@given(shape=bat_shapes(), seed=seeds, dtypes=st.sampled_from(BAT_DTYPES), w_layout=layouts)
def test_bat_merge_matches_reference_and_unmerge_restores(device, shape, seed, dtypes, w_layout):
    _, in_f, out_f, r = shape
    w_dtype, b_dtype = dtypes
    torch.manual_seed(seed)
    w0 = rnd((out_f, in_f), w_dtype, device)
    blk = rnd((out_f // r, r, r), b_dtype, device, scale=0.05)  # I + B_i well conditioned
    ref = bat_weight_ref(w0, blk)
    mag = bat_weight_ref(abs_(w0), abs_(blk))
    acc = acc_dtype(w_dtype, b_dtype)
    what = f"bat merge(W {tuple(w0.shape)}, r={r})"

    wv, _, _ = place(w0, w_layout)
    merged = ops.merge(wv, blk)
    assert merged.dtype == w_dtype
    assert_within(merged, ref, bound(ref, mag, w_dtype, acc), what)

    w, buf, fn = place(w0, w_layout)
    ops.merge_(w, blk)
    assert_within(fn(buf), ref, bound(ref, mag, w_dtype, acc), f"merge_ {what}")
    ops.merge_(w, blk, True)
    # (I + B)^-1 has norm <= 1 / (1 - ||B||) <= 1.6 here: the merge's rounding, carried through it,
    # plus the unmerge's own sums and rounding.
    scale = mag.abs().amax() if mag.numel() else torch.tensor(0.0)
    tol = 4 * EPS[w_dtype] * scale + C_ACC * r * EPS[acc] * scale + 2 * EPS[w_dtype] * abs_(w0)
    assert_within(fn(buf), w0, tol, f"merge_ then unmerge of {what}")
    assert_gaps_untouched(buf, fn, f"bat merge_ round trip {what}")


# ---------------------------------------------------------------------------------------------
# MissLinear
# ---------------------------------------------------------------------------------------------
@st.composite
def module_configs(draw):
    mode = draw(st.sampled_from(["default", "mini", "bat"]))
    if mode == "bat":
        r = draw(st.sampled_from([1, 2, 3, 4, 5]))
        in_f, out_f = r * draw(st.integers(1, 5)), r * draw(st.integers(1, 5))
        mini_r = 1
    else:
        in_f = draw(sizes(1, 24))
        out_f = draw(sizes(1, 24))
        r = draw(st.integers(1, in_f + 3))
        mini_r = draw(st.sampled_from(divisors(out_f))) if mode == "mini" else 1
    lead = tuple(draw(st.sampled_from([0, 1, 3, 4])) for _ in range(draw(st.integers(0, 2))))
    return mode, in_f, out_f, r, mini_r, lead


def _layer(mode, in_f, out_f, r, mini_r, bias, dtype, device, dropout=0.0):
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > in, dropout ignored in bat mode
        return miss_ext.MissLinear(base, r, mode=mode, mini_r=mini_r, dropout=dropout, init_weights=False)


@device_params()
@PROFILE
@given(cfg=module_configs(), seed=seeds, dtype=st.sampled_from([F64, torch.float32]), bias=st.booleans(),
       dropout=st.sampled_from(PS[:3]), training=st.booleans())
def test_miss_linear_forward_backward_match_reference(device, cfg, seed, dtype, bias, dropout, training):
    mode, in_f, out_f, r, mini_r, lead = cfg
    torch.manual_seed(seed)
    layer = _layer(mode, in_f, out_f, r, mini_r, bias, dtype, device, dropout)
    layer.train(training)
    w, b, blk = layer.base_layer.weight, layer.base_layer.bias, layer.miss_block
    x = rnd((*lead, in_f), dtype, device).requires_grad_(True)
    torch.manual_seed(seed + 1)
    y = layer(x)
    g = rnd(tuple(y.shape), dtype, device)
    gx, gb = torch.autograd.grad(y, (x, blk), g)
    assert gb.shape == blk.shape and w.grad is None

    xr, br = f64_leaf(x), f64_leaf(blk)
    xm, bm = abs_(x).requires_grad_(True), abs_(blk).requires_grad_(True)
    if mode == "bat":
        ref = xr @ bat_weight_ref(w, br).t() + (0 if b is None else b.to(F64))
        mag = xm @ bat_weight_ref(abs_(w), bm).t() + (0 if b is None else abs_(b))
    else:
        p = dropout if training else 0.0
        mask = None
        if p > 0:  # the key the forward drew: the first draw after the same seed
            torch.manual_seed(seed + 1)
            key = miss_ext.new_dropout_key(device)
            mask = recover_mask(math.prod(lead), in_f, p, key, device)
        ref = linear_ref(xr, w, b, br, mask, p)
        mag = linear_ref(xm, abs_(w), abs_(b), bm, mask, p)
    what = f"MissLinear({in_f}, {out_f}, r={r}, mode={mode}, mini_r={mini_r}, dropout={dropout}, train={training})"
    assert y.dtype == dtype
    assert_within(y, ref, bound(ref, mag, dtype, dtype), what)
    want = torch.autograd.grad(ref, (xr, br), g.to(F64))
    mags = torch.autograd.grad(mag, (xm, bm), abs_(g))
    for name, a, e, m in zip(("x", "miss_block"), (gx, gb), want, mags):
        assert_within(a, e, bound(e, m, dtype, dtype), f"grad wrt {name} of {what}")


@device_params()
@PROFILE
@given(mode=st.sampled_from(["default", "mini", "bat"]), r=st.sampled_from([1, 2, 3, 4, 6]),
       sizes=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)), seed=seeds,
       dtype=st.sampled_from([torch.float32, F64, torch.bfloat16]), bias=st.booleans(), mini_pick=st.integers(0, 10))
def test_save_load_round_trip(device, mode, r, sizes, seed, dtype, bias, mini_pick):
    # in, hidden, out: multiples of r in bat mode (r must divide them); any size otherwise
    in_f, hid, out_f = (s * r for s in sizes) if mode == "bat" else (s * 3 + 1 for s in sizes)
    common = divisors(math.gcd(hid, out_f))
    mini_r = common[mini_pick % len(common)] if mode == "mini" else 1
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, hid, bias=bias), nn.ReLU(), nn.Linear(hid, out_f, bias=bias))
    model = model.to(dtype=dtype, device=device)
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        miss_ext.apply_miss(model, ["0", "2"], r=r, mode=mode, mini_r=mini_r, init_weights=False)
    x = rnd((5, in_f), dtype, device)
    model.eval()
    y = model(x)
    with tempfile.TemporaryDirectory() as d:
        miss_ext.save_adapter(model, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            miss_ext.load_adapter(fresh, d)
    fresh.eval()
    for name in ("0", "2"):
        a, b = getattr(model, name), getattr(fresh, name)
        assert isinstance(b, miss_ext.MissLinear) and (b.mode, b.r) == (mode, r)
        assert a.miss_block.dtype == b.miss_block.dtype and a.miss_block.device == b.miss_block.device
        assert torch.equal(a.miss_block, b.miss_block), f"block of layer {name} changed in the round trip"
    assert torch.equal(fresh(x), y), "outputs differ after save_adapter -> load_adapter"
    # ... and the loaded model computes the reference
    h = x.to(F64)
    for name, act in (("0", True), ("2", False)):
        lay = getattr(fresh, name)
        w, b, blk = lay.base_layer.weight, lay.base_layer.bias, lay.miss_block
        if mode == "bat":
            h = h @ bat_weight_ref(w, blk).t() + (0 if b is None else b.to(F64))
        else:
            h = linear_ref(h, w, b, blk)
        if act:
            h = h.to(dtype).to(F64).relu()  # the hidden activation is stored in the model's dtype
    tol = 64 * EPS[dtype] * h.abs() + 64 * EPS[dtype] * h.abs().amax() if h.numel() else 0
    assert_within(y, h, tol, f"saved/loaded model vs reference ({mode}, r={r})")
