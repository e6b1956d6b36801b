"""Run an existing PEFT MiSS model on `torch.ops.miss`, in place: `accelerate(peft_model)`.

`accelerate` swaps the class of every `peft.tuners.miss.MissLinear` to `AcceleratedMissLinear`, a
subclass whose forward, merge and unmerge call the miss ops. Nothing else changes: the same
module objects, parameter objects, state-dict keys, adapter dictionaries and PEFT flags, so
optimizers, checkpoints, `save_pretrained`, `set_adapter`, `disable_adapter()`,
`merge_and_unload()` and `generate()` keep working, and `restore` swaps the class back.

Where PEFT's own behaviour is a bug (miss-spec.md, last section) the accelerated layer follows
the spec's intent instead:
- each adapter keeps its own mode, read from its block's shape (3-D: bat; (r, out): default;
  (r, mini_r): mini). PEFT 0.21 uses the mode of the layer's first adapter for all of them, so a
  layer mixing bat and default/mini adapters computes garbage or crashes there;
- active bat adapters are applied to the weight first, in order, then the default/mini terms are
  added; merge does the same (bat adapters first), so merged and unmerged outputs agree; merging
  a bat adapter on top of already merged default/mini ones is refused (ValueError), as the result
  could not equal the unmerged forward;
- mini merge never rewrites the block (PEFT replaces a half-precision CPU block by its tiled
  (r, out) copy, after which unmerge crashes);
- bat unmerge checks that every I + B_i is well conditioned (ValueError, weight untouched);
- safe_merge checks every adapter before writing anything.
Layers whose base is not a plain `nn.Linear` (quantized backends, forward hooks, extra forward
arguments) keep PEFT's own code path, so accelerating never breaks a model.
"""
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from peft.tuners.miss import MissLinear as PeftMissLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .ops import new_dropout_key

__all__ = ["AcceleratedMissLinear", "accelerate", "restore", "is_accelerated"]


def _is_bat(block: Tensor) -> bool:
    return block.dim() == 3


class AcceleratedMissLinear(PeftMissLinear):
    """PEFT's MissLinear with forward, merge and unmerge on `torch.ops.miss`. Never constructed:
    `accelerate` converts existing PEFT layers by swapping their class."""

    def _fast_path(self) -> bool:
        """The miss ops replace `base_layer(x)` only when that is exactly F.linear(x, W, b)."""
        base = self.base_layer
        return (self.quantization_backend is None and type(base).forward is nn.Linear.forward
                and isinstance(base, nn.Linear) and "forward" not in vars(base)
                and not base._forward_hooks and not base._forward_pre_hooks)

    def _dropout_p(self, adapter: str) -> float:
        dropout = self.miss_dropout[adapter]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _active_blocks(self) -> List[str]:
        return [a for a in self.active_adapters if a in self.miss_block]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or not self._fast_path():
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = [] if self.disable_adapters or self.merged else self._active_blocks()
        if not active:
            return self.base_layer(x).to(previous_dtype)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        bats, shards = [], []
        for name in active:
            block = self.miss_block[name]
            if _is_bat(block):
                bats.append(block)
            else:
                shards.append((block, self._dropout_p(name)))
        # The common cases are one fused op each.
        if not bats and len(shards) == 1:
            block, p = shards[0]
            return torch.ops.miss.linear(x, weight, bias, block, p, new_dropout_key(x.device) if p > 0.0 else None)
        if not shards:
            for block in bats[:-1]:
                weight = torch.ops.miss.bat_weight(weight, block, None)
            return torch.ops.miss.bat_linear(x, weight, bias, bats[-1], None)
        # Several default/mini adapters, possibly on top of bat ones: PEFT's precision (adapter
        # terms in the block dtype, added to the base result, one final cast).
        if bats:
            for block in bats:
                weight = torch.ops.miss.bat_weight(weight, block, None)
            result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        else:
            result = self.base_layer(x)
        for block, p in shards:
            folded = torch.ops.miss.fold(x, block.shape[0], p, new_dropout_key(x.device) if p > 0.0 else None, block.dtype)
            term = folded @ block
            if block.shape[1] != self.out_features:  # mini: tile (r, mini_r) along the output axis
                term = term.repeat([1] * (term.dim() - 1) + [self.out_features // block.shape[1]])
            result = result + term
        return result.to(previous_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        if not self._fast_path():
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.miss_block]
        # Bat adapters act on the weight before the default/mini terms, as in the forward.
        names = [a for a in names if _is_bat(self.miss_block[a])] + [a for a in names if not _is_bat(self.miss_block[a])]
        if not names:
            return
        already_shard = [a for a in self.merged_adapters if a in self.miss_block and not _is_bat(self.miss_block[a])]
        if already_shard and _is_bat(self.miss_block[names[0]]):
            raise ValueError(f"cannot merge bat adapter {names[0]!r} on top of merged default/mini adapters "
                             f"{already_shard}: unmerge them first (bat acts on the weight before them)")
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe_merge:
                merged = weight
                for name in names:
                    merged = torch.ops.miss.merge(merged, self.miss_block[name], False)
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be "
                                         "broken; the weight was left unchanged")
                weight.copy_(merged)
            else:
                for name in names:
                    torch.ops.miss.merge_(weight, self.miss_block[name], False)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self._fast_path():
            return super().unmerge()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                if name in self.miss_block:
                    # Raises (weight untouched, adapter still listed as merged) for an ill-conditioned bat block.
                    torch.ops.miss.merge_(self.base_layer.weight, self.miss_block[name], True)
                self.merged_adapters.pop()


def _miss_layers(model: nn.Module, cls: type) -> list:
    return [m for m in model.modules() if type(m) is cls]


def accelerate(model: nn.Module) -> nn.Module:
    """Makes every PEFT MiSS layer of the model run on the miss ops, in place; returns the model.
    Raises ValueError if the model has no PEFT MissLinear layer."""
    layers = _miss_layers(model, PeftMissLinear)
    if not layers and not _miss_layers(model, AcceleratedMissLinear):
        raise ValueError("accelerate: the model has no peft.tuners.miss.MissLinear layer")
    for layer in layers:
        layer.__class__ = AcceleratedMissLinear
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes `accelerate`: the layers run PEFT's own code again. Returns the model."""
    for layer in _miss_layers(model, AcceleratedMissLinear):
        layer.__class__ = PeftMissLinear
    return model


def is_accelerated(model: nn.Module) -> bool:
    """True when every PEFT MiSS layer of the model is accelerated (and there is at least one)."""
    return bool(_miss_layers(model, AcceleratedMissLinear)) and not _miss_layers(model, PeftMissLinear)
