"""Models given PEFT MiSS adapters by transformers itself (PeftAdapterMixin: model.add_adapter,
load_adapter, set_adapter, delete_adapter; no PeftModel around them), then accelerated with
miss_ext.peft.accelerate, against the same models run by PEFT's own layers (float64)."""
import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from packaging.version import Version  # noqa: E402
from peft import MissConfig, PeftModel  # noqa: E402

import miss_ext  # noqa: E402
from miss_ext.peft import accelerate  # noqa: E402
from tiny_models import tiny_causal_lm, tokens  # noqa: E402

PEFT_022 = Version(peft.__version__) >= Version("0.22")
try:
    from transformers.integrations.peft import MIN_PEFT_VERSION
except ImportError:  # a transformers without the constant checks no PEFT version
    MIN_PEFT_VERSION = "0"
if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
    pytest.skip(f"transformers' PEFT integration needs peft>={MIN_PEFT_VERSION}, here {peft.__version__}",
                allow_module_level=True)


def adapted(config=None, accelerated=True):
    """A tiny float64 Llama with adapter "default" added by transformers' add_adapter (random
    blocks), accelerated or run by PEFT's own layers."""
    torch.manual_seed(0)
    model = tiny_causal_lm("llama").eval()
    model.add_adapter(config or MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    if accelerated:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no tuner: adapter_names= will not reach the layers
            accelerate(model)
    return model


def q_layers(model):
    return [layer.self_attn.q_proj for layer in model.model.layers]


def test_accelerated_transformers_adapters_compute_what_peft_does():
    plain, fast = adapted(accelerated=False), adapted()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-12, atol=1e-12)
        fast.disable_adapters()
        torch.testing.assert_close(fast(ids).logits, tiny_causal_lm("llama")(ids).logits, rtol=1e-12, atol=1e-12)


def test_deleting_a_merged_adapter_is_refused():
    """transformers' model.delete_adapter (peft.functional.delete_adapter) deleted a merged
    adapter, which PeftModel.delete_adapter refuses; a later unmerge then reported success and
    kept the deleted adapter's delta in the weight (logits 0.04 off the base model's; a review,
    2026-12-07). Now the accelerated layer refuses, nothing changed; unmerged, it deletes."""
    model = adapted()
    weight = q_layers(model)[0].base_layer.weight.detach().clone()
    for layer in q_layers(model):
        layer.merge()
    with pytest.raises(ValueError, match=r"cannot delete adapter 'default' while it is merged into the base weight"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and all("default" in layer.miss_block for layer in q_layers(model))
    for layer in q_layers(model):
        layer.unmerge()
    torch.testing.assert_close(q_layers(model)[0].base_layer.weight, weight, rtol=0, atol=1e-15)
    model.delete_adapter("default")
    assert all("default" not in layer.miss_block for layer in q_layers(model))


def _two_adapters():
    model = adapted()
    model.add_adapter(MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False), adapter_name="b")
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, list(model.peft_config)


def _assert_state(model, state):
    tensors, configs = state
    assert list(model.peft_config) == configs
    now = model.state_dict()
    assert now.keys() == tensors.keys() and all(torch.equal(now[k], v) for k, v in tensors.items())


def test_a_refused_delete_deletes_nothing_of_any_layer_or_name():
    """transformers deletes name by name and, for each, layer by layer: the refusal at the first
    merged layer came after earlier names and earlier layers had lost their blocks (a review,
    2026-12-07: delete_adapter(["default", "b"]) with b merged deleted default; b merged in the last layer
    only lost b everywhere else). The whole call is checked at its first layer now."""
    model = _two_adapters()
    model.set_adapter("b")
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    for layer in layers:
        layer.merge()
    state = _state(model)
    with pytest.raises(ValueError, match=r"cannot delete adapter 'b' while it is merged .* No MiSS layer's adapter was deleted"):
        model.delete_adapter(["default", "b"])
    _assert_state(model, state)
    for layer in layers:
        layer.unmerge()
    layers[-1].merge()
    state = _state(model)
    with pytest.raises(ValueError, match=r"adapter 'b' while it is merged into the base weight of "
                                         r"model\.layers\.1\.self_attn\.v_proj \("):
        model.delete_adapter("b")
    _assert_state(model, state)
    layers[-1].unmerge()
    model.delete_adapter(["default", "b"])
    assert not any(layer.miss_block for layer in layers)


def test_unmerging_an_adapter_whose_block_was_deleted_is_refused():
    """A merged adapter deleted by PEFT's own layers (transformers' delete_adapter before
    accelerate): nothing can restore the weight, and PEFT's unmerge dropped the name silently.
    The accelerated layer refuses its unmerge, writing nothing."""
    model = adapted(accelerated=False)
    layer = q_layers(model)[0]
    layer.merge()
    model.delete_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerate(model)
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"adapters \['default'\] are merged into the base weight but their blocks "
                                         r"were deleted"):
        layer.unmerge()
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.base_layer.weight, merged)


def _with_failed_add(accelerated):
    """Adapter "b" (bat, r=32) refused by k_proj (32 -> 16) after q_proj took it: transformers'
    add_adapter keeps q_proj's block, k_proj's default-shaped leftover, and the config."""
    model = adapted(MissConfig(r=4, target_modules=["q_proj", "k_proj"], init_weights=False), accelerated)
    with pytest.raises(ValueError, match="fully divisible"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Already found a `peft_config` attribute in the model"
        model.add_adapter(MissConfig(r=32, target_modules=["q_proj", "k_proj"], init_weights="bat"),
                          adapter_name="b")
    k_proj = model.model.layers[0].self_attn.k_proj
    assert tuple(k_proj.miss_block["b"].shape) == (32, 16) and "b" in model.peft_config
    return model


def test_accelerate_refuses_the_leftover_of_a_failed_add_adapter():
    """The leftover is checked against the model's own peft_config (transformers keeps it there,
    with no tuner): accelerate accepted it, and the layers then ran and trained it as a default
    adapter where PEFT's forward fails (a review, 2026-12-07)."""
    model = _with_failed_add(accelerated=False)
    with pytest.raises(ValueError, match=r"k_proj \('b': block \(32, 16\), config r=32, init_weights='bat'\)"):
        accelerate(model)
    assert not miss_ext.peft.is_accelerated(model)


@pytest.mark.skipif(not PEFT_022, reason="PEFT before 0.22 keeps one mode per layer (miss_fn), no record per adapter: "
                                         "its own forward runs such a leftover as a default adapter too")
def test_an_accelerated_layer_refuses_to_run_such_a_leftover():
    """Accelerated before the failed add: the forward compares each active block with what PEFT
    recorded for it (miss_fn, miss_r), and refuses, as PEFT's forward fails."""
    model = _with_failed_add(accelerated=True)
    model.set_adapter("b")
    with pytest.raises(ValueError, match=r"adapter 'b' holds a block of shape \(32, 16\), which is not the one PEFT "
                                         r"recorded for it \(init_weights='bat', r=32\)"):
        model(tokens())
    model.set_adapter("default")
    model(tokens())


def test_export_lora_takes_a_transformers_adapted_model(tmp_path):
    """export_lora refused such a model saying it held no PEFT MissLinear. Its LoRA file, loaded by
    PEFT onto the base model, gives the adapted model's logits."""
    model = adapted()
    miss_ext.export_lora(model, str(tmp_path))
    ids = tokens()
    lora = PeftModel.from_pretrained(tiny_causal_lm("llama").eval(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no MiSS layer .* with adapter 'other'"):
        miss_ext.export_lora(model, str(tmp_path / "other"), adapter_name="other")


def test_accelerate_warns_that_adapter_names_will_not_reach_a_transformers_adapted_model():
    model = adapted(accelerated=False)
    with pytest.warns(UserWarning, match=r"its adapters were added by transformers' add_adapter / load_adapter"):
        accelerate(model)
    copy.deepcopy(model)(tokens())
