"""MiSS on transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc): a linear layer whose weight is
stored transposed, (in, out), computing x @ W + b. PEFT's MiSS refuses it (TypeError); the spec
counts that among the PEFT limitations not to copy. The default and mini modes adapt it as the
linear it is: y = x @ W + b + fold(x) @ tile(D) (the base module runs, the term is added), and a
merge writes dW into W's transpose. Checked against float64 formulas written from the spec."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import miss_ext  # noqa: E402
from miss_ext import MissLinear  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-12)


def conv1d(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(out_features, in_features).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def fold_ref(x, r):
    """S[..., j] = sum of x[..., i] over i mod r = j (zero padding to a multiple of r)."""
    pad = (-x.shape[-1]) % r
    return F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, r).sum(-2)


def term_ref(x, block, out_features):
    """fold(x) @ tile(block): a mini block (r, mini_r) repeated along out."""
    return fold_ref(x, block.shape[0]) @ block.repeat(1, out_features // block.shape[1])


SIZES = [(10, 20, 3, "default", 1), (7, 5, 3, "default", 1), (6, 6, 4, "default", 1), (4, 6, 8, "default", 1),
         (10, 20, 2, "mini", 4), (12, 6, 4, "mini", 1)]


@pytest.mark.parametrize("in_features, out_features, r, mode, mini_r", SIZES)
def test_forward_and_gradients_follow_the_formula(in_features, out_features, r, mode, mini_r):
    base = conv1d(in_features, out_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > in
        layer = MissLinear(base, r, mode=mode, mini_r=mini_r, init_weights=False)
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    x = torch.randn(3, 5, in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W, b, D = base.weight.detach(), base.bias.detach(), layer.miss_block.detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = x_ref @ W + b + term_ref(x_ref, D, out_features)
    torch.testing.assert_close(y, expected, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(layer.miss_block.grad, D.grad, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    assert base.weight.grad is None and not base.weight.requires_grad


@pytest.mark.parametrize("in_features, out_features, r, mode, mini_r", SIZES)
def test_merge_writes_the_transposed_weight_and_unmerge_restores_it(in_features, out_features, r, mode, mini_r):
    """The merged layer computes the unmerged output (a merge that forgot the transpose would fail
    here; the 6 -> 6 layer has the right shape either way), delta_weight is the (out, in) dW, and
    unmerge gives the weight back."""
    base = conv1d(in_features, out_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = MissLinear(base, r, mode=mode, mini_r=mini_r, init_weights=False)
    x = torch.randn(4, in_features, dtype=torch.float64)
    weight = base.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        delta = layer.delta_weight()
        assert delta.shape == (out_features, in_features)
        torch.testing.assert_close(delta.t(), term_ref(torch.eye(in_features, dtype=torch.float64), layer.miss_block,
                                                       out_features), **TOL)
        for safe in (False, True):
            layer.merge(safe_merge=safe)
            assert layer.merged
            torch.testing.assert_close(base.weight, weight + delta.t(), **TOL)
            torch.testing.assert_close(layer(x), expected, **TOL)
            torch.testing.assert_close(base(x), expected, **TOL)
            layer.unmerge()
            torch.testing.assert_close(base.weight, weight, **TOL)
            torch.testing.assert_close(layer(x), expected, **TOL)


def test_a_merged_state_dict_travels_and_non_finite_blocks_do_not_merge():
    layer = MissLinear(conv1d(8, 6), 2, init_weights=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        fresh = MissLinear(conv1d(8, 6, seed=1), 2)
        fresh.load_state_dict(layer.state_dict())
        assert fresh.merged
        torch.testing.assert_close(fresh(x), expected, **TOL)
        fresh.unmerge()
        torch.testing.assert_close(fresh(x), expected, **TOL)
        broken = MissLinear(conv1d(8, 6), 2, init_weights=False)
        broken.miss_block[0, 0] = float("nan")
        weight = broken.base_layer.weight.clone()
        with pytest.raises(ValueError, match="NaNs detected"):
            broken.merge(safe_merge=True)
        assert torch.equal(broken.base_layer.weight, weight) and not broken.merged


def test_bat_a_subclass_and_a_hooked_conv1d():
    """Bat needs an nn.Linear's (out, in) weight: TypeError naming Conv1D. A subclass of Conv1D is
    not taken for it (its forward may differ). A Conv1D with a forward hook runs the hook (the
    base runs as a module) and refuses merges, whose output would then differ."""
    with pytest.raises(TypeError, match="bat mode .*Conv1D"):
        MissLinear(conv1d(8, 8), 2, mode="bat")

    class Custom(Conv1D):
        pass

    with pytest.raises(TypeError, match="MissLinear adapts nn.Linear layers"):
        MissLinear(Custom(6, 8), 2)
    base = conv1d(8, 6)
    base.register_forward_hook(lambda module, args, out: out * 2)
    layer = MissLinear(base, 2, init_weights=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = 2 * (x @ base.weight + base.bias) + term_ref(x, layer.miss_block, 6)
        torch.testing.assert_close(layer(x), expected, **TOL)
        with pytest.raises(ValueError, match="does not compute exactly x @ weight \\+ bias"):
            layer.merge()
        assert not layer.merged


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_gpt2_all_linear_trains_saves_loads_and_merges(tmp_path):
    """A whole GPT-2 with every Conv1D adapted ("all-linear", as PEFT selects; its head stays
    plain): the logits follow the formula at every layer, a training step moves only the blocks,
    save_adapter warns that PEFT cannot load the folder and load_adapter gives the same logits,
    merge_and_unload gives back plain Conv1Ds computing the same logits, and export_lora refuses."""
    base = gpt2()
    model = miss_ext.apply_miss(copy.deepcopy(base), "all-linear", r=3, init_weights=False)
    layers = miss_ext.miss_layers(model)
    assert len(layers) == 8 and all(isinstance(layer.base_layer, Conv1D) for _, layer in layers)
    ids = torch.randint(0, 32, (2, 7))
    reference = copy.deepcopy(base)
    for name, layer in layers:
        block = layer.miss_block.detach().clone()
        out_features = layer.out_features
        reference.get_submodule(name).register_forward_hook(
            lambda module, args, out, block=block, out_features=out_features: out + term_ref(args[0], block,
                                                                                              out_features))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(expected, reference(ids).logits, **TOL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"{name}.miss_block" for name, _ in layers}
    with torch.no_grad():
        trained = model(ids).logits
    with pytest.warns(UserWarning, match="Conv1D layers, which PEFT's MiSS refuses"):
        miss_ext.save_adapter(model, str(tmp_path / "adapter"))
    loaded = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained, **TOL)
    with pytest.raises(ValueError, match="Conv1D layers, whose LoRA export is not supported"):
        miss_ext.export_lora(model, str(tmp_path / "lora"))
    assert not (tmp_path / "lora").exists()
    merged = miss_ext.merge_and_unload(model)
    assert all(type(merged.get_submodule(name)) is Conv1D for name, _ in layers)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, **TOL)


def test_a_conv1d_forward_replaced_at_class_level_is_not_merged(monkeypatch):
    """Conv1D.forward patched at class level (a library's or profiler's wrapper) computes something
    else than x @ W + b: the layer runs it (the base runs as a module), and a merge, which would
    count the term twice, is refused (accepted at first: merged outputs 1.7 off; a review,
    2026-12-05), as for a patched nn.Linear.forward."""
    import functools

    original = Conv1D.forward

    @functools.wraps(original)
    def doubled(self, x):
        return 2.0 * original(self, x)

    layer = MissLinear(conv1d(6, 6), 2, init_weights=False)
    monkeypatch.setattr(Conv1D, "forward", doubled)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        base = layer.base_layer
        torch.testing.assert_close(layer(x), 2 * (x @ base.weight + base.bias) + term_ref(x, layer.miss_block, 6),
                                   **TOL)
        with pytest.raises(ValueError, match="does not compute exactly x @ weight \\+ bias"):
            layer.merge()
        assert not layer.merged
    monkeypatch.undo()
    layer.merge()
    assert layer.merged


def test_all_linear_selects_conv1d_subclasses_as_peft_and_refuses_them():
    """PEFT's all-linear takes isinstance(module, Conv1D), subclasses too, and its MiSS refuses
    them; here the class itself is adapted and a subclass (whose forward may differ) refused by
    name, not left out silently (a review, 2026-12-05)."""
    class MyConv1D(Conv1D):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(6, 6), MyConv1D(6, 6), torch.nn.Linear(6, 6))
    with pytest.raises(TypeError, match=r"1 \(.*MyConv1D\)"):
        miss_ext.apply_miss(model, "all-linear", r=2)
    assert not miss_ext.miss_layers(model)


# Gaps a mutation audit of the Conv1D support found (2026-12-05): each test names the change to the
# code it catches.

def assert_doubled_and_not_merged(layer):
    """The layer computes 2 (x W + b) + the term (its base's output doubled by a patch or a hook)
    and refuses to merge (merged, it would double the term too), changing nothing."""
    base = layer.base_layer
    x = torch.randn(3, base.weight.shape[0], dtype=torch.float64)
    weight = base.weight.detach().clone()
    with torch.no_grad():
        expected = 2.0 * (x @ weight + base.bias) + term_ref(x, layer.miss_block, base.weight.shape[1])
        torch.testing.assert_close(layer(x), expected, **TOL)
        with pytest.raises(ValueError, match=r"does not compute exactly x @ weight \+ bias"):
            layer.merge()
        assert not layer.merged and torch.equal(base.weight, weight)
        torch.testing.assert_close(layer(x), expected, **TOL)


def test_a_conv1d_with_an_instance_forward_refuses_merge():
    """Catches the change (is_plain_conv1d without `"forward" not in vars(module)`): a per-instance forward
    computes something else than x @ W + b, so the merged output would differ."""
    base = conv1d(6, 4)
    layer = MissLinear(base, 2, init_weights=False)
    own = base.forward
    base.forward = lambda x: 2.0 * own(x)
    assert_doubled_and_not_merged(layer)


def test_a_global_forward_hook_refuses_a_conv1d_merge():
    """Catches the change (is_plain_conv1d without `not _global_hooks()`): a global hook that doubles every
    Conv1D's output gives 2 (xW + b) + t unmerged but 2 (x (W + dW) + b) = 2 (xW + b) + 2 t
    merged, so the merge is refused, the weight untouched."""
    layer = MissLinear(conv1d(6, 4), 2, init_weights=False)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 2.0 * out if type(module) is Conv1D else None)
    try:
        assert_doubled_and_not_merged(layer)
    finally:
        handle.remove()
    layer.merge()  # without the hook it merges
    assert layer.merged


def test_a_conv1d_forward_patched_by_a_function_named_forward_is_not_merged(monkeypatch):
    """Catches the change (`co_name == "forward" or <file is transformers/pytorch_utils.py>`): a patch
    defined as `def forward(self, x)` elsewhere (the usual way to monkeypatch a class) has the
    right name but not transformers' code."""
    original = Conv1D.forward

    def forward(self, x):
        return 2.0 * original(self, x)

    layer = MissLinear(conv1d(6, 4), 2, init_weights=False)
    monkeypatch.setattr(Conv1D, "forward", forward)
    assert_doubled_and_not_merged(layer)


def test_a_conv1d_that_gained_a_hook_after_its_merge_can_still_be_unmerged():
    """Catches the change (merge_refusal's Conv1D test applied to unmerge too): an unmerge only restores the
    weight, so it is allowed whatever the module computes (merge_refusal's docstring; refusing it
    would leave the user stuck with a merged layer)."""
    base = conv1d(6, 4)
    layer = MissLinear(base, 2, init_weights=False)
    weight = base.weight.detach().clone()
    block = layer.miss_block.detach().clone()
    layer.merge()
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(base.weight, weight + term_ref(eye, block, 4), **TOL)
    base.register_forward_hook(lambda module, args, out: out * 3.0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, weight, **TOL)


def test_a_conv1d_whose_weight_is_not_a_matrix_is_refused_at_construction():
    """Catches the change (is_conv1d without `weight.dim() == 2`): a Conv1D whose weight was replaced by a
    3-D tensor has no (in, out) sizes; it is refused when the adapter is made (TypeError), not
    adapted with sizes read from two of its three dimensions."""
    base = conv1d(6, 4)
    base.weight = nn.Parameter(torch.randn(6, 4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"Conv1D's weight must be a 2-D \(in_features, out_features\) tensor, got \(6, 4, 2\)"):
        MissLinear(base, 2)


class _OwnConv1D(nn.Module):
    """A user's own class that happens to be called Conv1D: a (out, in) weight, x @ W^T."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight.t()


_OwnConv1D.__name__ = _OwnConv1D.__qualname__ = "Conv1D"


def test_a_class_named_conv1d_outside_transformers_is_no_conv1d():
    """Catches the change (is_conv1d_class by name only): another library's Conv1D is not transformers'
    (its weight need not be (in, out)); it is refused as any non-linear module, and "all-linear"
    does not select it."""
    with pytest.raises(TypeError, match="MissLinear adapts nn.Linear layers"):
        MissLinear(_OwnConv1D(6, 4), 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), _OwnConv1D(6, 4))
    miss_ext.apply_miss(model, "all-linear", r=2, init_weights=False)
    assert [name for name, _ in miss_ext.miss_layers(model)] == ["0"] and type(model[1]).__name__ == "Conv1D"


class _TiedConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = conv1d(8, 8, seed=1)
        self.other = conv1d(8, 8, seed=2)
        self.register_buffer("dec", self.c.weight.data, persistent=False)

    def forward(self, x):
        return torch.tanh(self.other(self.c(x))) @ self.dec


def test_all_linear_skips_a_conv1d_whose_weight_is_shared():
    """Catches the change (_drop_shared_linears looking at nn.Linear only): a Conv1D whose weight another
    holder shares is skipped by "all-linear", with the skip warning, as a linear is; its adapter
    could never be merged."""
    model = _TiedConv1D()
    with pytest.warns(UserWarning, match=r"'all-linear' skips layers whose parameters are shared.*c \(shared with dec\)"):
        miss_ext.apply_miss(model, "all-linear", r=2, init_weights=False)
    assert [name for name, _ in miss_ext.miss_layers(model)] == ["other"]
    assert type(model.c) is Conv1D


def test_merge_and_unload_with_safe_merge_on_non_square_conv1d_layers():
    """Catches the change (merge_and_unload's safe_merge check computing miss.merge on the Conv1D's (in, out)
    weight instead of its (out, in) view): the merged model computes the adapted one."""
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(12, 8, seed=1), nn.Tanh(), conv1d(8, 20, seed=2))
    miss_ext.apply_miss(model, ["0", "2"], r=4, init_weights=False)
    x = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        w0, b0, d0 = model[0].base_layer.weight.clone(), model[0].base_layer.bias.clone(), model[0].miss_block.clone()
        w2, b2, d2 = model[2].base_layer.weight.clone(), model[2].base_layer.bias.clone(), model[2].miss_block.clone()
        h = torch.tanh(x @ w0 + b0 + term_ref(x, d0, 8))
        expected = h @ w2 + b2 + term_ref(h, d2, 20)
        torch.testing.assert_close(model(x), expected, **TOL)
    merged = miss_ext.merge_and_unload(model, safe_merge=True)
    assert type(merged[0]) is Conv1D and type(merged[2]) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, **TOL)
        torch.testing.assert_close(merged[0].weight, w0 + term_ref(torch.eye(12, dtype=torch.float64), d0, 8), **TOL)


def test_apply_miss_mini_on_a_conv1d_checks_the_block_against_in_and_out():
    """Catches the change (apply_miss checking block_shape with in and out swapped): mini_r must divide
    out_features (8 here), not in_features (6). A Conv1D 6 -> 8 with mini_r=4 is valid and
    computes the formula; 8 -> 6 is refused naming the layer."""
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(6, 8))
    miss_ext.apply_miss(model, ["0"], r=2, mode="mini", mini_r=4, init_weights=False)
    layer = model[0]
    assert tuple(layer.miss_block.shape) == (2, 4)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ layer.base_layer.weight + layer.base_layer.bias
                                   + term_ref(x, layer.miss_block, 8), **TOL)
    with pytest.raises(ValueError, match=r"^0: "):
        miss_ext.apply_miss(nn.Sequential(conv1d(8, 6)), ["0"], r=2, mode="mini", mini_r=4)


class _Double(nn.Module):
    def forward(self, t):
        return 2.0 * t


@pytest.mark.parametrize("in_features, out_features", [(6, 6), (4, 6)])
def test_a_conv1d_parametrized_after_its_merge_unmerges_its_transposed_weight(in_features, out_features):
    """torch.nn.utils.parametrize swaps a module's class for a Parametrized<Class> subclass: read by
    its class alone, a Conv1D parametrized (its bias) after the merge was no Conv1D any more, and
    the unmerge subtracted dW from the untransposed weight (a square layer's weight silently 0.67
    off; another shape failed in the op). The weight comes back; a merge is refused while the
    bias is parametrized (the module no longer computes x @ W + b), and the adapted parametrized
    layer computes x @ W + 2 b + the term."""
    base = conv1d(in_features, out_features)
    layer = MissLinear(base, 2, init_weights=False)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer.merge()
    parametrize.register_parametrization(base, "bias", _Double())
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, weight, **TOL)
    x = torch.randn(3, in_features, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight + 2.0 * bias + term_ref(x, layer.miss_block, out_features), **TOL)
    unmerged = base.weight.detach().clone()
    with pytest.raises(ValueError, match=r"does not compute exactly x @ weight \+ bias"):
        layer.merge()
    assert torch.equal(base.weight, unmerged) and not layer.merged


def test_a_parametrized_conv1d_is_adapted_as_a_conv1d():
    """A Conv1D whose weight is parametrized before the adapter is added: its class is
    ParametrizedConv1D, and it is adapted as the Conv1D it is ((in, out) sizes from its weight),
    as a parametrized nn.Linear is; merges are refused (the parametrization would need inverting)."""
    base = conv1d(6, 8)
    parametrize.register_parametrization(base, "weight", _Double())
    layer = MissLinear(base, 2, init_weights=False)
    assert (layer.in_features, layer.out_features) == (6, 8)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        weight = base.parametrizations.weight.original
        expected = x @ (2.0 * weight) + base.bias + term_ref(x, layer.miss_block, 8)
        torch.testing.assert_close(layer(x), expected, **TOL)
    with pytest.raises(ValueError, match="parametrized"):
        layer.merge()
