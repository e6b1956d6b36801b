#!/usr/bin/env python
"""Serving: greedy `generate()` of a whole causal LM with a MiSS adapter, per generated token.
PEFT's own code vs the same PEFT model after `miss_ext.peft.accelerate` vs `miss_ext.apply_miss`,
against the base model without an adapter (the floor) and PEFT's `merge_and_unload()` (the same
architecture as the base, so the same cost: the row shows what merging buys).

Run from the repository root (the venv active):

    python bench/bench_decode.py                        # CPU defaults: Llama 4 x 512, batch 1, prompt 8, 32 tokens, fp32
    python bench/bench_decode.py --modes default --new-tokens 64 --json bench/out/decode.json
    python bench/bench_decode.py --preset gpu           # cuda, bf16, Llama 4 x 2048, batch 8, prompt 128, 64 tokens

Training measures large matrices (bench_model.py); decoding runs every adapted layer on a few rows
per step, where the cost of a call (Python, dispatch, launches) rather than its arithmetic decides.
The model is bench_model.py's (transformers.LlamaForCausalLM from a config, random weights, adapters
on q/k/v/o/gate/up/down, the same random blocks in every variant of a mode), in eval mode, KV cache
on. Each repetition times, for every variant in a freshly shuffled order, `generate()` of 1 token
(prefill: the prompt's forward and the first token) and of N tokens; a decode step is
(t_N - t_1) / (N - 1). "vs PEFT" / "vs base" are medians over repetitions of the ratio within one
repetition, so noise that hits a whole repetition cancels. CUDA: a synchronize around each call.

Before timing, every variant but the base model must give PEFT's logits on the prompt (merged
weights included; bench_model.check_agreement: against a float64 copy of PEFT's model, at most
twice PEFT's own error plus 4 units of the dtype, and the adapters must move the logits by more
than 4x the distance to PEFT's); "same tokens" counts the rows whose N greedy tokens equal PEFT's
(half precision may flip a near-tie, so it is reported, not required).
"""
import argparse
import copy
import gc
import os
import random
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import quantile  # noqa: E402
from bench_model import (agreement_note, build_base, build_variants, check_agreement, finish,  # noqa: E402
                         parse_preset_args, print_machine)

PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", hidden=512, intermediate=1376, layers=4, heads=8, vocab=2048,
                batch=1, prompt=8, new_tokens=32, r=32, mini_r=32, reps=15, warmup=2),
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=2048, intermediate=5504, layers=4, heads=16, vocab=32000,
                batch=8, prompt=128, new_tokens=64, r=64, mini_r=64, reps=20, warmup=3),
}


def generate(model, ids, tokens):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0)


def variants_of(base, mode, a):
    """{name: eval-mode model}: the base (no adapter), PEFT, accelerated PEFT, apply_miss, merged."""
    models = build_variants(base, mode, a)  # peft, peft+accelerate, miss_ext.apply_miss (same blocks)
    merged = copy.deepcopy(models["peft"]).merge_and_unload()
    models = {"base (no adapter)": base, **models, "peft merge_and_unload": merged}
    for m in models.values():
        m.eval()
    return models


def timed(model, ids, tokens, cuda):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, ids, tokens)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_variants(models, ids, a):
    """({name: [decode s/token per rep]}, {name: [prefill s per rep]})"""
    cuda = ids.device.type == "cuda"
    calls = [(name, tokens) for name in models for tokens in (1, a.new_tokens)]
    decode = {n: [] for n in models}
    prefill = {n: [] for n in models}
    rng = random.Random(a.seed)
    for rep in range(a.warmup + a.reps):
        rng.shuffle(calls)
        t = {(name, tokens): timed(models[name], ids, tokens, cuda) for name, tokens in calls}
        gc.collect()
        if rep < a.warmup:
            continue
        for name in models:
            prefill[name].append(t[name, 1])
            decode[name].append((t[name, a.new_tokens] - t[name, 1]) / (a.new_tokens - 1))
    return decode, prefill


def median_ratio(xs, ys):
    return quantile([x / y for x, y in zip(xs, ys)], 0.5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parse_preset_args(p, PRESETS, argv)
    if a.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (a decode step is (t_N - t_1) / (N - 1)), got {a.new_tokens}")
    a.dropout = 0.0  # build_variants' argument; eval mode draws no mask anyway
    a.seq = a.prompt + a.new_tokens  # build_base's max_position_embeddings
    return a


def main(argv=None):
    a = parse_args(argv)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    torch.manual_seed(a.seed)
    base = build_base(a).eval()
    ids = torch.randint(1, a.vocab, (a.batch, a.prompt), device=a.device)
    cuda = print_machine(a.device)
    print(f"# Llama {a.layers} x {a.hidden} (mlp {a.intermediate}), batch {a.batch}, prompt {a.prompt}, "
          f"{a.new_tokens} new tokens, {a.dtype}, r={a.r}, mini_r={a.mini_r}; greedy, KV cache; "
          f"{a.reps} reps (+{a.warmup} warm-up), interleaved\n")
    print("| mode | variant | decode ms/token | vs PEFT | vs base | prefill ms | vs PEFT | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    results, notes = [], []
    for mode in a.modes.split(","):
        models = variants_of(base, mode, a)
        adapted = {k: v for k, v in models.items() if k != "base (no adapter)"}
        notes.append(agreement_note(mode, check_agreement(adapted, base, ids, mode)))
        reference = generate(models["peft"], ids, a.new_tokens)
        decode, prefill = time_variants(models, ids, a)
        for name, model in models.items():
            same = int((generate(model, ids, a.new_tokens) == reference).all(dim=1).sum())
            row = dict(mode=mode, variant=name, decode_ms=1e3 * quantile(decode[name], 0.5),
                       decode_vs_peft=median_ratio(decode[name], decode["peft"]),
                       decode_vs_base=median_ratio(decode[name], decode["base (no adapter)"]),
                       prefill_ms=1e3 * quantile(prefill[name], 0.5),
                       prefill_vs_peft=median_ratio(prefill[name], prefill["peft"]), same_tokens=same)
            print(f"| {mode} | {name} | {row['decode_ms']:.2f} | {row['decode_vs_peft']:.3f}x | "
                  f"{row['decode_vs_base']:.3f}x | {row['prefill_ms']:.2f} | {row['prefill_vs_peft']:.3f}x | "
                  f"{same}/{a.batch} |", flush=True)
            results.append(row)
        del models, adapted
        gc.collect()
    return finish(a, results, notes)


if __name__ == "__main__":
    sys.exit(main())
