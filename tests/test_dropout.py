"""Dropout of the adapter branch: a Philox4x32-10 mask recomputed from a key, never stored.

Contract (csrc/torch_bindings.cpp, csrc/ops/common/dropout_mask.h): key = int64 [seed, offset] on
the data's device; element (row, col) of the flattened (rows, in) input is dropped iff its 32-bit
uniform u is below round(p * 2^32), where u's high 16 bits are half col % 2 of word (col % 8) // 2 of
Philox4x32-10(counter=(col // 8, row, offset_lo, offset_hi), key=(seed_lo, seed_hi)) and its low
16 bits, needed only where the high half ties the threshold's, come from a second stream
(reference.philox_mask); kept elements are scaled by 1 / (1 - p). p == 0 ignores the key.

The statistical tests use fixed keys, so they are deterministic; their tolerances (6 standard
deviations) are there so that any correct generator passes, whatever the key.
"""
import math
import warnings

import pytest
import torch
from torch import nn

import miss_ext
from conftest import needs_gpu, rand
from reference import (F64, fold_ref, linear_ref, philox4x32_10, philox_high_half, philox_mask, recover_mask,
                       tie_rates, tile_block)

ops = torch.ops.miss


def key(seed, offset, device="cpu"):
    """A dropout key with fixed values on `device` (the data's device, where the ops read it)."""
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


KEYS = [
    pytest.param(0, 0, id="zero"),
    pytest.param(1234, 5678, id="small"),
    pytest.param(2**62 + 987654321, 2**40 + 3, id="high-bits"),
    pytest.param(-1, -2, id="negative-as-uint64"),
]


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------
# Random123's published known-answer vectors for Philox4x32-10 (tests/kat_vectors of the Random123
# distribution; the same three are checked by TensorFlow's and other Philox implementations):
# (counter words, key words) -> output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,k,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, k, expected):
    assert philox4x32_10(counter, k) == expected


def _fold_mask(rows, cols, p, k, device="cpu", dtype=F64):
    """The mask fold uses: fold(ones, r=cols) puts each column alone in its shard."""
    s = ops.fold(torch.ones(rows, cols, dtype=dtype, device=device), cols, p, k)
    return (s.to(F64) * (1 - p)).round().cpu()


def _linear_mask(rows, cols, p, k, device="cpu"):
    """The mask linear uses: zero weight, r = in, block = identity -> y = mask / (1 - p)."""
    x = torch.ones(rows, cols, dtype=F64, device=device)
    w = torch.zeros(cols, cols, dtype=F64, device=device)
    y = ops.linear(x, w, None, torch.eye(cols, dtype=F64, device=device), p, k)
    return (y * (1 - p)).round().cpu()


@pytest.mark.parametrize("seed,offset", KEYS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.37])
def test_every_op_draws_the_documented_philox_mask(device, seed, offset, p):
    rows, cols = 6, 23  # a partial group of eight at the end of each row
    expected = philox_mask(seed, offset, rows, cols, p)
    k = key(seed, offset, device)
    k0 = k.clone()
    assert torch.equal(recover_mask(rows, cols, p, k, device).cpu(), expected), "tile_add_ mask"
    assert torch.equal(_fold_mask(rows, cols, p, k, device), expected), "fold mask"
    assert torch.equal(_linear_mask(rows, cols, p, k, device), expected), "linear mask"
    assert torch.equal(k, k0), "the op modified its key"


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("low_delta", [0, 1], ids=["kept", "dropped"])
def test_a_tie_of_the_high_half_is_settled_by_the_low_bits(device, dtype, low_delta):
    """The rare elements (2^-16) whose high 16 bits equal the threshold's draw 16 more bits: made
    to happen here by a rate chosen from the element's own bits, at columns inside aligned vectors
    on a GPU (widths float64 2, float32 4, bf16 8; the CPU draws whole rows; the scalar path is
    the emulator's misaligned case, test_cuda_emulated.py), with a small key and with one whose
    seed and offset have high words (both streams read all four words). The element's decision
    and the whole mask follow the documented generator (reference.philox_mask)."""
    rows, cols = 3, 40
    for seed, offset, row, col in ((97, 5, 1, 13), (97, 5, 2, 39), (2**62 + 987654321, 2**40 + 3, 1, 21)):
        p, kept = tie_rates(seed, offset, row, col)[low_delta], low_delta == 0
        k = key(seed, offset, device)
        expected = philox_mask(seed, offset, rows, cols, p)
        assert expected[row, col] == (1.0 if kept else 0.0)
        assert torch.equal(_fold_mask(rows, cols, p, k, device, dtype), expected), (row, col)
        assert torch.equal(recover_mask(rows, cols, p, k, device).cpu(), expected), (row, col)


def test_a_tie_at_a_threshold_with_zero_low_bits_keeps_without_more_bits(device):
    """A threshold whose low 16 bits are 0: a tie of the high half means u >= threshold, kept."""
    seed, offset, row, col = 11, 0, 0, 5
    p = (philox_high_half(seed, offset, row, col) << 16) / 2.0**32
    expected = philox_mask(seed, offset, 2, 16, p)
    assert expected[row, col] == 1.0
    assert torch.equal(recover_mask(2, 16, p, key(seed, offset, device), device).cpu(), expected)


def test_mask_is_a_function_of_key_row_and_column_only(device):
    p, k = 0.4, key(31, 41, device)
    full = recover_mask(12, 40, p, k, device)
    # the same for any dtype of the data
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(_fold_mask(12, 40, p, k, device, dt), full.cpu()), dt
    # row = flattened leading index: a 3-D x draws the mask of its (rows, in) view
    x = rand(3, 4, 40, dtype=F64, device=device)
    torch.testing.assert_close(ops.fold(x, 7, p, k), fold_ref(x.reshape(12, 40), 7, full, p).reshape(3, 4, 7))
    # independent of r: the same mask whatever the shard size
    for r in (1, 3, 16, 64):
        torch.testing.assert_close(ops.fold(x, r, p, k), fold_ref(x, r, full, p))
    # a non-contiguous key tensor is read by value
    strided = torch.tensor([31, 0, 41], dtype=torch.int64, device=device)[::2]
    assert torch.equal(recover_mask(12, 40, p, strided, device), full)


def test_same_key_same_mask_other_key_other_mask():
    x = rand(64, 40, dtype=torch.float32)
    p = 0.3
    a = ops.fold(x, 4, p, key(1, 2))
    assert torch.equal(a, ops.fold(x, 4, p, key(1, 2))), "same key, different output"
    assert not torch.allclose(a, ops.fold(x, 4, p, key(1, 3))), "offset ignored"
    assert not torch.allclose(a, ops.fold(x, 4, p, key(2, 2))), "seed ignored"
    assert not torch.allclose(a, ops.fold(x, 4, p, key(1 + 2**32, 2))), "seed high word ignored"
    assert not torch.allclose(a, ops.fold(x, 4, p, key(1, 2 + 2**32))), "offset high word ignored"
    w, b, blk = rand(20, 40), rand(20), rand(4, 20)
    y = ops.linear(x, w, b, blk, p, key(1, 2))
    assert torch.equal(y, ops.linear(x, w, b, blk, p, key(1, 2)))
    assert not torch.allclose(y, ops.linear(x, w, b, blk, p, key(2, 1)))


def test_new_dropout_key_follows_the_torch_seed(device):
    torch.manual_seed(3)
    a = miss_ext.new_dropout_key(torch.device(device))
    torch.manual_seed(3)
    b = miss_ext.new_dropout_key(torch.device(device))
    c = miss_ext.new_dropout_key(torch.device(device))
    assert a.dtype == torch.int64 and a.shape == (2,) and a.device.type == device
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert bool((a >= 0).all())
    assert miss_ext.new_dropout_key().device.type == "cpu"  # the default


def test_new_dropout_key_draws_on_the_requested_device_without_reading_it():
    k = miss_ext.new_dropout_key(torch.device("meta"))  # no values exist on meta: nothing is read
    assert k.device.type == "meta" and k.shape == (2,) and k.dtype == torch.int64
    x = torch.empty(4, 8, device="meta")
    assert ops.fold(x, 4, 0.5, k).shape == (4, 4)


@pytest.mark.parametrize("path", ["fused", "base-module", "scripted"])
@pytest.mark.parametrize("bad", [(3, 15), (), torch.float64, torch.int64],
                         ids=["wrong-in_features", "scalar", "float64", "int64"])
def test_a_refused_forward_leaves_the_global_rng_alone(path, bad):
    """A training forward with dropout that is refused for its input's size raises before the key
    is drawn, so the global RNG (torch.manual_seed's stream) is where it was, as with PEFT, whose
    base layer raises before its dropout draws. Scripted too: TorchScript dropped the check's op
    call, whose result was unused, so the scripted layer drew first (a review, 2026-12-04)."""
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, dropout=0.1)
    if path == "base-module":
        layer.base_layer.register_forward_hook(lambda module, args, out: out)
    shape, dtype = (bad, torch.float32) if isinstance(bad, tuple) else ((3, 16), bad)
    state = torch.random.get_rng_state()
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(torch.randn(shape).to(dtype))
    state_after_input = torch.random.get_rng_state()
    layer.train()
    if path == "scripted":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation (torch 2.13+)
            layer = torch.jit.script(layer)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(torch.zeros(shape, dtype=dtype))
    assert torch.equal(torch.random.get_rng_state(), state_after_input)
    assert not torch.equal(state, state_after_input)  # the check sees a draw (torch.randn's)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_forward_refused_under_autocast_leaves_the_global_rng_alone(dtype):
    """Under autocast the dtype checks before the key are skipped (autocast casts floating inputs),
    but an integer or bool x is refused by the op all the same: it used to draw the key first."""
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, dropout=0.1).train()
    x = torch.zeros(3, 16, dtype=dtype)
    state = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(x)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("x_dtype, base_dtype, bias_dtype", [
    (torch.float64, torch.float32, None), (torch.float32, torch.float64, None),
    (torch.float32, torch.float32, torch.float64)], ids=["x-f64", "weight-f64", "bias-f64"])
def test_a_float64_mismatch_under_autocast_leaves_the_global_rng_alone(x_dtype, base_dtype, bias_dtype):
    """Autocast casts float32/16/bf16 and leaves float64 as it is, so float64 beside another
    floating dtype cannot meet under it either, and the op refuses: the dtype checks before the
    key used to be skipped under autocast altogether, so the key was drawn first (a review,
    2026-12-04). A pair autocast does make equal (float32 x, bf16 weight) still runs."""
    base = nn.Linear(16, 8).to(base_dtype)
    if bias_dtype is not None:
        base.bias = nn.Parameter(base.bias.detach().to(bias_dtype))
    layer = miss_ext.MissLinear(base, r=4, dropout=0.1).train()
    state = torch.random.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((TypeError, RuntimeError),
                                                                     match="Double|Float|float64|dtype"):
        layer(torch.zeros(3, 16, dtype=x_dtype))
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = miss_ext.MissLinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, dropout=0.1).train()(torch.ones(3, 16))
    assert y.dtype == torch.float32 and not torch.equal(torch.random.get_rng_state(), state)


def test_the_pre_draw_check_compiles_under_autocast():
    """The pre-draw check reads autocast's state and dtype (torch.is_autocast_enabled,
    torch.get_autocast_dtype) since 2026-12-04: a compiled training forward under autocast still
    makes one graph (fullgraph=True) and draws the key eager draws."""
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, dropout=0.1).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        want = layer(x)
        torch.manual_seed(1)
        got = compiled(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("path", ["fused", "hooked"])
def test_a_rate_above_one_set_on_a_live_layer_is_refused_before_the_draw(path):
    """The constructor checks dropout; a later `layer.dropout = 1.5` was refused by the op, after
    the key was drawn (helper review, 2026-12-03). Now refused before, naming the value."""
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, dropout=0.1).train()
    if path == "hooked":
        layer.base_layer.register_forward_hook(lambda module, args, out: out)
    layer.dropout = 1.5
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\], got p=1.5 \(its dropout\)"):
        layer(torch.ones(3, 16))
    assert torch.equal(torch.random.get_rng_state(), state)
    layer.dropout = 1.0  # the ops' range: every column dropped
    assert torch.equal(layer(torch.ones(3, 16)), layer.base_layer(torch.ones(3, 16)))
    # A negative rate and one that is no number (a str met "'>' not supported": a new-user pass,
    # 2026-12-04): refused before the draw too, naming the value.
    state = torch.random.get_rng_state()
    for bad, error, message in ((-0.1, ValueError, r"got p=-0.1 \(its dropout\)"),
                                ("0.1", TypeError, r"dropout must be a float in \[0, 1\], got str '0.1'")):
        layer.dropout = bad
        with pytest.raises(error, match=message):
            layer(torch.ones(3, 16))
        assert torch.equal(torch.random.get_rng_state(), state)


def test_a_key_on_another_device_is_refused():
    x = rand(4, 8)
    for bad in (key(1, 2, "meta"),):
        with pytest.raises(ValueError, match=r"key must be on the data's device cpu, got a key on meta"):
            ops.fold(x, 4, 0.5, bad)
        with pytest.raises(ValueError, match=r"key must be on the data's device"):
            ops.tile_add_(x.clone(), rand(4, 2), 1.0, 0.5, bad)
        with pytest.raises(ValueError, match=r"key must be on the data's device"):
            ops.linear(x, rand(6, 8), None, rand(4, 6), 0.5, bad)
    with pytest.raises(ValueError, match=r"key must be on the data's device meta, got a key on cpu"):
        ops.fold(torch.empty(4, 8, device="meta"), 4, 0.5, key(1, 2))


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def _within(observed, expected, std, what):
    assert abs(observed - expected) <= 6 * std, f"{what}: {observed} vs {expected} (6 sd = {6 * std})"


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_statistics(p):
    rows, cols = 1024, 1000
    m = recover_mask(rows, cols, p, key(20240917, 77))
    n = m.numel()
    q = 1 - p
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    _within(m.mean().item(), q, math.sqrt(p * q / n), "kept fraction")
    # every 16-bit half of a Philox call's words and both row parities keep 1 - p
    for lane in range(8):
        sub = m[:, lane::8]
        _within(sub.mean().item(), q, math.sqrt(p * q / sub.numel()), f"lane {lane}")
    for par in range(2):
        sub = m[par::2]
        _within(sub.mean().item(), q, math.sqrt(p * q / sub.numel()), f"row parity {par}")
    # neighbours are independent: P(both kept) = q^2 along rows and along columns
    both_c = (m[:, 1:] * m[:, :-1]).mean().item()
    both_r = (m[1:] * m[:-1]).mean().item()
    sd = math.sqrt(q * q * (1 - q * q) / (rows * (cols - 1))) * 2  # x2: overlapping pairs
    _within(both_c, q * q, sd, "adjacent columns")
    _within(both_r, q * q, sd, "adjacent rows")
    # a different offset gives an independent mask: agreement p^2 + q^2
    other = recover_mask(rows, cols, p, key(20240917, 78))
    agree = (m == other).double().mean().item()
    a = p * p + q * q
    _within(agree, a, math.sqrt(a * (1 - a) / n), "agreement of two offsets")
    # no two rows are the same (probability of a repeat is negligible for p not near 0 or 1)
    if 0.1 <= p <= 0.9:
        assert torch.unique(m, dim=0).shape[0] == rows


def test_kept_elements_are_scaled_by_exactly_one_over_one_minus_p():
    p = 0.3
    out = torch.zeros(50, 64, dtype=F64)
    ops.tile_add_(out, torch.ones(50, 1, dtype=F64), 1.0, p, key(5, 5))
    kept = out[out != 0]
    assert kept.numel() > 0
    assert torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - p)))


def test_fold_with_dropout_is_unbiased():
    """E[fold(dropout(x))] = fold(x): average over many rows holding the same x."""
    p, r, rows = 0.3, 5, 20000
    row = rand(37, dtype=F64)
    x = row.expand(rows, 37)
    s = ops.fold(x, r, p, key(8, 9))
    mean = s.mean(0)
    exact = fold_ref(row, r)
    for j in range(r):
        sumsq = (row[j::r] ** 2).sum().item()
        std = math.sqrt(p / (1 - p) * sumsq / rows)
        _within(mean[j].item(), exact[j].item(), std, f"column {j}")


# ---------------------------------------------------------------------------------------------
# p == 0, p == 1, eval mode
# ---------------------------------------------------------------------------------------------
def test_p_zero_is_no_dropout_and_ignores_the_key(device):
    x = rand(2, 5, 10, device=device)
    w, b, blk = rand(20, 10, device=device), rand(20, device=device), rand(3, 4, device=device)
    # p == 0 reads no key: wrong dtypes and shapes are ignored (on the data's device)
    garbage = [None, key(1, 2, device), torch.tensor([1.5, 2.5], device=device), torch.tensor([1, 2, 3], device=device),
               torch.tensor([[7]], device=device)]
    s0 = ops.fold(x, 3)
    y0 = ops.linear(x, w, b, blk)
    for k in garbage:
        assert torch.equal(ops.fold(x, 3, 0.0, k), s0)
        assert torch.equal(ops.linear(x, w, b, blk, 0.0, k), y0)
        out = rand(4, 9, device=device)
        ref = out.clone()
        src = rand(4, 2, device=device)
        ops.tile_add_(ref, src)
        ops.tile_add_(out, src, 1.0, 0.0, k)
        assert torch.equal(out, ref)
    # ... but a key on another device is refused even then: it would select that device's kernel
    # (a meta key beside CPU data once ran the Meta kernel and returned uninitialised memory)
    with pytest.raises(ValueError, match="key must be on the data's device"):
        ops.fold(x, 3, 0.0, key(1, 2, "meta"))
    with pytest.raises(ValueError, match="key must be on the data's device"):
        ops.linear(x, w, b, blk, 0.0, key(1, 2, "meta"))


def test_p_one_drops_everything(device):
    k = key(4, 4, device)
    x = rand(6, 10, device=device, requires_grad=True)
    s = ops.fold(x, 3, 1.0, k)
    assert torch.equal(s, torch.zeros_like(s))
    w, b = rand(20, 10, device=device), rand(20, device=device)
    blk = rand(3, 20, device=device, requires_grad=True)
    y = ops.linear(x, w, b, blk, 1.0, k)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    g = rand(6, 20, device=device)
    gx, gb = torch.autograd.grad(y, (x, blk), g)
    torch.testing.assert_close(gx, g @ w)  # the adapter part of grad_x is fully masked
    assert torch.equal(gb, torch.zeros_like(gb))
    out = rand(6, 10, device=device)
    out0 = out.clone()
    ops.tile_add_(out, rand(6, 3, device=device), 1.0, 1.0, k)
    assert torch.equal(out, out0)


def _miss(in_f=10, out_f=20, r=3, dropout=0.5, **kw):
    return miss_ext.MissLinear(nn.Linear(in_f, out_f), r, dropout=dropout, init_weights=False, **kw)


def test_miss_linear_eval_ignores_dropout():
    m = _miss(dropout=0.5).eval()
    x = rand(4, 7, 10)
    y = m(x)
    ref = linear_ref(x, m.base_layer.weight.detach(), m.base_layer.bias.detach(), m.miss_block.detach())
    torch.testing.assert_close(y.to(F64), ref, rtol=2e-5, atol=2e-5)
    assert torch.equal(m(x), y)
    # ... and training mode does apply it, with a fresh mask each call
    m.train()
    y1, y2 = m(x), m(x)
    assert not torch.allclose(y1, y), "dropout not applied in training"
    assert not torch.allclose(y1, y2), "the same mask twice in training"


@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4)])
def test_miss_linear_training_backward_uses_the_forward_mask(mode, mini_r):
    m = _miss(dropout=0.3, mode=mode, mini_r=mini_r).train()
    x = rand(2, 5, 10, requires_grad=True)
    torch.manual_seed(123)
    y = m(x)
    torch.manual_seed(123)
    k = miss_ext.new_dropout_key()  # the key the module drew
    mask = recover_mask(10, 10, 0.3, k)
    w, b = m.base_layer.weight.detach(), m.base_layer.bias.detach()
    xr = x.detach().to(F64).requires_grad_(True)
    br = m.miss_block.detach().to(F64).requires_grad_(True)
    y_ref = linear_ref(xr, w, b, br, mask, 0.3)
    torch.testing.assert_close(y.to(F64), y_ref, rtol=2e-5, atol=2e-5)
    g = rand(2, 5, 20)
    y.backward(g)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (xr, br), g.to(F64))
    torch.testing.assert_close(x.grad.to(F64), gx_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(m.miss_block.grad.to(F64), gb_ref, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# forward and backward share one mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "in_f,out_f,r,mini_r,lead",
    [(10, 20, 2, None, (6,)), (7, 5, 3, None, (2, 3)), (8, 6, 16, None, (5,)), (10, 20, 3, 5, (4,)),
     (12, 6, 4, 1, (2, 2)), (10, 20, 4, None, ())],
    ids=["10x20-r2", "7x5-r3", "8x6-r16", "mini-r3-m5", "mini-r4-m1", "1d"],
)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_linear_dropout_forward_and_grads_use_one_mask(device, in_f, out_f, r, mini_r, lead, p):
    k = key(2024, 11, device)
    x = rand(*lead, in_f, dtype=F64, device=device, requires_grad=True)
    w = rand(out_f, in_f, dtype=F64, device=device, requires_grad=True)
    b = rand(out_f, dtype=F64, device=device, requires_grad=True)
    blk = rand(r, out_f if mini_r is None else mini_r, dtype=F64, device=device, requires_grad=True)
    rows = math.prod(lead)
    mask = recover_mask(rows, in_f, p, k, device)
    assert 0 < mask.sum() < mask.numel() or rows * in_f < 8
    y = ops.linear(x, w, b, blk, p, k)
    refs = [t.detach().clone().requires_grad_(True) for t in (x, w, b, blk)]
    y_ref = linear_ref(*refs, mask=mask, p=p)
    torch.testing.assert_close(y, y_ref)
    g = rand(*y.shape, dtype=F64, device=device)
    got = torch.autograd.grad(y, (x, w, b, blk), g)
    want = torch.autograd.grad(y_ref, refs, g)
    for name, a, e in zip(("x", "weight", "bias", "block"), got, want):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad {name}: {m}")
    # explicit form of grad_x: G W + mask/(1-p) * (G D_full^T)[..., i mod r]
    g2 = g.reshape(rows, out_f)
    adapter = (g2 @ tile_block(blk.detach(), out_f).t())[:, torch.arange(in_f, device=device) % r]
    gx = g2 @ w.detach() + mask / (1 - p) * adapter
    torch.testing.assert_close(got[0].reshape(rows, in_f), gx)


def test_fold_backward_uses_the_forward_mask(device):
    p, k = 0.45, key(6, 7, device)
    x = rand(3, 4, 11, dtype=F64, device=device, requires_grad=True)
    g = rand(3, 4, 5, dtype=F64, device=device)
    (gx,) = torch.autograd.grad(ops.fold(x, 5, p, k), x, g)
    mask = recover_mask(12, 11, p, k, device).reshape(3, 4, 11)
    torch.testing.assert_close(gx, mask / (1 - p) * g[..., torch.arange(11, device=device) % 5])


# ---------------------------------------------------------------------------------------------
# memory: no (T x in) tensor is kept for backward
# ---------------------------------------------------------------------------------------------
def _saved_tensors(module, x):
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    return y, saved


def test_dropout_saves_no_input_sized_tensor():
    T, in_f, out_f, r = 64, 32, 48, 4
    m = miss_ext.MissLinear(nn.Linear(in_f, out_f), r, dropout=0.1, init_weights=False).train()
    x = rand(T, in_f, requires_grad=True)  # an activation: requires grad, like a hidden state
    y, saved = _saved_tensors(m, x)
    numels = [n for _, n, _ in saved]
    assert T * in_f not in numels, f"a T x in tensor was saved: {saved}"
    assert (T, r) in [s for s, _, _ in saved], f"S (T, r) not saved: {saved}"
    allowed = {(T, r), (2,), (out_f, in_f), (r, out_f)}
    assert {s for s, _, _ in saved} <= allowed, f"unexpected saved tensors: {saved}"
    y.sum().backward()  # and backward works from what was saved
    assert x.grad is not None and m.miss_block.grad is not None

    # positive control: a trainable base weight needs x, and then the hook does see it
    m.base_layer.weight.requires_grad_(True)
    _, saved = _saved_tensors(m, rand(T, in_f, requires_grad=True))
    assert T * in_f in [n for _, n, _ in saved]


def test_new_dropout_keys_are_drawn_from_the_whole_62_bit_range():
    """Each call draws a fresh [seed, offset] uniformly below 2^62 (ops.new_dropout_key): a narrow
    range would repeat keys, and with them the masks, across training steps."""
    keys = torch.stack([miss_ext.new_dropout_key() for _ in range(64)])
    assert keys.dtype == torch.int64 and keys.shape == (64, 2)
    assert len({tuple(k) for k in keys.tolist()}) == 64
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**62
    assert int(keys.max()) >= 2**60  # fails by chance with probability 4^-128


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=needs_gpu)])
def test_tile_add_dropout_with_a_periodic_src_draws_the_mask_of_out_rows(device):
    """tile_add_ with a matrix src of fewer rows than out (its rows tile out's rows too): the mask
    of out's element (t, c) is the documented one of row t, not of the src row it repeats (a
    mutation test, 2026-12-06: drawing the src row's mask passed every other test)."""
    key = torch.tensor([12345, 678], dtype=torch.int64, device=device)
    out = torch.zeros(6, 8, device=device)
    miss_ext.tile_add_(out, torch.ones(3, 4, device=device), 1.0, 0.5, key)
    expected = philox_mask(12345, 678, 6, 8, 0.5)
    assert 0 < expected.sum() < expected.numel() and not torch.equal(expected[:3], expected[3:])
    torch.testing.assert_close(out.cpu().to(F64), 2.0 * expected, rtol=0, atol=0)
