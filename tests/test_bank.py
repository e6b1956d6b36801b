"""miss.bank_add: a bank of MiSS adapters applied one adapter per row (issue 14, the op layer).

Checked against an independent float64 reference that runs every row with its own adapter from
x itself (fold at the adapter's own r, tile of its own block: tests/reference.py), so the op's
refolding of one fold at rank R (r | R) is tested too, not assumed (the bank layers give it
miss.bank_fold's per-row fold instead: tests/test_bank_fold.py). Covered: 1 to 16
adapters, mixed r dividing R, default and mini mixed, rows without an adapter, an empty batch,
3-D inputs, strided inputs, float32/float64 and a bf16 output with an fp32 bank, gradients per
adapter (each slot's gradient from its rows only, zero padding), opcheck, gradcheck, errors, and
torch.compile without recompilation when the bank's contents change.
"""
import re

import pytest
import torch

from conftest import DEVICES, poison, rand
from reference import F64, fold_ref, tile_block

ops = torch.ops.miss


def make_bank(blocks, r_cap, q_cap, dtype=torch.float32, device="cpu", pad=0.0):
    """(bank (N, r_cap, q_cap), ranks, periods) holding `blocks` (each (r_a, q_a)), padded with
    `pad` (NaN: the kernels must not read the padding)."""
    bank = torch.full((len(blocks), r_cap, q_cap), pad, dtype=dtype, device=device)
    for a, b in enumerate(blocks):
        bank[a, :b.shape[0], :b.shape[1]] = b
    ranks = torch.tensor([b.shape[0] for b in blocks], dtype=torch.int64, device=device)
    periods = torch.tensor([b.shape[1] for b in blocks], dtype=torch.int64, device=device)
    return bank, ranks, periods


def bank_ref(y, x, blocks, index):
    """Row t: y[t] + fold_ref(x[t], r_a) @ tile(block_a, out) with a = index[t]; y for a < 0. float64."""
    out = y.shape[-1]
    y2, x2, idx = y.reshape(-1, out).to(F64), x.reshape(-1, x.shape[-1]).to(F64), index.reshape(-1)
    rows = []
    for t in range(y2.shape[0]):
        a = int(idx[t])
        if a < 0:
            rows.append(y2[t])
        else:
            b = blocks[a].to(F64)
            rows.append(y2[t] + fold_ref(x2[t:t + 1], b.shape[0])[0] @ tile_block(b, out))
    return (torch.stack(rows) if rows else y2.clone()).reshape(y.shape)


def random_blocks(n, R, out, seed=0, device="cpu"):
    """n blocks cycling through ranks R, R/2, R/4 (at least 1) and modes default/mini (mini_r:
    divisors of out)."""
    gen = torch.Generator().manual_seed(seed)
    minis = [d for d in range(2, out) if out % d == 0] or [1]
    blocks = []
    for a in range(n):
        r = [R, R // 2, R // 4][a % 3] or 1
        q = out if a % 2 == 0 else minis[(a // 2) % len(minis)]
        blocks.append(torch.randn(r, q, generator=gen).to(device))
    return blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("shape", [(37,), (0,), (3, 5)], ids=["rows", "empty", "3d"])
def test_bank_add_matches_per_row_reference(device, n, shape):
    R, in_f, out = 8, 29, 12                      # in % R != 0: a partial last shard
    blocks = random_blocks(n, R, out, device=device)
    bank, ranks, periods = make_bank(blocks, R, out, device=device)
    x = torch.randn(*shape, in_f, device=device)
    y = torch.randn(*shape, out, device=device)
    index = torch.randint(-1, n, shape, device=device)
    s = ops.fold(x, R, 0.0, None, torch.float32)
    got = ops.bank_add(y, s, bank, ranks, periods, index)
    torch.testing.assert_close(got.to(F64), bank_ref(y, x, blocks, index), rtol=1e-5, atol=1e-5)
    inplace = y.clone()
    ops.bank_add_(inplace, s, bank, ranks, periods, index)
    assert torch.equal(inplace, got)
    assert torch.equal(got[index < 0], y[index < 0])          # rows without an adapter: the base only


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_dtypes(device):
    R, in_f, out, n = 16, 64, 40, 4                    # out = 2 * 16 + 8: vector columns and a tail
    blocks = random_blocks(n, R, out, device=device)
    x = torch.randn(50, in_f, device=device)
    index = torch.randint(-1, n, (50,), device=device)
    for y_dtype, bank_dtype in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16)]:
        bank, ranks, periods = make_bank(blocks, R, out, dtype=bank_dtype, device=device)
        y = torch.randn(50, out, device=device).to(y_dtype)
        s = ops.fold(x.to(y_dtype), R, 0.0, None, bank_dtype)
        got = ops.bank_add(y, s, bank, ranks, periods, index)
        assert got.dtype == y_dtype
        ref = bank_ref(y, x.to(y_dtype), [b.to(bank_dtype) for b in blocks], index)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(y_dtype, 2e-2)
        torch.testing.assert_close(got.to(F64), ref, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_strided_inputs_and_poisoned_padding(device):
    """Non-contiguous y, s and index; NaN in every slot's padding must never be read."""
    R, out, n = 8, 12, 5
    blocks = random_blocks(n, R, out, device=device)
    bank, ranks, periods = make_bank(blocks, R + 3, out + 5, device=device)
    for a, b in enumerate(blocks):                     # poison the padding
        bank[a, b.shape[0]:, :] = float("nan")
        bank[a, :, b.shape[1]:] = float("nan")
    x = torch.randn(40, 2 * 20, device=device)[:, ::2]
    y = torch.randn(12, 40, device=device).t()       # (40, 12), not contiguous
    index = torch.randint(-1, n, (80,), device=device)[::2]
    s = ops.fold(x, R, 0.0, None, torch.float32)
    got = ops.bank_add(y, s, bank, ranks, periods, index)
    torch.testing.assert_close(got.to(F64), bank_ref(y, x, blocks, index), rtol=1e-5, atol=1e-5)
    inplace = y.clone().t().contiguous().t()
    ops.bank_add_(inplace, s, bank, ranks, periods, index)
    torch.testing.assert_close(inplace, got)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_gradients_per_adapter(device):
    """Gradients in x (through fold) and in every block equal the float64 reference's; a slot's
    gradient comes from its rows only (a slot without rows gets zero), and its padding gets zero."""
    R, in_f, out, n = 8, 21, 12, 6
    blocks = [b.to(F64).requires_grad_(True) for b in random_blocks(n, R, out, device=device)]
    bank, ranks, periods = make_bank([b.detach() for b in blocks], R, out, dtype=F64, device=device)
    bank.requires_grad_(True)
    x = torch.randn(30, in_f, dtype=F64, device=device, requires_grad=True)
    y = torch.randn(30, out, dtype=F64, device=device, requires_grad=True)
    index = torch.randint(-1, n - 1, (30,), device=device)   # slot n - 1 has no rows
    g = torch.randn(30, out, dtype=F64, device=device)
    got = ops.bank_add(y, ops.fold(x, R, 0.0, None, None), bank, ranks, periods, index)
    gx, gy, gbank = torch.autograd.grad(got, (x, y, bank), g)
    xr, yr = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    ref = bank_ref(yr, xr, blocks, index)
    rx, ry, *rblocks = torch.autograd.grad(ref, [xr, yr] + blocks, g, allow_unused=True)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gy, ry)
    for a, b in enumerate(blocks):
        r, q = b.shape
        expected = rblocks[a] if rblocks[a] is not None else torch.zeros_like(b)
        torch.testing.assert_close(gbank[a, :r, :q], expected)
        assert not gbank[a, r:].any() and not gbank[a, :, q:].any()
    assert not gbank[n - 1].any()


@pytest.mark.parametrize("device", DEVICES)
def test_bank_gradient_over_many_rows_is_as_accurate_as_a_gemm(device):
    """A slot's block gradient sums over all its rows: in one running float32 sum it was 37x less
    accurate than the GEMM a MissLinear (and PEFT) takes at 65536 rows (4.1e-6 vs 1.1e-7). Now the
    rows are summed in a cascade (CPU) or in two levels (CUDA)."""
    from miss_ext.bank import MissBankLinear
    torch.manual_seed(0)
    rows, i, o, r = 65536, 64, 32, 16
    bank = MissBankLinear(torch.nn.Linear(i, o), capacity=2, max_r=r).to(device)
    bank.add_adapter("a", r=r, block=0.1 * torch.randn(r, o))
    x = 5 + torch.randn(rows, i, device=device)
    g = 1 + torch.randn(rows, o, device=device)
    bank(x, bank.index_of(["a"] * rows)).backward(g)
    s = fold_ref(x, r)
    want = s.T @ g.double()
    ours = (bank.bank.grad[0, :r].double() - want).norm() / want.norm()
    gemm = (x.reshape(rows, -1, r).sum(1).T @ g - want).norm() / want.norm()
    assert ours <= 4 * gemm + 1e-9, f"bank gradient error {ours:.3g}, a float32 GEMM's {gemm:.3g}"


def long_output_grad_s_case(q, device="cpu"):
    """(g, s, bank, ranks, periods, index, error_of) for the grad_s accuracy checks: one slot of
    r = 4 and period q over out = 65536, same-signed terms (the hard case for a running sum).
    error_of(grad_s) is its relative error against float64; baseline is torch.sum's (float32)."""
    torch.manual_seed(0)
    rows, out, r = 8, 65536, 4
    block = 1 + 0.1 * torch.randn(r, q, device=device)
    bank, ranks, periods = make_bank([block], r, q, device=device)
    g = 1 + 0.1 * torch.randn(rows, out, device=device)
    s = torch.randn(rows, r, device=device)
    index = torch.zeros(rows, dtype=torch.int64, device=device)
    want = g.double().view(rows, out // q, q).sum(1) @ block.double().T

    def error_of(grad_s):
        return ((grad_s.double() - want).norm() / want.norm()).item()

    baseline = error_of((g.view(rows, out // q, q).sum(1)[:, None, :] * block[None]).sum(-1))
    return (g, s, bank, ranks, periods, index), error_of, baseline


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q", [65536, 1], ids=["default", "mini_r1"])
def test_gradient_of_s_over_a_long_output_is_as_accurate_as_torch(device, q):
    """grad_s[t, j] sums over the whole output row: G[t] . D[j] for a default slot (q = out terms),
    or the fold of G[t] over out / q copies for mini. The CPU kernel summed each in one running
    float32 sum: 3.5e-6 off where torch.sum is 4e-8 (and the CUDA kernel each lane's 2048 terms:
    1.5e-7, emulated). Now a cascade and blocked sums (CPU) and two-level lane sums (CUDA, also
    checked emulated in test_cuda_emulated.py): 6-7e-8 and 4e-8 measured."""
    args, error_of, baseline = long_output_grad_s_case(q, device)
    ours = error_of(ops.bank_add_backward(*args)[0])
    assert ours <= 2.5 * baseline, f"grad_s error {ours:.3g}, torch.sum's {baseline:.3g}"


def test_mini_block_gradient_is_as_accurate_as_miss_linears():
    """A mini slot's block gradient needs each row's G folded along out (gq: out / mini_r terms,
    4096 at mini_r = 1). That fold summed up to 64 terms in one running float32 sum (two levels of
    64 above), where MissLinear folds G in the 16-term cascade: the bank's float32 block gradient
    was 1.11-1.45x MissLinear's error against float64 (8 seeds), 0.81-1.01x with the cascade
    (common/shard_index.h, strided_sum). CPU only: the figures are the CPU's, and MissLinear's CUDA
    backward takes other kernels (the bank's CUDA kernel runs the same strided_sum)."""
    from miss_ext import MissLinear
    from miss_ext.bank import MissBankLinear
    ratios = []
    for seed in range(4):
        torch.manual_seed(seed)
        r, i, o, rows = 64, 512, 4096, 32
        weight, block = torch.randn(o, i) / i ** 0.5, 0.1 * torch.randn(r, 1)
        x, g = torch.randn(rows, i), torch.randn(rows, o)
        bank_grads, linear_grads = {}, {}
        for dtype in (F64, torch.float32):
            bank = MissBankLinear(torch.nn.Linear(i, o, bias=False).to(dtype), capacity=2, max_r=r)
            bank.base_layer.weight.data.copy_(weight)
            bank.add_adapter("a", r=r, mode="mini", mini_r=1, block=block.to(dtype))
            bank(x.to(dtype), bank.index_of(["a"] * rows)).backward(g.to(dtype))
            bank_grads[dtype] = bank.bank.grad[0, :r, :1].double()
            linear = MissLinear(torch.nn.Linear(i, o, bias=False).to(dtype), r=r, mode="mini", mini_r=1)
            linear.base_layer.weight.data.copy_(weight)
            linear.miss_block.data.copy_(block)
            linear(x.to(dtype)).backward(g.to(dtype))
            linear_grads[dtype] = linear.miss_block.grad.double()

        def error(grads):
            return ((grads[torch.float32] - grads[F64]).norm() / grads[F64].norm()).item()

        ratios.append(error(bank_grads) / error(linear_grads))
    assert sum(ratios) / len(ratios) <= 1.05, f"bank / MissLinear block gradient error ratios {ratios}"


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_gradcheck(device):
    R, out, n = 4, 6, 3
    blocks = random_blocks(n, R, out, device=device)
    bank, ranks, periods = make_bank(blocks, R, out, dtype=F64, device=device)
    s = torch.randn(7, R, dtype=F64, device=device, requires_grad=True)
    y = torch.randn(7, out, dtype=F64, device=device, requires_grad=True)
    bank.requires_grad_(True)
    index = torch.tensor([0, 1, -1, 2, 1, 0, 2], device=device)
    assert torch.autograd.gradcheck(lambda y, s, b: ops.bank_add(y, s, b, ranks, periods, index), (y, s, bank))


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_opcheck(device):
    R, out, n = 8, 12, 4
    blocks = random_blocks(n, R, out, device=device)
    bank, ranks, periods = make_bank(blocks, R, out, device=device)
    s = torch.randn(9, R, device=device, requires_grad=True)
    y = torch.randn(9, out, device=device)
    index = torch.tensor([0, 1, -1, 2, 3, 0, -1, 2, 1], device=device)
    torch.library.opcheck(ops.bank_add, (y, s, bank.requires_grad_(True), ranks, periods, index))
    torch.library.opcheck(ops.bank_add_, (y.clone(), s.detach(), bank.detach(), ranks, periods, index))
    torch.library.opcheck(ops.bank_add_backward, (torch.randn(9, out, device=device), s.detach(), bank.detach(),
                                                  ranks, periods, index))


def test_bank_add_double_backward_is_refused():
    R, out = 4, 6
    bank, ranks, periods = make_bank(random_blocks(2, R, out), R, out, dtype=F64)
    s = torch.randn(5, R, dtype=F64, requires_grad=True)
    y = torch.randn(5, out, dtype=F64)
    index = torch.tensor([0, 1, 1, -1, 0])
    out = ops.bank_add(y, s, bank, ranks, periods, index).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out, s, create_graph=True)
    (g,) = torch.autograd.grad(ops.bank_add(y, s, bank, ranks, periods, index).sum(), s)   # once is fine
    assert g.shape == s.shape


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_bad_input_raises_and_changes_nothing(device):
    """Shapes, dtypes and devices are refused on every device; the values of ranks, periods and
    ids on the CPU (CUDA checks those with device-side assertions, which need no host sync; the
    emulated kernels' test trips them). On CUDA a bank beyond the kernels' shared memory is refused."""
    R, out = 8, 12
    bank, ranks, periods = (t.to(device) for t in make_bank(random_blocks(3, R, out), R, out))
    y, s = torch.randn(4, out, device=device), torch.randn(4, R, device=device)
    index = torch.tensor([0, 1, 2, -1], device=device)
    before = y.clone()
    on = dict(device=device)
    cases = [
        (dict(index=torch.tensor([0, 1, 2], **on)), ValueError, "index must have y's leading sizes"),
        (dict(s=torch.randn(4, R, dtype=torch.float64, **on)), TypeError, "s dtype"),
        (dict(ranks=torch.tensor([8, 4, 2], dtype=torch.int32, **on)), TypeError, "ranks must be int64"),
        (dict(ranks=torch.tensor([8, 4], **on)), ValueError, "ranks must have shape (slots,) = (3,)"),
        (dict(bank=bank[0]), ValueError, "bank must have shape"),
        (dict(s=torch.randn(5, R, **on)), ValueError, "s with y's leading sizes"),
    ]
    if device == "cpu":
        cases += [
            (dict(ranks=torch.tensor([8, 3, 2])), ValueError, "ranks[1]=3 (used by row 1) does not divide"),
            (dict(ranks=torch.tensor([8, 0, 2])), ValueError, "ranks[1]=0"),
            (dict(ranks=torch.tensor([8, 16, 2])), ValueError, "ranks[1]=16"),
            (dict(periods=torch.tensor([12, 5, 12])), ValueError, "periods[1]=5"),
            (dict(index=torch.tensor([0, 3, 2, -1])), ValueError, "index[1]=3"),
        ]
    else:
        cases += [
            (dict(index=index.cpu()), ValueError, "y and index must be on the same device"),
            (dict(bank=torch.zeros(3, 12289, out, **on)), ValueError, "r_cap up to 12288 for this dtype, got a bank with r_cap=12289"),
        ]
    for change, exc, text in cases:
        args = dict(y=y, s=s, bank=bank, ranks=ranks, periods=periods, index=index)
        args.update(change)
        with pytest.raises(exc, match=re.escape(text)):
            ops.bank_add_(args["y"], args["s"], args["bank"], args["ranks"], args["periods"], args["index"])
        assert torch.equal(y, before)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_refuses_inputs_in_y_memory(device):
    """The kernels read s and the bank while they write y: an input overlapping y's memory (or a
    view of its storage whose overlap the layout cannot rule out) is refused (y as a view of the
    bank was off by 3.4 before), and neither y nor the input changes. Views of one storage that
    do not overlap, as Inductor's memory planning makes, are accepted and give the same result."""
    R, out = 2, 12
    bank, ranks, periods = (t.to(device) for t in make_bank(random_blocks(2, R, out), R, out))
    index = torch.tensor([0, 1], device=device)
    y = torch.randn(2, out, device=device)
    for y_, s_, bank_, name in ((bank[0], torch.randn(2, R, device=device), bank, "bank"),
                                (y, y[:, :R], bank, "s")):
        before_y, before_s, before_bank = y_.clone(), s_.clone(), bank_.clone()
        with pytest.raises(ValueError, match=f"bank_add_ {name} (overlaps y in memory|is a view of y's storage)"):
            ops.bank_add_(y_, s_, bank_, ranks, periods, index)
        assert torch.equal(y_, before_y) and torch.equal(s_, before_s) and torch.equal(bank_, before_bank)
    # One byte pool holding y, s and the int64 index side by side, without overlap.
    pool = torch.zeros(2 * out * 4 + 2 * R * 4 + 2 * 8, dtype=torch.uint8, device=device)
    y_pool = pool[:2 * out * 4].view(torch.float32).view(2, out)
    s_pool = pool[2 * out * 4:2 * out * 4 + 2 * R * 4].view(torch.float32).view(2, R)
    index_pool = pool[2 * out * 4 + 2 * R * 4:].view(torch.int64)
    y_pool.copy_(y), s_pool.copy_(torch.randn(2, R, device=device)), index_pool.copy_(index)
    want = ops.bank_add(y_pool.clone(), s_pool.clone(), bank, ranks, periods, index_pool.clone())
    ops.bank_add_(y_pool, s_pool, bank, ranks, periods, index_pool)
    assert torch.equal(y_pool, want)
    # Views that are not dense (ATen's overlap test gives up on them) but lie beside y in the pool:
    # s every other column of a wider block, the index one id broadcast over the rows.
    pool = torch.zeros(2 * out * 4 + 2 * 2 * R * 4 + 8, dtype=torch.uint8, device=device)
    y_pool = pool[:2 * out * 4].view(torch.float32).view(2, out)
    s_pool = pool[2 * out * 4:-8].view(torch.float32).view(2, 2 * R)[:, ::2]
    index_pool = pool[-8:].view(torch.int64).expand(2)
    y_pool.copy_(y), s_pool.copy_(torch.randn(2, R, device=device)), index_pool[:1].fill_(1)
    want = ops.bank_add(y_pool.clone(), s_pool.clone(), bank, ranks, periods, index_pool.clone())
    ops.bank_add_(y_pool, s_pool, bank, ranks, periods, index_pool)
    assert torch.equal(y_pool, want) and not torch.equal(want, y)
    # The functional op writes a new tensor: the same inputs are fine there.
    got = ops.bank_add(bank[0], torch.ones(2, R, device=device), bank, ranks, periods, index)
    want = ops.bank_add(bank[0].clone(), torch.ones(2, R, device=device), bank.clone(), ranks, periods, index)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_with_an_empty_bank_checks_the_ids(device):
    """A bank of 0 slots: negative ids keep y, forward and backward (on CUDA the block-gradient
    launch, which would have a 0-block grid, is skipped); on the CPU a row naming a slot is
    refused (it used to keep y silently; CUDA checks ids with a device-side assertion)."""
    y, s = torch.randn(3, 4, device=device), torch.randn(3, 2, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    bank = torch.zeros(0, 2, 4, device=device)
    negative = torch.tensor([-1, -1, -1], device=device)
    assert torch.equal(ops.bank_add(y, s, bank, none, none, negative), y)
    grad_s, grad_bank = ops.bank_add_backward(torch.ones(3, 4, device=device), s, bank, none, none, negative)
    assert grad_bank.shape == (0, 2, 4) and torch.equal(grad_s, torch.zeros_like(s))
    if device != "cpu":
        return
    for index in (torch.tensor([-1, 5, -1]), torch.tensor([0, -1, -1])):
        with pytest.raises(ValueError, match=r"names no slot of a bank with 0 slots"):
            ops.bank_add(y, s, bank, none, none, index)
        with pytest.raises(ValueError, match=r"names no slot of a bank with 0 slots"):
            ops.bank_add_backward(torch.ones(3, 4), s, bank, none, none, index)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_of_rows_without_columns_checks_the_ids(device):
    """y (3, 0) (out_features 0) launches no kernel; its rows still name slots, ranks and periods,
    checked on the host as a kernel checks them, on every device (a fuzz of the ops, 2026-12-06:
    bank_add, bank_add_ and bank_add_backward accepted them). A period reads no column there: any
    >= 0 (a layer of no outputs has q_cap 0 and periods 0, or mini_r for a mini slot; a review
    refused the latter in the first version, tests/test_errors.py)."""
    on = dict(device=device)
    s, bank = torch.randn(3, 3, **on), torch.randn(2, 3, 0, **on)
    ranks, periods = torch.tensor([3, 1], **on), torch.tensor([0, 2], **on)
    good, bad = torch.tensor([0, 1, -1], **on), torch.tensor([0, 2, 1], **on)
    y = torch.randn(3, 0, **on)
    assert ops.bank_add(y, s, bank, ranks, periods, good).shape == (3, 0)
    cases = [(dict(index=bad), r"index\[1\]=2 names no slot of a bank with 2 slots"),
             (dict(ranks=torch.tensor([7, 1], **on)), r"ranks\[0\]=7 \(used by row 0\) must be in \[1, min\(r_cap=3"),
             (dict(periods=torch.tensor([0, -1], **on)), r"periods\[1\]=-1 \(used by row 1\) must be >= 0$")]
    for change, text in cases:
        args = dict(dict(s=s, bank=bank, ranks=ranks, periods=periods, index=good), **change)
        call = (args["s"], args["bank"], args["ranks"], args["periods"], args["index"])
        with pytest.raises(ValueError, match=text):
            ops.bank_add(y, *call)
        with pytest.raises(ValueError, match=text):
            ops.bank_add_(y, *call)
        with pytest.raises(ValueError, match=text):
            ops.bank_add_backward(torch.randn(3, 0, **on), *call)
    # No rows: nothing names a slot.
    assert ops.bank_add(y[:0], s[:0], bank, ranks, periods, bad[:0]).shape == (0, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r_cap, q_cap", [(0, 4), (2, 0)])
def test_bank_add_backward_with_empty_blocks(device, r_cap, q_cap):
    """Slots whose blocks have no rows or no columns (r_cap or q_cap 0) and rows naming no slot:
    zero gradients (on CUDA the block-gradient launch, which would have a 0-block grid, is
    skipped; found by tests/test_cuda_emulated.py)."""
    s = torch.randn(3, 2, device=device)
    ranks = periods = torch.ones(2, dtype=torch.int64, device=device)
    bank = torch.zeros(2, r_cap, q_cap, device=device)
    index = torch.tensor([-1, -1, -1], device=device)
    grad_s, grad_bank = ops.bank_add_backward(torch.ones(3, 4, device=device), s, bank, ranks, periods, index)
    assert torch.equal(grad_s, torch.zeros_like(s)) and torch.equal(grad_bank, torch.zeros_like(bank))


def test_bank_add_compiles_once_while_the_bank_changes():
    """fullgraph, and no recompilation when slots are filled, emptied or change r/mode within the
    bank's capacity: ranks, periods and index are tensors, not ints."""
    torch._dynamo.reset()
    calls = {"n": 0}

    def backend(gm, example_inputs):
        calls["n"] += 1
        return gm

    @torch.compile(fullgraph=True, backend=backend)
    def f(y, x, bank, ranks, periods, index):
        return ops.bank_add(y, ops.fold(x, 8, 0.0, None, torch.float32), bank, ranks, periods, index)

    out = 12
    for seed, n_used in [(0, 2), (1, 4), (2, 1)]:
        blocks = random_blocks(n_used, 8, out, seed=seed)
        bank, ranks, periods = make_bank(blocks + [torch.zeros(1, 1)] * (4 - n_used), 8, out)
        x, y = torch.randn(10, 20), torch.randn(10, out)
        index = torch.randint(-1, n_used, (10,))
        got = f(y, x, bank, ranks, periods, index)
        torch.testing.assert_close(got.to(F64), bank_ref(y, x, blocks, index), rtol=1e-5, atol=1e-5)
    assert calls["n"] == 1
    torch._dynamo.reset()


def test_bank_add_poisoned_output_is_fully_written():
    """The functional op writes every element (rows without an adapter are copies of y)."""
    R, out = 8, 12
    bank, ranks, periods = make_bank(random_blocks(2, R, out), R, out)
    y, s = torch.randn(6, out), torch.randn(6, R)
    index = torch.tensor([-1, 0, 1, -1, 1, 0])
    got = ops.bank_add(y, s, bank, ranks, periods, index)
    assert torch.isfinite(got).all()
    poisoned = poison(torch.empty(6, out))
    poisoned.copy_(y)
    ops.bank_add_(poisoned, s, bank, ranks, periods, index)
    assert torch.equal(poisoned, got)


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only build of torch: no fake CUDA")
def test_bank_add_traces_on_fake_cuda():
    """Without a GPU: the meta kernels give the CUDA results' shapes, dtypes and devices, and
    torch.export traces the op on (fake) CUDA inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.empty(3, 6, 12, device="cuda", dtype=torch.bfloat16)
        s = torch.empty(3, 6, 8, device="cuda")
        bank = torch.empty(4, 8, 12, device="cuda")
        ranks = torch.empty(4, dtype=torch.int64, device="cuda")
        index = torch.empty(3, 6, dtype=torch.int64, device="cuda")
        out = ops.bank_add(y, s, bank, ranks, ranks, index)
        assert (out.shape, out.dtype, out.device.type) == (y.shape, torch.bfloat16, "cuda")
        gs, gb = ops.bank_add_backward(y, s, bank, ranks, ranks, index)
        assert (gs.shape, gs.dtype, gb.shape, gb.dtype) == (s.shape, torch.float32, bank.shape, torch.float32)

    class Mixed(torch.nn.Module):
        def forward(self, y, x, bank, ranks, periods, index):
            return ops.bank_add(y, ops.fold(x, 8, 0.0, None, torch.float32), bank, ranks, periods, index)

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        args = (torch.empty(5, 12, device="cuda"), torch.empty(5, 20, device="cuda"), torch.empty(4, 8, 12, device="cuda"),
                torch.empty(4, dtype=torch.int64, device="cuda"), torch.empty(4, dtype=torch.int64, device="cuda"),
                torch.empty(5, dtype=torch.int64, device="cuda"))
        ep = torch.export.export(Mixed(), args, strict=False)
    assert any(str(n.target) == "miss.bank_add.default" for n in ep.graph.nodes)


def test_the_python_bank_add_wrappers_pass_per_row_fold_on():
    """miss_ext.ops.bank_add / bank_add_ hand per_row_fold to the op: without it, a rank that does not
    divide the fold width R is refused (a fold at R cannot give the fold at that rank, so the term
    would be wrong); with it the same call is taken."""
    from miss_ext import ops as wrappers

    y, bank = torch.zeros(2, 6), torch.randn(1, 3, 6)
    ranks, periods, index = torch.tensor([3]), torch.tensor([6]), torch.tensor([0, 0])
    s = torch.randn(2, 4)  # R = 4: rank 3 does not divide it
    for call in (wrappers.bank_add, wrappers.bank_add_):
        with pytest.raises(ValueError, match=r"ranks\[0\]=3 .*does not divide"):
            call(y.clone(), s, bank, ranks, periods, index)
    out = wrappers.bank_add(y, s, bank, ranks, periods, index, per_row_fold=True)
    inplace = y.clone()
    wrappers.bank_add_(inplace, s, bank, ranks, periods, index, per_row_fold=True)
    torch.testing.assert_close(out, inplace, rtol=0, atol=0)


# ---- from a mutation test of the host-side C++ (2026-12-06): each kills a mutant that passed the suite ----

# M09 (checks.cpp check_bank_values: rank <= min(r_cap, R) weakened to rank <= r_cap). With
# per_row_fold the divisibility check is off, so only this bound stops a rank above s's width
# (the kernel would read s past its row).
def test_bank_add_per_row_fold_refuses_a_rank_above_the_fold_width():
    y, s, bank = rand(2, 4), rand(2, 2), rand(1, 4, 4)
    ranks, periods, index = torch.tensor([4]), torch.tensor([4]), torch.tensor([0, 0])
    msg = r"ranks\[0\]=4 \(used by row 0\) must be in \[1, min\(r_cap=4, s.shape\[-1\]=2\)\]"
    for call in (lambda: ops.bank_add(y, s, bank, ranks, periods, index, True),
                 lambda: ops.bank_add_(y.clone(), s, bank, ranks, periods, index, True),
                 lambda: ops.bank_add_backward(y, s, bank, ranks, periods, index, True)):
        with pytest.raises(ValueError, match=msg):
            call()
