"""Python entry points of the `miss` ops; each is a direct call of `torch.ops.miss.<op>`.

They stay scriptable and traceable: TorchScript and torch.compile see the op itself. Schemas and
the exact formulas: csrc/torch_bindings.cpp; the math and PEFT's semantics: docs/miss.md.

Conventions shared by every op below:
- Shapes: x (..., in), weight (out, in), bias (out,), block = miss_block: (r, out) in the default
  mode, (r, mini_r) in the mini mode (mini_r divides out), (out/r, r, r) in the bat mode.
- Dtypes: data tensors are float32, float64, float16 or bfloat16 (x, weight and bias alike);
  the block may differ (PEFT keeps it float32); arithmetic accumulates in float32 (float64 for
  float64 data, and for a float64 output dtype asked of fold/bank_fold) and rounds once to the
  output dtype.
- Dropout (adapter branch only): probability p in [0, 1] and an int64 key [seed, offset] of
  shape (2,) on the data's device, from `new_dropout_key(x.device)`; with p == 0 the key may be
  None, and a key given anyway is not read: only its device is checked (its size and dtype are
  checked where p > 0). The mask is a pure function of (key, row, column), the same on CPU and
  CUDA.
- Errors: ValueError for bad shapes, r, mini_r, p, keys and devices, TypeError for bad dtypes
  (a non-int64 key included), each naming the value; nothing is written on error. An argument
  of another Python type than the schema's (r=2.5, p="0.1") is refused by torch's dispatcher
  before the op runs: RuntimeError ("Expected a value of type 'int' for argument 'r'").
  RuntimeError from an op without autograd (the in-place ones tile_add_, merge_, bank_add_,
  bat_transform_, and bat_transform, the bat unmerge) given a tensor that requires grad
  ("miss::tile_add_ is an op without autograd support ..."), and from an
  in-place op writing an inference tensor outside inference mode.
- Sources: per op below (docs/miss.md sections; PEFT: peft/tuners/miss/layer.py).
"""
from typing import Optional

import torch
from torch import Tensor

# Every op's entry point (`_`-prefixed names are this file's helpers).
__all__ = ["bank_add", "bank_add_", "bank_fold", "bat_linear", "bat_transform", "bat_transform_", "bat_weight", "fold",
           "linear", "merge", "merge_", "new_dropout_key", "tile_add", "tile_add_"]

def _refuse_batched_key_draw() -> None:
    """NotImplementedError when a dropout key drawn now would be batched: inside torch.func.vmap
    with randomness="different" (at any level of the transform stack), where torch.randint draws
    one key per sample, which the miss ops refuse (_functorch._plain). Checked by new_dropout_key
    before it draws, so the refusal leaves torch's generator as it was (a review, 2026-12-05:
    it moved). vmap's default randomness="error" raises in torch.randint itself, before drawing;
    "same" draws one key, which works. Reads functorch's interpreter stack (private API: skipped where absent)."""
    functorch = torch._C._functorch
    # Dynamo reports an interpreter of its own while it traces; vmap inside a compiled region is
    # traced by Dynamo itself, which refuses the batched key in the op.
    if torch.compiler.is_compiling() or functorch.peek_interpreter_stack() is None:
        return
    try:
        from torch._functorch.pyfunctorch import coerce_cinterpreter
        levels = [coerce_cinterpreter(level) for level in functorch.get_interpreter_stack()]
    except (ImportError, AttributeError, RuntimeError):
        return
    if any(getattr(level, "randomness", lambda: None)() == "different" for level in levels):
        raise NotImplementedError("miss: vmap over the dropout key is not supported (randomness='different' would "
                                  "draw one key per sample): use vmap(..., randomness='same'), which draws one key "
                                  "for the whole batch (each sample's mask is then indexed by its own rows)")


def new_dropout_key(device: Optional[torch.device] = None) -> Tensor:
    """A fresh dropout key for the miss ops: int64 tensor [seed, offset] of shape (2,) on `device`
    (default: torch's default device, the CPU unless torch.set_default_device changed it), which
    must be the device of the data it masks (`new_dropout_key(x.device)`;
    the ops raise ValueError for a key on another device).

    Drawn with `torch.randint` from that device's default generator, so `torch.manual_seed`
    reproduces it. NotImplementedError, before drawing, inside torch.func.vmap with
    randomness="different" (one key per sample, which the ops refuse). The kernels read it where it lives, so the host never waits for the GPU, and
    inside a captured CUDA graph every replay draws a new key and hence a new mask (torch's
    generator is graph-safe). The same key values give the same mask on the CPU and on CUDA
    (csrc/ops/common/dropout_mask.h). C++: `miss_ext::ops::new_dropout_key(device)`."""
    if not torch.jit.is_scripting():
        _refuse_batched_key_draw()
    # 2**62 as a literal: TorchScript cannot read module globals, and its ** gives a float.
    return torch.randint(0, 4611686018427387904, [2], dtype=torch.int64, device=device)


def fold(x: Tensor, r: int, p: float = 0.0, key: Optional[Tensor] = None,
         dtype: Optional[torch.dtype] = None) -> Tensor:
    """S[..., j] = sum of dropout(x)[..., i] over i mod r == j, shape (..., r): MiSS's input fold.

    x (..., in), any supported float dtype; r >= 1 (r > in and in % r != 0 are allowed: the
    missing columns count as zeros). dtype: of S (default x's); the sums accumulate in float32,
    in float64 for a float64 x or dtype=torch.float64 (then x is widened first, one float64 copy
    of it, as torch.sum(x, dtype=torch.float64) does), and are rounded once. p in [0, 1]; with
    p > 0, key = new_dropout_key(x.device). Differentiable to any order (its adjoint is
    tile_add). ValueError for r < 1, a scalar x, a p outside [0, 1], a missing key for p > 0, or
    a key on another device or (p > 0) of another size; TypeError for a non-float x or dtype, or
    (p > 0) a non-int64 key; RuntimeError for a non-int r (the schema's). Source: docs/miss.md,
    "Default and mini" (PEFT's zero-padded reshape and sum)."""
    return torch.ops.miss.fold(x, r, p, key, dtype)


def tile_add_(out: Tensor, src: Tensor, alpha: float = 1.0, p: float = 0.0, key: Optional[Tensor] = None) -> None:
    """out[t, c] += alpha * dropout(src)[t mod P, c mod Q] in place (the adjoint of fold), with
    out viewed as (rows, C) and src as (P, Q).

    src has out's leading sizes (P = rows: fold's adjoint, mini's tiling along out), or both are
    matrices and src's P rows tile out's rows too (merge); sizes need not divide (the last tile
    is partial). Any supported float dtypes; one rounding to out's dtype. With p > 0, key =
    new_dropout_key(out.device); the mask is indexed by out's (row, column). Not differentiable
    (see tile_add): RuntimeError for out or src requiring grad. Returns None. ValueError for a
    src without out's leading sizes (unless both are matrices), a 0-dim out or src, an empty src
    for a non-empty out, src or key sharing memory with out, or a bad p or key; TypeError for non-float
    tensors or a non-int64 key. Source: docs/miss.md, "Default and mini" (dx's adapter part;
    mini's tiling; merge's dW)."""
    torch.ops.miss.tile_add_(out, src, alpha, p, key)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor, p: float = 0.0,
           key: Optional[Tensor] = None) -> Tensor:
    """y = x weight^T + bias + fold(dropout(x), r) @ tile(block): a default or mini MiSS layer.

    x (..., in) and weight (out, in), bias (out,) or None, all of one float dtype; block (r, out)
    or (r, mini_r). Returns y (..., out) in x's dtype: the base GEMM rounds in x's dtype, the
    adapter term is computed in the block's dtype, and the sum is rounded once (PEFT's
    precision). With p > 0, key = new_dropout_key(x.device). Differentiable in x, weight, bias
    and block, to any order. ValueError for mismatched shapes, a scalar x, a block that is not
    2-D, mini_r not dividing out, out == 0 with a (r, out) block, a bad p or key; TypeError for
    non-float tensors or x, weight and bias of different dtypes (the block may differ). Source:
    docs/miss.md, "Default and mini" and "Precision"; PEFT's MissLinear.forward."""
    return torch.ops.miss.linear(x, weight, bias, block, p, key)


def merge(weight: Tensor, block: Tensor, reverse: bool = False) -> Tensor:
    """weight + dW (minus with reverse), dW[o, i] = block[i mod r, o mod mini_r]; a new tensor
    (out, in) in weight's dtype, differentiable (but the bat reverse).

    A 3-D (bat) block (out/r, r, r) gives W(I + B) + B per r x r tile, and reverse its inverse
    (W' - B)(I + B)^-1, whose (I + B_i)^-1 is computed in float64 and applied in float32 (float64
    for float64 data); the bat reverse is not differentiable (RuntimeError if a gradient is
    needed) and raises ValueError, naming the block, where I + B_i is not finite or is
    ill-conditioned (condition number > 1e4; for a float16 weight 128, bfloat16 16, whose
    rounding of W' the inverse multiplies) or too close to -I (||B_i|| ||(I + B_i)^-1|| over the
    same bound, 2-norms). weight (out, in); block (r, out), (r, mini_r) or
    (out/r, r, r), any float dtypes. ValueError for a block that does not fit weight; TypeError
    for non-float tensors. Source: docs/miss.md, "Merging"."""
    return torch.ops.miss.merge(weight, block, reverse)


def merge_(weight: Tensor, block: Tensor, reverse: bool = False) -> None:
    """merge in place into weight (unmerge with reverse=True); not differentiable.

    Bat unmerge first checks that every I + B_i is finite and well conditioned (ValueError naming
    the block, weight unchanged); this check reads values on the host. A block that overlaps
    weight in memory is refused (ValueError, weight unchanged). Returns None. Other errors as
    merge; RuntimeError if weight or block requires grad (use merge, or torch.no_grad())."""
    torch.ops.miss.merge_(weight, block, reverse)


def bat_weight(weight: Tensor, block: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Bat effective weight W' = W + W_ij B_i + B_i per r x r tile W_ij (row block i, column
    block j): shape (out, in), dtype `dtype` (default: the block's).

    weight (out, in), block (out/r, r, r), r dividing in and out; computed in float32 (float64
    if either is float64, or dtype is). Differentiable in weight and block; several bat adapters
    compose as bat_weight(bat_weight(W, B1, t), B2, t) with t = torch.promote_types of the three
    dtypes (PEFT's W + delta dtype; the default, the block's dtype, would round a float32 base's
    W' to a bf16 block's dtype). ValueError for a block that is not 3-D or does not fit
    weight; TypeError for non-float tensors or dtype. Source: docs/miss.md, "Bat"; PEFT's bat
    get_delta_weight (W + delta)."""
    return torch.ops.miss.bat_weight(weight, block, dtype)


def bat_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
               compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y = x W'^T + bias with W' = bat_weight(weight, block): a bat MiSS layer.

    x (..., in), weight (out, in), bias (out,) or None, each in any floating dtype (PEFT's bat
    forward casts x to W''s dtype, so a bf16 base fed float32 x computes); block (out/r, r, r).
    Returns y (..., out) in x's dtype. PEFT's precision: W' is built and the GEMM runs in the
    dtype of PEFT's W + delta, promote(weight.dtype, block.dtype) (x, weight and bias each
    rounded once to it) unless compute_dtype names another (opt-in lower precision; autocast
    uses it). Differentiable in x, weight, bias and block, each gradient in its input's dtype;
    W' is never saved for the backward. ValueError for mismatched shapes or a block that is
    not (out/r, r, r); TypeError for non-float tensors or compute_dtype. Source: docs/miss.md,
    "Bat" and "Precision"; PEFT's bat forward."""
    return torch.ops.miss.bat_linear(x, weight, bias, block, compute_dtype)


def bat_transform(w: Tensor, m: Tensor, p: Tensor, dtype: Optional[torch.dtype] = None,
                  residual: bool = False) -> Tensor:
    """The per-tile affine map behind bat, merge and unmerge:
    out[o, s*r + b] = sum_k w[o, s*r + k] m[o/r][k][b] + p[o/r][o%r][b], plus w[o, s*r + b] when
    residual (added after the sum, one rounding: bat's W' = bat_transform(W, B, B, residual=True)
    keeps the update's rounding error at the update's scale, as PEFT's W + delta).

    w (rows, cols), r dividing both; m, p (rows/r, r, r), both float32 or both float64 (the
    compute dtype). Returns (rows, cols) in `dtype` (default w's). Not differentiable
    (RuntimeError for an input that requires grad; bat_weight is the differentiable form).
    ValueError for mismatched shapes; TypeError for other m, p dtypes. Source: docs/miss.md,
    "Bat" and "Merging"."""
    return torch.ops.miss.bat_transform(w, m, p, dtype, residual)


def bat_transform_(w: Tensor, m: Tensor, p: Tensor, residual: bool = False) -> None:
    """bat_transform in place into w (same arguments, no dtype); returns None. m and p must not
    share memory with w (ValueError); other errors as bat_transform."""
    torch.ops.miss.bat_transform_(w, m, p, residual)


def tile_add(out: Tensor, src: Tensor, alpha: float = 1.0, p: float = 0.0, key: Optional[Tensor] = None) -> Tensor:
    """The functional tile_add_: returns out + alpha * dropout(tile(src)) as a new tensor in out's
    dtype and shape, differentiable in out and src to any order. out (..., C) and src (..., Q)
    with out's leading sizes, or both matrices (src's rows tile out's too); any supported float
    dtypes; with p > 0, key = new_dropout_key(out.device). ValueError for a src without out's
    leading sizes (unless both are matrices), a 0-dim out or src, an empty src for a non-empty
    out, or a bad p or key; TypeError for non-float tensors or a non-int64 key (each as
    tile_add_, which has the details). Source: docs/miss.md, "Default and mini"."""
    return torch.ops.miss.tile_add(out, src, alpha, p, key)


def bank_fold(x: Tensor, index: Tensor, ranks: Tensor, max_r: int, dropouts: Optional[Tensor] = None,
              key: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The fold of a mixed-adapter batch: each row at its own adapter's rank and dropout rate.

    s[t, j] = fold(dropout(x[t]), r_a)[j] for j < r_a = ranks[a], a = index[t]; zero for
    r_a <= j < max_r and for rows with a negative index. Shapes: x (..., in), any floating dtype;
    index int64 with x's leading sizes; ranks int64 (N,), 1 <= ranks[a] <= max_r for every slot a
    row uses. Dropout: dropouts float64 (N,) (slot a's rate in [0, 1]) and key (new_dropout_key on
    x's device) together, or neither; row t's mask is that of fold(x, r_a, dropouts[a], key).
    Returns (..., max_r) in dtype (default x's), summed in float32 (float64 for float64 data or
    dtype=torch.float64, as fold).
    Differentiable in x (once: create_graph=True raises RuntimeError). ValueError for a bad shape,
    max_r < 1, an index past the slots, a used rank outside [1, max_r], a used rate outside
    [0, 1], or dropouts without key (or key without dropouts); TypeError for a non-float x or
    dtype, or index/ranks not int64, dropouts not float64; each names the argument. On CUDA a
    bad value in index, ranks or dropouts trips a device-side assertion instead. Source:
    miss_ext/bank.py (issue 14); each row is fold's, docs/miss.md "Default and mini"."""
    return torch.ops.miss.bank_fold(x, index, ranks, max_r, dropouts, key, dtype)


def bank_add(y: Tensor, s: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor,
             per_row_fold: bool = False) -> Tensor:
    """A bank of MiSS adapters, one per row: y + the adapter term of slot index[t] for each row t.

    out[t, o] = y[t, o] + sum_{k<R} s[t, k] * bank[a, k mod ranks[a], o mod periods[a]], a = index[t];
    rows with a negative index keep y. Shapes: y (..., out), any floating dtype; s (..., R) in the
    bank's dtype, either fold(x, R) (per_row_fold=False: every rank a row uses must divide R) or
    bank_fold(x, index, ranks, R) (per_row_fold=True: any rank up to R); bank (N, r_cap, q_cap),
    float32 or y's dtype, slot a's block in [:ranks[a], :periods[a]] (periods[a] = out in the
    default mode, mini_r in the mini mode); ranks, periods int64 (N,); index int64 with y's
    leading sizes. Returns (..., out) in y's dtype. Differentiable in y, s and bank (once:
    create_graph=True raises RuntimeError). ValueError for a bad shape, an index past the slots,
    a used rank outside [1, min(r_cap, R)] (or not dividing R without per_row_fold: a fold at R
    cannot give it), a used period outside [1, q_cap] or not dividing out (out == 0: a negative
    one; no column is read); TypeError for a non-float y, a bank neither float32 nor y's dtype,
    an s not in the bank's dtype, or non-int64 ranks, periods or index; each names the argument.
    On CUDA a bad value in ranks, periods or index trips a device-side assertion instead, except
    for rows with no columns (out == 0), which no kernel runs: checked on the host there (a copy,
    so a synchronisation). Source: miss_ext/bank.py (issue 14)."""
    return torch.ops.miss.bank_add(y, s, bank, ranks, periods, index, per_row_fold)


def bank_add_(y: Tensor, s: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor,
              per_row_fold: bool = False) -> None:
    """bank_add in place into y: y[t] += the adapter term of slot index[t] (rows with a negative
    index unchanged); returns None. Arguments as bank_add: y (..., out) floating; s (..., R) in
    the bank's dtype; bank (N, r_cap, q_cap); ranks, periods int64 (N,); index int64 with y's
    leading sizes. Not differentiable: RuntimeError for a y, s or bank that requires grad.
    ValueError for an input sharing y's memory, RuntimeError for an expanded y (torch's "more than
    one element of the written-to tensor"), and bank_add's
    ValueError/TypeError for bad shapes, dtypes and values, each naming the argument; y is
    unchanged after any error raised on the host."""
    torch.ops.miss.bank_add_(y, s, bank, ranks, periods, index, per_row_fold)


# Ops registered from C++ carry no docstring (`torch.ops.miss.fold.__doc__` was None); give each
# packet its wrapper's, with the schema, so help in a REPL or notebook says what the op does.
# Only the instance attribute changes: dispatch, TorchScript and torch.compile never read it.
_DOCS_WITHOUT_WRAPPER = {
    "bank_fold_backward": "The adjoint of bank_fold in x: grad_x[t, i] = dropout_{p_a}(grad[t, i mod r_a]) with "
                          "the forward's mask, zero for rows without adapter. Used by bank_fold's autograd; not "
                          "differentiable again.",
    "bank_add_backward": "The adjoint of bank_add in s and bank: (grad_s, grad_bank), slot a's gradient from its "
                         "rows only, zero outside [:ranks[a], :periods[a]]. Used by bank_add's autograd; not "
                         "differentiable again.",
    "split_addmm": "y + a @ b for the bfloat16 parts of miss.linear's split-bf16 products (y (m, n), a (m, k), b (k, n), "
                   "all bfloat16): the sum formed in float32, cuBLAS's split-K partial sums included whatever "
                   "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction says, rounded once. Internal to "
                   "miss.linear (csrc/ops/split_gemm.h); not differentiable.",
    "split_addmm_": "split_addmm in place into y; returns None. Internal to miss.linear; not differentiable.",
    "split_bf16": "The bfloat16 parts of float32 t (m, n) for miss.linear's and miss.bat_linear's split-bf16 "
                  "products: t = part_0 + ... + part_{parts-1} (parts 1 to 3; each part but the last the exact head "
                  "of what the earlier ones leave, the last rounded to nearest even). Returns cat([part_{order[0]}, "
                  "part_{order[1]}, ...], dim), bfloat16 (order: 1 to 8 part indices, repeats allowed). ValueError "
                  "for another dtype, shape, parts or order, IndexError for a dim outside [-2, 1]. Internal "
                  "(csrc/ops/split_gemm.h); not differentiable.",
    "build_info": "How the op library was built, as one string of ';'-separated key=value items (backends, "
                  "cuda_version, cuda_archs, built_with_torch, cxx_runtime, sanitize); miss_ext.build_info() "
                  "returns it as a dict.",
}


def _document_ops() -> None:
    names = sorted({n[len("miss::"):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("miss::")})
    for name in names:
        packet = getattr(torch.ops.miss, name)
        wrapper = globals().get(name)
        doc = wrapper.__doc__ if callable(wrapper) and wrapper.__doc__ else _DOCS_WITHOUT_WRAPPER.get(name)
        if doc is None:
            continue
        schemas = "\n".join(f"    {getattr(packet, o)._schema}" for o in packet.overloads())
        wrapper_line = f"Python wrapper: miss_ext.ops.{name}. " if callable(wrapper) else ""
        packet.__doc__ = f"{doc}\n\n{wrapper_line}Schema:\n{schemas}"


_document_ops()
