#!/usr/bin/env python
"""Mixed-adapter batches on ONE layer (issue 14): inference time of four ways to serve a batch
whose rows use different MiSS adapters of one base nn.Linear.

    python bench/bench_bank.py                      # CPU: T=4096, 2048x2048, r=64, 16 adapters, fp32
    python bench/bench_bank.py --reps 20 --adapters 4 --device cuda --dtype bf16

Cases (same base weight, same 16 random non-zero blocks of shape (r, out), each row assigned an
adapter uniformly at random, seeded):

    single   (d) miss.linear of ONE adapter on the whole batch: the lower bound
    mixed    (a) the base GEMM once, miss.bank_fold (each row at its adapter's rank), then
             miss.bank_add_ adds each row's own adapter term in place (what MissBankLinear runs)
    split    (b) the rows split per adapter, each part through miss.linear (base GEMM per part),
             scattered back
    gathered (c) PEFT's mixed-batch loop for LoRA (`_mixed_batch_forward`), done for MiSS: the
             base GEMM once, then per adapter gather its rows, fold @ block, index_add the term back
    masked   (c') the literal boolean-mask loop: the base GEMM once, then per adapter its term on
             the whole batch, masked to its rows (torch.where)

Timing: torch.inference_mode, interleaved reps with the case order reshuffled per rep; the
report gives each case's median time and the median over reps of (case / single) in the same
rep (the machine is shared and noisy). CUDA: events around each call. Memory: the bank's size,
and the peak each case allocates, its output included (bench/measure.py: the CPU profiler's
memory timeline, or CUDA's allocator), in one more untimed call; each case function's docstring
names its largest temporaries.
"""
import argparse

import torch
import torch.nn.functional as F

import miss_ext  # noqa: F401  (registers torch.ops.miss)
from measure import add_common_arguments, interleaved_medians, peak_mib, positive_int, report

ops = torch.ops.miss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=4096)
    ap.add_argument("--features", type=positive_int, default=2048)
    add_common_arguments(ap, reps=15)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    T, n, r, N = args.tokens, args.features, args.r, args.adapters
    W, b = torch.randn(n, n, device=dev, dtype=dtype) / n**0.5, torch.randn(n, device=dev, dtype=dtype)
    blocks = [torch.randn(r, n, device=dev) * 0.01 for _ in range(N)]          # fp32 blocks, as PEFT keeps them
    bank = torch.stack(blocks)                                                    # (N, r, out): N * r * out values
    ranks = torch.full((N,), r, dtype=torch.int64, device=dev)
    periods = torch.full((N,), n, dtype=torch.int64, device=dev)
    x = torch.randn(T, n, device=dev, dtype=dtype)
    index = torch.randint(0, N, (T,), device=dev)
    rows = [(index == a).nonzero().squeeze(1) for a in range(N)]                  # precomputed, not timed

    def single():
        """(d): y (T, out) and miss.linear's own temporaries."""
        return ops.linear(x, W, b, blocks[0])

    def mixed():
        """(a): y (T, out) from the base GEMM, s (T, r); no (T, in) or per-adapter temporary."""
        y = F.linear(x, W, b)
        s = ops.bank_fold(x, index, ranks, r, None, None, torch.float32)
        ops.bank_add_(y, s, bank, ranks, periods, index, True)
        return y

    def split():
        """(b): per adapter, a copy of its rows of x and their output."""
        y = torch.empty(T, n, device=dev, dtype=dtype)
        for a in range(N):
            y.index_copy_(0, rows[a], ops.linear(x.index_select(0, rows[a]), W, b, blocks[a]))
        return y

    def gathered():
        """(c): per adapter, a copy of its rows of x and of their adapter term."""
        y = F.linear(x, W, b)
        for a in range(N):
            xa = x.index_select(0, rows[a])
            y.index_add_(0, rows[a], (ops.fold(xa, r, 0.0, None, torch.float32) @ blocks[a]).to(dtype))
        return y

    def masked():
        """(c'): per adapter, a (T, out) term of the whole batch."""
        y = F.linear(x, W, b)
        s = ops.fold(x, r, 0.0, None, torch.float32)
        for a in range(N):
            y = torch.where((index == a)[:, None], y + (s @ blocks[a]).to(dtype), y)
        return y

    cases = {"single": single, "mixed": mixed, "split": split, "gathered": gathered, "masked": masked}
    with torch.inference_mode():
        # The mixed-batch cases compute the same thing. Relative norm error, as bench_bank_model.py:
        # in bf16, bank_add_ rounds each row's sum once and the loops round the term first, so
        # elements near zero differ by an ulp of the term (elementwise rtol/atol failed on 0.2% of
        # the elements at T=1024, 2048^2).
        ref = mixed()
        limit = 1e-4 if dtype == torch.float32 else 3e-2
        for name in ("split", "gathered", "masked"):
            error = ((cases[name]().float() - ref.float()).norm() / ref.float().norm()).item()
            assert error < limit, f"{name} differs from mixed: relative error {error:.2e} >= {limit}"
        median_ms, median_ratio = interleaved_medians(cases, args.reps, dev, "single")
        peaks = {name: peak_mib(fn, dev) for name, fn in cases.items()}  # untimed runs
    result = {
        "config": dict(vars(args), threads=torch.get_num_threads(), torch=torch.__version__),
        "bank_values": bank.numel(), "bank_mib": bank.numel() * bank.element_size() / 2**20,
        "median_ms": median_ms,
        "median_ratio_vs_single": median_ratio,
        "peak_mib_allocated": peaks,
    }
    print(f"T={T}, {n}x{n}, r={r}, {N} adapters, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.reps} reps; bank {result['bank_values']} values ({result['bank_mib']:.1f} MiB)")
    report(result, digits=2, json_path=args.json)


if __name__ == "__main__":
    main()
