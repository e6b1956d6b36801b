"""Model-level MiSS without PEFT: put `MissLinear` layers into a model, merge them back out."""
import warnings
from typing import List, Tuple

import torch
from torch import nn

from .modules import MissLinear, block_shape, check_dropout
from .targets import TargetModules, describe, find_targets, set_module


def miss_layers(model: nn.Module) -> List[Tuple[str, MissLinear]]:
    """(path, layer) of every `miss_ext.MissLinear` in the model, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MissLinear)]


def freeze_all_but_blocks(model: nn.Module) -> None:
    """Every parameter stops requiring grad except the miss_block of each MissLinear (PEFT's
    get_peft_model freezes the same way); blocks from earlier calls stay trainable."""
    blocks = {id(layer.miss_block) for _, layer in miss_layers(model)}
    for p in model.parameters():
        if id(p) not in blocks:
            p.requires_grad_(False)


def _check_targets(found, target_modules) -> None:
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matches no module of the model")
    already = [name for name, m in found if isinstance(m, MissLinear)]
    if already:
        raise ValueError(f"these modules already have a MiSS adapter (miss_ext.MissLinear holds one): "
                         f"{describe(already)}")
    wrong = [f"{name} ({type(m).__name__})" for name, m in found if not isinstance(m, nn.Linear)]
    if wrong:
        raise TypeError(f"MiSS adapts torch.nn.Linear layers only; target_modules={target_modules!r} also "
                        f"matches {describe(wrong)}")


def apply_miss(model: nn.Module, target_modules: TargetModules, r: int, mode: str = "default", mini_r: int = 1,
               dropout: float = 0.0, init_weights: bool = True, freeze_others: bool = True) -> nn.Module:
    """Replaces the matching `nn.Linear` layers with `MissLinear` in place and returns the model.

    target_modules follows PEFT: a list of names matching a module path exactly or as its last
    dotted components ("q_proj", "self_attn.q_proj"), a regex string matching the whole path, or
    "all-linear" (every nn.Linear except the output head). With freeze_others (the default, as
    PEFT's get_peft_model), every parameter except the miss_block ones (new and earlier) stops
    requiring grad.

    Every check runs before anything changes: a target that is not an nn.Linear raises TypeError,
    no match, a layer that already has an adapter, or bad r / mini_r / dropout for any layer
    raises ValueError, and the model is left as it was.
    """
    found = find_targets(model, target_modules, skip_inside=(MissLinear,))
    _check_targets(found, target_modules)
    for name, linear in found:
        out_features, in_features = linear.weight.shape
        try:
            block_shape(mode, r, mini_r, in_features, out_features)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        if not linear.weight.is_floating_point():
            raise TypeError(f"{name}: the weight must be floating point, got dtype {linear.weight.dtype}")
    check_dropout(dropout)

    with warnings.catch_warnings():
        # One warning per model rather than one per layer for the r > in case.
        warnings.simplefilter("ignore")
        layers = [(name, MissLinear(linear, r, mode, mini_r, dropout, init_weights)) for name, linear in found]
    dead = [name for name, layer in layers if r > layer.in_features]
    if dead:
        warnings.warn(f"MiSS r={r} exceeds in_features of {describe(dead)}: block rows beyond in_features never "
                      "receive a gradient and are dead weight", stacklevel=2)
    if mode == "bat" and dropout > 0.0:
        warnings.warn(f"MiSS dropout={dropout} is ignored in bat mode (as in PEFT)", stacklevel=2)
    for name, layer in layers:
        set_module(model, name, layer)
    if freeze_others:
        freeze_all_but_blocks(model)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merges every `MissLinear` into its base weight and puts the plain `nn.Linear` back, in
    place; returns the model. With safe_merge, every merged weight is computed and checked first:
    a non-finite value raises ValueError naming the layer, and nothing is changed."""
    layers = miss_layers(model)
    if not layers:
        warnings.warn("merge_and_unload: the model has no miss_ext.MissLinear layer; nothing to do", stacklevel=2)
        return model
    if safe_merge:
        # All or nothing: check every layer's merged weight before writing any. Keeping them all
        # for the write would hold a second copy of every adapted weight; recomputing costs one
        # elementwise pass per layer instead.
        with torch.no_grad():
            for name, layer in layers:
                if not layer.merged and not torch.isfinite(
                        torch.ops.miss.merge(layer.base_layer.weight, layer.miss_block, False)).all():
                    raise ValueError(f"NaNs detected in the merged weights of {name}; nothing was merged")
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        if not name:  # the model is the MissLinear itself
            return layer.base_layer
        set_module(model, name, layer.base_layer)
    return model
