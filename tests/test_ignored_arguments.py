"""Arguments that would be accepted and silently ignored (issue 10, kind 4): PEFT's per-row
`alora_offsets=` on accelerated PEFT MiSS models (forward, generate, layers; `adapter_names=` is
implemented since issue 14, tests/test_peft_mixed_batch.py, except for bat adapters), merges naming no
adapter, adapter_config.json fields PEFT acts on, and apply_miss options. Each is refused with
an error naming the argument, before anything runs or changes; where PEFT's config fields are
implemented, the result equals PEFT's."""
import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402

import miss_ext  # noqa: E402
from conftest import assert_unchanged, snapshot  # noqa: E402
import miss_ext.peft  # noqa: E402
from miss_ext import MissLinear  # noqa: E402
from tiny_models import R, TARGETS, peft_model, randomize_blocks, tiny_causal_lm, tokens  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def base():
    return tiny_causal_lm("llama")


# ---------------------------------------------------------------------------------------------
# adapter_names= (mixed-adapter batches) and alora_offsets=
# ---------------------------------------------------------------------------------------------
def test_peft_itself_ignores_adapter_names_for_miss(base):
    """For comparison (PEFT 0.21): even names of adapters that do not exist change nothing."""
    plain = peft_model(base, "default").eval()
    ids = tokens()
    assert torch.equal(plain(ids, adapter_names=["nope", "default"]).logits, plain(ids).logits)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_accelerated_model_refuses_alora_offsets(base, mode):
    model = miss_ext.peft.accelerate(peft_model(base, mode).eval())
    ids = tokens()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"alora_offsets=.* is refused"):
        model(ids, alora_offsets=[3, 3])
    with pytest.raises(TypeError, match=r"alora_offsets=.* is refused"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, alora_offsets=[3, 3])
    assert_unchanged(model, snap)
    # None means "not used", as in PEFT; and restore() gives PEFT's own behaviour back.
    for argument in ("alora_offsets", "adapter_names"):
        torch.testing.assert_close(model(ids, **{argument: None}).logits, model(ids).logits, **TOL)
    miss_ext.peft.restore(model)
    assert type(model.base_model).__name__ == "MissModel"


def test_accelerated_model_refuses_bat_adapters_in_mixed_batches(base):
    """Bat adapters change the base weight: no shared base GEMM, so no mixed batch (issue 14)."""
    model = miss_ext.peft.accelerate(peft_model(base, "bat").eval())
    ids = tokens()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=r"bat adapter\(s\) \['default'\]"):
        model(ids, adapter_names=["default", "default"])
    with pytest.raises(TypeError, match=r"bat adapter\(s\) \['default'\]"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, adapter_names=["default", "__base__"])
    assert_unchanged(model, snap)
    # Rows that all ask for the base model never touch the bat adapter.
    torch.testing.assert_close(model(ids, adapter_names=["__base__"] * 2).logits, base(ids).logits, **TOL)


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_accelerated_layer_per_row_arguments_and_extra_arguments(base, mode):
    model = miss_ext.peft.accelerate(peft_model(base, mode).eval())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    with pytest.raises(TypeError, match="alora_offsets=.* is refused"):
        layer(x, alora_offsets=[1, 1])
    if mode == "bat":
        with pytest.raises(TypeError, match="bat adapter"):
            layer(x, adapter_names=["default", "default"])
    else:
        torch.testing.assert_close(layer(x, adapter_names=["default", "default"]), layer(x), **TOL)
    # PEFT's bat path drops extra arguments silently; an nn.Linear base takes none.
    with pytest.raises(TypeError, match="takes the input only"):
        layer(x, "extra")
    # None means "not given", as at model level
    torch.testing.assert_close(layer(x, adapter_names=None), layer(x), rtol=0, atol=0)


def test_our_layer_refuses_adapter_names():
    layer = MissLinear(nn.Linear(8, 6, dtype=torch.float64), 2)
    with pytest.raises(TypeError, match="adapter_names"):
        layer(torch.randn(3, 8, dtype=torch.float64), adapter_names=["default"] * 3)


def test_merge_naming_no_adapter_is_refused(base):
    model = miss_ext.peft.accelerate(peft_model(base, "default").eval())
    snap = snapshot(model)
    for call in (lambda: model.merge_adapter(adapter_names=["typo"]),
                 lambda: model.merge_and_unload(adapter_names=["typo"])):
        with pytest.raises(ValueError, match=r"adapter_names=\['typo'\]: \['typo'\] name no adapter"):
            call()
        assert_unchanged(model, snap)
    ids = tokens()
    unmerged = model(ids).logits
    merged = model.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(merged(ids).logits, unmerged, **TOL)


# ---------------------------------------------------------------------------------------------
# adapter_config.json fields
# ---------------------------------------------------------------------------------------------
def edited_adapter(base, tmp_path, **fields):
    """PEFT's files of an adapter on every TARGETS layer, with config fields changed."""
    peft_model(base, "default").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(fields)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("fields, match", [
    (dict(rank_pattern={"q_proj": 8}), r"rank_pattern=\{'q_proj': 8\}: not a field"),
    (dict(alpha_pattern={"q_proj": 8}), r"alpha_pattern=\{'q_proj': 8\}: not a field"),
    (dict(use_dora=True), r"use_dora=True: not a field"),
    (dict(init_weights="gaussian"), r"init_weights='gaussian': expected one of"),
    (dict(bias="MiSS"), r"bias='MiSS': expected 'none', 'all'"),
    (dict(bias="MISS_ONLY"), r"bias='MISS_ONLY': expected 'none', 'all'"),  # PEFT's test is case-sensitive
    # PEFT's default targets for Llama (q_proj, v_proj): the file's other blocks would be ignored
    (dict(target_modules=None), r"model\.layers\.0\.self_attn\.k_proj: the file has a block here, but the config"),
    (dict(layers_to_transform=[0]), r"model\.layers\.1\.self_attn\.q_proj: the file has a block here, but the "
                                    r"config \(.*layers_to_transform=\[0\]\) does not select"),
    (dict(layers_to_transform=0, layers_pattern="layers"), r"layers_to_transform=0, layers_pattern='layers'"),
    # PEFT's config refuses a layer filter beside a regex (as apply_miss does); the filter would be ignored
    (dict(target_modules=r".*_proj", layers_to_transform=[0]),
     r"layers_to_transform=\[0\] cannot be used with a string target_modules='\.\*_proj'"),
    (dict(target_modules=r".*_proj", layers_to_transform=[0], layers_pattern="layers"),
     r"layers_to_transform=\[0\] cannot be used with a string target_modules"),
    (dict(layers_to_transform="0"), r"layers_to_transform must be an int or a list of ints, got '0'"),
    (dict(exclude_modules=["k_proj"]), r"model\.layers\.0\.self_attn\.k_proj: .*exclude_modules=\['k_proj'\]"),
    (dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
     r"lm_head: the config .* selects this module, so PEFT would give it a new adapter, but the file has no block"),
    (dict(modules_to_save=["q_proj"]), r"model\.layers\.0\.self_attn\.q_proj: the file has a block here, but the "
                                       r"config \(.*modules_to_save=\['q_proj'\]\)"),
])
def test_config_fields_that_would_load_something_else_are_refused(base, tmp_path, fields, match):
    path = edited_adapter(base, tmp_path, **fields)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        miss_ext.load_adapter(model, path)
    assert_unchanged(model, snap)


def test_peft_really_skips_blocks_its_config_does_not_select(base, tmp_path):
    """What the refusal above avoids: PEFT loads only layer 0 of this file."""
    path = edited_adapter(base, tmp_path, layers_to_transform=[0])
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), path)
    layers = loaded.base_model.model.model.layers
    assert hasattr(layers[0].self_attn.q_proj, "miss_block") and type(layers[1].self_attn.q_proj) is nn.Linear


def test_empty_unknown_fields_are_accepted(base, tmp_path):
    path = edited_adapter(base, tmp_path, rank_pattern={}, alpha_pattern={}, some_new_field=None)
    model = miss_ext.load_adapter(copy.deepcopy(base), path)
    assert len(miss_ext.miss_layers(model)) == 2 * len(TARGETS)


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=["k_proj"]),
    dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r"model\.layers\.0\..*"),
    dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj", "down_proj"]),
], ids=["layers_to_transform+pattern", "layers_to_transform=int", "exclude list", "regex+exclude regex",
        "all-linear"])
def test_peft_selection_fields_are_implemented(base, tmp_path, config):
    reference = get_peft_model(copy.deepcopy(base), MissConfig(r=R, init_weights=False, **config)).eval()
    randomize_blocks(reference)
    reference.save_pretrained(tmp_path)
    model = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                     if hasattr(m, "miss_block") and n)
    assert sorted(name for name, _ in miss_ext.miss_layers(model)) == adapted
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)


# ---------------------------------------------------------------------------------------------
# apply_miss options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init_weights, match", [
    ("bat", r"init_weights='bat'.*is mode='bat' here"),
    ("mini", r"init_weights='mini'.*is mode='mini' here"),
    (1, r"init_weights=1"),
])
def test_apply_miss_refuses_a_non_bool_init_weights(base, init_weights, match):
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(TypeError, match=match):
        miss_ext.apply_miss(model, ["q_proj"], r=R, init_weights=init_weights)
    assert_unchanged(model, snap)
