#!/usr/bin/env python
"""Mixed-adapter TRAINING on one layer (issue 14, multi-tenant fine-tuning): forward + backward
time of a batch whose rows train different MiSS adapters of one frozen nn.Linear, with every
second adapter in mini mode (bench_bank.py times inference).

    python bench/bench_bank_train.py                    # CPU: T=4096, 2048x2048, r=64, 16 adapters
    python bench/bench_bank_train.py --device cuda --dtype bf16 --reps 20

Cases (same base weight, same random non-zero fp32 blocks, as PEFT keeps them; adapters 0, 2, 4, ...
default mode (r, out), 1, 3, 5, ... mini mode (r, mini_r); each row's adapter drawn uniformly,
seeded; x requires grad, a dense random output gradient):

    single  miss.linear of ONE default adapter on the whole batch: the lower bound
    mixed   the base GEMM once, miss.bank_fold, miss.bank_add: what MissBankLinear trains with
    split   the rows split per adapter, each part through miss.linear with its own block

The mini adapters are where the bank's block gradient needed a second kernel (bank_fold_wide_kernel
in csrc/ops/cuda/bank_kernel.cu, 2026-12-03): before it, a mini slot of period q kept only q of out
threads busy. Timing and report as bench_bank.py (interleaved reps, medians of per-rep ratios).
"""
import argparse
import json

import torch
import torch.nn.functional as F

import miss_ext  # noqa: F401  (registers torch.ops.miss)

from measure import add_common_arguments, interleaved_medians, peak_mib, positive_int

ops = torch.ops.miss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=4096)
    ap.add_argument("--features", type=positive_int, default=2048)
    ap.add_argument("--mini-r", type=positive_int, default=1, help="the mini adapters' mini_r (divides --features)")
    add_common_arguments(ap, reps=10)
    args = ap.parse_args(argv)
    T, n, r, N, q = args.tokens, args.features, args.r, args.adapters, args.mini_r
    if n % q:
        ap.error(f"--mini-r {q} does not divide --features {n}")
    dev = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    W, b = torch.randn(n, n, device=dev, dtype=dtype) / n**0.5, torch.randn(n, device=dev, dtype=dtype)
    widths = [n if a % 2 == 0 else q for a in range(N)]
    blocks = [(torch.randn(r, w, device=dev) * 0.01).requires_grad_() for w in widths]
    bank = torch.zeros(N, r, n, device=dev)
    for a, block in enumerate(blocks):
        bank[a, :, :widths[a]] = block.detach()
    bank.requires_grad_()
    ranks = torch.full((N,), r, dtype=torch.int64, device=dev)
    periods = torch.tensor(widths, dtype=torch.int64, device=dev)
    x = torch.randn(T, n, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, n, device=dev, dtype=dtype)
    index = torch.randint(0, N, (T,), device=dev)
    rows = [(index == a).nonzero().squeeze(1) for a in range(N)]                  # precomputed, not timed

    def single():
        ops.linear(x, W, b, blocks[0]).backward(grad)

    def mixed():
        s = ops.bank_fold(x, index, ranks, r, None, None, torch.float32)
        ops.bank_add(F.linear(x, W, b), s, bank, ranks, periods, index, True).backward(grad)

    def split():
        y = torch.empty(T, n, device=dev, dtype=dtype)
        for a in range(N):
            y = y.index_copy(0, rows[a], ops.linear(x.index_select(0, rows[a]), W, b, blocks[a]))
        y.backward(grad)

    cases = {"single": single, "mixed": mixed, "split": split}
    # The block gradients of mixed and split are the same sums: checked once (relative norm error).
    for case in (mixed, split):
        case()
    limit = 1e-4 if dtype == torch.float32 else 3e-2
    for a, block in enumerate(blocks):
        got, want = bank.grad[a, :, :widths[a]], block.grad
        error = ((got - want).norm() / want.norm()).item()
        assert error < limit, f"adapter {a}: bank gradient differs from split's: relative error {error:.2e}"
    median_ms, median_ratio = interleaved_medians(cases, args.reps, dev, "single")
    peaks = {name: peak_mib(fn, dev) for name, fn in cases.items()}  # untimed runs, gradients included
    result = {
        "config": dict(vars(args), threads=torch.get_num_threads(), torch=torch.__version__),
        "median_ms": median_ms,
        "median_ratio_vs_single": median_ratio,
        "peak_mib_allocated": peaks,
    }
    print(f"T={T}, {n}x{n}, r={r}, {N} adapters (half mini, mini_r={q}), {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.reps} reps, forward+backward")
    print(f"{'case':<8} {'median ms':>10} {'x single':>9} {'peak MiB':>9}")
    for k in cases:
        print(f"{k:<8} {median_ms[k]:>10.2f} {median_ratio[k]:>9.3f} {peaks[k]:>9.1f}")
    print(f"split (b) against mixed: {median_ratio['split'] / median_ratio['mixed']:.2f}x (above 1 = mixed is faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
