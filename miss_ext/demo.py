"""End-to-end MiSS demo: fine-tune a small Llama with miss_ext, compare with PEFT, merge, save.

    python -m miss_ext.demo                  # small model, 200 steps, CUDA when present
    python -m miss_ext.demo --help

What it does, with no downloads:
1. builds a small LlamaForCausalLM from a config (random, seeded init) and freezes all of it;
2. fine-tunes only MiSS blocks on q/k/v/o/gate/up/down_proj (`miss_ext.apply_miss`) on a
   synthetic task: every sequence counts modulo the vocabulary size from a random start with a
   random step, so after two tokens the rest is predictable and the loss falls far below ln(V);
3. runs the same steps with PEFT's plain-PyTorch MiSS (same base, init, data and seed) and prints
   a table of step time and memory;
4. checks that the merged model (`miss_ext.merge_and_unload`) gives the unmerged logits, saves the
   adapter in PEFT's format (`miss_ext.save_adapter`) and the frozen base beside it, and plots
   the loss curves. The exit code is 1 when the merge check fails.
"""
import argparse
import contextlib
import copy
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

import miss_ext

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The task's alphabet: tokens are residues modulo VOCAB, so the vocabulary is exactly that size.
VOCAB = 64
# Steps of the counting sequences are drawn from 1..MAX_STRIDE; the model must infer each
# sequence's step from its first two tokens (attention), then continue the count (MLP).
MAX_STRIDE = 7

# Model presets: hidden size, layers, attention heads, MLP width (about 8/3 hidden, a multiple of 64).
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=192),
    "small": dict(hidden=128, layers=4, heads=4, intermediate=384),
    "base": dict(hidden=512, layers=8, heads=8, intermediate=1408),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Steps left out of the timing median: the first ones pay for lazy initialisation
# (optimizer state, allocator growth, kernel selection).
WARMUP_STEPS = 2

# Merge check tolerance. float32: merging only reorders the additions (a few ulps per layer), so
# the logits must agree to MERGE_RTOL_FP32 times the largest logit. bfloat16: the merged weight
# W + dW is rounded to bf16 while the unmerged model adds an fp32 adapter branch to a bf16 GEMM;
# the two roundings differ like two independent bf16 evaluations, whose logits can be several
# bf16 ulps apart after a few layers. So the tolerance is measured: BF16_NOISE_FACTOR times the
# distance between the unmerged model's bf16 and float32 evaluations (its own rounding noise).
# A wrong merge moves the logits by the adapter's whole effect, far beyond that.
MERGE_RTOL_FP32 = 1e-4
BF16_NOISE_FACTOR = 3.0

MIB = 2.0 ** 20


# ----------------------------------------------------------------------------------------------
# Command line


@dataclass
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def projection_shapes(self) -> Dict[str, tuple]:
        """(in_features, out_features) of every adapted projection, by name."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m miss_ext.demo",
        description="Fine-tune a small random-init Llama (built from a config, no downloads) with MiSS "
                    "adapters from miss_ext on a synthetic counting task; compare step time and memory "
                    "with PEFT's MiSS; check merging; save the adapter in PEFT's format and a loss plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--size", choices=sorted(SIZES), default="small",
                       help="preset dimensions: " + "; ".join(
                           f"{k}: hidden {v['hidden']}, {v['layers']} layers, {v['heads']} heads, "
                           f"MLP {v['intermediate']}" for k, v in SIZES.items()))
    model.add_argument("--hidden", type=_positive_int, default=None,
                       help="hidden size, overriding the preset (the MLP width becomes ~8/3 of it, a multiple of 64)")
    model.add_argument("--layers", type=_positive_int, default=None, help="number of layers, overriding the preset")
    model.add_argument("--heads", type=_positive_int, default=None,
                       help="attention heads, overriding the preset (must divide the hidden size; "
                            "key/value heads are half of them when even)")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="dtype of the frozen base model; MiSS blocks stay float32 (as in PEFT)")

    miss = parser.add_argument_group("MiSS adapter")
    miss.add_argument("--mode", choices=["default", "mini", "bat"], default="default",
                      help="MiSS variant: default (block r x out), mini (block r x mini_r, tiled), "
                           "bat (block out/r x r x r; r must divide every projection size)")
    miss.add_argument("--r", type=_positive_int, default=8,
                      help="MiSS shard size (rank); at most the hidden size")
    miss.add_argument("--mini-r", type=_positive_int, default=16,
                      help="mini mode's block width; must divide every projection's output size (mini mode only)")
    miss.add_argument("--dropout", type=float, default=0.0,
                      help="MiSS dropout; above 0 the two variants draw different masks and their losses drift apart")

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps per variant")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step")
    train.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence (at least 3)")
    train.add_argument("--lr", type=_positive_float, default=1e-2, help="AdamW learning rate")
    train.add_argument("--seed", type=int, default=0, help="seed of the base model's init, the data and torch")
    train.add_argument("--device", default="auto",
                       help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    train.add_argument("--threads", type=_nonnegative_int, default=1,
                       help="torch CPU threads; 0 = torch's choice (one per core). One by default: on a "
                            "machine shared with other busy processes, several OpenMP threads spend most of "
                            "these small steps waiting for each other (steps measured up to 100x slower), "
                            "while one thread loses little when the machine is quiet")
    train.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison run")
    train.add_argument("--out", type=Path, default=Path("miss_demo_out"),
                       help="output directory: adapter (PEFT format), base model, loss plot")
    return parser


def model_dims(args: argparse.Namespace) -> ModelDims:
    preset = SIZES[args.size]
    hidden = args.hidden or preset["hidden"]
    heads = args.heads or preset["heads"]
    if args.hidden is None:
        intermediate = preset["intermediate"]
    else:
        intermediate = 64 * math.ceil(8 * hidden / 3 / 64)
    return ModelDims(hidden=hidden, layers=args.layers or preset["layers"], heads=heads,
                     kv_heads=heads // 2 if heads % 2 == 0 else heads, intermediate=intermediate)


def cuda_kernels_built() -> bool:
    return "CUDA" in miss_ext.build_info()["backends"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        # A CPU-only build of the op library cannot run on a GPU, even where torch sees one.
        return torch.device("cuda" if torch.cuda.is_available() and cuda_kernels_built() else "cpu")
    return torch.device(name)


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject settings that cannot run, naming the offending value (parser.error exits with 2)."""
    dims = model_dims(args)
    if dims.hidden % dims.heads != 0:
        parser.error(f"--heads {dims.heads} must divide the hidden size {dims.hidden}")
    if args.seq_len < 3:
        parser.error(f"--seq-len must be at least 3 (two tokens to infer the step, one to predict), got {args.seq_len}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    shapes = dims.projection_shapes()
    smallest_in = min(i for i, _ in shapes.values())
    if args.r > smallest_in:
        parser.error(f"--r {args.r} is larger than the smallest projection input ({smallest_in}); "
                     "PEFT rejects that and the extra block rows would never train")
    if args.mode == "bat":
        for name, (fan_in, fan_out) in shapes.items():
            for what, size in (("in", fan_in), ("out", fan_out)):
                if size % args.r != 0:
                    parser.error(f"--mode bat needs --r to divide every projection size, but --r {args.r} does "
                                 f"not divide {name}'s {what}_features {size}")
    if args.mode == "mini":
        for name, (_, fan_out) in shapes.items():
            if fan_out % args.mini_r != 0:
                parser.error(f"--mini-r {args.mini_r} must divide every projection's out_features, but not "
                             f"{name}'s {fan_out}")
    try:
        device = resolve_device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for CUDA, but torch sees no CUDA device")
    if device.type == "cuda" and not cuda_kernels_built():
        parser.error(f"--device {args.device}: this miss_ext build has no CUDA kernels (see python -m miss_ext.info); "
                     "rebuild with MISS_EXT_CUDA=1 or use --device cpu")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    return args


# ----------------------------------------------------------------------------------------------
# Model and data


def build_base_model(dims: ModelDims, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
                     device="cpu") -> nn.Module:
    """A random-init LlamaForCausalLM, identical for identical arguments, fully frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        max_position_embeddings=seq_len, tie_word_embeddings=False,
        # Fan-in scaled init instead of HF's 0.02: the output head is frozen and sits behind an
        # RMSNorm, so its row norms cap the logits; with std 0.02 they stay below ~1 and no
        # adapter could make a confident prediction.
        initializer_range=dims.hidden ** -0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def make_batches(count: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """(count, batch, seq) token ids: x[t] = (start + stride * t) mod VOCAB per sequence, with a
    random start and a random stride in 1..MAX_STRIDE. Built on the CPU from its own generator,
    so every variant and device sees the same tokens."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, batch_size, 1), generator=gen)
    stride = torch.randint(1, MAX_STRIDE + 1, (count, batch_size, 1), generator=gen)
    return (start + stride * torch.arange(seq_len)) % VOCAB


def loss_floor(seq_len: int) -> float:
    """The lowest mean loss possible on make_batches data: the second token is one of MAX_STRIDE
    equally likely values, every later one is determined (the first is never predicted)."""
    return math.log(MAX_STRIDE) / (seq_len - 1)


def apply_miss_ext(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    # The base is already frozen, so apply_miss leaves only the miss_block parameters trainable.
    return miss_ext.apply_miss(model, TARGET_MODULES, r=args.r, mode=args.mode, mini_r=args.mini_r,
                               dropout=args.dropout)


def apply_peft(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import MissConfig, get_peft_model

    init = {"default": True, "mini": "mini", "bat": "bat"}[args.mode]
    config = MissConfig(r=args.r, target_modules=list(TARGET_MODULES), init_weights=init, mini_r=args.mini_r,
                        miss_dropout=args.dropout)
    with warnings.catch_warnings():
        # PEFT reads a property this transformers release deprecates; nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


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


def train(models: Dict[str, nn.Module], batches: torch.Tensor, lr: float, device: torch.device) -> List[RunResult]:
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


# ----------------------------------------------------------------------------------------------
# Reporting


def format_table(results: List[RunResult], device: torch.device, dtype: torch.dtype, dims: ModelDims,
                 args: argparse.Namespace) -> str:
    steps = len(results[0].step_seconds)
    timed = max(steps - WARMUP_STEPS, 0) or steps
    threads = f", torch CPU threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"One run on this machine ({name}{threads}, {str(dtype).replace('torch.', '')}): "
        f"Llama hidden {dims.hidden}, {dims.layers} layers, MiSS {args.mode} r={args.r}, "
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
    lines.append(f"loss of a uniform guess: ln {VOCAB} = {math.log(VOCAB):.3f}; lowest possible on this task: "
                 f"{loss_floor(args.seq_len):.3f}.")
    if len(results) == 2:
        a, b = results
        diffs = [abs(x - y) for x, y in zip(a.losses, b.losses)]
        lines.append(f"ratios {b.name} / {a.name}: step time x{b.median_step() / a.median_step():.2f}, "
                     f"saved for backward x{b.saved_bytes / max(a.saved_bytes, 1):.2f}")
        lines.append(f"loss |difference|: step 1 {diffs[0]:.2e}, final {diffs[-1]:.2e}, max over steps "
                     f"{max(diffs):.2e}")
    return "\n".join(lines)


def plot_losses(results: List[RunResult], path: Path, title: str, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--"]
    for result, style in zip(results, styles):
        ax.plot(range(1, len(result.losses) + 1), result.losses, style, label=result.name, linewidth=1.4)
    ax.axhline(math.log(VOCAB), color="grey", linewidth=0.8, linestyle=":", label=f"ln {VOCAB} (uniform guess)")
    ax.axhline(floor, color="black", linewidth=0.8, linestyle="-.", label=f"lowest possible ({floor:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Merge check


@dataclass
class MergeCheck:
    max_abs_diff: float
    tolerance: float
    rule: str  # how the tolerance was set, for the printout

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def merge_tolerance(model: nn.Module, tokens: torch.Tensor, unmerged: torch.Tensor, dtype: torch.dtype):
    """(tolerance, rule) for comparing merged with unmerged logits; see MERGE_RTOL_FP32."""
    scale = max(1.0, unmerged.abs().max().item())
    if dtype == torch.float32:
        return MERGE_RTOL_FP32 * scale, f"{MERGE_RTOL_FP32:g} x max|logit|"
    reference = logits_of(copy.deepcopy(model).float(), tokens)
    noise = (unmerged - reference).abs().max().item()
    return (BF16_NOISE_FACTOR * noise + MERGE_RTOL_FP32 * scale,
            f"{BF16_NOISE_FACTOR:g} x the unmerged model's own {str(dtype).replace('torch.', '')} rounding "
            f"noise {noise:.2e}")


def check_merge(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype):
    """Merges in place; returns (MergeCheck, the merged plain model, the unmerged logits)."""
    unmerged = logits_of(model, tokens)
    tolerance, rule = merge_tolerance(model, tokens, unmerged, dtype)
    merged_model = miss_ext.merge_and_unload(model)
    leftovers = [n for n, m in merged_model.named_modules() if isinstance(m, miss_ext.MissLinear)]
    if leftovers:
        raise RuntimeError(f"merge_and_unload left MissLinear layers behind: {leftovers[:3]}")
    merged = logits_of(merged_model, tokens)
    check = MergeCheck(max_abs_diff=(merged - unmerged).abs().max().item(), tolerance=tolerance, rule=rule)
    return check, merged_model, unmerged


# ----------------------------------------------------------------------------------------------
# Driver


@dataclass
class DemoResult:
    runs: List[RunResult]
    merge: MergeCheck
    heldout: torch.Tensor  # CPU token ids of the held-out batch
    unmerged_logits: torch.Tensor  # the trained miss_ext model's logits on it, before merging
    merged_model: nn.Module
    table: str
    out: Path


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def torch_threads(count: Optional[int]):
    """torch.set_num_threads(count) for the block (count 0: leave torch's choice), then back: the
    demo may run inside a larger program (the tests)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(args: argparse.Namespace) -> DemoResult:
    with torch_threads(args.threads):
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> DemoResult:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    dims = model_dims(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    base = build_base_model(dims, args.seq_len, args.seed, dtype, device)
    # The base is random, so nobody can download it: save it so the adapter can be loaded later.
    save_base_model(base, out / "base_model")
    # The held-out batch uses a seed the training batches never use.
    batches = make_batches(args.steps, args.batch_size, args.seq_len, seed=args.seed + 1)
    heldout = make_batches(1, args.batch_size, args.seq_len, seed=args.seed + 2)[0]

    variants = [("miss_ext", apply_miss_ext)]
    if not args.no_peft:
        if peft_available():
            variants.append(("peft", apply_peft))
        else:
            print("peft is not importable: skipping the PEFT comparison (pip install peft)")
    models = {}
    for name, apply in variants:
        models[name] = apply(copy.deepcopy(base), args)
    del base
    counts = {name: sum(p.numel() for p in trainable_parameters(m)) for name, m in models.items()}
    print("trainable parameters (MiSS blocks only): " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the variants train different numbers of parameters: {counts}")

    torch.manual_seed(args.seed)  # reproducible dropout masks
    runs = train(models, batches, args.lr, device)
    for run in runs:
        run.saved_bytes = saved_activation_bytes(models[run.name], batches[0].to(device))
    table = format_table(runs, device, dtype, dims, args)
    print()
    print(table)

    miss_model = models.pop("miss_ext")
    models.clear()  # frees the PEFT model before merging
    # task_type makes PEFT build a PeftModelForCausalLM; the base path lets it find the base.
    miss_ext.save_adapter(miss_model, out, task_type="CAUSAL_LM", base_model_name_or_path=str(out / "base_model"))
    heldout_device = heldout.to(device)
    merge, merged_model, unmerged_logits = check_merge(miss_model, heldout_device, dtype)
    print(f"\nmerge check on a held-out batch: max |merged - unmerged logits| = {merge.max_abs_diff:.3e} "
          f"(tolerance {merge.tolerance:.1e}: {merge.rule}) {'PASS' if merge.passed else 'FAIL'}")

    title = (f"MiSS {args.mode} r={args.r} on a random frozen Llama (hidden {dims.hidden}, {dims.layers} layers), "
             f"{device.type}, {args.dtype}")
    plot_losses(runs, out / "loss_curve.png", title, loss_floor(args.seq_len))
    return DemoResult(runs=runs, merge=merge, heldout=heldout, unmerged_logits=unmerged_logits.cpu(),
                      merged_model=merged_model, table=table, out=out)


def print_where(out: Path) -> None:
    print(f"\nadapter (PEFT format): {out / 'adapter_model.safetensors'} and {out / 'adapter_config.json'}")
    print(f"frozen base model:     {out / 'base_model'}")
    print(f"loss curve:            {out / 'loss_curve.png'}")
    print("load the adapter with PEFT:")
    print("    from peft import PeftModel")
    print("    from transformers import LlamaForCausalLM")
    print(f"    base = LlamaForCausalLM.from_pretrained({str(out / 'base_model')!r})")
    print(f"    model = PeftModel.from_pretrained(base, {str(out)!r})")
    print(f"or without PEFT: miss_ext.load_adapter(base, {str(out)!r})")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = run_demo(args)
    print_where(result.out)
    return 0 if result.merge.passed else 1


if __name__ == "__main__":
    sys.exit(main())
