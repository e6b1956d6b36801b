"""The demo's driver: prepare the base model and data (random Llama + synthetic task, or your
--model and --data), train the variants side by side, report, check the merge, save."""
import argparse
import contextlib
import copy
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import miss_ext
from miss_ext._optional import require_all
from miss_ext.model import record_shared_weights
from miss_ext.base_layers import is_conv1d

from ._batches import TokenBatches
from ._cli import DTYPES, build_parser, model_dims, resolve_device, user_mode, validate
from ._merge import MergeCheck, check_merge
from ._report import (format_heldout, format_table, plot_losses, print_where, synthetic_notes,
                      synthetic_references)
from ._synthetic import TASK_SEQUENCES, build_base_model, make_batches
from ._training import (HeldoutLoss, RunResult, apply_miss_ext, apply_peft, forget_adapters_of, heldout_loss,
                        predictions_depend_on_input, save_base_model, saved_activation_bytes, train,
                        trainable_parameters)
from ._user import (DemoInputError, check_causal, check_fits, check_model_dir, describe_model, load_model,
                    load_text_data, load_tokenizer, training_batches)


@dataclass
class Prepared:
    """What a run needs, from either source."""
    base: nn.Module  # frozen
    base_path: Path  # where the base's files are (saved by the demo for the random model)
    batches: TokenBatches  # steps batches of (batch, seq) training token ids, CPU, made when asked for
    heldout: torch.Tensor  # (n, seq) held-out token ids, CPU
    model_desc: str  # for the table ("Llama hidden 128, 4 layers")
    model_class: str  # transformers class to load the base with
    title: str  # the plot's title, without the variants' settings
    notes: List[str] = field(default_factory=list)  # lines under the table
    references: List[Tuple[float, str, str]] = field(default_factory=list)  # plot lines (y, label, style)


@dataclass
class DemoResult:
    runs: List[RunResult]
    merge: MergeCheck
    heldout: torch.Tensor  # CPU token ids of the held-out batch the merge check ran on
    unmerged_logits: torch.Tensor  # the trained miss_ext model's logits on it, before merging
    merged_model: nn.Module
    table: str
    out: Path
    heldout_before: Optional[HeldoutLoss] = None  # the base model's held-out loss
    heldout_after: Dict[str, HeldoutLoss] = field(default_factory=dict)  # each trained variant's
    base_path: Optional[Path] = None
    # Why PEFT's from_pretrained cannot load the adapter (None: it can): r above a layer's
    # in_features, or transformers Conv1D layers (both need --no-peft; load_adapter loads them), so
    # the closing lines then show load_adapter only.
    peft_refusal: Optional[str] = None


def adapts_conv1d(model: nn.Module) -> bool:
    """Whether an adapter layer of `model` is on a transformers Conv1D (which PEFT's MiSS refuses)."""
    return any(is_conv1d(layer.base_layer) for _, layer in miss_ext.miss_layers(model))


def peft_cannot_load(model: nn.Module) -> Optional[str]:
    """Why PEFT's from_pretrained would refuse the adapter of `model` (None: it loads it)."""
    if adapts_conv1d(model):
        return "it adapts transformers Conv1D layers, which PEFT's MiSS refuses"
    if any(layer.r > layer.in_features for _, layer in miss_ext.miss_layers(model)):
        return "its r is above some adapted layer's in_features"
    return None


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


def prepare_synthetic(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path) -> Prepared:
    dims = model_dims(args)
    base = build_base_model(dims, args.seq_len, args.seed, dtype, device)
    # The held-out sequences are kept out of the training batches (the task has only 448). A
    # held-out batch of a quarter of them or more would leave the training batches too few
    # sequences (and from 448 none at all: make_batches would redraw forever).
    if args.batch_size > TASK_SEQUENCES // 4:
        raise DemoInputError(f"--batch-size {args.batch_size}: the random model's task has only {TASK_SEQUENCES} "
                             f"distinct sequences and the held-out batch is --batch-size of them; give at most "
                             f"{TASK_SEQUENCES // 4} (or train on your own text with --model and --data)")
    heldout = make_batches(1, args.batch_size, args.seq_len, seed=args.seed + 2)[0]
    return Prepared(
        base=base, base_path=out / "base_model",  # saved with the adapter, once training succeeded
        batches=make_batches(args.steps, args.batch_size, args.seq_len, seed=args.seed + 1, exclude=heldout),
        heldout=heldout,
        model_desc=f"Llama hidden {dims.hidden}, {dims.layers} layers", model_class="LlamaForCausalLM",
        title=f"a random frozen Llama (hidden {dims.hidden}, {dims.layers} layers)",
        notes=synthetic_notes(args.seq_len), references=synthetic_references(args.seq_len))


def prepare_user(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Prepared:
    """Loads --model and --data; raises DemoInputError before anything is written."""
    model_dir = check_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    data = load_text_data(args.data, tokenizer, args.seq_len, args.heldout)
    if args.batch_size > data.train.shape[0]:
        raise DemoInputError(f"--batch-size {args.batch_size} is more than the {data.train.shape[0]} training sequences "
                             f"of --data {args.data} (--seq-len {args.seq_len}): a batch would hold sequences twice; "
                             f"give at most {data.train.shape[0]}, or more text")
    base = load_model(model_dir, dtype, device)
    check_causal(base, model_dir, device)
    check_fits(base, data, model_dir, args.seq_len)
    desc, model_class = describe_model(base, model_dir)
    print(f"data: {args.data} -> {data.tokens:,} tokens, {data.train.shape[0] + data.heldout.shape[0]} sequences of "
          f"{args.seq_len} ({data.dropped} tail tokens dropped): {data.train.shape[0]} for training, the last "
          f"{data.heldout.shape[0]} held out")
    epochs = args.steps * args.batch_size / data.train.shape[0]
    print(f"training: {args.steps} steps x {args.batch_size} sequences = {epochs:.1f} passes over the training "
          "sequences (reshuffled each pass)")
    vocab = base.get_input_embeddings().num_embeddings
    return Prepared(
        base=base, base_path=model_dir,
        batches=training_batches(data.train, args.steps, args.batch_size, seed=args.seed + 1),
        heldout=data.heldout, model_desc=desc, model_class=model_class, title=desc,
        notes=[f"loss of a uniform guess over the model's {vocab:,} tokens: ln {vocab} = {math.log(vocab):.3f}."])


def require_demo_packages(args: argparse.Namespace) -> None:
    """The demo's optional packages, checked before any work: ImportError naming every missing one
    and the extra that installs them (pip install 'miss_ext[demo]')."""
    require_all(["transformers", "tqdm", "matplotlib"] + ([] if args.no_peft else ["peft"]), "demo",
                "python -m miss_ext.demo")


def run_demo(args: argparse.Namespace) -> DemoResult:
    require_demo_packages(args)
    with torch_threads(args.threads):
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> DemoResult:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    out = args.out.resolve()
    if user_mode(args):
        prepared = prepare_user(args, device, dtype)  # refused inputs raise before anything is written
    else:
        prepared = prepare_synthetic(args, device, dtype, out)
    base, batches = prepared.base, prepared.batches
    before = heldout_loss(base, prepared.heldout, args.batch_size, device)

    # peft is importable unless --no-peft: require_demo_packages checked it.
    variants = [("miss_ext", apply_miss_ext)] + ([] if args.no_peft else [("peft", apply_peft)])
    models = {}
    for name, apply in variants:
        try:
            models[name] = apply(copy.deepcopy(base), args)
        except (ValueError, TypeError) as exc:
            # apply_miss checks --target-modules, --r, --mini-r against the model's layers.
            what = f"--model {prepared.base_path}" if user_mode(args) else "the random model"
            if name == "peft" and adapts_conv1d(models["miss_ext"]):
                # miss_ext adapted the same layers: the flags are fine, PEFT's MiSS is what refuses.
                raise DemoInputError(f"{what}: --target-modules selects transformers Conv1D layers (GPT-2's), which "
                                     "PEFT's MiSS refuses (miss_ext adapts them): run with --no-peft to train "
                                     f"miss_ext alone, or leave the Conv1D layers out of --target-modules ({name}: {exc})") from exc
            raise DemoInputError(f"{what}: cannot adapt it with --target-modules / --r / --mini-r as given "
                                 f"({name}: {exc})") from exc
    shared = sorted(record_shared_weights(models["miss_ext"]))
    if shared:
        raise DemoInputError(f"--target-modules adapts {shared}, whose weight is shared with another module (tied "
                             "embeddings): the demo's merge check cannot merge it; leave it out of --target-modules")
    # The random base is saved with the adapter at the end; the user's base is their folder.
    synthetic_base = None if user_mode(args) else base
    del base, prepared.base
    counts = {name: sum(p.numel() for p in trainable_parameters(m)) for name, m in models.items()}
    print("trainable parameters (MiSS blocks only): " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the variants train different numbers of parameters: {counts}")

    torch.manual_seed(args.seed)  # reproducible dropout masks
    runs = train(models, batches, args.lr, device)
    diverged = [run.name for run in runs if not all(math.isfinite(loss) for loss in run.losses)]
    if diverged:
        raise DemoInputError(f"--lr {args.lr}: training diverged ({', '.join(diverged)}: the loss became NaN or inf); "
                             "nothing was saved; lower --lr")
    collapsed = [name for name, model in models.items()
                 if not predictions_depend_on_input(model, prepared.heldout[:args.batch_size], device)]
    if collapsed:
        raise DemoInputError(f"--lr {args.lr}: training collapsed ({', '.join(collapsed)}: the logits no longer depend "
                             "on the input); nothing was saved; lower --lr")
    for run in runs:
        run.saved_bytes = saved_activation_bytes(models[run.name], batches[0].to(device))
    table = format_table(runs, device, dtype, prepared.model_desc, args, prepared.notes)
    print()
    print(table)
    after = {name: heldout_loss(model, prepared.heldout, args.batch_size, device) for name, model in models.items()}
    print(format_heldout(before, after, prepared.heldout.shape[0]))

    miss_model = models.pop("miss_ext")
    peft_refusal = peft_cannot_load(miss_model)
    models.clear()  # frees the PEFT model before merging
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_outputs(miss_model, out, prepared.base_path, synthetic_base)
    except BaseException:
        # Ctrl-C, a full disk: say what the folder holds (main's message points at the lines above).
        earlier = ("any earlier run's adapter there was removed first, as the base model it names is replaced"
                   if synthetic_base is not None else "an earlier run's adapter there, if any, is as it was, or "
                   "none is left")
        print(f"\nthe save into {out} did not complete: no adapter of this run was saved ({earlier}); "
              "run again to save", file=sys.stderr, flush=True)
        raise
    print(f"\nsaved the adapter into {out}" + ("" if synthetic_base is None else
                                                f" and the random base model into {prepared.base_path}"), flush=True)
    stale = out / "base_model"
    if synthetic_base is None and stale.exists() and os.path.realpath(stale) != os.path.realpath(prepared.base_path):
        # An earlier random-model run into the same --out left its base there. Not removed (it is
        # no output of this run, and may be the user's), but said: it sits beside an adapter that
        # is not for it (a new-user pass, 2026-12-07).
        print(f"note: {stale} is not this adapter's base model (this adapter's config names {prepared.base_path}); "
              "it was left there by an earlier run and is kept as it was", flush=True)
    del synthetic_base
    merge_tokens = prepared.heldout[:args.batch_size]
    merge, merged_model, unmerged_logits = check_merge(miss_model, merge_tokens.to(device), dtype)
    print(f"\nmerge check on a held-out batch: max |merged - unmerged logits| = {merge.max_abs_diff:.3e} "
          f"(tolerance {merge.tolerance:.1e}: {merge.rule}) {merge.verdict}")

    title = f"MiSS {args.mode} r={args.r} on {prepared.title}, {device.type}, {args.dtype}"
    references = list(prepared.references)
    if user_mode(args):
        references += [(before.loss, f"held-out loss before ({before.loss:.3f})", ":"),
                       (after["miss_ext"].loss, f"held-out loss after, miss_ext ({after['miss_ext'].loss:.3f})", "-.")]
    plot_losses(runs, out / "loss_curve.png", title, references)
    return DemoResult(runs=runs, merge=merge, heldout=merge_tokens, unmerged_logits=unmerged_logits.cpu(),
                      merged_model=merged_model, table=table, out=out, heldout_before=before,
                      heldout_after=after, base_path=prepared.base_path, peft_refusal=peft_refusal)


def save_outputs(model: nn.Module, out: Path, base_path: Path, base: Optional[nn.Module]) -> None:
    """The adapter into `out` and, for the random model (`base`), the base into `base_path`. The
    adapter's config names the base folder, so no failure or interrupt may leave an earlier run's
    adapter beside a new base (it would load onto it without an error): the earlier config is
    removed before the base is replaced, and save_adapter writes the new config last."""
    if base is not None:
        # The base is random, so nobody can download it: saved so the adapter can be loaded later.
        forget_adapters_of(out, base_path)
        save_base_model(base, base_path)
    # task_type makes PEFT build a PeftModelForCausalLM; the base path lets it find the base.
    miss_ext.save_adapter(model, out, task_type="CAUSAL_LM", base_model_name_or_path=str(base_path))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    validate(args, parser)
    try:
        require_demo_packages(args)
    except ImportError as exc:  # exit 2, as for a flag the demo cannot run with; no usage text (no flag is wrong)
        hint = "; --no-peft runs the demo without the PEFT comparison" if "'peft'" in str(exc) else ""
        print(f"{parser.prog}: error: {exc}{hint}", file=sys.stderr)
        return 2
    try:
        result = run_demo(args)
    except DemoInputError as exc:
        parser.error(str(exc))  # exit code 2, as for a bad flag
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was saved, or only what the lines above say", flush=True)
        return 130
    model_class = "AutoModelForCausalLM" if user_mode(args) else "LlamaForCausalLM"
    print_where(result.out, result.base_path, model_class, dtype=str(DTYPES[args.dtype]).removeprefix("torch."),
                peft_refusal=result.peft_refusal)
    return 0 if result.merge.passed else 1
