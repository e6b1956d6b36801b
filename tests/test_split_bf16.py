"""miss.split_bf16, the part cutter of the split-bf16 products (csrc/ops/split_gemm.h), on CPU and
CUDA, against its definition (reference.bf16_parts_ref) bit for bit.

The op writes the bf16 parts of a float32 matrix straight into the layout a GEMM operand needs
(one kernel where seven ATen launches per operand were); miss.linear and miss.bat_linear call it on
their split path, whose accuracy tests/test_impl_choice.py checks against float64 references. The
CUDA kernel also runs on the CPU through the emulator (tests/test_cuda_emulated.py)."""
import pytest
import torch

from conftest import poison_heap
from reference import F64, bf16_parts_ref, split_bf16_ref

ops = torch.ops.miss

# Awkward float32 values: zeros of both signs, the ends of the normal range, subnormals, values
# whose parts round up (a rest of exactly half a unit, ties to even), and non-finite ones.
SPECIAL = [0.0, -0.0, 1.0, -1.5, 3.4028234663852886e38, -1.1754943508222875e-38, 1e-39, -7e-45,
           1.0 + 2.0 ** -8, 1.0 + 2.0 ** -16 + 2.0 ** -24, 1.0 + 3 * 2.0 ** -17, 65504.0, 1e-30,
           float("inf"), float("-inf"), float("nan")]


def assert_same_bits(got, want, what=""):
    """Equal bit patterns, except that any NaN matches any NaN (CPU and CUDA casts write different
    NaN payloads)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape, (got.shape, want.shape, what)
    got, want = got.cpu(), want.cpu()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), what
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), what


def random_values(rows, cols, device):
    """Values over many binades (2^-40 to 2^40), random signs, a few of SPECIAL sprinkled in."""
    mag = torch.exp2(torch.empty(rows, cols, dtype=F64).uniform_(-40, 40))
    sign = torch.randint(0, 2, (rows, cols), dtype=F64) * 2 - 1
    t = (mag * sign * torch.empty(rows, cols, dtype=F64).uniform_(1, 2)).float()
    flat = t.view(-1)
    if flat.numel():
        spots = torch.randint(0, flat.numel(), (min(len(SPECIAL), flat.numel()),))
        flat[spots] = torch.tensor(SPECIAL[:len(spots)], dtype=torch.float32)
    return t.to(device)


# (rows, cols): vector-width multiples, odd sizes (scalar path), a single element, empty ones.
SHAPES = [(8, 16), (7, 5), (1, 1), (3, 4), (33, 64), (2, 130), (0, 4), (4, 0)]
ORDERS = [(1, [0]), (2, [0, 1]), (2, [1, 0, 0]), (3, [0, 1, 2]), (3, [0, 0, 0, 1, 1, 2]), (3, [0, 1, 2, 0, 1, 0]),
          (3, [2, 2, 1, 0, 0, 1, 2, 0])]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_split_bf16_matches_the_definition(rows, cols, dim, device):
    t = random_values(rows, cols, device)
    before = t.clone()
    for parts, order in ORDERS:
        poison_heap(max(rows * cols * len(order), 1), torch.bfloat16, device)
        got = ops.split_bf16(t, parts, order, dim)
        assert got.is_contiguous() and got.device == t.device
        assert_same_bits(got, split_bf16_ref(t.cpu(), parts, order, dim), (parts, order))
    assert torch.equal(t.nan_to_num(), before.nan_to_num()), "the input changed"


@pytest.mark.parametrize("layout", ["transposed", "every_other_column", "storage_offset_1"])
def test_split_bf16_of_strided_and_misaligned_views(layout, device):
    buf = random_values(1, 2 * 24 * 16 + 1, device).view(-1)
    t = {"transposed": buf[:24 * 16].view(16, 24).t(),
         "every_other_column": buf[:2 * 24 * 16].view(24, 32)[:, ::2],
         "storage_offset_1": buf[1:24 * 16 + 1].view(24, 16)}[layout]
    for parts, order in ORDERS:
        for dim in (0, 1):
            assert_same_bits(ops.split_bf16(t, parts, order, dim), split_bf16_ref(t.cpu(), parts, order, dim),
                             (layout, parts, order, dim))


def test_split_bf16_three_parts_hold_every_float32_exactly(device):
    """Three parts sum to t exactly (in float64) for every finite float32 whose last part stays a
    normal bf16 (|t| >= 2^-110 here); two parts leave less than 2^-16 relative."""
    t = random_values(64, 64, device).cpu()
    t = t[torch.isfinite(t) & ((t.abs() >= 2.0 ** -110) | (t == 0))]
    t = t.view(1, -1).to(device)
    parts = ops.split_bf16(t, 3, [0, 1, 2], 0).to(F64)
    assert torch.equal(parts.sum(0).cpu(), t.to(F64).view(-1).cpu())
    two = ops.split_bf16(t, 2, [0, 1], 0).to(F64).sum(0).cpu()
    rel = ((two - t.to(F64).view(-1).cpu()).abs() / t.to(F64).abs().view(-1).cpu().clamp_min(1e-300))
    assert rel.max().item() < 2.0 ** -16


def test_the_definition_reference_is_not_a_copy_of_the_op():
    """bf16_parts_ref by hand for one value, 1 + 2^-8 + 2^-17: 1 + 2^-8 is not a bf16 value (7 stored
    bits), so the head is 1; then 2^-8 + 2^-17, whose head is 2^-8; the last part 2^-17."""
    v = torch.tensor([[1.0 + 2.0 ** -8 + 2.0 ** -17]])
    want = [1.0, 2.0 ** -8, 2.0 ** -17]
    assert [p.item() for p in bf16_parts_ref(v, 3)] == want
    assert ops.split_bf16(v, 3, [0, 1, 2], 0).float().view(-1).tolist() == want


BAD = [
    (lambda: (torch.zeros(3, dtype=torch.float32), 3, [0], 0), ValueError, "t must be a matrix, got a 1-D tensor"),
    (lambda: (torch.zeros(2, 3, dtype=torch.float64), 3, [0], 0), ValueError, "t must be float32, got Double"),
    (lambda: (torch.zeros(2, 3), 0, [0], 0), ValueError, "parts must be 1, 2 or 3, got parts=0"),
    (lambda: (torch.zeros(2, 3), 4, [0], 0), ValueError, "parts must be 1, 2 or 3, got parts=4"),
    (lambda: (torch.zeros(2, 3), 3, [], 0), ValueError, "order must name 1 to 8 parts, got 0"),
    (lambda: (torch.zeros(2, 3), 3, [0] * 9, 0), ValueError, "order must name 1 to 8 parts, got 9"),
    (lambda: (torch.zeros(2, 3), 2, [0, 2], 0), ValueError, r"order names part 2 of a 2-part split"),
    (lambda: (torch.zeros(2, 3), 2, [-1], 0), ValueError, r"order names part -1 of a 2-part split"),
    (lambda: (torch.zeros(2, 3), 3, [0], 2), IndexError, r"Dimension out of range .* got 2"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_split_bf16_refuses_bad_arguments_by_name(case, device):
    make, error, match = BAD[case]
    t, parts, order, dim = make()
    with pytest.raises(error, match=match):
        ops.split_bf16(t.to(device), parts, order, dim)
    fake = torch.empty(t.shape, dtype=t.dtype, device="meta")
    with pytest.raises(error, match=match):  # the meta kernel (tracing) refuses alike
        ops.split_bf16(fake, parts, order, dim)


def test_split_bf16_is_not_differentiable():
    t = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="op without autograd support .* differentiable miss::linear"):
        ops.split_bf16(t, 3, [0, 1, 2], 0)
    with torch.no_grad():
        assert_same_bits(ops.split_bf16(t, 3, [0, 1, 2], 0), split_bf16_ref(t.detach(), 3, [0, 1, 2], 0))


def test_split_bf16_meta_shapes():
    t = torch.empty(5, 7, device="meta")
    assert ops.split_bf16(t, 3, [0, 0, 1], 0).shape == (15, 7)
    assert ops.split_bf16(t, 3, [0, 0, 1], -1).shape == (5, 21)
    assert ops.split_bf16(t, 3, [0, 0, 1], 1).dtype == torch.bfloat16
