"""MissLinear on base layers that are more than a plain nn.Linear (issue 10, kind 1).

The adapted layer must compute exactly what the base module computes plus the adapter term:
subclasses with their own forward (QAT fake quantisation, quantized weights), forward and
backward hooks (before or after apply_miss, global ones too), parametrizations and tensor-subclass
weights (FSDP2's DTensor shards). Only a plain nn.Linear takes the fused miss.linear path.
Expected values: the base module itself, plus the float64 formula of the adapter term
(tests/reference.py), and PEFT's own MissLinear on the same base where PEFT accepts it.
"""
import copy
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils._python_dispatch import TorchDispatchMode

import miss_ext
from conftest import DEVICES, rand
from miss_ext.base_layers import merge_refusal
from miss_ext.modules import is_plain_linear, linear_class_override
from reference import F64, fold_ref, tile_block

IN, OUT, R = 16, 8, 4


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket._qualified_op_name))
        return func(*args, **(kwargs or {}))


def adapter_term(x, block, out_features):
    """fold(x) @ tile(block) in float64 (dropout off)."""
    x64 = x.detach().to(F64)
    s = fold_ref(x64.reshape(-1, x.shape[-1]), block.shape[0]).reshape(*x.shape[:-1], block.shape[0])
    return s @ tile_block(block.detach().to(F64), out_features)


def adapt(base, mode="default", mini_r=1, r=R):
    """MissLinear on `base` with a random non-zero block."""
    layer = miss_ext.MissLinear(base, r, mode=mode, mini_r=mini_r, init_weights=False)
    with torch.no_grad():
        layer.miss_block.uniform_(-0.5, 0.5)
    return layer


# ---- the variants of "not exactly nn.Linear.forward" ------------------------------------------
class ScaledLinear(nn.Linear):
    """A subclass with its own forward."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias) - 0.25


class Int8Linear(nn.Linear):
    """A quantized linear: int8 weight and a per-row scale, dequantized in forward (the shape of
    bitsandbytes' / torchao's weight-only int8 layers)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=True)
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        del self.weight
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.bias.copy_(linear.bias)

    def forward(self, x):
        return F.linear(x, (self.weight.to(x.dtype) * self.scale.to(x.dtype)), self.bias.to(x.dtype))


class Doubling(nn.Module):
    def forward(self, w):
        return 2 * w


def qat_linear():
    import torch.ao.nn.qat as nnqat
    from torch.ao.quantization import get_default_qat_qconfig

    lin = nnqat.Linear(IN, OUT, qconfig=get_default_qat_qconfig("x86"))
    with torch.no_grad():
        lin(torch.randn(32, IN))  # let the observers see data, then freeze them
    lin.apply(torch.ao.quantization.disable_observer)
    return lin


def hooked(kind):
    """nn.Linear with a hook of `kind`; returns (base, list that records hook calls)."""
    base = nn.Linear(IN, OUT)
    calls = []
    if kind == "forward":
        base.register_forward_hook(lambda m, args, out: (calls.append("f"), out * 1.5 + 0.1)[1])
    elif kind == "pre":
        base.register_forward_pre_hook(lambda m, args: (calls.append("p"), (args[0] * 0.5,))[1])
    elif kind == "parametrize":
        parametrize.register_parametrization(base, "weight", Doubling())
    return base, calls


BASES = {
    "subclass-forward": lambda: (ScaledLinear(IN, OUT), None),
    "qat": lambda: (qat_linear(), None),
    "int8": lambda: (Int8Linear(nn.Linear(IN, OUT)), None),
    "forward-hook": lambda: hooked("forward"),
    "pre-hook": lambda: hooked("pre"),
    "parametrize": lambda: hooked("parametrize"),
}


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4)])
def test_adapted_layer_is_the_base_module_plus_the_adapter_term(kind, mode, mini_r, device):
    base, calls = BASES[kind]()
    base = base.to(device)
    reference = copy.deepcopy(base).eval()
    layer = adapt(base, mode, mini_r).eval()
    assert not is_plain_linear(layer.base_layer)
    x = rand(3, 5, IN, device=device)
    with torch.no_grad():
        expected = reference(x).to(F64) + adapter_term(x, layer.miss_block, OUT)
        n_before = len(calls) if calls is not None else 0
        with OpNames() as log:
            y = layer(x)
    torch.testing.assert_close(y.to(F64), expected, rtol=1e-5, atol=1e-5)
    assert "miss::linear" not in log.names and "miss::fold" in log.names, log.names
    if calls is not None and kind != "parametrize":
        assert len(calls) == n_before + 1, "the base layer's hook did not fire"
    # gradients reach the block (and x) through the base module's own backward
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert layer.miss_block.grad is not None and layer.miss_block.grad.abs().sum() > 0
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_qat_zero_init_is_an_exact_identity_as_in_the_issue():
    lin = qat_linear()
    net = nn.Sequential(lin).eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        y_base = net(x)
    m = copy.deepcopy(net)
    miss_ext.apply_miss(m, ["0"], r=4)
    with torch.no_grad():
        assert torch.equal(m(x), y_base)  # was 6.1e-3 off: the fused path skipped fake quantisation


def test_qat_matches_peft():
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model

    lin = qat_linear()
    ours = adapt(copy.deepcopy(lin)).eval()
    net = nn.Sequential()
    net.add_module("lin", copy.deepcopy(lin))
    model = get_peft_model(net, MissConfig(r=R, init_weights=False, target_modules=["lin"])).eval()
    theirs = model.base_model.model.lin
    with torch.no_grad():
        theirs.miss_block["default"].copy_(ours.miss_block)
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("hook", ["forward", "pre", "global-forward", "backward"])
def test_hooks_on_the_base_fire_before_or_after_apply_miss(hook, when):
    net = nn.Sequential(nn.Linear(IN, OUT))
    calls = []
    handles = []

    def install():
        base = net[0].base_layer if isinstance(net[0], miss_ext.MissLinear) else net[0]
        if hook == "forward":
            handles.append(base.register_forward_hook(lambda m, a, out: (calls.append("f"), out + 1.0)[1]))
        elif hook == "pre":
            handles.append(base.register_forward_pre_hook(lambda m, a: (calls.append("p"), (a[0] * 3.0,))[1]))
        elif hook == "global-forward":
            handles.append(nn.modules.module.register_module_forward_hook(
                lambda m, a, out: (calls.append(type(m).__name__), out)[1]))
        else:
            handles.append(base.register_full_backward_hook(lambda m, gin, gout: calls.append("b")))

    try:
        if when == "before":
            install()
        miss_ext.apply_miss(net, ["0"], r=R, init_weights=False)
        if when == "after":
            install()
        layer = net[0]
        x = rand(4, IN, requires_grad=True)
        y = net(x)
        w, b = layer.base_layer.weight, layer.base_layer.bias
        base_out = {"forward": F.linear(x, w, b) + 1.0, "pre": F.linear(3.0 * x, w, b)}.get(hook, F.linear(x, w, b))
        expected = base_out.detach().to(F64) + adapter_term(x, layer.miss_block, OUT)
        torch.testing.assert_close(y.detach().to(F64), expected, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        fired = {"forward": "f", "pre": "p", "global-forward": "Linear", "backward": "b"}[hook]
        assert fired in calls, f"{hook} hook registered {when} apply_miss did not fire: {calls}"
    finally:
        for h in handles:
            h.remove()


def test_plain_linear_keeps_the_fused_path_and_hooks_switch_it_off():
    layer = adapt(nn.Linear(IN, OUT))
    x = rand(4, IN)
    with OpNames() as log:
        layer(x)
    assert "miss::tile_add" not in log.names and any(n == "miss::linear" or n == "miss::fold" for n in log.names)
    fused = layer(x)
    handle = layer.base_layer.register_forward_hook(lambda m, a, out: out)
    with OpNames() as log:
        unfused = layer(x)
    assert "miss::tile_add" in log.names, log.names
    torch.testing.assert_close(unfused, fused, rtol=1e-6, atol=1e-6)
    # Both paths take r from the block: an edited `r` attribute used to reach only the hooked one
    # (a shape error there, while the fused path ignored it).
    layer.r = layer.r - 1
    torch.testing.assert_close(layer(x), fused, rtol=1e-6, atol=1e-6)
    handle.remove()
    assert is_plain_linear(layer.base_layer)


def test_quantized_base_gets_a_float32_block_and_refuses_merge():
    base = Int8Linear(nn.Linear(IN, OUT))
    layer = adapt(base)
    assert layer.miss_block.dtype == torch.float32 and layer.miss_block.shape == (R, OUT)
    weight = base.weight.clone()
    with pytest.raises(ValueError, match=r"cannot merge into (\w+\.)*Int8Linear: its weight has dtype torch\.int8"):
        layer.merge()
    assert torch.equal(base.weight, weight) and not layer.merged


@pytest.mark.parametrize("kind,pattern", [
    ("subclass-forward", r"does not compute exactly F\.linear"),
    ("qat", r"does not compute exactly F\.linear"),
    ("forward-hook", r"does not compute exactly F\.linear"),
    ("parametrize", r"its weight is parametrized"),
])
def test_merge_refuses_where_it_could_not_equal_the_unmerged_layer(kind, pattern):
    base, _ = BASES[kind]()
    layer = adapt(base)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        layer.merge()
    with pytest.raises(ValueError, match=pattern):
        layer.merge(safe_merge=True)
    assert not layer.merged
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bat_needs_a_plain_linear():
    with pytest.raises(TypeError, match="bat mode .* needs a plain nn.Linear base"):
        miss_ext.MissLinear(ScaledLinear(IN, OUT), 4, mode="bat")
    layer = miss_ext.MissLinear(nn.Linear(IN, OUT), 4, mode="bat")
    layer.base_layer.register_forward_hook(lambda m, a, out: out)
    with pytest.raises(RuntimeError, match="bat mode needs a plain nn.Linear base"):
        layer(rand(2, IN))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["MissLinear", "MissBankLinear"])
def test_weight_of_an_adapted_layer_describes_the_base_and_refuses_arithmetic(kind, device):
    """transformers' T5 reads wo.weight.dtype before calling wo: the metadata is given. Computing
    with the weight instead of calling the layer would bypass the adapter: refused, naming it."""
    from miss_ext.bank import MissBankLinear
    base = nn.Linear(IN, OUT).to(torch.float64)
    layer = (adapt(base) if kind == "MissLinear" else MissBankLinear(base, capacity=2, max_r=R)).to(device)
    w, b = layer.weight, layer.bias
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64 and w.device == base.weight.device
    assert w.device.type == device
    assert w.shape == (OUT, IN) and w.size() == (OUT, IN) and w.dim() == 2 and w.numel() == OUT * IN
    assert w.is_floating_point() and not w.requires_grad and b.shape == (OUT,)
    x = rand(3, IN).double().to(device)
    for use in (lambda: x @ w.T, lambda: nn.functional.linear(x, w), lambda: torch.cat([w, w]), lambda: w.data,
                lambda: w + 1, lambda: w[0], lambda: w.float(), lambda: w.tolist(), lambda: b * 2):
        with pytest.raises(RuntimeError, match=rf"{kind}.*\.(weight|bias) gives the base layer's.*bypass the adapter"
                                               r".*base_layer\.(weight|bias)"):
            use()
    assert kind in repr(w) and "computing with it is refused" in repr(w)
    # Below torch's Python layer (DLPack reads memory without asking the subclass): no crash (a
    # storage-less tensor gave a null pointer there), the base's values, as PEFT's layers give.
    exported = torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(w))
    assert torch.equal(exported, layer.base_layer.weight.detach())
    no_bias = adapt(nn.Linear(IN, OUT, bias=False)) if kind == "MissLinear" else \
        MissBankLinear(nn.Linear(IN, OUT, bias=False), capacity=2, max_r=R)
    assert no_bias.bias is None  # as nn.Linear reports it
    with pytest.raises(AttributeError, match="no attribute 'weights'"):
        layer.weights  # noqa: B018  (other names: the usual error)


@pytest.mark.parametrize("kind", ["MissLinear", "MissBankLinear"])
def test_assigning_weight_of_an_adapted_layer_is_refused_unless_it_is_the_base_tensor(kind):
    """transformers' tie_weights() sets lm_head.weight = embed.weight: already the base's tensor
    when the tie holds, so a no-op. Anything else is refused (it used to register a stray
    parameter that the forward never reads)."""
    from miss_ext.bank import MissBankLinear
    base = nn.Linear(IN, OUT)
    layer = adapt(base) if kind == "MissLinear" else MissBankLinear(base, capacity=2, max_r=R)
    keys = set(layer.state_dict())
    layer.weight = base.weight
    layer.bias = base.bias
    assert layer.base_layer.weight is base.weight and set(layer.state_dict()) == keys
    with pytest.raises(AttributeError, match=r"setting \.weight on an adapted layer is refused.*base_layer\.weight"):
        layer.weight = nn.Parameter(torch.zeros(OUT, IN))
    assert layer.base_layer.weight is base.weight and set(layer.state_dict()) == keys


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated")
def test_torchscript_takes_the_path_of_the_base_it_was_scripted_with():
    for base in (ScaledLinear(IN, OUT), nn.Linear(IN, OUT)):
        layer = adapt(base).eval()
        scripted = torch.jit.script(layer)
        x = rand(3, IN)
        torch.testing.assert_close(scripted(x), layer(x), rtol=0, atol=0)


def test_load_adapter_into_a_qat_model_behaves_the_same(tmp_path):
    net = nn.Sequential(nn.Linear(IN, OUT))
    miss_ext.apply_miss(net, ["0"], r=R, init_weights=False)
    miss_ext.save_adapter(net, tmp_path)
    qat = nn.Sequential(qat_linear()).eval()
    expected_base = copy.deepcopy(qat)
    miss_ext.load_adapter(qat, tmp_path)
    x = torch.randn(5, IN)
    with torch.no_grad():
        expected = expected_base(x).to(F64) + adapter_term(x, net[0].miss_block, OUT)
        torch.testing.assert_close(qat(x).to(F64), expected, rtol=1e-5, atol=1e-5)


# ---- FSDP2: a DTensor-sharded base -----------------------------------------------------------
def test_fsdp2_sharded_base_before_apply_miss(gloo_world):
    """The issue's case: fully_shard(net.proj); fully_shard(net) before apply_miss raised
    'aten.linear.default got mixed torch.Tensor and DTensor'. The base module (FSDP's own
    forward, which all-gathers the weight) now runs, and the adapter is added to its output."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(IN, OUT))
    plain = copy.deepcopy(net)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))  # the default mesh is CUDA's where a GPU is visible
    fully_shard(net.proj, mesh=mesh)
    fully_shard(net, mesh=mesh)
    miss_ext.apply_miss(net, ["proj"], r=R, init_weights=False)
    miss_ext.apply_miss(plain, ["proj"], r=R, init_weights=False)
    with torch.no_grad():
        plain.proj.miss_block.copy_(net.proj.miss_block)
    x = rand(6, IN)
    y = net(x)
    torch.testing.assert_close(y, plain(x), rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(net.proj.miss_block.grad, plain.proj.miss_block.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FSDP2"):
        net.proj.merge()
    assert math.isfinite(y.sum().item())


@pytest.mark.parametrize("parametrized", [False, True])
def test_fsdp2_sharded_conv1d_before_apply_miss_is_adapted_as_a_conv1d(gloo_world, parametrized, tmp_path):
    """fully_shard swaps a module's class for an `FSDP<cls>` subclass. A transformers Conv1D
    sharded before apply_miss was refused as an unknown FSDPConv1D (where an nn.Linear is
    adapted: the test above); a parametrized one sharded after had its class read as FSDPModule.
    Now it is a Conv1D: adapted, its weight read (in, out), merge refused as under FSDP2, PEFT's
    Conv1D warning on save."""
    pytest.importorskip("transformers")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", Conv1D(OUT, IN).double())
    if parametrized:
        parametrize.register_parametrization(net.proj, "weight", Scale())
    plain = copy.deepcopy(net)
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(net.proj, mesh=mesh)
    fully_shard(net, mesh=mesh)
    miss_ext.apply_miss(net, ["proj"], r=R, init_weights=False)
    assert (net.proj.in_features, net.proj.out_features) == (IN, OUT)
    W = plain.proj.weight.detach()  # (in, out), the parametrization applied
    D = net.proj.miss_block.detach().double().requires_grad_()
    x = torch.randn(6, IN, dtype=torch.float64)
    y = net(x)
    expected = x @ W + plain.proj.bias.detach() + fold_ref(x, R) @ D
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(net.proj.miss_block.grad, D.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="FSDP2|parametriz"):
        net.proj.merge()
    with pytest.warns(UserWarning, match="Conv1D"):
        miss_ext.save_adapter(net, tmp_path / "adapter")


def test_fsdp2_refuses_accelerated_peft_merges(gloo_world):
    """An accelerated PEFT model under FSDP2 (root only): an eval forward leaves the root
    unsharded, so each base is a plain nn.Linear holding FSDP's gathered copy and takes the fast
    path. merge_adapter and merge_and_unload used to merge into those copies, which the next
    reshard dropped (the layers then counted as merged: logits off by 0.5, or the adapter lost);
    now refused, with the outputs unchanged."""
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(IN, OUT))
    model = miss_ext.peft.accelerate(get_peft_model(net, MissConfig(r=R, target_modules=["proj"], init_weights=False)))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    x = rand(6, IN)
    with torch.no_grad():
        expected = model(x)
    layer = model.base_model.model.proj
    assert type(layer.base_layer.weight).__name__ == "Parameter"  # FSDP's gathered copy, not a DTensor
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="FSDP2"):
            merge()
        assert not layer.merged_adapters
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    layer.quantization_backend = "a quantized base"  # PEFT's merge code (dequantize, requantize): refused too
    with pytest.raises(ValueError, match="FSDP2"):
        model.merge_adapter()
    assert not layer.merged_adapters


def test_merge_and_unload_refuses_before_changing_any_layer():
    net = nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT))
    miss_ext.apply_miss(net, ["0", "1"], r=R, init_weights=False)
    net[1].base_layer.register_forward_hook(lambda m, a, out: out * 2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was merged.*\n1: it does not compute exactly F\.linear"):
        miss_ext.merge_and_unload(net)
    assert isinstance(net[0], miss_ext.MissLinear) and not net[0].merged
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_accelerated_peft_layer_on_a_parametrized_base():
    """PEFT's merge writes `base_layer.weight` in place, which for a parametrized weight is a
    temporary: the accelerated layer refuses instead of reporting a merge that did not happen;
    its forward (PEFT's code for such a base) equals PEFT's."""
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model

    from miss_ext.peft import accelerate

    net = nn.Sequential()
    net.add_module("lin", nn.Linear(IN, OUT))
    parametrize.register_parametrization(net.lin, "weight", Doubling())
    model = get_peft_model(net, MissConfig(r=R, init_weights=False, target_modules=["lin"])).eval()
    fast = accelerate(copy.deepcopy(model))
    x = rand(3, IN)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)
    layer = fast.base_model.model.lin
    original = layer.base_layer.parametrizations.weight.original.clone()
    with pytest.raises(ValueError, match="its weight is parametrized"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.parametrizations.weight.original, original)


# ---- every check before any change, in apply_miss and load_adapter -----------------------------
def _hooked_pair():
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    net[1].register_forward_hook(lambda m, a, out: out)
    return net


def test_apply_miss_bat_on_a_hooked_base_changes_nothing():
    from conftest import assert_unchanged, snapshot

    net = _hooked_pair()
    snap = snapshot(net)
    with pytest.raises(TypeError, match=r"^1: bat mode .* needs a plain nn\.Linear base"):
        miss_ext.apply_miss(net, ["0", "1"], r=4, mode="bat")
    assert_unchanged(net, snap)


def test_load_adapter_bat_into_a_hooked_base_changes_nothing(tmp_path):
    from conftest import assert_unchanged, snapshot

    source = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    miss_ext.apply_miss(source, ["0", "1"], r=4, mode="bat", init_weights=False)
    miss_ext.save_adapter(source, tmp_path)
    net = _hooked_pair()
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"nothing was loaded:\n  1: bat mode .* needs a plain nn\.Linear base"):
        miss_ext.load_adapter(net, tmp_path)
    assert_unchanged(net, snap)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(IN, 2, batch_first=True)
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_linears_whose_parent_reads_the_weight_are_skipped_or_refused():
    """nn.MultiheadAttention reads out_proj.weight itself: an adapter there would never run."""
    model = Attention()
    with pytest.warns(UserWarning, match=r"'all-linear' skips attn\.out_proj"):
        miss_ext.apply_miss(model, "all-linear", r=R, init_weights=False)
    assert [name for name, _ in miss_ext.miss_layers(model)] == ["proj"]
    model(rand(2, 3, IN))  # runs
    with pytest.raises(TypeError, match=r"attn\.out_proj: its parent MultiheadAttention reads the layer's weight"):
        miss_ext.apply_miss(Attention(), ["out_proj"], r=R)


def test_apply_miss_accepts_a_quantized_base_and_uses_its_own_sizes():
    net = nn.Sequential(Int8Linear(nn.Linear(IN, OUT)))
    reference = copy.deepcopy(net)
    miss_ext.apply_miss(net, ["0"], r=R, init_weights=False)
    layer = net[0]
    assert layer.miss_block.shape == (R, OUT) and layer.miss_block.dtype == torch.float32
    x = rand(4, IN)
    with torch.no_grad():
        expected = reference(x).to(F64) + adapter_term(x, layer.miss_block, OUT)
        torch.testing.assert_close(net(x).to(F64), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nothing was merged"):
        miss_ext.merge_and_unload(net)


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm"])
def test_a_parametrization_added_after_apply_miss_is_honoured(kind):
    net = nn.Sequential(nn.Linear(IN, OUT))
    miss_ext.apply_miss(net, ["0"], r=R, init_weights=False)
    base = net[0].base_layer
    if kind == "parametrize":
        parametrize.register_parametrization(base, "weight", Doubling())
    else:
        torch.nn.utils.parametrizations.weight_norm(base)
    x = rand(4, IN)
    with torch.no_grad():
        expected = F.linear(x, base.weight, base.bias).to(F64) + adapter_term(x, net[0].miss_block, OUT)
        torch.testing.assert_close(net(x).to(F64), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="its weight is parametrized"):
        net[0].merge()


class _ClassLevelParametrizations(nn.Linear):
    parametrizations = nn.ModuleDict({"weight": nn.ModuleList([nn.Identity()])})


def _linears_with_and_without_parametrizations():
    plain = nn.Linear(IN, OUT)
    parametrized = nn.Linear(IN, OUT)
    parametrize.register_parametrization(parametrized, "weight", Doubling())
    removed = nn.Linear(IN, OUT)
    parametrize.register_parametrization(removed, "weight", Doubling())
    parametrize.remove_parametrizations(removed, "weight")
    attribute = nn.Linear(IN, OUT)
    attribute.parametrizations = "not a ModuleDict"  # a plain attribute of that name
    empty = nn.Linear(IN, OUT)
    empty.parametrizations = nn.ModuleDict()  # a submodule of that name, holding nothing
    shadowed = nn.Linear(IN, OUT)
    shadowed.__dict__["weight"] = torch.ones(OUT, IN, dtype=torch.int64)  # what module.weight and F.linear see
    return {"plain": plain, "parametrized": parametrized, "removed": removed, "attribute": attribute,
            "empty": empty, "class-level": _ClassLevelParametrizations(IN, OUT), "shadowed": shadowed}


@pytest.mark.parametrize("kind", list(_linears_with_and_without_parametrizations()))
def test_the_quick_parametrization_check_agrees_with_torch(kind):
    """is_plain_linear asks whether a module is parametrized without parametrize.is_parametrized's
    getattr where no `parametrizations` exists anywhere (base_layers._parametrized: 0.9 us of every
    forward's checks). It must answer as torch does wherever the name exists in any form, and the
    fused path must be taken exactly when torch's answer and the rest say so; the weight it checks
    is the one module.weight gives (an instance attribute shadowing the parameter: a review)."""
    from miss_ext.base_layers import _parametrized
    module = _linears_with_and_without_parametrizations()[kind]
    assert _parametrized(module) == parametrize.is_parametrized(module)
    assert is_plain_linear(module) == (kind in ("plain", "removed", "attribute", "empty"))


@pytest.mark.parametrize("wo_dtype", [F64, torch.float32], ids=["float64", "wo-in-float32"])
def test_t5_with_an_adapter_on_wo_matches_peft(wo_dtype):
    """transformers' T5 feed-forward casts its hidden states to wo.weight.dtype, then calls wo (so
    that a wo kept in float32 by _keep_in_fp32_modules gets float32 input). With wo adapted that
    read raised AttributeError at the first forward, "all-linear" included; PEFT works. Now the
    metadata answers it: logits and block gradients equal PEFT's, also with wo in another dtype
    than the rest of the model (the cast matters there)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    base = transformers.T5ForConditionalGeneration(config).double().eval()
    for name, module in base.named_modules():
        if name.endswith(".wo"):
            module.to(wo_dtype)
    targets = ["q", "v", "wo"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(r=4, target_modules=targets,
                                                                      init_weights=False)).eval()
    ours = miss_ext.apply_miss(copy.deepcopy(base), targets, r=4).eval()
    their_blocks = {n.removeprefix("base_model.model.").removesuffix(".default"): p
                    for n, p in theirs.named_parameters() if "miss_block" in n}
    our_blocks = {n: p for n, p in ours.named_parameters() if "miss_block" in n}
    assert set(our_blocks) == set(their_blocks) and any(".wo." in n for n in our_blocks)
    with torch.no_grad():
        for n, p in our_blocks.items():
            p.copy_(their_blocks[n])
    ids = torch.randint(0, 64, (2, 5))
    labels = torch.randint(0, 64, (2, 4))
    out_theirs, out_ours = theirs(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-6, atol=1e-6)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for n, p in our_blocks.items():
        torch.testing.assert_close(p.grad, their_blocks[n].grad, rtol=1e-5, atol=1e-7, msg=n)


class _CastsToWeightDtype(nn.Module):
    """transformers' T5DenseActDense, reduced: casts to the adapted wo's weight dtype, then calls wo."""

    def __init__(self):
        super().__init__()
        self.wo = adapt(nn.Linear(IN, OUT).double())

    def forward(self, x):
        return self.wo(x.to(self.wo.weight.dtype))


@pytest.mark.parametrize("use, named", [(lambda w: w.data, ".data"), (lambda w: w.clamp(-1, 1), "clamp"),
                                         (lambda w: w.float(), "float")], ids=["data", "clamp", "float"])
def test_a_refused_use_of_the_weight_metadata_is_named_as_written(use, named):
    """The refusal names what the code did: `.weight.data` read "__get__ on it was refused" (a
    model-zoo review, 2026-12-05: Gemma3n's AltUp clamps prediction_coefs.weight.data in training),
    and says what to do when the model's own forward does it: leave the layer out of target_modules."""
    layer = adapt(nn.Linear(IN, OUT))
    with pytest.raises(RuntimeError) as info:
        use(layer.weight)
    message = str(info.value)
    assert f"; {named} on it was refused" in message and "__get__" not in message
    assert "leave it out of target_modules" in message and "exclude_modules" in message


def test_weight_metadata_reads_compile_with_fullgraph_and_a_bypass_still_fails():
    """Under torch.compile the read gives a meta tensor (the subclass cannot be traced): T5's
    pattern compiles with fullgraph=True, and computing with the weight fails while tracing."""

    model = _CastsToWeightDtype()
    x = rand(3, IN)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=0)
    with pytest.raises(Exception, match="device"):
        torch.compile(lambda x: x @ model.wo.weight.T, fullgraph=True)(x.double())


def test_weight_metadata_reads_trace_but_do_not_script():
    """README ("`.weight` / `.bias` of a MissLinear"): TorchScript cannot compile code that reads
    an adapted layer's weight (the answer is Python; a review, 2026-12-04, met the bare
    "has no attribute" message), so the README points to torch.jit.trace and the others: the
    trace of T5's pattern gives eager's output, the script fails at compile time, loudly."""

    model = _CastsToWeightDtype()
    x = rand(3, IN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch.jit's deprecation (torch 2.13+) is left alone below
        traced = torch.jit.trace(model, (x,))
        # The layer's resized-base check compared traced sizes: "the trace might be incorrect" on
        # every trace (a new-user pass, 2026-12-06).
        assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], caught
        assert traced(rand(5, IN)).shape == (5, OUT)  # not specialised to the traced batch
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="has no attribute 'weight'"):
            torch.jit.script(model)
        torch.jit.script(model.wo)  # the layer alone scripts


def test_a_base_that_returns_a_tuple_is_a_clear_error():
    """nn.Linear subclasses that return several values (transformers' PhimoeTopKRouter, which
    "all-linear" matches) failed with "'tuple' object has no attribute 'dtype'"."""

    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.softmax(-1)

    layer = adapt(Router(IN, OUT))
    with pytest.raises(TypeError, match=r"base layer Router returned a tuple, not a tensor.*target_modules"):
        layer(rand(3, IN))


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_falcon_linear_merges_and_takes_bat_as_peft_does(mode, tmp_path):
    """transformers' FalconLinear is an nn.Linear subclass whose forward is x @ W.T + b: F.linear
    written out (base_layers.EXACT_LINEAR_SUBCLASSES). Refused as a subclass, merge_and_unload and bat
    failed where PEFT does both, and PEFT's Falcon bat adapter files could not be loaded."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    base = transformers.FalconForCausalLM(config).double().eval()
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(
        r=4, target_modules=targets, init_weights="bat" if mode == "bat" else False)).eval()
    with torch.no_grad():
        for p in (p for n, p in theirs.named_parameters() if "miss_block" in n):
            p.uniform_(-0.05, 0.05)
    theirs.save_pretrained(tmp_path)
    ours = miss_ext.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert any(type(m.base_layer).__name__ == "FalconLinear" for _, m in miss_ext.miss_layers(ours))
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-9, atol=1e-9)
        merged = miss_ext.merge_and_unload(ours)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-9, atol=1e-9)


# ---- bases found by a review of unusual base modules (2026-12-02) ------------------------------
def _recompute_weight_by_hook(layer, how):
    """torch.nn.utils.prune and the hook-based weight_norm keep the values in other tensors and
    recompute layer.weight before every forward."""
    if how == "prune":
        prune.l1_unstructured(layer, "weight", amount=0.0)  # a mask of ones: an identity
    else:
        torch.nn.utils.weight_norm(layer)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("how", ["prune", "weight_norm"])
@pytest.mark.parametrize("mode", ["default", "mini", "bat"])
def test_unmerge_into_a_weight_recomputed_by_a_hook_is_refused(how, mode):
    """Merge, then prune (or the hook-based weight_norm) the base, then unmerge: the unmerge wrote
    into .weight, which the hook overwrites before the next forward, and set merged=False, so every
    later forward added dW twice (0.9 off with a prune that changes nothing; PEFT does the same).
    Now refused, the layer left merged and its output unchanged."""
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, mode=mode, mini_r=4, init_weights=False).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
    layer.merge()
    _recompute_weight_by_hook(layer.base_layer, how)
    stored = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}
    with pytest.raises(ValueError, match="recomputed"):
        layer.unmerge()
    assert layer.merged
    assert all(torch.equal(p, stored[n]) for n, p in layer.base_layer.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    fresh = miss_ext.MissLinear(nn.Linear(16, 8), r=4, mode=mode, mini_r=4, init_weights=False)
    _recompute_weight_by_hook(fresh.base_layer, how)
    with pytest.raises(ValueError):
        fresh.merge()
    assert not fresh.merged


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_accelerated_peft_unmerge_into_a_pruned_weight_is_refused():
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model
    import miss_ext.peft
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), MissConfig(r=4, target_modules=["0"], init_weights=False))
    miss_ext.peft.accelerate(model.eval())
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
    model.merge_adapter()
    prune.l1_unstructured(model.base_model.model[0].base_layer, "weight", amount=0.0)
    with pytest.raises(ValueError, match="recomputed"):
        model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", ["apply_miss", "apply_bank"])
@pytest.mark.parametrize("targets", ["all-linear", ["2"], ["0"]])
def test_a_lazy_linear_is_refused_before_anything_changes(call, targets):
    """An unmaterialised nn.LazyLinear under "all-linear" raised torch's "uninitialized parameter"
    after an earlier layer had been adapted and frozen (the model changed by a failed call); named
    as a target, or elsewhere in the model, it raised torch's message from inside the target scan."""
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.LazyLinear(8))
    before = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(TypeError, match=r"2\.weight, 2\.bias are not materialised yet"):
        if call == "apply_miss":
            miss_ext.apply_miss(m, targets, r=4)
        else:
            miss_ext.apply_bank(m, targets, capacity=2, max_r=4)
    assert {n: p.requires_grad for n, p in m.named_parameters()} == before
    assert [type(c) for c in m] == [nn.Linear, nn.ReLU, nn.LazyLinear]
    with pytest.raises(TypeError, match="not materialised"):
        miss_ext.MissLinear(nn.LazyLinear(8), r=4)


class _Float8Linear(nn.Linear):
    """transformers' FP8Linear pattern: a float8 weight, its own forward."""

    def __init__(self, i, o):
        super().__init__(i, o)
        self.weight = nn.Parameter(self.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4)])
def test_a_float8_base_gets_a_float32_block_as_peft(mode, mini_r):
    """A float8 base got a float8 miss_block, and its forward raised "fold dtype must be a floating
    type"; PEFT upcasts float8 adapters to float32 (cast_adapter_dtype) and runs."""
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model
    torch.manual_seed(0)
    ours = miss_ext.apply_miss(nn.Sequential(_Float8Linear(16, 8)), ["0"], r=4, mode=mode, mini_r=mini_r).eval()
    torch.manual_seed(0)
    theirs = get_peft_model(nn.Sequential(_Float8Linear(16, 8)), MissConfig(
        r=4, mini_r=mini_r, init_weights=True if mode == "default" else mode, target_modules=["0"])).eval()
    assert ours[0].miss_block.dtype == torch.float32
    with torch.no_grad():
        v = 0.1 * torch.randn(ours[0].miss_block.shape)
        ours[0].miss_block.copy_(v)
        theirs.base_model.model[0].miss_block["default"].copy_(v)
        x = torch.randn(3, 16)
        torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError):
        ours[0].merge()


def test_a_class_level_patch_of_linear_forward_is_honoured():
    """nn.Linear.forward replaced at class level (a library, profiler or user code): PEFT calls the
    base and honours it; the fused path skipped it silently (0.95 off). Bat, which never calls the
    base (as PEFT's), is unaffected."""
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, init_weights=False).eval()
    x = torch.randn(3, 16)
    original = nn.Linear.forward
    nn.Linear.forward = lambda self, inp: 2.0 * F.linear(inp, self.weight, self.bias)
    try:
        assert not is_plain_linear(layer.base_layer) and is_plain_linear(layer.base_layer, global_hooks=False)
        with torch.no_grad():
            term = fold_ref(x.double(), 4) @ tile_block(layer.miss_block.double(), 8)
            want = 2.0 * F.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double()) + term
            torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
    finally:
        nn.Linear.forward = original
    assert is_plain_linear(layer.base_layer)


@pytest.mark.parametrize("patch", ["functools.wraps", "lambda"])
def test_importing_under_a_patched_linear_forward_finds_torch_forward_once_restored(patch):
    """miss_ext imported while nn.Linear.forward is a functools.wraps wrapper (a profiler, a tracer)
    took the wrapper for torch's forward (wraps copies __module__ / __qualname__): once the patch
    was removed every nn.Linear stayed non-plain for the process (merge refused, the fused path
    off; a review, 2026-12-05). Also with a plain function patched in at import. In a fresh
    process, since this one imported miss_ext already."""
    import subprocess
    import sys

    wrapper = ("import functools\n@functools.wraps(original)\ndef patched(self, x):\n    return original(self, x)\n"
               if patch == "functools.wraps" else "patched = lambda self, x: original(self, x)\n")
    code = ("import torch\nfrom torch import nn\noriginal = nn.Linear.forward\n" + wrapper +
            "nn.Linear.forward = patched\n"
            "import miss_ext\nfrom miss_ext.modules import is_plain_linear\n"
            "during = is_plain_linear(nn.Linear(8, 6))\n"
            "nn.Linear.forward = original\n"
            "layer = miss_ext.MissLinear(nn.Linear(8, 6), r=2)\n"
            "layer.merge()\n"
            "print('during', during, 'after', is_plain_linear(nn.Linear(8, 6)), 'merged', layer.merged)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "during False after True merged True" in run.stdout, (run.stdout, run.stderr[-2000:])


def test_bank_on_multihead_attention_out_proj_is_refused_or_skipped():
    """apply_bank wrapped nn.MultiheadAttention.out_proj (by name and under "all-linear"), whose
    weight MHA reads directly: every forward of the model then raised. Now as apply_miss: refused
    by name, skipped with a warning by "all-linear"."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    m = Model()
    with pytest.raises(ValueError, match="reads the layer's weight directly"):
        miss_ext.apply_bank(m, ["attn.out_proj"], capacity=2, max_r=4)
    assert type(m.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.warns(UserWarning, match=r"apply_bank: target_modules='all-linear' skips attn\.out_proj") as seen:
        miss_ext.apply_bank(m, "all-linear", capacity=2, max_r=4)
    assert [w.filename for w in seen] == [__file__]  # the warning points at the call
    assert isinstance(m.fc, miss_ext.MissBankLinear)
    assert type(m.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    miss_ext.add_bank_adapter(m, "a", r=4)
    with miss_ext.mixed_batch(m, ["a", None]):
        assert m(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_complex_and_bool_weights_are_refused_when_the_adapter_is_added():
    """They used to be accepted and fail only at the first forward; a merge called them
    "quantized". A dynamically quantized linear (also named "Linear") is named in full."""
    for dtype in (torch.complex64, torch.bool):
        base = nn.Linear(16, 8).to(dtype) if dtype != torch.bool else nn.Linear(16, 8)
        if dtype == torch.bool:
            base.weight = nn.Parameter(torch.ones(8, 16, dtype=torch.bool), requires_grad=False)
        model = nn.Sequential(base)
        with pytest.raises(TypeError, match=rf"0: its weight has dtype {dtype}; MiSS computes in real floating"):
            miss_ext.apply_miss(model, ["0"], r=4)
        assert type(model[0]) is nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, in some versions
        quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)), {nn.Linear})
    with pytest.raises(TypeError, match=r"got torch\.ao\.nn\.quantized\.dynamic\.modules\.linear\.Linear"):
        miss_ext.MissLinear(quantized[0], r=4)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_fx_symbolic_trace_is_refused_by_name(mode):
    """torch.fx.symbolic_trace traces through the adapted layers with proxies; the errors it met
    blamed the base ("returned a Proxy") or hooks (bat). A clear TypeError instead."""
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(16, 8)), ["0"], r=4, mode=mode)
    with pytest.raises(TypeError, match="torch.fx.symbolic_trace cannot trace through an adapted layer"):
        torch.fx.symbolic_trace(model)


@pytest.mark.parametrize("x", [[[0.0] * 16], None, np.zeros((2, 16), dtype=np.float32)], ids=["list", "None", "numpy"])
@pytest.mark.parametrize("layer", ["miss", "bank"])
def test_an_input_that_is_no_tensor_is_refused_by_name(x, layer):
    """A list, None or a NumPy array as x met `x.is_nested` first: an AttributeError about the
    list (a new-user pass, 2026-12-04). A TypeError naming x and its type instead."""
    if layer == "miss":
        module, args = miss_ext.MissLinear(nn.Linear(16, 8), r=4), ()
    else:
        module = miss_ext.MissBankLinear(nn.Linear(16, 8), capacity=2, max_r=4)
        module.add_adapter("a", r=2)
        args = (module.index_of(["a"]),)
    with pytest.raises(TypeError, match=f"x must be a torch.Tensor, got {type(x).__name__}"):
        module(x, *args)


@pytest.mark.parametrize("init_weights", [True, False])
def test_a_model_materialised_from_the_meta_device_is_initialised_by_reset_parameters(init_weights):
    """The meta-device setup (FSDP2's, large models): build on meta, adapt, to_empty(), then
    reset_parameters() on every module that has one, then load the base weights. The blocks kept
    uninitialised memory (no reset_parameters: logits 0.33-0.49 off the base, a new-user pass,
    2026-12-04): now PEFT's zero init (the base exactly) or its random init, as constructed. A bank
    built there has ranks 0 and zero blocks, takes adapters afterwards (not before: their ranks
    would be kept nowhere), and a merged layer refuses reset_parameters, unchanged."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    x = torch.randn(3, 16)
    for build in (lambda m: miss_ext.apply_miss(m, ["0", "2"], r=4, init_weights=init_weights),
                  lambda m: miss_ext.apply_bank(m, ["0", "2"], capacity=2, max_r=4)):
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
        build(model)
        if isinstance(model[0], miss_ext.MissBankLinear):
            with pytest.raises(ValueError, match="the bank is on the meta device"):
                miss_ext.add_bank_adapter(model, "a", r=4)
        model.to_empty(device="cpu")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                with torch.no_grad():
                    module.reset_parameters()
        state = {k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"): v
                 for k, v in ref.state_dict().items()}
        assert not model.load_state_dict(state, strict=False).unexpected_keys
        if isinstance(model[0], miss_ext.MissBankLinear):
            layer = model[0]
            assert layer.ranks.tolist() == [0, 0] and layer.periods.tolist() == [0, 0] and not layer.bank.any()
            miss_ext.add_bank_adapter(model, "a", r=4)
            assert layer.ranks.tolist() == [4, 0]
            with torch.no_grad(), miss_ext.mixed_batch(model, ["a", None, "a"]):
                torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        elif init_weights:
            assert not model[0].miss_block.any()
            with torch.no_grad():
                torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        else:  # kaiming-uniform: within its bound, not the memory's leftovers
            block = model[0].miss_block
            assert block.any() and block.abs().max() <= 1 / math.sqrt(block.shape[1])
    layer = miss_ext.MissLinear(nn.Linear(16, 8), r=4, init_weights=False)
    layer.merge()
    before = layer.miss_block.detach().clone()
    with pytest.raises(RuntimeError, match="reset_parameters\\(\\) on a merged layer"):
        layer.reset_parameters()
    assert torch.equal(layer.miss_block, before)


# ---- nn.Linear subclasses that leave nn.Linear's computation alone (EsmFoldLinear) --------------
class InitOnlyLinear(nn.Linear):
    """transformers' EsmFoldLinear pattern: only the initialisation differs; forward, weight and
    bias are nn.Linear's."""

    def __init__(self, i, o, bias=True, scale=0.3):
        self.scale = scale
        super().__init__(i, o, bias=bias)

    def reset_parameters(self):
        with torch.no_grad():
            nn.init.normal_(self.weight, std=getattr(self, "scale", 0.3))
            if self.bias is not None:
                nn.init.uniform_(self.bias, -0.1, 0.1)


class _Mixin:
    """A mixin after nn.Linear in the MRO, with nothing that takes part in the call."""

    def describe(self):
        return "mixin"


class InitOnlyWithMixin(InitOnlyLinear, _Mixin):
    pass


class _InitsItsParameters(nn.Linear):
    """nn.Linear's reset_parameters initialises self.weight: where that is not the registered
    parameter (below), it would fill a temporary and leave the parameter uninitialised memory."""

    def reset_parameters(self):
        with torch.no_grad():
            for t in self._parameters.values():
                t.uniform_(-0.3, 0.3)


class DoubledWeightLinear(_InitsItsParameters):
    """`weight` as a property: the module computes with 2 W, not its registered parameter."""

    @property
    def weight(self):
        w = self._parameters.get("weight")
        if w is None:
            raise AttributeError("weight")  # while nn.Linear.__init__ registers it
        return 2.0 * w


class _WeightPropertyMixin:
    @property
    def weight(self):
        w = self._parameters.get("weight")
        if w is None:
            raise AttributeError("weight")
        return 2.0 * w


class MixinWeightLinear(_InitsItsParameters, _WeightPropertyMixin):
    """The property comes from a mixin after nn.Linear in the MRO (nn.Module has no `weight`)."""


class GetattrLinear(_InitsItsParameters):
    """__getattr__ decides what self.weight is (parameters are found through it)."""

    def __getattr__(self, name):
        value = super().__getattr__(name)
        return 2.0 * value if name == "weight" else value


class CallLinear(nn.Linear):
    """__call__ of its own: calling the module is not nn.Module's call."""

    def __call__(self, x):
        return super().__call__(x) + 1.0


class TorchFunctionLinear(nn.Linear):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [InitOnlyLinear, InitOnlyWithMixin])
@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4), ("bat", 1)])
def test_a_subclass_that_changes_only_init_is_plain_and_merges(cls, mode, mini_r):
    """transformers' EsmFoldLinear (only __init__ differs) was refused for merge as "a subclass
    with its own forward", and miss_ext.peft.accelerate turned PEFT's working merge_and_unload into
    that error. A subclass whose call runs nn.Linear's own code on its own weight and bias is
    plain (base_layers.linear_class_override): fused path, merge, bat."""
    torch.manual_seed(0)
    base = cls(IN, OUT)
    assert is_plain_linear(base) and linear_class_override(cls) is None
    reference = nn.Linear(IN, OUT)
    with torch.no_grad():
        reference.weight.copy_(base.weight)
        reference.bias.copy_(base.bias)
    ours = miss_ext.MissLinear(base, R, mode=mode, mini_r=mini_r, init_weights=False).eval()
    plain = miss_ext.MissLinear(reference, R, mode=mode, mini_r=mini_r).eval()
    with torch.no_grad():
        ours.miss_block.uniform_(-0.2, 0.2)
        plain.miss_block.copy_(ours.miss_block)
    x = rand(5, IN)
    # The fused path: the layer's forward calls miss.linear (bat: miss.bat_linear, never unfused).
    # (Not told by the ops a dispatch mode sees: under one, miss.linear's composite adds its term
    # with the functional tile_add, as the unfused path does; csrc/ops/common/in_place.h.)
    fused_op = torch.ops.miss.bat_linear if mode == "bat" else torch.ops.miss.linear
    calls = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.ops.miss, fused_op.__name__,
                      lambda *args: calls.append(1) or fused_op(*args))
        y = ours(x)
    assert calls == [1]
    with torch.no_grad():
        assert torch.equal(y, plain(x))
        ours.merge()
        assert ours.merged
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours.base_layer.weight, reference.weight, rtol=1e-5, atol=1e-5)
    model = miss_ext.apply_miss(nn.Sequential(cls(IN, OUT)), ["0"], r=R, mode=mode, mini_r=mini_r,
                                init_weights=False).eval()
    with torch.no_grad():
        before = model(x)
        merged = miss_ext.merge_and_unload(model)
        assert type(merged[0]) is cls
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_an_init_only_subclass_merges_in_an_accelerated_peft_model_as_in_peft():
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model
    import miss_ext.peft

    def model():
        torch.manual_seed(0)
        return get_peft_model(nn.Sequential(InitOnlyLinear(IN, OUT)),
                              MissConfig(r=R, target_modules=["0"], init_weights=False)).eval()

    x = rand(3, IN)
    theirs = model()
    with torch.no_grad():
        adapted = theirs(x)
        want = theirs.merge_and_unload()(x)
    ours = model()
    miss_ext.peft.accelerate(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), adapted, rtol=1e-6, atol=1e-6)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,attribute", [
    (ScaledLinear, "forward"),
    (DoubledWeightLinear, r"weight \(a builtins\.property\)|weight \(a property\)"),
    (MixinWeightLinear, r"weight \(a builtins\.property\)|weight \(a property\)"),
    (GetattrLinear, "__getattr__"),
    (CallLinear, "__call__"),
    (TorchFunctionLinear, "__torch_function__"),
])
def test_a_subclass_that_changes_the_call_is_not_plain(cls, attribute):
    """Anything through which the class takes part in module(x) (forward, nn.Module's call
    machinery, attribute lookup, weight / bias as class attributes, __torch_function__), anywhere in
    its MRO, keeps it off the fused path and refuses merge and bat, naming what it overrides; the
    layer computes the base module's own output plus the term."""
    torch.manual_seed(0)
    base = cls(IN, OUT)
    assert not is_plain_linear(base) and not is_plain_linear(base, global_hooks=False)
    assert re.fullmatch(attribute, linear_class_override(cls))
    layer = adapt(base).eval()
    reference = copy.deepcopy(base)
    x = rand(4, IN)
    with torch.no_grad(), OpNames() as log:
        y = layer(x)
    assert "miss::linear" not in log.names
    expected = reference(x).detach().to(F64) + adapter_term(x, layer.miss_block, OUT)
    torch.testing.assert_close(y.to(F64), expected, rtol=1e-5, atol=1e-5)
    weight = base._parameters["weight"].clone()
    # (weight / __getattr__: the merge would write into what the class returns, not the parameter)
    with pytest.raises(ValueError, match=rf"cannot merge into \S*{cls.__name__}: .*its class \S*{cls.__name__} "
                                         rf"overrides nn\.Linear's ({attribute})"):
        layer.merge()
    assert not layer.merged and torch.equal(base._parameters["weight"], weight)
    with pytest.raises(TypeError, match=rf"needs a plain nn\.Linear base"):
        miss_ext.MissLinear(cls(IN, OUT), R, mode="bat")


def test_a_class_level_change_of_an_init_only_subclass_is_honoured():
    """The class is read at every call: a forward assigned to the subclass (or nn.Linear.forward
    replaced) after the adapter was added switches the fused path off, as for nn.Linear."""

    class Later(InitOnlyLinear):
        pass

    torch.manual_seed(0)
    layer = adapt(Later(IN, OUT)).eval()
    assert is_plain_linear(layer.base_layer)
    x = rand(3, IN)
    with torch.no_grad():
        w, b = layer.base_layer.weight, layer.base_layer.bias
        term = adapter_term(x, layer.miss_block, OUT)
        Later.forward = lambda self, inp: 2.0 * F.linear(inp, self.weight, self.bias)
        assert not is_plain_linear(layer.base_layer) and not is_plain_linear(layer.base_layer, global_hooks=False)
        torch.testing.assert_close(layer(x).to(F64), 2.0 * F.linear(x, w, b).to(F64) + term, rtol=1e-5, atol=1e-5)
        del Later.forward
        original = nn.Linear.forward
        nn.Linear.forward = lambda self, inp: 3.0 * F.linear(inp, self.weight, self.bias)
        try:
            assert not is_plain_linear(layer.base_layer) and is_plain_linear(layer.base_layer, global_hooks=False)
            torch.testing.assert_close(layer(x).to(F64), 3.0 * F.linear(x, w, b).to(F64) + term, rtol=1e-5, atol=1e-5)
        finally:
            nn.Linear.forward = original
        assert is_plain_linear(layer.base_layer)


def test_an_init_only_subclass_compiles_with_fullgraph():
    """The class check is attribute identities along the MRO, which torch.compile traces."""
    torch.manual_seed(0)
    layer = adapt(InitOnlyLinear(IN, OUT)).eval()
    x = rand(3, IN)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-6, atol=1e-6)


# ---- refusals name quantized bases in full, with the reason -------------------------------------
DQ_LINEAR = r"torch\.ao\.nn\.quantized\.dynamic\.modules\.linear\.Linear"


class TaggedTensor(torch.Tensor):
    """A tensor subclass weight (the shape of torchao's / bitsandbytes' quantized weights)."""


def _dynamic_quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice, in some versions
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_quantized_linears_are_named_in_full_with_the_reason():
    """torch.ao's quantized linears are also called "Linear": the refusals read "matches 0
    (Linear)" (apply_miss), "got Linear" (bat on a tensor-subclass weight, without saying the weight
    is why), "its weight is a method" (merge into a base that quantize_dynamic replaced), and
    MissBankLinear raised AttributeError ('function' object has no attribute 'dtype') where it
    documents TypeError. Each now names the class as module.qualname (base_layers.type_name) and the
    reason (base_layers.tensor_problem); nothing is changed."""
    torch.manual_seed(0)
    quantized = _dynamic_quantized(nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT)))
    with pytest.raises(TypeError, match=rf"also matches 0 \({DQ_LINEAR}\), 2 \({DQ_LINEAR}\)"):
        miss_ext.apply_miss(quantized, ["0", "2"], r=R)
    with pytest.raises(TypeError, match=rf"MissBankLinear needs a base layer whose weight is a tensor; {DQ_LINEAR}: "
                                        r"its weight is a method, not a tensor \(torch\.ao's quantized linears"):
        miss_ext.MissBankLinear(quantized[0], capacity=2, max_r=R)
    with pytest.raises(TypeError, match=r"MissBankLinear needs an nn\.Linear-like base layer .*, got "
                                        r"torch\.nn\.modules\.conv\.Conv1d"):
        miss_ext.MissBankLinear(nn.Conv1d(IN, OUT, 1), capacity=2, max_r=R)
    assert [type(m).__module__ for m in quantized] == ["torch.ao.nn.quantized.dynamic.modules.linear"] + [
        "torch.nn.modules.activation", "torch.ao.nn.quantized.dynamic.modules.linear"]

    # A tensor-subclass weight on an nn.Linear: bat and merge say that the weight is the reason.
    base = nn.Linear(IN, OUT)
    base.weight = nn.Parameter(base.weight.detach().as_subclass(TaggedTensor), requires_grad=False)
    with pytest.raises(TypeError, match=r"needs a plain nn\.Linear base .*got torch\.nn\.modules\.linear\.Linear, "
                                        r"and its weight is a (\w+\.)*TaggedTensor, a tensor subclass"):
        miss_ext.MissLinear(base, R, mode="bat")
    layer = adapt(base)
    with pytest.raises(ValueError, match=r"cannot merge into torch\.nn\.modules\.linear\.Linear: its weight is a "
                                         r"(\w+\.)*TaggedTensor, a tensor subclass"):
        layer.merge()
    assert not layer.merged

    # quantize_dynamic after apply_miss replaces the base: the layer runs it, and refuses a merge.
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(IN, OUT)), ["0"], r=R, init_weights=False)
    model = _dynamic_quantized(model).eval()
    x = rand(3, IN)
    with torch.no_grad():
        before = model(x)
        want = model[0].base_layer(x).to(F64) + adapter_term(x, model[0].miss_block, OUT)
    torch.testing.assert_close(before.to(F64), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=rf"cannot merge into {DQ_LINEAR}: its weight is a method, not a tensor "
                                         r"\(torch\.ao's quantized linears keep a packed weight"):
        model[0].merge()
    with pytest.raises(ValueError, match=rf"0: its weight is a method, not a tensor"):
        miss_ext.merge_and_unload(model)
    assert not model[0].merged
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ---- weights a merge cannot write in place ---------------------------------------------------------
def _unusual_weight(kind):
    """(weight, in_features, out_features)."""
    torch.manual_seed(0)
    if kind == "expanded":  # stride 0: every row is one stored row
        return torch.randn(1, IN).expand(OUT, IN), IN, OUT
    if kind == "expanded-columns":
        return torch.randn(OUT, 1).expand(OUT, IN), IN, OUT
    if kind == "interleaved-overlapping":  # element (0, 2) and (3, 0) are one; torch: "too hard to tell"
        return torch.randn(64).as_strided((8, 3), (2, 3)), 3, 8
    return torch.randn(OUT, IN).to_sparse_csr(), IN, OUT


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind,pattern", [
    ("expanded", r"its weight's elements overlap in memory \(an expanded, stride-0 tensor.*strides \(0, 1\)"),
    ("expanded-columns", r"its weight's elements overlap in memory \(an expanded, stride-0 tensor.*strides \(1, 0\)"),
    ("interleaved-overlapping", r"its weight's elements overlap in memory .*strides \(2, 3\) for shape \(8, 3\)"),
    ("sparse_csr", r"its weight has layout torch\.sparse_csr, not a dense strided tensor"),
])
def test_a_weight_the_merge_cannot_write_in_place_is_refused_up_front(kind, pattern):
    """A plain nn.Linear whose weight is expanded (stride 0) or sparse: the merge reached the op and
    failed there with torch's RuntimeError ("more than one element of the written-to tensor refers
    to a single memory location") or NotImplementedError (no SparseCsrCPU kernel); with
    interleaving strides that overlap, which torch's quick test cannot judge, it wrote a wrong
    weight silently (0.37 off). Now the documented ValueError naming the layer, before anything
    changes."""
    weight, in_features, out_features = _unusual_weight(kind)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    model[0].weight = nn.Parameter(weight, requires_grad=False)
    miss_ext.apply_miss(model, ["0"], r=2, init_weights=False)
    layer = model[0]
    x = rand(3, in_features)
    with torch.no_grad():
        before = model(x)
    stored = layer.base_layer.weight.to_dense().clone()
    for merge in (layer.merge, lambda: layer.merge(safe_merge=True)):
        with pytest.raises(ValueError, match=rf"cannot merge into torch\.nn\.modules\.linear\.Linear: {pattern}"):
            merge()
    with pytest.raises(ValueError, match=rf"nothing was merged.*\n0: {pattern}"):
        miss_ext.merge_and_unload(model)
    assert merge_refusal(layer.base_layer, unmerge=True) is not None
    assert not layer.merged and isinstance(model[0], miss_ext.MissLinear)
    assert torch.equal(layer.base_layer.weight.to_dense(), stored)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("kind", ["transposed", "interleaved"])
def test_a_strided_weight_whose_elements_do_not_overlap_still_merges(kind):
    """Non-contiguous weights that give each element its own memory merge as before: a transposed
    one, and shape (4, 3) with strides (3, 4), which interleave without overlapping (torch's
    overlap test answers "too hard to tell"; the offsets are counted)."""
    torch.manual_seed(0)
    if kind == "transposed":
        base, weight = nn.Linear(IN, OUT), torch.randn(IN, OUT).t()
    else:
        base, weight = nn.Linear(3, 4), torch.randn(64).as_strided((4, 3), (3, 4))
        assert torch._debug_has_internal_overlap(weight) == 2
    base.weight = nn.Parameter(weight, requires_grad=False)
    layer = miss_ext.MissLinear(base, 2, init_weights=False).eval()
    x = rand(5, base.in_features)
    assert merge_refusal(base) is None
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_apply_bank_and_load_adapter_name_quantized_linears_in_full(tmp_path):
    """apply_bank said "not nn.Linear layers: 0 (Linear)" and load_adapter "0: is a Linear, not an
    nn.Linear" for torch.ao's dynamic-quantized linears (base_layers.type_name); load_adapter into a
    model whose adapted layer's base quantize_dynamic replaced names the base, not "MissLinear"."""
    quantized = _dynamic_quantized(nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT)))
    with pytest.raises(TypeError, match=rf"not nn\.Linear layers: 0 \({DQ_LINEAR}\)"):
        miss_ext.apply_bank(quantized, ["0"], capacity=2, max_r=R)
    source = miss_ext.apply_miss(nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT)), ["0", "2"], r=R)
    miss_ext.save_adapter(source, tmp_path)
    with pytest.raises(ValueError, match=rf"0: is a {DQ_LINEAR}, not an nn\.Linear\n  2: is a {DQ_LINEAR}, not an"):
        miss_ext.load_adapter(quantized, tmp_path)
    assert [type(m).__name__ for m in quantized] == ["Linear", "ReLU", "Linear"]
    adapted_then_quantized = _dynamic_quantized(miss_ext.apply_miss(
        nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, OUT)), ["0", "2"], r=R))
    with pytest.raises(ValueError, match=rf"0: its base layer is a {DQ_LINEAR}, not an nn\.Linear"):
        miss_ext.load_adapter(adapted_then_quantized, tmp_path)


def test_a_base_with_its_own_forward_or_a_subclass_bias_runs_its_own_forward():
    """A base nn.Linear whose instance has its own forward (patched in), or whose bias alone is a
    tensor subclass (F.linear means something else to it), is not plain: the layer runs the
    base's forward and adds the adapter term, so a zero block gives exactly base(x). Taking the
    fused op there gave 1.97 / 1.0 off (untested until a mutation audit, 2026-12-03)."""
    import types

    class ShiftedBias(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types_, args=(), kwargs=None):
            out = super().__torch_function__(func, types_, args, kwargs or {})
            if func is torch.nn.functional.linear:
                out = out.as_subclass(torch.Tensor) + 1.0
            return out

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    patched = torch.nn.Linear(16, 8)
    patched.forward = types.MethodType(lambda self, v: torch.nn.functional.linear(v, self.weight, self.bias) * 2,
                                       patched)
    shifted = torch.nn.Linear(16, 8)
    shifted.bias = torch.nn.Parameter(shifted.bias.detach().as_subclass(ShiftedBias), requires_grad=False)
    for base in (patched, shifted):
        layer = miss_ext.MissLinear(base, 4)  # zero block
        with torch.no_grad():
            got, want = layer(x).as_subclass(torch.Tensor), base(x).as_subclass(torch.Tensor)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_hooked_base_adds_the_term_in_the_promoted_dtype():
    """A base that is not a plain nn.Linear runs its own forward and the term is added beside it:
    on a bf16 base (folded in the block's dtype), and on a base whose output is narrower than x
    (bf16 out for float32 x: added in float32, not rounded to bf16). Untested until a mutation
    audit, 2026-12-03 (one variant raised, the other was 8e-3 off)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    base.register_forward_hook(lambda module, args, out: None)
    layer = miss_ext.MissLinear(base, 4, init_weights=False)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    want = base(x).double() + miss_ext.ops.fold(x.double(), 4) @ layer.miss_block.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=2e-2, atol=2e-2)

    class NarrowOutput(torch.nn.Linear):
        def forward(self, v):
            return super().forward(v).to(torch.bfloat16)

    layer = miss_ext.MissLinear(NarrowOutput(64, 32), 8, init_weights=False)
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer.base_layer(x).float() + miss_ext.ops.fold(x, 8) @ layer.miss_block,
                               rtol=0, atol=0)


def _spectral_net():
    from torch.nn.utils.parametrizations import spectral_norm
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("lin", spectral_norm(nn.Linear(16, 24, dtype=F64)))
    net.add_module("out", nn.Linear(24, 8, dtype=F64))
    return net


def _spectral_state(net):
    plist = net.lin.parametrizations.weight
    return [t.clone() for t in plist[0].buffers()], [m.training for m in plist.modules()]


@pytest.mark.parametrize("entry", ["MissLinear", "MissLinear random init", "apply_miss", "load_adapter", "apply_bank"])
def test_adding_an_adapter_leaves_a_spectral_norm_base_as_it_was(entry, tmp_path):
    """Adding an adapter reads the base weight to describe it, and each read of a spectral_norm
    weight in training mode ran a power-iteration step on the user's _u/_v buffers (four to seven
    steps): a zero adapter then changed the layer's output by 3e-4 in float64 (a review,
    2026-12-07). Now those reads leave the buffers, and every parametrization's mode, as they
    were, and a zero adapter is the identity."""
    x = torch.randn(5, 16, dtype=F64)
    plain = _spectral_net()
    buffers, modes = _spectral_state(plain)
    expected = plain.eval()(x)
    net = _spectral_net()
    if entry.startswith("MissLinear"):
        net.lin = miss_ext.MissLinear(net.lin, 4, init_weights=entry == "MissLinear")
        if entry != "MissLinear":
            with torch.no_grad():
                net.lin.miss_block.zero_()
        adapted = net.lin.base_layer
    elif entry == "apply_miss":
        miss_ext.apply_miss(net, ["lin"], r=4)
        adapted = net.lin.base_layer
    elif entry == "load_adapter":
        miss_ext.save_adapter(miss_ext.apply_miss(_spectral_net(), ["lin"], r=4), str(tmp_path))
        miss_ext.load_adapter(net, str(tmp_path))
        adapted = net.lin.base_layer
    else:
        miss_ext.apply_bank(net, ["lin"], capacity=2, max_r=4)
        miss_ext.add_bank_adapter(net, "a", 4)
        adapted = net.lin.base_layer
    after_buffers, after_modes = _spectral_state(nn.ModuleDict({"lin": adapted}))
    assert after_modes == modes == [True] * len(modes)
    for before, after in zip(buffers, after_buffers):
        assert torch.equal(before, after), "adding the adapter ran the base's power iteration"
    with torch.no_grad():
        if entry == "apply_bank":
            with miss_ext.mixed_batch(net, ["a"] * 5):
                got = net.eval()(x)
        else:
            got = net.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_parametrizations_in_eval_restores_each_mode_on_error():
    from miss_ext.base_layers import parametrizations_in_eval
    net = _spectral_net()
    net.lin.parametrizations.weight[0].eval()  # one mode of each kind
    modes = [m.training for m in net.lin.parametrizations.weight.modules()]
    assert modes == [True, False]
    with pytest.raises(ZeroDivisionError):
        with parametrizations_in_eval(net):
            assert not any(m.training for m in net.lin.parametrizations.weight.modules())
            1 / 0
    assert [m.training for m in net.lin.parametrizations.weight.modules()] == modes


def test_adding_an_adapter_evaluates_no_parametrization_of_the_base_in_training_mode():
    """Every read that describes the base's weight or bias while an adapter is added runs with
    the parametrizations in eval mode (read_to_describe), the bias's too."""
    calls = []

    class Counted(nn.Module):
        def forward(self, t):
            if self.training:
                calls.append(t.dim())
            return t

    def base():
        lin = nn.Linear(8, 12)
        parametrize.register_parametrization(lin, "weight", Counted())
        parametrize.register_parametrization(lin, "bias", Counted())
        calls.clear()  # registering evaluates each once
        return lin

    for make in (lambda: miss_ext.MissLinear(base(), 4, init_weights=False),
                 lambda: miss_ext.apply_miss(nn.ModuleDict({"lin": base()}), ["lin"], r=4),
                 lambda: miss_ext.MissBankLinear(base(), capacity=2, max_r=4)):
        make()
        assert calls == []


def test_a_resized_base_or_a_block_of_another_mode_is_refused_by_merges_too():
    """The forward refused a base resized after the adapter was added, but merge() and
    merge_and_unload merged it: the op read the (r, out) block as a mini block and tiled the
    adapter over the new rows; a default layer given a narrower block ran and merged as mini, and
    a mode edited to "bat" merged as default (a review, 2026-12-07). Each is refused now, forward
    and merge alike, nothing changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20, dtype=F64))
    miss_ext.apply_miss(model, ["0"], r=2, init_weights=False)
    model[0].base_layer = nn.Linear(10, 40, dtype=F64)
    weight = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"(?s)nothing was merged.*weight is now \(40, 10\), but the adapter was made for "
                                         r"\(20, 10\)"):
        miss_ext.merge_and_unload(model)
    with pytest.raises(ValueError, match=r"weight is now \(40, 10\)"):
        model[0].merge()
    assert not model[0].merged and torch.equal(model[0].base_layer.weight, weight)

    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=F64), r=2, init_weights=False)
    layer.miss_block = nn.Parameter(torch.randn(2, 5, dtype=F64))
    x = torch.randn(3, 10, dtype=F64)
    for call in (lambda: layer(x), layer.merge):
        with pytest.raises(ValueError, match=r"miss_block has shape \(2, 5\), which is no 'default' block for "
                                             r"out_features=20"):
            call()
    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=F64), r=2, init_weights=False)
    layer.mode = "bat"
    with pytest.raises(ValueError, match=r"no 'bat' block"):
        layer.merge()
    assert not layer.merged
    layer.mode = "mini"  # a (2, 20) block is a mini block of mini_r = 20 = out: computed as before
    torch.testing.assert_close(layer(x), layer.base_layer(x) + fold_ref(x, 2) @ layer.miss_block)
