"""Tiny transformers models built from configs (no downloads), and PEFT MiSS models on them.

Dimensions are chosen so that every mode fits every projection: r = 4 divides all in/out
features (bat) and MINI_R = 4 divides all outputs (mini). Llama has bias-free projections,
Qwen2 has biased q/k/v, so both bias paths are exercised.
"""
import copy
import json
import os
from typing import Optional

import torch

R = 4
MINI_R = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_INIT = {"default": False, "mini": "mini", "bat": "bat"}  # PEFT's init_weights per mode
ARCHS = ["llama", "qwen2"]


def cross_device_tol(want: torch.Tensor, device, tol: dict) -> dict:
    """assert_close tolerances for a float64 tiny model's output or gradient computed on `device`
    against `want` from the CPU: `tol` on the CPU itself; on another device rtol 1e-5 and atol
    1e-5 max|want|. Why: transformers' Llama runs RMSNorm (mean, rsqrt) and RoPE (cos, sin) in
    float32 even in a float64 model, and CUDA's float32 rsqrt/cos/sin and reduction orders differ
    from the CPU's in the last bit: one ulp more in every float32 rsqrt moved the loss by 2e-7
    and the gradients by 7e-7 of the largest one (measured on the CPU). A kernel error moves them
    by O(1)."""
    if torch.device(device).type == "cpu":
        return tol
    return dict(rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def tiny_causal_lm(arch: str, dtype=torch.float64, seed: int = 0):
    """A randomly initialised 2-layer causal LM (vocab 64, hidden 32, 4 heads, 2 kv heads)."""
    import transformers

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        config = transformers.LlamaConfig(**sizes)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**sizes)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def randomize_blocks(model, scale: float = 0.05, seed: int = 1) -> None:
    """Non-zero adapter blocks, so every adapter path changes the output. Small enough that bat's
    I + B_i stays well conditioned (unmerge must invert it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)


def peft_model(base, mode: str, adapter_name: str = "default", dropout: float = 0.0, seed: int = 1):
    """get_peft_model on a deep copy of `base` with random blocks."""
    from peft import MissConfig, get_peft_model

    config = MissConfig(r=R, mini_r=MINI_R, target_modules=TARGETS, init_weights=PEFT_INIT[mode],
                        miss_dropout=dropout)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
    randomize_blocks(model, seed=seed)
    return model


def mixed_peft_models(base, configs: dict, dropouts: Optional[dict] = None, seed: int = 0, scale: float = 0.1):
    """(PEFT model on a deep copy of `base` holding every adapter of `configs` {name: MissConfig
    keywords}, its blocks set by randomize_blocks(seed, scale) and the copies of modules the
    configs save whole moved by random values, accelerated by miss_ext.peft, eval; {name: a
    single-adapter PEFT model holding the same values, eval; "__base__": `base`}): the references
    of PEFT's adapter_names= tests. `dropouts` {name: miss_dropout} for the mixed model only."""
    from peft import MissConfig, get_peft_model

    import miss_ext.peft

    model = None
    for name, config in configs.items():
        config = MissConfig(**config, miss_dropout=(dropouts or {}).get(name, 0.0))
        if model is None:
            model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize_blocks(model, scale=scale, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".modules_to_save." in key:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    singles = {"__base__": base}
    for name, config in configs.items():
        def own(key):
            return key.endswith(f"miss_block.{name}") or f".modules_to_save.{name}." in key

        single = get_peft_model(copy.deepcopy(base), MissConfig(**config), adapter_name=name)
        result = single.load_state_dict({k: v for k, v in model.state_dict().items() if own(k)}, strict=False)
        assert not result.unexpected_keys and not [k for k in result.missing_keys if own(k)]
        singles[name] = single.eval()
    miss_ext.peft.accelerate(model)
    return model.eval(), singles


def tiny_fsmt():
    """A float64 FSMT translation model (fairseq's: its layers see (sequence, batch, features),
    the sequence-first layout), in eval, no dropout; seeded."""
    import transformers

    config = transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    return transformers.FSMTForConditionalGeneration(config).double().eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def no_eos(model):
    """Generation never stops at a random model's EOS, so sequences compare token for token."""
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


def write_bone_copy(miss_dir, bone_dir, scale: float = 1.0) -> None:
    """A PEFT MiSS folder rewritten in PEFT's old Bone format (peft_type BONE, `.bone_block` keys,
    no mini_r / miss_dropout), its blocks times `scale`."""
    from safetensors.torch import load_file, save_file

    config = json.loads((miss_dir / "adapter_config.json").read_text())
    bone = {k: v for k, v in config.items() if k not in ("mini_r", "miss_dropout")}
    bone["peft_type"] = "BONE"
    os.makedirs(bone_dir)
    (bone_dir / "adapter_config.json").write_text(json.dumps(bone))
    tensors = load_file(miss_dir / "adapter_model.safetensors")
    save_file({k.replace(".miss_block", ".bone_block"): v * scale for k, v in tensors.items()},
              bone_dir / "adapter_model.safetensors")


def tiny_moe_lm(arch: str, dtype=torch.float32, seed: int = 0):
    """A randomly initialised 2-layer MoE causal LM (4 experts, 2 per token; float32, as the
    experts' grouped matmul takes no float64 on the CPU). In transformers 5
    the routed experts are fused 3-D parameters (`mlp.experts.gate_up_proj`,
    `mlp.experts.down_proj`), not nn.Linear modules; Qwen2-MoE also has a shared expert of
    nn.Linear layers named gate_proj / up_proj / down_proj."""
    import transformers

    sizes = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**sizes, intermediate_size=48, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24, num_experts=4, decoder_sparse_step=1)
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "mixtral":
        config = transformers.MixtralConfig(**sizes, intermediate_size=48, num_local_experts=4)
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return cls(config).to(dtype).eval()


# A small float64 MLP for tests of the model API on plain modules (a coverage audit, 2026-12-05).
TOL64 = dict(rtol=1e-12, atol=1e-12)


def nonzero(*shape, dtype=torch.float64):
    """Random values of magnitude in [0.25, 1.5), random signs: never zero."""
    mag = torch.empty(shape, dtype=torch.float64).uniform_(0.25, 1.5)
    return (mag * (torch.randint(0, 2, shape) * 2 - 1)).to(dtype)


def randomize_adapters(model, scale=0.3):
    """Every miss_block and bank of `model` set to nonzero values times `scale`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name or name.endswith(".bank"):
                p.copy_(nonzero(*p.shape, dtype=p.dtype) * scale)


class SmallNet(torch.nn.Module):
    """Linear(10, 20) -> tanh -> Linear(20, 8) -> tanh -> Linear(8, 6)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.lin3 = torch.nn.Linear(10, 20), torch.nn.Linear(20, 8), torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.lin3(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))


def small_net():
    return SmallNet().to(torch.float64)


def saved_small_adapter(path, r=2, targets=("lin1", "lin2"), **kwargs):
    """An adapter folder written by miss_ext.save_adapter from a model with random blocks; returns
    that model (its adapted layers hold the file's blocks)."""
    import miss_ext

    model = small_net()
    miss_ext.apply_miss(model, list(targets), r=r, init_weights=False, **kwargs)
    randomize_adapters(model)
    miss_ext.save_adapter(model, str(path))
    return model


def rewrite_adapter_weights(path, change):
    """Applies change(tensors) to the adapter file in folder `path` (a dict of its tensors)."""
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))
