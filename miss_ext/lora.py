"""Exact export of default/mini MiSS adapters as a PEFT LoRA adapter (for LoRA-only serving stacks).

MiSS default/mini is a rank-r LoRA with scaling 1: fold(x) = x Aᵀ with the 0/1 matrix
A[j, i] = (i mod r == j) (r x in), and fold(x) · D_full = x Aᵀ Bᵀ with B = D_fullᵀ (out x r),
D_full[j, o] = miss_block[j, o mod mini_r]. Every entry of B·A is a single block entry (one
non-zero term per sum), so the LoRA delta weight equals MiSS's bit for bit. Dropout on the adapter
input is LoRA's lora_dropout. Bat has no such form: its update W_ij B_i + B_i depends on the
frozen weight and has rank up to min(in, out), not r, so no rank-r LoRA reproduces it.
"""
from typing import Dict

import torch
from torch import Tensor, nn

from .adapter_files import KEY_PREFIX, base_model_name, write_adapter
from .model import miss_layers
from .modules import MissLinear
from .targets import describe


def lora_factors(layer: MissLinear):
    """(A (r, in), B (out, r)) in the block's dtype with B @ A == the layer's delta weight."""
    block = layer.miss_block.detach()
    r, in_features, out_features = layer.r, layer.in_features, layer.out_features
    cols = torch.arange(in_features, device=block.device)
    a = (cols.unsqueeze(0) % r == torch.arange(r, device=block.device).unsqueeze(1)).to(block.dtype)
    b = block.repeat(1, out_features // block.shape[1]).t().contiguous()
    return a, b


def export_lora(model: nn.Module, path: str, task_type=None) -> None:
    """Writes the model's default/mini MissLinear adapters as an exactly equivalent PEFT LoRA
    adapter (rank r, lora_alpha = r so the scaling is 1) into the directory `path`. Raises
    ValueError, writing nothing, for bat layers, merged layers, or layers of different r or
    dropout (one LoRA config holds one r and one dropout)."""
    layers = miss_layers(model)
    if not layers:
        raise ValueError("export_lora: the model has no miss_ext.MissLinear layer")
    bat = [name for name, layer in layers if layer.mode == "bat"]
    if bat:
        raise ValueError(
            f"bat-mode layers cannot be exported as LoRA exactly: {describe(bat)}. Bat's update W_ij B_i + B_i "
            "depends on the frozen weight and has rank up to min(in, out), not r. Merge them into the weights "
            "(miss_ext.merge_and_unload) to serve them instead.")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"these layers are merged, so a LoRA on their weight would apply the adapter twice; "
                         f"unmerge first: {describe(merged)}")
    settings = {(layer.r, layer.dropout) for _, layer in layers}
    if len(settings) > 1:
        raise ValueError(f"one LoRA config has one r and one dropout; the model's layers have (r, dropout) in "
                         f"{sorted(settings)}")
    r, dropout = settings.pop()
    tensors: Dict[str, Tensor] = {}
    for name, layer in layers:
        a, b = lora_factors(layer)
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.cpu()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.cpu()
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": dropout,
        "target_modules": [name for name, _ in layers],
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": task_type,
        "base_model_name_or_path": base_model_name(model),
        "inference_mode": True,
    }
    write_adapter(path, tensors, config)
