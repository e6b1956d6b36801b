#!/usr/bin/env python
"""Cost of the bank's activation-checkpointing check in a mixed-adapter training step: a small
randomly initialised Llama (transformers) with bank layers on every linear of its decoder, one
forward + backward inside miss_ext.mixed_batch, with the check as shipped against the check
replaced by a stub that sees no checkpoint, called under `--depth` extra Python frames (a
training loop's, Trainer's and accelerate's frames sit above the model call). With
`--checkpointing`, transformers' gradient checkpointing is on, and the stub also leaves and
finds no per-checkpoint note (the notes' cost is then in the ratio).

    python bench/bench_checkpoint_check.py                 # CPU, fp32, depths 0 and 40
    python bench/bench_checkpoint_check.py --depth 0,80 --reps 50
    python bench/bench_checkpoint_check.py --checkpointing non_reentrant   # transformers' checkpointing on

Why: each bank layer's training forward asks miss_ext/_checkpointing.py whether it runs inside a
checkpoint (MissBankLinear._check_recompute), which walks Python frames. mixed_batch walks the
frames above its `with` statement once; each layer walks its own. Reported per depth: the median
of the per-rep ratio shipped / stub (interleaved reps, bench/measure.py), and the median time of
the check itself per layer call. A tiny model is the worst case: a real layer's compute dwarfs a
few microseconds of frame walk.
"""
import argparse
import statistics
import time

import torch

import miss_ext
import miss_ext.bank
from measure import interleaved_medians, positive_int

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def depths_arg(text: str) -> list:
    try:
        depths = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths >= 0, got {text!r}") from None
    if not depths or min(depths) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths >= 0, got {text!r}")
    return depths


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=depths_arg, default=[0, 40], help="extra frames above the step (default 0,40)")
    ap.add_argument("--reps", type=positive_int, default=30)
    ap.add_argument("--layers", type=positive_int, default=2)
    ap.add_argument("--hidden", type=positive_int, default=32)
    ap.add_argument("--seq", type=positive_int, default=16)
    ap.add_argument("--checkpointing", choices=["off", "reentrant", "non_reentrant"], default="off",
                    help="transformers' gradient checkpointing (default off)")
    return ap.parse_args(argv)


def build(args):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=args.hidden, intermediate_size=args.hidden * 3 // 2,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max(64, args.seq))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    miss_ext.apply_bank(model, TARGETS, capacity=4, max_r=4)
    miss_ext.add_bank_adapter(model, "a", r=4)
    miss_ext.add_bank_adapter(model, "b", r=2, mode="mini", mini_r=4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.normal_(0, 0.02)
    if args.checkpointing != "off":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.checkpointing == "reentrant"})
    return model.train()


def nested(depth, fn):
    return fn() if depth == 0 else nested(depth - 1, fn)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model = build(args)
    ids = torch.randint(1, 64, (4, args.seq), generator=torch.Generator().manual_seed(0))
    names = ("checkpoints_around", "judge_recompute")
    shipped = {name: getattr(miss_ext.bank, name) for name in names}
    stubs = {"checkpoints_around": lambda since=None: (False, []), "judge_recompute": lambda note_of: (None, False, [])}

    def step():
        with miss_ext.mixed_batch(model, ["a", "b", None, "a"]):
            model(input_ids=ids, labels=ids).loss.backward()

    def case(checks, depth):
        def run():
            for name, check in checks.items():
                setattr(miss_ext.bank, name, check)
            try:
                nested(depth, step)
            finally:
                for name, check in shipped.items():
                    setattr(miss_ext.bank, name, check)
        return run

    results = {}
    for depth in args.depth:
        ms, ratio = interleaved_medians({"stub": case(stubs, depth), "shipped": case(shipped, depth)}, args.reps,
                                        torch.device("cpu"), "stub")
        calls = []

        def timed(*a, **k):
            start = time.perf_counter_ns()
            result = shipped["checkpoints_around"](*a, **k)
            calls.append(time.perf_counter_ns() - start)
            return result

        for _ in range(args.reps):  # the check alone, per layer call (its frames: the caller's)
            case(dict(shipped, checkpoints_around=timed), depth)()
        per_call = statistics.median(calls) / 1e3
        results[depth] = {"stub_ms": ms["stub"], "shipped_ms": ms["shipped"], "ratio": ratio["shipped"],
                          "check_us_per_layer_call": per_call}
        print(f"depth {depth:>3}: stub {ms['stub']:.3f} ms  shipped {ms['shipped']:.3f} ms  "
              f"shipped / stub {ratio['shipped']:.4f}  check {per_call:.2f} us per layer call ({len(calls)} calls)")
    return results


if __name__ == "__main__":
    main()
