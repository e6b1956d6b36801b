"""Adapters on shared weights (issue 10, kind 2): a tied lm_head (Llama with
tie_word_embeddings=True), one nn.Linear registered under two paths, and parents that read
`.weight` directly. Unmerged adapters there are correct and warn at setup; merging would change
the other holders, so every merge path refuses before changing anything, naming the way out
(untie explicitly). Float64 throughout; every refused call is checked to change nothing."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import MissConfig, get_peft_model  # noqa: E402
from peft.tuners.miss import MissLinear as PeftMissLinear  # noqa: E402

import miss_ext  # noqa: E402
import miss_ext.peft  # noqa: E402
from miss_ext import MissLinear  # noqa: E402
from conftest import module_settings  # noqa: E402
from tiny_models import R, TARGETS, randomize_blocks, tokens  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)
SHARED = r"shared with model\.embed_tokens\.weight"


def tied_llama():
    """The tiny Llama of tiny_models.py with lm_head.weight tied to model.embed_tokens.weight."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def base():
    return tied_llama()


def snapshot(model):
    """Module types, every parameter value (tied ones under each name), requires_grad flags,
    which parameters are the same object, and the modules' plain settings (conftest's)."""
    params = list(model.named_parameters(remove_duplicate=False))
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: p.detach().clone() for n, p in params},
            {n: p.requires_grad for n, p in params},
            [(n, id(p)) for n, p in params],
            module_settings(model))


def assert_unchanged(model, snap):
    types, values, flags, ids, settings = snap
    assert module_settings(model) == settings
    params = list(model.named_parameters(remove_duplicate=False))
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert [(n, id(p)) for n, p in params] == ids
    assert all(torch.equal(p, values[n]) for n, p in params)
    assert {n: p.requires_grad for n, p in params} == flags


def adapted_head(base):
    """apply_miss on the tied lm_head (and q_proj), random blocks; returns (model, warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = miss_ext.apply_miss(copy.deepcopy(base), ["lm_head", "q_proj"], r=R)
    randomize_blocks(model)
    return model, [str(w.message) for w in caught]


def untied_reference(model):
    """A deep copy whose lm_head has its own copy of the weight (same values, same blocks)."""
    ref = copy.deepcopy(model)
    head = ref.lm_head.base_layer
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return ref


# ---------------------------------------------------------------------------------------------
# miss_ext without PEFT
# ---------------------------------------------------------------------------------------------
def test_adapter_on_a_tied_head_warns_once_and_its_forward_is_right(base):
    model, messages = adapted_head(base)
    shared = [m for m in messages if "shared" in m]
    assert len(shared) == 1 and "lm_head (shared with model.embed_tokens.weight)" in shared[0]
    assert model.lm_head._shared_with == ["model.embed_tokens.weight"]
    assert model.model.layers[0].self_attn.q_proj._shared_with == []
    # Still tied, and the unmerged forward equals that of an untied copy: only lm_head's output changes.
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, untied_reference(model)(ids).logits, **TOL)
    assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-3)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_of_a_tied_head_is_refused_and_changes_nothing(base, safe_merge):
    model, _ = adapted_head(base)
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        miss_ext.merge_and_unload(model, safe_merge=safe_merge)
    message = str(info.value)
    for part in ("cannot merge the MiSS adapter of lm_head", "model.embed_tokens.weight", "Nothing was merged",
                 "get_submodule('lm_head').base_layer", "tie_word_embeddings = False"):
        assert part in message
    assert_unchanged(model, snap)
    assert not any(layer.merged for _, layer in miss_ext.miss_layers(model))


def test_untying_as_the_message_says_then_merging_gives_the_unmerged_logits(base, tmp_path):
    model, _ = adapted_head(base)
    ids = tokens()
    unmerged = model(ids).logits
    embeddings = model.model.embed_tokens.weight.detach().clone()
    # The way out the error names.
    head = model.get_submodule("lm_head").base_layer
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    merged = miss_ext.merge_and_unload(model)
    assert type(merged.lm_head) is nn.Linear and not miss_ext.miss_layers(merged)
    torch.testing.assert_close(merged(ids).logits, unmerged, **TOL)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    # It stays that way through transformers' own re-tying and a save/load round trip.
    merged.tie_weights()
    merged.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    torch.testing.assert_close(loaded(ids).logits, unmerged, **TOL)


def test_why_merging_does_not_untie_silently(base):
    """Untied without changing the config, transformers ties the weights again on tie_weights()
    (also called by resize_token_embeddings), silently dropping the merged head."""
    model, _ = adapted_head(base)
    head = model.lm_head.base_layer
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    merged = miss_ext.merge_and_unload(model)  # allowed: no longer shared
    merged_head = merged.lm_head.weight.detach().clone()
    merged.tie_weights()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not torch.equal(merged.lm_head.weight, merged_head)


def test_merge_and_unload_sees_a_tie_made_after_apply_miss():
    model = miss_ext.apply_miss(tied_llama(), ["q_proj"], r=R)
    randomize_blocks(model)
    # Tie q_proj of layer 1 to that of layer 0 after the adapters exist.
    layers = model.model.layers
    layers[1].self_attn.q_proj.base_layer.weight = layers[0].self_attn.q_proj.base_layer.weight
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.base_layer\.weight"):
        miss_ext.merge_and_unload(model)
    assert_unchanged(model, snap)


class TwoPaths(nn.Module):
    """One nn.Linear registered under two paths ("a" and "b"), another sharing its weight with
    "c", and an independent one: every way a linear's parameters can be shared."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, dtype=torch.float64)
        self.b = self.a
        self.c = nn.Linear(8, 8, dtype=torch.float64)
        self.d = nn.Linear(8, 8, dtype=torch.float64)
        self.d.weight = self.c.weight
        self.e = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        return self.e(self.d(self.c(self.b(self.a(x)))))


def test_all_linear_skips_layers_whose_parameters_are_shared():
    model = TwoPaths()
    with pytest.warns(UserWarning, match=r"'all-linear' skips .*a \(shared with b\.weight, b\.bias\); "
                                         r"c \(shared with d\.weight\); d \(shared with c\.weight\)"):
        miss_ext.apply_miss(model, "all-linear", r=2)
    assert [name for name, _ in miss_ext.miss_layers(model)] == ["e"]
    assert model.e._shared_with == []


def test_a_linear_under_two_paths_adapted_on_one_warns_and_refuses_to_merge():
    model = TwoPaths()
    with pytest.warns(UserWarning, match=r"a \(shared with b\.weight, b\.bias\)"):
        miss_ext.apply_miss(model, ["a"], r=2, init_weights=False)
    assert type(model.b) is nn.Linear  # the second path keeps the plain layer
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = model(x)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter of a: .*shared with b\.weight, b\.bias"):
        miss_ext.merge_and_unload(model)
    assert_unchanged(model, snap)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_naming_the_second_path_of_a_linear_says_which_path_torch_lists():
    """torch lists a module registered twice under its first path only, so PEFT's rule (and ours)
    never matches "b". Naming only "b" used to say "matches no module" though model.b exists;
    naming "a" and "b" adapted "a" and left "b" plain without saying so."""
    model = TwoPaths()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules=\['b'\] matches no module of the model under the path "
                                         r"torch lists it by: b is the module first registered as a"):
        miss_ext.apply_miss(model, ["b"], r=2)
    assert_unchanged(model, snap)
    assert type(model.a) is nn.Linear
    # Said before anything changes: as an error, the warning leaves the model as it was.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match=r"b is the module first registered as a: only a is adapted, b keeps "
                                              r"calling the plain layer"):
            miss_ext.apply_miss(model, ["a", "b", "e"], r=2)
    assert_unchanged(model, snap)
    assert type(model.a) is nn.Linear and type(model.e) is nn.Linear
    with pytest.warns(UserWarning, match=r"b is the module first registered as a, which is not adapted \(name a\)"):
        miss_ext.apply_miss(copy.deepcopy(model), ["b", "e"], r=2)
    with pytest.warns(UserWarning, match=r"names second paths of modules \(one module object under two paths, listed "
                                         r"once by torch\): b is the module first registered as a: only a is adapted"):
        miss_ext.apply_miss(model, ["a", "b"], r=2)
    assert type(model.a) is miss_ext.MissLinear and type(model.b) is nn.Linear
    # A shared PARENT: the child is replaced inside it, so both paths reach the adapter (no
    # warning); an excluded second path is not warned about either.
    for targets, exclude in ((["q"], None), (["enc.q", "alias.q"], None), (["a", "b"], ["b"])):
        holder = nn.Module()
        holder.enc = nn.Module()
        holder.enc.q = nn.Linear(4, 4)
        holder.alias = holder.enc
        holder.a = nn.Linear(4, 4)
        holder.b = holder.a
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            warnings.filterwarnings("ignore", message="MiSS adapter on layers whose base parameters are shared")
            miss_ext.apply_miss(holder, targets, r=2, exclude_modules=exclude)
        if targets == ["q"]:
            assert holder.alias.q is holder.enc.q and type(holder.enc.q) is miss_ext.MissLinear


def test_apply_bank_says_what_becomes_of_a_second_path():
    """apply_bank, as apply_miss above: a module registered twice (`self.b = self.a`) gets its bank
    layer under the path torch lists (a); b keeps calling the plain layer. apply_bank said nothing
    (a review, 2026-12-05: rows through b silently got no adapter), and a name of b alone met a bare
    "selects no module". Now one UserWarning, before anything changes, and the error names the path."""
    model = nn.Module()
    model.a = nn.Linear(4, 4)
    model.b = model.a
    model.e = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"apply_bank: target_modules=\['b'\] selects no module of the model under "
                                         r"the path torch lists it by: b is the module first registered as a"):
        miss_ext.apply_bank(model, ["b"], capacity=2, max_r=2)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match=r"apply_bank: target_modules=\['a', 'b', 'e'\] names second paths of "
                                              r"modules .*b is the module first registered as a: only a is adapted, b "
                                              r"keeps calling the plain layer"):
            miss_ext.apply_bank(model, ["a", "b", "e"], capacity=2, max_r=2)
    assert_unchanged(model, snap)
    assert type(model.a) is nn.Linear and type(model.e) is nn.Linear
    with pytest.warns(UserWarning, match=r"b is the module first registered as a, which is not adapted \(name a\)"):
        miss_ext.apply_bank(copy.deepcopy(model), ["b", "e"], capacity=2, max_r=2)
    with pytest.warns(UserWarning, match=r"apply_bank: .*only a is adapted") as seen:
        miss_ext.apply_bank(model, ["a", "b"], capacity=2, max_r=2)
    assert [w.filename for w in seen] == [__file__]  # the caller's line
    assert type(model.a) is miss_ext.MissBankLinear and type(model.b) is nn.Linear
    # b alone, now that a is a bank layer: b is that layer's base, adapted already (the hint
    # pointed at "a.base_layer", a path apply_bank refuses in turn: a review, 2026-12-05).
    for apply, kwargs in ((miss_ext.apply_bank, dict(capacity=2, max_r=2)), (miss_ext.apply_miss, dict(r=2))):
        with pytest.raises(ValueError, match=r"selects no module of the model: b is the base layer of the adapter "
                                             r"layer at a, adapted already \(one module object under two paths\)$"
                           if apply is miss_ext.apply_bank else r"matches no module of the model: b is the base layer"):
            apply(model, ["b"], **kwargs)
    # A shared parent: the child is replaced inside it, both paths reach the bank layer, no warning.
    holder = nn.Module()
    holder.enc = nn.Module()
    holder.enc.q = nn.Linear(4, 4)
    holder.alias = holder.enc
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        miss_ext.apply_bank(holder, ["enc.q", "alias.q"], capacity=2, max_r=2)
    assert type(holder.alias.q) is miss_ext.MissBankLinear


def test_all_linear_on_the_tied_llama_needs_no_skip(base):
    """The tied head is not an all-linear target anyway (it is the output head)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = miss_ext.apply_miss(copy.deepcopy(base), "all-linear", r=R)
    assert len(miss_ext.miss_layers(model)) == 2 * len(TARGETS) and type(model.lm_head) is nn.Linear


# ---------------------------------------------------------------------------------------------
# load_adapter
# ---------------------------------------------------------------------------------------------
def peft_tied_head(base, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own tied-weights warning
        model = get_peft_model(copy.deepcopy(base), MissConfig(r=R, init_weights=False, **config)).eval()
    randomize_blocks(model)
    return model


def test_load_adapter_on_a_tied_head_warns_and_matches_peft_unmerged(base, tmp_path):
    reference = peft_tied_head(base, target_modules=["lm_head", "q_proj"])
    reference.save_pretrained(tmp_path)
    ids = tokens()
    with pytest.warns(UserWarning, match=r"lm_head \(" + SHARED):
        model = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="cannot merge the MiSS adapter of lm_head"):
        miss_ext.merge_and_unload(model)
    assert_unchanged(model, snap)


def test_load_adapter_refuses_a_saved_copy_of_a_tied_module(base, tmp_path):
    """PEFT trains a separate copy of a modules_to_save lm_head; writing its value into the tied
    parameter would also change the input embeddings."""
    reference = peft_tied_head(base, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():
        reference.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"lm_head\.weight: this parameter is shared with model\.embed_tokens\.weight"):
        miss_ext.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# PEFT models: PEFT's own merge for comparison, then the accelerated one
# ---------------------------------------------------------------------------------------------
def test_peft_itself_warns_and_then_merges_into_the_embeddings(base):
    """For comparison (PEFT 0.21): a warning at setup and at merge, then the merge changes
    embed_tokens and the merged logits differ from the unmerged ones."""
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        plain = get_peft_model(copy.deepcopy(base), MissConfig(r=R, target_modules=["lm_head"], init_weights=False))
    plain.eval()
    randomize_blocks(plain)
    ids = tokens()
    unmerged = plain(ids).logits
    embeddings = plain.base_model.model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        merged = plain.merge_and_unload()
    assert not torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert not torch.allclose(merged(ids).logits, unmerged, atol=1e-3)


def accelerated_tied(base):
    model = miss_ext.peft.accelerate(peft_tied_head(base, target_modules=["lm_head", "q_proj"]))
    assert type(model.base_model) is miss_ext.peft.AcceleratedMissModel
    return model


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload", "layer.merge", "layer.merge(safe)"])
def test_accelerated_merges_into_a_tied_head_are_refused_before_anything_changes(base, how):
    model = accelerated_tied(base)
    head = model.base_model.model.lm_head
    assert head._shared_with == ["model.embed_tokens.weight"] and head._layer_path == "lm_head"
    snap = snapshot(model)
    call = {"merge_adapter": model.merge_adapter, "merge_and_unload": model.merge_and_unload,
            "layer.merge": head.merge, "layer.merge(safe)": lambda: head.merge(safe_merge=True)}[how]
    with pytest.raises(ValueError, match=r"cannot merge the MiSS adapter of lm_head: .*model\.embed_tokens\.weight"):
        call()
    assert_unchanged(model, snap)
    assert not any(getattr(m, "merged_adapters", []) for m in model.modules())


def test_accelerated_merge_of_other_layers_and_after_untying_works(base):
    model = accelerated_tied(base)
    ids = tokens()
    unmerged = model(ids).logits
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.merge()  # not shared: fine
    torch.testing.assert_close(model(ids).logits, unmerged, **TOL)
    q_proj.unmerge()
    head = model.base_model.model.lm_head.base_layer
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.base_model.model.config.tie_word_embeddings = False
    embeddings = model.base_model.model.model.embed_tokens.weight.detach().clone()
    merged = model.merge_and_unload()  # re-checks the sharing: now allowed
    torch.testing.assert_close(merged(ids).logits, unmerged, **TOL)
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)


# ---------------------------------------------------------------------------------------------
# Parents that read .weight instead of calling the layer
# ---------------------------------------------------------------------------------------------
class ReadsWeight(nn.Module):
    """A parent that uses its child's parameters directly (as some attention and head
    implementations do) instead of calling it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6, dtype=torch.float64)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


def test_a_parent_reading_weight_fails_clearly_on_ours_and_bypasses_peft():
    x = torch.randn(3, 8, dtype=torch.float64)
    ours = miss_ext.apply_miss(ReadsWeight(), ["proj"], r=2, init_weights=False)
    assert isinstance(ours.proj, MissLinear)
    with pytest.raises(RuntimeError, match=r"proj'?: \.weight gives the base layer's.*bypass the adapter"):
        ours(x)  # ours: an error, never a silent bypass (the weight's metadata only: weight_metadata.py)
    # PEFT's layer exposes the base weight, so such a parent silently bypasses the adapter. The
    # accelerated layer did the same until 2026-12-03; now accelerate sees the parent's code name
    # self.proj.weight and the layer gives its metadata, so the bypass raises as ours does.
    base = ReadsWeight()
    expected = base(x)
    plain = get_peft_model(copy.deepcopy(base), MissConfig(r=2, target_modules=["proj"], init_weights=False))
    torch.testing.assert_close(plain(x), expected, **TOL)
    assert not torch.allclose(plain.base_model.model.proj(x), expected, atol=1e-3)  # the adapter is not a no-op
    fast = miss_ext.peft.accelerate(copy.deepcopy(plain))
    with pytest.raises(RuntimeError, match=r"at 'base_model\.model\.proj': \.weight gives the base layer's.*bypass"):
        fast(x)


def test_weights_that_only_share_memory_are_shared_too():
    """Not the same Parameter object, the same memory: nn.Parameter(other.weight.data). A merge
    would write into both, so it is refused like a tied weight (found by overlapping storage)."""
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = nn.Parameter(self.a.weight.data)

        def forward(self, x):
            return self.b(self.a(x))

    model = Twins()
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match=r"a \(shared with b\.weight\)"):
        miss_ext.apply_miss(model, ["a"], r=2, init_weights=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shared with b\.weight"):
        miss_ext.merge_and_unload(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # views of one buffer that do not overlap are not shared
    fused = nn.Parameter(torch.randn(12, 6))
    q, k = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    q.weight, k.weight = nn.Parameter(fused.data[:6]), nn.Parameter(fused.data[6:])
    pair = nn.Sequential(q, k)
    miss_ext.apply_miss(pair, ["0"], r=2)
    assert pair[0]._shared_with == []


def test_setup_warnings_turned_into_errors_leave_the_model_as_it_was(base, tmp_path):
    """apply_miss and load_adapter warn before they change anything: with warnings as errors
    (`-W error`, pytest's filterwarnings=error) the call raises and the model is untouched. The
    shared-weight warning (and load_adapter's r > in_features one) used to come after the
    layers were replaced."""
    reference = peft_tied_head(base, target_modules=["lm_head", "q_proj"])
    reference.save_pretrained(tmp_path)
    for call in (lambda m: miss_ext.apply_miss(m, ["lm_head", "q_proj"], r=R),
                 lambda m: miss_ext.load_adapter(m, tmp_path)):
        model = copy.deepcopy(base)
        snap = snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match=r"lm_head \(" + SHARED):
                call(model)
        assert_unchanged(model, snap)
        assert not any(isinstance(m, MissLinear) for m in model.modules())


@pytest.mark.parametrize("safe_merge", [False, True])
def test_the_layers_own_merge_of_a_tied_head_is_refused_and_changes_nothing(base, safe_merge):
    """MissLinear.merge itself, not only merge_and_unload (which re-checks the model), refuses a
    shared base weight: the write would change model.embed_tokens too."""
    model, _ = adapted_head(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=SHARED):
        model.lm_head.merge(safe_merge=safe_merge)
    assert_unchanged(model, snap)
    assert not model.lm_head.merged


def test_a_layer_tied_after_its_merge_can_still_be_unmerged(base):
    """An unmerge restores the other holders too, so it is allowed on a shared weight (refusing it
    would leave the user stuck with a merged layer): untie, merge, tie again, unmerge."""
    model, _ = adapted_head(base)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.base_layer
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    miss_ext.model.record_shared_weights(model)  # the docstring's "call it again after untying"
    assert model.lm_head._shared_with == []
    model.lm_head.merge()
    assert not torch.equal(head.weight, embeddings)
    model.model.embed_tokens.weight = head.weight  # tied again, to the merged weight
    miss_ext.model.record_shared_weights(model)
    assert model.lm_head._shared_with == ["model.embed_tokens.weight"]
    model.lm_head.unmerge()
    assert not model.lm_head.merged
    torch.testing.assert_close(model.model.embed_tokens.weight, embeddings, **TOL)


class _TiedDecoderBuffer(nn.Module):
    """A decoder tied to `fc` through a buffer on fc.weight's memory (not a Parameter)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.register_buffer("dec_w", self.fc.weight.data, persistent=False)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(x)), self.dec_w.t())


def test_a_buffer_on_the_base_weights_memory_is_a_holder_too():
    """A buffer registered on the base weight's memory sees a merge as a tied parameter does: it
    was not looked at, so apply_miss said nothing and every merge (merge_and_unload, the layer's,
    the accelerated PEFT model's) wrote W + dW into the decoder too (a review, 2026-12-05: merged
    outputs 0.86 off, silently). Now it warns at setup and every merge is refused, nothing changed."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64)
    model = _TiedDecoderBuffer()
    with pytest.warns(UserWarning, match=r"fc \(shared with dec_w\)"):
        miss_ext.apply_miss(model, ["fc"], r=3, init_weights=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: miss_ext.merge_and_unload(model), lambda: model.fc.merge()):
        with pytest.raises(ValueError, match=r"shared with dec_w"):
            merge()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert torch.equal(model.dec_w, model.fc.base_layer.weight) and isinstance(model.fc, MissLinear)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = miss_ext.peft.accelerate(get_peft_model(_TiedDecoderBuffer(), MissConfig(
            r=3, target_modules=["fc"], init_weights=False)))
    weight = peft.base_model.model.fc.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"shared with dec_w"):
        peft.merge_adapter()
    assert torch.equal(peft.base_model.model.fc.base_layer.weight, weight)


class _TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = (nn.Linear(8, 8, dtype=torch.float64), nn.Linear(8, 8, dtype=torch.float64),
                                       nn.Linear(8, 3, dtype=torch.float64))

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_an_adapter_layer_held_under_a_second_path_after_apply_miss(tmp_path):
    """One MissLinear assigned to a second attribute after apply_miss (model.l2 = model.l1) adapts
    both call sites. An adapter file names each block by one path and a load adapts that path
    alone: save_adapter wrote the first path only, and the reloaded model was 0.49 off, silently;
    merge_and_unload put the base back at the first path only, leaving a merged MissLinear at the
    second (a review, 2026-12-05). save_adapter and export_lora now refuse, writing nothing;
    merge_and_unload unloads every path; so does the accelerated PEFT model's."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64)
    model = _TwoSites()
    miss_ext.apply_miss(model, ["l1", "head"], r=3, init_weights=False)
    model.l2 = model.l1
    with torch.no_grad():
        expected = model(x)
    for save in (miss_ext.save_adapter, miss_ext.export_lora):
        with pytest.raises(ValueError, match=r"held under several module paths: 'l1' \(also at l2\).*nothing was written"):
            save(model, str(tmp_path / save.__name__))
        assert not (tmp_path / save.__name__).exists()
    merged = miss_ext.merge_and_unload(model)
    assert type(merged.l1) is nn.Linear and merged.l2 is merged.l1
    assert not any(isinstance(m, MissLinear) for _, m in merged.named_modules(remove_duplicate=False))
    torch.testing.assert_close(merged(x), expected, **TOL)

    torch.manual_seed(0)
    peft = miss_ext.peft.accelerate(get_peft_model(_TwoSites(), MissConfig(r=3, target_modules=["l1"],
                                                                              init_weights=False)))
    inner = peft.base_model.model
    inner.l2 = inner.l1
    with torch.no_grad():
        expected = peft(x)
    unloaded = peft.merge_and_unload()
    assert type(unloaded.l1) is nn.Linear and unloaded.l2 is unloaded.l1
    torch.testing.assert_close(unloaded(x), expected, **TOL)


class _SharedParent(nn.Module):
    """One encoder reached under two names (`self.alias = self.enc`): its child is one slot."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64))
        self.alias = self.enc
        self.head = nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.enc(x)))))


def test_a_layer_under_a_shared_parent_saves_and_is_not_shared(tmp_path):
    """An adapter on a child of a shared parent is reached by both paths (the child is replaced in
    the one parent): it is no alias. The aliased-layer refusal took it for one (save_adapter and
    export_lora refused; a review, 2026-12-05), and apply_miss warned that merges would be refused
    while they work. Now it saves, loads back exactly, merges, and says nothing."""
    torch.manual_seed(0)
    base = _SharedParent()
    x = torch.randn(4, 8, dtype=torch.float64)
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        miss_ext.apply_miss(model, ["enc.0"], r=2, init_weights=False)
    assert model.alias[0] is model.enc[0] and model.enc[0]._shared_with == []
    with torch.no_grad():
        expected = model(x)
    miss_ext.save_adapter(model, str(tmp_path / "miss"))
    miss_ext.export_lora(model, str(tmp_path / "lora"))
    torch.testing.assert_close(miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "miss"))(x), expected, **TOL)
    torch.testing.assert_close(miss_ext.merge_and_unload(model)(x), expected, **TOL)
    with warnings.catch_warnings():  # all-linear keeps it
        warnings.simplefilter("error")
        adapted = miss_ext.apply_miss(copy.deepcopy(base), "all-linear", r=2)
    assert isinstance(adapted.enc[0], MissLinear)


def test_all_linear_skips_a_linear_whose_weight_a_buffer_shares():
    """A buffer on a linear's weight memory is another holder (test_a_buffer_on_the_base_weights_
    memory_is_a_holder_too): "all-linear" skips that linear, naming the buffer, as it skips tied
    parameters."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.other = nn.Linear(8, 8), nn.Linear(8, 8)
            self.register_buffer("dec_w", self.fc.weight.data, persistent=False)

        def forward(self, x):
            return F.linear(torch.tanh(self.other(self.fc(x))), self.dec_w.t())

    with pytest.warns(UserWarning, match=r"fc \(shared with dec_w\)"):
        model = miss_ext.apply_miss(Tied(), "all-linear", r=2)
    assert [name for name, _ in miss_ext.miss_layers(model)] == ["other"]


def test_save_bank_adapter_refuses_a_bank_layer_held_under_a_second_path(tmp_path):
    """As save_adapter (test_an_adapter_layer_held_under_a_second_path_after_apply_miss): a bank
    layer assigned to a second attribute after apply_bank was saved under its first path only, and
    the reloaded model was 0.38 off, silently (a review, 2026-12-05)."""
    model = _TwoSites()
    miss_ext.apply_bank(model, ["l1", "head"], capacity=2, max_r=2)
    model.l2 = model.l1
    miss_ext.add_bank_adapter(model, "t", r=2)
    with pytest.raises(ValueError, match=r"save_bank_adapter: adapter layers held under several module paths: 'l1' "
                                         r"\(also at l2\)"):
        miss_ext.save_bank_adapter(model, "t", str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


# Gaps a mutation audit found (2026-12-05): each test names the change to the code it catches.

class _TwoParents(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64))
        self.b = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64))
        self.head = nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_same_attribute_name_under_two_different_parents_is_an_alias(tmp_path):
    """Catches the change (same_slot_paths without `parent_module(model, p) is parent`): a.0 and b.0 end in
    the same attribute name but are slots of two different parents, so one MissLinear held under
    both is an alias (a load would adapt a.0 alone): save_adapter refuses. And a plain linear held
    under both before apply_miss(["a.0"]) is shared with b.0: the setup warns."""
    torch.manual_seed(0)
    model = _TwoParents()
    miss_ext.apply_miss(model, ["a.0"], r=2, init_weights=False)
    model.b[0] = model.a[0]
    with pytest.raises(ValueError, match=r"held under several module paths: 'a\.0' \(also at b\.0\)"):
        miss_ext.save_adapter(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    torch.manual_seed(0)
    model = _TwoParents()
    model.b[0] = model.a[0]
    with pytest.warns(UserWarning, match=r"a\.0 \(shared with b\.0"):
        miss_ext.apply_miss(model, ["a.0"], r=2, init_weights=False)



def test_all_linear_in_capitals_skips_shared_linears_as_all_linear_does():
    """Catches the change (apply_miss without canonical_targets: find_targets reads "ALL-LINEAR" as
    all-linear, but apply_miss's own `== ALL_LINEAR` steps, the skip of shared linears, did not
    run): every spelling selects the same layers."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    chosen = []
    for spelling in ("all-linear", "ALL-LINEAR"):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="skips layers whose parameters are shared"):
            model = miss_ext.apply_miss(Tied(), spelling, r=2)
        chosen.append([name for name, _ in miss_ext.miss_layers(model)])
    assert chosen == [["c"], ["c"]]


def test_export_lora_refuses_an_aliased_layer_of_a_peft_model(tmp_path):
    """Catches the change (export_lora's aliased-layer check looking at miss_ext.MissLinear only): a PEFT
    MissLinear held under a second path (inner.l2 = inner.l1) cannot be described by a LoRA file
    either (it names l1 alone), for the plain and the accelerated PEFT model."""
    for fast in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(_TwoSites(), MissConfig(r=2, target_modules=["l1"], init_weights=False))
        if fast:
            miss_ext.peft.accelerate(model)
        inner = model.base_model.model
        inner.l2 = inner.l1
        target = tmp_path / f"lora{fast}"
        with pytest.raises(ValueError, match=r"held under several module paths: 'l1' \(also at l2\)"):
            miss_ext.export_lora(model, str(target))
        assert not target.exists()



def test_unload_replaces_every_path_of_an_aliased_peft_layer():
    """Catches the change (unload without _unload_aliases; merge_and_unload is tested, unload was not): the
    layer held under a second path goes back to its base there too, and the unloaded model is the
    base model (the adapter dropped)."""
    torch.manual_seed(0)
    base = _TwoSites()
    model = miss_ext.peft.accelerate(get_peft_model(copy.deepcopy(base), MissConfig(r=2, target_modules=["l1"],
                                                                      init_weights=False)))
    inner = model.base_model.model
    inner.l2 = inner.l1
    unloaded = model.unload()
    assert type(unloaded.l1) is nn.Linear and unloaded.l2 is unloaded.l1
    assert not any(isinstance(m, PeftMissLinear) for _, m in unloaded.named_modules(remove_duplicate=False))
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        w, b = base.l1.weight, base.l1.bias
        expected = base.head(torch.tanh(F.linear(torch.tanh(F.linear(x, w, b)), w, b)))
        torch.testing.assert_close(unloaded(x), expected, **TOL)


class _Scale(nn.Module):
    def forward(self, t):
        return 1.5 * t

    def right_inverse(self, t):
        return t / 1.5


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_weight_tied_through_its_parametrization_is_shared(kind):
    """Two layers whose weights are one tensor, both parametrized (torch.nn.utils.parametrize keeps
    that tensor as each one's `parametrizations.weight.original`): reading .weight computes a new
    tensor, which shared memory with nothing, so the tie went unseen; after remove_parametrizations
    (what the merge refusal asks for) the layer's merge wrote dW into the other layer's weight too,
    silently (a review, 2026-12-05). The setup warns now, and the merge is refused, changing nothing."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    if kind == "conv1d":
        Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
        make = lambda: Conv1D(8, 8).double()  # noqa: E731
    else:
        make = lambda: nn.Linear(8, 8, dtype=torch.float64)  # noqa: E731
    model = nn.Module()
    model.a, model.b = make(), make()
    model.b.weight = model.a.weight
    for module in (model.a, model.b):
        parametrize.register_parametrization(module, "weight", _Scale())
    with pytest.warns(UserWarning, match=r"a \(shared with b\.parametrizations\.weight\.original"):
        miss_ext.apply_miss(model, ["a"], r=2, init_weights=False)
    assert model.a._shared_with == ["b.parametrizations.weight.original"]
    parametrize.remove_parametrizations(model.a.base_layer, "weight")
    parametrize.remove_parametrizations(model.b, "weight")
    before = model.b.weight.detach().clone()
    with pytest.raises(ValueError, match="shared with b"):
        model.a.merge()
    assert not model.a.merged and torch.equal(model.b.weight, before)
