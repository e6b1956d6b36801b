"""MissBankLinear (issue 14): one frozen layer, a bank of MiSS adapters, one adapter per row.

Every row's output must equal what a MissLinear with that row's adapter alone gives (the base
layer alone for rows without an adapter), and in training each adapter's block gradient must
equal the gradient that adapter gets from its own rows alone. Covered: default and mini mixed,
r dividing max_r and r that does not, rows without an adapter, an empty batch, 3-D inputs, bf16
bases, per-adapter dropout (each adapter's own rate and mask, forward and gradients, against a
float64 reference), a bank that changes between calls, torch.compile without recompiling when
adapters change, and errors.
"""
import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from miss_ext import MissLinear
from miss_ext.bank import MissBankLinear

from conftest import DEVICES, assert_unchanged, autocast_sensitive_inputs, snapshot
from reference import F64, autocast_linear_ref, mixed_dropout_ref

IN, OUT, MAX_R = 24, 36, 8
# name: (r, mode, mini_r); r=3 does not divide MAX_R, mini_r 6 and 4 divide OUT.
ADAPTERS = {"a": (8, "default", 1), "b": (4, "mini", 6), "c": (3, "default", 1), "d": (2, "mini", 4)}


def make(device, dtype=torch.float32, capacity=6, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT).to(device=device, dtype=dtype)
    bank = MissBankLinear(base, capacity=capacity, max_r=MAX_R)
    singles = {}
    for name, (r, mode, mini_r) in ADAPTERS.items():
        single = MissLinear(base, r=r, mode=mode, mini_r=mini_r, init_weights=False).to(device)
        singles[name] = single
        bank.add_from(name, single)
    return base, bank, singles


def expected_rows(base, singles, x, names):
    rows = []
    for t, name in enumerate(names):
        layer = base if name is None else singles[name]
        rows.append(layer(x[t:t + 1])[0])
    return torch.stack(rows) if rows else base(x)


@pytest.mark.parametrize("device", DEVICES)
def test_each_row_equals_its_adapter_alone(device):
    base, bank, singles = make(device)
    bank.eval()
    names = ["a", None, "b", "c", "d", "a", "c", None, "b", "d", "c", "a"]
    x = torch.randn(len(names), IN, device=device)
    with torch.no_grad():
        got = bank(x, bank.index_of(names))
        torch.testing.assert_close(got, expected_rows(base, singles, x, names), rtol=1e-5, atol=1e-5)
        # 3-D input, empty batch
        x3 = x.reshape(3, 4, IN)
        got3 = bank(x3, bank.index_of(names).reshape(3, 4))
        torch.testing.assert_close(got3, got.reshape(3, 4, OUT))
        empty = bank(x[:0], bank.index_of([]))
        assert empty.shape == (0, OUT)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base(device):
    base, bank, singles = make(device, dtype=torch.bfloat16)
    assert bank.bank.dtype == torch.float32                # PEFT keeps half-precision bases' blocks in fp32
    names = ["a", "b", None, "c", "d"]
    x = torch.randn(5, IN, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        got = bank.eval()(x, bank.index_of(names))
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected_rows(base, singles, x, names), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_training_gradients_reach_each_adapter_from_its_rows_only(device):
    base, bank, singles = make(device, dtype=torch.float64)
    bank.train()
    names = ["a", "b", "a", None, "c", "b", "d", "c", "a"]
    x = torch.randn(len(names), IN, device=device, dtype=torch.float64, requires_grad=True)
    g = torch.randn(len(names), OUT, device=device, dtype=torch.float64)
    (bank(x, bank.index_of(names)) * g).sum().backward()
    xs = x.detach().clone().requires_grad_(True)
    (expected_rows(base, singles, xs, names) * g).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)
    for name, single in singles.items():
        torch.testing.assert_close(bank.bank.grad[bank.adapter_names.index(name), :single.r, :single.mini_r],
                                   single.miss_block.grad)
    # Slots without rows and the padding of every slot get zero.
    used = bank.bank.grad.clone()
    for name, single in singles.items():
        used[bank.adapter_names.index(name), :single.r, :single.mini_r] = 0
    assert not used.any()


def test_dropout_per_adapter_in_training_only():
    base, bank, singles = make("cpu")
    bank.remove_adapter("b")
    bank.add_adapter("b", 4, "mini", 6, dropout=0.5, block=singles["b"].miss_block.detach())
    names = ["a", "b"] * 6
    x = torch.randn(len(names), IN)
    index = bank.index_of(names)
    with torch.no_grad():
        eval_out = bank.eval()(x, index)
        train_out = bank.train()(x, index)
    rows_a = torch.tensor([n == "a" for n in names])
    assert torch.equal(train_out[rows_a], eval_out[rows_a])          # p = 0 for "a": untouched
    assert not torch.allclose(train_out[~rows_a], eval_out[~rows_a])  # p = 0.5 for "b": masked
    torch.testing.assert_close(eval_out, expected_rows(base, singles, x, names), rtol=1e-5, atol=1e-5)


# name: (r, mode, mini_r, dropout): each adapter its own p, 0 among them; "b" and "d" share a fold
# group (r | MAX_R, same p), "c" (r=3) has a fold of its own, "a" and "e" differ in p only.
DROPOUT_ADAPTERS = {"a": (8, "default", 1, 0.0), "b": (4, "mini", 6, 0.5), "c": (3, "default", 1, 0.25),
                    "d": (2, "mini", 4, 0.5), "e": (8, "default", 1, 0.1)}


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_per_adapter_matches_the_float64_reference(device):
    """Training with a different dropout p per adapter: every row's output, x's gradient and each
    adapter's block gradient equal an independent float64 reference that runs the row with its own
    adapter and its own mask (tests/reference.py: linear_ref; the mask from recover_mask with the
    call's key at the row's p). The bank draws one key per call from torch's generator, so
    reseeding gives the same key here. A rate applied to the wrong rows, a mask or keep-scale from
    another p, or a mask of other rows fails this; comparing training with eval output does not
    catch them."""
    base = nn.Linear(IN, OUT, dtype=F64, device=device)
    bank = MissBankLinear(base, capacity=6, max_r=MAX_R).train()
    blocks = {}
    for name, (r, mode, mini_r, p) in DROPOUT_ADAPTERS.items():
        blocks[name] = torch.randn(r, OUT if mode == "default" else mini_r, dtype=F64, device=device)
        bank.add_adapter(name, r, mode, mini_r, dropout=p, block=blocks[name])
    names = ["a", "b", None, "c", "d", "e", "b", "c", "a", None, "d", "e", "c", "b", "e", "d"]
    x = torch.randn(len(names), IN, dtype=F64, device=device, requires_grad=True)
    g = torch.randn(len(names), OUT, dtype=F64, device=device)
    index = bank.index_of(names)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    y = bank(x, index)
    (y * g).sum().backward()

    dropouts = {n: p for n, (_, _, _, p) in DROPOUT_ADAPTERS.items()}
    want, xr, refs, masks, group_of = mixed_dropout_ref(x, base.weight, base.bias, blocks, names, dropouts, seed)
    for group, mask in masks.items():  # each rate really drops some of its rows' inputs, not all
        own = [t for t, n in enumerate(names) if n is not None and group_of[n] == group]
        assert 0 < mask[own].sum() < mask[own].numel(), group
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(want, [xr] + list(refs.values()), g)
    torch.testing.assert_close(x.grad, grads[0])
    expected = torch.zeros_like(bank.bank)  # slots without an adapter and the padding: zero
    for name, grad in zip(refs, grads[1:]):
        expected[bank.adapter_names.index(name), :grad.shape[0], :grad.shape[1]] = grad
    torch.testing.assert_close(bank.bank.grad, expected)


@pytest.mark.parametrize("cast", ["float", "half", "bfloat16", "double"])
def test_module_casts_keep_the_dropout_rates_exact(cast):
    """.float() / .half() / .to(bf16) convert every floating buffer; the bank's per-slot rates stay
    float64 and exact, so a cast bank still trains with dropout (before: every training step raised
    "bank_fold dropouts must be float64", and adding an adapter did not repair it)."""
    base, bank, singles = make("cpu")
    bank.remove_adapter("b")
    bank.add_adapter("b", 4, "mini", 6, dropout=0.1, block=singles["b"].miss_block.detach())
    bank = bank.to(torch.bfloat16) if cast == "bfloat16" else getattr(bank, cast)()
    dtype = bank.bank.dtype
    assert bank._dropouts.dtype == torch.float64
    assert bank._dropouts[bank.adapter_names.index("b")].item() == 0.1
    names = ["a", "b"] * 8
    x = torch.randn(len(names), IN, dtype=dtype, requires_grad=True)
    index = bank.index_of(names)
    bank.train()(x, index).float().sum().backward()
    with torch.no_grad():
        train_out, eval_out = bank.train()(x, index), bank.eval()(x, index)
    rows_a = torch.tensor([n == "a" for n in names])
    assert torch.equal(train_out[rows_a], eval_out[rows_a]) and not torch.equal(train_out[~rows_a], eval_out[~rows_a])
    bank.add_adapter("e", 2, dropout=0.3)
    assert bank._dropouts.dtype == torch.float64 and bank._dropouts[bank.adapter_names.index("e")].item() == 0.3


def test_slot_tensors_are_not_buffers_but_move_save_and_load():
    """ranks, periods and the forward's slot tensors describe the bank's structure: not buffers
    (AveragedModel(use_buffers=True) averaged int64 buffers in float32 and truncated them: see
    test_bank_model.py's EMA test), yet moved by module conversions, saved and loaded (ranks,
    periods) under the same keys and in the same order as before, strict loading reporting them."""
    base, bank, singles = make("cpu")
    assert not any(n in ("ranks", "periods", "_dropouts", "_route") for n, _ in bank.named_buffers())
    assert list(bank.state_dict()) == ["bank", "ranks", "periods", "_extra_state", "base_layer.weight",
                                       "base_layer.bias"]
    state = bank.state_dict()
    _, fresh, _ = make("cpu", seed=1, capacity=6)
    for name in list(fresh.adapter_names):
        if name is not None:
            fresh.remove_adapter(name)
    assert fresh.ranks.tolist() == [0] * 6
    assert not fresh.load_state_dict(state).unexpected_keys
    assert torch.equal(fresh.ranks, bank.ranks) and torch.equal(fresh.periods, bank.periods)
    names = ["a", None, "b", "c", "d", "a"]
    x = torch.randn(len(names), IN)
    torch.testing.assert_close(fresh(x, fresh.index_of(names)), bank(x, bank.index_of(names)), rtol=0, atol=0)
    partial = {k: v for k, v in state.items() if k != "periods"}
    result = fresh.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["periods"] and not result.unexpected_keys
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"periods\""):
        fresh.load_state_dict(partial)
    # assign=True takes the saved tensors (a model built on the meta device, say)
    meta = MissBankLinear(nn.Linear(IN, OUT, device="meta"), capacity=6, max_r=MAX_R)
    meta.load_state_dict(state, assign=True)
    assert meta.ranks.device.type == "cpu" and torch.equal(meta.ranks, bank.ranks)
    torch.testing.assert_close(meta(x, meta.index_of(names)), bank(x, bank.index_of(names)), rtol=0, atol=0)
    # ... but not a slot description without its ranks and periods, which a meta-built bank cannot
    # check it against (torch's bare "Cannot copy out of meta tensor" before; a review, 2026-12-06).
    meta = MissBankLinear(nn.Linear(IN, OUT, device="meta"), capacity=6, max_r=MAX_R)
    without = {k: v for k, v in state.items() if k not in ("ranks", "periods")}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"the slot description \(_extra_state\) loads with the ranks and "
                                               r"periods it was saved with, which the state_dict lacks"):
            meta.load_state_dict(without, assign=True, strict=strict)
        assert meta.bank.is_meta and meta.ranks.is_meta and meta.base_layer.weight.is_meta
    # module conversions move them with the bank and keep their dtypes
    half = copy.deepcopy(bank).half()
    assert half.ranks.dtype == torch.int64 and half._route.dtype == torch.int64 and half._dropouts.dtype == F64
    empty = copy.deepcopy(bank).to_empty(device="meta")
    assert all(getattr(empty, n).is_meta for n in ("ranks", "periods", "_dropouts", "_route"))
    # to_empty() leaves uninitialised memory: the forward's routing and rates, derived from the slot
    # lists, are refilled from them (the bank, ranks and periods wait for load_state_dict).
    bank.remove_adapter("b")
    bank.dropouts[bank.adapter_names.index("c")] = 0.25
    bank._sync_slots()
    route, rates = bank._route.clone(), bank._dropouts.clone()
    assert route.tolist() == [0, 1, 2, 3, 4, 5] and rates.tolist() == [0, 0, 0.25, 0, 0, 0]
    for fill in (7, -3):
        with torch.no_grad():
            bank._route.fill_(fill)
            bank._dropouts.fill_(0.5)
        moved = copy.deepcopy(bank).to_empty(device="cpu")
        assert torch.equal(moved._route, route) and torch.equal(moved._dropouts, rates)
    bank._sync_slots()
    moved.load_state_dict(bank.state_dict())
    bank.eval(), moved.eval()
    names = ["a", None, "c", "d"]
    torch.testing.assert_close(moved(x[:4], moved.index_of(names)), bank(x[:4], bank.index_of(names)),
                               rtol=0, atol=0)


def test_a_whole_module_pickle_with_slot_buffers_still_loads():
    """A bank pickled by an earlier version held its slot tensors as buffers; unpickling makes them
    attributes (and the routing still works)."""
    import pickle
    base, bank, singles = make("cpu")
    old = copy.deepcopy(bank)
    for name in ("ranks", "periods", "_dropouts", "_route"):
        old.register_buffer(name, old.__dict__.pop(name), persistent=name in ("ranks", "periods"))
    assert "ranks" in dict(old.named_buffers())
    back = pickle.loads(pickle.dumps(old))
    assert not dict(back.named_buffers()) and torch.equal(back.ranks, bank.ranks)
    names = ["d", "c", None, "a"]
    x = torch.randn(len(names), IN)
    torch.testing.assert_close(back(x, back.index_of(names)), bank(x, bank.index_of(names)), rtol=0, atol=0)


def test_ids_on_another_device_than_the_bank_are_refused_by_name():
    """adapter_index on another device than the bank: the routing lookup failed inside torch with a
    message naming no argument (a review, 2026-12-05); a ValueError names both devices, as the ops'
    device checks do."""
    bank = MissBankLinear(nn.Linear(IN, OUT), capacity=2, max_r=MAX_R)
    bank.add_adapter("a", 4)
    bank.to("meta")
    with pytest.raises(ValueError, match=r"adapter_index is on cpu, the bank on meta"):
        bank(torch.randn(3, IN, device="meta"), torch.tensor([0, -1, 0]))


def test_a_base_that_returns_a_tuple_is_refused_by_name():
    """A router-like nn.Linear subclass returning (logits, weights) cannot take a bank either (as
    MissLinear refuses it): a TypeError naming the layer, not an error from deep inside the op."""
    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.softmax(-1)

    bank = MissBankLinear(Router(IN, OUT), capacity=2, max_r=MAX_R)
    bank.add_adapter("a", 4)
    with pytest.raises(TypeError, match=r"base layer Router returned a tuple, not a tensor"):
        bank(torch.randn(3, IN), bank.index_of(["a", None, "a"]))


def test_load_state_dict_with_another_base_shape_loads_nothing():
    """A checkpoint whose base weight has another shape but whose bank fits: nothing of the layer
    loads (not its bias, bank or slot names beside the refused weight)."""
    _, bank, _ = make("cpu")
    state = {k: v.clone() if v.is_floating_point() else v for k, v in bank.state_dict().items()}
    _, fresh, _ = make("cpu", seed=1)
    fresh.remove_adapter("c")
    state["base_layer.weight"] = torch.zeros(OUT, IN + 1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    names = list(fresh.adapter_names)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"size mismatch for base_layer.weight \(36, 25\).*Nothing of this layer"):
            fresh.load_state_dict(state, strict=strict)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()) and fresh.adapter_names == names


def test_a_slot_description_that_does_not_fit_loads_nothing():
    """The slot names, modes, rates and absent flags travel as JSON in the state_dict. One that does
    not fit the bank used to load when only the name count matched: a short `absent` list was
    broadcast into the route table (rows naming "b" silently got "a"'s block), a short rate list
    gave every adapter one dropout. Now every field is checked before anything loads."""
    from miss_ext.modules import json_tensor, tensor_json

    _, bank, _ = make("cpu")
    _, fresh, _ = make("cpu", seed=1)
    fresh.remove_adapter("c")
    saved = tensor_json(bank.state_dict()["_extra_state"])
    capacity = len(saved["adapter_names"])
    a, d = saved["adapter_names"].index("a"), saved["adapter_names"].index("d")
    bad = {
        "short absent list": dict(absent=[False]),
        "short dropout list": dict(dropouts=[0.3]),
        "rate 5.0": dict(dropouts=[5.0] * capacity),
        "bat mode": dict(modes=[m if i != a else "bat" for i, m in enumerate(saved["modes"])]),
        "a name twice": dict(adapter_names=[n if i != d else "a" for i, n in enumerate(saved["adapter_names"])]),
        "__base__ as a name": dict(adapter_names=[n if i != a else "__base__" for i, n in enumerate(saved["adapter_names"])]),
        "mini as default": dict(modes=["default" if m == "mini" else m for m in saved["modes"]]),
        "absent slot with a rank": dict(absent=[i == a for i in range(capacity)]),
        "empty slot with a mode": dict(modes=[m or "default" for m in saved["modes"]]),
        "missing field": None,
    }
    for what, change in bad.items():
        state = {k: v.clone() if v.is_floating_point() else v for k, v in bank.state_dict().items()}
        broken = {k: v for k, v in saved.items() if k != "absent"} if change is None else {**saved, **change}
        state["_extra_state"] = json_tensor(broken)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        lists = (list(fresh.adapter_names), list(fresh.modes), list(fresh.dropouts), list(fresh.absent))
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=r"the saved slot description \(_extra_state\) does not fit"):
                fresh.load_state_dict(state, strict=strict)
            assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), what
            assert (fresh.adapter_names, fresh.modes, fresh.dropouts, fresh.absent) == lists, what
        with pytest.raises(ValueError, match="MissBankLinear.set_extra_state"):
            fresh.set_extra_state(json_tensor(broken))
        assert (fresh.adapter_names, fresh.modes, fresh.dropouts, fresh.absent) == lists, what
    # The bank's own description loads, and routes as the bank does.
    fresh.load_state_dict(bank.state_dict())
    x = torch.randn(5, IN)
    names = ["a", "b", None, "d", "a"]
    torch.testing.assert_close(fresh(x, fresh.index_of(names)), bank(x, bank.index_of(names)), rtol=0, atol=0)


def test_slots_that_change_without_their_description_load_nothing():
    """A filtered state_dict (strict=False) holding another bank's ranks but no _extra_state used
    to load: the slots kept this bank's names over the other bank's blocks, so rows naming an
    adapter silently got another's block. The same slots without the description (new values for
    the blocks) still load."""
    _, bank, _ = make("cpu")
    _, fresh, _ = make("cpu", seed=1)
    fresh.remove_adapter("c")
    fresh.add_adapter("e", r=2)  # c's slot, another rank
    state = {k: v.clone() for k, v in bank.state_dict().items() if k != "_extra_state"}
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    names = list(fresh.adapter_names)
    with pytest.raises(RuntimeError, match=r"the state_dict's ranks \[8, 4, 3, 2, 0, 0\] \(this bank's: \[8, 4, 2, 2, 0, 0\]\) describe other "
                                           r"slots, without the slot description \(_extra_state\)"):
        fresh.load_state_dict(state, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()) and fresh.adapter_names == names
    _, same, _ = make("cpu", seed=2)
    same.load_state_dict(state, strict=False)  # same slots: loads
    x, rows = torch.randn(5, IN), ["a", "b", None, "d", "c"]
    torch.testing.assert_close(same(x, same.index_of(rows)), bank(x, bank.index_of(rows)), rtol=0, atol=0)


def test_a_slot_description_without_its_blocks_loads_nothing():
    """A filtered state_dict (strict=False) with another bank's slot description but not its bank,
    ranks and periods all used to load: the names moved onto this bank's blocks (or ranks), so rows naming
    "a" silently got "c"'s block (a review, 2026-12-05). Refused, nothing changed; a description
    equal to the bank's own still loads."""
    _, bank, singles = make("cpu")
    _, other, _ = make("cpu", seed=1)
    for name in ("a", "c"):  # other's slots: a and c (both default mode) swapped
        other.remove_adapter(name)
    other.add_from("c", singles["c"])
    other.add_from("a", singles["a"])
    assert other.adapter_names[:3] == ["c", "b", "a"]
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    lists = (list(bank.adapter_names), list(bank.modes), list(bank.dropouts), list(bank.absent))
    for keep in (["_extra_state"], ["_extra_state", "ranks", "periods"], ["_extra_state", "bank"]):
        state = {k: v.clone() for k, v in other.state_dict().items() if k in keep}
        with pytest.raises(RuntimeError, match=r"the state_dict would change the slot description \(adapters "
                                               r"\['c', 'b', 'a'.*without the (bank|ranks)[a-z ]* it was saved with"):
            bank.load_state_dict(state, strict=False)
        assert all(torch.equal(v, before[k]) for k, v in bank.state_dict().items()), keep
        assert (bank.adapter_names, bank.modes, bank.dropouts, bank.absent) == lists, keep
    own = {k: v.clone() for k, v in bank.state_dict().items() if k in ("_extra_state", "ranks", "periods")}
    bank.load_state_dict(own, strict=False)  # changes no slot: loads
    assert (bank.adapter_names, bank.modes, bank.dropouts, bank.absent) == lists


@pytest.mark.parametrize("then", ["load", "cast", "other_bank", "layer_dropped", "slots_restored"])
def test_a_stale_snapshot_cannot_pair_old_names_with_new_blocks(then):
    """state_dict() shares its tensors with the module (as torch's always does), and the slot
    description is a fresh copy. A snapshot taken, then remove_adapter("a") + add_adapter("e") into
    a's slot, then load_state_dict(snapshot) (after a cast that reallocates the bank, or into
    another bank): the description named "a" over e's block, silently (reviews, 2026-12-05).
    Refused, nothing changed; a deep copy of the snapshot restores the bank, and loading the bank's
    own current state_dict, or a snapshot taken before training steps only, stays allowed."""
    base, bank, singles = make("cpu")
    x = torch.randn(4, IN)
    rows = ["a", "b", None, "a"]
    snapshot = bank.state_dict()
    kept = copy.deepcopy(snapshot)
    with torch.no_grad():
        bank.bank.mul_(1.0)  # a training step's in-place write: the same adapters
    bank.load_state_dict(snapshot)
    bank.remove_adapter("a")
    bank.add_adapter("e", r=8, block=torch.randn(8, OUT))
    assert bank.adapter_names.index("e") == 0
    target = bank
    if then == "cast":
        bank.double()
    elif then == "other_bank":
        target = make("cpu", seed=3)[1]
    elif then == "layer_dropped":  # the layer the snapshot came from is gone
        target = copy.deepcopy(bank)
        del bank
    elif then == "slots_restored":  # the layer's slots back to the snapshot's, in new tensors
        bank.load_state_dict(copy.deepcopy(kept), assign=True)
        assert bank.adapter_names[0] == "a"
    before = {k: v.clone() for k, v in target.state_dict().items()}
    lists = (list(target.adapter_names), list(target.modes), list(target.dropouts), list(target.absent))
    with pytest.raises(RuntimeError, match=r"the state_dict is a snapshot taken before adapters were added to or "
                                           r"removed from its layer: its bank .*"
                                           r"\['a', 'b', 'c', 'd', None, None\].*copy\.deepcopy"):
        target.load_state_dict(snapshot)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert (target.adapter_names, target.modes, target.dropouts, target.absent) == lists
    target.load_state_dict(target.state_dict())  # its own current state: no change, loads
    target.load_state_dict(kept)
    target.float().eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x, target.index_of(rows)), expected_rows(base, singles, x, rows),
                                   rtol=1e-5, atol=1e-5)


def test_a_snapshot_reallocated_before_the_slots_changed_loads():
    """A snapshot whose bank a cast reallocated before adapters were swapped (same rank: its
    shared ranks kept their values) still holds the state of then, and loads (a review's false
    refusal, 2026-12-05). The snapshot holds its tensors weakly: dropping the state_dict frees
    them."""
    base, bank, singles = make("cpu", dtype=torch.float64)
    snapshot = bank.state_dict()
    bank.float()
    bank.remove_adapter("a")
    bank.add_adapter("e", r=8, block=torch.randn(8, OUT))
    bank.double()
    bank.load_state_dict(snapshot)
    assert bank.adapter_names[0] == "a"
    x, rows = torch.randn(3, IN, dtype=torch.float64), ["a", "b", "d"]
    with torch.no_grad():
        torch.testing.assert_close(bank.eval()(x, bank.index_of(rows)),
                                   expected_rows(base, {k: v.double() for k, v in singles.items()}, x, rows))
    freed = weakref.ref(snapshot["bank"])
    del snapshot
    gc.collect()
    assert freed() is None


@pytest.mark.parametrize("where", ["inside", "built_inside"])
def test_state_dict_under_inference_mode(where):
    """state_dict() inside torch.inference_mode(), or of a bank built there (inference tensors have
    no version counter), works and round-trips (the first stale-snapshot check read versions and
    raised there)."""
    if where == "built_inside":
        with torch.inference_mode():
            _, bank, _ = make("cpu")
        state = bank.state_dict()
    else:
        _, bank, _ = make("cpu")
        with torch.inference_mode():
            state = bank.state_dict()
    _, fresh, _ = make("cpu", seed=5)
    fresh.load_state_dict({k: v.clone() for k, v in state.items()})
    assert fresh.adapter_names == bank.adapter_names
    assert torch.equal(fresh.bank, bank.bank)


@pytest.mark.parametrize("how", ["detached", "inference_mode"])
def test_a_stale_snapshot_taken_otherwise_is_refused(how):
    """A snapshot whose tensors are detach()ed views of the layer's (a common "state_dict to CPU"
    helper on the CPU), or one taken under torch.inference_mode(), loaded after a slot swap:
    refused like a plain one (a review, 2026-12-05: both loaded, row "a" 6.6 and 9.2 off)."""
    _, bank, _ = make("cpu")
    if how == "detached":
        snapshot = {k: v.detach() for k, v in bank.state_dict().items()}
    else:
        with torch.inference_mode():
            snapshot = bank.state_dict()
    bank.remove_adapter("a")
    bank.add_adapter("e", r=8, block=torch.randn(8, OUT))
    _, other, _ = make("cpu", seed=3)
    with pytest.raises(RuntimeError, match=r"the state_dict is a snapshot taken before adapters were added"):
        other.load_state_dict(snapshot)


def test_a_kept_parameter_snapshot_is_judged_by_where_its_bank_lies():
    """A keep_vars=True snapshot holds the bank Parameter itself: after a cast it lies in the new
    memory, which the later swap rewrites: refused. A snapshot whose bank entry is a copy (cast
    in the dict) keeps the blocks of then: loads (a review, 2026-12-05: the first was loaded,
    row "a" 9.2 off, and the second refused)."""
    base, bank, singles = make("cpu", dtype=torch.float64)
    kept = bank.state_dict(keep_vars=True)
    copied = {k: v.float() if v.is_floating_point() else v for k, v in bank.state_dict().items()}
    bank.float()
    bank.double()
    bank.remove_adapter("a")
    bank.add_adapter("e", r=8, block=torch.randn(8, OUT, dtype=torch.float64))
    _, other, _ = make("cpu", seed=3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"the state_dict is a snapshot taken before adapters were added"):
        other.load_state_dict(kept)
    other.load_state_dict(copied)
    x, rows = torch.randn(3, IN, dtype=torch.float64), ["a", "b", "d"]
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x, other.index_of(rows)),
                                   expected_rows(base, {k: v.double() for k, v in singles.items()}, x, rows))


def test_rolling_back_an_absent_adapter_or_a_temporary_one_loads():
    """add_absent, or an adapter added and removed again in a free slot, writes no block of a slot
    the snapshot names: loading the snapshot back is consistent and loads (a review's false
    refusal, 2026-12-05)."""
    base, bank, singles = make("cpu")
    snapshot = bank.state_dict()
    bank.add_absent("q")
    bank.load_state_dict(snapshot)
    assert "q" not in bank.adapter_names
    bank.add_adapter("tmp", r=2, block=torch.randn(2, OUT))
    bank.remove_adapter("tmp")
    bank.load_state_dict(snapshot)
    x, rows = torch.randn(4, IN), ["a", "b", "c", "d"]
    with torch.no_grad():
        torch.testing.assert_close(bank.eval()(x, bank.index_of(rows)), expected_rows(base, singles, x, rows),
                                   rtol=1e-5, atol=1e-5)


def test_state_dict_with_parameters_kept_leaves_them_swappable():
    """state_dict(keep_vars=True) alive while the module is cast with parameter swapping on (torch's
    default for tensor-subclass parameters): the first stale-snapshot registry held a weak
    reference to the Parameter, and torch refuses to swap such a tensor (a review, 2026-12-05)."""
    _, bank, _ = make("cpu")
    kept = bank.state_dict(keep_vars=True)
    before = torch.__future__.get_swap_module_params_on_conversion()
    try:
        torch.__future__.set_swap_module_params_on_conversion(True)
        bank.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert bank.bank.dtype == torch.float64


def test_a_state_dict_written_in_place_by_a_checkpoint_loader_loads():
    """torch.distributed.checkpoint resumes by writing the checkpoint's tensors into the model's
    own state_dict (bank, ranks, periods, the slot description's bytes), then load_state_dict. The
    first version of the stale-snapshot refusal (the bank being the layer's own) refused that and
    left the layer half written (a review, 2026-12-05). Here: another bank's same-length description
    with its adapters in another order; it loads, and routes as that bank."""
    _, source, _ = make("cpu", seed=4)
    for name in ("a", "c"):  # source's slots: a and c swapped (both default mode)
        source.remove_adapter(name)
    source.add_adapter("c", r=8, block=torch.randn(8, OUT))
    source.add_adapter("a", r=3, block=torch.randn(3, OUT))
    _, bank, _ = make("cpu")
    state = bank.state_dict()
    saved = source.state_dict()
    assert state["_extra_state"].shape == saved["_extra_state"].shape
    with torch.no_grad():
        for key, tensor in state.items():
            tensor.copy_(saved[key])
    bank.load_state_dict(state)
    assert bank.adapter_names == source.adapter_names
    x, rows = torch.randn(5, IN), ["a", "c", None, "b", "d"]
    with torch.no_grad():
        torch.testing.assert_close(bank(x, bank.index_of(rows)), source(x, source.index_of(rows)), rtol=0, atol=0)


def test_bank_changes_between_calls():
    base, bank, singles = make("cpu", capacity=5)
    bank.eval()
    x = torch.randn(4, IN)
    with torch.no_grad():
        first = bank(x, bank.index_of(["a", "b", "c", "d"]))
        bank.remove_adapter("b")
        extra = MissLinear(base, r=8, init_weights=False)
        bank.add_from("e", extra)
        singles["e"] = extra
        second = bank(x, bank.index_of(["a", "e", "c", "d"]))
        bank.add_from("b", singles["b"])
        third = bank(x, bank.index_of(["b", "e", None, "d"]))
    torch.testing.assert_close(first, expected_rows(base, singles, x, ["a", "b", "c", "d"]))
    torch.testing.assert_close(second, expected_rows(base, singles, x, ["a", "e", "c", "d"]))
    torch.testing.assert_close(third, expected_rows(base, singles, x, ["b", "e", None, "d"]))


def test_a_bank_without_output_columns_refuses_mini_adapters_by_mini_r():
    """out_features = 0: every mini_r divides it, but a slot holds its block in out_features
    columns, where (r, mini_r) does not fit: a raw size error with a block, a (r, 0) block saved
    as mini_r=3 (a file load_adapter refuses) without one (a review, 2026-12-07). Refused by name,
    nothing changed; a default adapter (an (r, 0) block) still goes in."""
    def empty_output_bank():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
            return MissBankLinear(nn.Linear(8, 0), capacity=2, max_r=4)

    bank = empty_output_bank()
    for block in (torch.randn(2, 3), None):
        before = snapshot(bank)
        with pytest.raises(ValueError, match=r"adapter 'a': mini_r=3 is above out_features=0"):
            bank.add_adapter("a", r=2, mode="mini", mini_r=3, block=block)
        assert_unchanged(bank, before)
    with pytest.raises(ValueError, match="mini_r=3 is above out_features=0"):
        bank.adapter_shape("a", r=2, mode="mini", mini_r=3)
    bank.add_adapter("d", r=2)
    assert bank.block("d").shape == (2, 0)
    # Nor through a state_dict describing such a slot (one an earlier version wrote): refused.
    from miss_ext.modules import json_tensor, tensor_json
    state = bank.state_dict()
    description = tensor_json(state["_extra_state"])
    slot = description["adapter_names"].index("d")
    description["modes"][slot] = "mini"
    state["periods"] = state["periods"].clone()
    state["periods"][slot] = 1
    state["_extra_state"] = json_tensor(description)
    fresh = empty_output_bank()
    before = snapshot(fresh)
    with pytest.raises(RuntimeError, match="mode='mini' with rank 2 and period 1 does not fit"):
        fresh.load_state_dict(state)
    assert_unchanged(fresh, before)


def test_refusals_name_the_problem():
    base, bank, singles = make("cpu", capacity=4)
    with pytest.raises(TypeError, match="'z' is a bat adapter"):
        bank.add_adapter("z", 4, "bat")
    with pytest.raises(ValueError, match="bank is full"):
        bank.add_adapter("z", 4)
    bank.remove_adapter("a")
    with pytest.raises(ValueError, match="r=16 > max_r=8"):
        bank.add_adapter("z", 16)
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        bank.add_adapter("b", 4)
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        bank.index_of(["b", "a"])
    # None marks a free slot in adapter_names, never an adapter's name (index_of reads it as the
    # base model): with a slot free it used to find that slot (remove, block, save_bank_adapter).
    for call in (bank.remove_adapter, bank.block):
        with pytest.raises(ValueError, match="no adapter named None"):
            call(None)
    assert bank.adapter_names.count(None) == 1 and bank.index_of([None]).tolist() == [-1]
    with pytest.raises(ValueError, match="leading sizes"):
        bank(torch.randn(3, IN), bank.index_of(["b", "c"]))
    # Flattened tokens (an MoE expert's input) under one name per sequence: said so, no beam hint.
    with pytest.raises(ValueError, match=r"x is \(12, \d+\): if the model flattens its tokens") as caught:
        bank(torch.randn(12, IN), bank.index_of(["b", "c"]))
    assert "expand=k" not in str(caught.value)
    with pytest.raises(ValueError, match=r"x holds 4 sequences for 2 names: if that is beam search.*expand=k.*"
                                         r"repeats its batch inside.*one adapter.*regroups"):
        bank(torch.randn(4, 3, IN), bank.index_of(["b", "c"]))
    for x in (torch.randn(0, 3, IN), torch.randn(1, IN)):  # fewer rows than names: no hint
        with pytest.raises(ValueError, match="leading sizes") as caught:
            bank(x, bank.index_of(["b", "c"]))
        assert " if " not in str(caught.value), str(caught.value)
    with pytest.raises(TypeError, match="int64"):
        bank(torch.randn(2, IN), torch.tensor([0, 1], dtype=torch.int32))


def test_a_refused_training_call_with_dropout_leaves_the_random_stream_alone():
    """A bad row id in training with dropout (an id past the bank, or a free slot's id) is refused
    before the dropout key is drawn: the CPU generator is where it was, so the next call draws the
    mask it would have drawn without the bad batch. Before, the key was drawn first and the op
    refused the ids afterwards, moving the user's random stream on a refused call."""
    base, bank, singles = make("cpu", capacity=6)
    # A non-zero block: with a zero one the masks cannot show in the output (and this test could
    # not fail; a mutation round found it, 2026-12-06).
    bank.add_adapter("e", 4, dropout=0.5, block=torch.randn(bank.adapter_shape("e", 4)))
    bank.remove_adapter("a")                      # a free slot among used ones
    free = bank.adapter_names.index(None)
    bank.train()
    x = torch.randn(3, IN)
    good = bank.index_of(["e", "b", None])
    torch.manual_seed(1)
    seed1 = bank(x, good)
    torch.manual_seed(2)
    assert not torch.equal(seed1, bank(x, good)), "the masks must show in the output"
    # (rows, ids, message): one id per row, and per token of (3, 2) rows (entry [0, 1] is bad).
    for rows, bad, match in (
            (x, torch.tensor([0, bank.capacity, -1]), rf"index\[1\]={bank.capacity} names no slot"),
            (x, torch.tensor([free, 1, -1]), rf"ranks\[{free}\]=0 \(used by adapter_index\[0\]\)"),
            (torch.randn(3, 2, IN), torch.tensor([[1, free], [1, 1], [-1, -1]]),
             rf"ranks\[{free}\]=0 \(used by adapter_index\[0, 1\]\)")):
        torch.manual_seed(7)
        with pytest.raises(ValueError, match=match):
            bank(rows, bad)
        after_refusal = bank(x, good)
        torch.manual_seed(7)
        assert torch.equal(after_refusal, bank(x, good))


def test_inductor_memory_planning_pools_are_not_mistaken_for_overlap():
    """Inductor's memory planning carves a bank model's buffers from one pool, so bank_add_'s y and
    the int64 row ids share a storage without overlapping: accepted (a storage-identity check
    refused this compiled model), and the result is eager's."""
    import torch._inductor.config as inductor_config

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.v(torch.relu(self.q(x))) * 2

    import miss_ext

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = miss_ext.apply_bank(TwoLayers(), ["q", "v"], capacity=3, max_r=4)
    miss_ext.add_bank_adapter(model, "a", r=2)
    miss_ext.add_bank_adapter(model, "b", r=4)
    with torch.no_grad():
        for _, layer in miss_ext.bank_model.bank_layers(model):
            layer.bank.normal_()  # nonzero blocks
    model.eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad(), miss_ext.mixed_batch(model, ["a", "b", None]), \
            inductor_config.patch(memory_planning=True):
        got = torch.compile(model)(x)
        want = model(x)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_layer_compiles_fullgraph_and_not_again_when_adapters_change():
    """torch.compile(fullgraph=True) of the layer compiles one graph for eval, one for training
    without dropout and one for training with dropout, and no change of the bank's adapters
    recompiles any: replacing adapters (other r, dividing max_r or not, other mode), changing block
    values in place, removing adapters, adding absent adapters and removing them, new dropout rates
    in training. The compiled layer follows the bank's new contents (training: the same key; see
    miss_ext/bank.py, "Recompilation"). Before the per-row fold, an r not dividing max_r, a new
    dropout rate, removing the last adapter of a fold group and the first absent adapter each
    compiled another graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    bank = MissBankLinear(base, capacity=6, max_r=MAX_R).eval()
    compiled = torch.compile(bank, fullgraph=True, backend=counter)
    x = torch.randn(6, IN)

    def put(name, r, mode="default", dropout=0.0):
        if name in bank.adapter_names:
            bank.remove_adapter(name)
        bank.add_adapter(name, r, mode=mode, mini_r=6, dropout=dropout,
                         block=torch.randn(r, 6 if mode == "mini" else OUT))

    def check(names):
        index = bank.index_of(names)
        seed = int(torch.randint(0, 2**31, ()))
        with torch.no_grad():
            torch.manual_seed(seed)
            want = bank(x, index)
            torch.manual_seed(seed)
            got = compiled(x, index)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    put("a", 8)
    check(["a", None, "a", "a", None, "a"])          # first call: the eval graph
    assert counter.frame_count == 1
    names = ["a", None, "b", "a", "z", "w"]
    for step, (r_a, r_b, mode_b) in enumerate([(8, 4, "mini"), (2, 8, "default"), (4, 1, "mini"), (5, 3, "default"),
                                               (7, 6, "mini")]):
        put("a", r_a)
        put("b", r_b, mode_b)
        if step == 0:
            bank.add_absent("z")                     # the first absent adapter
            bank.add_absent("w")
        check(names)
    with torch.no_grad():
        bank.block("a").normal_()                   # block values
    check(names)
    bank.remove_adapter("b")                        # removal
    check(["a", None, "a", "a", "z", "w"])
    bank.remove_adapter("z")                        # an absent adapter
    bank.remove_adapter("w")                        # the last absent adapter
    check(["a", None, "a", "a", None, None])
    put("b", 3, "mini")                             # r = 3 does not divide max_r = 8
    put("c", 1)
    check(["a", "c", "b", None, "b", "c"])
    assert counter.frame_count == 1

    # Training: without dropout one more graph, with dropout (the rates and a key) one more; then
    # none for new rates, ranks or absent adapters, or for switching between the two.
    bank.train()
    check(["a", None, "b", None, "b", "c"])
    assert counter.frame_count == 2
    put("d", 2, dropout=0.1)                        # the first adapter with dropout
    check(["a", "d", "b", None, "d", "c"])
    assert counter.frame_count == 3
    put("e", 5, "mini", dropout=0.3)
    put("d", 3, dropout=0.6)
    bank.add_absent("z")
    check(["a", "d", "e", "z", "e", "d"])
    with torch.no_grad():
        bank.block("e").normal_()
    bank.remove_adapter("a")
    check([None, "d", "e", "z", "c", "d"])
    bank.remove_adapter("d")
    bank.remove_adapter("e")                        # the last adapter with dropout
    check([None, "b", "c", "z", "c", "b"])
    put("d", 4, dropout=0.2)
    check(["d", "b", "c", "z", "c", "d"])
    assert counter.frame_count == 3
    bank.eval()                                     # back to eval: its graph again
    check(["b", "d", "c", "z", "c", "d"])
    assert counter.frame_count == 3
    torch._dynamo.reset()


def test_under_autocast_the_output_has_x_dtype_as_miss_linear():
    """bf16 autocast on the CPU: the base output is bf16; the bank returns x's dtype (float32) as
    MissLinear and PEFT do, with the same values as MissLinear up to its one bf16 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    single = MissLinear(copy.deepcopy(base), 4, init_weights=False)
    bank = MissBankLinear(base, capacity=2, max_r=MAX_R)
    bank.add_from("a", single)
    x = torch.randn(3, IN)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got = bank(x, bank.index_of(["a", None, "a"]))
        want = single(x)
        plain = base(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-2, atol=1e-2)
    assert torch.equal(got[1], plain[1].float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounded", ["block", "fold"])
@pytest.mark.parametrize("mode", ["default", "mini"])
def test_under_autocast_the_adapter_term_stays_float32(device, rounded, mode):
    """The bank's documented autocast policy (README, MissBankLinear "Precision"): each row's
    term S @ D is computed in float32 and rounded once into the bf16 base output; unlike
    MissLinear and PEFT, S and the block are not rounded to bf16. The inputs
    (conftest.autocast_sensitive_inputs) make the two policies differ by many tolerances, so
    this fails if the bank's policy changes without its documentation (and this test)."""
    q = 6 if mode == "mini" else OUT
    base = nn.Linear(IN, OUT).to(device)
    block = torch.zeros(MAX_R, q, device=device)
    x = autocast_sensitive_inputs(base.weight, block, 8, rounded, torch.bfloat16)
    bank = MissBankLinear(base, capacity=2, max_r=MAX_R)
    bank.add_adapter("a", MAX_R, mode=mode, mini_r=q if mode == "mini" else 1, block=block)
    names = ["a", None, "a", "a", None, "a", "a", "a"]
    with torch.no_grad(), torch.autocast(device, torch.bfloat16):
        got = bank(x, bank.index_of(names))
        plain = base(x)
    args = (x, base.weight.detach(), base.bias.detach(), block, torch.bfloat16)
    want = autocast_linear_ref(*args, adapter_in_amp=False)
    bf16_product = autocast_linear_ref(*args)
    rows = [t for t, n in enumerate(names) if n is not None]
    tol = 1.6e-2 * max(1.0, want.abs().max().item())  # a few bf16 ulps of the output
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=tol)
    assert torch.equal(got[[1, 4]], plain[[1, 4]].float())
    gap = (bf16_product[rows].double() - want[rows].double()).abs().max().item()
    assert gap > 5 * tol, f"the inputs do not tell the policies apart: {gap:.3g} vs tolerance {tol:.3g}"


def test_r_up_to_max_r_is_taken_and_one_more_is_refused():
    """The boundary of max_r: an adapter of r = max_r + 1 would pass the check and leave a slot whose
    rank bank_fold refuses at every later forward."""
    base, bank, singles = make("cpu", capacity=6)
    with pytest.raises(ValueError, match=rf"r={MAX_R + 1} > max_r={MAX_R}"):
        bank.add_adapter("z", MAX_R + 1)
    assert "z" not in bank.adapter_names
    bank.add_adapter("z", MAX_R)
    assert bank.block("z").shape == (MAX_R, OUT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_bank_folds_and_sums_in_float32(dtype):
    """README, "Precision": a bank cast to half precision (a whole model cast to bf16) is used in
    float32, the fold and the term summed in float32 and rounded once. The input is built so that
    the fold rounded to `dtype` loses the answer: row 0 folds to S = (s + 6, -s, 0) with s = 16 / eps,
    which `dtype` rounds to (s, -s, 0); with block rows 0 and 1 equal to m, the term is 6 m in
    float32 and 0 after that rounding. The base is zero, so the output is the term alone."""
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
    bank = MissBankLinear(base, capacity=2, max_r=3)
    m = torch.tensor([1.0, -0.5, 0.25, 2.0])
    bank.add_adapter("a", 3, block=torch.stack([m, m, torch.zeros(4)]))
    bank = bank.to(dtype).eval()
    assert bank.bank.dtype == dtype
    s = 16.0 / torch.finfo(dtype).eps
    x = torch.tensor([[s, -s, 0.0, 6.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]], dtype=dtype)
    want = torch.stack([6.0 * m, torch.zeros(4)]).to(dtype)
    for grad in (False, True):  # the in-place and the differentiable path
        with torch.set_grad_enabled(grad):
            got = bank(x.clone().requires_grad_(grad), bank.index_of(["a", None]))
        assert got.dtype == dtype
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


def test_index_of_refuses_a_bare_string():
    """index_of("ab") read the characters as names: rows of adapter "ab" silently routed to "a"
    and "b" (a new-user review, 2026-12-03)."""
    _, bank, _ = make("cpu")
    with pytest.raises(TypeError, match=r"names must be a list of adapter names .* got 'ab'"):
        bank.index_of("ab")
    a = bank.index_of(["a"]).item()
    assert bank.index_of(("a", None, "__base__")).tolist() == [a, -1, -1]
    # Any other iterable of names, as before: a generator, dict keys, a numpy array of str.
    np = pytest.importorskip("numpy")
    assert bank.index_of(n for n in ["a", "__base__"]).tolist() == [a, -1]
    assert bank.index_of({"a": 0}.keys()).tolist() == [a]
    assert bank.index_of(np.array(["a", "a"])).tolist() == [a, a]


@pytest.mark.parametrize("block, error, pattern", [
    ([[0.0] * OUT] * 2, TypeError, r"block must be a real floating tensor, got list"),
    (torch.ones(2, OUT, dtype=torch.int64), TypeError, r"got a tensor of dtype torch\.int64"),
    (torch.ones(2, OUT, dtype=torch.complex64), TypeError, r"got a tensor of dtype torch\.complex64"),
    (torch.empty(2, OUT, device="meta"), ValueError, r"the block is on the meta device"),
    (torch.full((2, OUT), float("nan")), ValueError, r"not finite in the bank's torch\.float32"),
    (torch.full((2, OUT), 1e300, dtype=torch.float64), ValueError, r"not finite in the bank's torch\.float32"),
])
def test_add_adapter_refuses_a_block_it_would_copy_in_wrong(block, error, pattern):
    """add_adapter's block: a list gave a bare AttributeError, an integer or complex tensor was cast
    silently (the imaginary part dropped), a NaN block (or float64 values beyond float32's range)
    was taken though load_bank refuses it (an atomicity review, 2026-12-03). Refused, naming the
    adapter; the bank unchanged."""
    _, bank, _ = make("cpu")
    before = (bank.bank.detach().clone(), list(bank.adapter_names))
    with pytest.raises(error, match=rf"adapter 'new': .*{pattern}"):
        bank.add_adapter("new", r=2, block=block)
    assert torch.equal(bank.bank, before[0]) and bank.adapter_names == before[1]


def test_a_bad_id_is_named_by_its_place_in_adapter_index():
    """One id per sequence of a (batch, seq, in) x: a bad id is named by its entry of the caller's
    adapter_index, not by the token row the ops see after it is broadcast over the sequence (the
    op named row 21 for entry 3 of a (5, 7) batch; a review, 2026-12-05). Also one id per token,
    and one id for every row."""
    bank = MissBankLinear(torch.nn.Linear(10, 20), capacity=4, max_r=4)
    bank.add_adapter("a", r=2)
    x = torch.randn(5, 7, 10)
    with pytest.raises(ValueError, match=r"ranks\[3\]=0 \(used by adapter_index\[3\]\): the slot holds no adapter"):
        bank(x, torch.tensor([0, 0, 0, 3, 0]))
    with pytest.raises(ValueError, match=r"adapter_index\[3\]=9 names no slot of a bank with 4 slots"):
        bank(x, torch.tensor([0, 0, 0, 9, 0]))
    ids = torch.zeros(5, 7, dtype=torch.int64)
    ids[4, 6] = 2
    with pytest.raises(ValueError, match=r"ranks\[2\]=0 \(used by adapter_index\[4, 6\]\)"):
        bank(x, ids)
    with pytest.raises(ValueError, match=r"ranks\[2\]=0 \(used by adapter_index\)"):
        bank(x, torch.tensor(2))
    assert torch.equal(bank(x, torch.tensor(-1)), bank.base_layer(x))
    assert bank(x, torch.tensor([0, -1, 0, 0, -1])).shape == (5, 7, 20)


@pytest.mark.parametrize("how", ["layer", "model"])
def test_a_freed_slot_passes_no_gradient_to_its_next_adapter(how):
    """remove_adapter zeroed a slot's block but kept its part of bank.grad: the next adapter put
    in the slot inherited the removed one's gradient, through a gradient accumulation across the
    change or at the next step, which moved an adapter no batch had named (a review, 2026-12-07).
    The slot's gradient is zeroed with its block now; the other slots' gradients stay."""
    import miss_ext
    torch.manual_seed(0)
    layer = MissBankLinear(nn.Linear(10, 12).double(), capacity=2, max_r=4)
    layer.add_adapter("x", 4, block=torch.randn(4, 12, dtype=torch.float64))
    layer.add_adapter("keep", 4, block=torch.randn(4, 12, dtype=torch.float64))
    x = torch.randn(3, 10, dtype=torch.float64)
    layer(x, torch.tensor([0, 1, 0])).square().sum().backward()
    kept = layer.bank.grad[1].clone()
    assert layer.bank.grad[0].abs().sum() > 0 and kept.abs().sum() > 0
    if how == "layer":
        layer.remove_adapter("x")
        layer.add_adapter("y", 4)
    else:
        model = nn.Sequential()
        model.add_module("lin", layer)
        miss_ext.remove_bank_adapter(model, "x")
        miss_ext.add_bank_adapter(model, "y", 4)
    assert layer.index_of(["y"]).tolist() == [0]
    assert torch.equal(layer.bank.grad[0], torch.zeros_like(layer.bank.grad[0]))
    assert torch.equal(layer.bank.grad[1], kept)
    torch.optim.SGD([layer.bank], lr=0.1).step()
    assert torch.equal(layer.block("y"), torch.zeros(4, 12, dtype=torch.float64)), "a step moved an unnamed adapter"


def test_a_slot_load_state_dict_gives_to_another_adapter_starts_with_no_gradient():
    """load_state_dict of a bank whose slots hold other adapters (or none) kept the old
    adapters' accumulated gradients in those slots, and the next adapter there was moved by them
    (a review, 2026-12-07). Slots that change hands get zero gradients; a slot reloaded with its
    own adapter keeps its gradient, as load_state_dict leaves any parameter's."""
    torch.manual_seed(0)

    def bank(names):
        layer = MissBankLinear(nn.Linear(10, 12).double(), capacity=3, max_r=4)
        for name in names:
            layer.add_adapter(name, 4, block=torch.randn(4, 12, dtype=torch.float64))
        return layer
    layer = bank(["x", "keep", "y"])
    layer(torch.randn(4, 10, dtype=torch.float64), torch.tensor([0, 1, 2, 1])).square().sum().backward()
    kept = layer.bank.grad[1].clone()
    assert layer.bank.grad.abs().sum(dim=(1, 2)).min() > 0
    source = bank(["other", "keep"])  # slot 0 another adapter, slot 2 empty
    layer.load_state_dict(source.state_dict())
    assert layer.adapter_names == ["other", "keep", None]
    zero = torch.zeros_like(kept)
    assert torch.equal(layer.bank.grad[0], zero) and torch.equal(layer.bank.grad[2], zero)
    assert torch.equal(layer.bank.grad[1], kept)


def test_an_interrupted_remove_puts_the_slot_gradient_back(monkeypatch):
    """remove_adapter zeroes the slot's gradient with its block; an interrupt part way (here in
    _sync_slots) puts both back with the name (_slot_kept_on_error)."""
    torch.manual_seed(0)
    layer = MissBankLinear(nn.Linear(10, 12).double(), capacity=2, max_r=4)
    layer.add_adapter("x", 4, block=torch.randn(4, 12, dtype=torch.float64))
    layer(torch.randn(3, 10, dtype=torch.float64), torch.tensor([0, 0, 0])).square().sum().backward()
    grad, block = layer.bank.grad[0].clone(), layer.block("x").detach().clone()

    def interrupted(slots):
        raise KeyboardInterrupt
    monkeypatch.setattr(layer, "_sync_slots", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layer.remove_adapter("x")
    monkeypatch.undo()
    assert layer.adapter_names[0] == "x" and torch.equal(layer.block("x"), block)
    assert torch.equal(layer.bank.grad[0], grad) and grad.abs().sum() > 0
