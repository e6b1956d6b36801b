"""Merge records, the merged-block witness and bank slots: behaviours a mutation round of the Python
package (2026-12-06) found unpinned, each test failing on a one-line mutant the rest of the suite
let through (miss_ext/merge_record.py, merged_block.py, modules.py, bank.py, bank_model.py,
model.py)."""
import io

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext.modules import json_tensor, tensor_json


def merged_layer(seed=0):
    torch.manual_seed(seed)
    layer = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    with torch.no_grad():
        layer.miss_block.normal_()
    layer.merge()
    return layer


def test_a_merged_state_dict_loaded_back_then_saved_loads_merged_elsewhere():
    layer = merged_layer()
    sd = layer.state_dict()
    layer.load_state_dict(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    other.load_state_dict(torch.load(buf))
    assert other.merged
    x = torch.randn(3, 8)
    torch.testing.assert_close(other(x), layer(x))


def test_a_state_dict_whose_weight_was_unmerged_since_loads_unmerged():
    """The newest write to the weight's memory decides (an assign-load of the same dict in between
    does not make it merged again)."""
    a = merged_layer()
    sd = a.state_dict()
    miss_ext.MissLinear(nn.Linear(8, 8), 2).load_state_dict(sd, assign=True)
    a.unmerge()
    c = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    c.load_state_dict(sd)
    assert not c.merged
    x = torch.randn(3, 8)
    torch.testing.assert_close(c(x), a(x))


@pytest.mark.parametrize("merged", [False, True], ids=["into_unmerged", "into_merged"])
def test_a_merged_weight_loaded_without_its_block_is_refused(merged):
    """A merged state_dict filtered of its block (strict=False): the layer took the other model's
    W + dW beside its own block, so its forward matched the other's but an unmerge took its own
    block out of that weight, silently (0.40 off the base weight in a PEFT model; a
    checkpoint-interop hunt, 2026-12-07). Refused now, nothing changed; with the block it loads."""
    a = merged_layer()
    sd = {k: v.clone() for k, v in a.state_dict().items() if k != "miss_block"}
    b = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    with torch.no_grad():
        b.miss_block.normal_()
    if merged:
        b.merge()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"merged base_layer.weight \(holding the dW of \['miss_block'\]\) but not "
                                           r"the block\(s\) of \['miss_block'\]"):
        b.load_state_dict(sd, strict=False)
    assert b.merged == merged
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in before.items())
    b.load_state_dict(a.state_dict())
    b.unmerge()
    a.unmerge()
    torch.testing.assert_close(b.base_layer.weight, a.base_layer.weight)


@pytest.mark.parametrize("order", ["blocks_first", "weight_first"])
def test_a_merged_checkpoint_loaded_in_pieces_is_refused_in_either_order(order):
    """A merged checkpoint loaded shard by shard (strict=False, transformers'
    load_sharded_checkpoint): the piece with the merged weight and record lacks the block, which
    came (or comes) in another piece, and nothing tells that block from the layer's own. Decision
    (2026-12-07): refused in both orders, saying to load it in one call; the block alone into the
    then merged layer was refused before too. In one dict it loads."""
    a = merged_layer()
    state = a.state_dict()
    blocks = {k: v for k, v in state.items() if k == "miss_block"}
    rest = {k: v for k, v in state.items() if k != "miss_block"}
    b = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    if order == "blocks_first":
        b.load_state_dict(blocks, strict=False)
        with pytest.raises(RuntimeError, match="in the same call as the merged weight"):
            b.load_state_dict(rest, strict=False)
    else:
        with pytest.raises(RuntimeError, match="in the same call as the merged weight"):
            b.load_state_dict(rest, strict=False)
    assert not b.merged
    b.load_state_dict({**blocks, **rest})
    x = torch.randn(3, 8)
    torch.testing.assert_close(b(x), a(x))


def test_the_witness_sees_two_entries_swapped():
    layer = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    with torch.no_grad():
        layer.miss_block.copy_(torch.arange(16.0).reshape(2, 8))
    layer.merge()
    with torch.no_grad():
        block = layer.miss_block
        block[0, 0], block[0, 1] = block[0, 1].clone(), block[0, 0].clone()
    assert layer.block_changed_since_merge() is True


def test_the_witness_of_an_untouched_block_holding_nan_says_unchanged():
    layer = miss_ext.MissLinear(nn.Linear(8, 8), 2)
    with torch.no_grad():
        layer.miss_block[0, 0] = float("nan")
    layer.merge()
    assert layer.block_changed_since_merge() is False


def test_a_tied_weight_layer_merged_by_hand_unloads():
    first = nn.Linear(8, 8)
    model = nn.Sequential(first, nn.Linear(8, 8))
    model[1].weight = first.weight
    layer = miss_ext.MissLinear(model[1], 2)
    model[1] = layer
    with torch.no_grad():
        layer.miss_block.fill_(0.1)
    layer.merge()
    out = miss_ext.merge_and_unload(model)
    assert type(out[1]) is nn.Linear


def test_a_bank_state_with_a_dropout_of_one_is_refused():
    layer = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    layer.add_adapter("a", 2, dropout=0.1)
    sd = layer.state_dict()
    state = tensor_json(sd["_extra_state"])
    state["dropouts"][0] = 1.0
    fresh = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    with pytest.raises(RuntimeError, match=r"dropout 1.0 is not a rate in \[0, 1\)"):
        fresh.load_state_dict(dict(sd, _extra_state=json_tensor(state)))


def test_a_bank_trains_its_base_with_the_bank_frozen():
    torch.manual_seed(0)
    layer = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    layer.add_adapter("a", 2, block=torch.randn(2, 8))
    layer.bank.requires_grad_(False)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 8)
    y = layer(x, layer.index_of(["a"] * 3))
    y.sum().backward()
    ref = nn.Linear(8, 8)
    ref.load_state_dict(layer.base_layer.state_dict())
    ref(x).sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, ref.weight.grad)


def test_a_new_bank_adapter_starts_at_zero_in_a_used_slot():
    layer = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    with torch.no_grad():
        layer.bank.fill_(1.0)
    layer.add_adapter("a", 2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x, layer.index_of(["a"] * 3)), layer.base_layer(x))


def test_apply_bank_with_freeze_others_false_leaves_the_rest_trainable():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    miss_ext.apply_bank(model, ["0"], capacity=2, max_r=2, freeze_others=False)
    assert model[1].weight.requires_grad


def test_a_bank_state_with_a_mini_period_not_dividing_out_features_is_refused():
    layer = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    layer.add_adapter("m", 2, mode="mini", mini_r=2)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["periods"][0] = 3
    fresh = miss_ext.MissBankLinear(nn.Linear(8, 8), 2, 2)
    with pytest.raises(RuntimeError, match="period 3 does not fit a bank"):
        fresh.load_state_dict(sd)


def test_a_record_that_restore_stopped_following_is_refused_at_load():
    """miss_ext.peft.restore marks the records of state_dicts taken while merged stale: PEFT's own
    merges, which may rewrite that memory in place, do not tell (merge_record.forget). Loading one
    later is refused rather than read as the merge state it said."""
    peft = pytest.importorskip("peft")
    import miss_ext.peft as accelerated

    MissConfig, get_peft_model = peft.MissConfig, peft.get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), MissConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].miss_block["default"].normal_()
    accelerated.accelerate(model)
    model.merge_adapter()
    sd = model.state_dict()
    accelerated.restore(model)
    accelerated.accelerate(model)
    weight = model.base_model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="stale"):
        model.load_state_dict(sd)
    assert torch.equal(model.base_model.model[0].base_layer.weight, weight)
