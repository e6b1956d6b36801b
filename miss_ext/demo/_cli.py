"""The demo's command line: flags, their checks, the model dimensions and the device."""
import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

import miss_ext
from miss_ext.targets import ALL_LINEAR, TargetModules, matches

# The projections the random Llama adapts by default (every linear layer of a decoder layer).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Model presets: hidden size, layers, attention heads, MLP width (about 8/3 hidden, a multiple of 64).
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=192),
    "small": dict(hidden=128, layers=4, heads=4, intermediate=384),
    "base": dict(hidden=512, layers=8, heads=8, intermediate=1408),
}
DEFAULT_SIZE = "small"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Share of the packed sequences of --data held out for evaluation (the last ones; at least one).
HELDOUT_FRACTION = 0.1

# Characters that make a --target-modules value a regex rather than a comma list of names.
_REGEX_CHARS = set("*+?()[]{}|^$\\")


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


def projection_path(name: str, layer: int = 0) -> str:
    """The path of projection `name` in decoder layer `layer` of the random Llama (what targets match)."""
    return f"model.layers.{layer}.{'mlp' if name in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{name}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def folder_path(text: str) -> Path:
    """An --out folder: refuses "" (Path("") is ".", the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a folder")
    return Path(text)


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


# Upper bounds for the flags no model size bounds (a review, 2026-12-05: --threads 100000 ended in a
# MemoryError traceback, --seq-len 10**8 on the random model allocated for minutes before failing).
MAX_SYNTHETIC_SEQ_LEN = 4096  # the counting task's sequences; --model's are bounded by its positions


def max_threads() -> int:
    """The machine's cores (threads beyond them only wait for each other)."""
    return os.cpu_count() or 1


def _thread_count(text: str) -> int:
    value = _nonnegative_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(f"must be at most the machine's {max_threads()} cores, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def parse_target_modules(text: str) -> TargetModules:
    """--target-modules as apply_miss takes it: "all-linear"; a regex (any of * + ? ( ) [ ] { } | ^ $ \\
    in it) that must match a whole module path; else a comma list of names, each matching a path
    equal to it or ending in "." + it (one name is a list of one)."""
    text = text.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    if _REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid regex: {exc}") from None
        return text
    names = [name.strip() for name in text.split(",")]
    if not text or any(not name for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of module names (no empty entries), "
                                         "a regex or 'all-linear'")
    return names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ("(default: None)" says nothing; those helps say what applies)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m miss_ext.demo",
        description="Fine-tune a causal LM with MiSS adapters from miss_ext: by default a small random-init "
                    "Llama (built from a config, no downloads) on a synthetic counting task; with --model and "
                    "--data your own local Hugging Face model on your own text. Compares step time and memory "
                    "with PEFT's MiSS, reports held-out loss and perplexity before and after, checks merging, "
                    "saves the adapter in PEFT's format and a loss plot.",
        formatter_class=_HelpFormatter,
    )
    own = parser.add_argument_group("your own model and text (both flags together; no network)")
    own.add_argument("--model", type=Path, default=None, metavar="DIR",
                     help="a local Hugging Face causal-LM folder (config.json, weights, tokenizer files), loaded "
                          "with AutoModelForCausalLM/AutoTokenizer.from_pretrained(DIR, local_files_only=True); "
                          "the --size/--hidden/--layers/--heads flags do not apply")
    own.add_argument("--data", type=Path, default=None, metavar="FILE",
                     help="training text: a .jsonl file (one {\"text\": ...} object per line) or any other file as "
                          "plain UTF-8 text; tokenised with the model's tokenizer (documents separated by its EOS "
                          "token), packed into sequences of --seq-len tokens (the incomplete tail dropped), the last "
                          "--heldout share of them (at least one) held out for evaluation")
    own.add_argument("--heldout", type=_fraction, default=HELDOUT_FRACTION,
                     help="share of the packed --data sequences held out (the last ones, at least one)")

    model = parser.add_argument_group("random model (without --model)")
    # No default in argparse (None means "small"), so that --size given with --model is refused
    # instead of silently ignored.
    model.add_argument("--size", choices=sorted(SIZES), default=None,
                       help=f"preset dimensions (default: {DEFAULT_SIZE}): " + "; ".join(
                           f"{k}: hidden {v['hidden']}, {v['layers']} layers, {v['heads']} heads, "
                           f"MLP {v['intermediate']}" for k, v in SIZES.items()))
    model.add_argument("--hidden", type=_positive_int, default=None,
                       help="hidden size, overriding the preset (the MLP width becomes ~8/3 of it, a multiple of 64)")
    model.add_argument("--layers", type=_positive_int, default=None, help="number of layers, overriding the preset")
    model.add_argument("--heads", type=_positive_int, default=None,
                       help="attention heads, overriding the preset (must divide the hidden size; "
                            "key/value heads are half of them when even)")

    miss = parser.add_argument_group("MiSS adapter")
    miss.add_argument("--target-modules", type=parse_target_modules, default=None,
                      help="layers to adapt, as apply_miss/PEFT take them: a comma list of names (each matching a "
                           "module path equal to it or ending in '.name'), a regex matching whole module paths (a "
                           "value with any of *+?()[]{}|^$\\), or 'all-linear' (every linear layer but the output "
                           "head). Default: " + ",".join(TARGET_MODULES) + " on the random Llama, all-linear with "
                           "--model")
    miss.add_argument("--mode", choices=["default", "mini", "bat"], default="default",
                      help="MiSS variant: default (block r x out), mini (block r x mini_r, tiled), "
                           "bat (block out/r x r x r; r must divide every projection size)")
    miss.add_argument("--r", type=_positive_int, default=8,
                      help="MiSS shard size (rank). Above a targeted layer's in_features PEFT refuses it (exit 2); "
                           "with --no-peft miss_ext trains it with a warning (the extra block rows never train)")
    miss.add_argument("--mini-r", type=_positive_int, default=16,
                      help="mini mode's block width; must divide every projection's output size (mini mode only)")
    miss.add_argument("--dropout", type=float, default=0.0,
                      help="MiSS dropout; above 0 the two variants draw different masks and their losses drift apart")

    train = parser.add_argument_group("training")
    train.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                       help="dtype of the frozen base model (the random one or --model's); MiSS blocks stay float32 "
                            "(as in PEFT)")
    train.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps per variant")
    train.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step")
    train.add_argument("--seq-len", type=_positive_int, default=64,
                       help="tokens per sequence (at least 3 on the synthetic task, 2 with --data)")
    train.add_argument("--lr", type=_positive_float, default=1e-2, help="AdamW learning rate")
    train.add_argument("--seed", type=int, default=0, help="seed of the base model's init, the data and torch")
    train.add_argument("--device", default="auto",
                       help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    train.add_argument("--threads", type=_thread_count, default=1,
                       help="torch CPU threads; 0 = torch's choice (one per core). One by default: on a "
                            "machine shared with other busy processes, several OpenMP threads spend most of "
                            "these small steps waiting for each other (steps measured up to 100x slower), "
                            "while one thread loses little when the machine is quiet")
    train.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison run")
    train.add_argument("--out", type=folder_path, default=Path("miss_demo_out"),
                       help="output directory: adapter (PEFT format), base model (random model only), loss plot")
    return parser


def user_mode(args: argparse.Namespace) -> bool:
    """True when the demo fine-tunes a model folder (--model) on a text file (--data)."""
    return args.model is not None


def target_modules(args: argparse.Namespace) -> TargetModules:
    if args.target_modules is not None:
        return args.target_modules
    return ALL_LINEAR if user_mode(args) else list(TARGET_MODULES)


def model_dims(args: argparse.Namespace) -> ModelDims:
    preset = SIZES[args.size or DEFAULT_SIZE]
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


def _validate_random_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks against the random Llama's known shapes (a --model folder is checked by apply_miss)."""
    dims = model_dims(args)
    if dims.hidden % dims.heads != 0:
        parser.error(f"--heads {dims.heads} must divide the hidden size {dims.hidden}")
    if (dims.hidden // dims.heads) % 2 != 0:
        parser.error(f"--hidden {dims.hidden} / --heads {dims.heads} = {dims.hidden // dims.heads} per head: Llama's "
                     "rotary embedding needs an even head dimension")
    if args.seq_len < 3:
        parser.error(f"--seq-len must be at least 3 (two tokens to infer the step, one to predict), got {args.seq_len}")
    if args.seq_len > MAX_SYNTHETIC_SEQ_LEN:
        parser.error(f"--seq-len must be at most {MAX_SYNTHETIC_SEQ_LEN} on the synthetic task, got {args.seq_len}")
    # Only the projections the adapter targets (apply_miss raises later if there is none).
    targets = target_modules(args)
    shapes = {name: shape for name, shape in dims.projection_shapes().items()
              if targets == ALL_LINEAR or any(matches(targets, projection_path(name, i)) for i in range(dims.layers))}
    if not shapes:
        return
    smallest_in = min(i for i, _ in shapes.values())
    if args.r > smallest_in and not args.no_peft:  # as with --model, where PEFT itself refuses it
        parser.error(f"--r {args.r} is larger than the smallest projection input ({smallest_in}); "
                     "PEFT rejects that; pass --no-peft to train it with miss_ext alone (the block rows past the "
                     "input stay at their init, a warning says so)")
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


# A cap on the run's length: what picks each step's sequences is held up front (16 bytes per
# sequence, demo/_batches.py), and a longer run belongs in a training script.
MAX_STEPS = 1_000_000


def out_folder_problem(out: Path) -> Optional[str]:
    """Why --out cannot be (or become) a folder the demo writes into, or None; checked before any
    work, leaving nothing behind. Permission bits do not tell (root passes os.access even in
    /proc), so a folder is created and removed in the nearest existing ancestor."""
    import os
    import tempfile

    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder"
    ancestor = out.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"--out {out}: cannot create it ({ancestor} is not a folder)"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".miss_demo_probe_", dir=ancestor))
    except OSError as exc:
        # The OS's text is about the probe folder, not `ancestor` ("/proc: No such file or
        # directory" read as if /proc were missing: a new-user pass, 2026-12-07).
        return f"--out {out}: cannot create or write it (making a folder in {ancestor} failed: {exc.strerror or exc})"
    return None


def _validate_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--out must be (or become) a writable folder that is not the --model folder."""
    out = Path(args.out)
    problem = out_folder_problem(out)
    if problem is not None:
        parser.error(problem)
    if user_mode(args) and out.resolve() == Path(args.model).resolve():
        parser.error(f"--out {out} is the --model folder: the adapter's adapter_config.json there would make "
                     "from_pretrained load the adapter into the base next time; give another folder")
    # Any other model folder: beside its config.json the adapter's config makes transformers'
    # from_pretrained load the adapter's base instead, and that model no longer loads (a new-user
    # pass, 2026-12-04: an --out holding a copy of a model). The demo's own output keeps its base
    # in a subfolder, so a rerun into it is not refused.
    if (out / "config.json").is_file():
        parser.error(f"--out {out} holds a model (config.json): the adapter's adapter_config.json beside it would "
                     "make from_pretrained load the adapter's base instead of that model; give another folder")


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject settings that cannot run, naming the offending value (parser.error exits with 2)."""
    if (args.model is None) != (args.data is None):
        given, missing = ("--model", "--data") if args.data is None else ("--data", "--model")
        parser.error(f"{given} needs {missing}: the demo fine-tunes a model folder on a text file, both yours "
                     "(without either it runs its random model on the synthetic task)")
    if user_mode(args):
        for flag in ("size", "hidden", "layers", "heads"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} describes the random model; with --model {args.model} the folder's "
                             "config.json decides the dimensions")
        if args.seq_len < 2:
            parser.error(f"--seq-len must be at least 2 (one token to predict the next), got {args.seq_len}")
    else:
        _validate_random_model(args, parser)
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.steps > MAX_STEPS:
        parser.error(f"--steps {args.steps} is more than this demo runs ({MAX_STEPS:,}); use a training script")
    _validate_out(args, parser)
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
