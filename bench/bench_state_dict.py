"""What following the merge record costs (miss_ext/merge_record.py): state_dict() of a model of many
adapted layers, unmerged and merged, against state_dict() of the same layers without adapters (the
floor: torch's own walk), and a whole-model unmerge while state_dicts taken merged are kept (each
kept record is rewritten). CPU, float32. Interleaved repetitions, medians.

    python bench/bench_state_dict.py --layers 1000 --reps 20 --kept 50
"""
import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import miss_ext


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1000, help="nn.Linear(16, 16) layers, each adapted (r=4)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions of each state_dict() (medians)")
    parser.add_argument("--kept", type=int, default=50, help="state_dicts taken merged and kept during the unmerge")
    args = parser.parse_args(argv)
    for name in ("layers", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.kept < 0:
        parser.error(f"--kept must be at least 0, got {args.kept}")
    return args


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Linear(16, 16) for _ in range(args.layers)])
    adapted = nn.Sequential(*[nn.Linear(16, 16) for _ in range(args.layers)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        miss_ext.apply_miss(adapted, "all-linear", r=4, init_weights=False)
    results = {}
    for merged in (False, True):
        if merged:
            for layer in adapted:
                layer.merge()
        plain.state_dict(), adapted.state_dict()  # warm-up
        times = {"plain": [], "adapted": []}
        for _ in range(args.reps):  # interleaved
            times["plain"].append(timed(plain.state_dict))
            times["adapted"].append(timed(adapted.state_dict))
        results[merged] = {k: statistics.median(v) for k, v in times.items()}
    kept = [adapted.state_dict() for _ in range(args.kept)]
    unmerge = timed(lambda: [m.unmerge() for m in adapted])
    del kept
    print(f"{args.layers} layers, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| state_dict() | adapted (ms) | without adapters (ms) | per layer over it (us) |")
    print("|---|---|---|---|")
    for merged, row in results.items():
        extra = (row["adapted"] - row["plain"]) / args.layers * 1e6
        print(f"| {'merged' if merged else 'unmerged'} | {row['adapted'] * 1e3:.1f} | {row['plain'] * 1e3:.1f} | "
              f"{extra:.1f} |")
    print(f"unmerge of every layer with {args.kept} merged state_dicts kept: {unmerge * 1e3:.1f} ms "
          f"({unmerge / max(1, args.layers * max(1, args.kept)) * 1e6:.2f} us per kept record)")


if __name__ == "__main__":
    main()
