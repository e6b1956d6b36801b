"""Soak: many small training steps with dropout, merges and unmerges; prints resident memory and
live tensors over the run as one JSON line.

    python tests/soak.py [--steps 20000] [--device cpu]

Run in a child process by tests/test_soak.py (issue 13, "Reliability"), so that the pytest
process's own allocations do not enter the figures. The model has one MissLinear per mode
(default with dropout, mini with dropout, bat) between two plain layers; every step is a
forward, a backward and an AdamW step, and every `--merge-every` steps all three layers merge,
run an eval forward, and unmerge. Memory is read after `--warmup` steps (allocator caches and
lazily initialised state are in place by then) and at ten points after it:

- rss: the process's resident set (/proc/self/statm), bytes;
- tensors: torch.Tensor objects the garbage collector can see (Python-visible live tensors);
- cuda_bytes: torch.cuda.memory_allocated() on a CUDA device.
"""
import argparse
import gc
import json
import os
import time
import warnings

import torch
from torch import nn

import miss_ext


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():      # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--merge-every", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--leak", type=int, default=0,
                    help="keep this many bytes per step alive (a deliberate leak: the test's negative control)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    model = nn.Sequential(
        nn.Linear(24, 48),
        miss_ext.MissLinear(nn.Linear(48, 48), r=8, dropout=0.1, init_weights=False),
        nn.GELU(),
        miss_ext.MissLinear(nn.Linear(48, 48), r=6, mode="mini", mini_r=4, dropout=0.1, init_weights=False),
        miss_ext.MissLinear(nn.Linear(48, 48), r=4, mode="bat"),
        nn.Linear(48, 10),
    ).to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [m for m in model if isinstance(m, miss_ext.MissLinear)]
    blocks = [m.miss_block.requires_grad_(True) for m in adapters]
    opt = torch.optim.AdamW(blocks, lr=1e-3)
    x = torch.randn(16, 24, device=dev)
    target = torch.randint(0, 10, (16,), device=dev)
    points, kept = [], []
    t0 = time.perf_counter()
    measure_at = {args.warmup + i * (args.steps - args.warmup) // 10 for i in range(11)}
    for step in range(1, args.steps + 1):
        model.train()
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.leak:
            kept.append(torch.empty(args.leak, dtype=torch.uint8).fill_(1))
        if step % args.merge_every == 0:
            model.eval()
            with torch.no_grad():
                unmerged = model(x)
                for m in adapters:
                    m.merge()
                merged = model(x)
                for m in adapters:
                    m.unmerge()
            if not torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4):
                raise SystemExit(f"step {step}: merged output differs by {(merged - unmerged).abs().max()}")
        if step in measure_at:
            point = {"step": step, "rss": rss_bytes(), "tensors": live_tensors()}
            if dev.type == "cuda":
                torch.cuda.synchronize()
                point["cuda_bytes"] = torch.cuda.memory_allocated(dev)
            points.append(point)
    print(json.dumps({"steps": args.steps, "seconds": time.perf_counter() - t0, "loss": loss.item(),
                      "points": points}))


if __name__ == "__main__":
    main()
