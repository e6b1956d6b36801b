"""A call that raises leaves what the user owns as it was (the project's standard: "nothing the
user owns changes on error"): module types, values, requires_grad flags. Found by an atomicity
review (2026-12-03) that snapshotted models around every raising call of the public API; each
test here failed on the code before its fix."""
import warnings

import pytest
import torch
import torch.nn as nn

import miss_ext
from conftest import assert_unchanged, module_settings, snapshot


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))


@pytest.mark.parametrize("call", ["r_above_in", "bat_dropout"])
def test_a_layer_whose_warning_is_an_error_leaves_its_base_trainable(call):
    """MissLinear froze the user's base layer before its own warnings: under
    warnings.simplefilter("error") (pytest -W error) the constructor raised with the base
    already frozen."""
    base = nn.Linear(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            if call == "r_above_in":
                miss_ext.MissLinear(base, r=6)
            else:
                miss_ext.MissLinear(base, r=2, mode="bat", dropout=0.1)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_a_block_that_cannot_be_allocated_is_named_and_changes_nothing(monkeypatch):
    """A block the allocator refuses (a huge r or capacity) raised the allocator's message alone,
    with the base layers of the layers built before it (apply_miss) or its own frozen. The error
    now names the layer, its size asked for, and keeps its type (torch.OutOfMemoryError on a
    GPU); every requires_grad flag is as it was."""
    from miss_ext import modules

    real_zeros = torch.zeros
    calls = []

    def failing_zeros(*args, **kwargs):  # the second block cannot be allocated
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_zeros(*args, **kwargs)

    model = _net()
    snap = snapshot(model)
    monkeypatch.setattr(modules.torch, "zeros", failing_zeros)
    with pytest.raises(RuntimeError, match=r"MissLinear\(r=2, mode='default'\): cannot allocate its \(2, 8\) "
                                           r"torch.float32 block \(16 elements.*can't allocate memory"):
        miss_ext.apply_miss(model, ["0", "2", "3"], r=2)
    monkeypatch.undo()
    assert_unchanged(model, snap)
    base = nn.Linear(8, 8)
    monkeypatch.setattr(modules.torch, "zeros", lambda *args, **kwargs: failing_zeros(*args, **kwargs))
    calls.clear()
    calls.append(None)  # counted as if one allocation had gone before: the bank's own (its first) fails
    with pytest.raises(RuntimeError, match=r"MissBankLinear\(capacity=4, max_r=2\): cannot allocate its \(4, 2, 8\)"):
        miss_ext.MissBankLinear(base, 4, 2)
    monkeypatch.undo()
    assert base.weight.requires_grad and base.bias.requires_grad


@pytest.mark.parametrize("r", [2**63, 2**64])
def test_an_r_beyond_int64_is_refused_naming_it(r):
    """torch.zeros met r = 2**64 with an overflow TypeError that named neither r nor the layer
    (a review, 2026-12-04); 2**62 already got allocate_block's message."""
    base = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=rf"r={r} is above the largest size a tensor dimension holds"):
        miss_ext.MissLinear(base, r=r)
    with pytest.raises(ValueError, match=rf"max_r={r} is above"):
        miss_ext.MissBankLinear(base, 2, r)
    with pytest.raises(ValueError, match=rf"capacity={r} is above"):
        miss_ext.MissBankLinear(base, r, 2)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_a_stale_modules_to_save_record_is_refused_before_anything_changes(tmp_path):
    """An earlier apply_miss recorded modules_to_save=["3"]; the user then set that module to
    None. The next apply_miss (load_adapter) swapped its layers in, overwrote blocks, then failed
    with a bare AttributeError. Refused first, naming the path."""
    model = miss_ext.apply_miss(_net(), ["0"], r=2, modules_to_save=["3"], init_weights=False)
    miss_ext.save_adapter(model, str(tmp_path))
    model[3] = None
    snap = snapshot(model)
    for call in (lambda: miss_ext.apply_miss(model, ["2"], r=2),
                 lambda: miss_ext.load_adapter(model, str(tmp_path)),
                 lambda: miss_ext.save_adapter(model, str(tmp_path / "again"))):
        with pytest.raises(ValueError, match=r"modules_to_save '3', recorded on the model by an earlier apply_miss / "
                                             r"load_adapter .* is no longer a module of the model"):
            call()
        assert_unchanged(model, snap)


@pytest.mark.parametrize("into, failing", [("plain", "block"), ("plain", "copy"), ("adapted", "copy"),
                                           ("plain", "head"), ("adapted", "head"), ("plain", "freeze"),
                                           ("adapted", "freeze")])
def test_load_adapter_failing_part_way_changes_nothing(tmp_path, monkeypatch, into, failing):
    """load_adapter checked everything first, then wrote layer after layer with no way back: a
    failure part way (the second layer's block not allocated, a copy or the freeze interrupted)
    left the first layers with the file's blocks, dropout and frozen bases (a docstring audit,
    2026-12-06; apply_miss and the bank loaders already undid theirs). Every write now has its
    undo: module types, values, flags, each layer's dropout and init_weights, and the record of
    what trains beside the blocks are as before, and a second load then succeeds."""
    from miss_ext import adapter_files, modules
    from miss_ext.model import EXTRAS_ATTR

    def net():  # a head with buffers too: their values are written and undone as the parameters
        return nn.Sequential(*_net(), nn.BatchNorm1d(4))

    source = miss_ext.apply_miss(net(), ["0", "2"], r=2, dropout=0.1, init_weights=False,
                                 modules_to_save=["3", "4"])
    with torch.no_grad():  # the file's head differs from the model's
        source[3].weight.add_(1.0)
        source[4].running_mean.add_(0.5)
    miss_ext.save_adapter(source, str(tmp_path))
    model = net() if into == "plain" else miss_ext.apply_miss(net(), ["0", "2"], r=2)
    settings = lambda: [(m.dropout, m.init_weights) for _, m in miss_ext.miss_layers(model)]  # noqa: E731
    before, record = (snapshot(model), settings()), getattr(model, EXTRAS_ATTR, None)
    calls = []

    def fail_on(n, error):
        def counted(real):
            def call(*args, **kwargs):
                calls.append(None)
                if len(calls) == n:
                    raise error
                return real(*args, **kwargs)
            return call
        return counted

    if failing == "block":  # the second new layer's block cannot be allocated
        monkeypatch.setattr(modules.torch, "zeros", fail_on(2, torch.OutOfMemoryError("simulated"))(torch.zeros))
    elif failing in ("copy", "head"):  # the second block's copy, or the head's (after both blocks)
        n = 2 if failing == "copy" else 3
        monkeypatch.setattr(adapter_files, "_copy_whole",
                            fail_on(n, torch.OutOfMemoryError("simulated"))(adapter_files._copy_whole))
    else:  # interrupted in the freeze, after every value was written
        monkeypatch.setattr(adapter_files, "keep_earlier_frozen",
                            fail_on(1, KeyboardInterrupt())(adapter_files.keep_earlier_frozen))
    with pytest.raises(KeyboardInterrupt if failing == "freeze" else torch.OutOfMemoryError):
        miss_ext.load_adapter(model, str(tmp_path))
    monkeypatch.undo()
    assert_unchanged(model, before[0])
    assert settings() == before[1] and getattr(model, EXTRAS_ATTR, None) == record
    miss_ext.load_adapter(model, str(tmp_path))
    x = torch.randn(3, 8)
    torch.testing.assert_close(model.eval()(x), source.eval()(x), rtol=0, atol=0)


def _interrupt_once(monkeypatch, owner, name, after=False):
    """Makes owner.<name> raise KeyboardInterrupt on its first call (after its work when `after`:
    an interrupt landing as it returns), then behave; returns the list its calls go into."""
    real, calls = getattr(owner, name), []

    def call(*args, **kwargs):
        calls.append(None)
        if len(calls) == 1 and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(owner, name, call)
    return calls


@pytest.mark.parametrize("mode", ["default", "bat"])
def test_an_interrupted_merge_or_unmerge_leaves_a_flag_that_says_what_the_weight_holds(monkeypatch, mode):
    """Ctrl-C during a large merge lands as the kernel returns, before the merged flag was set:
    the weight held W + dW while the layer said unmerged, so every forward added dW twice and a
    second merge added it again (unmerge: the adapter silently dropped). The flag now follows the
    weight (a fault-injection sweep, 2026-12-06); merge_and_unload then unmerges that layer too."""
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(8, 8), r=2, mode=mode, init_weights=False)
    with torch.no_grad():
        layer.miss_block.uniform_(-0.3, 0.3)
    x = torch.randn(3, 8)
    want = layer(x).detach()
    calls = _interrupt_once(monkeypatch, miss_ext.MissLinear, "_set_merged")
    with pytest.raises(KeyboardInterrupt):
        layer.merge()
    assert len(calls) == 2 and layer.merged  # the flag was set as it raised
    torch.testing.assert_close(layer(x), want)
    monkeypatch.undo()
    _interrupt_once(monkeypatch, miss_ext.MissLinear, "_set_merged")
    with pytest.raises(KeyboardInterrupt):
        layer.unmerge()
    monkeypatch.undo()
    assert not layer.merged
    torch.testing.assert_close(layer(x), want)

    model = _net()
    miss_ext.apply_miss(model, ["0", "2"], r=2, mode=mode, init_weights=False)
    weights = [model[i].base_layer.weight.detach().clone() for i in (0, 2)]
    _interrupt_once(monkeypatch, miss_ext.MissLinear, "_set_merged")
    with pytest.raises(KeyboardInterrupt):
        miss_ext.merge_and_unload(model)
    monkeypatch.undo()
    assert not model[0].merged and not model[2].merged
    for i, w in zip((0, 2), weights):
        torch.testing.assert_close(model[i].base_layer.weight, w)


@pytest.mark.parametrize("call, where", [("apply_miss", "set_module"), ("apply_miss", "record_extras"),
                                         ("load_adapter", "set_module"), ("load_adapter", "record_shared_weights")])
def test_an_interrupt_while_a_model_is_adapted_undoes_it(tmp_path, monkeypatch, call, where):
    """apply_miss swapped its layers in and froze the model with no way back, and load_adapter
    added an undo only after its write and recorded the shared weights outside its guard: a
    Ctrl-C there left half the layers swapped, other bases frozen or the file's blocks loaded
    while the call raised (a fault-injection sweep, 2026-12-06). Now every change is undone."""
    from miss_ext import adapter_files, model as model_module

    source = miss_ext.apply_miss(_net(), ["0", "2", "3"], r=2, init_weights=False)
    miss_ext.save_adapter(source, str(tmp_path))
    model = _net()
    if call == "load_adapter" and where == "record_shared_weights":
        miss_ext.apply_miss(model, ["0", "2", "3"], r=2)  # the blocks are overwritten, then undone
    settings = [(m.dropout, m.init_weights) for _, m in miss_ext.miss_layers(model)]
    before = snapshot(model)
    owner = model_module if call == "apply_miss" else adapter_files
    _interrupt_once(monkeypatch, owner, where, after=True)
    with pytest.raises(KeyboardInterrupt):
        if call == "apply_miss":
            miss_ext.apply_miss(model, ["0", "2", "3"], r=2, modules_to_save=["1"])
        else:
            miss_ext.load_adapter(model, str(tmp_path))
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert [(m.dropout, m.init_weights) for _, m in miss_ext.miss_layers(model)] == settings
    assert not hasattr(model, model_module.EXTRAS_ATTR)


def test_an_interrupted_bank_slot_change_puts_the_slot_back(monkeypatch):
    """MissBankLinear.remove_adapter zeroed the block before it freed the name: interrupted there,
    rows naming the adapter got the base output silently. add_adapter interrupted after it named
    the slot left that name in one layer of a bank model, whose layers then disagreed and every
    helper refused (a fault-injection sweep, 2026-12-06). The slot is put back on any failure."""
    from miss_ext.bank import MissBankLinear

    torch.manual_seed(0)
    model = miss_ext.apply_bank(_net(), ["0", "2"], capacity=3, max_r=2)
    slot = miss_ext.add_bank_adapter(model, "a", r=2)
    with torch.no_grad():
        for i in (0, 2):
            model[i].block("a").uniform_(-0.5, 0.5)
    x = torch.randn(4, 8)
    with miss_ext.mixed_batch(model, ["a"] * 4):
        want = model(x)
    before = snapshot(model)
    layer = model[0]
    _interrupt_once(monkeypatch, MissBankLinear, "_sync_slots")
    with pytest.raises(KeyboardInterrupt):
        layer.remove_adapter("a")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert layer.adapter_names[slot] == "a" and int(layer.ranks[slot]) == 2
    with miss_ext.mixed_batch(model, ["a"] * 4):
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)

    real, calls = MissBankLinear._sync_slots, []

    def second_layer_fails(self, *args, **kwargs):  # the second layer's add is interrupted
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    _interrupt_once(monkeypatch, MissBankLinear, "_sync_slots")
    with pytest.raises(KeyboardInterrupt):
        layer.add_absent("z")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert layer.adapter_names == ["a", None, None] and layer.absent == [False, False, False]

    monkeypatch.setattr(MissBankLinear, "_sync_slots", second_layer_fails)
    with pytest.raises(KeyboardInterrupt):
        miss_ext.add_bank_adapter(model, "b", r=1)
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert model[0].adapter_names == model[2].adapter_names == ["a", None, None]
    miss_ext.add_bank_adapter(model, "b", r=1)  # the layers agree: the retry succeeds
    assert model[0].adapter_names == model[2].adapter_names == ["a", "b", None]


def _bank_model(names, seed):
    """_net with bank layers at 0 and 2 holding adapters `names` (r 2 and 1), random blocks."""
    model = miss_ext.apply_bank(_net(), ["0", "2"], capacity=2, max_r=2)
    for name, r in zip(names, (2, 1)):
        miss_ext.add_bank_adapter(model, name, r=r)
    torch.manual_seed(seed)
    with torch.no_grad():
        for i in (0, 2):
            model[i].bank.uniform_(-0.5, 0.5)
    return model


def test_a_bank_whose_values_fail_to_load_keeps_its_slot_names():
    """torch's load_state_dict catches a copy that fails (out of memory, a device error), notes it
    and loads the rest: a bank layer took the file's slot names and ranks over its own blocks,
    so after the load raised, rows naming an adapter ran another adapter's block, silently (a
    fault-injection sweep, 2026-12-06). The slot description now stays with the blocks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    source, target = _bank_model(["c", "b"], 1), _bank_model(["a", "b"], 2)
    x = torch.randn(4, 8)
    with miss_ext.mixed_batch(target, ["a", "b", "a", None]):
        want = target(x)
    shape = target[0].bank.shape

    class BankCopyFails(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default and args[0].shape == shape:
                raise RuntimeError("simulated: the bank's copy failed")
            return func(*args, **(kwargs or {}))

    state = source.state_dict()
    with BankCopyFails(), pytest.raises(RuntimeError, match="the bank's copy failed"):
        target.load_state_dict(state)
    for i in (0, 2):
        assert target[i].adapter_names == ["a", "b"] and target[i].ranks.tolist() == [2, 1]
    with miss_ext.mixed_batch(target, ["a", "b", "a", None]):
        torch.testing.assert_close(target(x), want, rtol=0, atol=0)
    target.load_state_dict(state)  # without the failure: the file's adapters
    assert target[0].adapter_names == ["c", "b"]


def test_a_bank_load_interrupted_keeps_the_description_with_the_values(monkeypatch):
    """An interrupt during a bank layer's load: before torch copied the bank, the old slot
    description is put back; after it (torch sets the description last), the file's description
    loads too, so that it names what the bank holds (putting the old one back over the file's
    values was silently wrong: a review, 2026-12-06)."""
    from miss_ext.bank import MissBankLinear

    x, rows = torch.randn(4, 8), ["b", "b", None, "b"]

    def first_layer(model):  # the interrupted load stops at layer 0: layer 2 keeps its own slots
        return model[0](x, model[0].index_of(rows))

    source = _bank_model(["c", "b"], 1)
    from_file, state = first_layer(source), source.state_dict()
    for when in ("before the bank's copy", "after it"):
        target = _bank_model(["a", "b"], 2)
        own = first_layer(target)
        if when == "after it":
            _interrupt_once(monkeypatch, MissBankLinear, "set_extra_state")
        else:
            real = nn.Module._load_from_state_dict

            def interrupted(module, *args, **kwargs):
                if isinstance(module, MissBankLinear):
                    raise KeyboardInterrupt
                return real(module, *args, **kwargs)

            monkeypatch.setattr(nn.Module, "_load_from_state_dict", interrupted)
        with pytest.raises(KeyboardInterrupt):
            target.load_state_dict(state)
        monkeypatch.undo()
        assert target[0].adapter_names == (["a", "b"] if when == "before the bank's copy" else ["c", "b"]), when
        torch.testing.assert_close(first_layer(target), own if when == "before the bank's copy" else from_file,
                                   rtol=0, atol=0)


def test_a_rollback_goes_on_through_a_second_interrupt():
    """undo_each ran the undos after the first failure, but a second Ctrl-C during the rollback
    stopped it, leaving the rest undone; now every undo runs, then the interrupt is raised."""
    from miss_ext.model import undo_each

    done = []

    def interrupted():
        raise KeyboardInterrupt

    with pytest.warns(UserWarning, match=r"could not undo its changes to first \(KeyboardInterrupt\(\)\)"):
        with pytest.raises(KeyboardInterrupt):
            undo_each([("first", interrupted), ("second", lambda: done.append(True))], "a call")
    assert done == [True]


def test_the_settings_undos_put_back_the_shared_weight_records():
    """settings_undos (apply_miss, load_adapter) keeps each MissLinear's record of the other
    holders of its base weight, which a merge reads to refuse writing a tied weight."""
    from miss_ext.model import settings_undos

    model = miss_ext.apply_miss(_net(), ["0", "2"], r=2)
    model[0]._shared_with = ["tied.weight"]
    undos = settings_undos(model)
    model[0]._shared_with = []
    for _, undo in reversed(undos):
        undo()
    assert model[0]._shared_with == ["tied.weight"] and model[2]._shared_with == []


def test_an_unmerge_interrupted_in_its_records_still_marks_old_state_dicts(monkeypatch):
    """An interrupt inside _set_merged, after the flag and before the records of earlier
    state_dicts were marked: such a state_dict, taken while merged, then loaded as merged over the
    unmerged weight (dW dropped, silently: a review, 2026-12-06). The records are set again."""
    from miss_ext import merge_record

    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(8, 8), r=2, init_weights=False)
    x = torch.randn(3, 8)
    want = layer(x).detach()
    layer.merge()
    state = layer.state_dict()
    _interrupt_once(monkeypatch, merge_record, "changed")
    with pytest.raises(KeyboardInterrupt):
        layer.unmerge()
    monkeypatch.undo()
    assert not layer.merged
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), want)


def test_interrupts_as_a_layer_call_returns_are_undone_too(monkeypatch):
    """Two more windows between a write and its undo's record (a fault-injection sweep,
    2026-12-06): add_bank_adapter rolled back only the layers whose add had returned, so an
    interrupt as one returned left that layer holding the adapter (the layers then disagreed);
    merge_and_unload interrupted while it unloaded left some layers plain and others merged."""
    from miss_ext import model as model_module
    from miss_ext.bank import MissBankLinear

    model = miss_ext.apply_bank(_net(), ["0", "2"], capacity=2, max_r=2)
    miss_ext.add_bank_adapter(model, "a", r=2)
    _interrupt_once(monkeypatch, MissBankLinear, "add_adapter", after=True)
    with pytest.raises(KeyboardInterrupt):
        miss_ext.add_bank_adapter(model, "b", r=1)
    monkeypatch.undo()
    assert model[0].adapter_names == model[2].adapter_names == ["a", None]

    model = miss_ext.apply_miss(_net(), ["0", "2", "3"], r=2, init_weights=False)
    x = torch.randn(3, 8)
    want, before = model(x).detach(), snapshot(model)
    _interrupt_once(monkeypatch, model_module, "set_module", after=True)
    with pytest.raises(KeyboardInterrupt):
        miss_ext.merge_and_unload(model)
    monkeypatch.undo()
    types, state, flags, settings = before
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert module_settings(model) == settings
    assert not any(layer.merged for _, layer in miss_ext.miss_layers(model))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])  # the base weights up to the unmerge's rounding
    torch.testing.assert_close(model(x), want)


def test_a_mixed_batch_interrupted_while_it_enters_leaves_no_ids(monkeypatch):
    """mixed_batch set the layers' ids, then began the `try` whose `finally` clears them: an
    interrupt between the two, or during the `finally`, left every layer with ids, and the model
    refused every later mixed_batch ("already in a mixed batch") for good (a fault-injection
    sweep and a review, 2026-12-06). A refusal because another mixed batch runs still leaves that
    batch's ids alone."""
    from miss_ext import bank_model

    import inspect
    import sys

    model = _bank_model(["a", "b"], 0)
    x = torch.randn(2, 8)
    code, fired = bank_model.mixed_batch.__wrapped__.__code__, []
    source, first = inspect.getsourcelines(bank_model.mixed_batch.__wrapped__)
    ids_set = first + max(i for i, line in enumerate(source) if '"_stack_entry"] = stack_entry' in line)

    def in_mixed_batch(frame, event, arg):  # Ctrl-C at the first line after the loop that sets the ids
        if event == "line" and not fired and frame.f_lineno > ids_set:
            fired.append(frame.f_lineno)
            raise KeyboardInterrupt
        return in_mixed_batch

    sys.settrace(lambda frame, event, arg: in_mixed_batch if frame.f_code is code else None)
    try:
        with pytest.raises(KeyboardInterrupt):
            with miss_ext.mixed_batch(model, ["a", "b"]):
                pass
    finally:
        sys.settrace(None)
    assert fired and model[0].rows is None and model[2].rows is None, fired
    # An interrupt during the exit (here in the first hook's removal) clears every layer's ids too.
    from torch.utils.hooks import RemovableHandle

    _interrupt_once(monkeypatch, RemovableHandle, "remove")
    with pytest.warns(UserWarning, match=r"mixed_batch: could not undo"), pytest.raises(KeyboardInterrupt):
        with miss_ext.mixed_batch(model, ["a", "b"]):
            pass
    monkeypatch.undo()
    assert model[0].rows is None and model[2].rows is None
    with miss_ext.mixed_batch(model, ["a", "b"]):
        rows = model[0].rows
        with pytest.raises(RuntimeError, match="already in a mixed batch"):
            with miss_ext.mixed_batch(model, ["b", "a"]):
                pass
        assert model[0].rows is rows
        model(x)


def test_accelerate_warns_before_it_changes_any_class():
    """accelerate of a PeftModel's inner model warns that adapter_names= cannot reach it; under
    warnings.simplefilter("error") the warning came after every layer was swapped."""
    from peft import MissConfig, get_peft_model

    peft = get_peft_model(_net(), MissConfig(r=2, target_modules=["0", "2"]))
    inner = peft.base_model.model
    types = [type(m) for m in inner.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="not their PEFT tuner"):
            miss_ext.peft.accelerate(inner)
    assert [type(m) for m in inner.modules()] == types and not miss_ext.peft.is_accelerated(inner)


def test_an_allocation_error_keeps_its_type(monkeypatch):
    """torch.OutOfMemoryError stays itself (a caller's `except torch.OutOfMemoryError` still
    catches it), with the layer's size added to its message."""
    from miss_ext import modules

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(modules.torch, "zeros", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"MissLinear\(r=2, mode='default'\): cannot allocate .*"
                                                      r"Tried to allocate 2\.00 GiB"):
        miss_ext.MissLinear(nn.Linear(8, 8), r=2)


@pytest.mark.parametrize("values, summary", [
    ([1.0, 2.0], "no non-finite value"),
    ([1.0, float("inf")], "1 non-finite value(s) of 4, the first inf at [0, 1]"),
    ([float("nan"), float("-inf")], "3 non-finite value(s) of 4, the first nan at [0, 0]"),
])
def test_non_finite_summary_counts_and_places_the_first(values, summary):
    from miss_ext.modules import non_finite_summary

    t = torch.tensor([values, [3.0, float("nan") if values[0] != values[0] else 4.0]])
    assert non_finite_summary(t) == summary


def _meta_or_garbage(state, key, kind):
    state = dict(state)
    state[key] = torch.empty(state[key].shape, device="meta") if kind == "meta" else "not a tensor"
    return state


@pytest.mark.parametrize("kind", ["meta", "no_tensor"])
@pytest.mark.parametrize("layer", ["MissLinear", "peft", "bank"])
def test_a_layer_whose_tensor_cannot_load_loads_nothing(layer, kind):
    """load_state_dict with a tensor torch cannot copy (a meta tensor, not assign=True; a value that
    is no tensor) in a layer: torch skips that tensor with an error and loads the rest, and the
    layer's own part had already loaded: a merged flag on an unmerged weight (MissLinear, the
    accelerated PEFT layer), slots naming adapters whose blocks did not load (MissBankLinear). An
    atomicity review, 2026-12-03. The whole layer is refused, as for a size mismatch."""
    torch.manual_seed(0)
    if layer == "MissLinear":
        model = miss_ext.apply_miss(_net(), ["0", "2"], r=2, init_weights=False)
        source = miss_ext.apply_miss(_net(), ["0", "2"], r=2, init_weights=False)
        source[2].merge()
        state, key = source.state_dict(), "2.base_layer.weight"
        flag = lambda: model[2].merged  # noqa: E731
    elif layer == "peft":
        from peft import MissConfig, get_peft_model

        def build():
            return miss_ext.peft.accelerate(get_peft_model(_net(), MissConfig(r=2, target_modules=["0", "2"],
                                                                              init_weights=False)))
        model, source = build(), build()
        source.merge_adapter()
        state, key = source.state_dict(), "base_model.model.2.base_layer.weight"
        flag = lambda: model.base_model.model[2].merged_adapters  # noqa: E731
    else:
        model = miss_ext.apply_bank(_net(), ["0", "2"], capacity=2, max_r=2)
        source = miss_ext.apply_bank(_net(), ["0", "2"], capacity=2, max_r=2)
        miss_ext.add_bank_adapter(source, "x", r=2)
        state, key = source.state_dict(), "2.bank"
        flag = lambda: model[2].adapter_names  # noqa: E731
    before, snap = flag(), snapshot(model)
    # The accelerated PEFT model and a bank model check every layer before anything loads (nothing
    # of the model loads: AcceleratedMissModel._load_from_state_dict, bank_model's
    # _check_bank_loads_first); apply_miss models follow torch's per-module rule.
    refused = {"peft": r"nothing loaded:\n\tbase_model\.model\.2: base_layer\.weight",
               "bank": r"nothing of it loaded:\n\t2: bank: the state_dict"}.get(
                   layer, r"Nothing of this layer was loaded")
    with pytest.raises(RuntimeError, match=refused):
        model.load_state_dict(_meta_or_garbage(state, key, kind))
    assert flag() == before
    if layer in ("peft", "bank"):
        assert_unchanged(model, snap)
    types, values, flags, settings = snap
    now = model.state_dict()
    for name in values:  # the other layers loaded (torch's load is per module); this one did not
        if ".2." in f".{name}" or name.startswith("2."):
            assert torch.equal(now[name], values[name]), name
    now_settings = module_settings(model)
    for name in settings:
        if ".2." in f".{name}.":  # layer 2 and its children
            assert now_settings[name] == settings[name], name


def test_set_extra_state_names_a_description_that_is_no_json():
    bank = miss_ext.MissBankLinear(nn.Linear(4, 4), capacity=2, max_r=2)
    with pytest.raises(ValueError, match=r"MissBankLinear.set_extra_state: not a slot description"):
        bank.set_extra_state(torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_the_tuner_refuses_an_unknown_active_adapter():
    """PEFT's tuner (peft_model.base_model) took set_adapter("nope"); every layer then ran the base
    model alone, silently. PeftModel.set_adapter refuses; the accelerated tuner does too."""
    from peft import MissConfig, get_peft_model

    model = miss_ext.peft.accelerate(get_peft_model(_net(), MissConfig(r=2, target_modules=["0"])))
    for names in ("nope", ["default", "nope"]):
        with pytest.raises(ValueError, match=r"set_adapter: \['nope'\] name no adapter"):
            model.base_model.set_adapter(names)
        assert model.base_model.active_adapters == ["default"]
        assert model.base_model.model[0].active_adapters == ["default"]


def test_remove_bank_adapter_names_a_meta_layer():
    """A bank layer on the meta device partway through the model: torch's "Tensor.item() cannot be
    called on meta tensors" before; now a ValueError naming the layer, nothing changed."""
    model = miss_ext.apply_bank(_net(), ["0", "2", "3"], capacity=2, max_r=2)
    miss_ext.add_bank_adapter(model, "x", r=2)
    model[2].to_empty(device="meta")
    names = [list(model[i].adapter_names) for i in (0, 3)]
    with pytest.raises(ValueError, match=r"remove_bank_adapter: the bank layers 2 are on the meta device"):
        miss_ext.remove_bank_adapter(model, "x")
    assert [list(model[i].adapter_names) for i in (0, 3)] == names


@pytest.mark.parametrize("safe_merge", [True, False])
def test_a_merge_into_an_inference_tensor_outside_inference_mode_is_refused_before_any_write(safe_merge):
    """A model built (or loaded) under torch.inference_mode() holds inference tensors, which torch
    lets nothing write in place outside it, but a copy_ (safe_merge's) only refused after writing:
    the layer held W + dW marked unmerged, and every forward added the adapter term twice (1.2 off;
    a review, 2026-12-07). Refused up front now by MissLinear.merge, the accelerated PEFT layer's
    merge and merge_and_unload, nothing changed; under inference mode the merge works."""
    pytest.importorskip("peft")
    from peft import MissConfig, get_peft_model
    import miss_ext.peft

    torch.manual_seed(0)
    with torch.inference_mode():
        layer = miss_ext.MissLinear(nn.Linear(8, 8), r=2, init_weights=False)
        model = miss_ext.apply_miss(_net(), ["0"], r=2)
        peft = get_peft_model(nn.Sequential(nn.Linear(8, 8)), MissConfig(r=2, target_modules=["0"], init_weights=False))
        miss_ext.peft.accelerate(peft)
    calls = [(layer, lambda: layer.merge(safe_merge=safe_merge)),
             (model, lambda: miss_ext.merge_and_unload(model, safe_merge=safe_merge)),
             (peft, lambda: peft.merge_adapter(safe_merge=safe_merge))]
    for owner, call in calls:
        before = snapshot(owner)
        with pytest.raises(ValueError, match="inference tensor"):
            call()
        assert_unchanged(owner, before)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = layer(x)
        layer.merge(safe_merge=safe_merge)
        assert layer.merged
        torch.testing.assert_close(layer(x), expected)
