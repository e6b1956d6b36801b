"""Refusals of the C++ ops' argument checks (csrc/ops/common/checks.cpp) that no other test pinned:
an overlap of one edge element, a bank of a third dtype, a src of another rank beside a matrix out.
From a mutation round of csrc/ (41 one-line mutants on a CPU build, 2026-12-06: 38 killed by the
suite, these 3 not): each test fails on its mutant, named in the comment above it."""
import pytest
import torch

from miss_ext import ops


# C01 (checks.cpp byte_span: the reachable byte span ends at the first byte of the last element,
# `first + last * item - 1`, instead of its last byte). Every overlap test had views sharing many
# elements; views sharing exactly one element at the edge passed as disjoint, and the kernel then
# read src's last element after it had written it as out's first.
@pytest.mark.parametrize("src_after", [False, True], ids=["src-before-out", "src-after-out"])
def test_tile_add_refuses_a_src_that_overlaps_out_in_one_edge_element(src_after):
    """tile_add_ refuses (ValueError, nothing written) a src sharing a single element with out, at
    the end of one view and the start of the other."""
    buf = torch.arange(1.0, 8.0, dtype=torch.float64)  # 7 elements: two views of 4 sharing buf[3]
    out, src = (buf[3:7], buf[0:4]) if not src_after else (buf[0:4], buf[3:7])
    before = buf.clone()
    with pytest.raises(ValueError, match="tile_add_ src overlaps out in memory"):
        ops.tile_add_(out.view(1, 4), src.view(1, 4))
    assert torch.equal(buf, before)


# C04 (checks.cpp check_bank_args: the rule "bank float32 or of y's dtype" dropped). No test
# passed a bank of a third dtype: the CPU kernel then failed inside ATen with a RuntimeError about
# a data pointer, and the Meta kernel (torch.compile, fake tensors) accepted the call.
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("y_dtype,bank_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16)],
                         ids=["f32-y-f64-bank", "bf16-y-f16-bank"])
def test_bank_add_refuses_a_bank_neither_float32_nor_of_y_dtype(device, y_dtype, bank_dtype):
    """bank_add raises TypeError naming the rule for a bank (and s) of a dtype that is neither
    float32 nor y's, on the CPU and on the Meta device alike."""
    y = torch.zeros(2, 4, dtype=y_dtype, device=device)
    s = torch.ones(2, 2, dtype=bank_dtype, device=device)
    bank = torch.ones(1, 2, 4, dtype=bank_dtype, device=device)
    ranks, periods = torch.tensor([2], device=device), torch.tensor([4], device=device)
    index = torch.tensor([0, 0], device=device)
    with pytest.raises(TypeError, match="the bank must be float32 or of y's dtype"):
        ops.bank_add(y, s, bank, ranks, periods, index)
    with pytest.raises(TypeError, match="the bank must be float32 or of y's dtype"):
        ops.bank_add_(y, s, bank, ranks, periods, index)


# C45 (checks.cpp check_tile_add_args: `matrices` asked only that out be 2-D). The shape errors
# tested a 3-D out; a 2-D out beside a src of another rank was then taken as "two matrices" and the
# src's last dimension tiled over every row of out, silently.
@pytest.mark.parametrize("src_shape", [(3,), (1, 1, 3)], ids=["1d-src", "3d-src"])
def test_tile_add_refuses_a_src_of_another_rank_beside_a_matrix_out(src_shape):
    """tile_add_ and tile_add refuse (ValueError, out unchanged) a 2-D out with a src that is
    neither a matrix nor of out's leading sizes."""
    out = torch.zeros(4, 6, dtype=torch.float64)
    src = torch.ones(src_shape, dtype=torch.float64)
    msg = r"needs src with out's leading sizes, or two matrices"
    with pytest.raises(ValueError, match=msg):
        ops.tile_add_(out, src)
    with pytest.raises(ValueError, match=msg):
        ops.tile_add(out, src)
    assert torch.equal(out, torch.zeros(4, 6, dtype=torch.float64))
