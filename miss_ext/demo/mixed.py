"""Two MiSS adapters, two tasks, one batch:  python -m miss_ext.demo.mixed [--help]

1. Builds the demo's random Llama (miss_ext.demo, no downloads), frozen, and puts an adapter bank
   on q/k/v/o/gate/up/down_proj (`miss_ext.apply_bank`) with two fresh adapters:
   - "up":   a, a+3, a+6, a+9, ...   (mod 64)
   - "down": a, a-2, a-4, a-6, ...   (mod 64)
   Both continue the same one-token prompt a, differently; the base model knows neither.
2. Trains both at once: every batch holds sequences of both tasks, each naming its adapter
   (`miss_ext.mixed_batch`), one backward per step; each block gets the gradient of its own
   rows only (multi-tenant fine-tuning).
3. Saves each adapter in PEFT's format (`miss_ext.save_bank_adapter`) and loads both into a
   fresh copy of the base model (`miss_ext.load_bank`), as a server would. With --out, the
   random base model is saved beside them (OUT/base_model, which each adapter's config names as
   base_model_name_or_path), so the folders can be loaded again later; an earlier run's adapter
   configs there are removed before the base is replaced (a failed save leaves none loadable,
   never an earlier adapter beside the new base).
4. Generates for ONE mixed batch: the same prompts under "up", "down" and the base model
   ("__base__"), and prints some rows and, per adapter, the share of generated tokens that
   follow each task's rule.

The exit code is 1 unless every row of the mixed batch equals what its adapter alone generates
(each adapter loaded by itself with `miss_ext.load_adapter` into its own copy of the base; the
base model itself for "__base__"), each adapter's rows follow its own task (at least
--min-accuracy of the generated tokens) and not the other's, and the base rows follow neither.
"""
import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import miss_ext

from .._optional import require
from ._cli import MAX_SYNTHETIC_SEQ_LEN, SIZES, ModelDims, folder_path, max_threads, out_folder_problem
from ._driver import torch_threads
from ._synthetic import VOCAB, build_base_model
from ._training import forget_adapters_of, save_base_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ("up", "down")
STEP = {"up": 3, "down": -2}


def task_sequences(task: str, start: torch.Tensor, length: int) -> torch.Tensor:
    """(n, length) tokens of a task from n start tokens: start + STEP[task] * t (mod VOCAB)."""
    return (start[:, None] + STEP[task] * torch.arange(length)) % VOCAB


def random_starts(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=gen)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m miss_ext.demo.mixed", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the demo's model presets")
    ap.add_argument("--r", type=int, default=8, help="adapter rank of both adapters")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps (both adapters each step)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step, half per task")
    ap.add_argument("--seq-len", type=int, default=16, help="training sequence length")
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="Adam learning rate (no weight decay: it would also shrink the slots a batch does not use)")
    ap.add_argument("--new-tokens", type=int, default=10, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per adapter in the mixed generate batch")
    ap.add_argument("--min-accuracy", type=float, default=0.9,
                    help="share of an adapter's generated tokens that must follow its task for exit code 0")
    ap.add_argument("--out", type=folder_path, default=None,
                    help="keep the two adapter folders and the base model here (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base model, the data and the prompts")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 by default, as the main demo; 0 = torch's choice)")
    args = ap.parse_args(argv)
    for name in ("r", "steps", "batch_size", "new_tokens", "prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.threads < 0:
        ap.error(f"--threads must be 0 (torch's choice) or positive, got {args.threads}")
    if args.threads > max_threads():
        ap.error(f"--threads must be at most the machine's {max_threads()} cores, got {args.threads}")
    if args.batch_size % 2:
        ap.error(f"--batch-size must be even (half the sequences per task), got {args.batch_size}")
    hidden = SIZES[args.size]["hidden"]
    if args.r > hidden:  # every target's in_features is at least the hidden size
        ap.error(f"--r {args.r} is larger than the smallest projection input ({hidden}); PEFT cannot load such "
                 "an adapter (it requires r <= in_features)")
    if args.seq_len < 2:
        ap.error(f"--seq-len must be at least 2 (a token and its successor), got {args.seq_len}")
    if args.seq_len > MAX_SYNTHETIC_SEQ_LEN:
        ap.error(f"--seq-len must be at most {MAX_SYNTHETIC_SEQ_LEN}, got {args.seq_len}")
    # The prompt (one token) and the generated ones must lie within the trained positions: past
    # them the adapters have learned nothing, and the run failed its accuracy check after training
    # with a message that did not say why (a new-user pass, 2026-12-04).
    if args.new_tokens > args.seq_len - 1:
        ap.error(f"--new-tokens {args.new_tokens} would generate past the trained length (--seq-len {args.seq_len}: "
                 f"a one-token prompt and at most {args.seq_len - 1} new tokens); give a smaller --new-tokens or a "
                 "longer --seq-len")
    if not 0.0 < args.min_accuracy <= 1.0:  # 0 would pass rows that follow nothing
        ap.error(f"--min-accuracy must be in (0, 1], got {args.min_accuracy}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.seed < 2**63:
        ap.error(f"--seed must be in [0, 2^63), got {args.seed}")
    problem = None if args.out is None else out_folder_problem(args.out)
    if problem is not None:
        ap.error(problem)
    return args


def train(model: torch.nn.Module, args: argparse.Namespace) -> List[float]:
    # Adam without weight decay: the whole bank is one parameter, and decay would also shrink the
    # slots of adapters that a batch does not use.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    half = args.batch_size // 2
    names = [TASKS[0]] * half + [TASKS[1]] * half
    losses = []
    model.train()
    for _ in range(args.steps):
        tokens = torch.cat([task_sequences(task, random_starts(half, gen), args.seq_len) for task in TASKS])
        with miss_ext.mixed_batch(model, names):
            loss = model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def follows(generated: torch.Tensor, start: torch.Tensor, task: str) -> float:
    """Share of generated tokens equal to the task's continuation of the prompt."""
    want = task_sequences(task, start, 1 + generated.shape[1])[:, 1:]
    return (generated == want).float().mean().item()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Its one optional package, checked before any work (ImportError naming the extra), as the demo's.
    require("transformers", "demo", "python -m miss_ext.demo.mixed")
    try:
        with torch_threads(args.threads):
            return run(args)
    except KeyboardInterrupt:  # as the main demo: a line, not a traceback, and the shell's 130
        print("\ninterrupted: nothing was saved, or only what the lines above say", flush=True)
        return 130


def run(args: argparse.Namespace) -> int:
    dims = ModelDims(**SIZES[args.size], kv_heads=SIZES[args.size]["heads"] // 2)
    base = build_base_model(dims, args.seq_len + args.new_tokens, args.seed)
    base.generation_config.pad_token_id = 0
    base.generation_config.eos_token_id = None
    base.config.eos_token_id = None

    model = miss_ext.apply_bank(copy.deepcopy(base), TARGETS, capacity=len(TASKS), max_r=args.r)
    for task in TASKS:
        miss_ext.add_bank_adapter(model, task, args.r)
    t0 = time.perf_counter()
    losses = train(model, args)
    print(f"trained {TASKS} together: {args.steps} steps of {args.batch_size} sequences, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f} ({time.perf_counter() - t0:.1f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        folders: Dict[str, str] = {}
        base_path = None
        if args.out:  # the base is random, so nobody can download it: kept with the adapters
            base_path = str((root / "base_model").resolve())  # the config must name it from anywhere
            forget_adapters_of(root, base_path)  # no earlier run's adapter left beside the new base
            save_base_model(base, base_path)
        for task in TASKS:
            folders[task] = str(root / task)
            miss_ext.save_bank_adapter(model, task, folders[task], task_type="CAUSAL_LM",
                                       base_model_name_or_path=base_path)
        served = miss_ext.load_bank(copy.deepcopy(base), folders).eval()
        # The reference for each row: its adapter alone, through the single-adapter layers.
        alone = {task: miss_ext.load_adapter(copy.deepcopy(base), folders[task]).eval() for task in TASKS}
        alone["__base__"] = base.eval()
        where = (", ".join(folders.values()) + f" (base model: {base_path})" if args.out
                 else "a temporary folder, removed now (--out keeps them)")
        print(f"saved both in PEFT's format and loaded them into a fresh bank: {where}")

    gen = torch.Generator().manual_seed(args.seed + 2)
    start = random_starts(args.prompts, gen)
    prompt = start[:, None]
    rows = list(TASKS) + ["__base__"]
    names = [name for name in rows for _ in range(args.prompts)]
    with torch.no_grad(), miss_ext.mixed_batch(served, names):
        out = served.generate(input_ids=prompt.repeat(len(rows), 1), max_new_tokens=args.new_tokens,
                              do_sample=False)[:, 1:]
    print(f"one generate() call, {len(names)} rows: the same {args.prompts} prompts under each of {rows}")
    with torch.no_grad():
        expected = torch.cat([alone[name].generate(input_ids=prompt, max_new_tokens=args.new_tokens,
                                                   do_sample=False)[:, 1:] for name in rows])
    differing = int((out != expected).any(dim=1).sum())
    print(f"rows that differ from their adapter (or the base) generating alone: {differing} of {len(names)}")
    for i in range(min(2, args.prompts)):  # a sample of the rows
        for k, name in enumerate(rows):
            seq = out[k * args.prompts + i].tolist()
            print(f"  prompt {prompt[i].tolist()} {name:>8}: {seq}")
    print(f"share of generated tokens that follow each rule:\n  {'rows':>9} {'up':>6} {'down':>6}")
    ok = differing == 0
    for k, name in enumerate(rows):
        part = out[k * args.prompts:(k + 1) * args.prompts]
        shares = {task: follows(part, start, task) for task in TASKS}
        print(f"  {name:>9} {shares['up']:>6.2f} {shares['down']:>6.2f}")
        if name in TASKS:
            other = TASKS[1 - TASKS.index(name)]
            ok = ok and shares[name] >= args.min_accuracy and shares[other] < 0.5
        else:  # the base model knows neither task
            ok = ok and max(shares.values()) < 0.5
    print("each row follows its adapter" if ok else
          f"FAILED: a row differs from its adapter alone, an adapter's rows do not follow its task (needs >= "
          f"{args.min_accuracy} and the other < 0.5), or the base rows follow a task (needs < 0.5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
