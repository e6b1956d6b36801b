"""Merges, unmerges, state_dict records and adapter_names= calls across Python threads (README,
"The ops", threads; a concurrency hunt, 2026-12-07). Each test opens the race window on purpose:
the first thread is held at a point inside its call (a function it calls is wrapped to wait),
the second thread runs its call meanwhile, then the first goes on. On the code before the fix
each test fails deterministically; with it, the second call waits for the first (one lock) or
keeps out of it.
"""
import contextlib
import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import merge_record, merged_block

F64 = torch.float64
WAIT_S = 10.0  # a deadlock fails the test instead of hanging it
OVERLAP_S = 0.3  # how long the second thread gets to run inside the first one's window


class HeldAtFirstCall:
    """Wraps `owner.name` (via monkeypatch): its first call signals `entered`, waits for
    `release`, then runs the original; later calls run the original at once."""

    def __init__(self, monkeypatch, owner, name):
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0
        original = getattr(owner, name)

        def held(*args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                self.entered.set()
                assert self.release.wait(WAIT_S), "never released"
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, held)


def race(first, second, hold):
    """Runs `first` in a thread until it is held, `second` in another thread for OVERLAP_S (or
    until it finishes), then releases the first; returns their errors (None where none)."""
    errors = [None, None]

    def run(i, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[i] = e

    a = threading.Thread(target=run, args=(0, first))
    b = threading.Thread(target=run, args=(1, second))
    a.start()
    assert hold.entered.wait(WAIT_S), "the first call never reached the held point"
    b.start()
    b.join(OVERLAP_S)
    hold.release.set()
    a.join(WAIT_S)
    b.join(WAIT_S)
    assert not a.is_alive() and not b.is_alive(), "deadlock"
    return errors


def miss_layer():
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(16, 12, dtype=F64), r=4)
    with torch.no_grad():
        layer.miss_block.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("step", ["merge", "unmerge"])
def test_two_threads_merging_one_miss_linear_change_the_weight_once(monkeypatch, step):
    """Both threads passed the "merged?" check before either wrote: W + 2 dW marked merged (or
    W - dW marked unmerged), silently. Now the second waits, then warns that nothing is to do."""
    layer = miss_layer()
    x = torch.randn(5, 16, dtype=F64)
    with torch.no_grad():
        want = layer(x)
        if step == "unmerge":
            layer.merge()
        base = layer.base_layer.weight.detach().clone()
    hold = HeldAtFirstCall(monkeypatch, merged_block, "fingerprint") if step == "merge" else \
        HeldAtFirstCall(monkeypatch, layer, "block_changed_since_merge")
    call = getattr(layer, step)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        errors = race(call, call, hold)
    assert errors == [None, None], errors
    assert layer.merged == (step == "merge")
    assert any("nothing to do" in str(w.message) for w in seen), [str(w.message) for w in seen]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
        dw = layer.delta_weight()
        expected = base + dw if step == "merge" else base - dw
        torch.testing.assert_close(layer.base_layer.weight, expected, rtol=1e-12, atol=1e-12)


def peft_model(adapters=("default", "b")):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, dtype=F64), nn.Tanh(), nn.Linear(16, 16, dtype=F64))
    model = peft.get_peft_model(base, peft.MissConfig(r=4, target_modules=["0", "2"], init_weights=False))
    for name in adapters[1:]:
        model.add_adapter(name, peft.MissConfig(r=2, target_modules=["0", "2"], init_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "miss_block" in n:
                p.normal_(0, 0.3)
    from miss_ext.peft import accelerate
    accelerate(model)
    return model.eval()


@pytest.mark.parametrize("kind,change", [("miss_linear", "unmerge"), ("miss_linear", "load"),
                                         ("accelerated_peft", "unmerge")])
def test_a_state_dict_taken_while_another_thread_unmerges_loads_right(monkeypatch, kind, change):
    """state_dict() wrote the merge record (MissLinear's "merged", the accelerated layer's
    "merged_adapters"), then another thread's unmerge (or load of an unmerged checkpoint) ran
    before the record was followed (merge_record.follow): nothing marked it stale, and the
    state_dict, loaded, read the unmerged weight as merged (dW dropped, silently). Now the
    change waits for the state_dict, then marks its record: the load takes what the weight holds."""
    x = torch.randn(3, 16, dtype=F64)
    if kind == "miss_linear":
        model = miss_layer()
        merge, unmerge = model.merge, model.unmerge
    else:
        model = peft_model(("default",))
        merge, unmerge = model.merge_adapter, model.unmerge_adapter
    with torch.no_grad():
        want = model(x)
    fresh = copy.deepcopy(model)
    if change == "load":
        unmerged = {k: v.clone() for k, v in model.state_dict().items()}
        unmerge = lambda: model.load_state_dict(unmerged)  # noqa: E731
    merge()
    hold = HeldAtFirstCall(monkeypatch, merge_record, "follow")
    out = {}
    errors = race(lambda: out.setdefault("sd", model.state_dict()), unmerge, hold)
    assert errors == [None, None], errors
    fresh.load_state_dict(out["sd"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-12, atol=1e-12)


def test_calls_in_another_thread_before_a_names_call_starts_keep_out_of_it(monkeypatch):
    """Between an adapter_names= call's hook registration and its record (_model_call), another
    thread's plain PeftModel call ran with the call's names (adapter "b" instead of its active
    "default"), and a direct call of the base model too, where it must raise RuntimeError. Now
    hooks running before the record are no part of the call."""
    import miss_ext.peft as mp

    model = peft_model()
    inner = model.get_base_model()
    x = torch.randn(4, 16, dtype=F64)
    with torch.no_grad():
        want_plain, want_b = model(x), model(x, adapter_names=["b"] * 4)
    assert (want_plain - want_b).abs().max() > 0.1  # the two adapters differ
    original, entered, release = mp._model_call, threading.Event(), threading.Event()

    @contextlib.contextmanager
    def held_model_call(owner, names):
        if names is not None:  # the names call, hooks registered, its record not yet made
            entered.set()
            assert release.wait(WAIT_S)
        with original(owner, names) as record:
            yield record

    monkeypatch.setattr(mp, "_model_call", held_model_call)
    out, errors = {}, []

    def names_call():
        try:
            with torch.no_grad():
                out["names"] = model(x, adapter_names=["b"] * 4)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=names_call)
    thread.start()
    try:
        assert entered.wait(WAIT_S)
        with torch.no_grad():
            plain = model(x)
            with pytest.raises(RuntimeError):
                inner(x)
    finally:
        release.set()
        thread.join(WAIT_S)
    assert not errors, errors
    torch.testing.assert_close(plain, want_plain, rtol=0, atol=0)
    torch.testing.assert_close(out["names"], want_b, rtol=0, atol=0)
