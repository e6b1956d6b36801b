"""`MissLinear`: a frozen nn.Linear plus one trainable MiSS block, run on `torch.ops.miss`."""
import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .ops import new_dropout_key

MODES = ("default", "mini", "bat")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return value


def block_shape(mode: str, r: int, mini_r: int, in_features: int, out_features: int):
    """Shape of miss_block for a mode (PEFT's shapes); raises ValueError on bad sizes."""
    _check_int("r", r)
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got r={r}")
    if mode == "default":
        return (r, out_features)
    if mode == "mini":
        _check_int("mini_r", mini_r)
        if mini_r <= 0 or out_features % mini_r != 0:
            raise ValueError(f"mini_r={mini_r} must be a positive divisor of out_features={out_features}")
        return (r, mini_r)
    if mode == "bat":
        if in_features % r != 0 or out_features % r != 0:
            raise ValueError(f"bat mode needs in_features and out_features divisible by r; got "
                             f"in_features={in_features}, out_features={out_features}, r={r}")
        return (out_features // r, r, r)
    raise ValueError(f"unknown MiSS mode {mode!r}; expected one of {', '.join(MODES)}")


def check_dropout(dropout: object) -> float:
    """The adapter dropout probability as a float; ValueError unless it is a number in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got dropout={dropout!r}")
    return float(dropout)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default (autocast_adapter_dtype=True): half-precision bases get a float32 block."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class MissLinear(nn.Module):
    """MiSS adapter on a frozen `nn.Linear`: y = base(x) + fold(dropout(x)) @ tile(miss_block).

    Args:
        base_layer: the layer to adapt; it is frozen and stays reachable as `.base_layer`.
        r: shard size ("rank"); any r >= 1, also r > in_features (see the warning it gives).
        mode: "default" (miss_block (r, out)), "mini" (miss_block (r, mini_r), tiled along out) or
            "bat" (miss_block (out/r, r, r): W' = W + W_ij B_i + B_i per r x r tile; r must divide
            in_features and out_features).
        mini_r: the mini mode's block width; must divide out_features.
        dropout: dropout probability of the adapter branch's input, in training only. Ignored
            in bat mode (as PEFT), with a warning.
        init_weights: True gives PEFT's zero init (the adapter starts as an exact identity);
            False gives PEFT's random init (kaiming-uniform), useful in tests.
    """

    def __init__(self, base_layer: nn.Linear, r: int, mode: str = "default", mini_r: int = 1,
                 dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MissLinear adapts nn.Linear layers, got {type(base_layer).__name__}")
        check_dropout(dropout)
        weight = base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"the base layer's weight must be floating point, got dtype {weight.dtype}")
        out_features, in_features = weight.shape
        shape = block_shape(mode, r, mini_r, in_features, out_features)

        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.mode = mode
        self.mini_r = shape[1] if mode == "mini" else out_features
        self.dropout = float(dropout)
        self.merged = False
        self.miss_block = nn.Parameter(torch.zeros(shape, dtype=adapter_dtype(weight.dtype), device=weight.device))
        if not init_weights:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        if mode == "bat" and dropout > 0.0:
            warnings.warn(f"MiSS dropout={dropout} is ignored in bat mode (as in PEFT)", stacklevel=2)
        if r > in_features:
            warnings.warn(
                f"MiSS r={r} > in_features={in_features}: miss_block rows {in_features}..{r - 1} never "
                "receive a gradient and are dead weight (supported for adapters saved that way)",
                stacklevel=2,
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.mode == "bat":
            return torch.ops.miss.bat_linear(x, self.base_layer.weight, self.base_layer.bias, self.miss_block, None)
        p = self.dropout if self.training else 0.0
        key: Optional[Tensor] = None
        if p > 0.0:
            key = new_dropout_key(x.device)
        return torch.ops.miss.linear(x, self.base_layer.weight, self.base_layer.bias, self.miss_block, p, key)

    @torch.jit.unused
    def merge(self, safe_merge: bool = False) -> None:
        """W <- W + dW. With safe_merge, the merged weight is built in a copy and checked first:
        non-finite values raise ValueError and leave the weight untouched."""
        if self.merged:
            warnings.warn("MissLinear is already merged; nothing to do")
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe_merge:
                merged = torch.ops.miss.merge(weight, self.miss_block)
                if not torch.isfinite(merged).all():
                    raise ValueError("NaNs detected in the merged weights. The MiSS adapter seems to be broken; "
                                     "the base weight was left unchanged")
                weight.copy_(merged)
            else:
                torch.ops.miss.merge_(weight, self.miss_block)
        self.merged = True

    @torch.jit.unused
    def unmerge(self) -> None:
        """W <- W - dW (bat: W <- (W - B)(I + B)^-1 per tile, after checking every I + B_i is well
        conditioned; ValueError and an untouched weight otherwise): restores the base weight up to
        rounding."""
        if not self.merged:
            warnings.warn("MissLinear is not merged; nothing to do")
            return
        with torch.no_grad():
            torch.ops.miss.merge_(self.base_layer.weight, self.miss_block, True)
        self.merged = False

    @torch.jit.unused
    def delta_weight(self) -> Tensor:
        """dW (out, in) = merged weight - weight, in the block's dtype (bat: W B + B per tile)."""
        weight = self.base_layer.weight
        if self.mode == "bat":
            return torch.ops.miss.bat_weight(weight, self.miss_block, None) - weight.to(self.miss_block.dtype)
        zeros = weight.new_zeros(weight.shape, dtype=self.miss_block.dtype)
        return torch.ops.miss.merge(zeros, self.miss_block)

    def extra_repr(self) -> str:
        text = f"r={self.r}, mode={self.mode!r}"
        if self.mode == "mini":
            text += f", mini_r={self.mini_r}"
        if self.dropout and self.mode != "bat":
            text += f", dropout={self.dropout}"
        return text + (", merged" if self.merged else "")
