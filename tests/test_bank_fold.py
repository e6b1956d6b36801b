"""miss.bank_fold: the fold of a mixed-adapter batch, each row at its own adapter's rank and
dropout rate (issue 14; MissBankLinear and the accelerated PEFT adapter_names= call it).

Checked against an independent float64 reference (tests/reference.py: fold_ref per row at the
row's rank, the mask recovered through tile_add_ for the call's key at the row's rate), and
against miss.fold row by row. Covered: ranks dividing max_r and not, r > in, in % r != 0, rows
without adapter, an empty batch, 3-D inputs, strided and misaligned inputs, every dtype pair,
dropout per slot (0 < p < 1, p = 1, p = 0 beside others), the adjoint (gradcheck, the backward
against the reference), opcheck, errors, torch.compile without recompilation when ranks and rates
change, and fake-CUDA tracing. The CUDA kernels are compared with this op in
tests/test_cuda_emulated.py.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import miss_ext
from conftest import DEVICES, poison_heap
from reference import F64, fold_error_scale, fold_ref, fold_within, recover_mask
from test_bank import bank_ref, make_bank

ops = torch.ops.miss
# slot ranks: dividing MAX_R (8, 4, 1) and not (3, 5, 7); IN = 6 < 7 and 8 (r > in), IN % r != 0
MAX_R, IN = 8, 6
RANKS = [8, 3, 5, 4, 1, 7, 0]   # the last slot is empty (rank 0): no row names it
RATES = [0.0, 0.3, 1.0, 0.5, 0.25, 0.1, 0.0]


def bank_fold_ref(x, index, ranks, max_r, rates=None, key=None):
    """Row t: fold_ref(dropout_{p_a}(x[t]), r_a) padded with zeros to max_r, a = index[t]; zeros for
    a < 0. float64; the mask of p_a recovered for the call's key (reference.recover_mask)."""
    x2, idx = x.reshape(-1, x.shape[-1]).to(F64), index.reshape(-1)
    masks = {}
    rows = []
    for t in range(x2.shape[0]):
        row = torch.zeros(max_r, dtype=F64, device=x.device)
        a = int(idx[t])
        if a >= 0:
            r, p = int(ranks[a]), 0.0 if rates is None else float(rates[a])
            mask = None
            if p > 0:
                if p not in masks:
                    masks[p] = recover_mask(x2.shape[0], x2.shape[1], p, key, x.device)
                mask = masks[p][t:t + 1]
            row[:r] = fold_ref(x2[t:t + 1], r, mask, p)[0]
        rows.append(row)
    out = torch.stack(rows) if rows else torch.zeros(0, max_r, dtype=F64, device=x.device)
    return out.reshape(*x.shape[:-1], max_r)


def case(device, shape=(23,), dtype=torch.float32, dropout=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, IN, generator=gen, dtype=F64).to(dtype).to(device)
    ranks = torch.tensor(RANKS, device=device)
    index = torch.randint(-1, len(RANKS) - 1, shape, generator=gen).to(device)
    rates = torch.tensor(RATES, dtype=F64, device=device) if dropout else None
    key = miss_ext.new_dropout_key(device) if dropout else None
    return x, index, ranks, rates, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(23,), (0,), (3, 5)], ids=["rows", "empty", "3d"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_bank_fold_matches_the_float64_reference(device, shape, dropout):
    x, index, ranks, rates, key = case(device, shape, torch.float64, dropout)
    poison_heap(max(x.numel(), 1) * 2, F64, device)
    got = ops.bank_fold(x, index, ranks, MAX_R, rates, key)
    assert got.shape == (*shape, MAX_R) and got.dtype == F64
    torch.testing.assert_close(got, bank_fold_ref(x, index, ranks, MAX_R, rates, key), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[index < 0], torch.zeros_like(got[index < 0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,s_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                             (torch.float16, None), (torch.bfloat16, torch.float16),
                                             (torch.float32, torch.float64)], ids=str)
def test_bank_fold_dtypes(device, x_dtype, s_dtype):
    """The sum in float32 (float64 for float64 data), rounded once to s's dtype."""
    x, index, ranks, rates, key = case(device, (31,), x_dtype, dropout=True, seed=1)
    got = ops.bank_fold(x, index, ranks, MAX_R, rates, key, s_dtype)
    assert got.dtype == (s_dtype or x_dtype)
    want = bank_fold_ref(x, index, ranks, MAX_R, rates, key)
    tol = {torch.float32: 1e-6, torch.float64: 1e-6}.get(got.dtype, 1e-2)
    torch.testing.assert_close(got.to(F64), want, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_rows_equal_fold_at_their_rank(device):
    """Row t of bank_fold is row t of miss.fold(x, r_a, p_a, key): the same mask for the same key,
    so a bank row gets what its adapter alone (MissLinear, PEFT) computes."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 300, generator=gen).to(device)
    ranks = torch.tensor([64, 48, 7, 1], device=device)
    rates = torch.tensor([0.1, 0.0, 0.5, 0.3], dtype=F64, device=device)
    index = torch.randint(-1, 4, (40,), generator=gen).to(device)
    key = miss_ext.new_dropout_key(device)
    got = ops.bank_fold(x, index, ranks, 64, rates, key)
    for a in range(4):
        rows = index == a
        r = int(ranks[a])
        want = ops.fold(x, r, float(rates[a]), key)[rows]
        assert fold_within(got[rows][:, :r], want, fold_error_scale(x[rows], r, float(rates[a])), rtol=1e-6)
        assert torch.equal(got[rows][:, r:], torch.zeros_like(got[rows][:, r:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fin", [64, 63], ids=["in64", "in63"])
def test_bank_fold_non_finite_inputs_follow_dropout_by_multiplication(device, fin):
    """Dropout multiplies by the keep factor (1/(1-p) or 0), as nn.Dropout and miss.fold do: an inf
    at a dropped position makes its shard column NaN, a kept one inf, on every device and both
    access widths of the CUDA kernels (in = 64: 16-byte loads; 63: element loads). Reference: each
    column's strided sum in float64, with the mask recovered for the key."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, fin, generator=gen)
    x[:, ::5] = float("inf")
    x[1, 7] = float("nan")
    index, ranks = torch.tensor([0, 1, 0, 1]), torch.tensor([8, 3])
    rates = torch.tensor([0.5, 0.5], dtype=F64)
    key = miss_ext.new_dropout_key(device)
    factors = recover_mask(4, fin, 0.5, key, device).cpu() * 2.0
    got = ops.bank_fold(x.to(device), index.to(device), ranks.to(device), 8, rates.to(device), key).cpu().to(F64)
    want = torch.zeros(4, 8, dtype=F64)
    grad_s = torch.randn(4, 8, generator=gen)
    grad_s[:, 0] = float("inf")
    want_x = torch.zeros(4, fin, dtype=F64)
    for t in range(4):
        r = int(ranks[index[t]])
        for j in range(r):
            want[t, j] = (x[t, j::r].to(F64) * factors[t, j::r]).sum()
            want_x[t, j::r] = factors[t, j::r] * float(grad_s[t, j])
    got_x = ops.bank_fold_backward(grad_s.to(device), index.to(device), ranks.to(device), fin, rates.to(device), key,
                                   torch.float32).cpu().to(F64)
    for g, w in ((got, want), (got_x, want_x)):
        assert w.isnan().any() and w.isinf().any()
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        finite = w.isfinite()
        torch.testing.assert_close(g[finite], w[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_strided_and_misaligned_inputs(device):
    x, index, ranks, rates, key = case(device, (12,), torch.float32, dropout=True, seed=3)
    want = ops.bank_fold(x, index, ranks, MAX_R, rates, key)
    storage = torch.empty(x.numel() + 1, device=device)
    shifted = storage[1:].view(x.shape).copy_(x)                        # storage offset 1
    transposed = x.t().contiguous().t()                                 # column-major
    index_strided = torch.stack([index, index], 1)[:, 0]
    # Bit for bit: IN = 6 is no multiple of a 16-byte vector, so on CUDA both inputs take element
    # loads. (With vector loads the CUDA kernel sums a row in other chunks than with element
    # loads, so an aligned and a misaligned x may differ in the last bits, as fold's kernels do;
    # test_cuda_emulated.py checks both widths against the CPU.)
    for xx, ii in ((shifted, index), (transposed, index_strided)):
        torch.testing.assert_close(ops.bank_fold(xx, ii, ranks, MAX_R, rates, key), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_bank_fold_backward_is_the_adjoint(device, dropout):
    """x's gradient against the float64 reference's (autograd through fold_ref with the same masks),
    gradcheck, and rows without adapter get zero gradient."""
    x, index, ranks, rates, key = case(device, (4, 5), torch.float64, dropout, seed=4)
    x.requires_grad_(True)
    g = torch.randn(4, 5, MAX_R, dtype=F64, device=device)
    (ops.bank_fold(x, index, ranks, MAX_R, rates, key) * g).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (bank_fold_ref(xr, index, ranks, MAX_R, rates, key) * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(x.grad[index < 0], torch.zeros_like(x.grad[index < 0]))
    assert torch.autograd.gradcheck(lambda xx: ops.bank_fold(xx, index, ranks, MAX_R, rates, key),
                                    (x.detach().requires_grad_(True),))


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_backward_dtypes(device):
    """bank_fold_backward: grad_x in the requested dtype, from a float32 or same-dtype gradient."""
    x, index, ranks, rates, key = case(device, (9,), torch.bfloat16, dropout=True, seed=5)
    grad = torch.randn(9, MAX_R, device=device)
    want = ops.bank_fold_backward(grad.double(), index, ranks, IN, rates, key, F64)
    for g in (grad, grad.bfloat16(), grad.half()):
        got = ops.bank_fold_backward(g, index, ranks, IN, rates, key, torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == (9, IN)
        torch.testing.assert_close(got.to(F64), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_opcheck(device):
    x, index, ranks, rates, key = case(device, (7,), torch.float32, dropout=True, seed=6)
    for args in [(x, index, ranks, MAX_R, rates, key, None), (x, index, ranks, MAX_R, None, None, torch.bfloat16),
                 (x.double().requires_grad_(True), index, ranks, MAX_R, rates, key, None)]:
        torch.library.opcheck(ops.bank_fold.default, args)
    grad = torch.randn(7, MAX_R, device=device)
    torch.library.opcheck(ops.bank_fold_backward.default, (grad, index, ranks, IN, rates, key, torch.float16))


def test_bank_fold_double_backward_is_refused():
    x, index, ranks, rates, key = case("cpu", (5,), F64, dropout=True)
    x.requires_grad_(True)
    s = ops.bank_fold(x, index, ranks, MAX_R, rates, key)
    g = torch.ones_like(s, requires_grad=True)
    with pytest.raises(RuntimeError, match="bank_fold is differentiable once"):
        torch.autograd.grad(s, x, g, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_with_bank_add_for_ranks_not_dividing_max_r(device):
    """The pipeline the bank layers run: bank_add(y, bank_fold(x), per_row_fold=True) equals each
    row through its own adapter (test_bank.bank_ref), with ranks that do not divide the bank's
    max_r; without per_row_fold such a rank is refused (s would be taken for a fold at R, which
    cannot give that rank's fold: a silent wrong result otherwise), also in place and backward."""
    out = 12
    blocks = [torch.randn(r, q, generator=torch.Generator().manual_seed(r)).to(device)
              for r, q in ((8, 12), (3, 4), (5, 12), (7, 6), (1, 3))]
    bank, ranks, periods = make_bank(blocks, MAX_R, out, F64, device, pad=float("nan"))
    x = torch.randn(30, 29, dtype=F64, device=device)
    y = torch.randn(30, out, dtype=F64, device=device)
    index = torch.randint(-1, len(blocks), (30,), device=device)
    index[:5] = torch.arange(5)                                          # every slot used
    s = ops.bank_fold(x, index, ranks, MAX_R, None, None, F64)
    got = ops.bank_add(y, s, bank, ranks, periods, index, True)
    torch.testing.assert_close(got, bank_ref(y, x, blocks, index), rtol=1e-12, atol=1e-12)
    if device == "cpu":  # CUDA checks the values with device-side assertions (tests/test_cuda_emulated.py)
        with pytest.raises(ValueError, match=r"ranks\[1\]=3 \(used by row 1\) does not divide s.shape\[-1\]=8"):
            ops.bank_add(y, s, bank, ranks, periods, index)
        with pytest.raises(ValueError, match="does not divide"):
            ops.bank_add_(y.clone(), s, bank, ranks, periods, index)
        with pytest.raises(ValueError, match="does not divide"):
            ops.bank_add_backward(y, s, bank, ranks, periods, index)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_fold_bad_input_raises(device):
    """Each bad argument raises ValueError / TypeError naming it (values on the CPU only: CUDA
    checks them with device-side assertions, tests/test_cuda_emulated.py)."""
    x, index, ranks, rates, key = case(device, (4,), torch.float32, dropout=True)
    on = dict(device=device)
    ok = dict(x=x, index=index, ranks=ranks, max_r=MAX_R, dropouts=rates, key=key, dtype=None)
    cases = [
        (dict(x=x.long()), TypeError, "float32, float64, float16 or bfloat16"),
        (dict(index=index[:3]), ValueError, "index must have x's leading sizes"),
        (dict(index=index.int()), TypeError, "index must be int64"),
        (dict(ranks=ranks.view(1, -1)), ValueError, "ranks must have shape (slots,)"),
        (dict(max_r=0), ValueError, "max_r (the fold width) must be >= 1, got 0"),
        (dict(x=x[0, 0]), ValueError, "bank_fold needs x with a last dimension"),
        (dict(dropouts=None), ValueError, "a dropout key but no dropouts"),
        (dict(dropouts=rates.float()), TypeError, "dropouts must be float64"),
        (dict(dropouts=rates[:3]), ValueError, "dropouts must have shape (slots,) = (7,)"),
        (dict(key=None), ValueError, "got dropouts but no dropout key"),
        (dict(dtype=torch.int32), TypeError, "bank_fold dtype"),
        (dict(index=index.cpu() if device != "cpu" else index.to("meta")), ValueError, "must be on the same device"),
    ]
    if device == "cpu":
        cases += [
            (dict(index=torch.tensor([0, 7, -1, 1])), ValueError, "index[1]=7 names no slot"),
            (dict(index=torch.tensor([0, 6, -1, 1])), ValueError, "ranks[6]=0 (used by row 1)"),
            (dict(max_r=6, index=torch.tensor([1, 0, -1, 1])), ValueError, "ranks[0]=8 (used by row 1)"),
            (dict(dropouts=torch.tensor([0.0, 2.0] + [0.0] * 5, dtype=F64), index=torch.tensor([1, 1, -1, 0])),
             ValueError, "dropouts[1]=2"),
        ]
    for change, exc, text in cases:
        args = dict(ok, **change)
        with pytest.raises(exc, match=None) as info:
            ops.bank_fold(args["x"], args["index"], args["ranks"], args["max_r"], args["dropouts"], args["key"],
                          args["dtype"])
        assert text in str(info.value), (change, str(info.value))
    grad = torch.randn(4, MAX_R, **on)
    with pytest.raises(ValueError, match="in_features must be >= 0"):
        ops.bank_fold_backward(grad, index, ranks, -1, rates, key)
    with pytest.raises(ValueError, match=r"bank_fold_backward grad.shape\[-1\] \(the fold width\) must be >= 1"):
        ops.bank_fold_backward(grad[:, :0], index, ranks, IN, rates, key)
    with pytest.raises(ValueError, match="bank_fold_backward got dropouts but no dropout key"):
        ops.bank_fold_backward(grad, index, ranks, IN, rates, None)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"bank_fold_backward ranks\[0\]=8 \(used by row 0\) must be in \[1, "
                                             r"grad.shape\[-1\]=4\]"):
            ops.bank_fold_backward(grad[:, :4], torch.zeros(4, dtype=torch.int64), ranks, IN, rates, key)
        with pytest.raises(ValueError, match=r"bank_fold_backward ranks\[6\]=0"):
            ops.bank_fold_backward(grad, torch.tensor([6, 0, 1, 2]), ranks, IN, rates, key)
    # in_features 0 launches no kernel; the rows' ids, ranks and rates are checked on the host, on
    # every device (a fuzz of the ops, 2026-12-06: accepted before, where bank_fold refused them).
    assert ops.bank_fold_backward(grad, index, ranks, 0, rates, key).shape == (4, 0)
    with pytest.raises(ValueError, match=r"bank_fold_backward index\[1\]=7 names no slot"):
        ops.bank_fold_backward(grad, torch.tensor([0, 7, -1, 1], **on), ranks, 0, rates, key)
    with pytest.raises(ValueError, match=r"bank_fold_backward ranks\[6\]=0"):
        ops.bank_fold_backward(grad, torch.tensor([6, 0, 1, 2], **on), ranks, 0, rates, key)
    with pytest.raises(ValueError, match=r"bank_fold_backward dropouts\[1\]=2"):
        ops.bank_fold_backward(grad, torch.tensor([1, 1, -1, 0], **on), ranks, 0,
                               torch.tensor([0.0, 2.0] + [0.0] * 5, dtype=F64, **on), key)
    with FakeTensorMode():  # the meta kernels check as the CPU ones do
        with pytest.raises(ValueError, match="in_features must be >= 0"):
            ops.bank_fold_backward(torch.empty(4, MAX_R, **on), torch.empty(4, dtype=torch.int64, **on),
                                   torch.empty(7, dtype=torch.int64, **on), -1)


def test_bank_fold_compiles_once_while_ranks_and_rates_change():
    """fullgraph, and no recompilation when the slots' ranks (dividing max_r or not) and dropout
    rates change: they are tensors, not ints or floats."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def f(x, index, ranks, rates, key):
        return ops.bank_fold(x, index, ranks, MAX_R, rates, key)

    x = torch.randn(10, 20)
    for seed, (ranks, rates) in enumerate([([8, 4], [0.0, 0.1]), ([3, 7], [0.5, 0.0]), ([1, 5], [0.2, 0.9])]):
        ranks, rates = torch.tensor(ranks), torch.tensor(rates, dtype=F64)
        index = torch.randint(-1, 2, (10,))
        key = miss_ext.new_dropout_key()
        torch.testing.assert_close(f(x, index, ranks, rates, key).to(F64),
                                   bank_fold_ref(x, index, ranks, MAX_R, rates, key), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only build of torch: no fake CUDA")
def test_bank_fold_traces_on_fake_cuda():
    """Without a GPU: the meta kernels give the CUDA results' shapes, dtypes and devices (the key on
    the data's device, as FakeTensor requires), and torch.export traces the op on fake CUDA inputs."""
    with FakeTensorMode():
        x = torch.empty(3, 6, 20, device="cuda", dtype=torch.bfloat16)
        index = torch.empty(3, 6, dtype=torch.int64, device="cuda")
        ranks = torch.empty(4, dtype=torch.int64, device="cuda")
        rates = torch.empty(4, dtype=F64, device="cuda")
        key = torch.empty(2, dtype=torch.int64, device="cuda")
        s = ops.bank_fold(x, index, ranks, 8, rates, key, torch.float32)
        assert (s.shape, s.dtype, s.device.type) == ((3, 6, 8), torch.float32, "cuda")
        gx = ops.bank_fold_backward(s, index, ranks, 20, rates, key, torch.bfloat16)
        assert (gx.shape, gx.dtype, gx.device.type) == ((3, 6, 20), torch.bfloat16, "cuda")

    class Fold(torch.nn.Module):
        def forward(self, x, index, ranks, rates, key):
            return ops.bank_fold(x, index, ranks, 8, rates, key)

    with FakeTensorMode(allow_non_fake_inputs=False):
        args = (torch.empty(5, 20, device="cuda"), torch.empty(5, dtype=torch.int64, device="cuda"),
                torch.empty(4, dtype=torch.int64, device="cuda"), torch.empty(4, dtype=F64, device="cuda"),
                torch.empty(2, dtype=torch.int64, device="cuda"))
        ep = torch.export.export(Fold(), args, strict=False)
    assert any(str(n.target) == "miss.bank_fold.default" for n in ep.graph.nodes)
