"""torch.library.opcheck on every `miss` op, and torch.autograd.gradcheck in float64.

opcheck runs its default test_utils: test_schema, test_autograd_registration, test_faketensor
and test_aot_dispatch_dynamic (the op through the Meta kernels with dynamic shapes, and through
AOTAutograd's functionalisation of the in-place ops).
"""
import pytest
import torch
from torch.library import opcheck

from conftest import rand, run_opcheck

ops = torch.ops.miss
F64 = torch.float64


def key(seed=1234, offset=5678, device="cpu"):
    """A dropout key with fixed values, on the data's device (where the ops read it)."""
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# samples (built lazily so that each test's seed applies)
# ---------------------------------------------------------------------------------------------
def fold_samples(device):
    return [
        ("2d-r3", (rand(5, 10, device=device), 3), {}),
        ("3d-r3-remainder-grad", (rand(2, 3, 7, device=device, requires_grad=True), 3), {}),
        ("r_gt_in", (rand(4, 8, device=device), 16), {}),
        ("1d", (rand(10, device=device, requires_grad=True), 4), {}),
        ("empty", (rand(0, 10, device=device), 2), {}),
        ("dropout", (rand(6, 10, device=device), 4), {"p": 0.3, "key": key(device=device)}),
        ("dropout-grad", (rand(3, 2, 9, device=device, requires_grad=True), 2), {"p": 0.5, "key": key(7, 9, device)}),
        ("half-to-fp32", (rand(5, 12, dtype=torch.float16, device=device), 4), {"dtype": torch.float32}),
        ("fp64-grad", (rand(4, 11, dtype=F64, device=device, requires_grad=True), 3), {}),
    ]


def tile_add_samples(device):
    return [
        ("per-row", (rand(5, 10, device=device), rand(5, 3, device=device)), {}),
        ("per-row-3d-alpha", (rand(2, 3, 20, device=device), rand(2, 3, 4, device=device)), {"alpha": -0.5}),
        ("matrices", (rand(7, 10, device=device), rand(3, 4, device=device)), {}),
        ("dropout", (rand(6, 13, device=device), rand(6, 4, device=device)), {"p": 0.25, "key": key(device=device)}),
        ("half-out-fp32-src", (rand(4, 12, dtype=torch.float16, device=device), rand(4, 5, device=device)), {}),
        ("empty", (rand(0, 10, device=device), rand(0, 3, device=device)), {}),
    ]


def linear_samples(device):
    def case(in_f, out_f, r, mini_r, lead, grad=False, bias=True, dtype=torch.float32, block_dtype=None, **kw):
        x = rand(*lead, in_f, dtype=dtype, device=device, requires_grad=grad)
        w = rand(out_f, in_f, dtype=dtype, device=device)
        b = rand(out_f, dtype=dtype, device=device) if bias else None
        blk = rand(r, out_f if mini_r is None else mini_r, dtype=block_dtype or dtype, device=device,
                   requires_grad=grad)
        return (x, w, b, blk), kw

    samples = [
        ("default", *case(10, 20, 2, None, (5,))),
        ("default-grad", *case(10, 20, 3, None, (2, 3), grad=True)),
        ("remainder-grad-nobias", *case(7, 5, 3, None, (4,), grad=True, bias=False)),
        ("r_gt_in-grad", *case(8, 6, 16, None, (3,), grad=True)),
        ("mini", *case(10, 20, 2, 4, (5,))),
        ("mini-grad", *case(10, 20, 3, 5, (2, 2), grad=True)),
        ("mini1-grad", *case(12, 6, 4, 1, (3,), grad=True)),
        ("1d-grad", *case(10, 20, 4, None, (), grad=True)),
        ("empty", *case(10, 20, 2, None, (0,))),
        ("dropout", *case(10, 20, 3, None, (6,), p=0.2, key=key(device=device))),
        ("dropout-grad-mini", *case(10, 20, 2, 4, (2, 3), grad=True, p=0.4, key=key(3, 4, device))),
        ("half-fp32-block-grad", *case(10, 20, 3, None, (4,), grad=True, dtype=torch.float16,
                                       block_dtype=torch.float32)),
    ]
    # weight and bias that require grad too
    x, w, b, blk = (rand(4, 10, device=device, requires_grad=True), rand(20, 10, device=device, requires_grad=True),
                    rand(20, device=device, requires_grad=True), rand(3, 20, device=device, requires_grad=True))
    samples.append(("all-grad", (x, w, b, blk), {}))
    return [(n, a, k) for n, a, k in samples]


def merge_samples(device, grad):
    def case(in_f, out_f, r, mini_r, dtype=torch.float32, block_dtype=None):
        w = rand(out_f, in_f, dtype=dtype, device=device, requires_grad=grad)
        blk = rand(r, out_f if mini_r is None else mini_r, dtype=block_dtype or dtype, device=device,
                   requires_grad=grad)
        return (w, blk)

    return [
        ("default", case(10, 20, 2, None), {}),
        ("default-reverse", case(10, 20, 3, None), {"reverse": True}),
        ("remainder", case(7, 5, 3, None), {}),
        ("r_gt_in", case(8, 6, 16, None), {}),
        ("mini", case(10, 20, 3, 5), {}),
        ("mini1-reverse", case(12, 6, 4, 1), {"reverse": True}),
        ("half-weight-fp32-block", case(10, 20, 2, 4, dtype=torch.float16, block_dtype=torch.float32), {}),
    ]




def test_opcheck_fold(device):
    run_opcheck(ops.fold.default, fold_samples(device))


def test_opcheck_tile_add_(device):
    run_opcheck(ops.tile_add_.default, tile_add_samples(device))


def test_opcheck_linear(device):
    run_opcheck(ops.linear.default, linear_samples(device))


@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_merge(device, grad):
    run_opcheck(ops.merge.default, merge_samples(device, grad))


def test_opcheck_split_addmm(device):
    """The split path's internal GEMM (split_gemm.h), functional and in place, odd sizes and an empty m."""
    bf = dict(dtype=torch.bfloat16, device=device)
    samples = [(f"{m}x{k}x{n}", (rand(m, n, **bf), rand(m, k, **bf), rand(k, n, **bf)), {})
               for m, k, n in ((5, 7, 3), (1, 96, 6), (0, 4, 2))]
    run_opcheck(ops.split_addmm.default, samples)
    run_opcheck(ops.split_addmm_.default, samples)


def test_opcheck_split_bf16(device):
    """The split path's part cutter (split_gemm.h): both dims, every part count, repeated parts, odd and
    empty sizes, a transposed (strided) input."""
    t = rand(7, 5, device=device)
    samples = [("dim0-3", (t, 3, [0, 1, 2], 0), {}),
               ("dim1-pairs", (t, 3, [0, 0, 0, 1, 1, 2], 1), {}),
               ("dim1-2parts", (rand(4, 8, device=device), 2, [1, 0, 0], -1), {}),
               ("one-part", (t, 1, [0], 0), {}),
               ("transposed", (rand(6, 3, device=device).t(), 3, [2, 1], 1), {}),
               ("empty", (rand(0, 4, device=device), 3, [0, 1, 2], 0), {})]
    run_opcheck(ops.split_bf16.default, samples)


def test_opcheck_tile_add(device):
    """The functional tile_add (differentiable in out and src)."""
    samples = tile_add_samples(device) + [
        ("grad-dropout", (rand(2, 3, 9, device=device, requires_grad=True),
                          rand(2, 3, 4, device=device, requires_grad=True)), {"p": 0.3, "key": key(2, 3, device)}),
        ("grad-matrices", (rand(7, 10, device=device, requires_grad=True), rand(3, 4, device=device, requires_grad=True)),
         {"alpha": 0.5}),
    ]
    run_opcheck(ops.tile_add.default, samples)


def bat_samples(device, grad):
    def w(out_f, in_f, dtype=torch.float32):
        return rand(out_f, in_f, dtype=dtype, device=device, requires_grad=grad)

    def blk(n, r, dtype=torch.float32):
        return (rand(n, r, r, dtype=dtype, device=device) * 0.2).requires_grad_(grad)

    return w, blk


def test_opcheck_bat_weight(device):
    for grad in (False, True):
        w, blk = bat_samples(device, grad)
        run_opcheck(ops.bat_weight.default, [
            ("12x8-r4", (w(12, 8), blk(3, 4)), {}),
            ("half-weight", (w(8, 8, torch.float16), blk(2, 4)), {"dtype": torch.float32}),
        ])


def test_opcheck_bat_linear(device):
    for grad in (False, True):
        w, blk = bat_samples(device, grad)
        x = rand(2, 3, 8, device=device, requires_grad=grad)
        run_opcheck(ops.bat_linear.default, [
            ("bias", (x, w(12, 8), rand(12, device=device), blk(3, 4)), {}),
            ("no-bias-bf16-compute", (x, w(12, 8), None, blk(3, 4)), {"compute_dtype": torch.bfloat16}),
        ])


def test_opcheck_merge_(device):
    run_opcheck(ops.merge_.default, merge_samples(device, grad=False))


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,r", [((4, 10), 3), ((2, 3, 7), 3), ((3, 8), 16), ((9,), 9)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_fold(device, shape, r, p):
    x = rand(*shape, dtype=F64, device=device, requires_grad=True)
    k = key(11, 22, device) if p else None
    assert torch.autograd.gradcheck(lambda t: ops.fold(t, r, p, k), (x,))


LINEAR_GC = [
    pytest.param(10, 20, 2, None, id="10x20-r2"),
    pytest.param(7, 5, 3, None, id="7x5-r3"),
    pytest.param(8, 6, 16, None, id="8x6-r16"),
    pytest.param(10, 20, 3, 5, id="mini-r3-m5"),
    pytest.param(12, 6, 4, 1, id="mini-r4-m1"),
]


@pytest.mark.parametrize("in_f,out_f,r,mini_r", LINEAR_GC)
@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "train-base"])
def test_gradcheck_linear(device, in_f, out_f, r, mini_r, p, train_base):
    x = rand(2, 2, in_f, dtype=F64, device=device, requires_grad=True)
    w = rand(out_f, in_f, dtype=F64, device=device, requires_grad=train_base)
    b = rand(out_f, dtype=F64, device=device, requires_grad=train_base)
    blk = rand(r, out_f if mini_r is None else mini_r, dtype=F64, device=device, requires_grad=True)
    k = key(99, 1, device) if p else None
    inputs = (x, w, b, blk) if train_base else (x, blk)

    def fn(*args):
        if train_base:
            return ops.linear(*args, p, k)
        return ops.linear(args[0], w, b, args[1], p, k)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_linear_no_bias(device):
    x = rand(3, 10, dtype=F64, device=device, requires_grad=True)
    w = rand(20, 10, dtype=F64, device=device, requires_grad=True)
    blk = rand(3, 4, dtype=F64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: ops.linear(a, c, None, d, 0.25, key(5, 6, device)), (x, w, blk))


@pytest.mark.parametrize("in_f,out_f,r,mini_r", LINEAR_GC)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_merge(device, in_f, out_f, r, mini_r, reverse):
    w = rand(out_f, in_f, dtype=F64, device=device, requires_grad=True)
    blk = rand(r, out_f if mini_r is None else mini_r, dtype=F64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: ops.merge(a, c, reverse), (w, blk))


def test_every_op_has_a_docstring_with_its_schema():
    """Ops registered from C++ carry no docstring; miss_ext gives each torch.ops.miss packet its
    Python wrapper's (or a short one for the backward ops and build_info), ending with the schema
    of every overload."""
    import miss_ext
    from miss_ext._library import registered_ops

    names = {n[len("miss::"):].split(".")[0] for n in registered_ops()}
    assert {"fold", "linear", "bank_add_backward", "build_info"} <= names
    for name in sorted(names):
        packet = getattr(ops, name)
        assert packet.__doc__, name
        for overload in packet.overloads():
            assert str(getattr(packet, overload)._schema) in packet.__doc__, (name, overload)
        wrapper = getattr(miss_ext.ops, name, None)
        if callable(wrapper):
            assert packet.__doc__.startswith(wrapper.__doc__), name


def test_every_wrapper_passes_each_argument_to_its_op_in_schema_order(monkeypatch):
    """Each miss_ext.ops wrapper hands every argument, defaults included, to torch.ops.miss.<op>
    in the schema's order, under the schema's names: a wrapper that dropped one (fold's dtype,
    merge's reverse, tile_add's p, ...) ran the op's default silently, and no numeric test called
    it with the non-default value (a mutation audit, 2026-12-03)."""
    import inspect

    import miss_ext.ops as ops
    for name in ops.__all__:
        if name == "new_dropout_key":
            continue
        wrapper = getattr(ops, name)
        params = list(inspect.signature(wrapper).parameters)
        schema = getattr(torch.ops.miss, name).default._schema
        assert [a.name for a in schema.arguments] == params, name
        calls = []
        monkeypatch.setattr(torch.ops.miss, name, lambda *args, **kwargs: calls.append((args, kwargs)))
        given = [object() for _ in params]
        wrapper(*given)
        assert len(calls) == 1 and not calls[0][1], name
        assert len(calls[0][0]) == len(given) and all(a is b for a, b in zip(calls[0][0], given)), name
        monkeypatch.undo()


# ---- from a mutation test of the host-side C++ (2026-12-06): each kills a mutant that passed the suite ----

# M28 (meta_kernels.cpp split_addmm_meta: empty_like(y) keeps a transposed y's strides; the real
# kernel returns y.clone(Contiguous)). opcheck's samples only had contiguous y.
def test_opcheck_split_addmm_of_a_transposed_y():
    bf = dict(dtype=torch.bfloat16)
    run_opcheck(ops.split_addmm.default, [("transposed-y", (rand(6, 5, **bf).t(), rand(5, 7, **bf), rand(7, 6, **bf)), {})])

# M29 (meta_kernels.cpp bat_weight_meta: default dtype taken from the weight instead of the block).
# opcheck's half-weight sample passes dtype= explicitly, so the default was never compared.
def test_opcheck_bat_weight_default_dtype_is_the_blocks():
    w, blk = rand(8, 8, dtype=torch.float16), rand(2, 4, 4) * 0.2
    assert ops.bat_weight(w, blk).dtype == torch.float32
    run_opcheck(ops.bat_weight.default, [("half-weight-default-dtype", (w, blk), {})])

# M62 / M63 (meta_kernels.cpp merge_meta, tile_add_functional_meta: empty_like keeps a transposed
# input's strides; the real kernels return a contiguous clone). No opcheck sample had a strided
# weight / out.
def test_opcheck_functional_ops_on_transposed_inputs():
    run_opcheck(ops.merge.default, [("transposed-weight", (rand(10, 20).t(), rand(2, 20)), {}),
                                     ("transposed-weight-bat", (rand(10, 20).t(), rand(10, 2, 2) * 0.1), {})])
    run_opcheck(ops.tile_add.default, [("transposed-out", (rand(10, 7).t(), rand(7, 3)), {})])

# M64 (meta_kernels.cpp bank_add_meta: empty_like(y) keeps a transposed y's strides).
def test_opcheck_bank_add_of_a_transposed_y():
    y, s, bank = rand(6, 3).t(), rand(3, 4), rand(2, 4, 6)
    ranks, periods, index = torch.tensor([4, 2]), torch.tensor([6, 3]), torch.tensor([0, 1, -1])
    run_opcheck(ops.bank_add.default, [("transposed-y", (y, s, bank, ranks, periods, index), {})])
