"""Which accelerate hooks count as offloading when an adapter is added (miss_ext.apply_miss,
model.refuse_offloaded), a PEFT model is accelerated (miss_ext.peft.accelerate,
_refuse_offloaded_blocks) or a bank model offloaded after loading enters a mixed batch.

An offloading hook (`_hf_hook`: an AlignDevicesHook with offload=True, a device_map with "cpu" or
"disk") keeps the layer's weights on the meta device and puts their values in for each forward
only; an adapter block made there holds no values, and the forward adds uninitialised memory to
the outputs, silently. So a layer with meta weights (apply_miss) or meta blocks (accelerate)
under such a hook, on the layer or on any ancestor, the model root included, is refused by name.
A hook that only aligns devices (offload=False) is no offload; a hook of an unknown kind is taken
for one. Each case pins a mutation no other test caught (mutation audit, 2026-12-04).
"""
import copy

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")
from accelerate import dispatch_model  # noqa: E402
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook  # noqa: E402
from peft import MissConfig, get_peft_model  # noqa: E402

import miss_ext  # noqa: E402
import miss_ext.peft  # noqa: E402
from tiny_models import R, randomize_blocks, tiny_causal_lm, tokens  # noqa: E402

APPLY_REFUSED = (r"^apply_miss: {}: the model's parameters here are on the meta device, put in only for each "
                 r"forward by accelerate's offload hook \(`_hf_hook`: a device_map with \"cpu\" or \"disk\" "
                 r"offload\), so a new adapter block would be created on the meta device and hold no values: "
                 r"offloaded layers cannot hold an adapter\.")
ACCELERATE_REFUSED = (r"^accelerate: base_model\.model\.model\.layers\.1\.self_attn\.q_proj \(default\), "
                      r"base_model\.model\.model\.layers\.1\.self_attn\.v_proj \(default\): these adapter blocks are "
                      r"on the meta device in layers that accelerate offloads \(`_hf_hook`: a device_map with \"disk\" "
                      r"or \"cpu\" offload\), so they hold no values")
LAYER_1 = r"model\.layers\.1\.self_attn\.q_proj"
EVERY_LAYER = r"model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj"


def offloaded_peft_model(base, tmp_path, **dispatch):
    """get_peft_model (q_proj, v_proj) on a deep copy of `base` dispatched with its second decoder
    layer offloaded to disk."""
    model = dispatch_model(copy.deepcopy(base), offload_dir=str(tmp_path / "offload"), device_map={
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu"}, **dispatch)
    return get_peft_model(model, MissConfig(r=R, target_modules=["q_proj", "v_proj"], init_weights=False))


OFFLOAD = AlignDevicesHook(execution_device="cpu", offload=True)
ALIGN = AlignDevicesHook(execution_device="cpu", offload=False)  # what a multi-device device_map adds


@pytest.mark.parametrize("where, hook, refused", [
    ("model.layers.1", ModelHook(), LAYER_1),
    ("model.layers.1", SequentialHook(OFFLOAD, ALIGN), LAYER_1),
    ("", OFFLOAD, EVERY_LAYER),
], ids=["unknown_hook_kind", "sequential_hook_with_one_offloading_member", "offload_hook_on_the_model_root"])
def test_meta_weights_under_an_offloading_hook_are_refused(where, hook, refused):
    """apply_miss on a model whose weights are on the meta device, with an accelerate hook put on
    by hand (`_hf_hook`, what add_hook_to_module sets) on an ancestor of the targets:
    - a hook of an unknown kind (no `offload` attribute) is taken for an offload (M01);
    - a SequentialHook offloads if any of its members does, not only if all do (M03);
    - a hook on the model root itself counts, for every target (M06: the ancestors' walk skipped
      the root).
    Refused by name, nothing replaced (mutation audit, 2026-12-04)."""
    base = tiny_causal_lm("llama")
    with torch.device("meta"):
        model = type(base)(base.config)
    model.get_submodule(where)._hf_hook = hook
    with pytest.raises(ValueError, match=APPLY_REFUSED.format(refused)):
        miss_ext.apply_miss(model, ["q_proj"], r=2)
    assert not any(isinstance(m, miss_ext.MissLinear) for m in model.modules())


def test_meta_weights_under_a_sequential_hook_that_only_aligns_devices_are_accepted():
    """A SequentialHook whose members all only align devices (offload=False) is no offload: meta
    weights below it are a model still to be materialised, and apply_miss adds the adapter as it
    does on the same meta model without hooks (M02: a SequentialHook not looked into was taken for
    an offload, an unknown kind; mutation audit, 2026-12-04)."""
    base = tiny_causal_lm("llama")
    with torch.device("meta"):
        model, reference = type(base)(base.config), type(base)(base.config)
    model.model.layers[1]._hf_hook = SequentialHook(ALIGN, ALIGN)
    miss_ext.apply_miss(model, ["q_proj"], r=2)
    miss_ext.apply_miss(reference, ["q_proj"], r=2)
    got = {n: (p.shape, p.is_meta) for n, p in model.named_parameters() if p.requires_grad}
    want = {n: (p.shape, p.is_meta) for n, p in reference.named_parameters() if p.requires_grad}
    assert got == want and len(got) == 2
    assert sum(isinstance(m, miss_ext.MissLinear) for m in model.modules()) == 2


def test_peft_meta_blocks_under_an_offloading_decoder_layer_are_refused(tmp_path):
    """accelerate's preload_module_classes puts the offloading hook on the decoder layer, not on
    the linears: get_peft_model makes the layer's blocks on the meta device, and only the
    ancestor's hook shows the offload (P13: only the base layer's own hook was looked at, and the
    blocks, holding no values, were accelerated). Refused by name (mutation audit, 2026-12-04)."""
    base = tiny_causal_lm("llama")
    model = offloaded_peft_model(base, tmp_path, preload_module_classes=["LlamaDecoderLayer"])
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    assert q_proj.miss_block["default"].is_meta and not hasattr(q_proj.base_layer, "_hf_hook")
    with pytest.raises(ValueError, match=ACCELERATE_REFUSED):
        miss_ext.peft.accelerate(model)
    assert not miss_ext.peft.is_accelerated(model)


def test_peft_real_blocks_on_an_offloaded_base_layer_are_accepted(tmp_path):
    """Blocks loaded with their values onto a model whose base layers accelerate offloads (an
    adapter loaded onto an offloaded model; load_state_dict(assign=True) here, which keeps the
    layers' offload hooks: PeftModel.from_pretrained in the installed PEFT re-dispatches the model
    with one non-offloading hook on the root instead) hold real values: accelerated, and the
    logits equal those of the same adapter on the model without offload (P14: every layer under
    an offload hook was refused, real blocks or not; mutation audit, 2026-12-04)."""
    base = tiny_causal_lm("llama")
    source = get_peft_model(copy.deepcopy(base), MissConfig(r=R, target_modules=["q_proj", "v_proj"],
                                                            init_weights=False))
    randomize_blocks(source)
    model = offloaded_peft_model(base, tmp_path)
    blocks = {k: v for k, v in source.state_dict().items() if "miss_block" in k}
    assert not model.load_state_dict(blocks, strict=False, assign=True).unexpected_keys
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    assert q_proj.base_layer.weight.is_meta and not q_proj.miss_block["default"].is_meta
    miss_ext.peft.accelerate(model)
    assert miss_ext.peft.is_accelerated(model)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-9, atol=1e-10)


def test_a_bank_offloaded_after_loading_is_refused_by_mixed_batch(tmp_path):
    """load_bank refuses an offloaded model; one offloaded afterwards (a disk entry in a
    device_map) crashed in the forward ("Tensor on device cpu is not on the expected device
    meta": the row ids went to the bank's meta device; a new-user pass, 2026-12-04). mixed_batch
    now refuses it by name before setting anything; the layers on real devices are not named."""
    model = miss_ext.apply_bank(tiny_causal_lm("llama"), ["q_proj"], capacity=2, max_r=R)
    miss_ext.add_bank_adapter(model, "a", r=R)
    model = dispatch_model(model, offload_dir=str(tmp_path / "offload"), device_map={
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match=r"^mixed_batch: the bank layers model\.layers\.1\.self_attn\.q_proj are "
                                         r"offloaded by accelerate"):
        with miss_ext.mixed_batch(model, ["a", None]):
            pass
    layers = miss_ext.bank_model.bank_layers(model)
    assert all(layer.rows is None and "_mixed_batch" not in layer.__dict__ for _, layer in layers)
    assert [path for path, layer in layers if layer.bank.is_meta] == ["model.layers.1.self_attn.q_proj"]
