"""Adapter files, merge records and the merged-block witness: behaviours a mutation round over
miss_ext/adapter_files.py, merge_record.py and merged_block.py (2026-12-07) found unpinned, each
test failing on a one-line mutant the rest of the suite let through."""
import json

import pytest
import torch
from torch import nn

import miss_ext
from conftest import assert_unchanged, snapshot
from tiny_models import nonzero, randomize_adapters, rewrite_adapter_weights, saved_small_adapter, small_net

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _config(path):
    return json.loads((path / CONFIG).read_text())


def _write_config(path, config):
    (path / CONFIG).write_text(json.dumps(config))


def test_a_config_dict_without_peft_type_is_taken_as_miss():
    """apply_miss(model, dict) with no "peft_type" (a hand-written dict) defaults to MISS, as
    config_dict documents; it must not fail with a bare KeyError."""
    model = small_net()
    miss_ext.apply_miss(model, {"target_modules": ["lin1"], "r": 2, "init_weights": False})
    layer = model.lin1
    assert isinstance(layer, miss_ext.MissLinear) and layer.r == 2 and layer.mode == "default"
    assert not isinstance(model.lin2, miss_ext.MissLinear)


def test_a_config_without_inference_mode_makes_trainable_blocks_as_peft():
    """A config dict without "inference_mode" takes PEFT's default (False): the new blocks train.
    Defaulting it to True would freeze them silently."""
    from peft import MissConfig

    assert MissConfig(r=2, target_modules=["lin1"]).inference_mode is False  # the reference
    model = small_net()
    miss_ext.apply_miss(model, {"peft_type": "MISS", "target_modules": ["lin1"], "r": 2})
    assert model.lin1.miss_block.requires_grad


class _BodyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_save_refuses_modules_to_save_that_peft_would_match_twice(tmp_path):
    """modules_to_save paths are matched by suffix in PEFT: a module added later under another
    parent with the same name ("extra.head") would be saved and trained by PEFT too, so the file
    would not load back as saved. save_adapter refuses, writing nothing."""
    model = _BodyHead().double()
    miss_ext.apply_miss(model, ["body"], r=2, modules_to_save=["head"])
    model.extra = nn.Module()
    model.extra.head = nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match=r"extra\.head"):
        miss_ext.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_save_with_is_main_process_false_writes_nothing(tmp_path):
    """is_main_process=False is the caller saying another process writes: no folder, no file."""
    model = small_net()
    miss_ext.apply_miss(model, ["lin1"], r=2, init_weights=False)
    miss_ext.save_adapter(model, tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()
    miss_ext.save_adapter(model, tmp_path / "written", is_main_process=True)
    assert (tmp_path / "written" / WEIGHTS).is_file() and (tmp_path / "written" / CONFIG).is_file()


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return torch.zeros(2)


class _SideEffect:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_legacy_bin_file_is_read_with_weights_only(tmp_path):
    """adapter_model.bin is read with torch.load(weights_only=True): a pickle that would call
    arbitrary code (here a harmless recorder) is refused as unreadable weights, and the code never
    runs. weights_only=False would run it (code execution from a downloaded adapter)."""
    model = saved_small_adapter(tmp_path, targets=("lin1",))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / WEIGHTS))
    (tmp_path / WEIGHTS).unlink()
    torch.save(dict(tensors, **{"base_model.model.lin1.extra": _SideEffect()}), tmp_path / "adapter_model.bin")
    del model
    _UNPICKLED.clear()
    target = small_net()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"adapter_model\.bin: cannot be read as adapter weights"):
        miss_ext.load_adapter(target, tmp_path)
    assert _UNPICKLED == []
    assert_unchanged(target, snap)


def test_read_adapter_without_a_model_keeps_keys_a_nested_modules_to_save_module_saved(tmp_path):
    """Without a model (load_bank_adapter reads the files first), a key of the form
    `<path>.miss_block.<name>` under a module that modules_to_save names by suffix
    ("holder" selecting "wrap.holder", as PEFT matches) is that module's tensor, not another
    adapter's block: kept, not dropped as ignorable."""
    model = small_net()
    miss_ext.apply_miss(model, ["lin1"], r=2, init_weights=False)
    randomize_adapters(model)
    miss_ext.save_adapter(model, tmp_path)
    _write_config(tmp_path, dict(_config(tmp_path), modules_to_save=["holder"]))
    value = nonzero(2, 2, dtype=torch.float32)
    rewrite_adapter_weights(tmp_path, lambda t: t.update({"base_model.model.wrap.holder.miss_block.weight": value}))
    _, blocks, extras = miss_ext.adapter_files.read_adapter(str(tmp_path))
    assert set(blocks) == {"lin1"}
    assert torch.equal(extras["wrap.holder.miss_block.weight"], value)


def _merged_layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = miss_ext.MissLinear(nn.Linear(8, 8).to(dtype), 2)
    with torch.no_grad():
        layer.miss_block.copy_(nonzero(*layer.miss_block.shape, dtype=dtype) * 0.5)
    layer.merge()
    return layer


def _unmerged_reference(layer, x):
    """float64 W x + b + dW x from the spec (tests/reference.py), for an unmerged layer."""
    from reference import linear_ref

    base = layer.base_layer
    return linear_ref(x.double(), base.weight.double(), base.bias.double(), layer.miss_block.double())


def test_every_earlier_state_dict_of_a_layer_is_followed_not_only_the_latest():
    """Two state_dicts taken while merged, then an unmerge: the first one's record is stale too
    (following only the latest left it saying "merged" beside the now unmerged weight, so loading
    it dropped dW silently)."""
    layer = _merged_layer()
    first = layer.state_dict()
    layer.state_dict()
    layer.unmerge()
    fresh = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    fresh.load_state_dict(first)
    assert not fresh.merged
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x).double(), _unmerged_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_a_keep_vars_state_dict_follows_its_parameter_after_model_to():
    """state_dict(keep_vars=True) holds the weight Parameter itself; after model.to(float64)
    (new memory) and an unmerge there, its record must still be marked stale and the load take
    the unmerged state, not the record's "merged"."""
    layer = _merged_layer()
    sd = layer.state_dict(keep_vars=True)
    layer.double()
    layer.unmerge()
    fresh = miss_ext.MissLinear(nn.Linear(8, 8).double(), 2)
    fresh.load_state_dict(sd)
    assert not fresh.merged
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), _unmerged_reference(layer, x), rtol=1e-6, atol=1e-6)


def test_a_stale_record_beside_a_cloned_weight_is_refused():
    """A copy that cloned the weight while merged but kept the record by reference: after an
    unmerge its record is stale and its weight is no longer the layer's memory, so which state
    it holds is not known from the layer: refused naming the staleness, not read as unmerged."""
    layer = _merged_layer()
    sd = layer.state_dict()
    copy = {k: (v if k == "merged" else v.clone()) for k, v in sd.items()}
    layer.unmerge()
    fresh = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    snap = snapshot(fresh)
    with pytest.raises(RuntimeError, match="stale"):
        fresh.load_state_dict(copy)
    assert_unchanged(fresh, snap)


def test_a_peft_wrapper_copy_that_differs_from_the_plain_value_is_refused(tmp_path):
    """PEFT's bias="all" files hold a modules_to_save module's value twice (`head.weight` and its
    wrapper's `head.modules_to_save.weight`). Two different values make the file ambiguous: refused,
    the model unchanged, rather than one of them loaded silently."""
    model = _BodyHead().double()
    miss_ext.apply_miss(model, ["body"], r=2, init_weights=False, modules_to_save=["head"])
    randomize_adapters(model)
    miss_ext.save_adapter(model, tmp_path)

    def add_copy(t):
        t["base_model.model.head.modules_to_save.weight"] = t["base_model.model.head.weight"] + 1.0

    rewrite_adapter_weights(tmp_path, add_copy)
    target = _BodyHead().double()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"head\.modules_to_save\.weight: PEFT's copy of head\.weight differs"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


@pytest.mark.parametrize("value", [1, 0, 1.0])
def test_an_init_weights_number_in_the_config_is_refused(tmp_path, value):
    """init_weights must be one of PEFT's documented values (True, False, "bat", "mini"); 1 or 0
    compare equal to True / False in Python but are no such value, so the file is refused (by
    identity, not ==), the model unchanged."""
    saved_small_adapter(tmp_path, targets=("lin1",))
    _write_config(tmp_path, dict(_config(tmp_path), init_weights=value))
    target = small_net()
    snap = snapshot(target)
    with pytest.raises(ValueError, match=rf"init_weights={value!r}: expected one of"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


def test_a_file_of_another_mode_with_the_same_block_shape_is_refused(tmp_path):
    """A default-mode file's block (r, out) has the shape of a mini-mode block with mini_r = out:
    loading it into such an existing MissLinear must be refused for its mode, not accepted on
    the shape alone (the layer would keep mode "mini" while holding the file's default adapter)."""
    saved_small_adapter(tmp_path, targets=("lin2",))  # lin2: Linear(20, 8), block (2, 8)
    target = small_net()
    miss_ext.apply_miss(target, ["lin2"], r=2, mode="mini", mini_r=8)
    assert tuple(target.lin2.miss_block.shape) == (2, 8)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"lin2: the model's MissLinear has mode='mini'"):
        miss_ext.load_adapter(target, tmp_path)
    assert_unchanged(target, snap)


def test_a_load_failing_after_its_writes_restores_dropout_and_extras(tmp_path, monkeypatch):
    """load_adapter is all or nothing: an error after the writes (here injected at its last step)
    restores an existing layer's dropout (which the file's miss_dropout replaced; not part of any
    state_dict) and the modules_to_save values it overwrote."""
    source = _BodyHead().double()
    miss_ext.apply_miss(source, ["body"], r=2, dropout=0.25, init_weights=False, modules_to_save=["head"])
    randomize_adapters(source)
    with torch.no_grad():
        source.head.weight.copy_(nonzero(*source.head.weight.shape))
    miss_ext.save_adapter(source, tmp_path)

    torch.manual_seed(5)
    target = _BodyHead().double()
    miss_ext.apply_miss(target, ["body"], r=2, dropout=0.0, init_weights=False, modules_to_save=["head"])
    randomize_adapters(target, scale=0.7)
    snap = snapshot(target)

    def fail(model):
        raise RuntimeError("injected")

    monkeypatch.setattr(miss_ext.adapter_files, "record_shared_weights", fail)
    with pytest.raises(RuntimeError, match="injected"):
        miss_ext.load_adapter(target, tmp_path)
    assert target.body.dropout == 0.0
    assert_unchanged(target, snap)
    monkeypatch.undo()
    miss_ext.load_adapter(target, tmp_path)  # and without the fault it loads the file
    assert target.body.dropout == 0.25
    assert torch.equal(target.head.weight, source.head.weight)


def test_the_witness_sees_a_change_only_the_squares_reveal():
    """Two odd-indexed entries moved towards each other (a, b -> (a+b)/2 each, all positive) keep
    the block's sum, its even-indexed sum and its magnitude: only the sum of squares shows the
    change, and block_changed_since_merge must say it."""
    layer = miss_ext.MissLinear(nn.Linear(8, 8).double(), 2)
    with torch.no_grad():
        layer.miss_block.copy_(nonzero(2, 8).abs())
        layer.miss_block[0, 1], layer.miss_block[0, 3] = 0.5, 1.5
    layer.merge()
    assert layer.block_changed_since_merge() is False
    with torch.no_grad():
        layer.miss_block[0, 1], layer.miss_block[0, 3] = 1.0, 1.0
    assert layer.block_changed_since_merge() is True


def test_the_witness_sees_a_block_of_another_shape():
    """A merged layer given a block of another shape (a new Parameter) holds the dW of the old one:
    changed."""
    layer = _merged_layer()
    layer.miss_block = nn.Parameter(torch.zeros(4, 8))
    assert layer.block_changed_since_merge() is True


def test_a_null_miss_dropout_in_the_config_loads_as_no_dropout(tmp_path):
    """"miss_dropout": null (a hand-edited or older config) reads as PEFT's default 0.0, not as an
    unsupported dropout value. A decision (adapter_files.py reads `miss_dropout or 0.0`): PEFT
    0.21 itself fails on it with a bare TypeError at `miss_dropout > 0.0`, and null has no other
    meaning than "no dropout"."""
    source = saved_small_adapter(tmp_path, targets=("lin1",))
    _write_config(tmp_path, dict(_config(tmp_path), miss_dropout=None))
    target = miss_ext.load_adapter(small_net(), tmp_path)
    assert target.lin1.dropout == 0.0
    assert torch.equal(target.lin1.miss_block, source.lin1.miss_block)


def test_a_dropped_state_dict_does_not_break_later_merges():
    """A state_dict taken while merged and then dropped (garbage collected) leaves a dead record
    behind in the layer's bookkeeping: a later unmerge and merge must skip it, not fail on it."""
    import gc

    layer = _merged_layer()
    sd = layer.state_dict()
    del sd
    gc.collect()
    layer.unmerge()
    layer.merge()
    assert layer.merged
    layer.unmerge()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x).double(), _unmerged_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_the_witness_says_unknown_after_a_cast():
    """A merged float64 layer cast to float32 (model.float()) holds a block whose values moved by
    the cast's rounding: documented as unknown (False), not "changed" (merged_block.py). Comparing
    the float32 block's fingerprint with the float64 one noted at the merge would call every cast
    a change."""
    layer = _merged_layer(dtype=torch.float64)
    assert layer.block_changed_since_merge() is False
    layer.float()
    assert layer.miss_block.dtype == torch.float32
    assert layer.block_changed_since_merge() is False
