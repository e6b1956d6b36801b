#!/usr/bin/env python
"""Time the dropout ops of two or more builds of miss_ext on the CPU, in alternating processes.

    python bench/compare_builds.py /path/to/old/checkout /path/to/new/checkout [--rounds 3]

Each checkout must hold a built extension (`python setup.py build_ext --inplace` there; a
CPU-only build is enough: the CPU kernels are the same). Two builds cannot share a process (the
op namespace registers once), so each round runs one process per checkout, in turn, and each
process prints the median of 15 calls per op. Used for the dropout mask change of 2026-12-04
(bench/RESULTS.md): fold of bf16 x (4096 x 4096) at r = 64 into fp32, fold of fp32 x
(4096 x 2048), tile_add_ of fp32 (4096, 64) into bf16 (4096 x 4096), all at p = 0.1.
"""
import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import miss_ext
ops = torch.ops.miss
torch.manual_seed(0)
x = torch.randn(4096, 4096).bfloat16()
x32 = torch.randn(4096, 2048)
ds = torch.randn(4096, 64)
k = torch.tensor([123, 456])
def median_ms(f, n=15):
    f()
    ts = []
    for _ in range(n):
        a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
    return sorted(ts)[n // 2] * 1e3
print(median_ms(lambda: ops.fold(x, 64, 0.1, k, torch.float32)), median_ms(lambda: ops.fold(x32, 64, 0.1, k, None)),
      median_ms(lambda: ops.tile_add_(x, ds, 1.0, 0.1, k)))
"""
OPS = ["fold bf16 -> fp32", "fold fp32", "tile_add_ bf16 += fp32"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", nargs="+", help="directories holding a built miss_ext")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    for c in a.checkouts:
        if not os.path.isdir(os.path.join(c, "miss_ext")):
            ap.error(f"{c} holds no miss_ext package")
    times = {c: [] for c in a.checkouts}
    for _ in range(a.rounds):
        for c in a.checkouts:
            out = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(c)], capture_output=True, text=True,
                                 check=True, cwd="/")
            times[c].append([float(v) for v in out.stdout.split()])
    print("| op | " + " | ".join(a.checkouts) + " |")
    print("|---|" + "---:|" * len(a.checkouts))
    for i, name in enumerate(OPS):
        cells = [f"{min(t[i] for t in times[c]):.2f}-{max(t[i] for t in times[c]):.2f} ms" for c in a.checkouts]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
