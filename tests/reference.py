"""Independent float64 reference of the MiSS ops, written from docs/miss.md (not from csrc/).

Everything here is plain PyTorch on float64 copies of the inputs, built from explicit index
math, so a bug in a kernel cannot hide in a shared helper:

- fold:  the 0/1 fold matrix A (r x in) with A[j, i] = 1 iff i mod r == j; S = x A^T.
- tile:  D_full[j, o] = block[j, o mod mini_r] and dW[o, i] = block[i mod r, o mod mini_r], both
         by advanced indexing with arange(.) % period.
- dropout: a (T x in) 0/1 keep mask is an explicit argument; the references never generate it.

The functions are differentiable (plain autograd on float64), which is how the tests get
reference gradients.

Dropout masks
-------------
The ops draw the mask from a counter-based generator; a test needs the mask the op used:

- `recover_mask` asks the ops for it through a *different* op from the one under test:
  tile_add_(zeros(T, C), ones(T, 1), p=p, key=key) adds keep(t, c) / (1 - p) to each element,
  so multiplying by (1 - p) gives the 0/1 mask. This relies only on the documented contract
  that the mask is a pure function of (key, row, column), the same for every op.
- `philox_mask` recomputes it from scratch with a pure-Python Philox4x32-10 (checked against the
  Random123 known-answer vectors in test_dropout.py) and the layout documented in
  csrc/ops/common/dropout_mask.h: counter = (col // 8, row, offset_lo, offset_hi),
  key = (seed_lo, seed_hi); the high half h of column c is 16-bit half c % 2 of word (c % 8) // 2;
  dropped iff h * 2^16 + low < round(p * 2^32), the low 16 bits drawn (only where h ties the
  threshold's high half) from word c % 4 of Philox(counter=(c // 4, row, offset_lo, offset_hi),
  key=seed ^ LOW_BITS_KEY).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# index math
# --------------------------------------------------------------------------------------------
def fold_matrix(in_features: int, r: int, dtype: torch.dtype = F64, device=None) -> Tensor:
    """A (r, in) with A[j, i] = 1 iff i mod r == j (MiSS as a rank-r LoRA: this is LoRA's A)."""
    a = torch.zeros(r, in_features, dtype=dtype, device=device)
    i = torch.arange(in_features, device=device)
    a[i % r, i] = 1.0
    return a


def tile_block(block: Tensor, out_features: int) -> Tensor:
    """D_full (r, out) with D_full[j, o] = block[j, o mod mini_r] (mini_r == out: block itself)."""
    mini_r = block.shape[1]
    assert out_features % mini_r == 0
    cols = torch.arange(out_features, device=block.device) % mini_r
    return block[:, cols]


def delta_weight_ref(block: Tensor, out_features: int, in_features: int) -> Tensor:
    """dW (out, in) with dW[o, i] = block[i mod r, o mod mini_r], in float64."""
    r, mini_r = block.shape
    o = (torch.arange(out_features, device=block.device) % mini_r)[:, None]
    i = (torch.arange(in_features, device=block.device) % r)[None, :]
    return block.to(F64)[i, o]


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------
def _dropped(x: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """x * mask / (1 - p) in float64; `mask` is (T, in) 0/1 over the flattened leading index."""
    x = x.to(F64)
    if mask is None:
        return x
    m = mask.to(F64, copy=False).reshape(x.shape)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return x * m * scale


def fold_ref(x: Tensor, r: int, mask: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
    """S[..., j] = sum_{i < in, i mod r == j} m_i x_i / (1 - p); shape (..., r), float64."""
    xd = _dropped(x, mask, p)
    return xd @ fold_matrix(x.shape[-1], r, device=x.device).t()


def fold_errors_vs_torch_sum(s: Tensor, x: Tensor, r: int) -> Tuple[float, float]:
    """(relative error of the fold s of x at rank r, that of PEFT's torch.sum fold of x), both in the
    Frobenius norm against float64 (fold_ref). in must be a multiple of r."""
    want = fold_ref(x, r)
    torch_sum = x.reshape(*x.shape[:-1], -1, r).sum(-2)
    return (((s.double() - want).norm() / want.norm()).item(),
            ((torch_sum.double() - want).norm() / want.norm()).item())


def fold_error_scale(x: Tensor, r: int, p: float = 0.0) -> Tensor:
    """Per output of fold(x, r) with dropout p, the sum of the magnitudes of the terms it adds,
    sum |x_i| / (1 - p), shape (..., r), float64. Rounding errors of a floating-point sum are bounded
    by a multiple of it in any order of summation, so two implementations of the fold are compared
    elementwise with a tolerance c * u * fold_error_scale (u: the accumulation's unit roundoff)."""
    return fold_ref(x.abs(), r) * (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def fold_within(got: Tensor, want: Tensor, scale: Tensor, rtol: float, atol_per_scale: float = 1e-6) -> bool:
    """|got - want| <= rtol |want| + atol_per_scale * scale elementwise (float64); 1e-6 per unit of
    scale is about 17 float32 roundoffs, a typical-case bound for float32 sums in two orders."""
    err = (got.to(F64) - want.to(F64)).abs()
    return bool((err <= rtol * want.to(F64).abs() + atol_per_scale * scale.to(F64) + 1e-30).all())


# tile_add_ of one implementation against another (CUDA or emulated kernels against the CPU's), by
# out's dtype: one sum in float32 (float64) and one rounding on both, which nvcc may contract into
# an FMA, so a last-bit difference is allowed (operands of order 1; atol is 4x this).
TILE_ADD_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-14}


def fold_scatter_ref(x: Tensor, r: int) -> Tensor:
    """The same fold by scatter_add (a second, structurally different formulation)."""
    x = x.to(F64)
    idx = (torch.arange(x.shape[-1], device=x.device) % r).expand(x.shape)
    return torch.zeros(*x.shape[:-1], r, dtype=F64, device=x.device).scatter_add(-1, idx, x)


def tile_add_ref(out: Tensor, src: Tensor, alpha: float = 1.0, mask: Optional[Tensor] = None,
                 p: float = 0.0) -> Tensor:
    """out[t, c] + alpha * m(t, c) / (1 - p) * src[t mod P, c mod Q], float64, out's shape.

    out is viewed (rows, C); src is (rows, Q) (same leading sizes as out) or (P, Q)."""
    C = out.shape[-1]
    o = out.to(F64).reshape(-1, C)
    s = src.to(F64).reshape(-1, src.shape[-1])
    rows = o.shape[0]
    P, Q = s.shape
    t = (torch.arange(rows, device=out.device) % max(P, 1))[:, None]
    c = (torch.arange(C, device=out.device) % max(Q, 1))[None, :]
    tiled = s[t, c] if rows and C else torch.zeros_like(o)
    tiled = _dropped(tiled, mask, p) if mask is not None else tiled
    return (o + alpha * tiled).reshape(out.shape)


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
               mask: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
    """y = x W^T + b + fold(dropout(x)) D_full, all in float64 (no intermediate rounding)."""
    out_features = weight.shape[0]
    r = block.shape[0]
    y = x.to(F64) @ weight.to(F64).t()
    if bias is not None:
        y = y + bias.to(F64)
    return y + fold_ref(x, r, mask, p) @ tile_block(block.to(F64), out_features)


def linear_lora_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    """The same linear through the merged weight W + dW (the spec's LoRA equivalence)."""
    w = weight.to(F64) + delta_weight_ref(block, weight.shape[0], weight.shape[1])
    y = x.to(F64) @ w.t()
    return y if bias is None else y + bias.to(F64)


def merge_ref(weight: Tensor, block: Tensor, reverse: bool = False) -> Tensor:
    """W +/- dW in float64."""
    dw = delta_weight_ref(block, weight.shape[0], weight.shape[1])
    return weight.to(F64) - dw if reverse else weight.to(F64) + dw


def bat_weight_ref(w, blk):
    """W' (out, in) in float64: tiles[i, a, j, k] = W[i r + a, j r + k];
    W'[i r + a, j r + b] = W[..] + sum_k tiles[i, a, j, k] B[i, k, b] + B[i, a, b]. Differentiable."""
    w, b = w.to(F64), blk.to(F64)
    out_f, in_f = w.shape
    r = b.shape[-1]
    tiles = w.reshape(out_f // r, r, in_f // r, r)
    wp = tiles + torch.einsum("iajk,ikb->iajb", tiles, b) + b[:, :, None, :]
    return wp.reshape(out_f, in_f)


def bat_transform_ref(w, m, p, residual=False):
    """The bat kernel's transform in float64 (csrc/ops/common/bat_index.h):
    out[o, s r + c] = sum_k w[o, s r + k] m[o // r][k][c] + p[o // r][o % r][c] (+ w[o, s r + c]
    when residual)."""
    w, m, p = w.to(F64), m.to(F64), p.to(F64)
    rows, cols = w.shape
    r = m.shape[-1]
    seg = w.reshape(rows // r, r, cols // r, r)  # [i, a, s, k]
    out = (torch.einsum("iask,ikc->iasc", seg, m) + p[:, :, None, :]).reshape(rows, cols)
    return out + w if residual else out


def bf16_parts_ref(t: Tensor, parts: int) -> List[Tensor]:
    """The bfloat16 parts of float32 t, from their definition (csrc/ops/split_gemm.h): each part but
    the last is the head of what the earlier ones leave (its float32 bits with the low 16 cleared,
    a value bf16 holds exactly); the last is that rest rounded to nearest even (torch's cast)."""
    rest, out = t.float(), []
    for _ in range(parts - 1):
        head = (rest.view(torch.int32) & ~0xFFFF).view(torch.float32)
        out.append(head.bfloat16())
        rest = rest - head
    out.append(rest.bfloat16())
    return out


def split_bf16_ref(t: Tensor, parts: int, order: Sequence[int], dim: int) -> Tensor:
    """miss.split_bf16: cat([part_{order[0]}(t), part_{order[1]}(t), ...], dim)."""
    p = bf16_parts_ref(t, parts)
    return torch.cat([p[i] for i in order], dim)


def peft_precision_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
                              mask: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
    """PEFT's rounding: base GEMM rounded in x's dtype (torch's own F.linear), adapter branch
    exact (float64 here, the block dtype in PEFT), one final rounding to x's dtype."""
    base = torch.nn.functional.linear(x, weight, bias)
    adapter = fold_ref(x, block.shape[0], mask, p) @ tile_block(block.to(F64), weight.shape[0])
    return (base.to(F64) + adapter).to(x.dtype)


def autocast_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor, amp_dtype: torch.dtype,
                        adapter_in_amp: bool = True) -> Tensor:
    """default/mini forward of float32 x, weight, bias and block under torch.autocast(amp_dtype),
    modelling which operands autocast rounds (spec, "Precision"). The base GEMM is torch's own
    F.linear on amp_dtype copies (what autocast runs), rounded to amp_dtype. The fold S is exact
    (float64; PEFT's float32 sum rounds far below the amp_dtype rounding that follows).

    adapter_in_amp=True is PEFT's: `S @ D` is an autocast matmul, so S and D are rounded to
    amp_dtype, their product is exact here and rounded to amp_dtype (the matmul's output dtype),
    and base + term is rounded to amp_dtype. False keeps the adapter term in float64 (float32 in
    the layers) and rounds base + term once: the pre-issue-11 policy, and MissBankLinear's.
    The result is cast to x's dtype (PEFT's `result.to(previous_dtype)`)."""
    def amp(t):
        return t.to(amp_dtype).to(F64)

    base = torch.nn.functional.linear(x.to(amp_dtype), weight.to(amp_dtype),
                                      None if bias is None else bias.to(amp_dtype))
    s = fold_ref(x, block.shape[0])
    d = tile_block(block.to(F64), weight.shape[0])
    term = amp(amp(s) @ amp(d)) if adapter_in_amp else s @ d
    return amp(base.to(F64) + term).to(x.dtype)


# --------------------------------------------------------------------------------------------
# dropout masks
# --------------------------------------------------------------------------------------------
def recover_mask(rows: int, cols: int, p: float, key: Optional[Tensor], device="cpu") -> Tensor:
    """The (rows, cols) 0/1 keep mask the ops use for `key`, read through tile_add_ (see top)."""
    out = torch.zeros(rows, cols, dtype=F64, device=device)
    src = torch.ones(rows, 1, dtype=F64, device=device)
    torch.ops.miss.tile_add_(out, src, 1.0, p, key)
    if p >= 1.0:
        return out  # everything dropped: the op adds 0 everywhere
    return (out * (1.0 - p)).round()


def mixed_dropout_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: dict, row_names: Sequence,
                      dropouts: dict, seed: int):
    """A mixed-adapter batch with per-adapter dropout in training (issue 14), float64: row t of x
    (T, in) through the base alone (row_names[t] None) or with adapter row_names[t]'s block
    blocks[name] and dropout p = dropouts.get(name, 0). After torch.manual_seed(seed) the call
    draws one key with new_dropout_key (as the bank layers document: miss.bank_fold takes one key
    and each adapter's rate), and a row's mask is recovered from that key at its adapter's p.

    Returns (want (T, out), x_ref, refs, masks, group_of): want has autograd history to the leaves
    x_ref (x's copy) and refs {name: block copy}; masks {p: (T, in) mask} for every p > 0;
    group_of {name: its p}."""
    from miss_ext.ops import new_dropout_key  # the key draw the layers use (torch's generator)

    rows = x.shape[0]
    group_of = {n: dropouts.get(n, 0.0) for n in blocks}
    torch.manual_seed(seed)
    rates = sorted({p for p in group_of.values() if p > 0})
    key = new_dropout_key(x.device) if rates else None
    masks = {p: recover_mask(rows, x.shape[1], p, key, x.device) for p in rates}
    x_ref = x.detach().to(F64).clone().requires_grad_(True)
    refs = {n: b.detach().to(F64).clone().requires_grad_(True) for n, b in blocks.items()}
    weight = weight.detach().to(F64)
    bias = None if bias is None else bias.detach().to(F64)
    want = []
    for t, name in enumerate(row_names):
        if name is None:
            want.append(x_ref[t] @ weight.t() + (0.0 if bias is None else bias))
            continue
        p = dropouts.get(name, 0.0)
        mask = masks[p][t:t + 1] if p > 0 else None
        want.append(linear_ref(x_ref[t:t + 1], weight, bias, refs[name], mask, p)[0])
    return torch.stack(want), x_ref, refs, masks, group_of


_M32 = 0xFFFFFFFF


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> Tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al., SC'11) on Python ints: four 32-bit counter words and two
    32-bit key words in, four 32-bit words out."""
    c0, c1, c2, c3 = (int(v) & _M32 for v in counter)
    k0, k1 = (int(v) & _M32 for v in key)
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


LOW_BITS_KEY = 0xA54FF53A3C6EF372  # dropout_mask.h's kLowBitsKey


def philox_low_bits(seed: int, offset: int, row: int, col: int) -> int:
    """The low 16 bits of element (row, col)'s 32-bit uniform (drawn only for ties)."""
    s = (seed ^ LOW_BITS_KEY) & ((1 << 64) - 1)
    words = philox4x32_10((col // 4, row, offset & _M32, offset >> 32), (s & _M32, s >> 32))
    return words[col % 4] & 0xFFFF


def _half(words: Sequence[int], k: int) -> int:
    """16-bit half k (0..7) of a call's four words: word k // 2, low half for even k."""
    return (words[k // 2] >> (16 * (k % 2))) & 0xFFFF


def philox_high_half(seed: int, offset: int, row: int, col: int) -> int:
    """The high 16 bits of element (row, col)'s 32-bit uniform (the main stream)."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    words = philox4x32_10((col // 8, row, offset & _M32, offset >> 32), (seed & _M32, seed >> 32))
    return _half(words, col % 8)


def tie_rates(seed: int, offset: int, row: int, col: int) -> Tuple[float, float]:
    """Two rates p whose threshold round(p * 2^32) ties element (row, col)'s high half, with low
    halves chosen from the element's own low bits: the element is kept at the first (u == the
    threshold) and dropped at the second (u == the threshold - 1). For the tests of the rare
    tie path (2^-16 of the elements), which random keys almost never meet."""
    high, low = philox_high_half(seed, offset, row, col), philox_low_bits(seed, offset, row, col)
    assert 0 < low < 0xFFFF, "the element's low bits leave no tie on both sides: pick another"
    return tuple(((high << 16) + low + delta) / 2.0**32 for delta in (0, 1))


def philox_keep(seed: int, offset: int, row: int, col: int, high: int, threshold: int) -> bool:
    """Whether element (row, col), whose high half is `high`, is kept: u = high * 2^16 + low bits
    >= threshold, the low bits drawn only where they can matter."""
    if high != threshold >> 16:
        return high > threshold >> 16
    return (high << 16) + philox_low_bits(seed, offset, row, col) >= threshold


def philox_mask(seed: int, offset: int, rows: int, cols: int, p: float, first_row: int = 0) -> Tensor:
    """The documented keep mask (see top): element (t, c) is dropped iff its 32-bit uniform
    u = h * 2^16 + low < round(p * 2^32), h = half c % 2 of word (c % 8) // 2 of
    Philox(counter=(c // 8, t, offset_lo, offset_hi), key=(seed_lo, seed_hi)).
    Rows first_row .. first_row + rows - 1 of it."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    threshold = round(p * 2.0**32)
    mask = torch.empty(rows, cols, dtype=F64)
    for t in range(rows):
        for g in range((cols + 7) // 8):
            words = philox4x32_10((g, first_row + t, offset & _M32, offset >> 32), (seed & _M32, seed >> 32))
            for k in range(min(8, cols - 8 * g)):
                keep = philox_keep(seed, offset, first_row + t, 8 * g + k, _half(words, k), threshold)
                mask[t, 8 * g + k] = 1.0 if keep else 0.0
    return mask
