"""Python entry points of the `miss` ops; each is a direct call of `torch.ops.miss.<op>`.

They stay scriptable and traceable: TorchScript and torch.compile see the op itself. Shapes:
x (..., in), weight (out, in), block = miss_block, (r, out) in the default mode or (r, mini_r)
in the mini mode. Dropout needs `p` and a key from `new_dropout_key(x.device)`.
"""
from typing import Optional

import torch
from torch import Tensor

def new_dropout_key(device: Optional[torch.device] = None) -> Tensor:
    """A fresh dropout key for the miss ops: int64 tensor [seed, offset] of shape (2,) on `device`
    (default: the CPU), which must be the device of the data it masks (`new_dropout_key(x.device)`;
    the ops raise ValueError for a key on another device).

    Drawn with `torch.randint` from that device's default generator, so `torch.manual_seed`
    reproduces it. The kernels read it where it lives, so the host never waits for the GPU, and
    inside a captured CUDA graph every replay draws a new key and hence a new mask (torch's
    generator is graph-safe). The same key values give the same mask on the CPU and on CUDA
    (csrc/ops/common/dropout_mask.h). C++: `miss_ext::ops::new_dropout_key(device)`."""
    # 2**62 as a literal: TorchScript cannot read module globals, and its ** gives a float.
    return torch.randint(0, 4611686018427387904, [2], dtype=torch.int64, device=device)


def fold(x: Tensor, r: int, p: float = 0.0, key: Optional[Tensor] = None,
         dtype: Optional[torch.dtype] = None) -> Tensor:
    """S[..., j] = sum of dropout(x)[..., i] over i mod r == j: shape (..., r).
    With p > 0, key = new_dropout_key(x.device)."""
    return torch.ops.miss.fold(x, r, p, key, dtype)


def tile_add_(out: Tensor, src: Tensor, alpha: float = 1.0, p: float = 0.0, key: Optional[Tensor] = None) -> None:
    """out[t, c] += alpha * dropout(src)[t mod P, c mod Q], in place (the adjoint of fold).
    With p > 0, key = new_dropout_key(out.device); the mask is indexed by out's (row, column)."""
    torch.ops.miss.tile_add_(out, src, alpha, p, key)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor, p: float = 0.0,
           key: Optional[Tensor] = None) -> Tensor:
    """y = x weight^T + bias + fold(dropout(x)) @ tile(block). With p > 0, key = new_dropout_key(x.device)."""
    return torch.ops.miss.linear(x, weight, bias, block, p, key)


def merge(weight: Tensor, block: Tensor, reverse: bool = False) -> Tensor:
    """weight + dW (minus with reverse), dW[o, i] = block[i mod r, o mod mini_r]; a new tensor.
    A 3-D (bat) block gives W(I + B) + B per r x r tile, and reverse its exact inverse."""
    return torch.ops.miss.merge(weight, block, reverse)


def merge_(weight: Tensor, block: Tensor, reverse: bool = False) -> None:
    """In-place merge (unmerge with reverse=True)."""
    torch.ops.miss.merge_(weight, block, reverse)


def bat_weight(weight: Tensor, block: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Bat effective weight W' = W + W_ij B_i + B_i per r x r tile (default dtype: the block's).
    Differentiable; several bat adapters compose as bat_weight(bat_weight(W, B1), B2)."""
    return torch.ops.miss.bat_weight(weight, block, dtype)


def bat_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
               compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y = x W'^T + bias with PEFT's precision (GEMM in the block's dtype unless compute_dtype)."""
    return torch.ops.miss.bat_linear(x, weight, bias, block, compute_dtype)


def bat_transform(w: Tensor, m: Tensor, p: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The per-tile affine map behind bat: out[o, s*r + b] = sum_k w[o, s*r + k] m[o/r][k][b] +
    p[o/r][o%r][b]; m, p (rows/r, r, r) float32 or float64. Not differentiable."""
    return torch.ops.miss.bat_transform(w, m, p, dtype)


def bat_transform_(w: Tensor, m: Tensor, p: Tensor) -> None:
    """In-place bat_transform of w."""
    torch.ops.miss.bat_transform_(w, m, p)


def tile_add(out: Tensor, src: Tensor, alpha: float = 1.0, p: float = 0.0, key: Optional[Tensor] = None) -> Tensor:
    """The functional tile_add_: out + alpha * dropout(tile(src)), differentiable in out and src."""
    return torch.ops.miss.tile_add(out, src, alpha, p, key)



def bank_add(y: Tensor, s: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor) -> Tensor:
    """A bank of MiSS adapters, one per row: y + the adapter term of slot index[t] for each row t.

    out[t, o] = y[t, o] + sum_{k<R} s[t, k] * bank[a, k mod ranks[a], o mod periods[a]], a = index[t];
    rows with a negative index keep y. Shapes: y (..., out), any floating dtype; s (..., R) =
    fold(x, R, dtype=bank.dtype) (every ranks[a] divides R); bank (N, r_cap, q_cap), float32 or y's
    dtype, slot a's block in [:ranks[a], :periods[a]] (periods[a] = out in the default mode,
    mini_r in the mini mode); ranks, periods int64 (N,); index int64 with y's leading sizes.
    Differentiable in y, s and bank (once). ValueError/TypeError name a bad argument; on CUDA a
    bad value in ranks, periods or index trips a device-side assertion."""
    return torch.ops.miss.bank_add(y, s, bank, ranks, periods, index)


def bank_add_(y: Tensor, s: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor) -> None:
    """bank_add in place into y (not differentiable)."""
    torch.ops.miss.bank_add_(y, s, bank, ranks, periods, index)
