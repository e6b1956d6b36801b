#!/usr/bin/env python
"""Where a bf16 layer's split-path forward leaves PEFT's rounding on a GPU (the H200 run of
2026-12-04: y 2-12 bf16 units off PEFT's rounding in a few elements where the base and the adapter
term cancel; tests/GPU.md). Step by step, against float64 and against each other:

    python scripts/diagnose_split_rounding.py            # cuda if visible, else cpu (a dry run)

For each shape and cuBLAS bf16 reduction setting it prints, as "elements more than one bf16 unit
of the reference off / max difference in units of the reference's ulp":
  base     F.linear(x, w) against the float64 product rounded once to bf16;
  parts    the split operands' product (float64 of the bf16 parts) against S @ D in float64;
  addmm    miss.split_addmm_(base, left, right) against round(base + left @ right) (float64);
  linear   miss.linear (the default "auto" path) against PEFT's rounding on this device's base,
           with the part count the op used (3 exact; 2 where torch's fp32 matmul precision is TF32:
           errors of about 2^-14 of the terms would fit the 2026-12-04 failures);
  fp32     the same with MISS_EXT_GEMM=fp32.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import miss_ext  # noqa: E402,F401
from reference import fold_ref, split_bf16_ref  # noqa: E402

F64 = torch.float64
SHAPES = [(1, 1024, 1024, 64), (5, 96, 80, 16), (12, 8, 6, 16), (3, 64, 64, 128), (2, 4096, 256, 64)]


def ulps_off(got, want):
    """(elements beyond one ulp of want, the largest difference in ulps of want)."""
    got, want = got.to(F64), want.to(F64)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -126))) - 7)
    units = (got - want).abs() / ulp
    return int((units > 1).sum()), float(units.max()) if units.numel() else 0.0


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    settings = [(True, True), (False, True)] if device == "cuda" else [None]
    print(f"device {device}, torch {torch.__version__}, matmul precision {torch.get_float32_matmul_precision()}, "
          f"cuda fp32_precision {getattr(torch.backends.cuda.matmul, 'fp32_precision', '?')}")
    for rows, fin, fout, r in SHAPES:
        x = (torch.rand(rows, fin, dtype=F64) + 0.25).mul(torch.randint(0, 2, (rows, fin)) * 2 - 1).bfloat16().to(device)
        w = (torch.randn(fout, fin, dtype=F64) / fin ** 0.5).bfloat16().to(device)
        blk = torch.randn(r, fout, dtype=F64).float().to(device)
        for setting in settings:
            if setting is not None:
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = setting
            base = torch.nn.functional.linear(x, w)
            base_ref = (x.to(F64) @ w.to(F64).t()).bfloat16()
            s = torch.ops.miss.fold(x, r, 0.0, None, torch.float32)
            parts = 3
            left = torch.ops.miss.split_bf16(s, parts, [0, 0, 0, 1, 1, 2], 1)
            right = torch.ops.miss.split_bf16(blk, parts, [0, 1, 2, 0, 1, 0], 0)
            same_parts = torch.equal(left.cpu().view(torch.int16),
                                     split_bf16_ref(s.cpu(), parts, [0, 0, 0, 1, 1, 2], 1).view(torch.int16))
            term64 = fold_ref(x, r) @ blk.to(F64)
            term_parts = left.to(F64) @ right.to(F64)
            y2 = base.clone()
            torch.ops.miss.split_addmm_(y2, left, right)
            y2_ref = (base.to(F64) + term_parts).bfloat16()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                y = torch.ops.miss.linear(x, w, None, blk, 0.0, None)
            # the part count the op used: miss::split_bf16's second argument (3: fp32-exact, 2: the TF32 setting)
            op_parts = sorted({str(e.concrete_inputs[1]) for e in prof.events()
                               if e.name == "miss::split_bf16" and getattr(e, "concrete_inputs", None)})
            peft = (base.to(F64) + term64).bfloat16()
            chosen = os.environ.get("MISS_EXT_GEMM")
            os.environ["MISS_EXT_GEMM"] = "fp32"
            try:
                y32 = torch.ops.miss.linear(x, w, None, blk, 0.0, None)
            finally:
                if chosen is None:
                    del os.environ["MISS_EXT_GEMM"]
                else:
                    os.environ["MISS_EXT_GEMM"] = chosen
            rel_parts = float(((term_parts - term64).abs().max() / term64.abs().max()))
            print(f"rows={rows} in={fin} out={fout} r={r} reduction={setting}: parts equal definition {same_parts}; "
                  f"base {ulps_off(base, base_ref)}; parts rel err {rel_parts:.2e}; "
                  f"addmm {ulps_off(y2, y2_ref)}; linear {ulps_off(y, peft)} (parts used {op_parts}); "
                  f"fp32 {ulps_off(y32, peft)}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True


if __name__ == "__main__":
    main()
