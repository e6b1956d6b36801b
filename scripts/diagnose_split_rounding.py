#!/usr/bin/env python
"""How cuBLAS rounds the split path's y += left @ right (bf16 operands, bf16 y, beta = 1) on this
GPU, by shape; and whether miss.split_addmm_ and miss.linear round once, as PEFT does.

    python scripts/diagnose_split_rounding.py            # cuda if visible, else cpu (a dry run)

The H200 run of 2026-12-04 left miss.linear 2-12 bf16 units off PEFT's rounding in a few elements
where the base and the adapter term cancel (tests/GPU.md). Those failures fit, from the tests'
seeds, cuBLAS rounding the product to bf16 before adding y: round(y + round(a @ b)) instead of
round(y + a @ b), under the split add's guard (reduction setting False). split_gemm.cpp now writes
the product in fp32 and adds it apart up to 16 MiB of fp32 output (kFp32ProductBytes) and keeps the
guarded in-place GEMM above it. This script says, per shape, which model cuBLAS's in-place addmm_
follows at each reduction setting (True: torch's default; False: what the guard sets) ("once":
elements off round(y + a @ b); "product first": off round(y + round(a @ b))), and the same for
miss.split_addmm_ and miss.linear. Each figure: elements that differ / that differ by more than one
bf16 ulp plus fp32 noise (2^-20 of the largest value: an fp32 sum's order moves a result where
terms cancel) / elements. The second must be 0 for "op once" and "linear vs PEFT" in every shape:
else the limit must rise (or the in-place GEMM go).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import miss_ext  # noqa: E402,F401
from reference import fold_ref  # noqa: E402

F64 = torch.float64
# (rows, in, out, r): decode and the failing test shapes, then growing training shapes around the limit
SHAPES = [(1, 1024, 1024, 64), (12, 8, 6, 16), (37, 96, 80, 16), (8, 11008, 4096, 256), (256, 4096, 4096, 64),
          (1024, 4096, 4096, 64), (2048, 4096, 4096, 64), (8192, 4096, 4096, 64), (8192, 4096, 11008, 64),
          (8192, 2048, 2048, 64)]
LEFT, RIGHT = [0, 0, 0, 1, 1, 2], [0, 1, 2, 0, 1, 0]  # split_gemm.cpp's pairs for three parts


def off(got, want):
    """"differ/beyond one ulp of want/elements": a sum that rounds once may still differ from the
    float64 one in a few elements (fp32 accumulation order); beyond one ulp it should not."""
    got, want = got.to(F64), want.to(F64)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -126))) - 7)
    noise = 2.0 ** -20 * want.abs().max() if want.numel() else 0.0
    return f"{int((got != want).sum())}/{int(((got - want).abs() > ulp + noise).sum())}/{want.numel()}"


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    settings = [True, False] if device == "cuda" else [None]
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else '-'}), torch {torch.__version__}, "
          f"float32 matmul precision {torch.get_float32_matmul_precision()}")
    for rows, fin, fout, r in SHAPES if device == "cuda" else SHAPES[:3]:
        x = torch.randn(rows, fin, device=device).bfloat16()
        w = (torch.randn(fout, fin, device=device) / fin ** 0.5).bfloat16()
        blk = torch.randn(r, fout, device=device)
        s = torch.ops.miss.fold(x, r, 0.0, None, torch.float32)
        left = torch.ops.miss.split_bf16(s, 3, LEFT, 1)
        right = torch.ops.miss.split_bf16(blk, 3, RIGHT, 0)
        term = left.to(F64) @ right.to(F64)  # exact products of the parts
        for setting in settings:
            if setting is not None:
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = setting
            base = torch.nn.functional.linear(x, w)
            once = (base.to(F64) + term).bfloat16()
            first = (base.to(F64) + term.bfloat16().to(F64)).bfloat16()
            inplace = base.clone().addmm_(left, right)
            op = base.clone()
            torch.ops.miss.split_addmm_(op, left, right)
            y = torch.ops.miss.linear(x, w, None, blk, 0.0, None)
            peft = (base.to(F64) + fold_ref(x, r) @ blk.to(F64)).bfloat16()
            mib = rows * fout * 4 / 2 ** 20
            print(f"rows={rows} in={fin} out={fout} r={r} ({mib:.1f} MiB fp32) reduction={setting}: "
                  f"addmm_ once {off(inplace, once)}, product first {off(inplace, first)}; "
                  f"op once {off(op, once)}; linear vs PEFT {off(y, peft)}", flush=True)
            del inplace, op, y
    if device == "cuda":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True


if __name__ == "__main__":
    main()
