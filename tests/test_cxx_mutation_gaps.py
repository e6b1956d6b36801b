"""Behaviours of the C++ ops that no other test pinned (a second mutation round over csrc/, CPU
build, 2026-12-07: meta kernels, autocast, split GEMM, merge, version counters, schemas, CPU row
helpers): each test here fails on a one-line mutant of the C++ that the rest of the suite let
through. The mutant each one kills is named in a comment above it. Round 1's gap tests are in
test_op_refusal_edges.py."""
import pytest
import torch

from conftest import rand
from miss_ext import ops
from reference import (fold_ref, linear_ref, philox_high_half, philox_low_bits, philox_mask, recover_mask, tie_rates,
                       tile_add_ref)

F64 = torch.float64


# N03 / N04 (meta_kernels.cpp linear_meta: out features read from weight.size(1); output in the
# block's dtype instead of x's). miss::linear's Autograd kernel computes the forward from
# miss::fold and ATen ops, so fake tensors and opcheck never reached the Meta kernel of
# miss::linear itself: only a call without the Autograd keys does (torch.inference_mode, as
# torch.compile traces an inference-mode model), and there a wrong shape or dtype is a wrong graph.
@pytest.mark.parametrize("in_f,out_f,r,mini_r,x_dtype,block_dtype", [
    (10, 20, 2, None, torch.float32, torch.float32),
    (12, 6, 4, 1, torch.float32, torch.float32),
    (10, 20, 3, 5, torch.float16, torch.float32),
    (7, 5, 3, None, torch.bfloat16, torch.float32),
], ids=["default-10-20", "mini-12-6", "mini-half-x-fp32-block", "remainder-bf16-x-fp32-block"])
def test_linear_meta_kernel_under_inference_mode_gives_the_real_shape_and_dtype(in_f, out_f, r, mini_r, x_dtype,
                                                                                 block_dtype):
    """Under inference_mode, miss::linear on meta tensors (its Meta kernel) returns what the CPU
    kernel returns: (..., out_features) in x's dtype, contiguous."""
    x = rand(2, 3, in_f, dtype=x_dtype)
    w, b = rand(out_f, in_f, dtype=x_dtype), rand(out_f, dtype=x_dtype)
    blk = rand(r, out_f if mini_r is None else mini_r, dtype=block_dtype)
    with torch.inference_mode():
        real = torch.ops.miss.linear(x, w, b, blk, 0.0, None)
        fake = torch.ops.miss.linear(*[t.to("meta") for t in (x, w, b, blk)], 0.0, None)
    assert real.shape == (2, 3, out_f) and real.dtype == x_dtype  # the op's contract
    assert fake.device.type == "meta"
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


# N18 (linear_autocast.cpp: the mini test compared the block's width with in_features instead of
# out_features). The autocast tests' mini blocks were never as wide as in_features, so a mini block
# with mini_r == in_features went to the fused op, which sums the block's out / mini_r gradient
# copies in the autocast dtype: float16 overflowed where PEFT's float32 sum is finite.
def test_mini_block_as_wide_as_in_features_sums_its_gradient_copies_in_float32_under_autocast():
    """Under float16 autocast, a mini block with mini_r == in_features (here 2, out 6: three
    copies) gets PEFT's float32 gradient 3 x 40000 = 120000, not float16's inf."""
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float16)  # S = fold_2(x) = [1, 0]
    weight = torch.zeros(6, 2)
    block = torch.zeros(2, 2, requires_grad=True)  # (r, mini_r) = (2, 2), mini_r == in_features
    g = torch.full((1, 6), 40000.0, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        y = torch.ops.miss.linear(x, weight, None, block, 0.0, None)
    (grad,) = torch.autograd.grad(y, block, g)
    # dM[j, c] = sum_t S[t, j] * sum_{o mod mini_r == c} G[t, o], in float64
    s = torch.tensor([[1.0, 0.0]], dtype=F64)
    want = s.t() @ g.double().view(1, 3, 2).sum(1)
    assert grad.dtype == torch.float32
    assert torch.equal(grad.double(), want), grad


# N55 (torch_bindings.cpp: tile_add's schema default alpha=1. changed). miss_ext.ops.tile_add
# always passes alpha, so no test called the op with its schema default, which is what a direct
# torch.ops.miss.tile_add(out, src) call (and a graph replaying the schema) gets.
def test_tile_add_schema_defaults_add_the_tiled_src_once():
    """torch.ops.miss.tile_add(out, src) and tile_add_(out, src), with no alpha / p / key, return
    (write) out + tile(src): out[t, c] + src[t, c mod Q], in float64."""
    out, src = rand(4, 7, dtype=F64), rand(4, 3, dtype=F64)
    want = tile_add_ref(out, src)
    torch.testing.assert_close(torch.ops.miss.tile_add(out, src), want, rtol=0, atol=1e-15)
    written = out.clone()
    torch.ops.miss.tile_add_(written, src)
    torch.testing.assert_close(written, want, rtol=0, atol=1e-15)


# N59 (impl_choice.cpp read_choice: an empty value no longer read as "auto", so it raised
# ValueError). The tests set the variables to a choice or deleted them; `MISS_EXT_GEMM=` (set but
# empty, as a shell or a launcher leaves a cleared variable) was never tried.
@pytest.mark.parametrize("variable", ["MISS_EXT_GEMM", "MISS_EXT_ADAPTER_TERM"])
def test_an_empty_choice_variable_means_auto(monkeypatch, variable):
    """A choice variable set to the empty string acts as unset ("auto"): miss::linear of bf16
    data with a float32 block (which reads both variables) runs and gives the unset result."""
    x, w = rand(5, 10, dtype=torch.bfloat16), rand(20, 10, dtype=torch.bfloat16)
    b, blk = rand(20, dtype=torch.bfloat16), rand(3, 20)
    monkeypatch.delenv(variable, raising=False)
    auto = ops.linear(x, w, b, blk)
    monkeypatch.setenv(variable, "")
    got = ops.linear(x, w, b, blk)
    assert torch.equal(got, auto)
    want = linear_ref(x, w, b, blk)
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=2 ** -7 * float(want.abs().max()))


# N63 (shard_kernels.cpp dropout_keep_groups: the "any tie in these eight columns?" test read bit
# 0 of each byte (kept) instead of bit 1 (tie)). A group whose other seven columns were all dropped
# then skipped tie settling, and the tie (keep value 2) counted as kept. test_dropout.py's tie
# tests use rates near the element's random high half, where a group with no kept column is rare.
def test_a_tie_in_a_group_with_nothing_else_kept_is_settled_by_the_low_bits():
    """At a rate near 1 whose threshold ties one element's high half (and its low bits say drop),
    that element is dropped as the documented generator says, though the seven other columns of
    its group of eight are dropped too: the CPU mask (tile_add_ and fold) is reference.philox_mask."""
    seed, offset, rows, cols = 12345, 678, 4, 64
    found = None
    for row in range(rows):
        for col in range(cols):
            high, low = philox_high_half(seed, offset, row, col), philox_low_bits(seed, offset, row, col)
            if high >= 0xFF00 and 0 < low < 0xFFFF:
                found = (row, col)
                break
        if found:
            break
    assert found is not None, "no element with a high half >= 0xFF00 in the grid: pick another seed"
    row, col = found
    p = tie_rates(seed, offset, row, col)[1]  # u == threshold - 1: dropped
    expected = philox_mask(seed, offset, rows, cols, p)
    assert expected[row, col] == 0.0
    group = slice(8 * (col // 8), 8 * (col // 8) + 8)
    assert expected[row, group].sum() == 0.0, "a group with a kept column does not exercise the skip"
    k = torch.tensor([seed, offset], dtype=torch.int64)
    assert torch.equal(recover_mask(rows, cols, p, k), expected)
    x = rand(rows, cols, dtype=F64)
    torch.testing.assert_close(ops.fold(x, 3, p, k), fold_ref(x, 3, expected, p), rtol=1e-12, atol=1e-12)


# N35 (split_gemm.cpp split_addmm_inplace_kernel: check_writable dropped) is killed by
# test_errors.py::test_in_place_ops_refuse_inference_tensors_before_writing[split_addmm_]: split_addmm_
# was missing from that test's list of in-place ops (_in_place_calls), which now has it.
