"""MiSS without PEFT: `apply_miss`, `merge_and_unload`, `save_adapter` / `load_adapter` (PEFT's
files, both directions, and old Bone files) and `export_lora`, on tiny transformers models. Every
error case checks that the model was left exactly as it was."""
import copy
import errno
import json
import os
import types
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import miss_ext  # noqa: E402
from conftest import assert_unchanged, module_settings, snapshot  # noqa: E402
from miss_ext import MissLinear  # noqa: E402
from miss_ext.adapter_files import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from reference import delta_weight_ref  # noqa: E402
from reference import F64, bat_weight_ref  # noqa: E402
from tiny_models import (TOL64, nonzero, randomize_adapters, rewrite_adapter_weights,  # noqa: E402
                         saved_small_adapter, small_net)
import re  # noqa: E402
from tiny_models import (ARCHS, MINI_R, R, TARGETS, peft_model, randomize_blocks, tiny_causal_lm,  # noqa: E402
                         tiny_moe_lm, tokens, write_bone_copy)

MODES = ["default", "mini", "bat"]
TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module", params=ARCHS)
def base(request):
    return tiny_causal_lm(request.param)


def ours(base, mode, targets=TARGETS, **kwargs):
    model = miss_ext.apply_miss(copy.deepcopy(base), targets, r=R, mode=mode, mini_r=MINI_R, **kwargs)
    randomize_blocks(model)
    return model


def miss_paths(model):
    return [name for name, _ in miss_ext.miss_layers(model)]


# ---------------------------------------------------------------------------------------------
# apply_miss: PEFT's matching rules
# ---------------------------------------------------------------------------------------------
def test_apply_miss_matches_name_suffixes_like_peft(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj", "mlp.down_proj"], r=R)
    assert miss_paths(model) == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    # Only the new blocks train (PEFT's default); the wrapped base layers are frozen.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{p}.miss_block" for p in miss_paths(model)}


def test_apply_miss_takes_a_regex_for_the_whole_path(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), r"model\.layers\.0\..*_proj", r=R)
    assert miss_paths(model) == [f"model.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_apply_miss_all_linear_skips_the_output_head(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), "all-linear", r=R)
    assert len(miss_paths(model)) == 2 * len(TARGETS) and isinstance(model.lm_head, nn.Linear)


def test_apply_miss_keeps_other_parameters_trainable_when_asked(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, freeze_others=False)
    assert model.lm_head.weight.requires_grad and not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad


def test_save_adapter_names_trainable_parameters_it_does_not_save(base, tmp_path):
    """A MiSS file holds blocks, modules_to_save and trained biases only: anything else that
    requires grad (freeze_others=False) is named in a warning, not dropped without a word (found
    by a review: a reloaded model's logits differed by 1.4 with nothing said)."""
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, freeze_others=False)
    with pytest.warns(UserWarning, match=r"save_adapter: model\.embed_tokens\.weight, .* require grad but are not saved"):
        miss_ext.save_adapter(model, tmp_path / "loose")
    frozen = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # blocks and modules_to_save are saved: nothing to say
        miss_ext.save_adapter(frozen, tmp_path / "saved")


def test_export_lora_names_trainable_parameters_it_does_not_save(base, tmp_path):
    """export_lora, as save_adapter above: its LoRA file holds the blocks only, so a parameter
    trained beside them (freeze_others=False) is named in a warning; it was dropped without a word
    (a review, 2026-12-05: the reloaded LoRA model 0.24 off). A frozen model exports silently, and
    a PEFT model is not judged (its other adapters stay trainable there)."""
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, init_weights=False, freeze_others=False)
    with pytest.warns(UserWarning, match=r"export_lora: model\.embed_tokens\.weight, .* require grad but are not "
                                         r"saved: a LoRA file exported from MiSS holds the blocks"):
        miss_ext.export_lora(model, tmp_path / "loose")
    frozen = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        miss_ext.export_lora(frozen, tmp_path / "frozen")
        peft_model = get_peft_model(copy.deepcopy(base), MissConfig(r=R, target_modules=["q_proj"], init_weights=False))
        peft_model.add_adapter("other", MissConfig(r=R, target_modules=["q_proj"], init_weights=False))
        miss_ext.export_lora(peft_model, tmp_path / "peft")


def test_save_adapter_counts_a_parametrized_block_as_saved(base, tmp_path):
    """A miss_block computed by a parametrization (weight_norm) is saved as the computed block,
    which loads back exactly; its originals are not "require grad but not saved" (the warning
    said so, telling the user the trained adapter was lost: training-loop review, 2026-12-02)."""
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, init_weights=False)
    for layer in model.modules():
        if isinstance(layer, MissLinear):
            torch.nn.utils.parametrizations.weight_norm(layer, "miss_block")
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        miss_ext.save_adapter(model, tmp_path / "adapter")
    back = miss_ext.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=0)
    # A trainable parameter elsewhere is still named.
    model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"lm_head\.weight require grad but are not saved"):
        miss_ext.save_adapter(model, tmp_path / "again")


def test_torch_compile_wrappers_are_looked_through(base, tmp_path):
    """apply_miss, save_adapter, load_adapter and export_lora on a torch.compile wrapper act on
    the model inside it: its paths (no "_orig_mod." prefix, which PEFT could not find), its recorded
    modules_to_save (save_adapter raised "would make PEFT also save _orig_mod.lm_head"). Found by
    a review. Nothing is compiled here: wrapping alone gives the prefixed paths."""
    inner = copy.deepcopy(base)
    compiled = torch.compile(inner)
    assert miss_ext.apply_miss(compiled, TARGETS, r=R, modules_to_save=["lm_head"], init_weights=False) is compiled
    assert miss_paths(inner) and miss_paths(inner)[0].startswith("model.layers.")
    miss_ext.save_adapter(compiled, tmp_path / "adapter")
    keys = sorted(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.") or k.startswith("base_model.model.lm_head.") for k in keys), keys
    assert any(".lm_head." in k for k in keys)
    ids = tokens()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids).logits, inner(ids).logits, **TOL)
    target = copy.deepcopy(base)
    miss_ext.load_adapter(torch.compile(target), tmp_path / "adapter")
    assert miss_paths(target) == miss_paths(inner)
    torch.testing.assert_close(target(ids).logits, inner(ids).logits, **TOL)
    miss_ext.export_lora(torch.compile(miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R)), tmp_path / "lora")
    lora_keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert lora_keys and not any("_orig_mod" in k for k in lora_keys)


def test_r_above_in_features_warns_that_peft_cannot_load_the_files(tmp_path):
    """r > in_features is supported here (docs/miss.md), but PEFT 0.21 refuses such a layer
    when it builds it: the warnings of apply_miss and load_adapter say so (a review saved such an
    adapter with "all-linear" and found PEFT could not load it, with nothing said)."""
    model = nn.Sequential(nn.Linear(4, 8))
    with pytest.warns(UserWarning, match=r"r=6 exceeds in_features of 0: .*PEFT .* refuses r > in_features"):
        miss_ext.apply_miss(model, ["0"], r=6)
    miss_ext.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match=r"r=6 exceeds in_features of 0: .*miss_ext\.load_adapter can"):
        miss_ext.load_adapter(nn.Sequential(nn.Linear(4, 8)), tmp_path)
    with pytest.raises(ValueError, match="in_features"):  # the reason for the warning
        PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 8)), tmp_path)


@pytest.mark.parametrize("mode", MODES)
def test_apply_miss_gives_peft_outputs_and_gradients(base, mode):
    model = ours(base, mode)
    reference = peft_model(base, mode).eval()
    with torch.no_grad():  # PEFT's blocks take our values
        for name, layer in miss_ext.miss_layers(model):
            reference.get_submodule("base_model.model." + name).miss_block["default"].copy_(layer.miss_block)
    ids = tokens()
    for m in (model, reference):
        m(ids, labels=ids).loss.backward()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    for name, layer in miss_ext.miss_layers(model):
        expected = reference.get_submodule("base_model.model." + name).miss_block["default"].grad
        torch.testing.assert_close(layer.miss_block.grad, expected, **TOL, msg=name)


def test_apply_miss_rejects_non_linear_targets_and_changes_nothing(base):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.embed_tokens \(torch\.nn\.modules\.sparse\.Embedding\)"):
        miss_ext.apply_miss(model, ["q_proj", "embed_tokens"], r=R)
    assert_unchanged(model, snap)


def test_bat_on_gpt2_conv1d_is_refused_and_changes_nothing():
    """Conv1D takes the default and mini modes (tests/test_conv1d.py); bat builds W' from an
    nn.Linear's (out, in) weight and computes x W'^T itself, so it is refused by name."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    snap = snapshot(gpt2)
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn: bat mode .*Conv1D"):
        miss_ext.apply_miss(gpt2, ["c_attn"], r=2, mode="bat")
    assert_unchanged(gpt2, snap)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["proj"], r=R), ValueError, "matches no module"),  # suffixes match whole names
    (dict(target_modules=r"q_proj", r=R), ValueError, "matches no module"),  # a regex matches whole paths
    (dict(target_modules=["q_proj"], r=5, mode="bat"), ValueError, r"q_proj: bat mode needs .* r=5"),
    (dict(target_modules=["q_proj"], r=R, mode="mini", mini_r=5), ValueError, "mini_r=5"),
    (dict(target_modules=["q_proj"], r=0), ValueError, "r=0"),
    (dict(target_modules=["q_proj"], r=R, dropout=1.5), ValueError, "dropout=1.5"),
    (dict(target_modules=["q_proj"], r=R, mode="lora"), ValueError, "'lora'"),
    (dict(target_modules=[], r=R), ValueError, "target_modules is empty"),
    (dict(target_modules=[1], r=R), TypeError, "target_modules entries must be strings"),
    (dict(target_modules="(", r=R), ValueError, "not a valid regex"),
])
def test_apply_miss_errors_change_nothing(base, kwargs, error, match):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        miss_ext.apply_miss(model, **kwargs)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# Targets that name what no layer holds: fused MoE expert parameters, entries matching nothing
# ---------------------------------------------------------------------------------------------
SHARED_EXPERT = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]


@pytest.mark.parametrize("arch, targets, match", [
    # Llama's MLP names on Qwen2-MoE: they match the shared expert's linears and the routed experts'
    # fused 3-D parameter experts.down_proj, which was left unadapted without a word (PEFT too).
    ("qwen2_moe", ["gate_proj", "up_proj", "down_proj"],
     r"'down_proj' matches the parameters model\.layers\.0\.mlp\.experts\.down_proj, "
     r"model\.layers\.1\.mlp\.experts\.down_proj, which lie inside no layer it selects; name the linear layers "
     r"more precisely, e\.g\. 'shared_expert\.down_proj'"),
    # A config object (PEFT keeps its list as a set) and layers_to_transform: layer 0's only.
    ("qwen2_moe", "config", r"'down_proj' matches the parameters model\.layers\.0\.mlp\.experts\.down_proj, which"),
    # Mixtral: only q_proj was adapted; an entry or a regex naming nothing but fused parameters is
    # this error too, not "matches no module".
    ("mixtral", ["q_proj", "gate_up_proj"],
     r"'gate_up_proj' matches the parameters model\.layers\.0\.mlp\.experts\.gate_up_proj, "
     r".*it matches no linear layer"),
    ("mixtral", r".*experts\.down_proj", r"matches the parameters model\.layers\.0\.mlp\.experts\.down_proj"),
])
def test_targets_naming_fused_moe_expert_parameters_are_refused(arch, targets, match):
    """transformers 5 stores MoE experts as fused 3-D parameters, not nn.Linear modules: a target
    that names them is refused (ValueError naming the target and the parameters, the model as it
    was) instead of adapting the other matches only."""
    from peft import MissConfig

    model = tiny_moe_lm(arch)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match) as err:
        if targets == "config":
            miss_ext.apply_miss(model, MissConfig(r=R, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                  layers_to_transform=[0]))
        else:
            miss_ext.apply_miss(model, targets, r=R)
    assert "MiSS adapts linear layers" in str(err.value) and "fused 3-D parameters" in str(err.value)
    assert_unchanged(model, snap)


def test_moe_shared_expert_named_precisely_and_peft_files_still_load(tmp_path):
    """Named precisely (or with the fused parameters excluded), the shared expert's linears are
    adapted without a word. A PEFT folder whose config lists "down_proj" (PEFT adapted the shared
    expert only) still loads, the file's keys deciding, and so does a PEFT model accelerated."""
    from peft import MissConfig, get_peft_model

    base = tiny_moe_lm("qwen2_moe")
    want = [f"model.layers.{i}.mlp.shared_expert.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert miss_paths(miss_ext.apply_miss(copy.deepcopy(base), SHARED_EXPERT, r=R)) == want
        assert miss_paths(miss_ext.apply_miss(copy.deepcopy(base), ["gate_proj", "up_proj", "down_proj"], r=R,
                                              exclude_modules=["experts.down_proj"])) == want
    peft = get_peft_model(copy.deepcopy(base), MissConfig(r=R, target_modules=["gate_proj", "up_proj", "down_proj"],
                                                          init_weights=False))
    peft.save_pretrained(tmp_path)
    ours = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    assert miss_paths(ours) == want
    ids = tokens()
    with torch.no_grad():  # float32 (tiny_moe_lm): float32 tolerances
        torch.testing.assert_close(ours(ids).logits, peft(ids).logits)
        accelerated = miss_ext.peft.accelerate(peft)
        torch.testing.assert_close(accelerated(ids).logits, ours(ids).logits)


def test_other_bare_parameters_that_a_target_names_are_left_alone_as_peft_does():
    """Only fused expert weights are refused: a 3-D parameter named like a target on another
    module (GraniteSpeech's projector.query beside its Q-Former's query linears) and
    nn.MultiheadAttention's in_proj_weight under ".*proj.*" leave the targets' linears adapted, as
    PEFT adapts them (both raised in the first version of the check)."""
    from peft import MissConfig, get_peft_model

    class Projector(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 3, 8))  # learned queries, not a layer
            self.attn = nn.Module()
            self.attn.query, self.attn.value = nn.Linear(8, 8), nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2)
            self.out_proj2 = nn.Linear(8, 8)

        def forward(self, x):
            q = self.query.expand(x.shape[0], -1, -1)
            return self.out_proj2(self.attn.query(q) + self.attn.value(x).mean(1, keepdim=True))

    for targets, kwargs, want in ((["query", "value"], {}, ["attn.query", "attn.value"]),
                                  (r".*proj.*", {"exclude_modules": ["out_proj"]}, ["out_proj2"])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = miss_ext.apply_miss(Projector(), targets, r=2, **kwargs)
        assert miss_paths(ours) == want
        peft = get_peft_model(Projector(), MissConfig(r=2, target_modules=targets, **kwargs))
        assert sorted(n.removeprefix("base_model.model.").removesuffix(".miss_block.default")
                      for n, _ in peft.named_parameters() if "miss_block" in n) == want


def test_list_entries_matching_nothing_warn_once(base):
    """A list entry that matches no module while others do (a list shared across architectures)
    is named in one UserWarning (PEFT says nothing); no entry matching anything stays an error."""
    from peft import MissConfig

    for targets in (["q_proj", "c_attn", "w1"], MissConfig(r=R, target_modules=["q_proj", "c_attn", "w1"])):
        with pytest.warns(UserWarning, match=r"target_modules entries \['c_attn', 'w1'\] match no module of the "
                                             r"model") as record:
            model = miss_ext.apply_miss(copy.deepcopy(base), targets, r=None if isinstance(targets, MissConfig) else R)
        assert len([w for w in record if "target_modules entries" in str(w.message)]) == 1
        assert miss_paths(model) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with pytest.raises(ValueError, match=r"target_modules=\['c_attn', 'w1'\] matches no module of the model"):
        miss_ext.apply_miss(copy.deepcopy(base), ["c_attn", "w1"], r=R)


def test_layers_offloaded_by_accelerate_are_refused(tmp_path):
    """With accelerate's disk/CPU offload the offloaded layers' weights are on the meta device and
    put in by a hook at each forward: new blocks there were made on the meta device and the
    fresh (zero-init) adapter changed the logits, silently. Refused by name, nothing changed;
    the layers accelerate keeps on a real device take an adapter, and a meta model without
    accelerate hooks (materialised later) still does too."""
    from accelerate import dispatch_model

    base = tiny_causal_lm("llama")
    ids = tokens()
    with torch.no_grad():
        want = base(ids).logits
    model = dispatch_model(copy.deepcopy(base), offload_dir=str(tmp_path), device_map={
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu"})
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"apply_miss: model\.layers\.1\.self_attn\.q_proj, "
                                         r"model\.layers\.1\.self_attn\.v_proj: the model's parameters here are on the "
                                         r"meta device, .*offloaded layers cannot hold an adapter"):
        miss_ext.apply_miss(model, ["q_proj", "v_proj"], r=R)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(p.requires_grad for p in model.parameters())
    miss_ext.apply_miss(model, r"model\.layers\.0\.self_attn\.(q|v)_proj", r=R)  # on the CPU: fine
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, **TOL)
    with torch.device("meta"):  # no accelerate hook: to be materialised later, blocks with it
        meta = type(base)(base.config)
    miss_ext.apply_miss(meta, ["q_proj", "v_proj"], r=R)
    assert len(miss_ext.miss_layers(meta)) == 4
    assert all(layer.miss_block.is_meta for _, layer in miss_ext.miss_layers(meta))


def test_second_apply_miss_keeps_earlier_blocks_trainable(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R)
    miss_ext.apply_miss(model, ["v_proj"], r=2 * R)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.miss_block" for p in miss_paths(model)} and len(trainable) == 4


def test_all_linear_on_gpt2_adapts_every_conv1d_as_peft_selects_them():
    """PEFT's "all-linear" selects nn.Linear and Conv1D layers but the output head; its MiSS then
    refuses the Conv1Ds, which are adapted here (tests/test_conv1d.py)."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    miss_ext.apply_miss(gpt2, "all-linear", r=2)
    assert [name for name, _ in miss_ext.miss_layers(gpt2)] == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj"]


def test_merge_and_unload_of_a_bare_layer_returns_the_linear():
    layer = MissLinear(nn.Linear(8, 6, dtype=torch.float64), 2, init_weights=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = layer(x)
    merged = miss_ext.merge_and_unload(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, **TOL)


def test_apply_miss_twice_on_the_same_layer_is_refused(base):
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already have a MiSS adapter"):
        miss_ext.apply_miss(model, ["q_proj", "v_proj"], r=R)
    assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# merge_and_unload
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(base, mode):
    model = ours(base, mode)
    ids = tokens()
    expected = model(ids).logits
    merged = miss_ext.merge_and_unload(model, safe_merge=True)
    assert not miss_ext.miss_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, expected, **TOL)


def test_safe_merge_and_unload_with_a_broken_block_changes_nothing(base):
    model = ours(base, "default")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.miss_block[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        miss_ext.merge_and_unload(model, safe_merge=True)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("broken", ["meta", "int"])
def test_a_block_the_merge_cannot_use_is_refused_before_any_layer_changes(base, broken):
    """A later layer's block on the meta device or of an integer dtype (not materialised, or
    assigned by hand) was found by the op when the merge reached it: the layers before it were
    merged, then unmerged up to a rounding, and the error named no layer (an atomicity review,
    2026-12-03). Refused first, naming the layer, the weights bit for bit as they were."""
    model = ours(base, "default")
    layer = model.model.layers[1].mlp.up_proj
    shape = layer.miss_block.shape
    layer.miss_block = nn.Parameter(torch.empty(shape, device="meta") if broken == "meta"
                                    else torch.ones(shape, dtype=torch.int32), requires_grad=False)
    types = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    message = "meta device" if broken == "meta" else r"not a floating tensor \(dtype torch.int32\)"
    with pytest.raises(ValueError, match=rf"model\.layers\.1\.mlp\.up_proj: its miss_block .*{message}"):
        miss_ext.merge_and_unload(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if not v.is_meta)
    assert not any(layer.merged for _, layer in miss_ext.miss_layers(model))
    with pytest.raises(ValueError, match=rf"cannot merge MissLinear: its miss_block .*{message}"):
        layer.merge()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
def test_a_block_on_another_device_than_the_weight_is_refused_before_any_layer_changes(base):
    model = ours(base, "default")
    layer = model.model.layers[1].mlp.up_proj
    layer.miss_block = nn.Parameter(layer.miss_block.detach().cuda())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: its miss_block is on cuda:0 and its "
                                         r"weight on cpu"):
        miss_ext.merge_and_unload(model)
    assert all(torch.equal(v.cpu(), state[k].cpu()) for k, v in model.state_dict().items())


def test_merge_and_unload_undoes_its_merges_when_a_later_merge_fails(base, monkeypatch):
    """An error inside a merge after every check (here a bad MISS_EXT_BAT_TRANSFORM value, read
    only by the bat kernel; out of memory would do the same): the layers merged before it are
    unmerged again and none is unloaded."""
    model = ours(base, "default", targets=["q_proj"])
    miss_ext.apply_miss(model, ["o_proj"], r=R, mode="bat")
    types, state, flags, settings = snapshot(model)
    ids = tokens()
    expected = model(ids).logits
    monkeypatch.setenv("MISS_EXT_BAT_TRANSFORM", "bogus")
    with pytest.raises(ValueError, match="MISS_EXT_BAT_TRANSFORM"):
        miss_ext.merge_and_unload(model)
    monkeypatch.delenv("MISS_EXT_BAT_TRANSFORM")
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert module_settings(model) == settings
    assert not any(layer.merged for _, layer in miss_ext.miss_layers(model))
    for name, value in model.state_dict().items():  # W + dW - dW: equal up to one rounding
        torch.testing.assert_close(value, state[name], **TOL)
    torch.testing.assert_close(model(ids).logits, expected, **TOL)


# ---------------------------------------------------------------------------------------------
# Adapter files: ours in PEFT, PEFT's in ours, Bone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_our_adapter_files_load_in_peft(base, mode, tmp_path):
    model = ours(base, mode)
    miss_ext.save_adapter(model, tmp_path, task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["r"] == R
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sorted(keys) == sorted(f"base_model.model.{p}.miss_block" for p in miss_paths(model))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_peft_adapter_files_load_in_ours(base, mode, tmp_path):
    reference = peft_model(base, mode).eval()
    reference.save_pretrained(tmp_path)
    ids = tokens()
    expected = reference(ids).logits
    plain = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    assert len(miss_ext.miss_layers(plain)) == 2 * len(TARGETS)
    torch.testing.assert_close(plain(ids).logits, expected, **TOL)
    # Into a model that already has MissLinear layers there: the same parameter objects get the values.
    model = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R, mode=mode, mini_r=MINI_R)
    blocks = {name: layer.miss_block for name, layer in miss_ext.miss_layers(model)}
    assert miss_ext.load_adapter(model, tmp_path) is model
    assert all(layer.miss_block is blocks[name] for name, layer in miss_ext.miss_layers(model))
    torch.testing.assert_close(model(ids).logits, expected, **TOL)


class Nested(nn.Module):
    """Two linears whose names share a suffix: "fc" and "sub.fc"."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, dtype=torch.float64)
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        return self.sub.fc(self.fc(x))


def test_saved_target_modules_select_exactly_the_adapted_layers(tmp_path):
    model = miss_ext.apply_miss(Nested(), r"fc", r=2)  # the whole-path regex: only the top "fc"
    assert miss_paths(model) == ["fc"]
    miss_ext.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(Nested(), tmp_path)
    adapted = [n for n, m in loaded.named_modules() if hasattr(m, "miss_block")]
    assert adapted == ["base_model.model.fc"]


def test_peft_modules_to_save_and_biases_load_too(base, tmp_path):
    from peft import MissConfig, get_peft_model

    config = MissConfig(r=R, target_modules=TARGETS, init_weights=False, modules_to_save=["lm_head"], bias="all")
    reference = get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():  # a trained head and trained biases that differ from the base model's
        for name, p in reference.named_parameters():
            if p.requires_grad and "miss_block" not in name:
                p.add_(torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    ids = tokens()
    model = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    assert model.lm_head.weight.requires_grad
    # Without freeze_others too, into a base the user froze: the head and biases the file trains
    # train (they used to stay frozen, recorded for save_adapter but never trained).
    frozen = miss_ext.load_adapter(copy.deepcopy(base).requires_grad_(False), tmp_path, freeze_others=False)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad} and "lm_head.weight" in trainable
    # ... and only that: an earlier call's biases (bias="all") that the user froze stay frozen when
    # a file that trains none is loaded without freeze_others.
    plain = tmp_path / "plain"
    miss_ext.save_adapter(miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, init_weights=False), plain)
    earlier = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, bias="all")
    for name, p in earlier.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(False)
    before = {n for n, p in earlier.named_parameters() if p.requires_grad}
    miss_ext.load_adapter(earlier, plain, freeze_others=False)
    assert {n for n, p in earlier.named_parameters() if p.requires_grad} == before
    # A file adapting a module inside an earlier call's modules_to_save is refused, nothing loaded.
    inside = tmp_path / "inside"
    miss_ext.save_adapter(miss_ext.apply_miss(copy.deepcopy(base), r".*(q_proj|layers\.1\.mlp\.up_proj)", r=R,
                                              init_weights=False), inside)
    holder = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R, modules_to_save=["model.layers.1.mlp"])
    snap = {k: v.clone() for k, v in holder.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: an earlier apply_miss/load_adapter call "
                                         r"recorded model\.layers\.1\.mlp as modules_to_save"):
        miss_ext.load_adapter(holder, inside)
    assert list(holder.state_dict()) == list(snap) and type(holder.model.layers[1].mlp.up_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="also trains modules_to_save"):
        miss_ext.export_lora(reference, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    # the same adapter loaded by miss_ext (no PEFT model): its recorded extras are refused too
    with pytest.raises(ValueError, match=r"also trains modules_to_save=\['lm_head'\], bias='all'"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def peft_trainable(model) -> set:
    """PEFT's trainable parameters under miss_ext's names (no wrapper prefix, no adapter name)."""
    names = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            names.add(name.replace(".miss_block.default", ".miss_block"))
    return names


class _NormNet(nn.Module):
    """Two linears around a BatchNorm1d (persistent buffers: running_mean, running_var and the
    integer num_batches_tracked) that holds one non-persistent buffer too; a ModuleList of experts."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(8, 12), nn.BatchNorm1d(12), nn.Linear(12, 4)
        self.bn.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        h = self.b(self.bn(self.a(x)))
        return sum(e(h) for e in self.experts)


def _norm_net():
    torch.manual_seed(0)
    return _NormNet().double().eval()


def test_merge_and_unload_forgets_the_adapters_modules_to_save_and_bias(base, tmp_path):
    """merge_and_unload kept the record of the adapter's modules_to_save and bias: the next
    apply_miss on the merged model trained the old adapter's lm_head and biases and save_adapter
    wrote them into the new adapter's files (a review, 2026-12-05). Now the next adapter starts
    from PEFT's defaults, as after PEFT's merge_and_unload."""
    import json

    model = miss_ext.merge_and_unload(ours(base, "default", modules_to_save=["lm_head"], bias="all"))
    miss_ext.apply_miss(model, ["v_proj"], r=R)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("miss_block" in n for n in trainable), trainable
    miss_ext.save_adapter(model, tmp_path / "next")
    config = json.loads((tmp_path / "next" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["bias"] == "none", config
    miss_ext.merge_and_unload(model)
    miss_ext.apply_miss(model, ["q_proj"], r=R, bias="MiSS_only")  # refused as "an earlier call set bias='all'"
    # merge_and_unload of the submodule holding every layer: the record on the root is stale too
    again = ours(base, "default", modules_to_save=["lm_head"])
    miss_ext.merge_and_unload(again.model)
    miss_ext.apply_miss(again, ["v_proj"], r=R)
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable and all("miss_block" in n for n in trainable), trainable


def test_modules_to_save_buffers_travel_with_the_adapter(tmp_path):
    """PEFT saves a modules_to_save module's whole state_dict, so a BatchNorm's running statistics
    are part of the adapter: save_adapter wrote only its parameters, so load_adapter of our own
    folder silently kept the base statistics (other eval outputs), PeftModel.from_pretrained failed
    on it (KeyError), and load_adapter refused PEFT's folder ("no such parameter"). Found by a
    review, 2026-12-04."""
    from peft import MissConfig, get_peft_model

    x = torch.randn(16, 8, dtype=torch.float64)
    model = miss_ext.apply_miss(_norm_net(), ["a", "b"], r=4, init_weights=False, modules_to_save=["bn"])
    model.train()
    model(x)  # a training forward moves the statistics away from the base model's
    model.eval()
    miss_ext.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    stats = [f"base_model.model.bn.{k}" for k in ("running_mean", "running_var", "num_batches_tracked")]
    assert set(stats) <= set(saved) and not any("scratch" in k for k in saved)
    assert saved[stats[2]].dtype == torch.int64 and int(saved[stats[2]]) == 1
    with torch.no_grad():
        want = model(x)
        loaded = miss_ext.load_adapter(_norm_net(), tmp_path / "ours").eval()
        torch.testing.assert_close(loaded(x), want, **TOL)
        assert torch.equal(loaded.bn.running_var, model.bn.running_var)
        torch.testing.assert_close(PeftModel.from_pretrained(_norm_net(), tmp_path / "ours").eval()(x), want, **TOL)
    # PEFT's own folder, into load_adapter.
    reference = get_peft_model(_norm_net(), MissConfig(r=4, target_modules=["a", "b"], init_weights=False,
                                                       modules_to_save=["bn"]))
    reference.train()
    reference(x)
    reference.eval()
    reference.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(miss_ext.load_adapter(_norm_net(), tmp_path / "peft").eval()(x), reference(x), **TOL)
    # A file naming a non-persistent buffer, or an integer buffer with a float value: refused,
    # nothing loaded (a cast would truncate the count).
    for key, value, message in [("base_model.model.bn.scratch", torch.ones(3, dtype=torch.float64),
                                 r"bn\.scratch: no such parameter \(or persistent buffer\)"),
                                (stats[2], torch.tensor(2.5, dtype=torch.float64),
                                 r"bn\.num_batches_tracked: dtype torch\.float64 in the file, the model's buffer is "
                                 r"torch\.int64")]:
        save_file({**saved, key: value}, str(tmp_path / "ours" / "adapter_model.safetensors"))
        target = _norm_net()
        snap = snapshot(target)
        with pytest.raises(ValueError, match=message):
            miss_ext.load_adapter(target, tmp_path / "ours")
        assert_unchanged(target, snap)


class _SharedStats(nn.Module):
    """A linear, then a module `s1` whose one buffer is registered under two names (s, t), and a
    module `s2` that holds the same buffer as s1 when `tied`."""

    def __init__(self, tied: bool = False):
        super().__init__()  # float64 from the start: .double() would untie the buffers
        self.a = nn.Linear(4, 4, dtype=torch.float64)
        self.s1, self.s2 = nn.Module(), nn.Module()
        self.s1.register_buffer("s", torch.ones(4, dtype=torch.float64))
        self.s1.register_buffer("t", self.s1.s)
        self.s2.register_buffer("s", self.s1.s if tied else torch.ones(4, dtype=torch.float64))

    def forward(self, x):
        return self.a(x) * self.s1.s + self.s2.s


def _shared_stats(tied: bool = False):
    torch.manual_seed(0)
    return _SharedStats(tied)


def test_modules_to_save_buffers_held_twice(tmp_path):
    """A review (2026-12-04) of the buffers' save: one buffer under two names of a modules_to_save
    module made safetensors refuse the save (shared memory), where PEFT writes both keys; and a
    buffer shared with a module outside modules_to_save was accepted by apply_miss and written by
    load_adapter through both holders, where PEFT trains and loads a separate copy. Both names
    are saved now (and PEFT loads them), the shared one refused with the model unchanged."""
    from peft import MissConfig, get_peft_model

    model = miss_ext.apply_miss(_shared_stats(), ["a"], r=2, init_weights=False, modules_to_save=["s1"])
    with torch.no_grad():
        model.s1.s.fill_(3.0)
    miss_ext.save_adapter(model, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {"base_model.model.s1.s", "base_model.model.s1.t"} <= set(saved)
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(_shared_stats(), tmp_path / "ours")(x), model(x), **TOL)
        torch.testing.assert_close(miss_ext.load_adapter(_shared_stats(), tmp_path / "ours")(x), model(x), **TOL)
    # s1's buffer also held by s2: PEFT's copy would leave s2 alone; here training or loading in place
    # would not.
    tied = _shared_stats(tied=True)
    snap = snapshot(tied)
    with pytest.raises(ValueError, match=r"s1: its parameters or buffers are shared with s2\.s"):
        miss_ext.apply_miss(tied, ["a"], r=2, modules_to_save=["s1"])
    assert_unchanged(tied, snap)
    reference = get_peft_model(_shared_stats(tied=True), MissConfig(r=2, target_modules=["a"], init_weights=False,
                                                                    modules_to_save=["s1"]))
    with torch.no_grad():
        reference.base_model.model.s1.modules_to_save.default.s.fill_(3.0)
    reference.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"s1\.s: this buffer is shared with s2\.s"):
        miss_ext.load_adapter(tied, tmp_path / "peft")
    assert_unchanged(tied, snap)


def test_a_file_without_a_modules_to_save_buffer_warns(tmp_path):
    """A file that lacks some of a modules_to_save module's tensors (miss_ext's own, saved before
    2026-12-04, lacks its buffers) loads, keeping the model's values there, and says so naming
    them: PEFT's from_pretrained refuses such a file (KeyError)."""
    model = miss_ext.apply_miss(_norm_net(), ["a", "b"], r=4, init_weights=False, modules_to_save=["bn"])
    miss_ext.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "running" not in k}, str(weights))
    with pytest.warns(UserWarning, match=r"no value for bn\.running_mean, bn\.running_var of its modules_to_save"):
        loaded = miss_ext.load_adapter(_norm_net(), tmp_path)
    assert torch.equal(loaded.bn.running_var, torch.ones(12, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole file: nothing to say
        miss_ext.save_adapter(model, tmp_path / "whole")
        miss_ext.load_adapter(_norm_net(), tmp_path / "whole")


def test_modules_to_save_containers_are_refused_as_peft_refuses_them(tmp_path):
    """PEFT cannot apply modules_to_save to a ModuleList / ModuleDict / ParameterList /
    ParameterDict (TypeError in get_peft_model and from_pretrained); apply_miss accepted one and
    save_adapter wrote a folder PEFT could not load (a review, 2026-12-04). Refused now, naming
    the container, with the model unchanged; a file whose config names one is refused too."""
    from peft import MissConfig, get_peft_model

    with pytest.raises(TypeError, match="ModuleList"):
        get_peft_model(_norm_net(), MissConfig(r=2, target_modules=["a"], modules_to_save=["experts"]))
    model = _norm_net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"experts: a ModuleList, to which PEFT cannot apply modules_to_save .*"
                                         r"'experts\.0'"):
        miss_ext.apply_miss(model, ["a"], r=2, modules_to_save=["experts"])
    assert_unchanged(model, snap)
    # Its members are modules PEFT wraps: accepted, and the folder loads into PEFT.
    inside = miss_ext.apply_miss(_norm_net(), ["a"], r=2, init_weights=False, modules_to_save=["experts.0"])
    miss_ext.save_adapter(inside, tmp_path)
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(_norm_net(), tmp_path)(x), inside(x), **TOL)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, modules_to_save=["experts"])))
    target = _norm_net()
    snap = snapshot(target)
    with pytest.raises(ValueError, match="experts: a ModuleList"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)
    # A model that recorded one anyway (by hand, or an older miss_ext): save_adapter writes nothing.
    inside._miss_ext_trainable = {"modules_to_save": ["experts"], "bias": "none"}
    with pytest.raises(ValueError, match="save_adapter: PEFT could not load this adapter, nothing was written: "
                                         "experts: a ModuleList"):
        miss_ext.save_adapter(inside, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()


@pytest.mark.parametrize("saved", [
    dict(save_embedding_layers=True),
    dict(save_embedding_layers=True, modules_to_save=["norm"]),
    dict(save_embedding_layers=True, modules_to_save=["lm_head"]),
    dict(bias="all"), dict(bias="MiSS_only"), dict(modules_to_save=["norm"])],
    ids=["embedding-layers", "embedding-layers-and-norm", "embedding-layers-and-head", "bias-all", "bias-MiSS_only", "modules_to_save-suffix"])
def test_load_adapter_trains_what_peft_trains(base, saved, tmp_path):
    """load_adapter leaves trainable exactly what PEFT's from_pretrained(is_trainable=True) trains.
    PEFT's save_embedding_layers copies (written after resize_token_embeddings) are loaded but
    frozen: they used to load trainable, so a training run moved them and save_adapter, which
    writes only what PEFT trains, silently lost that training (logits off by 2.7 on reload)."""
    from peft import MissConfig, get_peft_model

    resized = copy.deepcopy(base)
    torch.manual_seed(3)
    resized.resize_token_embeddings(72, mean_resizing=False)
    save_embedding_layers = saved.pop("save_embedding_layers", False)
    config = MissConfig(r=R, target_modules=TARGETS, init_weights=False, **saved)
    reference = get_peft_model(copy.deepcopy(resized), config)
    reference.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    file_keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("embed_tokens" in k for k in file_keys) == save_embedding_layers
    want = peft_trainable(PeftModel.from_pretrained(copy.deepcopy(resized), tmp_path, is_trainable=True))
    model = miss_ext.load_adapter(copy.deepcopy(resized), tmp_path)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    assert "model.embed_tokens.weight" not in want
    assert ("lm_head.weight" in want) == ("lm_head" in (saved.get("modules_to_save") or []))
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)


def test_a_model_with_activation_checkpointing_wrappers_saves_the_unwrapped_paths(tmp_path):
    """torch's checkpoint_wrapper puts "_checkpoint_wrapped_module" into the paths of the modules
    inside it, not into their state_dict keys. save_adapter wrote it into the file's paths, so
    PEFT's from_pretrained into the unwrapped model skipped those layers without an error (0.67
    off: a PEFT 0.22 review, 2026-12-07). The file names the unwrapped paths, as PEFT 0.22's own."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(torch.tanh(self.blk(x)))

    torch.manual_seed(0)
    base = Net().double()
    model = miss_ext.apply_miss(copy.deepcopy(base), ["blk.0", "out"], r=2, init_weights=False,
                                modules_to_save=["blk.1"])
    model.blk = checkpoint_wrapper(model.blk)
    assert "blk._checkpoint_wrapped_module.0" in dict(model.named_modules())
    with torch.no_grad():
        model.blk._checkpoint_wrapped_module[1].weight.add_(0.5)
    miss_ext.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert keys == {"base_model.model.blk.0.miss_block", "base_model.model.out.miss_block",
                    "base_model.model.blk.1.weight", "base_model.model.blk.1.bias"}
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"] == ["blk.1"]
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(x), want, **TOL)
        torch.testing.assert_close(miss_ext.load_adapter(copy.deepcopy(base), tmp_path)(x), want, **TOL)
    # Into a model still wrapped: refused (documented: load before wrapping), nothing changed.
    wrapped = copy.deepcopy(base)
    wrapped.blk = checkpoint_wrapper(wrapped.blk)
    snap = snapshot(wrapped)
    with pytest.raises(ValueError, match="does not fit the model; nothing was loaded"):
        miss_ext.load_adapter(wrapped, tmp_path)
    assert_unchanged(wrapped, snap)


def test_the_modules_to_save_rule_reads_peft_version_strings_as_peft_writes_them(monkeypatch):
    """PEFT writes its __version__, with "@<commit>" for a development install; a field that is
    not a version reads as the newest rule, and without one the installed peft decides."""
    from miss_ext import targets

    assert targets.matches_by_suffix("0.21.2") and targets.matches_by_suffix("0.17.0")
    assert targets.matches_by_suffix("0.21.1.dev0@1a2b3c") and targets.matches_by_suffix(" 0.9.0")
    assert not targets.matches_by_suffix("0.22.0") and not targets.matches_by_suffix("0.22.0.dev0@1a2b3c")
    assert not targets.matches_by_suffix("1.0.0") and not targets.matches_by_suffix("0.100.1")
    assert not targets.matches_by_suffix("unknown") and not targets.matches_by_suffix(21)
    monkeypatch.setattr(targets, "installed_peft_version", lambda: "0.21.2")
    assert targets.matches_by_suffix(None)
    monkeypatch.setattr(targets, "installed_peft_version", lambda: None)  # no peft: the newest rule
    assert not targets.matches_by_suffix(None)


@pytest.mark.parametrize("writer", ["0.21.2", "0.22.0", None], ids=["peft-0.21", "peft-0.22", "no-version"])
def test_modules_to_save_entries_match_by_the_rule_of_the_peft_that_wrote_the_config(writer, tmp_path):
    """PEFT 0.22 matches a modules_to_save entry as whole trailing path parts ("norm" is model.norm),
    0.17-0.21 as a plain string suffix ("norm" is also every input_layernorm). A file is read by
    the rule of the release that wrote it (its peft_version), else by the installed peft's: a file a
    PEFT 0.21 run trained with modules_to_save=["norm"] loads with every norm trainable, as it was
    trained. apply_miss of that config makes a new adapter, as get_peft_model, and trains what the
    installed release's get_peft_model trains, whoever wrote the config."""
    import peft
    from packaging.version import Version

    base = tiny_causal_lm("llama")
    # What a PEFT 0.21 run with ["norm"] saves: a copy of every norm (named here so that any
    # installed PEFT saves them all), each moved away from the base model's values.
    reference = get_peft_model(copy.deepcopy(base), MissConfig(
        r=R, target_modules=TARGETS, init_weights=False,
        modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config = dict(config, modules_to_save=["norm"], peft_version=writer)
    if writer is None:
        del config["peft_version"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    installed_old = Version(peft.__version__) < Version("0.22")
    layer_norms = {f"model.layers.{i}.{kind}.weight" for i in range(2)
                   for kind in ("input_layernorm", "post_attention_layernorm")}
    want = {"model.norm.weight"} | (layer_norms if Version(writer or peft.__version__) < Version("0.22") else set())

    def trained_norms(model):
        return {n for n, p in model.named_parameters() if p.requires_grad and "norm" in n}

    loaded = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    assert trained_norms(loaded) == want
    ids = tokens()
    with torch.no_grad():  # every copy in the file is loaded either way (a frozen one into the model's own norm)
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, **TOL)
    # (PEFT saves inference_mode true, under which apply_miss, as get_peft_model, trains nothing.)
    config["inference_mode"] = False
    fresh = {"model.norm.weight"} | (layer_norms if installed_old else set())
    assert trained_norms(miss_ext.apply_miss(copy.deepcopy(base), config)) == fresh
    peft_config = MissConfig(**{k: v for k, v in config.items() if k in MissConfig.__dataclass_fields__})
    assert {n.replace(".modules_to_save.default", "").removeprefix("base_model.model.")
            for n, p in get_peft_model(copy.deepcopy(base), peft_config).named_parameters()
            if p.requires_grad and "norm" in n} == fresh


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None])
def test_peft_files_with_its_wrapper_copies_load(task_type, tmp_path):
    """With bias="all" PEFT also saves a modules_to_save head's bias under its wrapper's names
    (`classifier.modules_to_save.bias`, `classifier.original_module.bias`) and loads such a file
    itself; load_adapter refused it ("no such parameter"). Now it loads, trains and computes as
    PEFT's from_pretrained."""
    import transformers
    from peft import MissConfig, get_peft_model

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=20, num_labels=3)

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config).double().eval()

    reference = get_peft_model(bert(), MissConfig(r=2, target_modules=["query", "value"], bias="all",
                                                  task_type=task_type, init_weights=False,
                                                  modules_to_save=None if task_type else ["classifier", "pooler"]))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.requires_grad and "miss_block" not in name:
                p.add_(torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    assert "base_model.model.classifier.original_module.bias" in load_file(tmp_path / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(bert(), tmp_path, is_trainable=True).eval()
    model = miss_ext.load_adapter(bert(), tmp_path).eval()
    want = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(
        ".miss_block.default", ".miss_block") for n, p in loaded.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    ids = torch.randint(1, 50, (2, 7))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, **TOL)


@pytest.mark.parametrize("extras", [dict(modules_to_save=["lm_head"]), dict(bias="all"), dict(bias="MiSS_only")],
                         ids=["modules_to_save", "bias-all", "bias-MiSS_only"])
def test_lora_export_refuses_extras_recorded_by_apply_miss(base, extras, tmp_path):
    model = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R, init_weights=False, **extras)
    with pytest.raises(ValueError, match="also trains .*nothing was written"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_unsupported_dropout_in_a_file_changes_nothing(base, tmp_path):
    peft_model(base, "default").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["miss_dropout"] = 1.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(base).requires_grad_(True)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="miss_dropout=1.0"):
        miss_ext.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_old_bone_adapter_files_load(base, mode, tmp_path):
    reference = peft_model(base, mode).eval()
    reference.save_pretrained(tmp_path / "miss")
    write_bone_copy(tmp_path / "miss", tmp_path / "bone")
    model = miss_ext.load_adapter(copy.deepcopy(base), tmp_path / "bone")
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)


@pytest.mark.parametrize("edited_to", ["MISS", "BONE"])
def test_a_config_whose_peft_type_was_edited_without_its_keys_is_refused_by_name(base, tmp_path, edited_to):
    """adapter_files.read_adapter: a Bone folder whose config was switched to peft_type MISS by hand
    (PEFT 0.21 has no BONE type) keeps its `.bone_block` keys, and the reverse: PEFT loads no block
    then (a missing-keys warning); here ValueError naming both names and PEFT's converter, not "no
    blocks"."""
    reference = peft_model(base, "default")
    reference.save_pretrained(tmp_path / "miss")
    write_bone_copy(tmp_path / "miss", tmp_path / "bone")
    folder = tmp_path / ("bone" if edited_to == "MISS" else "miss")
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"peft_type": edited_to}))
    have = "bone_block" if edited_to == "MISS" else "miss_block"
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"peft_type='{edited_to}'.* holds \d+ '{have}' block.*convert-bone-to-miss"):
        miss_ext.load_adapter(model, folder)
    assert_unchanged(model, snap)


def test_adapter_that_does_not_fit_lists_every_difference_and_changes_nothing(base, tmp_path):
    reference = peft_model(base, "default").eval()
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.7.self_attn.q_proj.miss_block"] = torch.zeros(R, 32)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.miss_block"] = torch.zeros(R, 99)
    tensors["base_model.model.model.norm.miss_block"] = torch.zeros(R, 32)
    tensors["base_model.model.model.norm.weight"] = torch.zeros(31)  # a saved parameter of the wrong shape
    tensors["base_model.model.model.nothing.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj", "o_proj", "lm_head"], r=R)
    snap = snapshot(model)
    with pytest.raises(ValueError) as info:
        miss_ext.load_adapter(model, tmp_path)
    message = str(info.value)
    for expected in ("model.layers.7.self_attn.q_proj: no such module",
                     "model.layers.0.self_attn.k_proj: block shape (4, 99) in the file, the model needs (4, 16)",
                     f"model.norm: is a {miss_ext.base_layers.type_name(base.model.norm)}, not an nn.Linear",
                     "lm_head: the model has a MissLinear here, the file has no block",
                     "model.norm.weight: shape (31,) in the file, the model's is (32,)",
                     "model.nothing.weight: no such parameter"):
        assert expected in message
    assert_unchanged(model, snap)


def test_existing_layers_take_the_files_dropout(base, tmp_path):
    """A file trained with dropout, loaded into layers made without: they take the file's dropout
    (as new layers do), so further training and save_adapter keep it."""
    miss_ext.save_adapter(ours(base, "default", dropout=0.25), tmp_path / "a")
    model = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R, mode="default")
    miss_ext.load_adapter(model, tmp_path / "a")
    assert {layer.dropout for _, layer in miss_ext.miss_layers(model)} == {0.25}
    miss_ext.save_adapter(model, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["miss_dropout"] == 0.25


def test_adapter_of_another_mode_is_refused_by_an_adapted_model(base, tmp_path):
    peft_model(base, "mini").save_pretrained(tmp_path)
    model = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R, mode="default")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="mode='default'.*the file has mode='mini'"):
        miss_ext.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_non_miss_adapter_files_are_refused(base, tmp_path):
    model = ours(base, "default")
    miss_ext.export_lora(model, tmp_path)
    target = copy.deepcopy(base)
    snap = snapshot(target)
    with pytest.raises(ValueError, match="peft_type='LORA' is not a MiSS adapter"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


def test_save_adapter_refuses_layers_with_different_settings(base, tmp_path):
    model = miss_ext.apply_miss(copy.deepcopy(base), ["q_proj"], r=R)
    miss_ext.apply_miss(model, ["v_proj"], r=2 * R, freeze_others=False)
    with pytest.raises(ValueError, match="one r, mode, mini_r and dropout"):
        miss_ext.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# LoRA export
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "mini"])
def test_lora_export_is_exact(base, mode, tmp_path):
    model = ours(base, mode)
    miss_ext.export_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(lora(ids).logits, model(ids).logits, **TOL)
    for name, layer in miss_ext.miss_layers(model):
        lora_layer = lora.get_submodule("base_model.model." + name)
        assert lora_layer.scaling["default"] == 1.0
        delta = lora_layer.lora_B["default"].weight @ lora_layer.lora_A["default"].weight
        assert torch.equal(delta, delta_weight_ref(layer.miss_block, layer.out_features, layer.in_features)), name


@pytest.mark.parametrize("in_f, out_f, r", [(7, 5, 3), (8, 6, 16), (10, 20, 2)], ids=["remainder", "r>in", "even"])
def test_lora_factors_are_exact_for_odd_sizes(in_f, out_f, r):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = MissLinear(nn.Linear(in_f, out_f, dtype=torch.float64), r, init_weights=False)
    a, b = miss_ext.lora.lora_factors(layer.miss_block, in_f, out_f)
    assert a.shape == (r, in_f) and b.shape == (out_f, r)
    assert torch.equal(b @ a, delta_weight_ref(layer.miss_block, out_f, in_f))
    x = torch.randn(3, in_f, dtype=torch.float64)
    torch.testing.assert_close(layer.base_layer(x) + x @ a.t() @ b.t(), layer(x), **TOL)


@pytest.mark.parametrize("mode", ["default", "mini"])
def test_lora_export_of_peft_models_is_exact(base, mode, tmp_path):
    model = miss_ext.peft.accelerate(peft_model(base, mode).eval())
    miss_ext.export_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = tokens()
    torch.testing.assert_close(lora(ids).logits, model(ids).logits, **TOL)
    with pytest.raises(ValueError, match="adapter 'other'"):
        miss_ext.export_lora(model, tmp_path / "other", adapter_name="other")


def test_lora_export_of_a_peft_model_without_miss_names_the_peft_version(base, tmp_path, monkeypatch):
    """PEFT before 0.17 has no peft.tuners.miss (Bone only): export_lora of a PeftModel raised a
    bare ModuleNotFoundError there (review, 2026-12-03)."""
    import sys

    model = peft_model(base, "default").eval()
    monkeypatch.setitem(sys.modules, "peft.tuners.miss", None)  # as on PEFT 0.15
    with pytest.raises(ImportError, match=r"export_lora of a PEFT model needs a PEFT with MiSS \(0\.17 or newer\)"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_lora_export_of_bat_is_refused_with_the_reason(base, tmp_path):
    model = ours(base, "bat")
    with pytest.raises(ValueError, match="depends on the frozen weight and has rank up to"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_lora_export_of_a_merged_layer_is_refused(base, tmp_path):
    model = ours(base, "default")
    model.model.layers[0].mlp.up_proj.merge()
    with pytest.raises(ValueError, match=r"merged.*model\.layers\.0\.mlp\.up_proj"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_lora_export_of_a_non_finite_block_is_refused(base, tmp_path, bad):
    """B @ A multiplies each block entry by A's zeros too: an inf became NaN along a whole row of
    the exported delta (2 non-finite entries in MiSS's, 8 in the LoRA's; a review, 2026-12-05), so
    export_lora, which promises the same delta, refuses and writes nothing."""
    model = ours(base, "default")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.miss_block[1, 2] = bad
    with pytest.raises(ValueError,
                       match=r"model\.layers\.0\.mlp\.up_proj holds non-finite values .*nothing was written"):
        miss_ext.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_save_adapter_over_an_earlier_folder_is_whole_or_nothing(tmp_path):
    """A config value JSON cannot hold raises TypeError naming the field before anything is written
    (the earlier adapter in the folder stays loadable); it used to replace the weights, then leave
    a truncated config. A pathlib.Path base_model_name_or_path is written as its string."""
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    miss_ext.save_adapter(miss_ext.apply_miss(copy.deepcopy(base), ["0", "2"], r=2), str(tmp_path))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = miss_ext.apply_miss(copy.deepcopy(base), ["0", "2"], r=4)
    # (An argument of another type is refused by name first: check_save_arguments.)
    with pytest.raises(TypeError, match=r"base_model_name_or_path must be None, a str or an os.PathLike"):
        miss_ext.save_adapter(model, str(tmp_path), base_model_name_or_path=object())
    model.config = types.SimpleNamespace(_name_or_path=object())  # the default, a model config's name
    with pytest.raises(TypeError, match=r"adapter config fields \['base_model_name_or_path'\] cannot be written "
                                        r".*nothing was written"):
        miss_ext.save_adapter(model, str(tmp_path))
    del model.config
    # (A task_type PEFT does not know is refused earlier, by name: check_task_type.)
    with pytest.raises(ValueError, match=r"task_type must be None or one of PEFT's task types"):
        miss_ext.save_adapter(model, str(tmp_path), task_type=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    miss_ext.save_adapter(model, str(tmp_path), base_model_name_or_path=tmp_path / "base")
    with open(tmp_path / "adapter_config.json") as f:
        config = json.load(f)
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _saved_folder(tmp_path, seed, dropout):
    """A two-layer model's MiSS adapter saved into tmp_path; (model, {file name: bytes})."""
    torch.manual_seed(0)
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), ["0", "2"], r=2,
                                init_weights=False, dropout=dropout)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in miss_ext.miss_layers(model):
            layer.miss_block.normal_()
    miss_ext.save_adapter(model, str(tmp_path))
    return model, {p.name: p.read_bytes() for p in tmp_path.iterdir()}


@pytest.mark.parametrize("save", ["save_adapter", "export_lora", "save_bank_adapter"])
def test_a_config_write_that_fails_leaves_the_earlier_adapter_whole(tmp_path, monkeypatch, save):
    """Disk full on the (small) config write, after the weights went through: the weights used to
    be renamed into place first, leaving new weights beside the old config, which loaded silently
    with the old config's miss_dropout (or, after export_lora into a MiSS folder, made PEFT's
    from_pretrained return the base model). Both files are now written to temporaries first: the
    folder keeps the earlier adapter byte for byte, with no temporaries left."""
    from miss_ext import adapter_files

    _, old_files = _saved_folder(tmp_path, seed=1, dropout=0.1)
    new, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    bank = miss_ext.apply_bank(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), ["0", "2"], capacity=1,
                               max_r=2)
    miss_ext.add_bank_adapter(bank, "a", r=2)

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and CONFIG_NAME in os.path.basename(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(adapter_files, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        if save == "save_bank_adapter":
            miss_ext.save_bank_adapter(bank, "a", str(tmp_path))
        else:
            getattr(miss_ext, save)(new, str(tmp_path))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == old_files
    loaded = miss_ext.load_adapter(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), str(tmp_path))
    assert [layer.dropout for _, layer in miss_ext.miss_layers(loaded)] == [0.1, 0.1]


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME, "adapter_model.bin"])
def test_a_folder_under_a_file_name_the_save_replaces_is_refused_before_writing(tmp_path, name):
    """A folder named like one of the files a save replaces or removes (a stray adapter_model.bin
    folder, say) failed the save halfway with a bare IsADirectoryError, after the old config was
    removed and the new weights moved in: the earlier adapter was lost (an atomicity review,
    2026-12-03). Refused before anything is written, naming the folder."""
    folder = tmp_path / "adapter"
    _, old_files = _saved_folder(folder, seed=1, dropout=0.1)
    new, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    if name in old_files:
        (folder / name).unlink()
        del old_files[name]
    (folder / name).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"\['{name}'\] there is a folder.*Nothing was written"):
        miss_ext.save_adapter(new, str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == old_files
    assert sorted(p.name for p in folder.iterdir()) == sorted([*old_files, name])


def test_a_link_to_a_folder_under_a_file_name_is_replaced_not_refused(tmp_path):
    """Links at the file names are replaced, not written through (write_adapter): a link to a
    folder is no folder in the way."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (folder / WEIGHTS_NAME).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    new, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    miss_ext.save_adapter(new, str(folder))
    assert (folder / WEIGHTS_NAME).is_file() and not (folder / WEIGHTS_NAME).is_symlink()
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("interrupted", ["weights", "config"])
def test_an_interrupted_save_leaves_no_config_rather_than_a_mixed_pair(tmp_path, monkeypatch, interrupted):
    """Ctrl-C while the files are being renamed into place: the old config is removed before the
    new weights go in and the new config comes last, so the folder is either the earlier adapter
    or refused by every loader (no adapter_config.json, the message says why), never the new
    weights beside the old config; the temporaries are removed."""
    from miss_ext import adapter_files

    _, old_files = _saved_folder(tmp_path, seed=1, dropout=0.1)
    new, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    target = WEIGHTS_NAME if interrupted == "weights" else CONFIG_NAME
    real_replace = os.replace

    def interrupted_replace(src, dst):
        if os.path.basename(dst) == target:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(adapter_files.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        miss_ext.save_adapter(new, str(tmp_path))
    monkeypatch.undo()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert CONFIG_NAME not in files and not any(name.endswith(".tmp") for name in files), sorted(files)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in .*a save into this folder that did "
                                                r"not complete"):
        miss_ext.load_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    miss_ext.save_adapter(new, str(tmp_path))  # saving again mends it
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [layer.dropout for _, layer in miss_ext.miss_layers(miss_ext.load_adapter(model, str(tmp_path)))] == [0.0,
                                                                                                                 0.0]


def test_saving_over_an_old_bin_adapter_removes_its_weights(tmp_path):
    """A folder of an older PEFT's adapter (adapter_model.bin): the new save's config must not sit
    beside the replaced adapter's .bin weights (a loader asked for .bin, or one that finds no
    safetensors, would read them with the new config), so the .bin goes with the old config."""
    model, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    torch.save({f"base_model.model.{i}.miss_block": torch.ones(2, 8) for i in (0, 2)}, tmp_path / "adapter_model.bin")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(miss_ext.adapter_files.adapter_config(2, "default", 1, 0.1,
                                                                                         ["0", "2"])))
    (tmp_path / "README.md").write_text("model card")  # not the adapter's: kept
    miss_ext.save_adapter(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


def test_save_adapter_into_a_file_or_over_links(tmp_path):
    """A file at the folder's path: FileExistsError, the file untouched. Links at the file names
    are replaced by the new files, not written through (the files they point at are kept)."""
    model, _ = _saved_folder(tmp_path / "new", seed=2, dropout=0.0)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"'.*file': that is a file, and an adapter is a folder"):
        miss_ext.save_adapter(model, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a folder"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "linked"
    folder.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (elsewhere / name).write_text("kept")
        (folder / name).symlink_to(elsewhere / name)
    miss_ext.save_adapter(model, str(folder))
    assert [(elsewhere / name).read_text() for name in (CONFIG_NAME, WEIGHTS_NAME)] == ["kept", "kept"]
    assert not any((folder / name).is_symlink() for name in (CONFIG_NAME, WEIGHTS_NAME))
    miss_ext.load_adapter(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), str(folder))


def _two_adapter_peft_folders(tmp_path):
    """PEFT 0.14-0.19's files of a model holding two adapters, "default" on 0 and 2 (r=4) and
    "other" on 0 (r=2), built by hand from PEFT 0.21's: each file also holds the other adapter's
    blocks under `<path>.miss_block.<its name>`. Returns (the PEFT model, {name: folder})."""
    from peft import MissConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    model = get_peft_model(copy.deepcopy(base), MissConfig(target_modules=["0", "2"], r=4, init_weights=False))
    model.add_adapter("other", MissConfig(target_modules=["0"], r=2, init_weights=False))
    model.save_pretrained(str(tmp_path))  # PEFT 0.21: tmp_path (default), tmp_path / "other"
    blocks = {(path, name): param.detach().clone() for key, param in model.named_parameters()
              if ".miss_block." in key for path, name in [key.removeprefix("base_model.model.").split(".miss_block.")]}
    folders = {"default": tmp_path, "other": tmp_path / "other"}
    for name, folder in folders.items():
        tensors = load_file(folder / WEIGHTS_NAME)
        tensors.update({f"base_model.model.{path}.miss_block.{other}": block for (path, other), block in blocks.items()
                        if other != name})
        save_file(tensors, folder / WEIGHTS_NAME)
    return base, model.eval(), folders


def test_multi_adapter_folders_of_peft_before_0_20_load_as_peft_loads_them(tmp_path):
    """PEFT 0.14-0.19 saved, for a model holding several adapters, the other adapters' blocks into
    each adapter's file (`0.miss_block.other`); PEFT's from_pretrained ignores those keys.
    load_adapter refused them ("no such parameter in the model") and load_bank misnamed them
    (modules_to_save or bias); both now load the file's own blocks, with PEFT's logits, and warn
    counting the other adapters' blocks. Bone files (`.bone_block.<name>`) the same."""
    base, peft_model, folders = _two_adapter_peft_folders(tmp_path)
    x = torch.randn(3, 12)
    for name, folder in folders.items():
        peft_model.set_adapter(name)
        with torch.no_grad():
            expected = peft_model(x)
            # Under its own name: PEFT 0.21 loads a stale "<path>.miss_block.default" over the file's
            # own block when loading under the name "default" (the warning says so).
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), adapter_name=name).eval()
            torch.testing.assert_close(loaded(x), expected)
        count = {"default": 1, "other": 2}[name]
        pattern = rf"ignored {count} block\(s\) of other adapters .*PEFT before 0\.20" + \
            ("" if name == "default" else r".*PEFT 0\.21's from_pretrained loads a block named 'default'")
        with pytest.warns(UserWarning, match=pattern):
            model = miss_ext.load_adapter(copy.deepcopy(base), str(folder)).eval()
        with pytest.warns(UserWarning, match=pattern):
            bank = miss_ext.load_bank(copy.deepcopy(base), {name: str(folder)}).eval()
        with torch.no_grad(), miss_ext.mixed_batch(bank, [name] * 3):
            torch.testing.assert_close(model(x), expected)
            torch.testing.assert_close(bank(x), expected)
        write_bone_copy(folder, tmp_path / f"bone_{name}")
        with pytest.warns(UserWarning, match=rf"ignored {count} block\(s\) of other adapters .*\.bone_block\..*PEFT "
                                             r"before 0\.20"):
            bone = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path / f"bone_{name}")).eval()
        with torch.no_grad():
            torch.testing.assert_close(bone(x), expected)


def test_only_other_adapter_blocks_of_exactly_that_form_are_ignored(tmp_path):
    """`<path>.miss_block.<name>` naming a parameter of the model (a module called miss_block) is a
    part of the file PEFT loads, so it is loaded, not ignored; a deeper key
    (`0.miss_block.other.x`) is no other adapter's block and is refused as before."""
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.miss_block = nn.Linear(2, 2)

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), Holder())
    miss_ext.save_adapter(miss_ext.apply_miss(copy.deepcopy(base), ["0", "2"], r=2, init_weights=False),
                          str(tmp_path))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, modules_to_save=["3"])))
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    save_file(dict(tensors, **{"base_model.model.3.miss_block.weight": torch.full((2, 2), 7.0)}),
              tmp_path / WEIGHTS_NAME)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = miss_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    # The one thing said: the hand-made file lacks the module's bias (kept), not "ignored".
    assert [str(w.message).split(": ", 1)[1].split(",")[0] for w in caught] == [
        "the file has no value for 3.miss_block.bias of its modules_to_save"]
    assert torch.equal(model[3].miss_block.weight, torch.full((2, 2), 7.0))
    # Without a model to look in (load_bank reads the files first), the config decides: a key its
    # modules_to_save could have saved is kept (and then refused by the bank, as before).
    _, _, extras = miss_ext.adapter_files.read_adapter(str(tmp_path))
    assert "3.miss_block.weight" in extras
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(config, modules_to_save=None)))
    with pytest.warns(UserWarning, match=r"ignored 1 block\(s\) of other adapters \('weight'"):
        assert "3.miss_block.weight" not in miss_ext.adapter_files.read_adapter(str(tmp_path))[2]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    save_file(dict(tensors, **{"base_model.model.0.miss_block.other.x": torch.ones(2, 8)}), tmp_path / WEIGHTS_NAME)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.miss_block\.other\.x: no such parameter \(or persistent buffer\) in the model"):
        miss_ext.load_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)


def test_load_adapter_into_a_model_built_under_inference_mode(tmp_path):
    """A model built under torch.inference_mode() (a common way to load one for serving), then an
    adapter with modules_to_save loaded outside it: torch refuses writing an inference tensor only
    after the write, so the blocks went in and then the lm_head copy failed with torch's generic
    message. Now refused first, naming the parameter, with the model unchanged; under inference
    mode the load works."""
    src = ours(tiny_causal_lm("llama"), "default", modules_to_save=["lm_head"])
    with torch.no_grad():
        src.lm_head.weight.add_(0.1)
    miss_ext.save_adapter(src, str(tmp_path))
    with torch.inference_mode():
        model = tiny_causal_lm("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"nothing was loaded:\n  lm_head\.weight: an inference tensor"):
        miss_ext.load_adapter(model, str(tmp_path))
    assert_unchanged(model, snap)
    assert not miss_ext.miss_layers(model)
    ids = tokens(2, 5)
    with torch.inference_mode():
        miss_ext.load_adapter(model, str(tmp_path))
        torch.testing.assert_close(model(ids).logits, src(ids).logits)


def test_threads_saving_into_one_folder_do_not_collide(tmp_path):
    """Each save writes under a temporary name of its own (a per-process name made two threads'
    renames take each other's files: FileNotFoundError in 14 of 400 saves)."""
    import threading

    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2)
    errors = []

    def save():
        for _ in range(40):
            try:
                miss_ext.save_adapter(model, str(tmp_path))
            except Exception as exc:  # noqa: BLE001 -- reported by the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert miss_ext.load_adapter(nn.Sequential(nn.Linear(8, 8)), str(tmp_path))


def test_load_adapter_makes_new_layers_in_the_models_mode(base, tmp_path):
    """New layers take the training flag of the module they replace: into an eval model (PEFT's
    from_pretrained returns one) a file trained with dropout gives PEFT's deterministic logits, with
    no dropout at inference; into a model in training mode the new layers train with the dropout."""
    miss_ext.save_adapter(ours(base, "default", dropout=0.25), tmp_path)
    model = miss_ext.load_adapter(copy.deepcopy(base).eval(), tmp_path)
    assert not any(layer.training for _, layer in miss_ext.miss_layers(model))
    ids = tokens()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(model(ids).logits, peft(ids).logits, **TOL)
    trained = miss_ext.load_adapter(copy.deepcopy(base).train(), tmp_path)
    assert all(layer.training for _, layer in miss_ext.miss_layers(trained))


def test_load_adapter_of_r_one_above_in_warns(tmp_path):
    """The boundary of the r > in_features warning at load: r = in + 1 has one dead block row."""
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64))
    with pytest.warns(UserWarning, match="dead weight"):
        miss_ext.apply_miss(model, ["0"], r=5, init_weights=False)
    miss_ext.save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match=r"adapter r=5 exceeds in_features of 0: those block rows are dead weight"):
        miss_ext.load_adapter(nn.Sequential(nn.Linear(4, 6, dtype=torch.float64)), tmp_path)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_export_keeps_the_adapters_dropout(base, tmp_path, dropout):
    """MiSS dropout on the adapter input is LoRA's lora_dropout (miss_ext/lora.py): the exported
    config carries it, so training the LoRA further keeps the regularisation."""
    miss_ext.export_lora(ours(base, "default", dropout=dropout), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_dropout"] == dropout
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    layer = lora.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert getattr(layer.lora_dropout["default"], "p", 0.0) == dropout


def test_lora_export_of_peft_models_keeps_dropout_and_refuses_merged_or_mixed_r(tmp_path):
    """PEFT models through export_lora: the adapter's miss_dropout becomes lora_dropout; a merged
    PEFT model is refused (the LoRA would add dW a second time); layers of two r (one LoRA config
    has one) are refused, nothing written (a mutation audit found no test of these, 2026-12-03)."""
    from peft import MissConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)), MissConfig(r=4, target_modules=["0"], miss_dropout=0.1))
    miss_ext.export_lora(model, tmp_path / "dropout")
    assert json.loads((tmp_path / "dropout" / CONFIG_NAME).read_text())["lora_dropout"] == 0.1
    merged = get_peft_model(nn.Sequential(nn.Linear(16, 8)), MissConfig(r=4, target_modules=["0"]))
    with torch.no_grad():
        merged.base_model.model[0].miss_block["default"].normal_()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged, so a LoRA on their weight would apply the adapter twice"):
        miss_ext.export_lora(merged, tmp_path / "merged")
    two_r = miss_ext.apply_miss(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 8)), ["0"], r=4)
    two_r = miss_ext.apply_miss(two_r, ["1"], r=2)
    with pytest.raises(ValueError, match=r"one LoRA config has one r .*\[\(2, 0\.0\), \(4, 0\.0\)\]"):
        miss_ext.export_lora(two_r, tmp_path / "two_r")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "two_r").exists()


def test_apply_miss_takes_init_weights_and_mini_r_from_a_peft_config():
    """apply_miss(model, MissConfig(...)): init_weights=False is PEFT's random init (not zeros),
    and mini_r comes from the config (a mutation audit found both untested, 2026-12-03)."""
    from peft import MissConfig
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    model = miss_ext.apply_miss(copy.deepcopy(base), MissConfig(r=4, target_modules=["0"], init_weights=False))
    assert model[0].miss_block.abs().sum() > 0
    model = miss_ext.apply_miss(copy.deepcopy(base), MissConfig(r=4, target_modules=["0"], init_weights="mini",
                                                                mini_r=4))
    assert model[0].mode == "mini" and model[0].mini_r == 4 and tuple(model[0].miss_block.shape) == (4, 4)


def test_load_adapter_into_a_merged_layer_is_refused(tmp_path):
    """A merged MissLinear would ignore a block loaded into it (the weight already holds the old
    one): refused, naming it, nothing changed (untested until a mutation audit, 2026-12-03)."""
    torch.manual_seed(0)
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(16, 8)), ["0"], r=4, init_weights=False)
    miss_ext.save_adapter(model, tmp_path)
    target = miss_ext.apply_miss(nn.Sequential(nn.Linear(16, 8)), ["0"], r=4, init_weights=False)
    target[0].merge()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"0: the model's MissLinear is merged; unmerge it before loading"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


# Paths no other test reached (a coverage audit of miss_ext/*.py, 2026-12-05): each test was checked
# to fail with the code it covers broken.

# ---- model.py: merge_and_unload over a layer merged already --------------------------------------
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_and_unload_leaves_a_layer_merged_already_merged_once(safe_merge):
    """model.py, merge_and_unload: a layer the user merged before is skipped by the safe_merge check
    and by the merge loop (both `if layer.merged` branches were never taken). Its weight holds
    W + dW once, the others get theirs, the unloaded model computes the adapted output, and no
    "already merged" warning comes from merging it again."""
    model = small_net()
    miss_ext.apply_miss(model, ["lin1", "lin2", "lin3"], r=3, init_weights=False)
    randomize_adapters(model)
    x = nonzero(4, 10)
    with torch.no_grad():
        want = model(x)
    refs = {name: model.get_submodule(name).base_layer.weight.detach().to(F64)
            + delta_weight_ref(model.get_submodule(name).miss_block, *model.get_submodule(name).base_layer.weight.shape)
            for name in ("lin1", "lin2", "lin3")}
    model.lin2.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = miss_ext.merge_and_unload(model, safe_merge=safe_merge)
    assert out is model and all(type(getattr(model, n)) is nn.Linear for n in ("lin1", "lin2", "lin3"))
    for name, ref in refs.items():
        torch.testing.assert_close(getattr(model, name).weight.detach(), ref, **TOL64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, **TOL64)


# ---- modules.py / model.py: constructor and apply_miss ---------------------------------------------
@pytest.mark.parametrize("init_weights", ["mini", "bat", 0, None])
def test_miss_linear_refuses_a_non_bool_init_weights(init_weights):
    """modules.py, MissLinear.__init__: PEFT's init_weights="mini"/"bat" select a mode there; here
    they are a bool. A truthy string would have given a zero-init default-mode layer where the
    user asked for mini or bat. Refused, the base left trainable (it is frozen only on success)."""
    base = nn.Linear(10, 20).to(F64)
    with pytest.raises(TypeError, match=rf"init_weights must be True \(zero init\) or False \(random init\), got "
                                        rf"{re.escape(repr(init_weights))}"):
        MissLinear(base, 2, init_weights=init_weights)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_apply_miss_bat_with_dropout_warns_and_ignores_it():
    """model.py, apply_miss: bat mode with dropout > 0 warns that dropout is ignored (as PEFT), and
    in training the output is the dropout-free bat output y = x W'^T + b, W'_ij = W_ij (I + B_i) + B_i."""
    model = small_net()
    with pytest.warns(UserWarning, match=r"MiSS dropout=0.5 is ignored in bat mode \(as in PEFT\)"):
        miss_ext.apply_miss(model, ["lin1", "lin2"], r=2, mode="bat", dropout=0.5, init_weights=False)
    randomize_adapters(model, scale=0.1)
    model.train()
    x = nonzero(6, 10)
    h = torch.tanh(x @ bat_weight_ref(model.lin1.base_layer.weight, model.lin1.miss_block).t()
                   + model.lin1.base_layer.bias.detach())
    h = torch.tanh(h @ bat_weight_ref(model.lin2.base_layer.weight, model.lin2.miss_block).t()
                   + model.lin2.base_layer.bias.detach())
    want = h @ model.lin3.weight.detach().t() + model.lin3.bias.detach()
    for _ in range(2):  # no mask: the same output each call
        torch.testing.assert_close(model(x).detach(), want, **TOL64)


# ---- adapter_files.py: load_adapter ---------------------------------------------------------------
def test_load_adapter_of_an_all_linear_config_selects_every_linear(tmp_path):
    """adapter_files.py, _selection_problems' "all-linear" branch: a config whose target_modules is
    PEFT's shorthand (PEFT expands it to the model's linears, output head excluded) loads onto
    every linear, and the loaded model computes what the saved one does."""
    source = saved_small_adapter(tmp_path / "a", r=3, targets=("lin1", "lin2", "lin3"))
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = "all-linear"
    config_file.write_text(json.dumps(config))
    model = small_net()
    model.load_state_dict({k.replace("base_layer.", ""): v for k, v in source.state_dict().items()
                           if "miss_block" not in k})
    miss_ext.load_adapter(model, str(tmp_path / "a"))
    assert all(isinstance(getattr(model, n), MissLinear) for n in ("lin1", "lin2", "lin3"))
    x = nonzero(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), **TOL64)
    # A file missing the block of a linear the shorthand selects is refused (PEFT would give that
    # layer a fresh adapter), nothing loaded.
    rewrite_adapter_weights(tmp_path / "a", lambda t: t.pop("base_model.model.lin3.miss_block"))
    fresh = small_net()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=r"lin3: the config \(target_modules='all-linear'\) selects this module, so "
                                         "PEFT would give it a new adapter, but the file has no block for it"):
        miss_ext.load_adapter(fresh, str(tmp_path / "a"))
    assert_unchanged(fresh, snap)


def test_load_adapter_refuses_keys_outside_the_base_model(tmp_path):
    """adapter_files.py, read_adapter: a key without PEFT's "base_model.model." prefix (a file
    saved from another wrapper, or a state_dict written by hand) is neither a block nor a tensor
    the loader places: refused by name rather than skipped, nothing loaded."""
    saved_small_adapter(tmp_path / "a")
    rewrite_adapter_weights(tmp_path / "a", lambda t: t.update({"lin2.miss_block": nonzero(2, 8)}))
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"keys outside the base model \(base_model\.model\.\.\.\.\): "
                                         r"lin2\.miss_block"):
        miss_ext.load_adapter(model, str(tmp_path / "a"))
    assert_unchanged(model, snap)


def test_load_adapter_refuses_a_folder_without_blocks_or_weights(tmp_path):
    """adapter_files.py: a weights file holding no block (only a modules_to_save tensor, say) and a
    folder without a weights file are refused, the model unchanged."""
    saved_small_adapter(tmp_path / "a")
    rewrite_adapter_weights(tmp_path / "a", lambda t: [t.pop(k) for k in list(t)] and t.update(
        {"base_model.model.lin3.weight": nonzero(6, 8)}))
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="the adapter file has no blocks"):
        miss_ext.load_adapter(model, str(tmp_path / "a"))
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors \(or adapter_model\.bin\)"):
        miss_ext.load_adapter(model, str(tmp_path / "a"))
    assert_unchanged(model, snap)


def test_load_adapter_reports_a_layer_its_config_mode_cannot_fit(tmp_path):
    """adapter_files.py, _plan: a config whose mode cannot go on a layer (bat with r = 4 on
    Linear(10, 20): r must divide in_features) is reported for that layer among the problems,
    nothing loaded (the other layer fits)."""
    saved_small_adapter(tmp_path / "a", r=4, targets=("lin1", "lin2"))
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["init_weights"] = "bat"
    config_file.write_text(json.dumps(config))
    rewrite_adapter_weights(tmp_path / "a", lambda t: t.update({"base_model.model.lin2.miss_block": nonzero(2, 4, 4)}))
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)lin1: bat mode needs in_features and out_features divisible by r; got "
                                         r"in_features=10, out_features=20, r=4") as info:
        miss_ext.load_adapter(model, str(tmp_path / "a"))
    assert "lin2" not in str(info.value)
    assert_unchanged(model, snap)


# ---- targets.py: layers_to_transform on a path without a layer index -------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class Deep(nn.Module):
    """body.layers.{0,1}.proj (indexed) and head.proj (no layer index), float64."""

    def __init__(self):
        super().__init__()
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([_Block(), _Block()])
        self.head = _Block()

    def forward(self, x):
        for block in self.body.layers:
            x = block(x)
        return self.head(x)


def test_layers_to_transform_leaves_out_a_target_without_a_layer_index():
    """targets.py, peft_selects: with layers_to_transform, a target whose path has no layer index
    (head.proj) is not adapted, as PEFT's check_target_module_exists decides; apply_miss adapts
    the same modules as PEFT and computes the same output."""
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model

    base = Deep().to(F64)
    peft = get_peft_model(copy.deepcopy(base), MissConfig(r=2, target_modules=["proj"], layers_to_transform=[0],
                                                          init_weights=False))
    peft_paths = sorted(n[len("base_model.model."):] for n, m in peft.named_modules() if hasattr(m, "miss_block")
                        and n.endswith("proj"))
    ours = miss_ext.apply_miss(copy.deepcopy(base), ["proj"], r=2, layers_to_transform=[0], init_weights=False)
    assert sorted(n for n, _ in miss_ext.miss_layers(ours)) == peft_paths == ["body.layers.0.proj"]
    with torch.no_grad():
        ours.body.layers[0].proj.miss_block.copy_(peft.base_model.model.body.layers[0].proj.miss_block["default"])
    x = nonzero(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft(x), **TOL64)


# ---- targets.py / model.py: argument checks of apply_miss -------------------------------------------
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(target_modules=5), TypeError, r"target_modules must be a regex string or a non-empty list of module names, "
                                        r"got 5"),
    (dict(target_modules=["lin1"], exclude_modules=5), TypeError,
     r"exclude_modules must be a regex string or a list of module names, got 5"),
    (dict(target_modules=["lin1"], exclude_modules=["lin2", 3]), TypeError,
     r"exclude_modules must be a regex string or a list of module names"),
    (dict(target_modules=["lin1"], layers_to_transform=[0], layers_pattern=7), TypeError,
     r"layers_pattern must be a string or a list of strings, got 7"),
    (dict(target_modules=["lin1"], layers_to_transform=[0], layers_pattern=["layers", 1]), TypeError,
     r"layers_pattern must be a string or a list of strings"),
])
def test_apply_miss_refuses_selection_fields_of_the_wrong_type(kwargs, error, message):
    """targets.py, canonical_targets / check_selection_fields: a selection field of a type PEFT's
    MissConfig does not take is refused by name, the model unchanged (an int target_modules or a
    list holding a non-string would otherwise select modules by accident or by nothing)."""
    model = small_net()
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        miss_ext.apply_miss(model, r=2, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("alias", ["miss_only", "Bone_only", "bone_only", "lora_only"])
def test_apply_miss_takes_peft_bias_aliases_as_miss_only(alias):
    """model.py, check_bias: any value ending in "_only" (PEFT's rule; "miss_only" and "bone_only"
    are older PEFT's spellings) means "MiSS_only": the adapted layers' biases train, the other
    parameters stay frozen, as with bias="MiSS_only"."""
    want, got = small_net(), small_net()
    miss_ext.apply_miss(want, ["lin1", "lin2"], r=2, bias="MiSS_only")
    miss_ext.apply_miss(got, ["lin1", "lin2"], r=2, bias=alias)
    trainable = {n for n, p in got.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in want.named_parameters() if p.requires_grad}
    assert trainable == {"lin1.miss_block", "lin2.miss_block", "lin1.base_layer.bias", "lin2.base_layer.bias"}
