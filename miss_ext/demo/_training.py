"""Training and measurement: the adapted variants, their interleaved steps, held-out loss, memory."""
import argparse
import contextlib
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import miss_ext
from miss_ext.adapter_files import CONFIG_NAME

from ._cli import target_modules

# Steps left out of the timing median: the first ones pay for lazy initialisation
# (optimizer state, allocator growth, kernel selection).
WARMUP_STEPS = 2


def apply_miss_ext(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # The base is already frozen, so apply_miss leaves only the miss_block parameters trainable.
    return miss_ext.apply_miss(model, target_modules(args), r=args.r, mode=args.mode, mini_r=args.mini_r,
                               dropout=args.dropout)


def apply_peft(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import MissConfig, get_peft_model

    init = {"default": True, "mini": "mini", "bat": "bat"}[args.mode]
    config = MissConfig(r=args.r, target_modules=target_modules(args), init_weights=init, mini_r=args.mini_r,
                        miss_dropout=args.dropout)
    with warnings.catch_warnings():
        # PEFT reads a property this transformers release deprecates; nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def forget_adapters_of(root: Path, base_path) -> None:
    """Removes every adapter_config.json in `root` or a folder directly in it whose
    base_model_name_or_path names `base_path`, before a new base model replaces that folder: a save
    that then fails or is interrupted leaves no loadable adapter of an earlier run beside the new
    base (save_adapter writes the new config last), which would load onto it without an error.
    Both demos' layouts are covered, whichever wrote into the same --out before: miss_ext.demo
    writes OUT/adapter_config.json, miss_ext.demo.mixed OUT/up/ and OUT/down/, each naming
    OUT/base_model. Configs that cannot be read are left (no loader accepts them either)."""
    target = os.path.realpath(base_path)
    root = Path(root)
    for config in [root / CONFIG_NAME, *sorted(root.glob(f"*/{CONFIG_NAME}"))]:
        try:
            with open(config, encoding="utf-8") as f:
                named = json.load(f).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(named, str) and os.path.realpath(named) == target:
            config.unlink(missing_ok=True)


def save_base_model(model: nn.Module, path: Path) -> None:
    """save_pretrained without transformers' one-shard progress bar in the demo's output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Training and measurement


@dataclass
class RunResult:
    name: str
    losses: List[float] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    tokens_per_step: int = 0
    saved_bytes: Optional[int] = None  # activations saved for backward by one training step
    cuda_peak_bytes: Optional[int] = None  # largest CUDA allocation peak of a step above what was resident before it

    def median_step(self) -> float:
        timed = self.step_seconds[WARMUP_STEPS:] or self.step_seconds
        return statistics.median(timed)

    def recent_tokens_per_second(self, window: int = 20) -> float:
        return self.tokens_per_step / statistics.median(self.step_seconds[-window:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    loss = causal_lm_loss(model, tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()  # synchronises the device, so the step is complete when it returns


def timed_step(result: RunResult, model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               device: torch.device) -> None:
    """One training step, recording its loss, wall time and (CUDA) peak memory above resident."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result.losses.append(train_step(model, optimizer, tokens))
    result.step_seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - resident
        result.cuda_peak_bytes = max(result.cuda_peak_bytes or 0, peak)


def train(models: Dict[str, nn.Module], batches: Sequence[torch.Tensor], lr: float,
          device: torch.device) -> List[RunResult]:
    """One AdamW step per batch for every model, the models' steps interleaved (alternating which
    goes first), so that other work on the machine slows all variants alike."""
    from tqdm import tqdm

    # No weight decay: the MiSS blocks start at zero and decay would only pull them back there.
    optimizers = {name: torch.optim.AdamW(trainable_parameters(m), lr=lr, weight_decay=0.0)
                  for name, m in models.items()}
    results = {name: RunResult(name=name, tokens_per_step=batches[0].numel()) for name in models}
    for model in models.values():
        model.train()
    names = list(models)
    with tqdm(batches, desc="training", unit="step", dynamic_ncols=True, mininterval=0.5) as bar:
        for index, tokens in enumerate(bar):
            tokens = tokens.to(device)
            for name in names if index % 2 == 0 else reversed(names):
                timed_step(results[name], models[name], optimizers[name], tokens, device)
            bar.set_postfix_str(" | ".join(
                f"{r.name} loss {r.losses[-1]:.3f} {r.recent_tokens_per_second() / 1e3:.1f}k tok/s"
                for r in results.values()), refresh=False)
    return list(results.values())


def saved_activation_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward: distinct storages packed by
    saved-tensor hooks, leaving out parameter and buffer storages (resident anyway). This is the
    activation memory a step holds until its backward, measured the same way for every variant
    and on every device (process RSS on a CPU could not tell two variants in one process apart)."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, tokens)
    del loss  # the graph is dropped unused; no gradient is accumulated
    return sum(storages.values())


@dataclass
class HeldoutLoss:
    loss: float  # mean cross-entropy per predicted token, nats
    tokens: int  # predicted tokens (seq_len - 1 per sequence)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 past ~709


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) and no autograd for the block, then the model's own mode back: the
    demo evaluates between training steps and before measuring a training step's activations."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def heldout_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int, device: torch.device) -> HeldoutLoss:
    """Mean next-token cross-entropy over every predicted token of the (n, seq_len) held-out
    sequences, in eval mode (no dropout), batch_size sequences at a time."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in sequences.split(batch_size):
            batch = batch.to(device)
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += causal_lm_loss(model, batch).float().item() * predicted
            count += predicted
    return HeldoutLoss(loss=total / count, tokens=count)


def predictions_depend_on_input(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> bool:
    """Whether the model's logits on the (n, seq_len) tokens vary with the input, in eval mode. A
    run with a far too large learning rate can collapse to logits that are the same at every
    position (measured: --lr 1e6 left them all exactly 0, a finite loss of ln(vocab)), which the
    NaN check alone lets through."""
    with evaluating(model):
        logits = model(tokens.to(device)).logits.float()
    spread = (logits - logits[:1, :1]).abs().amax().item()
    return spread > 1e-6 * max(1.0, logits.abs().amax().item())
