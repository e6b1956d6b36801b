"""torch.func support for the miss ops: grad, vjp, jvp, vmap, jacrev/jacfwd, hessian, functional_call.

Why this exists: torch.func transforms cannot run a C++ `torch::autograd::Function` ("cannot use
C++ torch::autograd::Function with functorch transforms"), and the ops' autograd is C++ so that
TorchScript and libtorch users have it without Python. So, in a Python process, each
differentiable miss op also gets a kernel at the dispatch key `FuncTorchDynamicLayerFrontMode`,
which the dispatcher only visits while a torch.func transform is active. That kernel computes
the op as a composite of ATen operations (fold = zero-pad, reshape, sum; tile = index along the
period; bat = an einsum over r x r tiles), which every transform supports natively, forward and
reverse mode, batched and to any order. Outside transforms nothing changes: the fused kernels
and the C++ autograd run as before.

The dropout mask stays the kernels' own (Philox, csrc/ops/common/dropout_mask.h): it is drawn by
the miss kernel itself, with the transforms switched off, into a (rows, in) tensor of keep
factors m / (1 - p), which the composite multiplies in. So a transform sees the same mask as the
fused op for the same key. The price under a transform: that mask is materialised (as PEFT does
every step) and the composites are plain ATen, so they are slower than the fused ops; this is
the path for per-sample gradients, Jacobians and Hessians, not for training throughput.

Rows and the mask under vmap: inside vmap each call sees one sample's shape, so the mask is
indexed by the sample's own rows, exactly as a separate call per sample would draw it.

bank_fold (the per-row fold of a mixed-adapter batch) becomes x times each slot's 0/1 fold matrix,
the row's own slot picked by a one-hot: memory N*in*R. bank_add becomes one GEMM of the fold with
each row's slot one-hot, (rows, N*R) @ (N*R, out), against every slot's block expanded to (R,
out): memory N*R*(rows + out). Both are fine for the per-sample-gradient sizes transforms are
for. Their integer arguments (ranks, periods, index, the rates) are read on the host under a
transform to check them as the kernels do (all samples' values when vmap batches them, e.g.
per-sample gradients with one adapter per sample).

Not supported under transforms (clear errors): the bat unmerge (merge with a 3-D block and
reverse=True: its conditioning check reads values on the host), a dropout key that is itself
transformed (batched over, or differentiated), and the in-place ops with tensors that require
grad (as outside transforms).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ops = torch.ops.miss

# The ops given a composite here; every other miss op is in-place or a non-differentiable
# building block and keeps its kernels (functorch's fallbacks run them on unwrapped tensors).
DIFFERENTIABLE_OPS = ("fold", "tile_add", "linear", "merge", "bat_weight", "bat_linear", "bank_fold", "bank_add")


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type: float64 if any side is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _plain(t: Optional[Tensor], what: str) -> Optional[Tensor]:
    """`t` unwrapped from grad-transform wrappers; refuses a tensor that is batched by vmap."""
    if t is None:
        return None
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            raise NotImplementedError(f"miss: vmap over the {what} is not supported: pass one {what} for the "
                                      "whole batch (each sample's mask is then indexed by its own rows); a module "
                                      "that draws its own key (MissLinear with dropout) needs "
                                      "vmap(..., randomness='same')")
        t = functorch.get_unwrapped(t)
    return t


def _validate(op, *args) -> None:
    """The op's own argument checks (its Meta kernel, on meta twins of the tensors), so a transform
    raises the same ValueError / TypeError, naming the same value, as a plain call."""
    # Below autograd: the C++ autograd kernels refuse to run while a transform is active.
    with torch._C._DisableFuncTorch(), torch._C._AutoDispatchBelowAutograd():
        twins = [torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Tensor) else a for a in args]
        op(*twins)


def _check_key_device(key: Optional[Tensor], data: Tensor) -> None:
    if key is not None and key.device != data.device:
        raise ValueError(f"miss: the dropout key must be on the data's device {data.device}, got a key on "
                         f"{key.device} (draw it there with miss_ext.new_dropout_key(device))")


def keep_factors(rows: int, cols: int, p: float, key: Optional[Tensor], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """(rows, cols) keep factors m / (1 - p) of the kernels' dropout mask for `key` (0 or
    1 / (1 - p), all zeros for p == 1), drawn by the miss kernel itself."""
    key = _plain(key, "dropout key")
    with torch._C._DisableFuncTorch(), torch._C._AutoDispatchBelowAutograd():
        factors = torch.zeros(rows, cols, dtype=dtype, device=device)
        torch.ops.miss.tile_add_(factors, torch.ones(rows, 1, dtype=dtype, device=device), 1.0, p, key)
    return factors


def _rows(t: Tensor) -> int:
    n = 1
    for size in t.shape[:-1]:
        n *= size
    return n


def _dropout(x: Tensor, p: float, key: Optional[Tensor]) -> Tensor:
    """x * mask / (1 - p) with the kernels' mask, indexed by x's (flattened row, column)."""
    if p == 0.0:
        return x
    return x * keep_factors(_rows(x), x.shape[-1], p, key, x.dtype, x.device).view(x.shape)


def fold_composite(x: Tensor, r: int, p: float = 0.0, key: Optional[Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> Tensor:
    out_dtype = dtype or x.dtype
    xs = _dropout(x.to(_acc_dtype(x.dtype, out_dtype)), p, key)
    in_features = x.shape[-1]
    padded = F.pad(xs, (0, (-in_features) % r))  # zero columns: PEFT's padding, r > in included
    return padded.unflatten(-1, (padded.shape[-1] // r, r)).sum(-2).to(out_dtype)


def _tiled(src: Tensor, out_shape, per_row: bool) -> Tensor:
    """src repeated to out_shape: per row along the last axis, or (matrices) along both axes."""
    cols = torch.arange(out_shape[-1], device=src.device) % src.shape[-1]
    if per_row:
        return src.index_select(-1, cols)
    rows = torch.arange(out_shape[0], device=src.device) % src.shape[0]
    return src.index_select(0, rows).index_select(1, cols)


def tile_add_composite(out: Tensor, src: Tensor, alpha: float = 1.0, p: float = 0.0,
                       key: Optional[Tensor] = None) -> Tensor:
    per_row = out.dim() == src.dim() and out.shape[:-1] == src.shape[:-1]
    acc = _acc_dtype(out.dtype, src.dtype)
    term = _dropout(_tiled(src.to(acc), out.shape, per_row), p, key)
    return (out.to(acc) + alpha * term).to(out.dtype)


def linear_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor, p: float = 0.0,
                     key: Optional[Tensor] = None, fold_input: Optional[Tensor] = None) -> Tensor:
    # PEFT's precision: base in the base dtype, adapter branch in the block's dtype, one rounding.
    # fold_input: the x the adapter folds, when the base GEMM reads a cast copy (autocast).
    y = F.linear(x, weight, bias)
    term = fold_composite(x if fold_input is None else fold_input, block.shape[0], p, key, block.dtype) @ block
    if block.shape[1] != weight.shape[0]:  # mini: tile (.., mini_r) along out
        term = _tiled(term, y.shape, per_row=True)
    return (y.to(torch.promote_types(y.dtype, term.dtype)) + term).to(x.dtype)


def bat_weight_composite(weight: Tensor, block: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """W'_ij = W_ij + (W_ij B_i + B_i) per r x r tile, in that order as the kernels (the residual form
    of csrc/ops/common/bat_index.h), computed in float32 (float64 if either is)."""
    out_features, in_features = weight.shape
    r = block.shape[1]
    cd = _acc_dtype(weight.dtype, block.dtype, dtype)  # as bat_weight_kernel: float64 output, float64 sums
    b = block.to(cd)
    tiles = weight.to(cd).reshape(out_features // r, r, in_features // r, r)  # [i, a, j, b]
    merged = tiles + (torch.einsum("iajb,ibc->iajc", tiles, b) + b.unsqueeze(2))
    return merged.reshape(out_features, in_features).to(dtype or block.dtype)


def bat_linear_composite(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
                         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    cd = compute_dtype or torch.promote_types(weight.dtype, block.dtype)  # bat.h, bat_linear_dtype
    wprime = bat_weight_composite(weight, block, cd)
    return F.linear(x.to(cd), wprime, None if bias is None else bias.to(cd)).to(x.dtype)


def merge_composite(weight: Tensor, block: Tensor, reverse: bool = False) -> Tensor:
    if block.dim() == 3:
        if reverse:
            raise NotImplementedError("miss::merge: the bat unmerge (reverse=True) is not supported under torch.func "
                                      "transforms (its conditioning check reads values on the host); call it outside")
        return bat_weight_composite(weight, block, weight.dtype)
    out_features, in_features = weight.shape
    rows = torch.arange(out_features, device=weight.device) % block.shape[1]
    cols = torch.arange(in_features, device=weight.device) % block.shape[0]
    delta = block.t().index_select(0, rows).index_select(1, cols)  # dW[o, i] = block[i mod r, o mod mini_r]
    acc = _acc_dtype(weight.dtype, block.dtype)
    return (weight.to(acc) + (-delta if reverse else delta).to(acc)).to(weight.dtype)


def _used_slots(op: str, index: Tensor, n: int):
    """(slot, first row) of every slot some row uses, after refusing an index past the bank, as
    the kernels' checks (csrc/ops/common/checks.cpp, for_each_used_slot) on a host copy."""
    idx = index.reshape(-1).cpu()
    if idx.numel() and int(idx.max()) >= n:
        t = int((idx >= n).nonzero()[0])
        raise ValueError(f"miss: {op} index[{t}]={int(idx[t])} names no slot of a bank with {n} slots "
                         "(a negative index means no adapter)")
    return [(a, int((idx == a).nonzero()[0])) for a in sorted(set(idx[idx >= 0].tolist()))]


def _check_bank_values(ranks: Tensor, periods: Tensor, index: Tensor, bank: Tensor, R: int, out: int,
                       per_row_fold: bool) -> None:
    """check_bank_values on host copies: the slots rows use have ranks in [1, min(r_cap, R)]
    (dividing R unless per_row_fold) and periods in [1, q_cap] dividing out."""
    n, r_cap, q_cap = bank.shape
    ranks_h, periods_h = ranks.cpu(), periods.cpu()
    for a, t in _used_slots("bank_add", index, n):
        r, q = int(ranks_h[a]), int(periods_h[a])
        if not 1 <= r <= min(r_cap, R):
            raise ValueError(f"miss: bank_add ranks[{a}]={r} (used by row {t}) must be "
                             f"in [1, min(r_cap={r_cap}, s.shape[-1]={R})]")
        if not per_row_fold and R % r:
            raise ValueError(f"miss: bank_add ranks[{a}]={r} (used by row {t}) does not "
                             f"divide s.shape[-1]={R}: a fold at {R} cannot give the fold at {r}; fold each row at "
                             "its own rank with miss.bank_fold and pass per_row_fold=True")
        if not (1 <= q <= q_cap and out % q == 0):
            raise ValueError(f"miss: bank_add periods[{a}]={q} (used by row {t}) must be in [1, q_cap={q_cap}] and divide "
                             f"out_features={out}")


def _check_bank_fold_values(ranks: Tensor, dropouts: Optional[Tensor], index: Tensor, max_r: int) -> None:
    """check_bank_fold_values on host copies: the slots rows use have ranks in [1, max_r] and
    dropout rates in [0, 1]."""
    ranks_h = ranks.cpu()
    rates = None if dropouts is None else dropouts.cpu()
    for a, t in _used_slots("bank_fold", index, ranks.shape[0]):
        if not 1 <= int(ranks_h[a]) <= max_r:
            raise ValueError(f"miss: bank_fold ranks[{a}]={int(ranks_h[a])} (used by row {t}) must be in "
                             f"[1, max_r={max_r}]")
        if rates is not None and not 0.0 <= float(rates[a]) <= 1.0:
            raise ValueError(f"miss: bank_fold dropouts[{a}]={float(rates[a])} (used by row {t}) must be a dropout "
                             "probability in [0, 1]")


def bank_fold_composite(x: Tensor, index: Tensor, ranks: Tensor, max_r: int, dropouts: Optional[Tensor] = None,
                        key: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """s[t, j] = sum_i dropout(x)[t, i] [i mod r_a == j] for j < r_a, a = index[t] >= 0: x times
    each slot's (in, max_r) 0/1 fold matrix, the row's own slot picked by a one-hot (memory
    N * in * max_r, fine for the sizes transforms are for)."""
    out_dtype = dtype or x.dtype
    acc = _acc_dtype(x.dtype, out_dtype)
    in_features, n = x.shape[-1], ranks.shape[0]
    xs = x.to(acc).reshape(_rows(x), in_features)  # not -1: x may have no columns
    onehot = (index.reshape(-1)[:, None] == torch.arange(n, device=x.device)[None, :]).to(acc)  # (rows, N)
    if dropouts is not None:
        # The kernels' keep factors of each slot's rate for every row (keep_factors: the mask at
        # (row, column) for the key and p), the row's own slot's picked by the one-hot; so the index
        # may be batched (per-sample gradients with one adapter per sample). The rates are read on
        # the host (they must not be batched); a slot no row uses may hold any value (the one-hot
        # gives it weight 0; the rows' slots were checked by _check_bank_fold_values).
        rates = _plain(dropouts, "dropouts").tolist()
        per_rate = {p: keep_factors(xs.shape[0], in_features, p, key, acc, x.device) for p in set(rates)
                    if 0.0 < p <= 1.0}
        ones = torch.ones(xs.shape[0], in_features, dtype=acc, device=x.device)
        per_slot = torch.stack([per_rate.get(p, ones) for p in rates])                  # (N, rows, in)
        xs = xs * torch.einsum("tn,nti->ti", onehot, per_slot)
    cols = torch.arange(in_features, device=x.device)[None, :, None]
    j = torch.arange(max_r, device=x.device)[None, None, :]
    r = ranks.clamp(min=1)[:, None, None]
    fold_matrix = ((cols % r == j) & (j < r)).to(acc)                                # (N, in, max_r)
    s = torch.einsum("tn,ti,nij->tj", onehot, xs, fold_matrix)
    return s.reshape(*x.shape[:-1], max_r).to(out_dtype)


def bank_add_composite(y: Tensor, s: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor) -> Tensor:
    """y[t] + sum_k s[t, k] bank[a, k mod r_a, o mod q_a] for a = index[t] >= 0, summed in float32
    (float64 if any side is) and rounded once to y's dtype."""
    acc = _acc_dtype(y.dtype, s.dtype, bank.dtype)
    n, R, out = bank.shape[0], s.shape[-1], y.shape[-1]
    device = y.device
    # Every slot's block expanded to (R, out): D[a, k, o] = bank[a, k mod r_a, o mod q_a].
    k_rows = torch.arange(R, device=device)[None, :] % ranks.clamp(min=1)[:, None]           # (N, R)
    o_cols = torch.arange(out, device=device)[None, :] % periods.clamp(min=1)[:, None]       # (N, out)
    slots = torch.arange(n, device=device)
    expanded = bank.to(acc)[slots[:, None, None], k_rows[:, :, None], o_cols[:, None, :]]   # (N, R, out)
    idx = index.reshape(-1)
    onehot = (idx[:, None] == slots[None, :]).to(acc)                                        # (rows, N); 0 for idx < 0
    s2 = s.reshape(-1, R).to(acc)
    term = (onehot[:, :, None] * s2[:, None, :]).reshape(-1, n * R) @ expanded.reshape(n * R, out)
    return (y.to(acc) + term.view(y.shape)).to(y.dtype)


# ---- the kernels registered at FuncTorchDynamicLayerFrontMode ----------------------------------
def _fold(x, r, p=0.0, key=None, dtype=None):
    _validate(ops.fold.default, x, r, p, key, dtype)
    _check_key_device(key, x)
    return fold_composite(x, r, p, key, dtype)


def _tile_add(out, src, alpha=1.0, p=0.0, key=None):
    _validate(ops.tile_add.default, out, src, alpha, p, key)
    _check_key_device(key, out)
    return tile_add_composite(out, src, alpha, p, key)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype where autocast is on for x's device type, else None. This kernel runs
    before the Autocast dispatch keys, so linear and bat_linear apply the policy of their C++
    autocast kernels (csrc/ops/autocast/linear_autocast.cpp) here, then run with autocast off."""
    device_type = _all_values(x).device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# c10's names of the floating dtypes, as the C++ kernels' messages print them.
_C10_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double"}


def _c10_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """at::autocast::cached_cast: floating tensors but float64 go to dtype."""
    return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t


def _linear(x, weight, bias, block, p=0.0, key=None):
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x_c, w_c = _cast(x, dtype), _cast(weight, dtype)
        if x_c.is_floating_point() and w_c.is_floating_point() and x_c.dtype != w_c.dtype:
            name = _c10_name  # the C++ kernel's message, word for word
            raise TypeError(f"miss: under autocast({name(dtype)}) x dtype {name(x.dtype)} and the base weight dtype "
                            f"{name(weight.dtype)} differ after autocast's casts (it casts float32/float16/bfloat16 to "
                            f"{name(dtype)} and leaves float64 as it is); give x and the layer the same dtype (PEFT "
                            "refuses this too)")
        b_c, block_c = _cast(bias, dtype), _cast(block, dtype)
        mini = block.dim() == 2 and weight.dim() == 2 and block.shape[1] != weight.shape[0]  # else: the op's checks
        with torch.autocast(_all_values(x).device.type, enabled=False):
            if not mini and (not x.is_floating_point() or x_c.dtype == x.dtype):
                return _linear(x_c, w_c, b_c, block_c, p, key).to(x.dtype)
            # As linear_autocast: the fold reads x as given (PEFT folds it in float32), never
            # autocast's rounded copy; only S is rounded to the autocast dtype. Mini: the block
            # repeated along out before the cast, as PEFT, so that the copies of its gradient are
            # summed in the block's own dtype (the autocast dtype overflowed in float16).
            _validate(ops.linear.default, x_c, w_c, b_c, block_c, p, key)
            _check_key_device(key, x)
            if mini:
                block_c = _cast(block.repeat(1, weight.shape[0] // block.shape[1]), dtype)
            return linear_composite(x_c, w_c, b_c, block_c, p, key, fold_input=x).to(x.dtype)
    _validate(ops.linear.default, x, weight, bias, block, p, key)
    _check_key_device(key, x)
    return linear_composite(x, weight, bias, block, p, key)


def _merge(weight, block, reverse=False):
    if not (block.dim() == 3 and reverse):
        _validate(ops.merge.default, weight, block, reverse)
    return merge_composite(weight, block, reverse)


def _bat_weight(weight, block, dtype=None):
    _validate(ops.bat_weight.default, weight, block, dtype)
    return bat_weight_composite(weight, block, dtype)


def _bat_linear(x, weight, bias, block, compute_dtype=None):
    dtype = _autocast_dtype(x)
    if dtype is not None:  # as bat_linear_autocast: the GEMM in autocast's dtype, a float64 W' left alone
        if torch.float64 in (weight.dtype, block.dtype):
            dtype = None
        with torch.autocast(_all_values(x).device.type, enabled=False):
            return _bat_linear(x, weight, bias, block, compute_dtype or dtype)
    _validate(ops.bat_linear.default, x, weight, bias, block, compute_dtype)
    return bat_linear_composite(x, weight, bias, block, compute_dtype)


def _all_values(t: Tensor) -> Tensor:
    """The plain tensor under every transform wrapper, vmap's batching included (for checks only:
    a batched tensor's values for all samples)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _bank_fold(x, index, ranks, max_r, dropouts=None, key=None, dtype=None):
    _validate(ops.bank_fold.default, x, index, ranks, max_r, dropouts, key, dtype)
    _plain(ranks, "ranks")  # a bank's slots are one for the whole batch: refuse vmap over them
    _check_key_device(key, x)
    _check_bank_fold_values(_all_values(ranks), None if dropouts is None else _all_values(dropouts),
                            _all_values(index), max_r)
    return bank_fold_composite(x, index, ranks, max_r, dropouts, key, dtype)


def _bank_add(y, s, bank, ranks, periods, index, per_row_fold=False):
    _validate(ops.bank_add.default, y, s, bank, ranks, periods, index, per_row_fold)
    _plain(ranks, "ranks")  # a bank's slots are one for the whole batch: refuse vmap over them
    _plain(periods, "periods")
    # Values checked on all samples at once: a batched (per-sample) index or bank must hold valid
    # ids and ranks in every sample.
    _check_bank_values(_all_values(ranks), _all_values(periods), _all_values(index), bank, s.shape[-1], y.shape[-1],
                       per_row_fold)
    return bank_add_composite(y, s, bank, ranks, periods, index)


_KERNELS = {"bank_add": _bank_add, "bank_fold": _bank_fold, "fold": _fold, "tile_add": _tile_add, "linear": _linear,
            "merge": _merge, "bat_weight": _bat_weight, "bat_linear": _bat_linear}
_LIBRARY: List[torch.library.Library] = []


def register() -> None:
    """Registers the composites at FuncTorchDynamicLayerFrontMode (once per process)."""
    if _LIBRARY:
        return
    lib = torch.library.Library("miss", "IMPL")
    for name in DIFFERENTIABLE_OPS:
        lib.impl(name, _KERNELS[name], "FuncTorchDynamicLayerFrontMode")
    _LIBRARY.append(lib)
