#!/usr/bin/env python
"""Mixed-adapter batches on a small Llama (issue 14): forward time of four ways to serve a batch
whose sequences each use their own MiSS adapter (every adapter used when seqs >= adapters; r=64 on all seven projections of every layer).

    python bench/bench_bank_model.py                 # CPU: 4 layers, hidden 1024, 16 seqs x 64 tokens, 16 adapters
    python bench/bench_bank_model.py --device cuda --dtype bf16 --seqs 64 --seq-len 256

Cases (same random base model, same 16 random non-zero adapters, sequence i uses adapter
perm[i], seeded), all under torch.inference_mode, logits of the whole batch:

    single   (d) ONE adapter on the whole batch, MissLinear layers (miss.linear): the lower bound
    mixed    (a) the adapter bank (miss_ext.load_bank's layers, MissBankLinear) inside
             miss_ext.mixed_batch: per layer the base GEMM, one fold, one miss.bank_add_
    split    (b) the sequences split per adapter, each part through the MissLinear model with that
             adapter's blocks copied in (the copy is timed: it is what serving (b) costs)
    gathered (c) PEFT's mixed-batch loop (its LoRA `_mixed_batch_forward`) done for MiSS: per layer
             the base GEMM, then per adapter gather its rows, fold @ tile(block), index_add back
    masked   (c') the literal boolean-mask loop: per layer the base GEMM and one fold, then per
             adapter its term on the whole batch, kept on its rows (torch.where)

Timing as bench/bench_bank.py: interleaved reps, order reshuffled per rep, medians of each case
and of (case / single) within a rep. CUDA: events around each call, and the peak memory each
case allocates beyond the inputs (torch.cuda.max_memory_allocated).
"""
import argparse
import copy
import random

import torch
from torch import nn

import miss_ext
from miss_ext.bank_model import bank_layers
from measure import add_common_arguments, interleaved_medians, peak_mib, positive_int, report

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoopMiss(nn.Module):
    """(c) "gathered": base output, then per adapter: gather its rows, add fold(rows) @ block.
    (c') "masked": base output and one fold, then per adapter its term on every row, masked."""

    def __init__(self, base: nn.Linear, blocks, mode: str):
        super().__init__()
        self.base, self.blocks, self.mode, self.rows = base, blocks, mode, None

    def forward(self, x):
        y = self.base(x)
        flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        per_seq = x.shape[1] if x.dim() == 3 else 1
        r = self.blocks[0].shape[0]
        if self.mode == "masked":
            s = torch.ops.miss.fold(flat, r, 0.0, None, self.blocks[0].dtype)
            seq_of_row = torch.arange(flat.shape[0], device=x.device) // per_seq
        for a, seqs in self.rows:
            if self.mode == "masked":
                mask = torch.isin(seq_of_row, seqs)[:, None]
                out = torch.where(mask, out + (s @ self.blocks[a]).to(y.dtype), out)
                continue
            tok = (seqs[:, None] * per_seq + torch.arange(per_seq, device=x.device)).reshape(-1)
            s_a = torch.ops.miss.fold(flat.index_select(0, tok), r, 0.0, None, self.blocks[a].dtype)
            out.index_add_(0, tok, (s_a @ self.blocks[a]).to(y.dtype))
        return out.view(y.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=positive_int, default=4)
    ap.add_argument("--hidden", type=positive_int, default=1024, help="a multiple of 128 (heads of 64, KV heads half as many)")
    ap.add_argument("--intermediate", type=positive_int, default=2816)
    ap.add_argument("--seqs", type=positive_int, default=16)
    ap.add_argument("--seq-len", type=positive_int, default=64)
    add_common_arguments(ap, reps=7)
    args = ap.parse_args()
    if args.hidden % 128:
        ap.error(f"--hidden must be a multiple of 128 (attention heads of 64, KV heads half as many), got {args.hidden}")
    import transformers

    dev = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 128, max_position_embeddings=args.seq_len)
    base = transformers.LlamaForCausalLM(config).to(dev, dtype).eval()
    N, r = args.adapters, args.r
    single = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=r, init_weights=False)
    paths = [p for p, _ in miss_ext.miss_layers(single)]
    blocks = {p: [torch.randn(r, layer.out_features, device=dev) * 0.01 for _ in range(N)]
              for p, layer in miss_ext.miss_layers(single)}                      # fp32, as PEFT keeps them
    with torch.no_grad():
        for p, layer in miss_ext.miss_layers(single):
            layer.miss_block.copy_(blocks[p][0])
    banked = miss_ext.apply_bank(copy.deepcopy(base), TARGETS, capacity=N, max_r=r)
    names = [f"adapter{a}" for a in range(N)]
    layers = dict(bank_layers(banked))
    for a, name in enumerate(names):
        miss_ext.add_bank_adapter(banked, name, r)
        with torch.no_grad():
            for p in paths:
                layers[p].block(name).copy_(blocks[p][a])
    loops, looped = [], {}
    for mode in ("gathered", "masked"):
        looped[mode] = copy.deepcopy(base)
        for p in paths:
            parent, _, leaf = p.rpartition(".")
            loop = LoopMiss(looped[mode].get_submodule(p), blocks[p], mode)
            setattr(looped[mode].get_submodule(parent), leaf, loop)
            loops.append(loop)
    ids = torch.randint(1, config.vocab_size, (args.seqs, args.seq_len), device=dev)
    perm = [i % N for i in range(args.seqs)]                                    # sequence -> adapter: all used
    random.Random(1).shuffle(perm)
    seq_names = [names[a] for a in perm]
    groups = [(a, torch.tensor([i for i, b in enumerate(perm) if b == a], device=dev)) for a in sorted(set(perm))]
    for loop in loops:
        loop.rows = groups
    single_layers = dict(miss_ext.miss_layers(single))

    def run_single():
        return single(ids).logits

    def run_mixed():
        with miss_ext.mixed_batch(banked, seq_names):
            return banked(ids).logits

    def run_split():
        out = torch.empty(args.seqs, args.seq_len, config.vocab_size, device=dev, dtype=dtype)
        for a, seqs in groups:
            for p in paths:
                single_layers[p].miss_block.copy_(blocks[p][a])
            out[seqs] = single(ids[seqs]).logits
        return out

    def run_gathered():
        return looped["gathered"](ids).logits

    def run_masked():
        return looped["masked"](ids).logits

    cases = {"single": run_single, "mixed": run_mixed, "split": run_split, "gathered": run_gathered,
             "masked": run_masked}
    with torch.inference_mode():
        ref = run_mixed()
        # The mixed-batch cases compute the same logits (relative norm error: bf16 rounds each
        # case's different summation order differently, elementwise tolerances would be fragile).
        limit = 1e-4 if dtype == torch.float32 else 3e-2
        for name in ("split", "gathered", "masked"):
            other = cases[name]().float()
            error = ((other - ref.float()).norm() / ref.float().norm()).item()
            assert error < limit, f"{name} differs from mixed: relative error {error:.2e} >= {limit}"
        median_ms, median_ratio = interleaved_medians(cases, args.reps, dev, "single")
        peaks = {name: peak_mib(fn, dev) for name, fn in cases.items()}  # untimed runs
    bank_values = sum(layer.bank.numel() for layer in layers.values())
    result = {
        "config": dict(vars(args), threads=torch.get_num_threads(), torch=torch.__version__,
                       adapters_used=len(groups)),
        "bank_values": bank_values, "bank_mib": bank_values * 4 / 2**20,
        "median_ms": median_ms,
        "median_ratio_vs_single": median_ratio,
        "peak_mib_allocated": peaks,
    }
    print(f"Llama {args.layers} layers, hidden {args.hidden}, {args.seqs}x{args.seq_len} tokens, r={r}, {N} adapters "
          f"({len(groups)} used), {args.dtype}, {args.device}, {torch.get_num_threads()} threads, {args.reps} reps; "
          f"banks {bank_values} values ({result['bank_mib']:.1f} MiB)")
    report(result, digits=1, json_path=args.json)


if __name__ == "__main__":
    main()
