#!/usr/bin/env python
"""Time of the model-level helpers on a model with many adapted layers (host work, no kernels).

    python bench/bench_model_api.py                       # 560 layers (80 decoder layers x 7 projections)
    python bench/bench_model_api.py --layers 112 --reps 3

apply_miss, merge_and_unload, save_adapter and load_adapter look at every parameter of the model (targets,
tied weights, the adapter files), so their cost grows with the model's size; a check that compares
every pair of parameters grows with its square. This times each on an nn.Sequential of small
nn.Linear layers (8x8: the GEMMs cost nothing, the host work is what is timed), the median of
--reps fresh runs, and prints one line per helper (seconds) and the JSON with --json.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miss_ext  # noqa: E402
from measure import json_path_arg, positive_int  # noqa: E402


def one_run(layers: int) -> dict:
    net = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    targets = [str(i) for i in range(layers)]
    x = torch.randn(2, 8)
    times = {}
    start = time.perf_counter()
    miss_ext.apply_miss(net, targets, r=2, init_weights=False)
    times["apply_miss"] = time.perf_counter() - start
    with torch.no_grad():
        y = net(x)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        miss_ext.save_adapter(net, folder)
        times["save_adapter"] = time.perf_counter() - start
        fresh = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in net.state_dict().items()
                               if "miss_block" not in k and "merged" not in k})
        start = time.perf_counter()
        miss_ext.load_adapter(fresh, folder)  # new layers
        times["load_adapter"] = time.perf_counter() - start
        start = time.perf_counter()
        miss_ext.load_adapter(fresh, folder)  # into the layers it made: the blocks are overwritten
        times["load_adapter again"] = time.perf_counter() - start
        with torch.no_grad():
            assert torch.equal(fresh(x), y), "loaded model differs"
    start = time.perf_counter()
    merged = miss_ext.merge_and_unload(net)
    times["merge_and_unload"] = time.perf_counter() - start
    with torch.no_grad():
        assert torch.allclose(merged(x), y, rtol=1e-4, atol=1e-5), "merged model differs"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=positive_int, default=560, help="adapted nn.Linear layers")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--json", type=json_path_arg, default=None, help="write the figures here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs = [one_run(a.layers) for _ in range(a.reps)]
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"{a.layers} adapted layers, median of {a.reps} runs (torch {torch.__version__}, {miss_ext.__file__}):")
    for name, seconds in medians.items():
        print(f"  {name:18s} {seconds:.3f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"layers": a.layers, "reps": a.reps, "median_s": medians, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
