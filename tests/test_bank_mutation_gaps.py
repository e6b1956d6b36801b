"""Gaps found by a mutation round over miss_ext/bank.py and miss_ext/bank_model.py (2026-12-06).

Each test pins one behaviour that a mutant of the product code changed while the rest of the
suite still passed. References are independent: float64 pure-PyTorch formulas from
tests/reference.py (the spec's fold / tile), or the same adapter run alone.
"""
import copy

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext.bank import MissBankLinear
from reference import F64, linear_ref
from tiny_models import nonzero

IN, OUT, MAX_R = 12, 18, 6


def layer_with(adapters, capacity=4, seed=0):
    """A float64 bank layer holding `adapters` {name: (r, mode, mini_r, dropout)} with non-zero
    random blocks; returns (base, bank, blocks)."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT).to(F64)
    bank = MissBankLinear(base, capacity=capacity, max_r=MAX_R)
    blocks = {}
    for name, (r, mode, mini_r, dropout) in adapters.items():
        shape = bank.adapter_shape(name, r, mode, mini_r, dropout)
        blocks[name] = nonzero(*shape) * 0.3
        bank.add_adapter(name, r, mode, mini_r, dropout, blocks[name])
    return base, bank, blocks


def rows_ref(base, blocks, x, names):
    """Row t of x through the base alone (None) or with names[t]'s block, float64 (spec formula)."""
    out = []
    for t, name in enumerate(names):
        if name is None:
            out.append(x[t].to(F64) @ base.weight.to(F64).t() + base.bias.to(F64))
        else:
            out.append(linear_ref(x[t:t + 1], base.weight, base.bias, blocks[name])[0])
    return torch.stack(out)


def test_a_saved_rank_above_max_r_is_refused_at_load_and_changes_nothing():
    """A state_dict whose ranks give a slot r = max_r + 1 (a hand-edited or foreign file) must be
    refused by load_state_dict, the layer unchanged. Accepted, the layer holds a rank past its
    fold width: every later forward naming that slot fails inside the op, far from the load."""
    base, bank, blocks = layer_with({"a": (4, "default", 1, 0.0)})
    sd = {k: v.clone() for k, v in bank.state_dict().items()}
    sd["ranks"][0] = MAX_R + 1
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not fit"):
        bank.load_state_dict(sd)
    for key, value in bank.state_dict().items():
        assert torch.equal(value, before[key]), key
    # and the layer still computes its adapter (reference: the spec's formula in float64)
    x = nonzero(3, IN)
    with torch.no_grad():
        torch.testing.assert_close(bank(x, bank.index_of(["a", None, "a"])),
                                   rows_ref(base, blocks, x, ["a", None, "a"]), rtol=1e-12, atol=1e-12)


def test_an_empty_slot_marked_absent_is_refused_at_load_and_by_set_extra_state():
    """A slot description with an empty slot (name None) flagged absent must be refused. Accepted,
    the flag stays on the free slot, and the next adapter added there (add_adapter does not touch
    the flag) is routed as absent: its rows get the base output silently."""
    from miss_ext.modules import json_tensor, tensor_json
    base, bank, blocks = layer_with({"a": (4, "default", 1, 0.0)}, capacity=3)
    sd = {k: v.clone() for k, v in bank.state_dict().items()}
    description = tensor_json(sd["_extra_state"])
    assert description["adapter_names"][1] is None
    description["absent"][1] = True
    sd["_extra_state"] = json_tensor(description)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"slot 1 \(None\): an absent slot"):
        bank.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"slot 1 \(None\): an absent slot"):
        bank.set_extra_state(sd["_extra_state"])
    assert bank.absent == [False, False, False]
    for key, value in bank.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the free slot takes an adapter that its rows really use
    blocks["b"] = nonzero(2, OUT) * 0.3
    assert bank.add_adapter("b", 2, block=blocks["b"]) == 1
    x = nonzero(4, IN)
    names = ["b", "a", None, "b"]
    with torch.no_grad():
        torch.testing.assert_close(bank(x, bank.index_of(names)), rows_ref(base, blocks, x, names),
                                   rtol=1e-12, atol=1e-12)


def test_a_bank_materialised_from_meta_has_rank_zero_slots_whatever_the_memory_held():
    """to_empty() after building on the meta device leaves uninitialised memory; the bank's ranks
    and periods (state, not parameters) must come out 0 (every slot empty), not whatever the
    allocator handed back. Poisoned freed blocks make leftover memory visible: a non-zero rank
    of an empty slot would route rows into an all-garbage slot or be saved into a file."""
    from conftest import poison_heap
    for trial in range(4):
        with torch.device("meta"):
            base = nn.Linear(IN, OUT, dtype=F64)
        bank = MissBankLinear(base, capacity=5, max_r=MAX_R)
        poison_heap(5, dtype=torch.int64, copies=16)
        bank.to_empty(device="cpu")
        assert bank.ranks.tolist() == [0] * 5 and bank.periods.tolist() == [0] * 5, trial
        assert bank._route.tolist() == list(range(5)) and bank._dropouts.tolist() == [0.0] * 5


class _Experts(nn.Module):
    """A toy MoE holder: `experts` is a ModuleList (RowLayout's MoE rule: its layers see routed
    tokens, not sequences in order), here fed the whole flattened batch."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(IN, OUT)])

    def forward(self, x):
        return self.experts[0](x.reshape(-1, IN)).reshape(*x.shape[:-1], OUT)


def test_none_and_base_name_the_same_rows_in_a_regrouping_model():
    """In a model whose adapted layers see regrouped rows (MoE experts), mixed_batch refuses names
    that differ, but None and "__base__" both mean the base model: [None, "__base__"] is one name
    and must run (base output), while ["a", None] is refused. Counting them as two names refused
    a valid all-base batch."""
    torch.manual_seed(0)
    model = _Experts().to(F64)
    base = copy.deepcopy(model)
    miss_ext.apply_bank(model, ["experts.0"], capacity=2, max_r=4)
    miss_ext.add_bank_adapter(model, "a", r=4)
    layer = model.experts[0]
    block = nonzero(4, OUT) * 0.3
    with torch.no_grad():
        layer.bank[layer.adapter_names.index("a"), :4].copy_(block)
    x = nonzero(3, 5, IN)
    with torch.no_grad():
        for names in ([None, "__base__", None], ["__base__", None, None]):
            with miss_ext.mixed_batch(model, names):
                torch.testing.assert_close(model(x), base(x), rtol=1e-12, atol=1e-12)
        with miss_ext.mixed_batch(model, ["a", "a", "a"]):
            want = linear_ref(x.reshape(-1, IN), base.experts[0].weight, base.experts[0].bias, block)
            torch.testing.assert_close(model(x), want.reshape(3, 5, OUT), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="mixed batches need"):
            with miss_ext.mixed_batch(model, ["a", None, "a"]):
                pass
    assert layer.rows is None


def test_an_empty_batch_runs_in_a_regrouping_model():
    """mixed_batch with no names (an empty batch, as a server's idle step can send) on a model
    whose layers regroup rows gives each layer an empty id list, and the model returns an empty
    output. Taking "the one name for every row" from an empty list raised IndexError on entering."""
    torch.manual_seed(0)
    model = _Experts().to(F64)
    miss_ext.apply_bank(model, ["experts.0"], capacity=2, max_r=4)
    miss_ext.add_bank_adapter(model, "a", r=4)
    with torch.no_grad(), miss_ext.mixed_batch(model, []):
        assert model(torch.zeros(0, 5, IN, dtype=F64)).shape == (0, 5, OUT)
    assert model.experts[0].rows is None


def test_an_interrupt_after_the_slot_tables_were_rebuilt_puts_them_back(monkeypatch):
    """A slot change interrupted after it rebuilt the forward's tables (_sync_slots ran, then a
    KeyboardInterrupt) must put the tables back with the slot: without that, a rolled-back remove
    of a dropout adapter trained it with no dropout (its rate left 0 in the forward's table, the
    slot lists saying 0.5), silently, and a rolled-back remove of an absent adapter routed its rows
    to an empty slot (refused), where they got the base output before."""
    base, bank, blocks = layer_with({"e": (4, "default", 1, 0.5), "f": (2, "mini", 6, 0.0)}, capacity=4)
    bank.add_absent("z")
    bank.train()
    x = nonzero(4, IN)
    ids = bank.index_of(["e", "z", "f", "e"])
    with torch.no_grad():
        torch.manual_seed(5)
        want = bank(x, ids)
    tables = (bank._route.clone(), bank._dropouts.clone(), bank._any_dropout)
    real = MissBankLinear._sync_slots
    for name in ("e", "z"):
        calls = []

        def sync_then_interrupt(self, *args, **kwargs):
            real(self, *args, **kwargs)
            calls.append(None)
            if len(calls) == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(MissBankLinear, "_sync_slots", sync_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            bank.remove_adapter(name)
        monkeypatch.undo()
        assert bank.adapter_names == ["e", "f", "z", None] and bank.dropouts == [0.5, 0.0, 0.0, 0.0]
        assert torch.equal(bank._route, tables[0]) and torch.equal(bank._dropouts, tables[1])
        assert bank._any_dropout == tables[2]
        with torch.no_grad():
            torch.manual_seed(5)
            assert torch.equal(bank(x, ids), want), name


def test_removing_the_last_dropout_adapter_clears_its_rate():
    """remove_adapter frees the slot's dropout rate too. Left behind, the layer still counted an
    adapter with dropout: every training forward drew a dropout key (moving torch's random stream
    in a model with no dropout left), and its own state_dict, an empty slot with a rate, no longer
    loaded into a fresh bank."""
    base, bank, blocks = layer_with({"e": (4, "default", 1, 0.5), "f": (2, "default", 1, 0.0)}, capacity=3)
    bank.remove_adapter("e")
    assert bank.dropouts == [0.0, 0.0, 0.0]
    bank.train()
    x = nonzero(3, IN)
    with torch.no_grad():
        torch.manual_seed(3)
        got = bank(x, bank.index_of(["f", None, "f"]))
        after = torch.rand(4)
        torch.manual_seed(3)
        assert torch.equal(after, torch.rand(4)), "a forward without dropout must not draw random numbers"
    blocks.pop("e")
    torch.testing.assert_close(got, rows_ref(base, blocks, x, ["f", None, "f"]), rtol=1e-12, atol=1e-12)
    fresh = MissBankLinear(nn.Linear(IN, OUT).to(F64), capacity=3, max_r=MAX_R)
    fresh.load_state_dict(bank.state_dict())
    assert fresh.adapter_names == [None, "f", None] and fresh.dropouts == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dropout", [1.0, -0.1, 1.5, float("nan"), True])
def test_a_dropout_rate_outside_zero_one_is_refused_by_every_way_in(dropout):
    """add_adapter and add_bank_adapter refuse a dropout rate outside [0, 1) (and a bool), changing
    nothing. Taken, a rate of 1 or more drops every input of the adapter's rows (or scales by a
    negative factor), and the layer's own state_dict, whose slot description carries the rate, no
    longer loads."""
    error = TypeError if isinstance(dropout, bool) else ValueError  # a bool: a TypeError since 2026-12-07
    base, bank, blocks = layer_with({"a": (4, "default", 1, 0.0)}, capacity=3)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    with pytest.raises(error, match="dropout"):
        bank.add_adapter("b", 2, dropout=dropout, block=nonzero(2, OUT))
    assert bank.adapter_names == ["a", None, None] and bank.dropouts == [0.0, 0.0, 0.0]
    for key, value in bank.state_dict().items():
        assert torch.equal(value, before[key]), key
    model = nn.Sequential(nn.Linear(IN, OUT), nn.Tanh(), nn.Linear(OUT, 4)).to(F64)
    miss_ext.apply_bank(model, ["0", "2"], capacity=2, max_r=4)
    with pytest.raises(error, match="dropout"):
        miss_ext.add_bank_adapter(model, "b", r=2, dropout=dropout)
    assert miss_ext.bank_adapter_names(model) == []
    assert model[0].dropouts == [0.0, 0.0] and model[2].dropouts == [0.0, 0.0]


def test_model_level_adds_check_every_layer_before_changing_any(tmp_path, monkeypatch):
    """add_bank_adapter and load_bank_adapter run every layer's checks before any layer changes
    (their documented contract): a refused call never reaches a layer's add_adapter / add_absent.
    Relying on the per-layer refusal plus the rollback instead reaches the end state too, but
    rewrites the layers on the way (slot generations, a free slot's values zeroed, the snapshot
    bookkeeping) and reports one problem without the layer's path (load_bank_adapter lists all)."""
    from tiny_models import rewrite_adapter_weights, saved_small_adapter, small_net
    calls = []
    real_add, real_absent = MissBankLinear.add_adapter, MissBankLinear.add_absent

    def add(self, *args, **kwargs):
        calls.append("add_adapter")
        return real_add(self, *args, **kwargs)

    def absent(self, *args, **kwargs):
        calls.append("add_absent")
        return real_absent(self, *args, **kwargs)

    model = small_net().float()
    miss_ext.apply_bank(model, ["lin1", "lin2"], capacity=2, max_r=2)
    saved_small_adapter(tmp_path / "big", r=2, targets=("lin1", "lin2"))

    def beyond_float32(tensors):  # finite in float64, inf in the float32 bank
        key = next(k for k in tensors if ".lin2." in k)
        tensors[key] = tensors[key].double()
        tensors[key][0, 0] = 1e300

    rewrite_adapter_weights(tmp_path / "big", beyond_float32)
    monkeypatch.setattr(MissBankLinear, "add_adapter", add)
    monkeypatch.setattr(MissBankLinear, "add_absent", absent)
    with pytest.raises(ValueError, match=r"lin1: adapter 'b' has r=3 > max_r=2"):
        miss_ext.add_bank_adapter(model, "b", r=3)
    with pytest.raises(ValueError, match=r"nothing was loaded:\n  lin2: the block is not floating point or holds"):
        miss_ext.load_bank_adapter(model, "big", str(tmp_path / "big"))
    assert calls == []
    miss_ext.add_bank_adapter(model, "ok", r=2)  # the positive control: an accepted add reaches each layer
    assert calls == ["add_adapter", "add_adapter"]
    miss_ext.remove_bank_adapter(model, "ok")
    monkeypatch.undo()
    assert miss_ext.bank_adapter_names(model) == []
