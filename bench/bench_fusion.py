#!/usr/bin/env python
"""What a fused base-GEMM epilogue could still save (issue 11), measured by its GEMM-shaped bound.

    python bench/bench_fusion.py --device cuda                      # bf16, T=8192, 4096x4096 and 4096x11008, r=64
    python bench/bench_fusion.py --device cpu -T 256 --shapes 256x256 --reps 3   # a quick run of the script

A fused path (LoRAFusion's, for LoRA) puts the adapter into the base GEMMs: the forward GEMM
starts its accumulator with the K=r product S D, the dx GEMM adds tile(dS) in its epilogue. Both
equal ONE longer GEMM with the adapter's operands appended along K, and that GEMM is what this
script times, without writing a fused kernel:

    forward  y  = [x | S parts] @ [W | D parts^T]^T           K = in + 6r   (y = x W^T + S D)
    backward dx = [G | dS parts] @ [W ; A ; A ; A]            K = out + 3r  (dx = G W + tile(dS))

with A (r, in) the 0/1 fold matrix (A[j, i] = 1 where i mod r == j, so dS A = tile(dS)) and the
fp32 S, D and dS in three bf16 parts each, as miss_ext's split path keeps PEFT's fp32 precision on
bf16 tensor cores (csrc/ops/split_gemm.h: the part products with i + j < 3, six for S D). A fused
path still needs the fold of x, dS = G D^T and dD = S^T G (each reads G once), which are timed
with it, as are the splits of S and dS into parts (small: (T, r) each). x and G are copied into
the long GEMMs' operands once, outside the timing, as a fused kernel reads them in place. So the
bound is what any fused path of PEFT's precision costs at least, running its GEMMs at cuBLAS's
speed.

Cases, each a forward + backward with x requiring grad, timed interleaved (bench/measure.py):
    frozen        nn.Linear (autograd): the baseline of every ratio
    frozen_gemms  its two GEMMs by hand (y = x W^T + b, dx = G W): autograd's share of "frozen"
    miss          miss_ext.MissLinear, default mode, fp32 block (autograd; the path users run)
    fused_bound   fold + the two long GEMMs above + dS and dD (by hand)
"fusion could save" = miss - fused_bound, in units of the frozen layer's time.
"""
import argparse
import datetime
import json
import os
import shlex
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import device_arg, interleaved_medians, json_path_arg, positive_int, shapes_arg  # noqa: E402

import miss_ext  # noqa: E402

ops = torch.ops.miss
PARTS = 3  # bf16 parts of an fp32 operand at torch's default ("highest") fp32 matmul precision


def bf16_parts(t: torch.Tensor, parts: int = PARTS) -> list:
    """t (fp32) as `parts` bf16 tensors summing to it (the bench needs their shapes, not exactness)."""
    out, rest = [], t
    for _ in range(parts):
        head = rest.to(torch.bfloat16)
        out.append(head)
        rest = rest - head.float()
    return out


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16 operands into fp32 (CUDA: aten::mm.dtype, fp32 accumulation and output; the
    CPU has no such kernel, so it widens first)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def build_cases(T: int, in_f: int, out_f: int, r: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    dt = torch.bfloat16
    base = nn.Linear(in_f, out_f, device=device, dtype=dt).requires_grad_(False)
    x = torch.randn(T, in_f, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, out_f, device=device, dtype=dt)
    miss = miss_ext.MissLinear(nn.Linear(in_f, out_f, device=device, dtype=dt), r, init_weights=False)
    miss.base_layer.load_state_dict(base.state_dict())
    block = miss.miss_block.detach()                                 # (r, out) fp32
    w, b, xd = base.weight, base.bias, x.detach()
    # Operands of the long GEMMs, built once (a fused kernel would read them in place).
    d_parts = bf16_parts(block)                                      # (r, out) each
    pairs = [(i, j) for i in range(PARTS) for j in range(PARTS) if i + j < PARTS]
    w_fwd = torch.cat([w] + [d_parts[j].t() for _, j in pairs], dim=1)   # (out, in + 6r)
    cols = torch.arange(in_f, device=device)
    fold_matrix = (cols.unsqueeze(0) % r == torch.arange(r, device=device).unsqueeze(1)).to(dt)  # (r, in)
    w_bwd = torch.cat([w] + [fold_matrix] * PARTS, dim=0)           # (out + 3r, in)
    d_cat = torch.cat(d_parts, dim=0)                                # (3r, out)
    # The long GEMMs' left operands, x and G copied in once: a fused kernel reads them in place,
    # so only the small adapter columns are written per call.
    x_cat = torch.cat([xd, xd.new_zeros(T, len(pairs) * r)], dim=1)  # [x | S parts]
    g_cat = torch.cat([g, g.new_zeros(T, PARTS * r)], dim=1)         # [G | dS parts]

    def frozen():
        base(x).backward(g)
        x.grad = None

    def frozen_gemms():
        torch.addmm(b, xd, w.t())
        g @ w

    def run_miss():
        miss(x).backward(g)
        x.grad = miss.miss_block.grad = None

    def fused_bound():
        s = ops.fold(xd, r, 0.0, None, torch.float32)                # (T, r) fp32, reads x once
        s_parts = bf16_parts(s)
        for k, (i, _) in enumerate(pairs):
            x_cat[:, in_f + k * r:in_f + (k + 1) * r] = s_parts[i]
        torch.addmm(b, x_cat, w_fwd.t())                             # y = x W^T + b + S D
        ds = sum(mm_f32(g, d_cat.t()).split(r, dim=1))               # dS = G D^T
        for k, part in enumerate(bf16_parts(ds)):
            g_cat[:, out_f + k * r:out_f + (k + 1) * r] = part
        torch.mm(g_cat, w_bwd)                                       # dx = G W + tile(dS)
        mm_f32(torch.cat(s_parts, dim=1).t(), g)                     # dD = S^T G (3 parts)

    return {"frozen": frozen, "frozen_gemms": frozen_gemms, "miss": run_miss, "fused_bound": fused_bound}


def build_piece_cases(T: int, in_f: int, out_f: int, r: int, device: torch.device) -> dict:
    """Alternatives for two steps of the default mode's layer step, each against the frozen
    layer's step (same run): which a later change should take, measured before it is written.

    dx_add        dx = G W, then dx += tile(dS) by miss.tile_add_ (the backward today)
    dx_prefill    dx = tile(dS) written first (a repeat), then dx += G W by the GEMM's beta = 1
                  epilogue (saves tile_add_'s read and write of dx; the GEMM reads dx instead;
                  needs in % r == 0)
    y_inplace     y += S D of the split parts by miss.split_addmm_ (the GEMM in place under its
                  fp32-reduction guard above 16 MiB of fp32 output, as at the default sizes)
    y_fp32        the same as an fp32 product added apart (split_gemm.cpp below 16 MiB): what
                  rounding once by construction would cost at training sizes
    The y cases start from a copy of the base output (the copy is timed in both)."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    base = nn.Linear(in_f, out_f, device=device, dtype=dt).requires_grad_(False)
    x = torch.randn(T, in_f, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(T, out_f, device=device, dtype=dt)
    w = base.weight
    ds = torch.randn(T, r, device=device)                            # dS (T, r) fp32
    s = ops.fold(x.detach(), r, 0.0, None, torch.float32)
    left = ops.split_bf16(s, PARTS, [0, 0, 0, 1, 1, 2], 1)           # split_gemm.cpp's pairs
    right = ops.split_bf16(torch.randn(r, out_f, device=device), PARTS, [0, 1, 2, 0, 1, 0], 0)
    y0 = base(x.detach())
    y = torch.empty_like(y0)

    def frozen():
        base(x).backward(g)
        x.grad = None

    def dx_add():
        dx = g @ w
        ops.tile_add_(dx, ds, 1.0, 0.0, None)
        return dx

    def dx_prefill():
        dx = ds.to(dt).repeat(1, in_f // r)
        return dx.addmm_(g, w)

    def y_inplace():
        y.copy_(y0)
        ops.split_addmm_(y, left, right)  # above 16 MiB of fp32 output: the guarded in-place GEMM
        return y

    def y_fp32():
        y.copy_(y0)
        return y.add_(mm_f32(left, right))

    cases = {"frozen": frozen, "dx_add": dx_add, "y_inplace": y_inplace, "y_fp32": y_fp32}
    if in_f % r == 0:
        cases["dx_prefill"] = dx_prefill
    # The alternatives compute the same values up to their roundings (a bf16 unit of the terms):
    # checked before they are timed.
    pairs = [("y_inplace", "y_fp32")] + ([("dx_add", "dx_prefill")] if in_f % r == 0 else [])
    for one, other in pairs:
        a, b = cases[one]().clone().double(), cases[other]().clone().double()
        scale = max(a.abs().max().item(), 1e-30)
        if not (a - b).abs().max().item() <= 2.0 ** -6 * scale:
            raise SystemExit(f"bench_fusion: {one} and {other} differ by {(a - b).abs().max().item():.3g} "
                             f"(largest value {scale:.3g}): not timed")
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-T", type=positive_int, default=8192)
    ap.add_argument("--shapes", type=shapes_arg, default="4096x4096,4096x11008", help="in x out, comma-separated")
    ap.add_argument("-r", type=positive_int, default=64)
    ap.add_argument("--reps", type=positive_int, default=40)
    ap.add_argument("--json", type=json_path_arg, help="also write the figures here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    print("# What a fused base-GEMM epilogue could still save\n")
    print(f"- command: `{shlex.join([sys.executable] + sys.argv)}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"- device: {name}, torch {torch.__version__}; bf16, T={a.T}, r={a.r}, reps={a.reps}, "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()!r}\n")
    print("| shape | frozen ms | frozen_gemms | miss | fused_bound | fusion could save |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for in_f, out_f in a.shapes:
        shape = f"{in_f}x{out_f}"
        ms, ratio = interleaved_medians(build_cases(a.T, in_f, out_f, a.r, device), a.reps, device, baseline="frozen")
        results[shape] = {"median_ms": ms, "median_ratio_vs_frozen": ratio}
        print(f"| {shape} | {ms['frozen']:.3f} | {ratio['frozen_gemms']:.3f}x | {ratio['miss']:.3f}x | "
              f"{ratio['fused_bound']:.3f}x | {ratio['miss'] - ratio['fused_bound']:.3f} of frozen |")
    print("\nPieces of the layer step, each against the frozen layer's step in the same run "
          "(build_piece_cases):\n")
    print("| shape | dx_add | dx_prefill | y_inplace | y_fp32 |")
    print("|---|---:|---:|---:|---:|")
    for in_f, out_f in a.shapes:
        shape = f"{in_f}x{out_f}"
        ms, ratio = interleaved_medians(build_piece_cases(a.T, in_f, out_f, a.r, device), a.reps, device,
                                        baseline="frozen")
        results[shape]["pieces"] = {"median_ms": ms, "median_ratio_vs_frozen": ratio}
        prefill = f"{ratio['dx_prefill']:.3f}x" if "dx_prefill" in ratio else "-"
        print(f"| {shape} | {ratio['dx_add']:.3f}x | {prefill} | {ratio['y_inplace']:.3f}x | {ratio['y_fp32']:.3f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
