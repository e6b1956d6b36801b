"""The model functions given the wrong kind of model (a new-user review, 2026-12-03): something
that is no nn.Module raises TypeError naming the function (it was a bare AttributeError from
inside miss_ext); a PEFT model given to the functions that add or load miss_ext's own layers
raises TypeError and changes nothing (apply_miss put miss_ext layers inside the PeftModel, whose
saved file neither PEFT nor load_adapter could load); the "no layer" errors of the others point a
PEFT model to PEFT's own functions."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft
from conftest import assert_unchanged, snapshot

peft = pytest.importorskip("peft")
from packaging.version import Version  # noqa: E402

CALLS = {
    "apply_miss": lambda m, d: miss_ext.apply_miss(m, ["0"], r=2),
    "merge_and_unload": lambda m, d: miss_ext.merge_and_unload(m),
    "miss_layers": lambda m, d: miss_ext.miss_layers(m),
    "save_adapter": lambda m, d: miss_ext.save_adapter(m, str(d / "x")),
    "load_adapter": lambda m, d: miss_ext.load_adapter(m, str(d / "x")),
    "apply_bank": lambda m, d: miss_ext.apply_bank(m, ["0"], capacity=2, max_r=2),
    "load_bank": lambda m, d: miss_ext.load_bank(m, {"a": str(d / "x")}),
    "bank_adapter_names": lambda m, d: miss_ext.bank_adapter_names(m),
    "mixed_batch": lambda m, d: miss_ext.mixed_batch(m, ["a"]).__enter__(),
    "export_lora": lambda m, d: miss_ext.export_lora(m, str(d / "y")),
    "accelerate": lambda m, d: miss_ext.peft.accelerate(m),
    "is_accelerated": lambda m, d: miss_ext.peft.is_accelerated(m),
    "restore": lambda m, d: miss_ext.peft.restore(m),
}


@pytest.mark.parametrize("function", sorted(CALLS))
@pytest.mark.parametrize("model", ["model", None, [nn.Linear(2, 2)]], ids=["str", "None", "list"])
def test_a_model_that_is_no_module_is_refused_by_name(function, model, tmp_path):
    with pytest.raises(TypeError, match=rf"{function}: the model must be a torch.nn.Module, got "):
        CALLS[function](model, tmp_path)


def _peft_model():
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                                peft.MissConfig(r=2, target_modules=["0"]))
    miss_ext.peft.accelerate(model)
    return model


@pytest.mark.parametrize("function", ["apply_miss", "load_adapter", "apply_bank", "load_bank"])
def test_functions_adding_miss_ext_layers_refuse_a_peft_model_and_change_nothing(function, tmp_path):
    saved = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0"], r=2)
    miss_ext.save_adapter(saved, str(tmp_path / "x"))
    model = _peft_model()
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"{function}: the model holds PEFT's modules \(PeftModel at 'the top'\); "
                                        "miss_ext's model functions add and load miss_ext's own layers"):
        CALLS[function](model, tmp_path)
    assert_unchanged(model, before)
    # Also inside another module (a PEFT layer somewhere in the model).
    outer = nn.Sequential(copy.deepcopy(model.base_model.model))
    with pytest.raises(TypeError, match=r"AcceleratedMissLinear at '0.0'"):
        CALLS[function](outer, tmp_path)


def test_the_other_functions_point_a_peft_model_to_peft(tmp_path):
    model = _peft_model()
    hint = r"it is a PEFT model: PeftModel at 'the top'; use PEFT's own save_pretrained / merge_and_unload"
    with pytest.raises(ValueError, match=hint):
        miss_ext.save_adapter(model, str(tmp_path / "x"))
    with pytest.raises(ValueError, match=hint):
        miss_ext.bank_adapter_names(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert miss_ext.merge_and_unload(model) is model
    assert any("it is a PEFT model" in str(w.message) for w in caught)
    bank = miss_ext.apply_bank(nn.Sequential(nn.Linear(8, 8)), ["0"], capacity=2, max_r=2)
    with pytest.raises(ValueError, match="save_bank_adapter saves one of their adapters"):
        miss_ext.save_adapter(bank, str(tmp_path / "z"))


def test_restore_refuses_adapters_peft_would_compute_in_another_mode():
    """A layer with a default and a bat adapter, both merged: restored, PEFT's unmerge raised after
    emptying merged_adapters, the base weight lost (0.17 off); unmerged, PEFT would compute the
    bat adapter as a default one. Refused, nothing changed; one mode per layer restores."""
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.MissConfig(r=2, target_modules=["0"]),
                                adapter_name="a")
    model.add_adapter("b", peft.MissConfig(r=2, target_modules=["0"], init_weights="bat"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.normal_()
    miss_ext.peft.accelerate(model)
    if Version(peft.__version__) >= Version("0.22"):
        # PEFT 0.22 keeps each adapter's mode: restored merged, its unmerge and forward are right.
        x = torch.randn(3, 8)
        weight = model.base_model.model[0].base_layer.weight.detach().clone()
        model.base_model.set_adapter(["a", "b"])
        with torch.no_grad():
            want = model(x)
            model.base_model.merge_adapter(["a", "b"])
            assert not miss_ext.peft.is_accelerated(miss_ext.peft.restore(model))
            torch.testing.assert_close(model(x), want)
            model.base_model.unmerge_adapter()
            torch.testing.assert_close(model.base_model.model[0].base_layer.weight, weight)
            torch.testing.assert_close(model(x), want)
        return
    model.base_model.merge_adapter(["a", "b"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"restore: base_model.model.0: b is an adapter merged or active in another "
                                         "mode than the layer's first one"):
        miss_ext.peft.restore(model)
    assert_unchanged(model, before)
    assert miss_ext.peft.is_accelerated(model)
    model.base_model.unmerge_adapter()
    model.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match=r"restore: base_model.model.0: b is an adapter merged or active"):
        miss_ext.peft.restore(model)
    # Inactive and unmerged, it is restored as PEFT holds it; "a" runs there as accelerated.
    model.base_model.set_adapter("a")
    x = torch.randn(3, 8)
    want = model(x)
    assert not miss_ext.peft.is_accelerated(miss_ext.peft.restore(model))
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("function", ["save_adapter", "save_bank_adapter", "export_lora"])
@pytest.mark.parametrize("task_type", ["FOO", "causal_lm", 3])
def test_a_task_type_peft_would_refuse_at_load_is_refused_at_save(function, task_type, tmp_path):
    """Written as given, PEFT's from_pretrained then refused the folder ("Invalid task type")."""
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8)), ["0"], r=2)
    bank = miss_ext.apply_bank(nn.Sequential(nn.Linear(8, 8)), ["0"], capacity=2, max_r=2)
    miss_ext.add_bank_adapter(bank, "a", r=2)
    call = {"save_adapter": lambda: miss_ext.save_adapter(model, str(tmp_path / "x"), task_type=task_type),
            "save_bank_adapter": lambda: miss_ext.save_bank_adapter(bank, "a", str(tmp_path / "x"),
                                                                    task_type=task_type),
            "export_lora": lambda: miss_ext.export_lora(model, str(tmp_path / "x"), task_type=task_type)}[function]
    with pytest.raises(ValueError, match=rf"{function}: task_type must be None or one of PEFT's task types .* got"):
        call()
    assert not (tmp_path / "x").exists()
    miss_ext.save_adapter(model, str(tmp_path / "ok"), task_type="CAUSAL_LM")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ok")).task_type == "CAUSAL_LM"


def test_export_lora_names_a_bad_adapter_name(tmp_path):
    with pytest.raises(TypeError, match=r"export_lora: adapter_name must be the name of one adapter \(str\), got \["):
        miss_ext.export_lora(_peft_model(), str(tmp_path / "x"), adapter_name=["default"])


def test_safe_merge_refusals_say_which_values_are_not_finite():
    """"NaNs detected" named neither the value (an inf here) nor where it was."""
    layer = miss_ext.MissLinear(nn.Linear(4, 4), r=2)
    with torch.no_grad():
        layer.miss_block[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\) of 16, the first inf at \[2, 1\]"):
        layer.merge(safe_merge=True)
    model = miss_ext.apply_miss(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    with torch.no_grad():
        model[0].miss_block[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"merged weights of 0 \(2 non-finite value\(s\) of 16, the first nan at"):
        miss_ext.merge_and_unload(model, safe_merge=True)


def test_a_bank_adapter_name_that_is_no_str_is_named_as_such():
    bank = miss_ext.apply_bank(nn.Sequential(nn.Linear(8, 8)), ["0"], capacity=2, max_r=2)
    miss_ext.add_bank_adapter(bank, "s", r=2)
    with pytest.raises(TypeError, match=r"an adapter name is a str, got list \['s'\] \(the bank has \['s'\]\)"):
        miss_ext.remove_bank_adapter(bank, ["s"])


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 5), (3, 0)])
def test_lora_factors_refuses_a_block_it_cannot_factor(shape):
    """A (3, 7) block for out=20 gave B of shape (14, 3) silently; a bat block torch's repeat error
    (a docstring review, 2026-12-03)."""
    from miss_ext.lora import lora_factors

    with pytest.raises(ValueError, match=rf"lora_factors: .* got shape {re.escape(str(shape))}"):
        lora_factors(torch.ones(shape), 20, 20)
    a, b = lora_factors(torch.ones(3, 5), 20, 20)
    assert a.shape == (3, 20) and b.shape == (20, 3)


@pytest.mark.parametrize("call", ["apply_miss", "merge_and_unload", "load_adapter", "apply_bank", "MissLinear.merge"])
@pytest.mark.parametrize("value", ["False", None, 1])
def test_flags_that_are_not_bools_are_refused_and_change_nothing(call, value, tmp_path):
    """freeze_others / safe_merge given as a string, None or an int did what their truth value says:
    apply_miss(..., freeze_others="False") froze everything, merge_and_unload(model, safe_merge="no")
    ran a safe merge (a review, 2026-12-05). Now TypeError naming the flag, nothing changed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    if call in ("merge_and_unload", "load_adapter", "MissLinear.merge"):
        miss_ext.apply_miss(model, ["0"], r=2, init_weights=False)
        miss_ext.save_adapter(model, tmp_path / "adapter")
    before = snapshot(model)
    runs = {"apply_miss": (lambda: miss_ext.apply_miss(model, ["1"], r=2, freeze_others=value), "freeze_others"),
            "merge_and_unload": (lambda: miss_ext.merge_and_unload(model, safe_merge=value), "safe_merge"),
            "load_adapter": (lambda: miss_ext.load_adapter(model, tmp_path / "adapter", freeze_others=value),
                             "freeze_others"),
            "apply_bank": (lambda: miss_ext.apply_bank(model, ["1"], 2, 2, freeze_others=value), "freeze_others"),
            "MissLinear.merge": (lambda: model[0].merge(value), "safe_merge")}
    run, flag = runs[call]
    with pytest.raises(TypeError, match=rf"{flag} must be True or False, got {flag}={re.escape(repr(value))}"):
        run()
    assert_unchanged(model, before)


def test_all_linear_is_read_in_any_case_as_peft_reads_it():
    """PEFT compares "all-linear" case-insensitively; "ALL-LINEAR" was read as a regex here and
    matched no module (ValueError), also inside a config dict and in apply_bank (a review,
    2026-12-05). Every spelling now selects what "all-linear" selects."""
    from tiny_models import tiny_causal_lm

    base = tiny_causal_lm("llama")

    def adapted(**kwargs):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            miss_ext.apply_miss(model, **kwargs)
        return sorted(name for name, _ in miss_ext.miss_layers(model))

    expected = adapted(target_modules="all-linear", r=4)
    assert expected and "lm_head" not in expected
    for spelling in ("ALL-LINEAR", "All-Linear"):
        assert adapted(target_modules=spelling, r=4) == expected
        assert adapted(target_modules={"peft_type": "MISS", "r": 4, "target_modules": spelling}) == expected
        bank = miss_ext.apply_bank(copy.deepcopy(base), spelling, capacity=2, max_r=4)
        assert sorted(name for name, _ in miss_ext.bank_model.bank_layers(bank)) == expected


def test_save_options_and_adapter_names_are_checked(tmp_path):
    """save_adapter's is_main_process took any truthy value (0 or "" silently wrote nothing),
    base_model_name_or_path any value (an int, a NaN that strict JSON refuses), a bytes path
    created the folder before failing, and export_lora ignored an adapter_name on a model without
    PEFT (a review, 2026-12-05): each is refused now, nothing written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    miss_ext.apply_miss(model, ["0"], r=2, init_weights=False)
    target = tmp_path / "out"
    for kwargs, error, message in (
            (dict(is_main_process=0), TypeError, "is_main_process must be True or False, got is_main_process=0"),
            (dict(is_main_process="yes"), TypeError, "is_main_process must be True or False"),
            (dict(base_model_name_or_path=5), TypeError, "base_model_name_or_path must be None, a str or an os.PathLike"),
            (dict(base_model_name_or_path=float("nan")), TypeError, "got float nan")):
        with pytest.raises(error, match=re.escape(message)):
            miss_ext.save_adapter(model, str(target), **kwargs)
        assert not target.exists()
    with pytest.raises(TypeError, match=r"path must be a folder path \(str or os.PathLike of str\), got bytes"):
        miss_ext.save_adapter(model, bytes(target))
    assert not target.exists()
    with pytest.raises(TypeError, match="path must be a folder path"):
        miss_ext.load_adapter(copy.deepcopy(model), None)
    with pytest.raises(ValueError, match="adapter_name='other' names an adapter of a PEFT model"):
        miss_ext.export_lora(model, str(target), adapter_name="other")
    assert not target.exists()
    miss_ext.save_adapter(model, target, base_model_name_or_path=tmp_path, is_main_process=True)
    assert (target / "adapter_config.json").exists()


def test_save_bank_adapter_checks_its_save_options(tmp_path):
    """Catches the change (save_bank_adapter without check_save_arguments): is_main_process=0 silently
    wrote nothing, an int base_model_name_or_path went into the config; both are TypeError, as in
    save_adapter, nothing written."""
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.float64))
    miss_ext.apply_bank(model, ["0"], capacity=1, max_r=2)
    miss_ext.add_bank_adapter(model, "a", r=2)
    target = tmp_path / "out"
    for kwargs, message in ((dict(is_main_process=0), "is_main_process must be True or False"),
                            (dict(base_model_name_or_path=5), "base_model_name_or_path must be None, a str")):
        with pytest.raises(TypeError, match=message):
            miss_ext.save_bank_adapter(model, "a", str(target), **kwargs)
        assert not target.exists()


def test_numpy_numbers_are_taken_as_settings_as_peft_takes_them(tmp_path):
    """r / mini_r as NumPy integers and dropout as a NumPy float, as PEFT's MissConfig and
    get_peft_model take them: r=np.int64(8) raised "r must be an int" and dropout=np.float32(0.1)
    "dropout must be a float in [0, 1)" (a new-user pass, 2026-12-07). They are kept as Python
    numbers, which the saved configs and the slot descriptions hold as JSON."""
    import json

    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    base = nn.Linear(16, 12).double()
    layer = miss_ext.MissLinear(copy.deepcopy(base), np.int64(4), mode="mini", mini_r=np.int32(3),
                                dropout=np.float32(0.25))
    assert (type(layer.r), type(layer.mini_r), type(layer.dropout)) == (int, int, float)
    assert (layer.r, layer.mini_r, layer.dropout) == (4, 3, float(np.float32(0.25)))
    assert layer.miss_block.shape == (4, 3)
    with torch.no_grad():
        layer.miss_block.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    layer.dropout = np.float32(0.5)  # a later assignment too (the forward checks the rate it reads)
    layer.train()
    layer(x).sum().backward()
    assert layer.miss_block.grad is not None

    model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    config = peft.MissConfig(r=np.int64(4), target_modules=["0"], miss_dropout=np.float32(0.125))
    miss_ext.apply_miss(model, config)
    assert type(model[0].r) is int and model[0].dropout == 0.125
    miss_ext.save_adapter(model, str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["miss_dropout"] == 0.125

    bank_model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))
    miss_ext.apply_bank(bank_model, ["0"], capacity=2, max_r=np.int64(8))
    miss_ext.add_bank_adapter(bank_model, "b", r=np.int64(4), mode="mini", mini_r=np.int16(6), dropout=np.float32(0.5))
    assert bank_model[0].dropouts[0] == 0.5 and int(bank_model[0].ranks[0]) == 4
    bank_model.load_state_dict(bank_model.state_dict())  # the slot description (JSON) holds them
