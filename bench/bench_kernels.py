#!/usr/bin/env python
"""Bandwidth of the hand-written kernels and of their alternatives, as a fraction of a device copy.

    python bench/bench_kernels.py --device cuda                 # T=8192, in=4096, r=64 (issue 11's sizes)
    python bench/bench_kernels.py --device cpu -T 1024 --reps 5 # a quick run of the script itself

Each case runs one op; "copy" copies a 256 MiB tensor (read + write). Every rep runs all cases
in a reshuffled order (bench/measure.py); a case's fraction of copy bandwidth is
(its bytes / its time) / (copy bytes / copy time), the median over reps of the ratio within a rep.
A case's bytes are what it must move at least: x read and S written for fold, out read and
written plus src read for tile_add_, W read and W' written for bat_weight.

Cases, each under every implementation that MISS_EXT_* can force (csrc/ops/impl_choice.h):
    fold/<dtype>/p=<p>[<kernel>]   miss.fold of x (T, in) at r into fp32 S (the linear's fold),
                                   kernel auto | columns | rows | warp (MISS_EXT_FOLD_KERNEL)
    tile_add_/bf16/p=<p>[<kernel>] dx (T, in) += tile(dS (T, r) fp32), the linear's backward step
                                   (p = 0.1: the dropout mask regenerated), kernel auto | flat |
                                   grid2d (MISS_EXT_TILE_ADD_KERNEL)
    bat_weight/<dtype>[<impl>]     W' of a bat adapter (out = in = --in-features, block fp32), in the
                                   block's dtype (fp32) and in bf16; impl kernel | gemm
                                   (MISS_EXT_BAT_TRANSFORM)
    split_bf16/<operand>[<impl>]   the bf16 parts of an fp32 operand of the split-bf16 products
                                   (csrc/ops/split_gemm.h): "S" (T, r) as the forward's six part
                                   pairs, "W'" (in, in) as bat's three parts; impl kernel
                                   (miss.split_bf16, one launch) | aten (the seven ATen launches per
                                   operand and a cat that the split path used before 2026-12-04)
Before timing, every implementation of a case must give its "auto" result (check_results).
Issue 11's targets: fold >= 0.80 of copy for bf16 and fp32 at r=64, >= 0.60 with dropout.
"""
import argparse
import datetime
import json
import os
import shlex
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import device_arg, environment, interleaved_medians, json_path_arg, positive_int  # noqa: E402

import miss_ext  # noqa: E402,F401  (registers torch.ops.miss)

ops = torch.ops.miss
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def with_env(variable, value, fn):
    """fn, run with os.environ[variable] = value (auto: unset); returns fn's result."""
    def run():
        with environment({variable: None if value == "auto" else value}):
            return fn()
    return run


def build_cases(a, device):
    """(cases, nbytes, results): the timed calls, the bytes each must move, and for every case but
    copy a call giving its result as a new tensor (check_results)."""
    cases, nbytes, results = {}, {}, {}
    copy_src = torch.empty(128 << 20, dtype=torch.float16, device=device).normal_()
    copy_dst = torch.empty_like(copy_src)
    cases["copy"] = lambda: copy_dst.copy_(copy_src)
    nbytes["copy"] = 2 * copy_src.nbytes
    for dname in ("bf16", "fp32"):
        x = torch.randn(a.T, a.in_features, device=device).to(DTYPES[dname])
        for p in (0.0, 0.1):
            if dname == "fp32" and p:
                continue
            key = miss_ext.new_dropout_key(device) if p else None
            for kernel in ("auto", "columns", "rows", "warp"):
                if device.type != "cuda" and kernel != "auto":
                    continue  # the choice is a CUDA one
                name = f"fold/{dname}/p={p}[{kernel}]"
                cases[name] = results[name] = with_env("MISS_EXT_FOLD_KERNEL", kernel,
                                                       lambda x=x, p=p, key=key: ops.fold(x, a.r, p, key, torch.float32))
                nbytes[name] = x.nbytes + a.T * a.r * 4
    dx = torch.randn(a.T, a.in_features, device=device, dtype=torch.bfloat16)
    ds = torch.randn(a.T, a.r, device=device)
    for p in (0.0, 0.1):
        key = miss_ext.new_dropout_key(device) if p else None
        for kernel in ("auto", "flat", "grid2d"):
            if device.type != "cuda" and kernel != "auto":
                continue
            name = f"tile_add_/bf16/p={p}[{kernel}]"
            cases[name] = with_env("MISS_EXT_TILE_ADD_KERNEL", kernel,
                                   lambda p=p, key=key: ops.tile_add_(dx, ds, 1.0, p, key))
            results[name] = with_env("MISS_EXT_TILE_ADD_KERNEL", kernel,
                                     lambda p=p, key=key: ops.tile_add(dx, ds, 1.0, p, key))
            nbytes[name] = 2 * dx.nbytes + ds.nbytes
    n = a.in_features
    w = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    block = torch.randn(n // a.r, a.r, a.r, device=device) * 0.01
    for out_name, out_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for impl in ("kernel", "gemm"):
            name = f"bat_weight/{out_name}[{impl}]"
            cases[name] = results[name] = with_env("MISS_EXT_BAT_TRANSFORM", impl,
                                                   lambda out_dtype=out_dtype: ops.bat_weight(w, block, out_dtype))
            nbytes[name] = w.nbytes + w.numel() * out_dtype.itemsize
    t_s = torch.randn(a.T, a.r, device=device)
    t_w = torch.randn(n, n, device=device)
    for operand, t, order in (("S", t_s, [0, 0, 0, 1, 1, 2]), ("W'", t_w, [0, 1, 2])):
        for impl in ("kernel", "aten"):
            name = f"split_bf16/{operand}[{impl}]"
            if impl == "kernel":
                cases[name] = results[name] = lambda t=t, order=order: ops.split_bf16(t, 3, order, 1)
            else:
                cases[name] = results[name] = lambda t=t, order=order: aten_split_bf16(t, 3, order)
            nbytes[name] = t.nbytes + len(order) * t.numel() * 2
    return cases, nbytes, results


def aten_split_bf16(t, parts, order):
    """miss.split_bf16(t, parts, order, 1) by ATen ops, as csrc/ops/split_gemm.cpp cut the parts
    before 2026-12-04 (a mask, a cast and a subtraction per part, then a cat)."""
    rest, cut = t, []
    for _ in range(parts - 1):
        head = (rest.view(torch.int32) & -65536).view(torch.float32)
        cut.append(head.to(torch.bfloat16))
        rest = rest - head
    cut.append(rest.to(torch.bfloat16))
    return torch.cat([cut[i] for i in order], 1)


def check_results(results):
    """Before timing: every implementation of a case (a case's name without the [implementation])
    gives what its first one gives, up to float32 summation order and one rounding of the stored
    dtype: a kernel that is fast because it is wrong must not be timed. SystemExit naming the case."""
    reference = {}
    for name, result in results.items():
        family = name.split("[")[0]
        raw = result()
        out = raw.double()
        if family not in reference:
            reference[family] = (name, out)
            continue
        first, want = reference[family]
        tol = 2 ** -7 if raw.dtype in (torch.bfloat16, torch.float16) else 1e-5
        scale = max(1.0, want.abs().max().item())
        err = (out - want).abs().max().item()
        if not err <= tol * scale:  # (a NaN fails too)
            raise SystemExit(f"{name}: {err:.3e} from {first}'s result (allowed {tol * scale:.1e}): "
                             "the implementations differ")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("-T", type=positive_int, default=8192)
    ap.add_argument("--in-features", type=positive_int, default=4096)
    ap.add_argument("-r", type=positive_int, default=64)
    ap.add_argument("--reps", type=positive_int, default=30)
    ap.add_argument("--json", type=json_path_arg, help="also write the figures here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    cases, nbytes, results = build_cases(a, device)
    check_results(results)
    ms, ratio = interleaved_medians(cases, a.reps, device, baseline="copy")
    copy_gbs = nbytes["copy"] / ms["copy"] / 1e6
    print("# miss_ext kernel bandwidth\n")
    print(f"- command: `{shlex.join([sys.executable] + sys.argv)}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"- device: {name}, torch {torch.__version__}; T={a.T}, in={a.in_features}, r={a.r}, reps={a.reps}")
    print(f"- copy: {copy_gbs:.0f} GB/s (read + write, median)\n")
    print("| case | median ms | GB/s | of copy |")
    print("|---|---:|---:|---:|")
    fractions = {}
    for k in cases:
        # (bytes_k / t_k) / (bytes_copy / t_copy), with t_k / t_copy the median per-rep ratio
        fractions[k] = nbytes[k] / nbytes["copy"] / ratio[k]
        print(f"| {k} | {ms[k]:.3f} | {nbytes[k] / ms[k] / 1e6:.0f} | {fractions[k]:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "median_ms": ms, "bytes": nbytes, "fraction_of_copy": fractions}, f, indent=2)


if __name__ == "__main__":
    main()
