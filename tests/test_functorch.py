"""torch.func transforms (grad, vjp, jvp, vmap, per-sample gradients, functional_call, hessian)
and double backward through every differentiable miss op, in float64 against the independent
reference (tests/reference.py, differentiated by plain autograd / torch.func) and against PEFT.

Two paths are covered:
- under a transform, the ops run as ATen composites with the kernels' own dropout mask
  (miss_ext/_functorch.py);
- plain autograd with create_graph=True (double backward, Hessian-vector products) runs the C++
  autograd, whose backwards are themselves differentiable; TorchScript and libtorch use it too.
"""
import contextlib

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import miss_ext
from conftest import DEVICES, rand
from reference import F64, bat_weight_ref, fold_ref, linear_ref, merge_ref, recover_mask, tile_add_ref

ops = torch.ops.miss
TOL = dict(rtol=1e-10, atol=1e-12)


def key(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------
# each op: (name, builder(device) -> (fn(*diff_inputs), diff_inputs, reference fn))
# ---------------------------------------------------------------------------------------------
def _fold_case(shape, r, p):
    def build(device):
        k = key(3, 4, device) if p else None
        x = rand(*shape, dtype=F64, device=device)
        rows = x.numel() // shape[-1]
        mask = recover_mask(rows, shape[-1], p, k, device).view(shape) if p else None
        return (lambda t: ops.fold(t, r, p, k), (x,),
                lambda t: fold_ref(t.reshape(rows, -1), r, None if mask is None else mask.reshape(rows, -1), p)
                .reshape(*shape[:-1], r))
    return build


def _tile_add_case(out_shape, src_shape, alpha, p):
    def build(device):
        k = key(5, 6, device) if p else None
        out, src = rand(*out_shape, dtype=F64, device=device), rand(*src_shape, dtype=F64, device=device)
        rows = out.numel() // out_shape[-1]
        mask = recover_mask(rows, out_shape[-1], p, k, device).view(out_shape) if p else None
        return (lambda o, s: ops.tile_add(o, s, alpha, p, k), (out, src),
                lambda o, s: tile_add_ref(o, s, alpha, mask, p))
    return build


def _linear_case(in_f, out_f, r, mini_r, lead, p, bias=True):
    def build(device):
        k = key(7, 8, device) if p else None
        x = rand(*lead, in_f, dtype=F64, device=device)
        w, b = rand(out_f, in_f, dtype=F64, device=device), rand(out_f, dtype=F64, device=device)
        blk = rand(r, mini_r or out_f, dtype=F64, device=device)
        rows = x.numel() // in_f
        mask = recover_mask(rows, in_f, p, k, device).view(*lead, in_f) if p else None
        bb = b if bias else None
        return (lambda xx, ww, bl: ops.linear(xx, ww, bb, bl, p, k), (x, w, blk),
                lambda xx, ww, bl: linear_ref(xx, ww, bb, bl, mask, p))
    return build


def _merge_case(in_f, out_f, block_shape, reverse):
    def build(device):
        w, blk = rand(out_f, in_f, dtype=F64, device=device), rand(*block_shape, dtype=F64, device=device) * 0.2
        if len(block_shape) == 3:
            return (lambda ww, bl: ops.merge(ww, bl, reverse), (w, blk), lambda ww, bl: bat_weight_ref(ww, bl))
        return (lambda ww, bl: ops.merge(ww, bl, reverse), (w, blk), lambda ww, bl: merge_ref(ww, bl, reverse))
    return build


def _bat_weight_case():
    def build(device):
        w, blk = rand(12, 8, dtype=F64, device=device), rand(3, 4, 4, dtype=F64, device=device) * 0.2
        return (lambda ww, bl: ops.bat_weight(ww, bl, None), (w, blk), bat_weight_ref)
    return build


def _bat_linear_case():
    def build(device):
        x = rand(5, 8, dtype=F64, device=device)
        w, b = rand(12, 8, dtype=F64, device=device), rand(12, dtype=F64, device=device)
        blk = rand(3, 4, 4, dtype=F64, device=device) * 0.2
        return (lambda xx, ww, bl: ops.bat_linear(xx, ww, b, bl, None), (x, w, blk),
                lambda xx, ww, bl: xx @ bat_weight_ref(ww, bl).t() + b)
    return build


CASES = [
    pytest.param(_fold_case((4, 10), 3, 0.0), id="fold-remainder"),
    pytest.param(_fold_case((2, 3, 7), 3, 0.4), id="fold-3d-dropout"),
    pytest.param(_fold_case((3, 8), 16, 0.0), id="fold-r_gt_in"),
    pytest.param(_tile_add_case((4, 10), (4, 3), 1.0, 0.0), id="tile_add-per-row"),
    pytest.param(_tile_add_case((2, 3, 9), (2, 3, 2), -0.5, 0.3), id="tile_add-3d-dropout"),
    pytest.param(_tile_add_case((7, 10), (3, 4), 1.0, 0.0), id="tile_add-matrices"),
    pytest.param(_linear_case(10, 20, 3, None, (4,), 0.0), id="linear-default"),
    pytest.param(_linear_case(7, 5, 3, None, (2, 3), 0.3), id="linear-remainder-dropout"),
    pytest.param(_linear_case(8, 6, 16, None, (3,), 0.0, bias=False), id="linear-r_gt_in-nobias"),
    pytest.param(_linear_case(10, 20, 3, 5, (4,), 0.25), id="linear-mini-dropout"),
    pytest.param(_merge_case(10, 20, (3, 20), False), id="merge-default"),
    pytest.param(_merge_case(10, 20, (2, 4), True), id="merge-mini-reverse"),
    pytest.param(_merge_case(8, 12, (3, 4, 4), False), id="merge-bat"),
    pytest.param(_bat_weight_case(), id="bat_weight"),
    pytest.param(_bat_linear_case(), id="bat_linear"),
]


def _cotangent(y):
    return torch.linspace(-1.0, 1.5, y.numel(), dtype=y.dtype, device=y.device).view(y.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", CASES)
def test_grad_vjp_jvp_match_the_reference(build, device):
    fn, inputs, ref = build(device)
    y = fn(*inputs)
    torch.testing.assert_close(y, ref(*inputs), **TOL)
    g = _cotangent(y)
    argnums = tuple(range(len(inputs)))
    got = grad(lambda *a: (fn(*a) * g).sum(), argnums=argnums)(*inputs)
    want = grad(lambda *a: (ref(*a) * g).sum(), argnums=argnums)(*inputs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL)
    # the same gradients as plain autograd through the C++ kernels
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    plain = torch.autograd.grad(fn(*leaves), leaves, g)
    for a, e in zip(got, plain):
        torch.testing.assert_close(a, e, **TOL)
    y_vjp, pullback = vjp(fn, *inputs)
    torch.testing.assert_close(y_vjp, y, **TOL)
    for a, e in zip(pullback(g), want):
        torch.testing.assert_close(a, e, **TOL)
    tangents = tuple(rand(*t.shape, dtype=F64, device=device) for t in inputs)
    y_jvp, t_out = jvp(fn, inputs, tangents)
    y_ref, t_ref = jvp(ref, inputs, tangents)
    torch.testing.assert_close(y_jvp, y_ref, **TOL)
    torch.testing.assert_close(t_out, t_ref, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", CASES)
def test_vmap_equals_a_loop_of_calls(build, device):
    fn, inputs, _ = build(device)
    batched = tuple(torch.stack([t, t * 0.5 + 0.1, -t]) for t in inputs)
    got = vmap(fn)(*batched)
    want = torch.stack([fn(*(b[i] for b in batched)) for i in range(3)])
    torch.testing.assert_close(got, want, **TOL)
    # only the first input batched (e.g. a batch of samples through one weight)
    got = vmap(fn, in_dims=(0,) + (None,) * (len(inputs) - 1))(batched[0], *inputs[1:])
    want = torch.stack([fn(batched[0][i], *inputs[1:]) for i in range(3)])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", CASES)
def test_double_backward_and_hessian_vector_products(build, device):
    """Second derivatives of <fn(inputs), g>^2 by plain autograd (C++ backwards recorded with
    create_graph=True) and by torch.func (jacfwd of jacrev on the composites), against the
    reference's."""
    fn, inputs, ref = build(device)
    g = _cotangent(fn(*inputs))
    vs = tuple(rand(*t.shape, dtype=F64, device=device) for t in inputs)

    def hvp_autograd(f):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        loss = ((f(*leaves) * g).sum()) ** 2
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vs))
        return torch.autograd.grad(dot, leaves)

    want = hvp_autograd(ref)
    for a, e in zip(hvp_autograd(fn), want):
        torch.testing.assert_close(a, e, **TOL)

    def hvp_func(f):
        loss = lambda *a: ((f(*a) * g).sum()) ** 2  # noqa: E731
        return jvp(grad(loss, argnums=tuple(range(len(inputs)))), inputs, vs)[1]

    for a, e in zip(hvp_func(fn), want):
        torch.testing.assert_close(a, e, **TOL)


# ---------------------------------------------------------------------------------------------
# layers: MissLinear and the accelerated PEFT layer, against PEFT's own layer
# ---------------------------------------------------------------------------------------------
MODES = [pytest.param("default", 1, id="default"), pytest.param("mini", 4, id="mini"), pytest.param("bat", 1, id="bat")]


def _layers(mode, mini_r, device):
    """(our MissLinear, PEFT's MissLinear, the accelerated copy of PEFT's) on one float64 base
    (10 -> 20, r = 2), all with the same random non-zero block."""
    pytest.importorskip("peft")
    import copy

    from peft import MissConfig, get_peft_model

    from miss_ext.peft import accelerate

    net = nn.Sequential()
    net.add_module("lin", nn.Linear(10, 20, dtype=F64, device=device))
    ours = miss_ext.MissLinear(copy.deepcopy(net.lin), 2, mode=mode, mini_r=mini_r)
    init = {"default": False, "mini": "mini", "bat": "bat"}[mode]
    model = get_peft_model(net, MissConfig(r=2, mini_r=mini_r, init_weights=init, target_modules=["lin"])).eval()
    theirs = model.base_model.model.lin
    with torch.no_grad():
        block = rand(*ours.miss_block.shape, dtype=F64, device=device) * 0.2
        ours.miss_block.copy_(block)
        theirs.miss_block["default"].copy_(block)
    fast = accelerate(copy.deepcopy(model)).base_model.model.lin
    return ours, theirs, fast


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,mini_r", MODES)
def test_layers_functional_call_grad_jvp_and_per_sample_grads_match_peft(mode, mini_r, device):
    ours, theirs, fast = _layers(mode, mini_r, device)
    X = rand(6, 10, dtype=F64, device=device)
    Y = rand(6, 20, dtype=F64, device=device)
    block = ours.miss_block.detach()

    def loss(layer, name, b, x, y):
        return ((functional_call(layer, {name: b}, (x,)) - y) ** 2).sum()

    results = {}
    for tag, layer, name in (("ours", ours, "miss_block"), ("peft", theirs, "miss_block.default"),
                             ("fast", fast, "miss_block.default")):
        g = grad(loss, argnums=2)(layer, name, block, X, Y)
        per_sample = vmap(grad(loss, argnums=2), in_dims=(None, None, None, 0, 0))(layer, name, block, X, Y)
        _, tangent = jvp(lambda x: layer(x), (X,), (torch.ones_like(X),))  # noqa: B023
        results[tag] = (g, per_sample, tangent)
    for tag in ("ours", "fast"):
        for a, e, what in zip(results[tag], results["peft"], ("grad", "per-sample grads", "jvp")):
            torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{tag} {what}: {m}")  # noqa: B023
    # per-sample gradients sum to the batch gradient, and equal a loop of single-sample grads
    g, per_sample, _ = results["ours"]
    torch.testing.assert_close(per_sample.sum(0), g, **TOL)
    loop = torch.stack([grad(loss, argnums=2)(ours, "miss_block", block, X[i:i + 1], Y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(per_sample, loop, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,mini_r", MODES)
def test_transforms_under_autocast_follow_the_autocast_kernels(mode, mini_r, device):
    """Under autocast a bf16 activation meets a float32 layer (PEFT and the eager op accept it:
    the op's autocast kernel casts both). The transforms' kernel runs before autocast's, so it
    refused it ("x dtype BFloat16 must match the base weight dtype Float"); it now applies the
    same casts. Values and gradients equal eager autograd under autocast to bf16 rounding."""
    ours, _, fast = _layers(mode, mini_r, device)
    for layer in (ours, fast):
        layer.float()
        x = rand(6, 10, dtype=torch.bfloat16, device=device)
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            xe = x.clone().requires_grad_(True)
            ye = layer(xe)
            ye.float().square().sum().backward()
            y, vjp_fn = vjp(layer, x)
            (gx,) = vjp_fn(2 * ye.detach())
            per_sample = vmap(grad(lambda xi: layer(xi.unsqueeze(0)).float().square().sum()))(x)  # noqa: B023
            with pytest.raises(TypeError, match=r"under autocast\(BFloat16\) x dtype Double and the base weight "
                                                r"dtype Float differ after autocast's casts") if mode != "bat" else \
                    contextlib.nullcontext():
                grad(lambda xi: layer(xi).float().sum())(x.double())  # noqa: B023
            if mode != "bat":  # eager says the same (it named the cast weight's dtype, BFloat16)
                with pytest.raises(TypeError, match=r"x dtype Double and the base weight dtype Float differ"):
                    layer(x.double())
        assert y.dtype == ye.dtype == gx.dtype == per_sample.dtype == torch.bfloat16
        tol = dict(rtol=3e-2, atol=3e-2 * float(xe.grad.abs().max()))
        torch.testing.assert_close(y.float(), ye.detach().float(), rtol=3e-2, atol=3e-2 * float(ye.detach().abs().max()))
        torch.testing.assert_close(gx.float(), xe.grad.float(), **tol)
        torch.testing.assert_close(per_sample.float(), xe.grad.float(), **tol)


@pytest.mark.parametrize("weight_dtype,block_dtype", [(F64, F64), (F64, torch.float32), (torch.float32, F64)],
                         ids=["both-float64", "weight-float64", "block-float64"])
def test_bat_linear_under_autocast_leaves_a_float64_operand_alone_under_vmap(weight_dtype, block_dtype):
    """bat_linear's autocast kernel does not cast a float64 weight or block down to autocast's
    dtype (it computes W' and the GEMM in float64, then gives x's dtype). The transforms' kernel
    must do the same: computing in bfloat16 there was 8.5e-3 off the eager op (a mutant of the
    audit, 2026-12-03, that no test caught). Values equal eager's and the float64 reference."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64)
    w, blk = torch.randn(32, 64, dtype=weight_dtype), (torch.randn(4, 8, 8) * 0.1).to(block_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = ops.bat_linear(x, w, None, blk, None)
        batched = vmap(lambda xi: ops.bat_linear(xi, w, None, blk, None))(x)
    assert eager.dtype == batched.dtype == torch.float32
    torch.testing.assert_close(batched, eager, rtol=0, atol=0)
    reference = x.double() @ bat_weight_ref(w.double(), blk.double()).t()
    torch.testing.assert_close(batched.double(), reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


def test_mini_block_gradient_under_float16_autocast_sums_its_copies_in_float32():
    """A mini block's gradient sums out / mini_r copies; PEFT sums them in the float32 block's
    dtype (it repeats the block before autocast's cast). For an x already in float16 the eager op
    and this kernel summed them in float16: 3 x 40000 overflowed to inf (review, 2026-12-03). Eager
    and torch.func give PEFT's finite float32 value."""
    base = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    layer = miss_ext.MissLinear(base, 2, mode="mini", mini_r=1)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float16)
    g = torch.full((1, 3), 40000.0, dtype=torch.float16)
    block = layer.miss_block.detach()

    def loss(b):
        with torch.autocast("cpu", dtype=torch.float16):
            y = functional_call(layer, {"miss_block": b}, (x,))
        return (y.float() * g.float()).sum()

    with torch.autocast("cpu", dtype=torch.float16):
        y = layer(x)
    (eager,) = torch.autograd.grad(y, layer.miss_block, g)
    assert eager[0, 0].item() == 120000.0
    torch.testing.assert_close(grad(loss)(block), eager, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,mini_r", MODES)
def test_hessian_of_the_loss_in_the_block_matches_peft(mode, mini_r, device):
    ours, theirs, fast = _layers(mode, mini_r, device)
    X = rand(5, 10, dtype=F64, device=device)

    def loss(layer, name, b):
        return functional_call(layer, {name: b}, (X,)).tanh().sum()

    block = ours.miss_block.detach()
    want = hessian(loss, argnums=2)(theirs, "miss_block.default", block)
    torch.testing.assert_close(hessian(loss, argnums=2)(ours, "miss_block", block), want, **TOL)
    torch.testing.assert_close(hessian(loss, argnums=2)(fast, "miss_block.default", block), want, **TOL)
    torch.testing.assert_close(jacrev(jacrev(loss, argnums=2), argnums=2)(ours, "miss_block", block), want, **TOL)
    # a Hessian-vector product by plain autograd (the C++ backward, recorded) gives the same
    v = rand(*block.shape, dtype=F64, device=device)
    b = ours.miss_block
    (gb,) = torch.autograd.grad(ours(X).tanh().sum(), b, create_graph=True)
    (hv,) = torch.autograd.grad((gb * v).sum(), b)
    torch.testing.assert_close(hv, (want.reshape(block.numel(), -1) @ v.reshape(-1)).view(block.shape), **TOL)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated")
def test_torchscript_keeps_double_backward_without_the_python_transforms():
    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=F64), 3, init_weights=False)
    scripted = torch.jit.script(layer)
    x = rand(4, 10, dtype=F64, requires_grad=True)
    results = []
    for m in (layer, scripted):
        y = m(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, m.miss_block)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, **TOL)
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    xr, br = x.detach().clone().requires_grad_(True), layer.miss_block.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(linear_ref(xr, w, b, br).square().sum(), xr, create_graph=True)
    want = torch.autograd.grad(gx.square().sum(), (xr, br))
    for a, e in zip(results[0], want):
        torch.testing.assert_close(a, e, **TOL)


def test_dropout_under_transforms_uses_the_kernels_mask():
    """MissLinear in training mode under grad: the composite multiplies in the mask the kernel
    draws for the key the layer drew, so gradients equal plain autograd with the same seed."""
    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=F64), 3, dropout=0.4, init_weights=False).train()
    X = rand(6, 10, dtype=F64)
    block = layer.miss_block.detach()
    torch.manual_seed(9)
    g = grad(lambda b: functional_call(layer, {"miss_block": b}, (X,)).square().sum())(block)
    torch.manual_seed(9)
    layer.miss_block.grad = None
    layer(X).square().sum().backward()
    torch.testing.assert_close(g, layer.miss_block.grad, **TOL)


def test_errors_under_transforms_are_the_ops_errors():
    x = rand(4, 10, dtype=F64)
    with pytest.raises(ValueError, match=r"r=0\b"):
        grad(lambda t: ops.fold(t, 0).sum())(x)
    w9, blk = rand(5, 9, dtype=F64), rand(2, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]=10 does not match in_features=9"):
        grad(lambda t: ops.linear(t, w9, None, blk).sum())(x)
    meta_key = key(1, 2, "meta")
    with pytest.raises(ValueError, match="key must be on the data's device"):
        grad(lambda t: ops.fold(t, 2, 0.5, meta_key).sum())(x)
    keys = torch.stack([key(1, 2, "cpu"), key(3, 4, "cpu")])
    with pytest.raises(NotImplementedError, match="vmap over the dropout key"):
        vmap(lambda k: ops.fold(x, 2, 0.5, k))(keys)
    w, blk = rand(8, 8, dtype=F64), torch.zeros(2, 4, 4, dtype=F64)
    with pytest.raises(NotImplementedError, match="bat unmerge"):
        grad(lambda ww: ops.merge(ww, blk, True).sum())(w)
    src = rand(4, 2, dtype=F64)
    with pytest.raises(RuntimeError, match="without autograd support"):
        grad(lambda t: (ops.tile_add_(t, src), t)[1].sum())(x.clone())


# ---------------------------------------------------------------------------------------------
# bank_add (mixed-adapter batches, issue 14): once differentiable in plain autograd (create_graph
# raises there), any order under the transforms' composite
# ---------------------------------------------------------------------------------------------
def _bank_case(device, shape=(7,)):
    from test_bank import bank_ref, make_bank, random_blocks

    R, in_f, out = 8, 13, 12
    blocks = [b.to(F64) for b in random_blocks(3, R, out, seed=4, device=device)]
    bank, ranks, periods = make_bank(blocks, R, out, dtype=F64, device=device)
    x = rand(*shape, in_f, dtype=F64, device=device)
    index = torch.randint(-1, 3, shape, generator=torch.Generator().manual_seed(2)).to(device)
    y = rand(*shape, out, dtype=F64, device=device)

    def fn(yy, xx, bk):
        return ops.bank_add(yy, ops.fold(xx, R, 0.0, None, F64), bk, ranks, periods, index)

    def ref(yy, xx, bk):
        return bank_ref(yy, xx, [bk[a, :b.shape[0], :b.shape[1]] for a, b in enumerate(blocks)], index)

    return fn, (y, x, bank), ref, (ranks, periods, index)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_under_transforms_matches_the_reference(device):
    fn, inputs, ref, _ = _bank_case(device, (2, 5))
    y = fn(*inputs)
    torch.testing.assert_close(y, ref(*inputs), **TOL)
    g = _cotangent(y)
    got = grad(lambda *a: (fn(*a) * g).sum(), argnums=(0, 1, 2))(*inputs)
    want = grad(lambda *a: (ref(*a) * g).sum(), argnums=(0, 1, 2))(*inputs)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    plain = torch.autograd.grad(fn(*leaves), leaves, g)
    for a, e, p in zip(got, want, plain):
        torch.testing.assert_close(a, e, **TOL)
        torch.testing.assert_close(p, e, **TOL)
    tangents = tuple(rand(*t.shape, dtype=F64, device=device) for t in inputs)
    torch.testing.assert_close(jvp(fn, inputs, tangents)[1], jvp(ref, inputs, tangents)[1], **TOL)
    # second order under the transforms (the composite is plain ATen)
    loss = lambda bk: (fn(inputs[0], inputs[1], bk) ** 2).sum()  # noqa: E731
    loss_ref = lambda bk: (ref(inputs[0], inputs[1], bk) ** 2).sum()  # noqa: E731
    v = rand(*inputs[2].shape, dtype=F64, device=device)
    torch.testing.assert_close(jvp(grad(loss), (inputs[2],), (v,))[1], jvp(grad(loss_ref), (inputs[2],), (v,))[1],
                               **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_add_per_sample_gradients_with_one_adapter_per_sample(device):
    """vmap over samples, each with its own adapter index (batched index): per-sample gradients of
    the bank equal a loop of single-sample autograd calls."""
    fn, (y, x, bank), _, (ranks, periods, index) = _bank_case(device, (6,))
    R = 8

    def loss(bk, yy, xx, idx):
        return (ops.bank_add(yy, ops.fold(xx, R, 0.0, None, F64), bk, ranks, periods, idx) ** 2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0, 0))(bank, y[:, None], x[:, None], index[:, None])
    for i in range(6):
        leaf = bank.detach().clone().requires_grad_(True)
        want, = torch.autograd.grad(loss(leaf, y[i:i + 1], x[i:i + 1], index[i:i + 1]), leaf)
        torch.testing.assert_close(got[i], want, **TOL)


def test_bank_add_errors_under_transforms_are_the_ops_errors():
    fn, (y, x, bank), _, (ranks, periods, index) = _bank_case("cpu")
    bad = index.clone()
    bad[2] = 3
    s = ops.fold(x, 8, 0.0, None, F64)
    with pytest.raises(ValueError, match=r"index\[2\]=3 names no slot"):
        grad(lambda bk: ops.bank_add(y, s, bk, ranks, periods, bad).sum())(bank)
    wrong = ranks.clone()
    wrong[int(index[index >= 0][0])] = 9
    with pytest.raises(ValueError, match=r"must be in \[1, min\(r_cap=8, s.shape\[-1\]=8\)\]"):
        grad(lambda bk: ops.bank_add(y, s, bk, wrong, periods, index).sum())(bank)
    slot = int(index[index >= 0][0])
    odd = periods.clone()
    odd[slot] = 5
    row = int((index == slot).nonzero()[0])
    message = rf"bank_add periods\[{slot}\]=5 \(used by row {row}\) must be in \[1, q_cap="
    for call in (lambda: ops.bank_add(y, s, bank, ranks, odd, index),
                 lambda: grad(lambda bk: ops.bank_add(y, s, bk, ranks, odd, index).sum())(bank)):
        with pytest.raises(ValueError, match=message):
            call()


def test_bank_layer_per_sample_gradients():
    """MissBankLinear (default, mini, and r=3 not dividing max_r) with functional_call +
    vmap(grad): each sample's bank gradient equals its own autograd call."""
    from miss_ext import MissBankLinear

    torch.manual_seed(0)
    layer = MissBankLinear(nn.Linear(16, 12).double(), capacity=3, max_r=8)
    layer.add_adapter("a", 8, block=torch.randn(8, 12, dtype=F64))
    layer.add_adapter("b", 4, mode="mini", mini_r=6, block=torch.randn(4, 6, dtype=F64))
    layer.add_adapter("c", 3, block=torch.randn(3, 12, dtype=F64))
    x, idx = torch.randn(5, 16, dtype=F64), torch.tensor([0, 1, 2, -1, 1])

    def loss(params, xx, ii):
        return functional_call(layer, params, (xx[None], ii[None])).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))({"bank": layer.bank.detach()}, x, idx)["bank"]
    for i in range(5):
        layer.zero_grad()
        layer(x[i:i + 1], idx[i:i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(got[i], layer.bank.grad, **TOL)


def test_bank_ensemble_on_a_meta_copy_is_refused_by_name():
    """torch's ensembling recipe (stack_module_state, functional_call on a copy moved to the meta
    device, vmap): the bank's ranks and periods are plain attributes (not buffers: EMA averaging
    must not touch them), which functional_call does not substitute; torch then failed with "Cannot
    copy out of meta tensor" (a lifecycle review, 2026-12-06). A ValueError naming them, with and
    without vmap, before the copy's tensors move; the same recipe on a copy left on the CPU equals
    each bank's own call."""
    import copy

    from torch.func import stack_module_state

    from miss_ext import MissBankLinear

    torch.manual_seed(0)
    banks = []
    for _ in range(3):
        layer = MissBankLinear(nn.Linear(12, 8), capacity=4, max_r=4).eval()
        layer.add_adapter("a", r=4, block=torch.randn(4, 8))
        banks.append(layer)
    params, buffers = stack_module_state(banks)
    x, idx = torch.randn(4, 12), banks[0].index_of(["a", None, "a", "a"])
    on_meta = copy.deepcopy(banks[0]).to("meta")
    with pytest.raises(ValueError, match="its ranks and periods are on the meta device and its bank on cpu"):
        vmap(lambda p, b, xx: functional_call(on_meta, (p, b), (xx, idx)), in_dims=(0, 0, None))(params, buffers, x)
    with pytest.raises(ValueError, match="functional_call does not substitute them"):
        functional_call(on_meta, {k: v[0] for k, v in params.items()}, (x, idx))
    # Refused before anything moved: the copy's forward tensors stay where they were.
    assert all(getattr(on_meta, name).is_meta for name in on_meta._SLOT_TENSORS)
    only_periods = copy.deepcopy(banks[0])  # a load with assign=True that dropped them, say
    only_periods.periods = only_periods.periods.to("meta")
    with pytest.raises(ValueError, match="its periods is on the meta device and its bank on cpu"):
        only_periods(x, idx)
    assert only_periods._route.device.type == "cpu"
    on_cpu = copy.deepcopy(banks[0])
    got = vmap(lambda p, b, xx: functional_call(on_cpu, (p, b), (xx, idx)), in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        for i, layer in enumerate(banks):
            torch.testing.assert_close(got[i], layer(x, idx))


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen bank", "stacked banks"])
def test_bank_layer_under_vmap_without_autograd(mode):
    """Inference under vmap: without autograd recording, MissBankLinear adds its terms in place
    (miss.bank_add_, which has no batching rule); under a transform it must take the functional
    op instead (it raised 'Batching rule not implemented for miss::bank_add_' once). Per-sample
    loop as the reference; "stacked banks" is model ensembling, vmap over functional_call."""
    from miss_ext import MissBankLinear

    torch.manual_seed(0)
    layer = MissBankLinear(nn.Linear(16, 12).double(), capacity=3, max_r=8)
    layer.add_adapter("a", 8, block=torch.randn(8, 12, dtype=F64))
    layer.add_adapter("b", 4, mode="mini", mini_r=6, block=torch.randn(4, 6, dtype=F64))
    xs, idx = torch.randn(3, 5, 16, dtype=F64), torch.tensor([0, 1, -1, 1, 0])
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    if mode == "frozen bank":
        layer.requires_grad_(False)
        context = contextlib.nullcontext
    with context():
        if mode == "stacked banks":
            banks = layer.bank.detach() * torch.tensor([1.0, -2.0, 0.5], dtype=F64)[:, None, None, None]
            got = vmap(lambda bank, xx: functional_call(layer, {"bank": bank}, (xx, idx)))(banks, xs)
            want = torch.stack([functional_call(layer, {"bank": bank}, (xx, idx)) for bank, xx in zip(banks, xs)])
        else:
            got = vmap(lambda xx: layer(xx, idx))(xs)
            want = torch.stack([layer(xx, idx) for xx in xs])
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(want[0], layer.base_layer(xs[0]))  # the adapters did add a term


def test_bank_layer_per_sample_gradients_with_dropout():
    """The same in training with a dropout rate per adapter (vmap(..., randomness="same"): one key
    for all samples, each sample's mask indexed by its own rows, as a separate call with that key
    draws it). The index is batched: the composite must not need its values per sample for the
    masks (it did once, and refused this)."""
    from miss_ext import MissBankLinear

    torch.manual_seed(0)
    layer = MissBankLinear(nn.Linear(16, 12).double(), capacity=3, max_r=8).train()
    layer.add_adapter("a", 8, dropout=0.3, block=torch.randn(8, 12, dtype=F64))
    layer.add_adapter("b", 4, mode="mini", mini_r=6, dropout=0.0, block=torch.randn(4, 6, dtype=F64))
    layer.add_adapter("c", 3, dropout=0.5, block=torch.randn(3, 12, dtype=F64))
    x, idx = torch.randn(5, 16, dtype=F64), torch.tensor([0, 1, 2, -1, 2])

    def loss(params, xx, ii):
        return functional_call(layer, params, (xx[None], ii[None])).pow(2).sum()

    torch.manual_seed(1)
    got = vmap(grad(loss), in_dims=(None, 0, 0), randomness="same")({"bank": layer.bank.detach()}, x, idx)["bank"]
    for i in range(5):
        layer.zero_grad()
        torch.manual_seed(1)  # the same key
        layer(x[i:i + 1], idx[i:i + 1]).pow(2).sum().backward()
        torch.testing.assert_close(got[i], layer.bank.grad, **TOL)


def test_bank_fold_under_transforms_matches_the_op():
    """bank_fold's composite (each slot's fold matrix, the row's slot by one-hot; the kernels' masks
    per row and rate): grad with dropout equals the op's own autograd, and vmap over samples (each
    with its own slot id) equals one call over all rows."""
    from test_bank_fold import MAX_R, case

    x, index, ranks, rates, key = case("cpu", (6,), F64, dropout=True, seed=7)
    g = torch.randn(6, MAX_R, dtype=F64)

    def f(xx):
        return (ops.bank_fold(xx, index, ranks, MAX_R, rates, key) * g).sum()

    got = grad(f)(x)
    xr = x.clone().requires_grad_(True)
    f(xr).backward()
    torch.testing.assert_close(got, xr.grad, rtol=1e-12, atol=1e-12)
    batched = vmap(lambda xx, ii: ops.bank_fold(xx[None], ii[None], ranks, MAX_R)[0])(x, index)
    torch.testing.assert_close(batched, ops.bank_fold(x, index, ranks, MAX_R), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"bank_fold ranks\[6\]=0"):
        grad(lambda xx: ops.bank_fold(xx, torch.full((6,), 6), ranks, MAX_R).sum())(x)


def test_bank_fold_edge_cases_under_transforms():
    """bank_fold's composite: an unused slot may hold any rate (as the op ignores it), x may have
    no columns, and vmap over the ranks (one bank for the whole batch) is refused by name."""
    x, index, ranks = torch.randn(5, 10, dtype=F64), torch.tensor([0, 1, -1, 1, 0]), torch.tensor([3, 9, 0])
    rates, key = torch.tensor([0.2, 0.5, 1.5], dtype=F64), miss_ext.new_dropout_key()
    want = torch.autograd.grad(ops.bank_fold(x.requires_grad_(True), index, ranks, 10, rates, key).sum(), x)[0]
    torch.testing.assert_close(grad(lambda t: ops.bank_fold(t, index, ranks, 10, rates, key).sum())(x.detach()), want,
                               **TOL)
    empty = torch.randn(3, 0, dtype=F64)
    got = grad(lambda t: ops.bank_fold(t, torch.zeros(3, dtype=torch.int64), ranks[:2], 10).sum())(empty)
    assert got.shape == (3, 0)
    with pytest.raises(NotImplementedError, match="vmap over the ranks"):
        vmap(lambda r: ops.bank_fold(x.detach(), index, r, 10))(torch.stack([ranks, ranks]))



def test_bank_fold_refuses_a_used_rate_outside_0_1_under_transforms():
    """As the op: a dropout rate outside [0, 1] of a slot some row uses is refused, naming it, under
    torch.func too (the composite's keep factors leave such a rate out: that slot's rows would
    train without dropout, silently)."""
    x, index, ranks = torch.randn(5, 10, dtype=F64), torch.tensor([0, 1, -1, 1, 0]), torch.tensor([3, 9, 0])
    key = miss_ext.new_dropout_key()
    for bad in (1.5, -0.25):
        rates = torch.tensor([0.2, bad, 0.0], dtype=F64)
        message = rf"bank_fold dropouts\[1\]={bad} \(used by row 1\)"
        with pytest.raises(ValueError, match=message):
            ops.bank_fold(x, index, ranks, 10, rates, key)
        with pytest.raises(ValueError, match=message):
            grad(lambda t: ops.bank_fold(t, index, ranks, 10, rates, key).sum())(x)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["default", "mini"])
def test_is_grads_batched_runs_the_backward_under_vmap(mode, dropout):
    """torch.autograd.grad(..., is_grads_batched=True) runs the backward under vmap, where
    miss.linear's in-place tile_add_ had no batching rule: an internal error naming an op the user
    never called (an autograd-ecosystem review, 2026-12-03). The functional op is used there; each
    batched gradient equals its own backward."""
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=F64), r=2, mode=mode, mini_r=4, dropout=dropout,
                                init_weights=False)
    x = torch.randn(5, 10, dtype=F64, requires_grad=True)
    y = layer(x)
    grads = torch.randn(3, 5, 20, dtype=F64)
    batched = torch.autograd.grad(y, [x, layer.miss_block], grads, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(y, [x, layer.miss_block], grads[i], retain_graph=True)
        torch.testing.assert_close(batched[0][i], one[0], **TOL)
        torch.testing.assert_close(batched[1][i], one[1], **TOL)


# ---------------------------------------------------------------------------------------------
# forward-mode AD through dual tensors (torch.autograd.forward_ad), outside torch.func
# ---------------------------------------------------------------------------------------------
def _non_differentiable_calls():
    """op -> call(t) where t (4, 8) float64 is the input given a tangent (the others made here)."""
    i64 = lambda *v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    src, w, m, p = rand(4, 2, dtype=F64), rand(8, 8, dtype=F64), rand(4, 2, 2, dtype=F64), rand(4, 2, 2, dtype=F64)
    s, bank, ranks, periods, index = rand(3, 2, dtype=F64), rand(1, 2, 8, dtype=F64), i64(2), i64(8), i64(0, 0, -1)
    return {
        "tile_add_": lambda t: ops.tile_add_(t, src),
        "merge_": lambda t: ops.merge_(w.clone(), t[:2]),
        "bat_transform": lambda t: ops.bat_transform(t.reshape(8, 4), m, p),
        "bank_add_": lambda t: ops.bank_add_(t[:3], s, bank, ranks, periods, index),
        "split_bf16": lambda t: ops.split_bf16(t.float(), 2, [0, 1], 0),
    }


@pytest.mark.parametrize("op", list(_non_differentiable_calls()))
@pytest.mark.parametrize("grad_mode", [True, False])
def test_ops_without_autograd_refuse_a_forward_tangent(op, grad_mode):
    """An in-place or non-differentiable op given a dual tensor used to run below autograd and drop
    the tangent silently (tile_add_ kept 1 where 2 was due, bat_transform returned none; a review,
    2026-12-05), also with grad mode off, which forward AD ignores. Now it refuses, naming forward
    mode; torch.func.jvp raises the same (its inputs carry level-0 tangents)."""
    import torch.autograd.forward_ad as fwAD
    call = _non_differentiable_calls()[op]
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        t = fwAD.make_dual(rand(4, 8, dtype=F64), torch.ones(4, 8, dtype=F64))
        with pytest.raises(RuntimeError, match=rf"miss::{op} is an op without autograd support and got a tensor "
                                               r"with a forward-mode tangent"):
            call(t)
    with pytest.raises(RuntimeError, match="forward-mode tangent"):
        jvp(lambda t: call(t.clone()), (rand(4, 8, dtype=F64),), (torch.ones(4, 8, dtype=F64),))
    with fwAD.dual_level():  # a dual level alone, with plain tensors, changes nothing
        call(rand(4, 8, dtype=F64))


def _dual_layers():
    """name -> (module, call(module, x)), each with dropout in training mode."""
    from miss_ext import MissBankLinear, MissLinear
    torch.manual_seed(0)
    layer = MissLinear(nn.Linear(10, 12).double(), r=4, dropout=0.3)
    with torch.no_grad():
        layer.miss_block.normal_()
    bank = MissBankLinear(nn.Linear(10, 12).double(), capacity=2, max_r=4)
    bank.add_adapter("a", 4, dropout=0.3, block=torch.randn(4, 12, dtype=F64))
    return {"MissLinear": (layer, lambda m, x: m(x), "miss_block"),
            "MissBankLinear": (bank, lambda m, x: m(x, torch.tensor([0, 0, -1])), "bank")}


@pytest.mark.parametrize("name", ["MissLinear", "MissBankLinear"])
@pytest.mark.parametrize("dual", ["x", "parameter"])
def test_layers_refuse_dual_tensors_before_the_dropout_draw(name, dual):
    """A dual x, or the adapter made dual through functional_call: the bank used to take its
    in-place op (the tangent was dropped silently), and MissLinear drew its dropout key before the
    C++ autograd refused. Now one NotImplementedError naming torch.func.jvp, before the draw: the
    RNG is as it was. torch.func.jvp through the same layer gives the tangent."""
    import torch.autograd.forward_ad as fwAD
    module, call, param = _dual_layers()[name]
    module.train()
    x = torch.randn(3, 10, dtype=F64)
    state = torch.get_rng_state()
    with fwAD.dual_level():
        if dual == "x":
            args = (fwAD.make_dual(x, torch.ones_like(x)),)
            run = lambda: call(module, *args)  # noqa: E731
        else:
            p = getattr(module, param).detach()
            params = {param: fwAD.make_dual(p, torch.ones_like(p))}
            run = lambda: call(_Functional(module, params), x)  # noqa: E731
        with pytest.raises(NotImplementedError, match=r"forward-mode AD through dual tensors .* torch.func.jvp"):
            run()
    assert torch.equal(torch.get_rng_state(), state), "a refused call moved the RNG"
    module.eval()
    p = getattr(module, param).detach()
    _, tangent = jvp(lambda q: call(_Functional(module, {param: q}), x), (p,), (torch.ones_like(p),))
    eps = 1e-6
    with torch.no_grad():
        ahead = call(_Functional(module, {param: p + eps}), x)
        back = call(_Functional(module, {param: p - eps}), x)
    torch.testing.assert_close(tangent, (ahead - back) / (2 * eps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param", ["base_layer.weight", "base_layer.bias"])
def test_a_hooked_base_with_a_dual_parameter_is_refused_before_the_dropout_draw(param):
    """A base that is not a plain nn.Linear (here a forward hook) runs itself, and a base weight or
    bias made dual through functional_call gave its output a tangent that the adapter's C++ op
    refused with torch's "jvp is not implemented", after the dropout key was drawn (a review,
    2026-12-07). Now the README's NotImplementedError, before the draw."""
    import torch.autograd.forward_ad as fwAD
    from miss_ext import MissLinear
    torch.manual_seed(0)
    layer = MissLinear(nn.Linear(10, 12).double(), r=4, dropout=0.3, init_weights=False).train()
    layer.base_layer.register_forward_hook(lambda module, args, out: out)
    x = torch.randn(3, 10, dtype=F64)
    p = dict(layer.named_parameters())[param].detach()
    state = torch.get_rng_state()
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=r"MissLinear: forward-mode AD through dual tensors"):
            _Functional(layer, {param: fwAD.make_dual(p, torch.ones_like(p))})(x)
    assert torch.equal(torch.get_rng_state(), state), "a refused call moved the RNG"


class _Functional:
    """module called through functional_call with `params`."""
    def __init__(self, module, params):
        self.module, self.params = module, params

    def __call__(self, *args):
        return functional_call(self.module, self.params, args)


@pytest.mark.parametrize("layer", ["fused", "hooked base", "bank", "peft two adapters"])
def test_vmap_with_different_randomness_is_refused_before_the_key_draw(layer):
    """vmap(..., randomness="different") would draw one dropout key per sample, which the ops
    refuse; the key used to be drawn first, so the refusal moved torch's generator (a review,
    2026-12-05). Now the layers refuse before drawing; randomness="same" still works."""
    from miss_ext import MissBankLinear, MissLinear

    torch.manual_seed(0)
    x = torch.randn(3, 2, 10, dtype=F64)
    if layer == "bank":
        module = MissBankLinear(nn.Linear(10, 12).double(), capacity=2, max_r=4)
        module.add_adapter("a", 4, dropout=0.3, block=torch.randn(4, 12, dtype=F64))
        call = lambda t: module(t, torch.tensor([0, -1]))  # noqa: E731
    elif layer == "peft two adapters":
        import miss_ext.peft
        from peft import MissConfig, get_peft_model

        module = get_peft_model(nn.Sequential(nn.Linear(10, 12)).double(),
                                MissConfig(r=4, miss_dropout=0.3, target_modules=["0"], init_weights=False))
        module.add_adapter("b", MissConfig(r=2, miss_dropout=0.3, target_modules=["0"], init_weights=False))
        module.base_model.set_adapter(["default", "b"])
        miss_ext.peft.accelerate(module)
        call = module
    else:
        module = MissLinear(nn.Linear(10, 12).double(), r=4, dropout=0.3, init_weights=False)
        if layer == "hooked base":
            module.base_layer.register_forward_hook(lambda m, args, out: out)
        call = module
    module.train()
    state = torch.get_rng_state()
    with pytest.raises(NotImplementedError, match=r"vmap over the dropout key is not supported"):
        vmap(call, randomness="different")(x)
    assert torch.equal(torch.get_rng_state(), state), "a refused call moved the RNG"
    assert vmap(call, randomness="same")(x).shape[:2] == (3, 2)


# ---- from a mutation test of the host-side C++ (2026-12-06): each kills a mutant that passed the suite ----

# M26 (fold.cpp tile_add_src_grad: alpha ignored). opcheck's alpha sample has no grad.
@pytest.mark.parametrize("shapes", [((2, 3, 20), (2, 3, 4)), ((7, 10), (3, 4))], ids=["per-row", "matrices"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_tile_add_with_alpha(shapes, p):
    out = rand(*shapes[0], dtype=F64, requires_grad=True)
    src = rand(*shapes[1], dtype=F64, requires_grad=True)
    key = torch.tensor([5, 7]) if p else None
    assert torch.autograd.gradcheck(lambda o, s: ops.tile_add(o, s, -0.5, p, key), (out, src))
