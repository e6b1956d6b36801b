#!/usr/bin/env python
"""Where the time of ONE adapted layer's forward+backward goes: torch.profiler's per-kernel table.

    python bench/profile_linear.py --preset gpu                   # cuda, bf16, T=8192, 4096x4096, r=64
    python bench/profile_linear.py --cases miss,miss_mini --steps 5
    python bench/profile_linear.py --device cpu -T 512 --in-features 256 --out-features 256

bench/bench_linear.py says how much slower than a frozen nn.Linear a layer is; this says on what.
Each case is bench_linear's (the same builders, block values and inputs: `bench_linear.py
--list-cases`), run for --warmup untimed steps, then --steps steps under torch.profiler. A step is
y = layer(x); y.backward(g) with x requiring grad, gradients set to None before it (outside the
profiled region's accounting only by being cheap). Per case it prints:

- the step's device time (the sum of the kernels' durations, per step; on the CPU, the sum of
  the ops' self CPU time) and the number of kernel launches per step;
- the kernels (on the CPU: the ops) by time per step, largest first, with their share of the step
  and, for "frozen", nothing else: the difference between a case's table and frozen's is what the
  adapter costs, kernel by kernel;
- the wall time per step (host clock around the profiled steps, synchronized): where it exceeds the
  device time by much, the host (launches, Python, autograd) is the bottleneck, not the kernels.

The profiler adds a little overhead to each launch, so use bench_linear.py for ratios; use this for
the breakdown. Kernel names are shortened (short_name: namespaces kept, "(anonymous namespace)::",
template arguments and argument lists dropped) and grouped by that.
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_linear as bl  # noqa: E402
from measure import device_arg, json_path_arg, nonnegative_int, positive_int  # noqa: E402

DEFAULT_CASES = "frozen,miss,miss_mini,miss_drop,miss@autocast,miss@before,miss_mini@before,peft_miss"


def short_name(name):
    """A kernel's name without "(anonymous namespace)::" (every kernel of csrc/ops/cuda is in one),
    its template arguments and parameter list, and the leading "void "."""
    name = name.replace("(anonymous namespace)::", "")
    cut = min((i for i in (name.find("("), name.find("<")) if i > 0), default=len(name))
    name = name[:cut]
    return name[5:] if name.startswith("void ") else name


def profile_case(case, x, g, a, device):
    """(rows, summary) for one case: rows = [(name, calls per step, us per step)] largest first."""
    from torch.profiler import ProfilerActivity, profile

    mod = case["module"]
    cuda = device.type == "cuda"
    for _ in range(a.warmup):
        bl.clear_grads(case, x)
        bl.fwd_bwd(mod, x, g)
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            bl.clear_grads(case, x)
            bl.fwd_bwd(mod, x, g)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    totals, calls = defaultdict(float), defaultdict(int)
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = short_name(e.name)
                totals[name] += e.time_range.elapsed_us()
                calls[name] += 1
    else:
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                totals[e.key] += e.self_cpu_time_total
                calls[e.key] += e.count
    rows = sorted(((n, calls[n] / a.steps, t / a.steps) for n, t in totals.items()), key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    summary = dict(wall_us=1e6 * wall / a.steps, busy_us=busy, launches=sum(r[1] for r in rows))
    return rows, summary


def print_case(name, case, rows, summary, a, cuda):
    what = "kernels" if cuda else "ops (self CPU time)"
    print(f"\n## {name}: {case['what']}\n")
    print(f"- per step: wall {summary['wall_us']:.0f} us, {what} {summary['busy_us']:.0f} us, "
          f"{summary['launches']:.0f} {'launches' if cuda else 'op calls'}\n")
    print(f"| {what} | calls/step | us/step | share |")
    print("|---|---:|---:|---:|")
    shown = rows[:a.top]
    for n, c, t in shown:
        print(f"| {n} | {c:g} | {t:.1f} | {t / summary['busy_us']:.1%} |")
    rest = rows[a.top:]
    if rest:
        t = sum(r[2] for r in rest)
        print(f"| ({len(rest)} more) | {sum(r[1] for r in rest):g} | {t:.1f} | {t / summary['busy_us']:.1%} |")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["gpu"], default=None, help="gpu: --device cuda --dtype bfloat16 -T 8192")
    ap.add_argument("--device", type=device_arg, default=None, help="cpu (default) or cuda[:N]")
    ap.add_argument("--dtype", default=None, choices=sorted(bl.DTYPES), help="base dtype (float32; bfloat16 for gpu)")
    ap.add_argument("-T", "--tokens", dest="T", type=positive_int, default=None, help="rows of x (4096; 8192 for gpu)")
    ap.add_argument("--in-features", type=positive_int, default=4096)
    ap.add_argument("--out-features", type=positive_int, default=4096)
    ap.add_argument("-r", type=positive_int, default=64)
    ap.add_argument("--mini-r", type=positive_int, default=64)
    ap.add_argument("--dropout", type=float, default=0.1, help="p of the *_drop cases")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list of bench_linear cases (default {DEFAULT_CASES})")
    ap.add_argument("--steps", type=positive_int, default=10, help="profiled steps per case")
    ap.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed steps first")
    ap.add_argument("--top", type=positive_int, default=12, help="rows shown per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=json_path_arg, default=None, metavar="PATH", help="also write every row here")
    a = ap.parse_args(argv)
    bl.fill_layer_defaults(ap, a)
    a.grad = "dense"
    a.case_list = bl.select_cases(a.cases)  # SystemExit naming unknown cases; frozen always first
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = bl.DTYPES[a.dtype]
    fin, fout = a.in_features, a.out_features
    proto = bl.make_base(fin, fout, device, dtype, a.seed)
    x, g = bl.make_inputs(a, fin, fout, device, dtype)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else bl.cpu_name()
    print("# miss_ext layer profile\n")
    print(f"- command: `{shlex.join([sys.executable] + sys.argv)}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- device: {name}, torch {torch.__version__}; {a.dtype}, T={a.T}, {fin}x{fout}, r={a.r}, "
          f"mini_r={a.mini_r}, dropout={a.dropout}; {a.steps} steps (+{a.warmup} warm-up) per case")
    results = {}
    for case_name in a.case_list:
        try:
            case = bl.build_case(case_name, proto, a, fin, fout)
        except RuntimeError as e:  # peft missing: that case only
            print(f"\n## {case_name}: not run ({e})")
            continue
        rows, summary = profile_case(case, x, g, a, device)
        print_case(case_name, case, rows, summary, a, cuda)
        results[case_name] = dict(summary, rows=rows)
        del case
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "case_list"}, "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
