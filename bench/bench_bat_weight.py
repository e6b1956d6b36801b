#!/usr/bin/env python
"""Warm-cache time of `miss.bat_weight` on the CPU: the W' a bat layer builds at every forward.

    python bench/bench_bat_weight.py                      # 2048 x 2048, r = 64, fp32 and bf16 W
    PYTHONPATH=/path/to/other/checkout python bench/bench_bat_weight.py   # another build's kernel

One op called in a loop with nothing between the calls, so W and B are read from the cache where
they fit (a bf16 W at 2048 x 2048; an fp32 W and its output, 32 MiB, about fill a 32 MiB L3): the
figure is mostly the kernel's own arithmetic, which `bench_kernels.py` (a 256 MiB copy between
cases, W read from memory) does not show. Per run: min and median over --reps calls after warm-up calls, for each CPU
version of the tiled loop (csrc/ops/cpu/cpu_clones.h) that this CPU has, each in a child process
(MISS_EXT_CPU_ISA is read once per process). To compare two builds, alternate runs of this script
against each (PYTHONPATH) and compare the mins: different processes cannot share one build.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import positive_int  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_pythonpath() -> str:
    """PYTHONPATH for the timing children: the miss_ext this process would import first (PYTHONPATH,
    an install, or the current directory under `python -m pytest`), else this checkout, as
    bench_linear.py falls back to it. A child started from bench/ has neither the parent's sys.path
    nor its current directory on its own path."""
    spec = importlib.util.find_spec("miss_ext")
    root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else REPO
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def time_one(n: int, r: int, dtype: str, reps: int) -> dict:
    import time

    import miss_ext  # noqa: F401  (registers torch.ops.miss)

    torch.manual_seed(0)
    w = torch.randn(n, n).to(getattr(torch, dtype))
    block = torch.randn(n // r, r, r) * 0.1
    for _ in range(5):
        torch.ops.miss.bat_weight(w, block, None)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.ops.miss.bat_weight(w, block, None)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"min_ms": times[0] * 1e3, "median_ms": times[len(times) // 2] * 1e3,
            "miss_ext": os.path.dirname(miss_ext.__file__)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=positive_int, default=2048, help="W is n x n (default 2048)")
    ap.add_argument("-r", type=positive_int, default=64, help="block size r, dividing n (default 64)")
    ap.add_argument("--reps", type=positive_int, default=40)
    ap.add_argument("--isa", nargs="*", default=["auto", "avx2", "baseline"],
                    help="MISS_EXT_CPU_ISA values to time (those the CPU lacks are skipped by the library)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.n % a.r:
        ap.error(f"-r {a.r} must divide -n {a.n}")
    if a.child:
        print(json.dumps({dtype: time_one(a.n, a.r, dtype, a.reps) for dtype in ("float32", "bfloat16")}))
        return
    print(f"miss.bat_weight, W {a.n} x {a.n} (fp32 / bf16), r = {a.r}, block fp32, warm cache, "
          f"{torch.get_num_threads()} threads, {a.reps} calls")
    for isa in a.isa:
        env = dict(os.environ, MISS_EXT_CPU_ISA=isa, PYTHONPATH=child_pythonpath())
        out = subprocess.run([sys.executable, __file__, "-n", str(a.n), "-r", str(a.r), "--reps", str(a.reps),
                              "--child", "1"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{isa}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{isa:>8}: " + "   ".join(f"{d} min {v['min_ms']:.2f} ms, median {v['median_ms']:.2f} ms"
                                          for d, v in result.items())
              + f"   ({result['float32']['miss_ext']})")


if __name__ == "__main__":
    main()
