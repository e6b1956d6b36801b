"""Exact export of default/mini MiSS adapters as a PEFT LoRA adapter (for LoRA-only serving stacks).

MiSS default/mini is a rank-r LoRA with scaling 1: fold(x) = x Aᵀ with the 0/1 matrix
A[j, i] = (i mod r == j) (r x in), and fold(x) · D_full = x Aᵀ Bᵀ with B = D_fullᵀ (out x r),
D_full[j, o] = miss_block[j, o mod mini_r]. Every entry of B·A is a single block entry (one
non-zero term per sum), so the LoRA delta weight equals MiSS's bit for bit. Dropout on the adapter
input is LoRA's lora_dropout. Bat has no such form: its update W_ij B_i + B_i depends on the
frozen weight and has rank up to min(in, out), not r, so no rank-r LoRA reproduces it.
"""
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .adapter_files import (KEY_PREFIX, base_model_name, block_sources, check_task_type, full_block,
                            warn_unsaved_trainables, write_adapter)
from .model import (holds_transformers_adapters, is_ddp, miss_layers, refuse_aliased_layers, trainable_extras,
                    unwrap_model, writes_here)
from ._distributed import is_dtensor, reshard_fsdp
from .base_layers import is_conv1d
from .modules import MissLinear, refuse_meta
from .targets import describe, exact_paths_regex

# The public names (README); the other functions here are the package's internals, used across its modules.
__all__ = ["export_lora"]


def lora_factors(block: Tensor, in_features: int, out_features: int):
    """(A (r, in), B (out, r)) in the block's dtype with B @ A == the delta weight of a default
    (r, out) or mini (r, mini_r) block. ValueError for a block that is not 2-D (bat) or whose
    width does not divide out_features (B would silently have another height)."""
    if block.dim() != 2 or block.shape[1] < 1 or out_features % block.shape[1] != 0:
        raise ValueError(f"lora_factors: a default (r, out_features={out_features}) or mini (r, mini_r dividing "
                         f"out_features) block is needed, got shape {tuple(block.shape)}")
    block = block.detach()
    r = block.shape[0]
    cols = torch.arange(in_features, device=block.device)
    a = (cols.unsqueeze(0) % r == torch.arange(r, device=block.device).unsqueeze(1)).to(block.dtype)
    b = block.repeat(1, out_features // block.shape[1]).t().contiguous()
    return a, b


class _Adapter(NamedTuple):
    """One layer's adapter, wherever it lives (miss_ext.MissLinear or a PEFT MissLinear)."""
    path: str  # module path in the base model
    block: Tensor
    in_features: int
    out_features: int
    dropout: float
    merged: bool


def _peft_root(model: nn.Module):
    """The base model inside a PeftModel / MissModel (LoRA keys are relative to it), the model
    itself when transformers' PeftAdapterMixin put PEFT's adapters into it (model.add_adapter /
    load_adapter: it holds their peft_config, and its keys are the LoRA keys; before, its export
    was refused saying it held no PEFT MissLinear: a review, 2026-12-07), else None."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return None
    if isinstance(model, PeftModel):
        return model.base_model.model
    if isinstance(model, BaseTuner):
        return model.model
    if holds_transformers_adapters(model):
        return model
    return None


def _adapters(model: nn.Module, adapter_name: str) -> List[_Adapter]:
    root = _peft_root(model)
    if root is None:
        return [_Adapter(name, layer.miss_block, layer.in_features, layer.out_features,
                         layer.dropout, layer.merged) for name, layer in miss_layers(model)]
    try:
        from peft.tuners.miss import MissLinear as PeftMissLinear
    except ImportError as exc:  # PEFT before 0.17 has Bone only (its layers hold bone_block)
        if getattr(exc, "name", None) not in ("peft.tuners.miss", "peft.tuners"):
            raise  # a failure inside PEFT's MiSS module, not its absence
        import peft

        raise ImportError(f"export_lora of a PEFT model needs a PEFT with MiSS (0.17 or newer), found peft "
                          f"{getattr(peft, '__version__', '?')}: pip install 'peft>=0.21,<0.23', or save the adapter "
                          "with save_pretrained and convert the folder: miss_ext.load_adapter(base, folder), then "
                          "export_lora of that model") from exc

    found = []
    for name, layer in root.named_modules():
        if isinstance(layer, PeftMissLinear) and adapter_name in layer.miss_block:
            drop = layer.miss_dropout[adapter_name]
            found.append(_Adapter(name, layer.miss_block[adapter_name], layer.in_features, layer.out_features,
                                  float(getattr(drop, "p", 0.0)), adapter_name in layer.merged_adapters))
    return found


def _check_extras(model: nn.Module, adapter_name: str) -> None:
    """An adapter may carry more than blocks (modules_to_save copies, trained biases): on a PEFT
    model its config says so, on a model adapted by miss_ext.apply_miss the settings it recorded
    (model.trainable_extras). A LoRA file of the blocks alone would not be equivalent, so such
    adapters are refused."""
    if _peft_root(model) is not None:
        config = getattr(model, "peft_config", {}).get(adapter_name)
        if config is None:
            return
        modules, bias = getattr(config, "modules_to_save", None), getattr(config, "bias", "none")
    else:
        recorded = trainable_extras(model)
        modules, bias = recorded["modules_to_save"], recorded["bias"]
    extras = []
    if modules:
        extras.append(f"modules_to_save={list(modules)}")
    if bias != "none":
        extras.append(f"bias={bias!r}")
    if extras:
        raise ValueError(f"adapter {adapter_name!r} also trains {', '.join(extras)}; a LoRA export of its MiSS "
                         "blocks alone would not be equivalent, so nothing was written")


def export_lora(model: nn.Module, path: str, task_type: Optional[str] = None, adapter_name: str = "default") -> None:
    """Writes the model's default/mini MiSS adapters as an exactly equivalent PEFT LoRA adapter
    (rank r, lora_alpha = r so the scaling is 1) into the directory `path`. The model holds
    miss_ext.MissLinear layers, or is a PEFT model (PeftModel or MissModel, accelerated or not),
    whose adapter `adapter_name` is exported (a model of MissLinear layers has one adapter:
    another adapter_name than "default" is a ValueError there). task_type (e.g. "CAUSAL_LM") is written into the
    LoRA config, as save_adapter writes it (ValueError for a value that is not one of PEFT's
    TaskType names). Raises ValueError, writing nothing, for a model
    without MiSS layers (or without adapter `adapter_name`), bat adapters, merged layers, layers
    of different r or dropout (one LoRA config holds one r and one dropout), and adapters that
    also train modules_to_save or biases (PEFT's config, or apply_miss's modules_to_save= /
    bias=), which blocks alone do not reproduce, and non-finite blocks (NaN or inf), which B @ A
    cannot reproduce, and layers on transformers' Conv1D (PEFT's LoRA needs fan_in_fan_out for
    them). A UserWarning names the parameters of a miss_ext model that require grad outside the
    blocks (apply_miss(freeze_others=False)), which the file does not hold, as save_adapter's. A
    DistributedDataParallel / DataParallel wrapper is looked through; under DDP rank 0 of its
    group writes.
    Sharded blocks (FSDP2 `fully_shard`, tensor parallelism) are gathered as by save_adapter:
    every rank must call export_lora, and the first rank holding the model writes the whole
    adapter (as save_adapter)."""
    outer = model
    ddp, model = is_ddp(model), unwrap_model(model, "export_lora")
    check_task_type(task_type, "export_lora")
    if not isinstance(adapter_name, str):
        raise TypeError(f"export_lora: adapter_name must be the name of one adapter (str), got {adapter_name!r}")
    if _peft_root(model) is None and adapter_name != "default":
        # A model of miss_ext.MissLinear layers holds one unnamed adapter: the name was ignored and
        # the blocks exported anyway (a review, 2026-12-05).
        raise ValueError(f"export_lora: adapter_name={adapter_name!r} names an adapter of a PEFT model; this model's "
                         "miss_ext.MissLinear layers hold one adapter, exported without a name (leave adapter_name "
                         "out)")
    # The float32 master blocks, not the gathered bf16 copies a forward may have left.
    fsdp = reshard_fsdp(model)
    adapters = _adapters(model, adapter_name)
    if not adapters:
        raise ValueError(f"export_lora: the model has no MiSS layer (miss_ext.MissLinear, or a PEFT MissLinear "
                         f"with adapter {adapter_name!r})")
    _check_extras(model, adapter_name)
    root = _peft_root(model)
    scope = model if root is None else root
    refuse_aliased_layers(scope, [(n, m) for n, m in scope.named_modules() if hasattr(m, "miss_block")], "export_lora")
    refuse_meta("export_lora", [(a.path, a.block) for a in adapters])
    conv1d = [name for name, m in scope.named_modules() if isinstance(m, MissLinear) and is_conv1d(m.base_layer)]
    if conv1d:
        # PEFT's LoRA takes Conv1D only with fan_in_fan_out=True for every target (a mixed model
        # cannot say both); not written rather than half right.
        raise ValueError(f"export_lora: {describe(conv1d)} adapt transformers' Conv1D layers, whose LoRA export is not "
                         "supported (PEFT's LoRA needs fan_in_fan_out=True for them); nothing was written")
    bat = [a.path for a in adapters if a.block.dim() == 3]
    if bat:
        raise ValueError(
            f"bat-mode layers cannot be exported as LoRA exactly: {describe(bat)}. Bat's update W_ij B_i + B_i "
            "depends on the frozen weight and has rank up to min(in, out), not r. Merge them into the weights "
            "(miss_ext.merge_and_unload) to serve them instead.")
    merged = [a.path for a in adapters if a.merged]
    if merged:
        raise ValueError(f"these layers are merged, so a LoRA on their weight would apply the adapter twice; "
                         f"unmerge first: {describe(merged)}")
    settings = {(a.block.shape[0], a.dropout) for a in adapters}
    if len(settings) > 1:
        raise ValueError(f"one LoRA config has one r and one dropout; the model's layers have (r, dropout) in "
                         f"{sorted(settings)}")
    r, dropout = settings.pop()
    tensors: Dict[str, Tensor] = {}
    sharded = bool(fsdp) or any(is_dtensor(a.block) for a in adapters)
    broken = []
    for adapter in adapters:  # every rank gathers, in model order
        block = full_block(adapter.block)
        if not bool(block.isfinite().all()):
            broken.append(adapter.path)
        a, b = lora_factors(block, adapter.in_features, adapter.out_features)
        tensors[f"{KEY_PREFIX}{adapter.path}.lora_A.weight"] = a  # on the CPU: full_block's copy
        tensors[f"{KEY_PREFIX}{adapter.path}.lora_B.weight"] = b
    if broken:  # every rank holds the same gathered blocks, so every rank raises
        # B @ A cannot equal a non-finite delta: each sum multiplies the block's inf by A's zeros
        # too, and inf * 0 = NaN spreads along B's row (a review, 2026-12-05: 2 non-finite entries
        # in MiSS's delta, 8 in the LoRA's). save_adapter writes such blocks with a warning, since
        # its file holds them as they are.
        verb = "holds" if len(broken) == 1 else "hold"
        raise ValueError(f"export_lora: {describe(broken)} {verb} non-finite values (NaN or inf), which a LoRA "
                         "cannot reproduce (B @ A multiplies them by A's zeros: inf * 0 is NaN); nothing was written")
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": dropout,
        "target_modules": exact_paths_regex([a.path for a in adapters]),
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": task_type,
        "base_model_name_or_path": base_model_name(_peft_root(model) or model),
        "inference_mode": True,
    }
    if not writes_here(ddp or sharded, outer):  # every rank holds the same (gathered) blocks
        return
    if root is None:
        # As save_adapter (on the writing rank): a parameter trained beside the blocks
        # (apply_miss(freeze_others=False)) is not in the file, and was dropped without a word (a
        # review, 2026-12-05: the reloaded LoRA model 0.24 off). (A PEFT model's other adapters
        # stay trainable there: PEFT's business.)
        warn_unsaved_trainables(model, [p for _, layer in miss_layers(model) for p in block_sources(layer)],
                                "export_lora")
    write_adapter(path, tensors, config)
