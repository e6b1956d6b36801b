"""Tests that close gaps found by a mutation-testing round over miss_ext/modules.py, model.py and
targets.py (2026-12-06): each pins one behaviour that a single-line change of the product code
broke without any other test failing. References are independent of miss_ext: PEFT itself
(selection rules) or float64 formulas from docs (tests/reference.py)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import miss_ext
from conftest import assert_unchanged, snapshot
from tiny_models import nonzero, small_net


# ---------------------------------------------------------------------------------------------
# targets.py: which modules get adapters, against PEFT's own get_peft_model
# ---------------------------------------------------------------------------------------------
class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(6, 6), nn.Linear(6, 4)


class _Moe(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.ModuleDict({"down_proj": nn.Linear(6, 6)}) for _ in range(3)])


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = _Attn(), _Moe()


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer() for _ in range(3)])
        # "sublayers" ends in the layers_pattern "layers" without being a "layers" component.
        self.sublayers = nn.ModuleList([_Layer() for _ in range(3)])
        self.q_proj = nn.Linear(6, 6)  # a target outside every numbered layer


class _Net(nn.Module):
    """Paths such as model.layers.1.self_attn.q_proj and model.layers.1.mlp.experts.2.down_proj
    (two numbered components: the layer index is the first), model.sublayers.* and model.q_proj."""

    def __init__(self):
        super().__init__()
        self.model, self.head = _Inner(), nn.Linear(6, 2)


def _peft_adapted(model, **config):
    from peft import MissConfig, get_peft_model
    from peft.tuners.miss.layer import MissLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(model), MissConfig(r=2, **config))
    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in peft.named_modules() if isinstance(m, MissLayer))


def _miss_ext_adapted(model, **config):
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        miss_ext.apply_miss(model, r=2, **config)
    return sorted(n for n, _ in miss_ext.miss_layers(model))


@pytest.mark.parametrize("config", [
    # layers_pattern must be a whole path component ("sublayers.1" is no "layers.1"); a path
    # without a layer index (model.q_proj) is left out by layers_to_transform.
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    # Without layers_pattern the index is the first numbered component (layers.0, not experts.1).
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=2),
    # A string exclude_modules is a whole-path regex, not a search.
    dict(target_modules=["q_proj", "k_proj"], exclude_modules="q_proj"),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.1\..*"),
    # A list exclude_modules matches whole names or dotted suffixes, not string endings.
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["_proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["self_attn.q_proj"]),
], ids=["pattern-component", "first-index", "int-index", "exclude-regex-whole", "exclude-regex-layer",
        "exclude-list-not-ending", "exclude-list-suffix"])
def test_selection_fields_adapt_what_peft_adapts(config):
    """apply_miss with exclude_modules / layers_to_transform / layers_pattern adapts exactly the
    modules PEFT's get_peft_model adapts for the same MissConfig fields (README: "the adapted
    modules are exactly those get_peft_model adapts"). Pins the layer-index regexes (first
    numbered component; layers_pattern as a whole component), paths without an index, and the
    whole-path / dotted-suffix rules of exclude_modules."""
    net = _Net()
    want = _peft_adapted(net, **config)
    assert want, "the case must adapt something"
    assert _miss_ext_adapted(net, **config) == want


# ---------------------------------------------------------------------------------------------
# modules.py: MissLinear
# ---------------------------------------------------------------------------------------------
def _layer(in_features=10, out_features=20, r=3, mode="default", mini_r=1, dtype=torch.float64, **kw):
    base = nn.Linear(in_features, out_features).to(dtype)
    layer = miss_ext.MissLinear(base, r, mode=mode, mini_r=mini_r, **kw)
    with torch.no_grad():
        layer.miss_block.copy_(nonzero(*layer.miss_block.shape, dtype=layer.miss_block.dtype) * 0.3)
    return layer


def test_unfused_output_has_the_input_dtype_when_the_base_returns_another():
    """The unfused path (a base with a forward hook) returns x's dtype even when the base returns
    another one (here a hook upcasting the bf16 output to float32), as PEFT does (its forward
    ends with result.to(previous_dtype)) and as documented ("returns ... in x's dtype"): the
    float32 adapter term is added in float32 and the sum rounded once to bf16. Values: within a
    bf16 rounding of the float64 sum of the base's output and the spec's adapter term."""
    from reference import fold_ref, tile_block

    layer = _layer(dtype=torch.bfloat16)
    assert layer.miss_block.dtype == torch.float32
    layer.base_layer.register_forward_hook(lambda m, args, out: out.float())
    x = nonzero(5, 10, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    base = layer.base_layer(x)
    assert base.dtype == torch.float32  # the hook ran: the unfused path
    want = base.double() + fold_ref(x, 3) @ tile_block(layer.miss_block.detach().double(), 20)
    torch.testing.assert_close(y.double(), want, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("mode,mini_r", [("default", 1), ("mini", 4)])
def test_delta_weight_is_differentiable_with_respect_to_the_block(mode, mini_r):
    """delta_weight() (documented "differentiable with respect to the block") carries the
    gradient back to miss_block: d/dD of <dW, G> equals the float64 gradient of the spec's
    dW[o, i] = D[i mod r, o mod mini_r] (a detached block gave no gradient at all)."""
    from reference import delta_weight_ref

    layer = _layer(in_features=10, out_features=20, r=3, mode=mode, mini_r=mini_r)
    dw = layer.delta_weight()
    g = nonzero(20, 10)
    (dw * g).sum().backward()
    ref_block = layer.miss_block.detach().clone().requires_grad_(True)
    (delta_weight_ref(ref_block, 20, 10) * g).sum().backward()
    assert layer.miss_block.grad is not None
    torch.testing.assert_close(layer.miss_block.grad, ref_block.grad, rtol=1e-12, atol=1e-12)


def test_meta_state_dict_loads_with_assign_and_is_refused_without():
    """load_state_dict(meta tensors, assign=True) takes them (torch's rule: the module's tensors
    become the given ones; how a model is moved to the meta device and back), while the same
    load without assign is refused for the whole layer (no values to copy), nothing changed."""
    layer = _layer()
    meta = {k: torch.empty_like(v, device="meta") for k, v in layer.state_dict().items()}
    snap = snapshot(layer)
    with pytest.raises(RuntimeError, match="meta"):
        layer.load_state_dict(meta)
    assert_unchanged(layer, snap)
    layer.load_state_dict(meta, assign=True)
    assert layer.miss_block.is_meta and layer.base_layer.weight.is_meta


# ---------------------------------------------------------------------------------------------
# model.py: apply_miss / merge_and_unload
# ---------------------------------------------------------------------------------------------
def test_apply_miss_warns_about_dead_rows_only_for_r_above_in_features():
    """Block rows j >= in_features are dead only when r > in_features (spec): r == in_features
    (every row receives a gradient) gives no warning; r = in_features + 1 warns once, naming the
    layer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        miss_ext.apply_miss(small_net(), ["lin3"], r=8)  # lin3: Linear(8, 6)
    assert not [w for w in caught if "in_features" in str(w.message)], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        miss_ext.apply_miss(small_net(), ["lin3"], r=9)
    dead = [w for w in caught if "in_features" in str(w.message)]
    assert len(dead) == 1 and "lin3" in str(dead[0].message)


def test_a_failed_merge_and_unload_leaves_a_layer_merged_before_it_merged():
    """merge_and_unload's rollback (a merge failing part way: out of memory, an interrupt)
    unmerges only the layers this call merged: a layer the user had merged before the call stays
    merged, its weight untouched ("nothing the user owns changes on error"). The layers this
    call merged are back to their weights up to one rounding, and the model keeps its layers."""
    from reference import merge_ref

    model = small_net()
    miss_ext.apply_miss(model, ["lin1", "lin2", "lin3"], r=2, init_weights=False)
    before = {n: model.get_submodule(n).base_layer.weight.detach().clone() for n in ("lin1", "lin2", "lin3")}
    model.lin2.merge()
    merged_lin2 = model.lin2.base_layer.weight.detach().clone()
    torch.testing.assert_close(merged_lin2, merge_ref(before["lin2"], model.lin2.miss_block.detach()),
                               rtol=1e-12, atol=1e-12)

    def fail(*args, **kwargs):
        raise RuntimeError("injected merge failure")

    model.lin3.merge = fail
    x = nonzero(3, 10)
    with pytest.raises(RuntimeError, match="injected"):
        miss_ext.merge_and_unload(model)
    del model.lin3.merge
    assert all(isinstance(model.get_submodule(n), miss_ext.MissLinear) for n in ("lin1", "lin2", "lin3"))
    assert model.lin2.merged and torch.equal(model.lin2.base_layer.weight, merged_lin2)
    assert not model.lin1.merged and not model.lin3.merged
    torch.testing.assert_close(model.lin1.base_layer.weight, before["lin1"], rtol=0, atol=1e-12)
    assert torch.equal(model.lin3.base_layer.weight, before["lin3"])
    # and the model then merges fully, computing what it computed
    y = model(x)
    miss_ext.merge_and_unload(model)
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)


def test_modules_to_save_matching_a_target_by_string_suffix_is_refused(monkeypatch):
    """modules_to_save under PEFT before 0.22 uses its plain string-suffix rule ("in1" picks
    "lin1"), while the target filter only drops whole-component matches, so a layer can be
    selected both as a target and as a module saved whole. That is refused (ValueError naming
    it, nothing changed): a module cannot be both adapted and saved whole (its adapter file would
    name it twice). PEFT 0.22's rule picks no "lin1" for "in1": nothing to refuse."""
    from miss_ext import targets

    model = small_net()
    snap = snapshot(model)
    monkeypatch.setattr(targets, "installed_peft_version", lambda: "0.21.2")
    with pytest.raises(ValueError, match="lin1.*both adapted and saved whole"):
        miss_ext.apply_miss(model, ["lin1", "lin2"], r=2, modules_to_save=["in1"])
    assert_unchanged(model, snap)
    monkeypatch.setattr(targets, "installed_peft_version", lambda: "0.22.0")
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['in1'\] match no module"):
        miss_ext.apply_miss(model, ["lin1", "lin2"], r=2, modules_to_save=["in1"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lin1.miss_block", "lin2.miss_block"}


class _Siblings(nn.Module):
    """Two linears whose names share a prefix: "fc" and "fc2"."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc(x)))


def test_a_second_apply_miss_finds_a_sibling_whose_name_extends_an_adapted_one():
    """After apply_miss adapts "fc", a second call naming "fc2" adapts it: only the modules
    inside the adapter layer ("fc.base_layer") are skipped when looking for targets, not every
    path that starts with the string "fc". The result is the float64 formula's output."""
    from reference import linear_ref

    model = _Siblings().double()
    miss_ext.apply_miss(model, ["fc"], r=2, init_weights=False)
    miss_ext.apply_miss(model, ["fc2"], r=2, init_weights=False)
    assert [n for n, _ in miss_ext.miss_layers(model)] == ["fc", "fc2"]
    x = nonzero(3, 6)
    h = torch.tanh(linear_ref(x, model.fc.base_layer.weight, model.fc.base_layer.bias, model.fc.miss_block.detach()))
    want = linear_ref(h, model.fc2.base_layer.weight, model.fc2.base_layer.bias, model.fc2.miss_block.detach())
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


class _DotLookalike(nn.Module):
    """A module at path "a.b" beside one at "a_b", which an unescaped regex "a.b" also matches."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(6, 6)
        self.a_b = nn.Linear(6, 4)

    def forward(self, x):
        return self.a_b(torch.tanh(self.a.b(x)))


def test_a_saved_adapter_targets_exactly_its_paths_for_peft_and_load_adapter(tmp_path):
    """save_adapter writes target_modules as a regex of the adapted paths, each escaped: PEFT's
    from_pretrained and miss_ext.load_adapter then adapt "a.b" only, not "a_b" (which an
    unescaped "a.b" also matches), and compute what the saved model computed."""
    from peft import PeftModel
    from peft.tuners.miss.layer import MissLayer

    torch.manual_seed(0)
    base = _DotLookalike().double()
    model = copy.deepcopy(base)
    miss_ext.apply_miss(model, ["a.b"], r=2, init_weights=False)
    miss_ext.save_adapter(model, str(tmp_path))
    x = nonzero(3, 6)
    want = model(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    adapted = sorted(n.replace("base_model.model.", "") for n, m in peft.named_modules() if isinstance(m, MissLayer))
    assert adapted == ["a.b"]
    torch.testing.assert_close(peft(x), want, rtol=1e-12, atol=1e-12)

    loaded = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert [n for n, _ in miss_ext.miss_layers(loaded)] == ["a.b"]
    torch.testing.assert_close(loaded(x), want, rtol=1e-12, atol=1e-12)


def test_dropout_false_is_refused_like_dropout_true():
    """A bool dropout is refused (TypeError since 2026-12-07, ValueError before), False as well as
    True: False is an int equal to 0 and would otherwise pass the range check as "no dropout"
    (tests covered only True, which the range check refuses anyway). Nothing changes: the base
    stays trainable."""
    base = nn.Linear(10, 20)
    with pytest.raises(TypeError, match="dropout=False"):
        miss_ext.MissLinear(base, 2, dropout=False)
    assert all(p.requires_grad for p in base.parameters())
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="dropout=False"):
        miss_ext.apply_miss(model, ["lin1"], r=2, dropout=False)
    assert_unchanged(model, snap)


def test_an_empty_modules_to_save_name_is_a_type_error():
    """modules_to_save=[""] is refused as a bad field value (TypeError naming modules_to_save),
    nothing changed: an empty name would match every module path as a string suffix (PEFT's
    modules_to_save rule), so it cannot name a module."""
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="modules_to_save"):
        miss_ext.apply_miss(model, ["lin1"], r=2, modules_to_save=[""])
    assert_unchanged(model, snap)
