#!/usr/bin/env python
"""The cost of one call of an adapted layer on a few rows: the host's work (Python checks, dispatch,
kernel launches), which decides a decode step (bench_decode.py), against a frozen nn.Linear.

Run from the repository root (the venv active):

    python bench/bench_call_overhead.py                    # CPU, fp32, 64 -> 64, 1 row, r = 8
    python bench/bench_call_overhead.py --device cuda --dtype bf16 --json bench/out/calls.json

Every case is an eval-mode layer called under torch.no_grad() (serving): a frozen nn.Linear (the
baseline), miss_ext.MissLinear in the default, mini and bat modes, PEFT's MissLinear and the same
PEFT layer after miss_ext.peft.accelerate, with the same random non-zero block. A case's time is one
loop of --calls calls (CUDA: then a synchronize, so the figure is the loop's throughput, host or
device, whichever is slower); the cases run in a freshly shuffled order in every repetition, and each
figure is the median over --reps repetitions (ratios: the median of the case's time over the
baseline's within one repetition, so noise that hits a whole repetition cancels). The layers are
tiny on purpose: the arithmetic costs nothing, the calls' fixed cost is what is timed. Before timing,
every adapted case must give PEFT's output (the same block values), and differ from the frozen one.
"""
import argparse
import json
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import miss_ext  # noqa: E402
import miss_ext.peft  # noqa: E402
from bench_linear import Wrap  # noqa: E402  (PEFT's get_peft_model needs a parent module)
from measure import device_arg, interleaved_medians, json_path_arg, positive_int  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def peft_layer(base, mode, r, accelerated):
    from peft import MissConfig, get_peft_model
    init = mode if mode in ("mini", "bat") else True
    config = MissConfig(r=r, mini_r=r if mode == "mini" else 1, init_weights=init, target_modules=["lin"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Wrap(base), config)
        if accelerated:
            miss_ext.peft.accelerate(model)
    return model.base_model.model.lin, model.base_model.model.lin.miss_block["default"]


def build(a, device, dtype):
    """{name: (layer, its block or None)}, all eval mode."""
    torch.manual_seed(0)
    proto = nn.Linear(a.size, a.size).to(device=device, dtype=dtype).requires_grad_(False)
    layers = {"frozen nn.Linear": (proto, None)}
    for mode in a.modes:
        ours = miss_ext.MissLinear(nn.Linear(a.size, a.size).to(device=device, dtype=dtype), a.r, mode=mode,
                                   mini_r=a.r if mode == "mini" else 1)
        ours.base_layer.load_state_dict(proto.state_dict())
        layers[f"miss_ext {mode}"] = (ours, ours.miss_block)
        for accelerated in (False, True):
            base = nn.Linear(a.size, a.size).to(device=device, dtype=dtype)
            base.load_state_dict(proto.state_dict())
            name = f"PEFT {mode}" + (" accelerated" if accelerated else "")
            layers[name] = peft_layer(base, mode, a.r, accelerated)
    gen = torch.Generator().manual_seed(1)
    values = {}
    with torch.no_grad():
        for name, (layer, block) in layers.items():
            layer.eval()
            if block is not None:
                mode = name.split()[1]
                if mode not in values:  # bat's W' = W + W_blocks B + B: keep B small
                    scale = 0.05 if mode == "bat" else 1.0
                    values[mode] = torch.randn(block.shape, generator=gen, dtype=torch.float64) * scale
                block.copy_(values[mode])
    return layers


def check_outputs(layers, x):
    with torch.no_grad():
        outputs = {name: layer(x).double() for name, (layer, _) in layers.items()}
    frozen = outputs["frozen nn.Linear"]
    tolerance = 1e-9 if x.dtype == torch.float64 else (1e-4 if x.dtype == torch.float32 else 3e-2)
    for name, y in outputs.items():
        if name == "frozen nn.Linear":
            continue
        reference = outputs["PEFT " + name.split()[1]]
        error = ((y - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
        if error > tolerance:
            raise SystemExit(f"{name}: output {error:.2e} (relative) off PEFT's")
        if torch.equal(y, frozen):
            raise SystemExit(f"{name}: output equals the frozen layer's (the adapter did nothing)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--size", type=positive_int, default=64, help="in_features = out_features")
    ap.add_argument("--rows", type=positive_int, default=1)
    ap.add_argument("--r", type=positive_int, default=8)
    ap.add_argument("--modes", nargs="+", default=["default", "mini", "bat"], choices=["default", "mini", "bat"])
    ap.add_argument("--calls", type=positive_int, default=500, help="calls per timed loop")
    ap.add_argument("--reps", type=positive_int, default=31)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", type=json_path_arg, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    layers = build(a, device, dtype)
    x = torch.randn(a.rows, a.size, device=device, dtype=dtype)
    check_outputs(layers, x)

    def loop(layer):
        def run():
            with torch.no_grad():
                for _ in range(a.calls):
                    layer(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    for layer, _ in layers.values():  # warm-up outside the timed repetitions
        loop(layer)()
    cases = {name: loop(layer) for name, (layer, _) in layers.items()}
    # Host timing on every device: interleaved_medians' CUDA events would time the GPU's queue.
    times, ratios = interleaved_medians(cases, a.reps, torch.device("cpu"), "frozen nn.Linear")
    print(f"# torch {torch.__version__}, {device} {a.dtype}, {a.size} -> {a.size}, rows {a.rows}, r {a.r}, "
          f"{a.calls} calls per loop, {a.reps} reps, {a.threads} thread(s); {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    print(f"{'case':28s} {'us/call':>9s} {'vs frozen':>10s}")
    for name in cases:
        print(f"{name:28s} {times[name] * 1e3 / a.calls:9.2f} {ratios[name]:9.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "torch": torch.__version__,
                       "us_per_call": {k: v * 1e3 / a.calls for k, v in times.items()}, "vs_frozen": ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
