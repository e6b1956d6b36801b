"""Model-level MiSS without PEFT: put `MissLinear` layers into a model, merge them back out."""
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .modules import WEIGHT_READING_PARENTS, MissLinear, base_refusal, block_shape, check_dropout, merge_refusal
from .targets import (ALL_LINEAR, TargetModules, describe, find_targets, module_paths, other_holders,
                      parameter_paths, set_module, shared_weight_message)


def parent_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module holding the submodule at `path` (None for the model itself)."""
    if not path:
        return None
    return model.get_submodule(path.rpartition(".")[0])


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


def record_shared_weights(model: nn.Module) -> Dict[str, List[str]]:
    """Finds, by parameter identity, which MissLinear layers share a base weight or bias with
    other modules (tied embeddings, a linear also registered under another path, ...).

    Sets `layer._shared_with` on every MissLinear of the model (the other holders' parameter
    paths, [] when not shared; MissLinear.merge reads it, as a layer cannot see its model) and
    returns {layer path: other holders} for the shared ones. Call it again after untying by
    hand so that a layer's own merge() sees the change (merge_and_unload always re-checks)."""
    params, modules = parameter_paths(model), module_paths(model)
    shared = {}
    for name, layer in miss_layers(model):
        base = layer.base_layer
        holders = other_holders(params, (base.weight, base.bias), modules[id(layer)])
        layer._shared_with = holders
        layer._layer_path = name or "the model"  # for the layer's own merge() message
        if holders:
            shared[name] = holders
    return shared


def warn_shared(shared: Dict[str, List[str]], stacklevel: int = 3) -> None:
    """One warning at setup for new adapters on shared weights (PEFT warns there too)."""
    if shared:
        where = "; ".join(f"{name} (shared with {describe(holders)})" for name, holders in shared.items())
        warnings.warn(f"MiSS adapter on layers whose base parameters are shared with other modules: {where}. "
                      "Unmerged this is correct (only these layers' outputs change), but merging would also change "
                      "the other modules, so merge and merge_and_unload will refuse until the weight is untied",
                      stacklevel=stacklevel)


def _drop_shared_linears(model: nn.Module, found):
    """"all-linear" must not pick layers that could never be merged: drops the nn.Linear layers
    whose weight or bias is also held elsewhere. Returns (kept, {path: other holders})."""
    params = parameter_paths(model)
    kept, skipped = [], {}
    for name, module in found:
        # Only plain linears: Conv1D and existing MissLinear layers go on to their own errors.
        holders = other_holders(params, (module.weight, module.bias), [name]) if isinstance(module, nn.Linear) else []
        if holders:
            skipped[name] = holders
        else:
            kept.append((name, module))
    return kept, skipped


def _check_init_weights(init_weights: object) -> None:
    """init_weights is a bool here; PEFT's string values select a mode, which is `mode` here, so a
    string (truthy) would otherwise silently give a zero-initialised default-mode adapter."""
    if not isinstance(init_weights, bool):
        hint = f"; PEFT's init_weights={init_weights!r} is mode={init_weights!r} here" \
            if init_weights in ("bat", "mini") else ""
        raise TypeError(f"init_weights must be True (zeros) or False (random), got init_weights={init_weights!r}{hint}")


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

    A layer whose weight or bias is also held by another module (tied embeddings, one linear
    under two paths) is adapted if named, with a warning: the unmerged forward is right, but a
    merge would change the other module, so merging it is refused later. "all-linear" skips
    such layers (with a warning naming them).

    Every check runs before anything changes: a target that is not an nn.Linear, or a non-bool
    init_weights, raises TypeError; no match, a layer that already has an adapter, bad r /
    mini_r / dropout for any layer raises ValueError; and the model is left as it was. (mini_r
    outside mode="mini" is ignored, as PEFT ignores it.)
    """
    found = find_targets(model, target_modules, skip_inside=(MissLinear,))
    if target_modules == ALL_LINEAR:
        # Linears whose parent reads their weight directly (nn.MultiheadAttention's out_proj)
        # could not run an adapter: skipped, as the shared ones below.
        unusable = [name for name, _ in found if isinstance(parent_module(model, name), WEIGHT_READING_PARENTS)]
        if unusable:
            found = [(name, m) for name, m in found if name not in unusable]
            warnings.warn(f"target_modules='all-linear' skips {describe(unusable)}: their parent reads the weight "
                          "directly (nn.MultiheadAttention), so an adapter there would never run", stacklevel=2)
        found, skipped = _drop_shared_linears(model, found)
        if skipped:
            where = "; ".join(f"{name} (shared with {describe(h)})" for name, h in skipped.items())
            if not found:
                raise ValueError(f"target_modules='all-linear': every nn.Linear of the model shares its parameters "
                                 f"with other modules ({where}); name them explicitly to adapt them anyway")
            warnings.warn(f"target_modules='all-linear' skips layers whose parameters are shared with other modules, "
                          f"as their adapters could never be merged: {where}. Name them explicitly to adapt them "
                          "anyway", stacklevel=2)
    _check_targets(found, target_modules)
    for name, linear in found:
        # The module's own sizes: a quantized or sharded weight's shape may be packed or local.
        try:
            block_shape(mode, r, mini_r, linear.in_features, linear.out_features)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        why = base_refusal(linear, mode, parent_module(model, name))
        if why is not None:
            raise TypeError(f"{name}: {why}")
    check_dropout(dropout)
    _check_init_weights(init_weights)

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
    shared = record_shared_weights(model)
    warn_shared({name: shared[name] for name, _ in layers if name in shared})
    if freeze_others:
        freeze_all_but_blocks(model)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merges every `MissLinear` into its base weight and puts the plain `nn.Linear` back, in
    place; returns the model. With safe_merge, every merged weight is computed and checked first:
    a non-finite value raises ValueError naming the layer, and nothing is changed.

    A layer whose base weight or bias is shared with another module (tied embeddings, ...) is
    refused with ValueError before anything changes: writing the merged weight would change
    the other module too. The message shows how to untie it first."""
    layers = miss_layers(model)
    if not layers:
        warnings.warn("merge_and_unload: the model has no miss_ext.MissLinear layer; nothing to do", stacklevel=2)
        return model
    # Re-checked here rather than trusted from setup: the user may have tied or untied since.
    shared = record_shared_weights(model)
    blocked = [name for name, layer in layers if name in shared and not layer.merged]
    if blocked:
        raise ValueError("\n".join(shared_weight_message(name, shared[name]) for name in blocked))
    # Bases a merge cannot go into (hooks, subclass forwards, parametrized, sharded or quantized
    # weights: modules.merge_refusal), all checked before any layer changes.
    refused = [f"{name or 'the model'}: {why}" for name, layer in layers
               if not layer.merged and (why := merge_refusal(layer.base_layer)) is not None]
    if refused:
        raise ValueError("merge_and_unload: nothing was merged; these layers cannot be merged:\n" + "\n".join(refused))
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
