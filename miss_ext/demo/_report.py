"""Reporting: the side-by-side table, held-out losses, the loss plot, where the files went."""
import argparse
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._synthetic import VOCAB, loss_floor
from ._training import WARMUP_STEPS, HeldoutLoss, RunResult

MIB = 2.0 ** 20


def format_table(results: List[RunResult], device: torch.device, dtype: torch.dtype, model_desc: str,
                 args: argparse.Namespace, notes: Sequence[str] = ()) -> str:
    """The side-by-side table of the variants; model_desc names the model ("Llama hidden 128, 4
    layers"), notes are lines added under it (reference losses of the task)."""
    steps = len(results[0].step_seconds)
    timed = max(steps - WARMUP_STEPS, 0) or steps
    threads = f", torch CPU threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"One run on this machine ({name}{threads}, {str(dtype).replace('torch.', '')}): "
        f"{model_desc}, MiSS {args.mode} r={args.r}, "
        f"batch {args.batch_size} x {args.seq_len} tokens; steps of the variants interleaved; "
        f"median over the last {timed} of {steps} steps.",
    ]
    columns = ["variant", "median ms/step", "tokens/s", "saved for backward MiB/step"]
    if device.type == "cuda":
        columns.append("peak CUDA MiB/step above resident")
    columns += ["first loss", "final loss"]
    rows = []
    for r in results:
        row = [r.name, f"{r.median_step() * 1e3:.2f}", f"{r.tokens_per_step / r.median_step():,.0f}",
               f"{r.saved_bytes / MIB:.2f}"]
        if device.type == "cuda":
            row.append(f"{r.cuda_peak_bytes / MIB:.1f}")
        row += [f"{r.losses[0]:.4f}", f"{r.losses[-1]:.4f}"]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def fmt(cells):  # variant names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines += [fmt(columns), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines.append("saved for backward: bytes of the distinct non-parameter tensors autograd keeps for one "
                 "training step's backward (activation memory).")
    if device.type == "cuda":
        lines.append("peak CUDA: the largest torch.cuda.max_memory_allocated of a step, minus what was allocated "
                     "before it (activations, gradients, optimizer work).")
    lines += list(notes)
    if len(results) == 2:
        a, b = results
        diffs = [abs(x - y) for x, y in zip(a.losses, b.losses)]
        lines.append(f"ratios {b.name} / {a.name}: step time x{b.median_step() / a.median_step():.2f}, "
                     f"saved for backward x{b.saved_bytes / max(a.saved_bytes, 1):.2f}")
        lines.append(f"loss |difference|: step 1 {diffs[0]:.2e}, final {diffs[-1]:.2e}, max over steps "
                     f"{max(diffs):.2e}")
    return "\n".join(lines)


def plot_losses(results: List[RunResult], path: Path, title: str,
                references: Sequence[Tuple[float, str, str]] = ()) -> None:
    """Training loss per step of every variant; references are horizontal lines (y, label, linestyle)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--"]
    for result, style in zip(results, styles):
        ax.plot(range(1, len(result.losses) + 1), result.losses, style, label=result.name, linewidth=1.4)
    colors = ["grey", "black", "tab:green", "tab:red"]
    for (y, label, style), color in zip(references, colors):
        ax.axhline(y, color=color, linewidth=0.8, linestyle=style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def synthetic_notes(seq_len: int) -> List[str]:
    return [f"loss of a uniform guess: ln {VOCAB} = {math.log(VOCAB):.3f}; lowest possible on this task: "
            f"{loss_floor(seq_len):.3f}."]


def synthetic_references(seq_len: int) -> List[Tuple[float, str, str]]:
    floor = loss_floor(seq_len)
    return [(math.log(VOCAB), f"ln {VOCAB} (uniform guess)", ":"), (floor, f"lowest possible ({floor:.3f})", "-.")]


def format_heldout(before: HeldoutLoss, after: Dict[str, HeldoutLoss], sequences: int) -> str:
    """One line per measurement; no line starts with a variant's name (the table's rows do)."""
    lines = [f"held-out loss ({sequences} sequences, {before.tokens:,} predicted tokens; eval mode):",
             f"  before training (base model): loss {before.loss:.4f}, perplexity {before.perplexity:,.2f}"]
    for name, result in after.items():
        lines.append(f"  after training ({name}): loss {result.loss:.4f}, perplexity {result.perplexity:,.2f} "
                     f"(change {result.loss - before.loss:+.4f})")
    return "\n".join(lines)


def print_where(out: Path, base_path: Path, model_class: str, dtype: str, peft_refusal: Optional[str] = None) -> None:
    """Where the outputs are and how to load the adapter onto the base it was trained on: in the
    trained dtype (`dtype`, a torch dtype's name, always written: transformers 5's from_pretrained
    takes the checkpoint's dtype by default, so a float32 run on a bf16 --model came back in bf16),
    and with PEFT only where PEFT can load it (peft_refusal: why it cannot, such as an r above some
    layer's in_features or Conv1D layers, which PEFT refuses and --no-peft allowed)."""
    print(f"\nadapter (PEFT format): {out / 'adapter_model.safetensors'} and {out / 'adapter_config.json'}")
    print(f"frozen base model:     {base_path}")
    print(f"loss curve:            {out / 'loss_curve.png'}")
    load = f"{model_class}.from_pretrained({str(base_path)!r}, dtype=torch.{dtype})"
    if peft_refusal:
        print(f"load the adapter (PEFT cannot: {peft_refusal}):")
        print("    import miss_ext, torch")
        print(f"    from transformers import {model_class}")
        print(f"    base = {load}")
        print(f"    model = miss_ext.load_adapter(base, {str(out)!r})")
        return
    print("load the adapter with PEFT:")
    print("    import torch")
    print("    from peft import PeftModel")
    print(f"    from transformers import {model_class}")
    print(f"    base = {load}")
    print(f"    model = PeftModel.from_pretrained(base, {str(out)!r})")
    print(f"or without PEFT: miss_ext.load_adapter(base, {str(out)!r})")
