"""Nested (jagged) inputs: torch.nested tensors of layout torch.jagged, (B, j, ..., in_features)
with one ragged dimension, reach an adapted layer as they reach nn.Linear (PEFT's MiSS forward
takes them too where in_features % r == 0). The layers run on the packed rows and wrap the result
again with the input's offsets (modules.jagged_forward); the miss ops themselves take strided
tensors only. Checked against the float64 reference one sequence at a time, and against PEFT."""
import copy
import warnings

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext.bank import MissBankLinear
from conftest import DEVICES
from reference import F64, bat_weight_ref, linear_ref

IN, OUT = 16, 12
CASES = [("default", 4, 1), ("default", 5, 1), ("default", 20, 1), ("mini", 4, 3), ("bat", 4, 1)]
CASE_IDS = ["default", "remainder", "r_above_in", "mini", "bat"]


def jagged(rows, requires_grad=False, width=IN, extra=(), device="cpu"):
    """A (len(rows), j, *extra, width) float64 jagged tensor of random non-zero values."""
    parts = [torch.randn(n, *extra, width, dtype=F64, device=device) for n in rows]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=requires_grad), parts


def layer(mode, r, mini_r, out=OUT, device="cpu"):
    kwargs = {"mode": mode, "mini_r": mini_r} if mode == "mini" else {"mode": mode}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > in_features warns at construction
        m = miss_ext.MissLinear(nn.Linear(IN, out, dtype=F64, device=device), r=r, **kwargs)
    with torch.no_grad():
        m.miss_block.normal_()
    return m


def reference(m, x):
    """The layer's result for the rows x (.., in) in float64, from the spec (reference.py)."""
    w, b = m.base_layer.weight, m.base_layer.bias
    if m.mode == "bat":
        return x @ bat_weight_ref(w, m.miss_block).t() + b
    block = m.miss_block if m.mode != "mini" else m.miss_block.repeat(1, m.out_features // m.mini_r)
    return linear_ref(x, w, b, block)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,r,mini_r", CASES, ids=CASE_IDS)
def test_miss_linear_on_jagged_rows_matches_the_reference_values_and_gradients(mode, r, mini_r, device):
    m = layer(mode, r, mini_r, device=device)
    x, parts = jagged([3, 1, 6], requires_grad=True, device=device)
    y = m(x)
    assert y.is_nested and y.layout == torch.jagged and y.shape[0] == 3 and y.shape[-1] == OUT
    for got, part in zip(y.unbind(), parts):
        torch.testing.assert_close(got, reference(m, part), rtol=1e-12, atol=1e-12)
    # Gradients: the block's from every row, x's per row; against the reference on the same rows.
    g = torch.randn_like(y.values())
    y.values().backward(g)
    rows = torch.cat(parts).requires_grad_()
    block = m.miss_block.detach().clone().requires_grad_()
    ref = copy.deepcopy(m)
    ref.miss_block = nn.Parameter(block)
    reference(ref, rows).backward(g)
    torch.testing.assert_close(m.miss_block.grad, ref.miss_block.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.values(), rows.grad, rtol=1e-12, atol=1e-12)


def test_the_result_keeps_the_inputs_ragged_dimension_and_layout():
    m = layer("default", 4, 1, out=IN)
    x, parts = jagged([2, 5])
    y = m(x) + x  # a residual: the same ragged dimension, or torch refuses the sum
    for got, part in zip(y.unbind(), parts):
        torch.testing.assert_close(got, reference(m, part) + part, rtol=1e-12, atol=1e-12)
    # Ragged dimension not next to the batch: (B, heads, j, in), from a transpose.
    x4, parts4 = jagged([2, 5], extra=(3,))
    y4 = m(x4.transpose(1, 2))
    assert y4.shape[1] == 3 and y4.shape[-1] == IN
    for got, part in zip(y4.unbind(), parts4):
        torch.testing.assert_close(got, reference(m, part).transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_a_non_contiguous_jagged_input_holes_and_all():
    # Offsets with lengths: rows between sequences belong to none and never reach the result.
    values = torch.randn(10, IN, dtype=F64)
    x = torch.nested.nested_tensor_from_jagged(values, torch.tensor([0, 4, 10]), lengths=torch.tensor([2, 3]))
    m = layer("mini", 4, 3)
    for got, part in zip(m(x).unbind(), x.unbind()):
        torch.testing.assert_close(got, reference(m, part), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["default", "mini", "bat"])
def test_accelerated_peft_layer_takes_jagged_input_as_peft_does(mode):
    from peft import MissConfig, get_peft_model

    import miss_ext.peft

    kwargs = dict(target_modules=["0"], r=4, init_weights={"default": True, "mini": "mini", "bat": "bat"}[mode])
    if mode == "mini":
        kwargs["mini_r"] = 3
    peft_model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT, dtype=F64)), MissConfig(**kwargs))
    with torch.no_grad():
        peft_model.base_model.model[0].miss_block["default"].normal_()
    accelerated = miss_ext.peft.accelerate(copy.deepcopy(peft_model))
    x, parts = jagged([3, 5], requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(accelerated(x).values(), peft_model(x).values(), rtol=1e-12, atol=1e-12)
    # Gradients (PEFT's jagged forward has no backward: torch lacks the jagged sum's): the block's
    # against PEFT's on the same rows as one dense sequence, x's against that sequence's.
    y = accelerated(x)
    g = torch.randn_like(y.values())
    y.values().backward(g)
    rows = torch.cat(parts).unsqueeze(0).requires_grad_()
    peft_model(rows).backward(g.unsqueeze(0))
    block = lambda model: model.base_model.model[0].miss_block["default"].grad  # noqa: E731
    torch.testing.assert_close(block(accelerated), block(peft_model), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad.values(), rows.grad[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layer_on_jagged_input_matches_eager(device, dynamo_reset):
    m = layer("default", 4, 1, out=IN, device=device)
    x, _ = jagged([3, 5], device=device)

    def step(t):
        return m(t) + t

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x).values(), step(x).values(), rtol=0, atol=0)


def test_nested_inputs_the_layers_cannot_take_are_refused_by_name():
    m = layer("default", 4, 1)
    strided = torch.nested.nested_tensor([torch.randn(2, IN, dtype=F64), torch.randn(3, IN, dtype=F64)])
    with pytest.raises(TypeError, match="layout torch.strided"):
        m(strided)
    x, _ = jagged([2, 3])
    with pytest.raises(ValueError, match="last dimension .* is ragged"):
        m(x.transpose(1, 2))
    bank = MissBankLinear(nn.Linear(IN, OUT, dtype=F64), capacity=2, max_r=4)
    bank.add_adapter("a", r=4)
    with pytest.raises(TypeError, match="MissBankLinear: a nested tensor"):
        bank(x, torch.tensor([0, 0]))


def test_per_sequence_adapter_names_with_a_jagged_input_are_refused():
    from peft import MissConfig, get_peft_model

    import miss_ext.peft

    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT, dtype=F64)), MissConfig(target_modules=["0"], r=4))
    model.add_adapter("b", MissConfig(target_modules=["0"], r=4))
    model = miss_ext.peft.accelerate(model)
    x, _ = jagged([2, 3])
    with pytest.raises(TypeError, match="adapter_names=: a nested tensor"):
        model.base_model.model[0](x, adapter_names=["default", "b"])
    with pytest.raises(TypeError, match="nested tensor"):
        model(x, adapter_names=["default", "b"])


def test_one_name_for_every_row_and_disabled_adapters_take_a_jagged_input():
    """Per-sequence names are refused with a jagged input, but one name for every row (what a
    layer of a regrouping model gets inside a call with adapter_names=, peft._EveryRow) routes the
    packed rows, and with adapters disabled the names route nothing (the base output). A
    mutation audit (2026-12-03) found neither path tested."""
    from peft import MissConfig, get_peft_model

    import miss_ext.peft
    from miss_ext.peft import _EveryRow

    model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT, dtype=F64)),
                           MissConfig(target_modules=["0"], r=4, init_weights=False))
    model.add_adapter("b", MissConfig(target_modules=["0"], r=4, init_weights=False))
    model = miss_ext.peft.accelerate(model)
    layer = model.base_model.model[0]
    x, parts = jagged([2, 3])
    rows = torch.cat(parts)
    with torch.no_grad():
        model.base_model.set_adapter("b")
        want_b = layer(rows)
        model.base_model.set_adapter("default")  # the names, not the active adapter, pick "b"
        got = layer(x, adapter_names=_EveryRow(["b"]))
        torch.testing.assert_close(got.values(), want_b, rtol=1e-12, atol=1e-12)
        assert (want_b - layer.base_layer(rows)).abs().max() > 1e-3  # the adapter changes the rows
        with model.disable_adapter():
            torch.testing.assert_close(layer(x, adapter_names=["default", "b"]).values(), layer.base_layer(rows),
                                       rtol=0, atol=0)
