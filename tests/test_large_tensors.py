"""Tensors of more than 2^31 elements on the CPU (issue 13, "Reliability"; checked on CUDA in
issue 9's GPU run): fold, tile_add_, linear, bat_weight and bat_linear give, on the rows or
columns of a huge tensor around element 2^31 and at its end, exactly what they give on that slice
alone. A kernel that indexed with 32-bit integers would wrap there and read or write the wrong
elements. With dropout the mask is position dependent, so the huge fold is compared with the
float64 reference and the documented Philox mask of those rows instead.

The CUDA kernels that came after issue 9's GPU run (the warp-per-row fold and 2-D tile_add, and
the split-bf16 products of issue 11) and the other kernel choices get the same checks on the GPU
(`test_cuda_*`, where a GPU is visible; seconds there).

bf16 keeps each big tensor at 4 GiB. Each test peaks at about 8-9 GiB (checked: it asks for 6 or
10 GiB of available memory and is skipped, saying so, with less; this project's CI machines have
24 GiB); the file takes one to two minutes on two cores.
"""
import gc

import pytest
import torch

from conftest import needs_gpu
from reference import F64, fold_ref, philox_mask, split_bf16_ref, tile_add_ref

ops = torch.ops.miss
BIG = 2**31
# Several GiB each: under `--dist loadgroup` (scripts/gpu_check.sh, a worker per core) one worker
# runs them one after the other instead of many at once.
pytestmark = pytest.mark.xdist_group("large_tensors")
GIB = 2**30


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def needs(gib: float, device: str = "cpu"):
    """Skips, saying so, unless `device` (the host's memory, or the GPU's) has gib GiB free."""
    gc.collect()
    have = available_bytes() if device == "cpu" else torch.cuda.mem_get_info()[0]
    if have < gib * GIB:
        pytest.skip(f"needs {gib} GiB of free {device} memory, {have / GIB:.1f} GiB available")


def big_rows(cols: int) -> int:
    """Rows so that rows * cols > 2^31, with a few to spare."""
    return BIG // cols + 5


def tile_rows(cols: int, period: int) -> int:
    """Rows beyond 2^31 elements, a multiple of `period` at least 2 periods past the row that
    crosses 2^31: windows of whole periods around 2^31 and at the very end are then distinct, and
    the last one ends at the last row."""
    rows = big_rows(cols) + 2 * period
    return rows + (-rows) % period


def row_windows(rows: int, cols: int, width: int = 6):
    """Row ranges around element 2^31 and at the end."""
    cross = BIG // cols
    return [(0, width), (cross - width // 2, cross + width // 2), (rows - width, rows)]


def random_rows(x: torch.Tensor, windows) -> None:
    """Random values in the windows (the rest stays constant: filling 4 GiB with randn is slow)."""
    for a, b in windows:
        x[a:b] = torch.randn(b - a, x.shape[1], dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("cols,r", [(64, 16), (37, 5)])
def test_fold_over_2_31_elements(cols, r):
    needs(6)
    rows = big_rows(cols)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16)
    windows = row_windows(rows, cols)
    random_rows(x, windows)
    assert x.numel() > BIG
    s = ops.fold(x, r, 0.0, None, None)
    for a, b in windows:
        assert torch.equal(s[a:b], ops.fold(x[a:b], r, 0.0, None, None)), (a, b)


def test_fold_one_row_over_2_31_elements():
    # Zeros but around element 2^31 and at both ends: the sums are then exact enough in fp32
    # that only an indexing error could change them (a long row of non-zeros would measure fp32
    # accumulation instead, which is the op's documented precision).
    needs(6)
    n = BIG + 100_003
    x = torch.zeros(1, n, dtype=torch.bfloat16)
    spots = [torch.arange(0, 1000), torch.arange(BIG - 500, BIG + 500), torch.arange(n - 1000, n)]   # disjoint
    for idx in spots:
        x[0, idx] = torch.randn(len(idx), dtype=torch.bfloat16)
    s = ops.fold(x, 7, 0.0, None, torch.float32)
    idx = torch.cat(spots)
    expected = torch.zeros(7, dtype=F64).index_add_(0, idx % 7, x[0, idx].to(F64))
    torch.testing.assert_close(s[0].to(F64), expected, rtol=1e-5, atol=1e-5)


def check_fold_with_dropout(device: str) -> None:
    """fold with dropout on a huge bf16 x: the rows around element 2^31 and at the end against the
    float64 reference with the documented Philox mask of those rows (the mask depends on the row)."""
    cols, r, p, seed, offset = 64, 16, 0.3, 12345, 678
    rows = big_rows(cols)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16, device=device)
    windows = row_windows(rows, cols, width=4)
    random_rows(x, windows)
    key = torch.tensor([seed, offset], dtype=torch.int64, device=device)
    s = ops.fold(x, r, p, key, torch.float32)
    for a, b in windows:
        mask = philox_mask(seed, offset, b - a, cols, p, first_row=a)
        expected = fold_ref(x[a:b].cpu().to(F64), r, mask=mask, p=p)
        torch.testing.assert_close(s[a:b].cpu().to(F64), expected, rtol=1e-5, atol=1e-5)


def test_fold_with_dropout_over_2_31_elements():
    needs(6)
    check_fold_with_dropout("cpu")


def check_periodic_tile_add(device: str):
    """tile_add_ of a 5-row source into a huge bf16 out: windows of whole periods around element
    2^31 and at the end equal tile_add_ on those rows alone. Returns (out, windows)."""
    cols, period = 64, 5
    rows = tile_rows(cols, period)
    out = torch.full((rows, cols), 1.0, dtype=torch.bfloat16, device=device)
    starts = [0, BIG // cols - period, rows - 2 * period]
    windows = [(a - a % period, a - a % period + 2 * period) for a in starts]   # start at multiples of the period
    random_rows(out, windows)
    before = {w: out[w[0]:w[1]].clone() for w in windows}
    src = torch.randn(period, 16, dtype=torch.bfloat16, device=device)
    ops.tile_add_(out, src, 0.5, 0.0, None)
    assert len(before) == 3 and max(b for _, b in before) == rows
    for (a, b), old in before.items():
        expected = old.clone()
        ops.tile_add_(expected, src, 0.5, 0.0, None)
        assert torch.equal(out[a:b], expected), (a, b)
    return out, windows


def test_tile_add_over_2_31_elements():
    needs(6)
    check_periodic_tile_add("cpu")


def test_linear_over_2_31_elements():
    # out_features = 16 keeps the peak near 8 GiB: x (4 GiB), s in fp32 (1 GiB), the fp32 S @ D
    # (2 GiB) and y (1 GiB). x is the tensor with more than 2^31 elements.
    needs(10)
    cols, out_features, r = 64, 16, 8
    rows = big_rows(cols)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16)
    windows = row_windows(rows, cols)
    random_rows(x, windows)
    w = torch.randn(out_features, cols, dtype=torch.bfloat16)
    b = torch.randn(out_features, dtype=torch.bfloat16)
    block = torch.randn(r, out_features)
    y = ops.linear(x, w, b, block, 0.0, None)
    for a, bb in windows:
        assert torch.equal(y[a:bb], ops.linear(x[a:bb], w, b, block, 0.0, None)), (a, bb)


def test_bat_over_2_31_elements():
    needs(10)
    r, in_features = 2, 65536
    out_features = (BIG // in_features + 64) // r * r
    w = torch.full((out_features, in_features), 0.5, dtype=torch.bfloat16)
    assert w.numel() > BIG
    windows = [(a - a % r, bb - bb % r) for a, bb in row_windows(out_features, in_features, width=8)]
    random_rows(w, windows)
    block = 0.1 * torch.randn(out_features // r, r, r, dtype=torch.bfloat16)
    w2 = ops.bat_weight(w, block, None)
    for a, bb in windows:
        assert torch.equal(w2[a:bb], ops.bat_weight(w[a:bb], block[a // r:bb // r], None)), (a, bb)
    del w2
    gc.collect()
    x = torch.randn(3, in_features, dtype=torch.bfloat16)
    bias = torch.randn(out_features, dtype=torch.bfloat16)
    y = ops.bat_linear(x, w, bias, block, torch.bfloat16)
    for a, bb in windows:
        expected = ops.bat_linear(x, w[a:bb], bias[a:bb], block[a // r:bb // r], torch.bfloat16)
        torch.testing.assert_close(y[:, a:bb], expected)     # the GEMM may block differently


def check_bank_ops(device: str) -> None:
    """bank_fold, its backward and bank_add on bf16 tensors of more than 2^31 elements: the rows
    around element 2^31 and at the end equal the ops on those rows alone (a mutation test,
    2026-12-06: a 32-bit row offset in the CPU bank_fold passed every other test). Three slots and
    rows cycling through them and no adapter, so that each row's slot, rank and period take part
    (no dropout: its mask is keyed by the row's number, which a window alone does not keep)."""
    cols, max_r = 64, 16
    rows = big_rows(cols)
    windows = row_windows(rows, cols)
    index = (torch.arange(rows, device=device) % 4 - 1).to(torch.int64)  # -1 (no adapter), 0, 1, 2
    ranks = torch.tensor([16, 8, 4], dtype=torch.int64, device=device)
    periods = torch.tensor([64, 16, 8], dtype=torch.int64, device=device)
    bank = torch.randn(3, max_r, cols, device=device)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16, device=device)
    random_rows(x, windows)
    assert x.numel() > BIG
    s = ops.bank_fold(x, index, ranks, max_r, None, None, torch.float32)
    for a, b in windows:
        assert torch.equal(s[a:b], ops.bank_fold(x[a:b], index[a:b], ranks, max_r, None, None, torch.float32)), (a, b)
    del x
    gc.collect()
    grad = torch.zeros(rows, max_r, device=device)
    random_rows(grad, windows)
    gx = ops.bank_fold_backward(grad, index, ranks, cols, None, None, torch.bfloat16)
    assert gx.numel() > BIG
    for a, b in windows:
        assert torch.equal(gx[a:b], ops.bank_fold_backward(grad[a:b], index[a:b], ranks, cols, None, None,
                                                           torch.bfloat16)), (a, b)
    del gx, grad
    gc.collect()
    y = torch.full((rows, cols), 1.0, dtype=torch.bfloat16, device=device)
    random_rows(y, windows)
    before = {w: y[w[0]:w[1]].clone() for w in windows}
    ops.bank_add_(y, s, bank, ranks, periods, index, True)
    for (a, b), old in before.items():
        expected = old.clone()
        ops.bank_add_(expected, s[a:b], bank, ranks, periods, index[a:b], True)
        assert torch.equal(y[a:b], expected), (a, b)


def test_bank_ops_over_2_31_elements():
    needs(10)
    check_bank_ops("cpu")


# ---------------------------------------------------------------------------------------------
# CUDA: every kernel choice (MISS_EXT_FOLD_KERNEL, MISS_EXT_TILE_ADD_KERNEL, MISS_EXT_GEMM), where a
# GPU is visible; device memory, so the host's 24 GiB do not matter.



@pytest.fixture(autouse=True)
def release_device_memory():
    """Each test's GiBs go back to the device after it: the GPU check runs the suite in 8 xdist
    workers sharing one GPU, and a worker's caching allocator would otherwise keep them."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@needs_gpu
def test_cuda_bank_ops_over_2_31_elements():
    needs(10, "cuda")
    check_bank_ops("cuda")


@needs_gpu
@pytest.mark.parametrize("kernel", ["columns", "rows", "warp"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_fold_kernels_over_2_31_elements(kernel, p, monkeypatch):
    """Each CUDA fold kernel on a bf16 x of more than 2^31 elements: the rows around element 2^31
    and at the end equal that kernel on those rows alone (no dropout), or the float64 reference with
    the documented Philox mask of those rows (dropout; the mask depends on the row)."""
    monkeypatch.setenv("MISS_EXT_FOLD_KERNEL", kernel)
    needs(8, "cuda")
    if p:
        check_fold_with_dropout("cuda")
        return
    cols, r = 64, 16
    rows = big_rows(cols)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16, device="cuda")
    windows = row_windows(rows, cols, width=4)
    random_rows(x, windows)
    s = ops.fold(x, r, 0.0, None, torch.float32)
    for a, b in windows:
        assert torch.equal(s[a:b], ops.fold(x[a:b], r, 0.0, None, torch.float32)), (kernel, a, b)


@needs_gpu
@pytest.mark.parametrize("kernel", ["flat", "grid2d"])
def test_cuda_tile_add_kernels_over_2_31_elements(kernel, monkeypatch):
    """Each CUDA tile_add kernel on a bf16 out of more than 2^31 elements, with a source of 5 rows
    tiled along out's rows (windows start at multiples of 5) and with a per-row source and dropout
    (against the float64 reference with the documented mask of those rows)."""
    monkeypatch.setenv("MISS_EXT_TILE_ADD_KERNEL", kernel)
    needs(12, "cuda")
    out, windows = check_periodic_tile_add("cuda")
    rows, cols = out.shape
    q, seed, offset, p = 16, 4321, 99, 0.25
    # a source row per out row, with dropout
    per_row = torch.full((rows, q), 0.25, dtype=torch.bfloat16, device="cuda")
    random_rows(per_row, windows)
    before = {w: out[w[0]:w[1]].clone() for w in windows}
    ops.tile_add_(out, per_row, -1.5, p, torch.tensor([seed, offset], dtype=torch.int64, device="cuda"))
    for (a, b), old in before.items():
        mask = philox_mask(seed, offset, b - a, cols, p, first_row=a)
        expected = tile_add_ref(old.cpu(), per_row[a:b].cpu(), -1.5, mask=mask, p=p)
        torch.testing.assert_close(out[a:b].cpu().to(F64), expected, rtol=8e-3, atol=8e-3)


@needs_gpu
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_split_bf16_over_2_31_elements(dim):
    """miss.split_bf16 (the part cutter of the split-bf16 products) on a float32 t of more than 2^31
    elements into three blocks (6 * 2^31 bytes out): the rows around element 2^31 and at the end, in
    every block, equal the definition on those rows alone, bit for bit."""
    needs(24, "cuda")
    cols, order = 64, [0, 1, 2]
    rows = big_rows(cols)
    t = torch.full((rows, cols), 0.1, device="cuda")  # 0.1: three non-zero parts
    windows = row_windows(rows, cols)
    random_rows(t, windows)
    out = ops.split_bf16(t, 3, order, dim)
    for a, b in windows:
        want = split_bf16_ref(t[a:b].cpu(), 3, order, dim)
        got = torch.cat([out[k * rows + a:k * rows + b] for k in range(3)]) if dim == 0 else out[a:b]
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), (dim, a, b)


@needs_gpu
@pytest.mark.parametrize("gemm", ["fp32", "split"])
def test_cuda_linear_over_2_31_elements(gemm, monkeypatch):
    """miss.linear on CUDA with either adapter product (fp32, or issue 11's split-bf16 tensor-core
    GEMMs) on a bf16 x of more than 2^31 elements, forward and backward: the rows around element
    2^31 and at the end match the same call on those rows alone (GEMMs may block differently for
    another row count, so within bf16 rounding rather than bit for bit)."""
    monkeypatch.setenv("MISS_EXT_GEMM", gemm)
    needs(24, "cuda")
    cols, out_features, r = 64, 16, 8
    rows = big_rows(cols)
    x = torch.full((rows, cols), 0.5, dtype=torch.bfloat16, device="cuda")
    windows = row_windows(rows, cols)
    random_rows(x, windows)
    w = torch.randn(out_features, cols, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(out_features, dtype=torch.bfloat16, device="cuda")
    block = torch.randn(r, out_features, device="cuda", requires_grad=True)
    x.requires_grad_(True)
    y = ops.linear(x, w, b, block, 0.0, None)
    g = torch.zeros_like(y)
    random_rows(g, windows)
    y.backward(g)
    for a, bb in windows:
        xs = x.detach()[a:bb].clone().requires_grad_(True)
        ys = ops.linear(xs, w, b, block, 0.0, None)
        torch.testing.assert_close(y[a:bb], ys, rtol=1.6e-2, atol=1e-2)
        (dx,) = torch.autograd.grad(ys, xs, g[a:bb])
        torch.testing.assert_close(x.grad[a:bb], dx, rtol=1.6e-2, atol=1e-2)
