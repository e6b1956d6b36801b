"""Adapter-file fields and API defaults that no other test pinned (a mutation round of the Python
package, 2026-12-06: each test here fails on a one-line mutant that the rest of the suite let
through). PEFT's semantics where it has one: its config defaults, safetensors before .bin, an
empty layers_to_transform meaning no filter, the layer index looked for past the first name."""
import collections
import json
import re
import warnings

import pytest
import torch
from torch import nn

import miss_ext


def saved(tmp_path, model, name="a"):
    folder = tmp_path / name
    miss_ext.save_adapter(model, folder)
    return folder, json.loads((folder / "adapter_config.json").read_text())


def test_a_saved_config_says_inference_mode_and_applying_it_freezes_the_blocks(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0"], r=2)
    _, cfg = saved(tmp_path, m)
    assert cfg["inference_mode"] is True  # as PEFT's save_pretrained writes
    m2 = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m2, cfg)
    assert m2[0].miss_block.requires_grad is False


def test_a_config_without_bias_keeps_the_bias_frozen():
    """PEFT's default bias is "none"."""
    m = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m, {"peft_type": "MISS", "r": 2, "target_modules": ["0"]})
    assert m[0].base_layer.bias.requires_grad is False


def test_init_weights_is_saved_false_only_when_every_layer_was_drawn_at_random(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0"], r=2, init_weights=False)
    miss_ext.apply_miss(m, ["1"], r=2)
    assert saved(tmp_path, m)[1]["init_weights"] is True
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0", "1"], r=2, init_weights=False)
    assert saved(tmp_path, m, "b")[1]["init_weights"] is False


def test_safetensors_wins_over_a_bin_file_in_the_same_folder(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0"], r=2)
    with torch.no_grad():
        m[0].miss_block.fill_(1.0)
    folder, _ = saved(tmp_path, m)
    torch.save({"base_model.model.0.miss_block": torch.full((2, 8), 2.0)}, folder / "adapter_model.bin")
    m2 = nn.Sequential(nn.Linear(8, 8))
    miss_ext.load_adapter(m2, folder)
    assert torch.equal(m2[0].miss_block, torch.ones(2, 8))


def test_r_equal_to_in_features_loads_without_the_r_exceeds_warning(tmp_path):
    m = nn.Sequential(nn.Linear(4, 8))
    miss_ext.apply_miss(m, ["0"], r=4)
    folder, _ = saved(tmp_path, m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        miss_ext.load_adapter(nn.Sequential(nn.Linear(4, 8)), folder)
    assert not [w for w in caught if "exceeds" in str(w.message)], [str(w.message) for w in caught]


def test_an_empty_layers_to_transform_is_no_filter(tmp_path):
    """(A target matched by its suffix: a whole-path entry skips the layer filter anyway.)"""

    def model():
        return nn.Sequential(collections.OrderedDict(blk=nn.Sequential(collections.OrderedDict(q=nn.Linear(8, 8)))))

    m = model()
    miss_ext.apply_miss(m, ["q"], r=2)
    folder, cfg = saved(tmp_path, m)
    cfg["target_modules"], cfg["layers_to_transform"] = ["q"], []
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    m2 = model()
    miss_ext.load_adapter(m2, folder)
    assert isinstance(m2.blk.q, miss_ext.MissLinear)


def test_layers_to_transform_does_not_take_the_first_name_as_the_layer_index():
    """PEFT looks for `<layers pattern>.<index>.` inside the path: a top-level `layers.1.q_proj`
    has no index there, so nothing matches and the call is refused (as PEFT)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    m = Model()
    with pytest.raises(ValueError, match="layers_to_transform"):
        miss_ext.apply_miss(m, ["q_proj"], r=2, layers_to_transform=[1])
    assert all(isinstance(b.q_proj, nn.Linear) for b in m.layers)


def test_bias_all_trains_a_saved_module_frozen_by_hand():
    """bias="all" trains every bias, also one of a modules_to_save module the user froze."""
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    miss_ext.apply_miss(m, ["0"], r=2, modules_to_save=["2"])
    m[2].requires_grad_(False)
    miss_ext.apply_miss(m, ["1"], r=2, bias="all")
    assert m[2].bias.requires_grad and m[1].base_layer.bias.requires_grad


def test_a_saved_module_name_is_not_a_prefix_of_another_layer():
    """modules_to_save=["fc1"] does not cover "fc10"."""
    m = nn.Sequential(collections.OrderedDict(fc1=nn.Linear(8, 8), fc2=nn.Linear(8, 8), fc10=nn.Linear(8, 8)))
    miss_ext.apply_miss(m, ["fc2"], r=2, modules_to_save=["fc1"])
    miss_ext.apply_miss(m, ["fc10"], r=2)
    assert isinstance(m.fc10, miss_ext.MissLinear)


def test_a_bank_loads_the_files_dropout(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0"], r=2, dropout=0.1)
    folder, _ = saved(tmp_path, m)
    bank = nn.Sequential(nn.Linear(8, 8))
    miss_ext.load_bank(bank, {"a": folder})
    assert bank[0].dropouts[0] == pytest.approx(0.1)


def test_a_bank_load_drops_an_old_files_other_adapter_named_like_a_bias(tmp_path):
    """PEFT before 0.20 saved every adapter's block (`<path>.miss_block.<name>`); with bias="none"
    one whose name holds "bias" is another adapter's block too: dropped with the warning."""
    from safetensors.torch import load_file, save_file

    m = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(m, ["0"], r=2)
    folder, _ = saved(tmp_path, m)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.0.miss_block.mybias"] = torch.ones(2, 8)
    save_file(tensors, folder / "adapter_model.safetensors")
    bank = nn.Sequential(nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"ignored 1 block\(s\) of other adapters \('mybias'"):
        miss_ext.load_bank(bank, {"a": folder})
    assert bank[0].adapter_names[0] == "a"


@pytest.mark.parametrize("block_shape", [(4, 6), (2, 3)])
def test_save_adapter_refuses_a_block_unlike_its_layers_settings(tmp_path, block_shape):
    """A block assigned after the layer was made ((4, 6) in an r=2 layer; a mini-shaped (2, 3) in
    a default one): the layer computes with the block's shape, the file recorded the settings, and
    load_adapter then refused it (a review, 2026-12-07). Refused by name, nothing written."""
    model = nn.Sequential(nn.Linear(8, 6))
    miss_ext.apply_miss(model, ["0"], r=2)
    model[0].miss_block = nn.Parameter(torch.randn(block_shape))
    with pytest.raises(ValueError, match=rf"nothing was written: 0 \(miss_block {re.escape(str(block_shape))}, its r=2, "
                                         r"mode='default' give \(2, 6\)\)"):
        miss_ext.save_adapter(model, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
