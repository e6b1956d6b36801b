"""Behaviour of the torch.func kernels, the checkpoint detection, the base-layer checks, the op
wrappers and build_info that no other test pinned (a mutation round of miss_ext/_functorch.py,
_checkpointing.py, base_layers.py, ops.py and _library.py, 2026-12-06: each test here fails on a
one-line mutant that the rest of the suite let through). Values are compared with the float64
reference (tests/reference.py); float64 data there leaves only summation-order rounding, hence
the 1e-12 tolerances."""
import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import miss_ext
from miss_ext import MissLinear
from miss_ext.base_layers import is_plain_linear, linear_class_override
from conftest import rand
from reference import F64, bat_transform_ref, bat_weight_ref, fold_ref, merge_ref, tile_add_ref

ops = torch.ops.miss
TOL64 = dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# torch.func transforms (miss_ext/_functorch.py): the same errors and precision as a plain call
# ---------------------------------------------------------------------------------------------
def test_a_key_on_another_device_is_refused_under_transforms_even_without_dropout():
    """With p == 0 the key is not read but its device is checked, under grad/vmap as in a plain call."""
    x = rand(4, 10, dtype=F64)
    meta_key = torch.tensor([1, 2], dtype=torch.int64, device="meta")
    w, blk, src = rand(6, 10, dtype=F64), rand(2, 6, dtype=F64), rand(4, 3, dtype=F64)
    calls = {"fold": lambda t: ops.fold(t, 2, 0.0, meta_key),
             "linear": lambda t: ops.linear(t, w, None, blk, 0.0, meta_key),
             "tile_add": lambda t: ops.tile_add(t, src, 1.0, 0.0, meta_key)}
    for name, call in calls.items():
        for how, run in (("plain", lambda: call(x)),  # noqa: B023
                         ("grad", lambda: grad(lambda t: call(t).sum())(x)),  # noqa: B023
                         ("vmap", lambda: vmap(call)(x[:, None]))):  # noqa: B023
            with pytest.raises(ValueError, match="key must be on the data's device cpu, got a key on meta"):
                run()
                pytest.fail(f"{name} under {how} accepted a key on another device")


def test_the_autocast_fold_under_a_transform_reads_float32_activations_unrounded():
    """Under bf16 autocast a float32 x is folded as given (only S is rounded to bf16), under vmap and grad as
    eagerly."""
    # 1 + 1.003 * 2**-8 lies just above the bf16 midpoint between 1 and 1 + 2**-7, so S rounds up to
    # 1 + 2**-7. Folding autocast's bf16 copy of x (whose second entry rounds to 2**-8) gives the
    # midpoint itself, which rounds to even: 1.0.
    x = torch.tensor([[1.0, 2.0 ** -8 * 1.003]] * 3)
    w, blk = torch.zeros(4, 2), torch.ones(1, 4)  # y = S @ ones: the rounded S itself
    want = torch.full((3, 4), 1.0 + 2.0 ** -7)
    assert fold_ref(x, 1).to(torch.float32).to(torch.bfloat16).float()[0, 0] == want[0, 0]
    with torch.autocast("cpu", torch.bfloat16):
        eager = ops.linear(x, w, None, blk)
        batched = vmap(lambda xi: ops.linear(xi, w, None, blk))(x)
        gx = grad(lambda xi: ops.linear(xi, w, None, blk).float().sum())(x)
    torch.testing.assert_close(eager, want, rtol=0, atol=0)
    torch.testing.assert_close(batched, want, rtol=0, atol=0)
    torch.testing.assert_close(gx, torch.full_like(x, 4.0), rtol=0, atol=0)  # dS/dx = 1 per column, 4 outputs


def test_bank_add_with_per_row_fold_refuses_a_rank_above_the_fold_width_under_transforms():
    """A used rank above s.shape[-1] is a ValueError with per_row_fold=True too, under grad as in a plain call."""
    out = 6
    bank, y, s = rand(2, 4, out, dtype=F64), rand(2, out, dtype=F64), rand(2, 2, dtype=F64)
    ranks, periods, index = torch.tensor([4, 2]), torch.tensor([out, out]), torch.tensor([0, 1])
    message = r"bank_add ranks\[0\]=4 \(used by row 0\) must be in \[1, min\(r_cap=4, s.shape\[-1\]=2\)\]"
    with pytest.raises(ValueError, match=message):
        ops.bank_add(y, s, bank, ranks, periods, index, True)
    with pytest.raises(ValueError, match=message):
        grad(lambda b: ops.bank_add(y, s, b, ranks, periods, index, True).sum())(bank)


def test_a_bat_merge_under_transforms_checks_the_block_as_a_plain_call():
    """merge with a 3-D (bat) block under grad/vmap raises the plain call's TypeError / ValueError instead of
    computing."""
    w = rand(12, 8, dtype=F64)
    cases = [(torch.ones(3, 4, 4, dtype=torch.int64), TypeError, "miss_block must be a floating-point tensor"),
             (rand(2, 4, 4, dtype=F64), ValueError, r"must have shape \(3, 4, 4\), got \[2, 4, 4\]")]
    for blk, error, message in cases:
        for run in (lambda: ops.merge(w, blk, False),  # noqa: B023
                    lambda: grad(lambda ww: ops.merge(ww, blk, False).sum())(w),  # noqa: B023
                    lambda: vmap(lambda ww: ops.merge(ww, blk, False))(w[None])):  # noqa: B023
            with pytest.raises(error, match=message):
                run()


# ---------------------------------------------------------------------------------------------
# activation checkpointing (miss_ext/_checkpointing.py), seen from a bank model
# ---------------------------------------------------------------------------------------------
def _bank_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12)).double()
    miss_ext.apply_bank(model, ["0"], capacity=2, max_r=4)
    miss_ext.add_bank_adapter(model, "x", r=4)
    miss_ext.add_bank_adapter(model, "y", r=2, mode="mini", mini_r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model.train()


def test_the_checkpoint_check_leaves_nested_saved_tensor_hooks_in_their_order():
    """A bank forward reads every saved-tensor hook in force and puts them back as they were: the innermost user hook
    still packs."""
    model = _bank_model()
    x = torch.randn(2, 8, dtype=F64, requires_grad=True)
    packed = {"outer": 0, "inner": 0}

    def hooks(name):
        def pack(t):
            packed[name] += 1
            return t
        return pack, lambda t: t

    with miss_ext.mixed_batch(model, ["x", "y"]):
        with torch.autograd.graph.saved_tensors_hooks(*hooks("outer")):
            with torch.autograd.graph.saved_tensors_hooks(*hooks("inner")):
                h = model(x)
                (h * h).sum().backward()
    assert packed["outer"] == 0 and packed["inner"] > 0, packed


def test_an_eval_forward_under_a_reentrant_checkpoint_recomputed_in_training_in_another_batch_is_refused():
    """torch's reentrant checkpoint of an eval-mode bank forward leaves nothing to judge its recompute by: refused even
    after model.train()."""
    from torch.utils.checkpoint import checkpoint

    model = _bank_model().eval()
    x = torch.randn(2, 8, dtype=F64, requires_grad=True)
    with miss_ext.mixed_batch(model, ["x", "y"]):
        y = checkpoint(model, x, use_reentrant=True)
    model.train()
    with miss_ext.mixed_batch(model, ["y", None]), pytest.raises(ValueError, match="could not be checked"):
        y.pow(2).sum().backward()


# ---------------------------------------------------------------------------------------------
# base layers (miss_ext/base_layers.py)
# ---------------------------------------------------------------------------------------------
def _falcon_linear(**attributes):
    """A class that is transformers' FalconLinear by name (module and qualname), forward x W^T + b."""
    cls = type("FalconLinear", (nn.Linear,), {"forward": lambda self, x: x @ self.weight.T + self.bias, **attributes})
    cls.__module__, cls.__qualname__ = "transformers.models.falcon.modeling_falcon", "FalconLinear"
    return cls


def test_falcon_linear_is_plain_only_while_its_forward_is_all_it_overrides():
    """FalconLinear's own forward is accepted as F.linear, but a FalconLinear that also overrides attribute lookup is
    not plain and is not merged into."""
    plain = _falcon_linear()
    assert linear_class_override(plain) is None and is_plain_linear(plain(4, 4))
    lookup = _falcon_linear(__getattr__=lambda self, name: nn.Linear.__getattr__(self, name))
    assert linear_class_override(lookup) == "__getattr__"
    assert not is_plain_linear(lookup(4, 4))
    layer = MissLinear(lookup(4, 4), r=2, init_weights=False)
    with pytest.raises(ValueError, match="overrides nn.Linear's __getattr__"):
        layer.merge()


def test_a_bat_adapter_is_added_and_exact_while_global_module_hooks_are_registered():
    """Bat never calls the base layer, so a global module forward hook (a profiler's) neither refuses a bat adapter nor
    changes its output."""
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        base = nn.Linear(8, 12).double()
        layer = MissLinear(base, r=4, mode="bat")
        with torch.no_grad():
            layer.miss_block.copy_(rand(3, 4, 4, dtype=F64) * 0.2)
        x = rand(5, 8, dtype=F64)
        y = layer(x)
    finally:
        handle.remove()
    want = x @ bat_weight_ref(base.weight, layer.miss_block).t() + base.bias
    torch.testing.assert_close(y, want.detach(), **TOL64)


def test_a_linear_whose_weight_is_a_buffer_is_merged_and_unmerged_in_place():
    """A base nn.Linear holding its weight as a registered buffer (a frozen base) takes merge and unmerge: W moves by
    dW and back, the output stays the unmerged one."""
    base = nn.Linear(10, 12).double()
    weight = base.weight.detach().clone()
    del base.weight
    base.register_buffer("weight", weight)
    original = weight.clone()
    layer = MissLinear(base, r=3, init_weights=False)
    x = rand(4, 10, dtype=F64)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(base.weight, merge_ref(original, layer.miss_block), **TOL64)
        torch.testing.assert_close(layer(x), before, **TOL64)
        layer.unmerge()
    assert base.weight is weight and not layer.merged
    torch.testing.assert_close(base.weight, original, **TOL64)


# ---------------------------------------------------------------------------------------------
# Python op wrappers (miss_ext/ops.py) and build_info (miss_ext/_library.py)
# ---------------------------------------------------------------------------------------------
def test_the_op_wrappers_hand_dtype_alpha_reverse_and_residual_to_the_ops():
    """miss_ext.fold's dtype, tile_add's alpha, merge_'s reverse and bat_transform's residual reach the op."""
    x = rand(3, 10)
    s = miss_ext.ops.fold(x, 4, dtype=F64)
    assert s.dtype == F64
    torch.testing.assert_close(s, fold_ref(x, 4), **TOL64)  # float32 values summed in float64: exact
    out, src = rand(4, 9, dtype=F64), rand(4, 3, dtype=F64)
    torch.testing.assert_close(miss_ext.ops.tile_add(out, src, -0.5), tile_add_ref(out, src, -0.5), **TOL64)
    out2 = out.clone()
    miss_ext.ops.tile_add_(out2, src, -0.5)
    torch.testing.assert_close(out2, tile_add_ref(out, src, -0.5), **TOL64)
    w, blk = rand(12, 8, dtype=F64), rand(3, 12, dtype=F64)
    unmerged = w.clone()
    miss_ext.ops.merge_(unmerged, blk, True)
    torch.testing.assert_close(unmerged, merge_ref(w, blk, reverse=True), **TOL64)
    torch.testing.assert_close(miss_ext.ops.merge(w, blk, True), merge_ref(w, blk, reverse=True), **TOL64)
    m, p = rand(3, 4, 4, dtype=F64) * 0.2, rand(3, 4, 4, dtype=F64) * 0.2
    torch.testing.assert_close(miss_ext.ops.bat_transform(w, m, p, residual=True),
                               bat_transform_ref(w, m, p, residual=True), **TOL64)
    w2 = w.clone()
    miss_ext.ops.bat_transform_(w2, m, p, residual=True)
    torch.testing.assert_close(w2, bat_transform_ref(w, m, p, residual=True), **TOL64)


def test_build_info_of_a_cpu_only_build_has_empty_cuda_fields(monkeypatch):
    """A CPU-only build writes no CUDA keys; build_info() still gives cuda_version "" and cuda_archs []."""
    monkeypatch.setattr(torch.ops.miss, "build_info",
                        lambda: "backends=CPU;built_with_torch=2.14.1;cxx_runtime=private;sanitize=")
    info = miss_ext.build_info()
    assert info["backends"] == ["CPU"]
    assert info["cuda_version"] == "" and info["cuda_archs"] == []
