"""PEFT's adapter_names= on an accelerated PEFT MiSS model: behaviour a mutation round over
miss_ext/peft.py (mixed batches in forward and generate, the tuner's add/delete/set_adapter
bookkeeping) found unpinned: each test here fails on a one-line change the rest of the suite let
through.

References are independent of miss_ext: PEFT itself, one single-adapter PEFT model per adapter
(built from the same blocks), run on that adapter's prompt alone; the base model for "__base__".
"""
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from tiny_models import mixed_peft_models, no_eos, tiny_causal_lm, tiny_fsmt, tokens  # noqa: E402

CONFIGS = {
    "a": dict(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    "b": dict(r=8, mini_r=4, target_modules=["q_proj", "o_proj"], init_weights="mini"),
}


@pytest.fixture(scope="module")
def models():
    """(accelerated PEFT model with adapters CONFIGS, eval, float64; {name: single-adapter PEFT
    model with the same block, or the base model for "__base__"})."""
    return mixed_peft_models(no_eos(tiny_causal_lm("llama")), CONFIGS, scale=0.3)


def test_beam_search_returning_fewer_sequences_than_beams_repeats_names_by_num_beams(models):
    """generate(num_beams=3, num_return_sequences=2): transformers expands each prompt num_beams
    times (not num_return_sequences times), so the names must be repeated 3 times; each returned
    pair equals that prompt's adapter alone. Existing tests used num_beams == num_return_sequences
    or num_beams=1, where swapping the two in _expand_size changes nothing."""
    model, singles = models
    names = ["b", "__base__", "a"]
    ids = tokens(3, 5, seed=21)
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        assert got.shape[0] == 6
        for i, name in enumerate(names):
            want = singles[name].generate(input_ids=ids[i:i + 1], **kwargs)
            assert torch.equal(got[2 * i:2 * i + 2], want), name


def test_disabled_layers_ignore_adapter_names_in_tuner_and_layer_calls(models):
    """Disabled adapter layers give the base output whatever adapter_names says (PEFT's rule, as
    its LoRA layers: a disabled layer only checks the names, then runs the base). PeftModel.forward under
    disable_adapter() never hands the names to the layers, so only the paths that do reach a
    disabled layer pin it: the tuner (peft_model.base_model) called with adapter_names= and a
    layer called directly, both inside disable_adapter()."""
    model, singles = models
    ids = tokens(3, 6, seed=22)
    names = ["a", "b", "__base__"]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj  # holds "a" and "b"
    x = torch.randn(3, 4, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = singles["__base__"](ids).logits
        base_x = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        with model.disable_adapter():
            got = model.base_model(ids, adapter_names=names).logits
            got_layer = layer(x, adapter_names=names)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got_layer, base_x, rtol=1e-12, atol=1e-12)
        # enabled again: the names apply (so the checks above are not vacuous)
        assert not torch.allclose(model.base_model(ids, adapter_names=names).logits[0], want[0])
        assert not torch.allclose(layer(x, adapter_names=names)[:2], base_x[:2])


def test_a_sequence_first_models_modules_to_save_follow_one_name_for_every_row():
    """FSMT's layers see (sequence, batch, features), so one name for every sequence is handed to
    each layer for all the rows of its input; PEFT's modules_to_save wrapper (fc2 here) needs one
    name per row of its input (sequence length 4, not the batch of 3), or its mixed-batch forward
    fails. Every row named "b" (not the active adapter) equals a PEFT model holding "b" alone,
    its fc2 copy included."""
    base = tiny_fsmt()
    configs = {n: dict(r=4, target_modules=["fc1"], modules_to_save=["fc2"], init_weights=False) for n in ("a", "b")}
    model, singles = mixed_peft_models(base, configs, seed=4, scale=0.3)
    ids, dec = torch.randint(3, 64, (3, 4)), torch.randint(3, 64, (3, 4))
    with torch.no_grad():
        want = singles["b"](input_ids=ids, decoder_input_ids=dec).logits
        got = model(input_ids=ids, decoder_input_ids=dec, adapter_names=["b"] * 3).logits
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        assert not torch.allclose(model(input_ids=ids, decoder_input_ids=dec).logits, want)  # "a" differs
