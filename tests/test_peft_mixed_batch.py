"""PEFT's `adapter_names=` on an accelerated PEFT MiSS model (issue 14): one batch, one adapter per
sequence, in forward, generate (greedy and beam search), direct layer calls and training.

Reference: PEFT itself, one single-adapter PEFT model per adapter (PEFT 0.21 ignores
adapter_names for MiSS, and cannot mix modes on one layer), run on that adapter's rows only; the
base model for "__base__". The adapters mix modes (default, mini), ranks that divide the largest
(4 | 8) and one that does not (3), and target different modules, so some layers
lack some adapters (their rows get that layer's base output). Per-adapter dropout in training is
checked against a float64 reference with the masks our ops draw (PEFT's are nn.Dropout's).
"""
import copy
import threading

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import MissConfig, get_peft_model  # noqa: E402

import miss_ext.peft  # noqa: E402
from conftest import DEVICES, Recompute, assert_unchanged, checkpointed_net, snapshot  # noqa: E402
from reference import F64, mixed_dropout_ref  # noqa: E402
from tiny_models import (TARGETS, cross_device_tol, mixed_peft_models, no_eos, tiny_causal_lm, tiny_fsmt,  # noqa: E402
                         tokens)

TOL = dict(rtol=1e-9, atol=1e-10)
CONFIGS = {
    "a": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "b": dict(r=8, mini_r=4, target_modules=["q_proj", "up_proj"], init_weights="mini"),
    "c": dict(r=3, target_modules=["q_proj", "o_proj"], init_weights=False),
}
NAMES = ["a", "__base__", "b", "c", "a", "b"]


def build(dtype=torch.float64, dropout=0.0):
    """(accelerated PEFT model with adapters CONFIGS, {name: single-adapter PEFT model}); dropout:
    miss_dropout of "a" (the others 0), or {name: miss_dropout}."""
    return mixed_peft_models(no_eos(tiny_causal_lm("llama", dtype=dtype)), CONFIGS,
                             dropout if isinstance(dropout, dict) else {"a": dropout})


@pytest.fixture(scope="module")
def models():
    return build()


def test_forward_each_row_equals_its_adapter_alone(models):
    model, singles = models
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        got = model(ids, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(got[i], singles[name](ids[i:i + 1]).logits[0], **TOL)
        # The active adapter is untouched by the keyword, and a single-name batch equals set_adapter.
        assert model.active_adapters == ["a"]
        torch.testing.assert_close(model(ids, adapter_names=["a"] * len(NAMES)).logits, model(ids).logits, **TOL)


def test_a_compiled_model_follows_each_calls_names(models, dynamo_reset):
    """torch.compile of the model (no fullgraph: the per-call hooks break the graph at the PEFT
    wrapper): names, then none, then other names. Dynamo does not guard on module hooks, so the
    graph traced for the plain call ran the last call, every row with the active adapter (0.51
    off on a tiny Llama; a review of 2026-12-03). The layers read a flag it guards on."""
    model, singles = models
    ids = tokens(len(NAMES), 7, seed=5)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        want = {name: singles[name](ids).logits for name in set(NAMES)}
        for names in (["a"] * len(NAMES), None, list(reversed(NAMES)), None, NAMES):
            got = compiled(ids, **({} if names is None else {"adapter_names": names})).logits
            for i, name in enumerate(names or ["a"] * len(NAMES)):
                torch.testing.assert_close(got[i], want[name][i], **TOL)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_each_row_equals_its_adapter_alone(models, num_beams):
    model, singles = models
    ids = tokens(len(NAMES), 5, seed=4)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
        for i, name in enumerate(NAMES):
            assert torch.equal(got[i], singles[name].generate(input_ids=ids[i:i + 1], **kwargs)[0]), name
        # num_return_sequences repeats each sequence too
        got = model.generate(input_ids=ids[:3], adapter_names=NAMES[:3], max_new_tokens=4, do_sample=False,
                             num_beams=2, num_return_sequences=2)
        assert got.shape[0] == 6
        for i, name in enumerate(NAMES[:3]):
            ref = singles[name].generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False, num_beams=2,
                                         num_return_sequences=2)
            assert torch.equal(got[2 * i:2 * i + 2], ref), name


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_on_each_device(device):
    """Forward and backward of a mixed batch on the device (CUDA: the bank_add CUDA kernels)
    equal the CPU run, float64."""
    grads = {}
    for where in ("cpu", device):
        model, _ = build()
        model.to(where).train()
        for key, p in model.named_parameters():
            p.requires_grad_("miss_block" in key)
        ids = tokens(len(NAMES), 6, seed=5).to(where)
        loss = model(ids, adapter_names=NAMES).logits.pow(2).mean()
        loss.backward()
        grads[where] = (loss.detach().cpu(),
                        {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[device][0], grads["cpu"][0], **cross_device_tol(grads["cpu"][0], device, TOL))
    assert grads[device][1].keys() == grads["cpu"][1].keys()
    for key, grad in grads["cpu"][1].items():
        torch.testing.assert_close(grads[device][1][key], grad, **cross_device_tol(grad, device, TOL))


def test_layer_call_with_adapter_names(models):
    """A direct layer call, 2-D and 3-D inputs; a layer that lacks an adapter gives its rows the base."""
    model, singles = models
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # has "b" only
    x = torch.randn(4, 3, layer.in_features, dtype=torch.float64)
    names = ["b", "a", "__base__", "b"]
    with torch.no_grad():
        got = layer(x, adapter_names=names)
        single_b = singles["b"].base_model.model.model.layers[0].mlp.up_proj
        base = layer.base_layer
        for i, name in enumerate(names):
            torch.testing.assert_close(got[i], (single_b if name == "b" else base)(x[i]), **TOL)
        torch.testing.assert_close(layer(x[:, 0], adapter_names=names), got[:, 0], **TOL)
        assert layer(x[:0], adapter_names=[]).shape == (0, 3, layer.out_features)


def test_training_gradients_reach_each_adapter_from_its_rows_only():
    model, singles = build()
    model.train()
    for key, p in model.named_parameters():  # PEFT trains only the active adapter by default
        p.requires_grad_("miss_block" in key)
    ids = tokens(len(NAMES), 6, seed=5)
    loss = model(ids, adapter_names=NAMES).logits.pow(2).mean(dim=(1, 2)).sum()
    loss.backward()
    for name in CONFIGS:
        single = singles[name].train()
        rows = [i for i, n in enumerate(NAMES) if n == name]
        single(ids[rows]).logits.pow(2).mean(dim=(1, 2)).sum().backward()
        want = {k: p.grad for k, p in single.named_parameters() if k.endswith(f"miss_block.{name}")}
        got = {k: p.grad for k, p in model.named_parameters() if k.endswith(f"miss_block.{name}")}
        assert want.keys() == got.keys() and want
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL)


def test_dropout_applies_to_its_adapter_rows_only():
    model, _ = build(dropout=0.5)
    ids = tokens(len(NAMES), 6, seed=6)
    with torch.no_grad():
        eval_out = model.eval()(ids, adapter_names=NAMES).logits
        train_out = model.train()(ids, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        if name == "a":
            assert not torch.allclose(train_out[i], eval_out[i])
        else:
            torch.testing.assert_close(train_out[i], eval_out[i], **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_per_adapter_matches_the_float64_reference(device):
    """A layer holding a (r=4, p=0.5), b (r=8 mini, p=0.25) and c (r=3, no dropout), called with
    adapter_names= in training: every row's output, x's gradient and each adapter's block gradient
    equal an independent float64 reference that runs the row with its own adapter and its own mask
    (tests/reference.py: linear_ref; the mask from recover_mask with the key of the row's fold
    group). The layer draws one key per group with p > 0, in sorted (fold rank, p) order (here not
    the order of first use), from torch's generator, so reseeding gives the same keys here."""
    dropouts = {"a": 0.5, "b": 0.25}
    model, _ = build(dropout=dropouts)
    model.to(device).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert sorted(layer.miss_block) == ["a", "b", "c"]
    for name in layer.miss_block:
        layer.miss_block[name].requires_grad_(True)
    names = ["a", "__base__", "b", "c", "a", "b"]
    seq = 3
    x = torch.randn(len(names), seq, layer.in_features, dtype=F64, device=device, requires_grad=True)
    g = torch.randn(len(names), seq, layer.out_features, dtype=F64, device=device)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    y = layer(x, adapter_names=names)
    (y * g).sum().backward()

    rows = len(names) * seq  # the mask's rows are x's flattened leading index
    row_names = [None if names[t // seq] == "__base__" else names[t // seq] for t in range(rows)]
    want, xr, refs, masks, group_of = mixed_dropout_ref(x.reshape(rows, -1), layer.base_layer.weight, layer.base_layer.bias,
                                                        dict(layer.miss_block), row_names, dropouts, seed)
    for group, mask in masks.items():  # each rate really drops some of its rows' inputs, not all
        own = [t for t in range(rows) if group_of.get(row_names[t]) == group]
        assert 0 < mask[own].sum() < mask[own].numel(), group
    torch.testing.assert_close(y.reshape(rows, -1), want, **TOL)
    grads = torch.autograd.grad(want, [xr] + list(refs.values()), g.reshape(rows, -1))
    torch.testing.assert_close(x.grad.reshape(rows, -1), grads[0], **TOL)
    for name, grad in zip(refs, grads[1:]):
        torch.testing.assert_close(layer.miss_block[name].grad, grad, **TOL)


def test_bf16_model_matches_peft_per_adapter():
    model, singles = build(dtype=torch.bfloat16)
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        got = model(ids, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(got[i].float(), singles[name](ids[i:i + 1]).logits[0].float(),
                                       rtol=2e-2, atol=2e-2)


def test_disabled_adapters_give_the_base_model(models):
    model, singles = models
    ids = tokens(3, 5)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids, adapter_names=["a", "b", "c"]).logits, singles["__base__"](ids).logits,
                                   **TOL)


def test_refusals_name_the_problem():
    model, _ = build()
    ids = tokens(2, 4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"no layer has: \['typo'\]"):
        model(ids, adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the input has 2 sequences"):
        model(ids, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(ids, adapter_names="a")
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        model(ids, adapter_names=["a", 3])
    # beam search without the keyword at model level (names not repeated) is caught per layer
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="adapter_names has 1 entry but the input has 2"):
        layer(torch.randn(2, 3, layer.in_features, dtype=torch.float64), adapter_names=["a"])
    # a batch the model repeated inside (Janus's classifier-free guidance doubles it): told to use
    # one adapter for such calls, not to give one name per sequence
    with pytest.raises(ValueError, match=r"input has 4 sequences.*repeats its batch inside.*one adapter"):
        layer(torch.randn(4, 3, layer.in_features, dtype=torch.float64), adapter_names=["a", "b"])
    # a layer fed flattened tokens (OPT's fc1/fc2): told why, as MissBankLinear tells it
    with pytest.raises(ValueError, match=r"input has 6 sequences.*flattens its tokens.*leave that layer out"):
        layer(torch.randn(6, layer.in_features, dtype=torch.float64), adapter_names=["a", "b"])
    assert_unchanged(model, snap)
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(ids, adapter_names=["a", "b"])


def test_bat_adapters_in_a_mixed_batch_are_refused_by_name():
    """Issue 14: a bat adapter changes the base weight itself, so rows of different adapters cannot
    share one base GEMM. A batch whose adapter_names name bat adapters is refused with a TypeError
    naming exactly those (at model level and in a direct layer call), and nothing changes: the
    parameters, the active adapter and later calls are as before. A batch that does not name
    them still runs, each row with its own adapter."""
    base = no_eos(tiny_causal_lm("llama"))
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["q_proj"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights="bat"))
    model.add_adapter("c", MissConfig(r=4, target_modules=["q_proj"], init_weights="bat"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "miss_block" in key:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    miss_ext.peft.accelerate(model).eval()
    ids = tokens(3, 4)
    with torch.no_grad():
        with_a = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    snap = snapshot(model)
    for names, bats in ((["a", "b", "__base__"], r"\['b'\]"), (["c", "a", "b"], r"\['c', 'b'\]")):
        with torch.no_grad(), pytest.raises(TypeError, match=r"adapter_names uses bat adapter\(s\) " + bats):
            model(ids, adapter_names=names)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj  # has "b" only
    with torch.no_grad(), pytest.raises(TypeError, match=r"bat adapter\(s\) \['b'\]"):
        layer(torch.randn(2, 3, layer.in_features, dtype=torch.float64), adapter_names=["__base__", "b"])
    assert_unchanged(model, snap)
    assert model.active_adapters == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_a, rtol=0, atol=0)
        got = model(ids, adapter_names=["a", "__base__", "a"]).logits
    for i, want in enumerate((with_a, plain, with_a)):
        torch.testing.assert_close(got[i], want[i], **TOL)


def test_modules_to_save_follow_each_row():
    """PEFT's modules_to_save wrapper takes adapter_names too (its own mixed-batch forward): each
    row uses its adapter's copy of lm_head as well as its blocks."""
    base = no_eos(tiny_causal_lm("llama"))
    configs = {name: dict(r=4, target_modules=["q_proj"], init_weights=False, modules_to_save=["lm_head"])
               for name in ("a", "b")}
    model, singles = mixed_peft_models(base, configs, seed=1)
    ids = tokens(3, 5)
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        got = model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            want = (base if name == "__base__" else singles[name])(ids[i:i + 1]).logits[0]
            torch.testing.assert_close(got[i], want, **TOL)


def test_gradient_checkpointing_in_training_is_refused():
    """Checkpointing recomputes the layers inside backward(), after the hooks that carry the names
    are gone: those rows would silently use the active adapter. Refused; eval and no_grad work."""
    model, singles = build()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = tokens(len(NAMES), 5)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids, adapter_names=NAMES)
    model.eval()
    with torch.no_grad():
        got = model(ids, adapter_names=NAMES).logits
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            torch.testing.assert_close(got[i], singles[name](ids[i:i + 1]).logits[0], **TOL)


def test_generate_follows_the_models_own_num_beams(models):
    """A checkpoint whose generation_config sets num_beams > 1: generate() repeats each sequence
    without a num_beams keyword, and the names are repeated with it."""
    model, singles = models
    config = model.base_model.model.generation_config
    ids = tokens(3, 5, seed=8)
    config.num_beams = 2
    try:
        with torch.no_grad():
            got = model.generate(input_ids=ids, adapter_names=NAMES[:3], max_new_tokens=4, do_sample=False)
    finally:
        config.num_beams = 1
    for i, name in enumerate(NAMES[:3]):
        with torch.no_grad():
            want = singles[name].generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False, num_beams=2)
        assert torch.equal(got[i], want[0]), name


def test_a_generation_config_given_by_position_repeats_the_names(models):
    """generate(input_ids, generation_config, ...), transformers' own signature: the names were
    repeated for a generation_config given by keyword only, so a positional one with num_beams=2
    failed with a row-count error (a serving review, 2026-12-06). And a name per returned
    sequence (6 names for 3 prompts) is refused before any forward, saying names are per prompt
    (the layers' message counted the repeated names against the repeated rows)."""
    from transformers import GenerationConfig

    model, singles = models
    ids = tokens(3, 5, seed=9)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        got = model.generate(ids, config, adapter_names=NAMES[:3])
        assert torch.equal(got, model.generate(input_ids=ids, generation_config=config, adapter_names=NAMES[:3]))
        for i, name in enumerate(NAMES[:3]):
            assert torch.equal(got[2 * i:2 * i + 2], singles[name].generate(ids[i:i + 1], config)), name
        with pytest.raises(ValueError, match=r"adapter_names has 6 entries but generate\(\) got 3 prompt\(s\): give "
                                             r"one name per prompt; generate\(\) repeats each prompt's name for its 2 "):
            model.generate(ids, config, adapter_names=[n for n in NAMES[:3] for _ in range(2)])


def test_peft_corner_cases_are_refused():
    base = no_eos(tiny_causal_lm("llama"))
    ids = tokens(2, 4)
    # an adapter literally named "__base__"
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["q_proj"], init_weights=False),
                           adapter_name="__base__")
    miss_ext.peft.accelerate(model.eval())
    with pytest.raises(ValueError, match="named '__base__'"):
        model(ids, adapter_names=["__base__", "__base__"])
    # modules_to_save trained by "a" only: rows of "b" have no copy (PEFT: bare KeyError)
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["q_proj"], init_weights=False,
                                                           modules_to_save=["lm_head"]), adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["q_proj"], init_weights=False))
    miss_ext.peft.accelerate(model.eval())
    with pytest.raises(ValueError, match=r"\['b'\], which have no copy of the modules_to_save module"):
        model(ids, adapter_names=["a", "b"])
    # accelerating only the inner model leaves PEFT's tuner, which drops adapter_names: warned
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["q_proj"], init_weights=False))
    with pytest.warns(UserWarning, match="not their PEFT tuner"):
        miss_ext.peft.accelerate(model.get_base_model())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_torch_activation_checkpointing_in_training_is_refused(reentrant):
    """torch.utils.checkpoint (and the wrappers built on it) recompute the layer inside backward(),
    after the names' hooks are gone: refused at the forward rather than training the active
    adapter (the reentrant form used to send every row's gradient to "a" silently)."""
    from torch.utils.checkpoint import checkpoint
    model = checkpointed_net(lambda f, x: checkpoint(f, x, use_reentrant=reentrant))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing.*torch.utils.checkpoint"):
        model(x, adapter_names=["b", "b"]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    # Other calls work as before: a plain step, and a plain step with an inference call with
    # names in between (no_grad: nothing is recomputed).
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    loss = model(torch.randn(2, 8, requires_grad=True)).sum()
    with torch.no_grad():
        model(torch.randn(2, 8), adapter_names=["b", "__base__"])
    loss.backward()
    assert model.base_model.model.lin.miss_block["a"].grad.any()
    assert model.base_model.model.lin.miss_block["b"].grad is None


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_checkpoint_around_a_compiled_layer_is_refused_in_training(reentrant):
    """A checkpoint placed around a compiled layer re-runs its graph in backward() after the call,
    without the names: the reentrant form sent every row to the active adapter, silently (a
    review, 2026-12-04: 25.3 off, "b" no gradient; the non-reentrant one failed torch's metadata
    check). The layer's check now runs outside its graph: refused at the forward, as in eager; a
    plain step through the compiled layer still trains."""
    from torch.utils.checkpoint import checkpoint

    torch._dynamo.reset()
    compiled = {}

    def checkpointed_compiled(lin, x):
        layer = compiled.setdefault("lin", torch.compile(lin, backend="aot_eager"))
        return checkpoint(layer, x, use_reentrant=reentrant)

    model = checkpointed_net(checkpointed_compiled)
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing"):
        model(x, adapter_names=["a", "b"]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert model.base_model.model.lin.miss_block["a"].grad.any()
    torch._dynamo.reset()


def test_other_libraries_checkpointing_is_refused():
    """Reentrant checkpointing outside torch (a Function whose forward runs the module, as
    DeepSpeed's): refused at the forward of a names call. The layer's own check at the recompute
    stays behind it, for recomputes no frame shows: here a layer given names in its forward and
    none in the recompute (what the names' hooks amount to), called directly."""
    model = checkpointed_net(Recompute.apply)
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing"):
        model(x, adapter_names=["b", "b"]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    layer = model.base_model.model.lin

    calls = []

    def forward_with_names_only(v):
        calls.append(v)
        return layer(v, adapter_names=["b", "b"]) if len(calls) % 2 else layer(v)

    with pytest.raises(ValueError, match="recomputed inside backward"):
        Recompute.apply(forward_with_names_only, x).sum().backward()
    assert all(p.grad is None or not p.grad.any() for name, p in model.named_parameters() if name.endswith(".a"))
    # A forward without names between the mixed forward and its backward does not hide it (the
    # refusal follows the recomputed input, not the last call).
    loss = Recompute.apply(forward_with_names_only, x).sum()
    with torch.no_grad(), model.disable_adapter():
        model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="recomputed inside backward"):
        loss.backward()


def trainable_a_b(base):
    """An accelerated PEFT model in training mode with adapters "a" (q_proj, down_proj) and "b"
    (down_proj), only the blocks trainable."""
    model = get_peft_model(base, MissConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["down_proj"], init_weights=False))
    miss_ext.peft.accelerate(model).train()
    for name, p in model.named_parameters():
        p.requires_grad_("miss_block" in name)
    return model


@pytest.mark.parametrize("impl", ["REENTRANT", "NO_REENTRANT", "composable", "composable_model"])
def test_checkpointed_blocks_refuse_names_in_training_whatever_layer_they_hold(impl):
    """torch's checkpoint_wrapper (what FSDP's and accelerate's activation checkpointing apply)
    around each MLP, with down_proj adapted: down_proj's input is made inside the block, so the
    recompute check never saw it, and the recompute ran it with the active adapter ("b" got no
    gradient, "a" 2e-2 off, silently; the non-reentrant form failed with torch's CheckpointError).
    Refused at the forward now; inference through the wrapped model, and a checkpoint around the
    whole model call (recomputed with its names), give what the unwrapped model gives. torch's
    composable `checkpoint(module)` (hooks, no wrapper module, no frame in the call) too, also on
    the whole inner model (its pre-hook ran before the one that marks where the model's forward
    starts, so it passed for a checkpoint around the whole call: a mutation audit, 2026-12-04;
    torch's determinism check happened to catch that one with a CheckpointError)."""
    from functools import partial
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                              apply_activation_checkpointing,
                                                                              checkpoint_wrapper)
    from torch.utils.checkpoint import checkpoint
    base = no_eos(tiny_causal_lm("llama", dtype=torch.float64))
    model = trainable_a_b(base)
    wrapped = copy.deepcopy(model)
    mlp = type(base.model.layers[0].mlp)
    if impl == "composable":
        from torch.distributed._composable import checkpoint as composable_checkpoint
        for module in wrapped.modules():
            if isinstance(module, mlp):
                composable_checkpoint(module)
    elif impl == "composable_model":
        from torch.distributed._composable import checkpoint as composable_checkpoint
        composable_checkpoint(wrapped.base_model.model)
    else:
        apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, mlp), checkpoint_wrapper_fn=partial(
            checkpoint_wrapper, checkpoint_impl=getattr(CheckpointImpl, impl)))
    ids, names = tokens(3, 5), ["a", "b", "__base__"]
    snap = snapshot(wrapped)
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing"):
        wrapped(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    assert_unchanged(wrapped, snap)
    assert all(p.grad is None for p in wrapped.parameters())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids, adapter_names=names).logits,
                                   model(input_ids=ids, adapter_names=names).logits, rtol=0, atol=0)
    # generate() called with grad enabled runs its forwards under no_grad: nothing is recomputed,
    # nothing refused (a first version refused it, found by a review, 2026-12-03).
    torch.testing.assert_close(wrapped.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False),
                               model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False))
    # The whole call under a (non-reentrant) checkpoint: its recompute is a names call again.
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    checkpoint(lambda i: model(input_ids=i, labels=i, adapter_names=names).loss, ids, use_reentrant=False).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".b" in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)


def test_a_second_adapter_names_call_during_one_is_refused(models):
    """The names reach the layers through hooks that last for the call: a second adapter_names=
    call of the same model while one runs (another thread here) would give the running call its
    names. It raises, changing nothing; the first call's rows keep their own adapters."""
    model, _ = models
    ids = tokens(len(NAMES), 7)
    other = list(reversed(NAMES))
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits

    def first():
        with torch.no_grad():
            return model(ids, adapter_names=NAMES).logits

    def second():
        with pytest.raises(RuntimeError, match=r"another call with adapter_names= is running on this model .*"
                                               r"nothing was changed"):
            model(ids, adapter_names=other)

    outcome, _ = _with_a_plain_call_midway(model, first, second)
    torch.testing.assert_close(outcome, expected, rtol=0, atol=0)
    with torch.no_grad():  # free again
        torch.testing.assert_close(model(ids, adapter_names=NAMES).logits, expected, rtol=0, atol=0)


def test_a_plain_call_in_another_thread_during_an_adapter_names_call_runs_the_active_adapter(models):
    """The names call's hooks reach every caller of the shared layers: a plain call of the model in
    another thread meanwhile got the running call's names, silently (or an error about names it
    never passed when its batch had another size; a review, 2026-12-05). The hooks now see that
    the thread runs a plain model call: it gets the active adapter, the names call its own rows."""
    model, _ = models
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits
        plain = model(ids).logits
        plain_3 = model(ids[:3]).logits
    assert not torch.allclose(plain, expected)

    def names_call():
        with torch.no_grad():
            return model(ids, adapter_names=NAMES).logits

    def plain_calls():
        with torch.no_grad():
            return model(ids).logits, model(ids[:3]).logits

    outcome, (got, got_3) = _with_a_plain_call_midway(model, names_call, plain_calls)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(got_3, plain_3, rtol=0, atol=0)
    torch.testing.assert_close(outcome, expected, rtol=0, atol=0)


def _with_a_plain_call_midway(model, names_call, plain_call):
    """names_call() in another thread, paused as decoder layer 0 starts while plain_call() runs
    here: (the names call's outcome, the plain call's result)."""
    entered, release, outcome = threading.Event(), threading.Event(), []
    caller = threading.get_ident()

    def pause(module, args):
        if threading.get_ident() != caller:
            entered.set()
            release.wait(30)

    handle = model.base_model.model.model.layers[0].register_forward_pre_hook(pause)

    def run():
        try:
            outcome.append(names_call())
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome.append(e)

    thread = threading.Thread(target=run)
    try:
        thread.start()
        assert entered.wait(30)
        handle.remove()
        result = plain_call()
    finally:
        release.set()
        thread.join(30)
        handle.remove()
    return outcome[0], result


def _training_model_with_a_reentrant_checkpoint():
    """(a fresh model in training mode whose decoder layer 1 runs under a reentrant
    torch.utils.checkpoint, a batch of token ids for NAMES): a names call on it must be refused."""
    import torch.utils.checkpoint as cp

    model, _ = build()
    model.train()
    layer = model.base_model.model.model.layers[1]
    forward = layer.forward
    layer.forward = lambda *a, **k: cp.checkpoint(lambda *aa: forward(*aa, **k), *a, use_reentrant=True)
    model.enable_input_require_grads()
    return model, tokens(len(NAMES), 7)


def test_a_plain_call_in_another_thread_keeps_the_names_calls_checkpoint_refusal():
    """The names call's model-level hook records where the call starts, which its layers use to
    find a checkpoint around them; another thread's plain call (no_grad) replaced that record, and
    the names call trained through a reentrant checkpoint that recomputes without its names
    (gradients up to 30 off; a review, 2026-12-05). It is refused as when alone."""
    model, ids = _training_model_with_a_reentrant_checkpoint()

    def names_call():
        model(ids, adapter_names=NAMES).logits.sum().backward()

    def plain_call():
        with torch.no_grad():
            return model(ids[:2]).logits

    outcome, _ = _with_a_plain_call_midway(model, names_call, plain_call)
    assert isinstance(outcome, ValueError) and "cannot be combined with activation checkpointing" in str(outcome), \
        outcome


@pytest.mark.parametrize("path", ["tuner forward", "tuner generate"])
def test_a_plain_call_of_the_tuner_in_another_thread_runs_the_active_adapter(models, path):
    """model.base_model(...) and model.base_model.generate(...) (miss_ext's tuner) without names in
    another thread during a names call: the tuner forward got the call's rows (0.46 off) and a
    beam search rewrote its names (a review, 2026-12-05). They are recorded as plain calls now."""
    model, _ = models
    ids = tokens(len(NAMES), 7)

    def plain():
        with torch.no_grad():
            if path == "tuner forward":
                return model.base_model(input_ids=ids).logits
            return model.base_model.generate(input_ids=ids[:2], max_new_tokens=2, num_beams=2, do_sample=False)

    def names_call():
        with torch.no_grad():
            return model(ids, adapter_names=NAMES).logits

    want, expected = plain(), names_call()
    outcome, got = _with_a_plain_call_midway(model, names_call, plain)
    assert torch.equal(got, want)
    assert isinstance(outcome, torch.Tensor), outcome
    torch.testing.assert_close(outcome, expected, rtol=0, atol=0)


def test_a_delete_adapter_between_a_names_calls_checks_and_its_start_waits():
    """A names call checked the model (its adapters, merged layers) before claiming the lock that
    delete_adapter and the merges take: a delete in another thread in between went through, and
    the call's rows naming the deleted adapter got the base output (0.43 off; a review,
    2026-12-05). Checks and claim are one step now: the delete waits, then is refused while the
    call runs (or runs after it); the call's rows are exact."""
    model, _ = build()
    tuner = model.base_model
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits
    checked, outcome = threading.Event(), {}
    check = type(tuner)._check_before_unmerging

    def slow_check(self, names):
        check(self, names)
        if names is not None and threading.current_thread().name == "names call":
            checked.set()
            threading.Event().wait(1.0)  # the window a change used to slip into

    def names_call():
        with torch.no_grad():
            outcome["logits"] = model(ids, adapter_names=NAMES).logits

    type(tuner)._check_before_unmerging = slow_check
    thread = threading.Thread(target=names_call, name="names call")
    try:
        thread.start()
        assert checked.wait(30)
        try:
            model.delete_adapter("c")
        except RuntimeError as e:
            assert "a call with adapter_names= is running" in str(e)
    finally:
        type(tuner)._check_before_unmerging = check
        thread.join(30)
    torch.testing.assert_close(outcome["logits"], expected, rtol=0, atol=0)


def test_a_copy_run_inside_a_names_call_keeps_its_checkpoint_refusal():
    """A deep copy of the model taken and run (no_grad) inside a training names call, an EMA or
    debug copy in a hook: the copy's hooks shared the call's record and replaced its checkpoint
    entry, and the call trained through a reentrant checkpoint it must refuse (gradients 0.56 off;
    a review, 2026-12-05). A copy's hooks are inert now."""
    model, ids = _training_model_with_a_reentrant_checkpoint()
    copies = []

    def copy_and_run(module, args):
        if not copies:
            copies.append(copy.deepcopy(model))
            with torch.no_grad():
                copies[0].base_model.model(ids[:1])

    model.base_model.model.model.layers[0].register_forward_pre_hook(copy_and_run)
    with pytest.raises(ValueError, match="cannot be combined with activation checkpointing"):
        model(ids, adapter_names=NAMES).logits.sum().backward()
    assert copies


def test_a_plain_beam_search_in_another_thread_leaves_the_names_call_alone(models):
    """generate() during a names call rewrote the call's names for its own beams: the names call
    then failed with '12 entries but the input has 6 sequences' (a review, 2026-12-05)."""
    model, _ = models
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits
        beams = model.generate(input_ids=ids[:2], max_new_tokens=2, num_beams=2, do_sample=False)

    def names_call():
        with torch.no_grad():
            return model(ids, adapter_names=NAMES).logits

    def plain_call():
        with torch.no_grad():
            return model.generate(input_ids=ids[:2], max_new_tokens=2, num_beams=2, do_sample=False)

    outcome, got = _with_a_plain_call_midway(model, names_call, plain_call)
    assert torch.equal(got, beams)
    assert isinstance(outcome, torch.Tensor), outcome
    torch.testing.assert_close(outcome, expected, rtol=0, atol=0)


def test_a_copy_taken_during_an_adapter_names_call_keeps_no_frames_of_its_own_calls():
    """A deep copy of the model taken inside a names call (an EMA or debug copy in a hook) copied
    the call's hooks with their holder: its model hook then stored each later forward's frame in
    that holder, keeping the copy's outputs and their autograd graph alive (a review,
    2026-12-05). The copies share the holder now, and the call's end turns them off."""
    import gc
    import weakref

    model, _ = build()
    ids = tokens(len(NAMES), 7)
    copies = []
    handle = model.base_model.model.model.layers[0].register_forward_pre_hook(
        lambda module, args: copies.append(copy.deepcopy(model)) if not copies else None)
    with torch.no_grad():
        model(ids, adapter_names=NAMES)
    handle.remove()
    duplicate = copies[0].train()
    out = duplicate.base_model.model(input_ids=ids, labels=ids)  # not through PeftModel's forward
    logits, loss = weakref.ref(out.logits), weakref.ref(out.loss)
    del out
    gc.collect()
    assert logits() is None and loss() is None


def test_merge_adapter_and_an_adapter_names_call_in_two_threads_do_not_interleave():
    """merge_adapter checked for a running adapter_names= call without the lock that call claims
    itself under: a names call starting between that check and the merge passed its own checks,
    then met merged layers part way (a review, 2026-12-05). Now the merge holds the lock from its
    check to its last write: the names call starts after it and is refused up front (adapters
    merged) at its first adapted layer."""
    model, _ = build()
    ids = tokens(len(NAMES), 7)
    tuner = model.base_model
    events, checked = [], threading.Event()
    check_merge = type(tuner)._check_merge

    def slow_check(self, *args, **kwargs):
        check_merge(self, *args, **kwargs)
        checked.set()
        threading.Event().wait(1.0)  # the window a names call used to start in

    def layer_hook(module, args):
        events.append("names call ran a layer")

    handle = model.base_model.model.model.layers[0].register_forward_pre_hook(layer_hook)
    outcome = {}

    def names_call():
        checked.wait(30)
        try:
            with torch.no_grad():
                model(ids, adapter_names=NAMES)
        except ValueError as e:
            outcome["names"] = str(e)

    thread = threading.Thread(target=names_call)
    type(tuner)._check_merge = slow_check
    try:
        thread.start()
        model.merge_adapter(["a"])
        events.append("merged")
    finally:
        type(tuner)._check_merge = check_merge
        thread.join(30)
        handle.remove()
    assert events[0] == "merged", events  # the names call waited for the merge to end
    assert "merged" in outcome.get("names", ""), outcome  # and was then refused (no row ran)


def call_with_a_change_midway(model, ids, change):
    """model(ids, adapter_names=NAMES) under no_grad, with change() run once as decoder layer 1
    starts (an admin thread's change while the call runs): (logits, the RuntimeError change()
    raised, or None)."""
    outcome = []

    def change_it(module, args):
        if not outcome:
            try:
                change()
                outcome.append(None)
            except RuntimeError as exc:
                outcome.append(exc)

    handle = model.base_model.model.model.layers[1].register_forward_pre_hook(change_it)
    try:
        with torch.no_grad():
            logits = model(ids, adapter_names=NAMES).logits
    finally:
        handle.remove()
    return logits, outcome[0]


def test_a_copy_taken_during_a_names_call_is_not_in_that_call(models):
    """The layers' _names_call flag (read so that torch.compile guards on it) is set for the
    call's duration only: a copy or pickle taken meanwhile starts without it (else its every plain
    call raised "names did not reach this layer")."""
    model, singles = models
    ids = tokens(len(NAMES), 5, seed=6)
    copies = []
    call_with_a_change_midway(model, ids, lambda: copies.append(copy.deepcopy(model)))
    assert not any("_names_call" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(copies[0](ids).logits, singles["a"](ids).logits, **TOL)


@pytest.mark.parametrize("change", ["delete_adapter", "merge_adapter", "unmerge_adapter", "unload",
                                    "merge_and_unload", "load_adapter", "load_a_base_weight", "add_a_bias_adapter",
                                    "load_a_new_adapter_with_embeddings"])
def test_adapter_changes_during_an_adapter_names_call_are_refused(models, change, tmp_path):
    """An adapter deleted, merged or unloaded while a call with adapter_names= runs (here from a
    hook standing for an admin thread) gave its rows the old adapters in the earlier layers and
    the new state in the later ones, silently (0.25-0.51 in logits). Such changes now refuse
    while the call runs."""
    model, _ = models
    ids = tokens(len(NAMES), 7)
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits
    calls = {"delete_adapter": lambda: model.delete_adapter("b"), "merge_adapter": model.merge_adapter,
             "unmerge_adapter": model.unmerge_adapter, "unload": model.unload,
             "merge_and_unload": model.merge_and_unload,
             # new weights under an existing name (review, 2026-12-03: the rows mixed both versions)
             "load_adapter": lambda: model.load_adapter(str(tmp_path / "b"), adapter_name="b"),
             # Tensors every row uses (review, 2026-12-03): a base weight loaded, or an adapter with
             # trained biases (load_adapter of a bias="all" folder adds it, then loads its biases).
             "load_a_base_weight": lambda: model.load_state_dict({base_key: torch.zeros_like(base)}, strict=False),
             "add_a_bias_adapter": lambda: model.add_adapter("fresh", MissConfig(r=2, target_modules=["q_proj"],
                                                                               bias="all")),
             # A file with the embedding layers (save_embedding_layers): load_adapter adds "fresh",
             # then its load is refused; the added adapter must go too.
             "load_a_new_adapter_with_embeddings": lambda: model.load_adapter(str(tmp_path / "b"),
                                                                               adapter_name="fresh")}
    base_key, base = next((k, v.clone()) for k, v in model.state_dict().items() if k.endswith("base_layer.weight"))
    configs = list(model.peft_config)
    if change in ("load_adapter", "load_a_new_adapter_with_embeddings"):
        model.save_pretrained(str(tmp_path), selected_adapters=["b"],
                              save_embedding_layers=change != "load_adapter")
    blocks = {k: v.clone() for k, v in model.state_dict().items() if "miss_block" in k}
    types = [type(m) for m in model.modules()]
    got, error = call_with_a_change_midway(model, ids, calls[change])
    assert isinstance(error, RuntimeError) and "a call with adapter_names= is running" in str(error)
    assert list(model.peft_config) == configs and [type(m) for m in model.modules()] == types
    assert not any("fresh" in getattr(m, "miss_block", {}) for m in model.modules())
    assert torch.equal(model.state_dict()[base_key], base)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(v, blocks[k]) for k, v in model.state_dict().items() if "miss_block" in k)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_loading_a_new_adapter_during_an_adapter_names_call_is_allowed(models, tmp_path):
    """load_adapter under a new name adds the adapter, then loads its values with load_state_dict:
    refusing that load (as for a name the call may use) left the new adapter at its initial values
    behind an error saying nothing changed (review, 2026-12-03). No running row names it, so it is
    allowed, and the running call's rows are those of the adapters it started with."""
    model, _ = models
    ids = tokens(len(NAMES), 7)
    model.save_pretrained(str(tmp_path), selected_adapters=["b"])
    with torch.no_grad():
        expected = model(ids, adapter_names=NAMES).logits
    got, error = call_with_a_change_midway(model, ids, lambda: model.load_adapter(str(tmp_path / "b"),
                                                                              adapter_name="fresh"))
    assert error is None
    try:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        blocks = {k: v for k, v in model.state_dict().items() if "miss_block" in k}
        fresh = {k: v for k, v in blocks.items() if k.endswith(".fresh")}
        assert fresh and all(torch.equal(v, blocks[k[:-len("fresh")] + "b"]) for k, v in fresh.items())
        with torch.no_grad():
            torch.testing.assert_close(model(ids, adapter_names=["fresh"] * len(NAMES)).logits,
                                       model(ids, adapter_names=["b"] * len(NAMES)).logits, rtol=0, atol=0)
    finally:
        model.delete_adapter("fresh")  # the fixture is shared


def test_an_input_passed_again_with_names_is_recorded_once():
    """The layer records the inputs it saw with adapter_names= (to refuse a checkpoint recompute
    without them). The same live tensor passed again was appended every time: 7,000 calls left
    7,000 entries and doubled the per-call time, and T5's uncached generate passes the same
    encoder states at every step (memory review, 2026-12-02)."""
    from torch import nn

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, **kwargs):
            return self.fc(x)

    model = get_peft_model(Model(), MissConfig(r=4, target_modules=["fc"], init_weights=False), adapter_name="a")
    model.add_adapter("b", MissConfig(r=2, target_modules=["fc"], init_weights=False))
    miss_ext.peft.accelerate(model)
    layer = model.base_model.model.fc
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        for _ in range(50):
            layer(x, adapter_names=["a", "b"])
        assert len(layer.__dict__["_inputs_with_names"]) == 1
        y = torch.randn(2, 3, 16)
        layer(y, adapter_names=["b", "a"])
        assert len(layer.__dict__["_inputs_with_names"]) == 2
        del x, y
        layer(torch.randn(2, 3, 16))  # a call without names drops the dead entries
        assert len(layer.__dict__["_inputs_with_names"]) == 0


def test_encoder_decoder_beam_search_runs_the_encoder_on_the_unrepeated_names():
    """T5 with PEFT's keyword: the encoder runs once on the sequences, the decoder on num_beams
    copies of each (the hooks give the encoder the unrepeated names, on the encoder's own layers
    only). Each row's tokens equal that adapter alone. No test covered it (a mutation audit,
    2026-12-03: giving the encoder the repeated names, or hooking none of its layers, broke it)."""
    import transformers
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(config).double().eval()
    base.generation_config.eos_token_id = None
    model = _two_adapters(base, ["q", "v", "o", "wi"])
    names = ["b", "__base__", "a"]
    ids = tokens(3, 6, seed=13)
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=2)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids[i:i + 1], **kwargs)
            else:
                model.base_model.set_adapter(name)
                want = model.generate(input_ids=ids[i:i + 1], **kwargs)
            assert torch.equal(got[i], want[0]), name
        model.base_model.set_adapter("a")
        other = model.generate(input_ids=ids[2:], **kwargs)[0]
        model.base_model.set_adapter("b")
        assert not torch.equal(other, model.generate(input_ids=ids[2:], **kwargs)[0])  # the adapters differ


def test_sequence_first_models_refuse_rows_with_different_adapters(tmp_path):
    """FSMT's layers see (sequence, batch, features): rows are matched by x's first dimension, so with
    as many sequences as tokens both PEFT's adapter_names= and mixed_batch passed every shape check
    and gave rows other adapters (row "a" off by 0.37 where the adapter's effect was 0.39; a review
    of 2026-12-03). Now different names raise ValueError naming the model; one name for every row
    (which routes right in any layout) still matches that adapter alone."""
    base = tiny_fsmt()
    ids, dec = torch.randint(3, 64, (3, 3)), torch.randint(3, 64, (3, 3))
    peft = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["fc1", "fc2"], init_weights=False),
                          adapter_name="a")
    with torch.no_grad():
        want_a = peft(input_ids=ids, decoder_input_ids=dec).logits
    fast = miss_ext.peft.accelerate(copy.deepcopy(peft))
    with torch.no_grad(), pytest.raises(ValueError, match=r"forward/generate: mixed batches.*FSMTForConditionalGeneration "
                                                          r"\(model_type 'fsmt'\).*\(sequence, batch, features\)"):
        fast(input_ids=ids, decoder_input_ids=dec, adapter_names=["a", "__base__", "__base__"])
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, decoder_input_ids=dec, adapter_names=["a"] * 3).logits, want_a)
    peft.save_pretrained(tmp_path)
    server = miss_ext.load_bank(copy.deepcopy(base), {"a": str(tmp_path / "a")})
    with pytest.raises(ValueError, match=r"mixed_batch: .*model_type 'fsmt'"):
        with miss_ext.mixed_batch(server, ["a", None, None]):
            pass
    with torch.no_grad(), miss_ext.mixed_batch(server, ["a"] * 3):
        torch.testing.assert_close(server(input_ids=ids, decoder_input_ids=dec).logits, want_a)


def test_torch_transformer_layers_built_sequence_first_refuse_mixed_rows():
    """nn.TransformerEncoderLayer(batch_first=False) feeds its linears (sequence, batch, features)."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
    model = miss_ext.peft.accelerate(get_peft_model(layer, MissConfig(r=4, target_modules=["linear1"])))
    with pytest.raises(ValueError, match=r"TransformerEncoderLayer \(at ''\) with an nn.MultiheadAttention built with "
                                         "batch_first=False"):
        model(torch.randn(2, 2, 16), adapter_names=["default", "__base__"])
    assert model(torch.randn(2, 2, 16), adapter_names=["default", "default"]).shape == (2, 2, 16)


def _two_adapters(base, targets, seed=0):
    """An accelerated PEFT model of `base` with random MiSS adapters "a" and "b" on `targets`."""
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=targets, init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=targets, init_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return miss_ext.peft.accelerate(model).eval()


def test_moe_experts_refuse_rows_with_different_adapters(tmp_path):
    """SwitchTransformers' experts each see the tokens routed to them: where an expert got exactly
    as many tokens as there are sequences, every shape check passed and rows took other sequences'
    adapters (1.4 off where the adapters' effect was 2.6; NllbMoe, whose experts list their tokens
    by expert slot first, generated other tokens at decode steps; a review of 2026-12-03). Names
    that differ are refused, in PEFT's adapter_names= and mixed_batch; one name for every row still
    gives that adapter alone."""
    import transformers
    torch.manual_seed(0)
    config = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=2,
        expert_capacity=64, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, decoder_start_token_id=0,
        pad_token_id=0)
    base = transformers.SwitchTransformersModel(config).double().eval()
    model = _two_adapters(base, ["wi", "wo"])
    ids, dec = torch.randint(1, 64, (2, 2)), torch.randint(1, 64, (2, 2))
    with torch.no_grad(), pytest.raises(ValueError, match=r"MoE experts \(SwitchTransformersExperts at '[^']+'\) "
                                                          r"whose layers see the tokens routed to each expert"):
        model(input_ids=ids, decoder_input_ids=dec, adapter_names=["a", "b"])
    with torch.no_grad():
        model.base_model.set_adapter("b")
        want = model(input_ids=ids, decoder_input_ids=dec).last_hidden_state
        got = model(input_ids=ids, decoder_input_ids=dec, adapter_names=["b", "b"]).last_hidden_state
        torch.testing.assert_close(got, want, **TOL)
    model.save_pretrained(tmp_path)
    server = miss_ext.load_bank(copy.deepcopy(base), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    with pytest.raises(ValueError, match=r"mixed_batch: .*MoE experts \(SwitchTransformersExperts at"):
        with miss_ext.mixed_batch(server, ["a", "b"]):
            pass
    with torch.no_grad(), miss_ext.mixed_batch(server, ["b", "b"]):
        torch.testing.assert_close(server(input_ids=ids, decoder_input_ids=dec).last_hidden_state, want, **TOL)


def _tiny_llava():
    """A tiny random Llava (CLIP vision tower, projector, Llama language model; 4 tokens per
    image) and its image token id."""
    import transformers
    image = 60
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=16, patch_size=8),
        text_config=transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=0),
        image_token_index=image, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).double().eval(), image


def test_multimodal_models_refuse_mixed_rows_on_their_vision_side(tmp_path):
    """A vision-language model's vision tower and projector see images, not sequences: with three
    images for three sequences (two in the first, none in the second) every shape check passed and
    the first sequence's second image took the next sequence's adapter (Llava's row 0 0.28 off
    where its adapter's effect was 0.41; generate gave other tokens; a review of 2026-12-03). Names
    that differ are refused where an adapter adapts that side; adapters on the language model
    alone mix, each row exactly its adapter alone, wherever the images are."""
    base, image = _tiny_llava()
    ids = torch.randint(3, image - 1, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 1:9] = image  # two images
    ids[2, 1:5] = image  # one; the second sequence none
    inputs = dict(input_ids=ids, pixel_values=torch.randn(3, 3, 16, 16, dtype=F64))
    names = ["a", "b", "__base__"]
    model = _two_adapters(base, "all-linear")
    with torch.no_grad(), pytest.raises(ValueError, match=r"CLIPVisionModel \(at 'model.vision_tower'\) beside the "
                                                          r"language model of the multimodal LlavaModel"):
        model(**inputs, adapter_names=names)
    with torch.no_grad():
        model.base_model.set_adapter("b")
        want = model(**inputs).logits
        torch.testing.assert_close(model(**inputs, adapter_names=["b"] * 3).logits, want, **TOL)
    model.save_pretrained(tmp_path)
    server = miss_ext.load_bank(copy.deepcopy(base), {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    with pytest.raises(ValueError, match=r"mixed_batch: .*beside the language model"):
        with miss_ext.mixed_batch(server, names):
            pass
    _assert_rows_follow_their_adapters(_two_adapters(base, r".*language_model.*\.(q_proj|v_proj|down_proj)"),
                                       inputs, names, **TOL)


def test_text_only_calls_mix_adapters_on_multimodal_models_adapted_on_their_vision_side():
    """The vision tower and projector run only on the images a call brings: a call with text
    inputs only mixes adapters adapted there too (all-linear adapters on a VLM served to text
    requests), each row exactly its adapter alone, in forward and generate. Refused (ValueError
    naming the argument) when the call brings pixel values, by keyword or positionally, or any
    tensor under a name not known to be text."""
    base, image = _tiny_llava()
    ids = torch.randint(3, image - 1, (3, 12), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "__base__"]
    model = _two_adapters(base, "all-linear")
    _assert_rows_follow_their_adapters(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), names, **TOL)
    with torch.no_grad():
        got = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
            else:
                model.base_model.set_adapter(name)
                want = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, do_sample=False)
            assert torch.equal(got[row], want[0]), (row, name)
    pixels = torch.randn(3, 3, 16, 16, dtype=F64)
    with_image = ids.clone()
    with_image[:, 1:5] = image
    for call, argument in ((lambda: model(input_ids=with_image, pixel_values=pixels, adapter_names=names),
                            "pixel_values"),
                           (lambda: model.generate(input_ids=with_image, pixel_values=pixels, adapter_names=names,
                                                   max_new_tokens=2), "pixel_values"),
                           (lambda: model.base_model(with_image, pixels, adapter_names=names), "positional argument 0, "
                                                                                          "positional argument 1"),
                           (lambda: model(input_ids=ids, image_sizes=torch.tensor([[16, 16]] * 3),
                                          adapter_names=names), "image_sizes")):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"model.vision_tower.*this call brings {argument}"):
            call()


def test_which_call_arguments_may_bring_images():
    """Keywords outside the text-only list holding data (a tensor, an array, any object, also
    nested in sequences, mappings such as a processor's BatchFeature, dataclasses, at any depth)
    and positional data may carry images; text inputs, mm_token_type_ids (returned by the
    Qwen2-VL-family processors for text-only prompts), numbers, strings and generate's control
    objects do not (a review found a BatchFeature, a dataclass, an array and deep lists let
    through as text, 2026-12-03)."""
    from miss_ext.bank import other_modality_arguments

    import collections
    import dataclasses

    import numpy as np
    import transformers

    @dataclasses.dataclass
    class Images:
        pixels: object

    ids = torch.ones(2, 3, dtype=torch.long)
    assert other_modality_arguments((), dict(
        input_ids=ids, attention_mask=ids, mm_token_type_ids=ids * 0, pixel_values=None, max_new_tokens=4,
        adapter_names=["a", "b"], eos_token_id=[1, 2], bad_words_ids=[[3]],
        generation_config=transformers.GenerationConfig(), logits_processor=transformers.LogitsProcessorList(),
        options=Images(pixels=None))) == []
    deep = torch.ones(1)
    for _ in range(8):
        deep = [deep]
    assert other_modality_arguments((ids,), dict(
        pixel_values=[torch.ones(3)], image_sizes=ids, mm_encoder_outputs={"image": (torch.ones(1),)},
        images=collections.UserDict(x=torch.ones(1)), features=transformers.BatchFeature({"x": torch.ones(1)}),
        frames=Images(pixels=torch.ones(1)), audio=np.ones(3), nested=deep, clip=object())) == [
        "positional argument 0", "pixel_values", "image_sizes", "mm_encoder_outputs", "images", "features", "frames",
        "audio", "nested", "clip"]


def _assert_rows_follow_their_adapters(model, inputs, names, **tol):
    """Each row of model(**inputs, adapter_names=names) equals that row with its adapter alone
    active (set_adapter), or with adapters disabled for "__base__"."""
    with torch.no_grad():
        got = model(**inputs, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(**inputs).logits
            else:
                model.base_model.set_adapter(name)
                want = model(**inputs).logits
            torch.testing.assert_close(got[row], want[row], **tol)


def test_a_multimodal_projector_that_is_itself_adapted_is_seen():
    """The projector can be the adapted linear itself, a direct child of the multimodal model
    (BLIP-2's language_projection, Fuyu's vision_embed_tokens): RowLayout matched only layers
    below a vision-side module, and BLIP-2's rows went 0.30 off (effect 0.36; a review of
    2026-12-03). Layers of the language model alone still mix."""
    import types

    from miss_ext.bank import RowLayout

    text = types.SimpleNamespace(model_type="llama")
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(text_config=text, image_token_id=5)
    model.language_projection = torch.nn.Linear(4, 4)
    model.language_model = torch.nn.Module()
    model.language_model.config = text
    model.language_model.q_proj = torch.nn.Linear(4, 4)
    for adapted, refused in (({"language_projection"}, True), ({"language_model.q_proj"}, False)):
        layout = RowLayout(model)
        for path, module in model.named_modules():
            layout.see(path, module, path in adapted)
        assert (layout.reason is not None and "at 'language_projection'" in layout.reason) is refused, adapted


# Written out, not read from _REGROUPING_CHILDREN: an entry deleted there must fail here.
REGROUPING = ("Kosmos2Model", "Kosmos2ForConditionalGeneration", "Kosmos2_5Model", "Kosmos2_5ForConditionalGeneration",
              "Phi4MultimodalModel", "CsmForConditionalGeneration", "HiggsAudioV2DecoderLayer")


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("cls", REGROUPING)
def test_models_that_gather_rows_across_the_batch_are_seen(cls, nested):
    """Kosmos-2/2.5 (images by a position mask), Phi-4-multimodal (audio clips, image crops), CSM
    (depth-decoder frames) and Higgs-Audio v2 (text/audio MLPs) run layers on rows gathered across
    the batch: with as many as the sequences, rows got other adapters (0.02-0.83 off, a review of
    2026-12-03). An adapted layer under those children refuses names that differ, also in a call
    with text inputs only (these gather text tokens or frames too), also where the class sits
    below the top (Higgs-Audio's decoder layers at model.layers.N); a sibling not."""
    import types

    from miss_ext.bank import _REGROUPING_CHILDREN, RowLayout

    children = _REGROUPING_CHILDREN[cls]
    inner = type(cls, (torch.nn.Module,), {})()
    inner.config = types.SimpleNamespace(model_type="x")
    for name in children + ("other",):
        child = torch.nn.Module()
        child.proj = torch.nn.Linear(4, 4)
        inner.add_module(name, child)
    model, prefix = inner, ""
    if nested:
        model, prefix = torch.nn.Module(), "model.layers.0."
        model.model = torch.nn.Module()
        model.model.layers = torch.nn.ModuleList([inner])
    for name in children + ("other",):
        layout = RowLayout(model)
        for path, module in model.named_modules():
            layout.see(path, module, path == f"{prefix}{name}.proj")
        assert (layout.reason is not None) is (name != "other"), name
        assert (layout.reason_for(other_modalities=False) is not None) is (name != "other"), name
        assert name == "other" or f"it holds {prefix + name!r} of a {cls}" in layout.reason


def test_row_layout_rules_for_text_only_calls_and_configs_without_text_config():
    """The vision side of a multimodal model is left out for a call without images; a
    sequence-first attention and MoE experts are not (they see the text too). A config with an
    image token id but no text_config (Chameleon: images as tokens of the one vocabulary) is no
    multimodal layout; the output embeddings of a multimodal model see the sequences."""
    import types

    from miss_ext.bank import RowLayout

    def reason(model, adapted, other_modalities=True):
        layout = RowLayout(model)
        for path, module in model.named_modules():
            layout.see(path, module, path in adapted)
        return layout.reason_for(other_modalities=other_modalities)

    attention = torch.nn.Module()
    attention.block = torch.nn.Module()
    attention.block.attn = torch.nn.MultiheadAttention(4, 1)  # batch_first=False
    attention.block.fc = torch.nn.Linear(4, 4)
    assert reason(attention, {"block.fc"}, other_modalities=False) is not None
    chameleon = torch.nn.Module()
    chameleon.config = types.SimpleNamespace(image_token_id=5, model_type="chameleon")
    chameleon.vqmodel = torch.nn.Module()
    chameleon.vqmodel.proj = torch.nn.Linear(4, 4)
    assert reason(chameleon, {"vqmodel.proj"}) is None
    text = types.SimpleNamespace(model_type="llama")
    vlm = torch.nn.Module()
    vlm.config = types.SimpleNamespace(text_config=text, image_token_id=5)
    vlm.vision = torch.nn.Module()
    vlm.vision.proj = torch.nn.Linear(4, 4)
    vlm.lm_head = torch.nn.Linear(4, 8)
    vlm.get_output_embeddings = lambda: vlm.lm_head
    assert reason(vlm, {"lm_head"}) is None
    assert reason(vlm, {"vision.proj"}) is not None and reason(vlm, {"vision.proj"}, other_modalities=False) is None


def test_kosmos2_refuses_mixed_rows_on_its_vision_side():
    """End to end: Kosmos-2 with three images for three sequences, two in the first; the language
    model's adapters alone still mix, each row exactly its adapter alone."""
    import transformers
    config = transformers.Kosmos2Config(
        text_config=dict(vocab_size=64, embed_dim=16, layers=1, attention_heads=2, ffn_dim=32,
                         max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), latent_query_num=4)
    torch.manual_seed(0)
    base = transformers.Kosmos2ForConditionalGeneration(config).eval()  # float32: its mask overflows in float64
    ids = torch.randint(4, 64, (3, 14), generator=torch.Generator().manual_seed(1))
    where = torch.zeros(3, 14, dtype=torch.long)
    where[0, 1:9] = 1  # two images of 4 latent tokens
    where[2, 1:5] = 1
    inputs = dict(input_ids=ids, image_embeds_position_mask=where, pixel_values=torch.randn(3, 3, 16, 16))
    names = ["a", "b", "__base__"]
    with torch.no_grad(), pytest.raises(ValueError, match=r"'vision_model' of a Kosmos2ForConditionalGeneration"):
        _two_adapters(base, "all-linear")(**inputs, adapter_names=names)
    _assert_rows_follow_their_adapters(_two_adapters(base, r".*text_model\..*(q_proj|v_proj|fc2)"), inputs, names,
                                       rtol=1e-5, atol=1e-5)


class _RemoteCodeMoE(torch.nn.Module):
    """A top-1 MoE block as remote-code models build it: experts in an nn.ModuleList named
    `experts`, each called on the tokens routed to it."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(8, 2, dtype=F64)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8, dtype=F64) for _ in range(2))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for k, expert in enumerate(self.experts):
            rows = (choice == k).nonzero().flatten()
            out[rows] = expert(flat[rows])
        return out.reshape(x.shape)


class _SequenceFirstBlock(torch.nn.Module):
    """A CLIP-style residual block: nn.MultiheadAttention built batch_first=False, an MLP on the
    same (sequence, batch, features) activations."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, dtype=F64)
        self.fc = torch.nn.Linear(8, 8, dtype=F64)

    def forward(self, x):  # x: (sequence, batch, features)
        return self.fc(x + self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("block,why", [(_RemoteCodeMoE, r"MoE experts \(ModuleList at 'experts'\)"),
                                       (_SequenceFirstBlock, r"_SequenceFirstBlock \(at ''\) with an "
                                                             r"nn.MultiheadAttention built with batch_first=False")],
                         ids=["experts-modulelist", "multihead-attention-block"])
def test_layouts_found_from_the_modules_refuse_rows_with_different_adapters(block, why):
    torch.manual_seed(0)
    model = _two_adapters(block(), ["experts.0", "experts.1"] if block is _RemoteCodeMoE else ["fc"])
    x = torch.randn(3, 3, 8, dtype=F64)  # as many sequences as tokens: every shape check passes
    with torch.no_grad(), pytest.raises(ValueError, match=why):
        model(x, adapter_names=["a", "b", "__base__"])
    with torch.no_grad():
        model.base_model.set_adapter("a")
        torch.testing.assert_close(model(x, adapter_names=["a"] * 3), model(x), **TOL)


def _tiny_layout_model(model_type):
    """A tiny transformers model of `model_type`, the inputs of a batch as long as its sequences
    (queries, patches), and target_modules on the layers that see the regrouped rows."""
    import transformers
    torch.manual_seed(0)
    if model_type == "bros":
        config = transformers.BrosConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=3)
        model = transformers.BrosSpadeELForTokenClassification(config)
        ids = torch.randint(3, 64, (3, 3))
        return model, dict(input_ids=ids, bbox=torch.rand(3, 3, 8, dtype=F64)), ["query", "value"]
    if model_type == "mask2former":
        backbone = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                           num_heads=[1, 1, 1, 1], window_size=2,
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
        config = transformers.Mask2FormerConfig(
            backbone_config=backbone, num_queries=3, hidden_dim=32, mask_feature_size=32, feature_size=32,
            encoder_feedforward_dim=32, dim_feedforward=32, decoder_layers=2, encoder_layers=1, num_attention_heads=2,
            num_labels=3, common_stride=4)
        model = transformers.Mask2FormerModel(config)
        return model, dict(pixel_values=torch.randn(3, 3, 32, 32, dtype=F64)), \
            r".*transformer_module\.decoder\.layers\.\d+\.fc[12]"
    raise AssertionError(model_type)


@pytest.mark.parametrize("model_type", ["bros", "mask2former"])
def test_models_whose_layers_regroup_rows_refuse_rows_with_different_adapters(model_type):
    """Bros' relation-extractor heads see (sequence, batch, features), Mask2Former's decoder
    (queries, batch, features): with as many sequences as tokens or queries, rows took other
    sequences' adapters silently (Bros 5.8 off where the effect was 3.4, Mask2Former 2.9 where it
    was 2.9; a review of 2026-12-03). Names that differ are refused; one name for every row runs
    that adapter (or the base model) on every row."""
    base, inputs, targets = _tiny_layout_model(model_type)
    model = _two_adapters(base.double().eval(), targets)
    with torch.no_grad(), pytest.raises(ValueError, match=rf"mixed batches.*model_type '{model_type}'"):
        model(**inputs, adapter_names=["a", "b", "__base__"])
    with torch.no_grad():  # one name for every row: that adapter alone, whatever the layers see
        model.base_model.set_adapter("b")
        torch.testing.assert_close(model(**inputs, adapter_names=["b"] * 3)[0], model(**inputs)[0], **TOL)
        with model.disable_adapter():
            want = model(**inputs)[0]
        torch.testing.assert_close(model(**inputs, adapter_names=["__base__"] * 3)[0], want, **TOL)


def test_base_model_methods_reached_through_the_peft_model_take_adapter_names():
    """PeftModel hands attributes it lacks to the base model: CLIP's get_text_features took
    adapter_names= into its **kwargs and ignored it, every row running the active adapter (a
    "__base__" row 2.49 off the base; a review of 2026-12-03; PEFT's LoRA does the same). Such
    methods now route the names to the layers as forward does."""
    import transformers
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=16, patch_size=4), projection_dim=16)
    base = transformers.CLIPModel(config).double().eval()
    ids = torch.randint(3, 64, (3, 7))
    peft = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=["fc1", "fc2"], init_weights=False),
                          adapter_name="a")

    def features(model, **kwargs):
        out = model.get_text_features(input_ids=ids, **kwargs)
        return getattr(out, "pooler_output", out)  # a tensor in older transformers releases

    with torch.no_grad():
        want_a, want_base = features(peft), features(base)
        assert (want_a - want_base).abs().max() > 0.05
        fast = miss_ext.peft.accelerate(copy.deepcopy(peft))
        got = features(fast, adapter_names=["a", "__base__", "a"])
        torch.testing.assert_close(got[[0, 2]], want_a[[0, 2]])
        torch.testing.assert_close(got[1], want_base[1])
        torch.testing.assert_close(features(fast), want_a)
        with pytest.raises(ValueError, match=r"adapter_names names adapter\(s\) no layer has: \['b'\]"):
            features(fast, adapter_names=["b", "a", "a"])


def test_the_tuner_called_directly_takes_adapter_names():
    """PEFT's tuner (peft_model.base_model) forwards its call to the base model's forward, whose
    **kwargs took adapter_names= and ignored it: every row ran the active adapter (0.33 off on a
    tiny Llama; PEFT's LoRA does the same). The accelerated tuner routes the names as
    PeftModel.forward does, refusals included."""
    base = tiny_causal_lm("llama")
    model = _two_adapters(base, "all-linear")
    ids = tokens(3, 9)
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=names).logits
        got = model.base_model(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(got, want, **TOL)
        assert (got[0] - got[1]).abs().max() > 1e-3  # the adapters differ: a test that can fail
        torch.testing.assert_close(model.base_model(ids).logits, model(input_ids=ids).logits, **TOL)
        with pytest.raises(ValueError, match=r"adapter_names names adapter\(s\) no layer has: \['c'\]"):
            model.base_model(input_ids=ids, adapter_names=["c", "a", "a"])


def test_the_tuner_calls_the_base_model_with_its_hooks():
    """PEFT's task models (task_type="CAUSAL_LM": PeftModelForCausalLM) call the tuner, whose
    forward calls the base model as a module: its forward hooks (a user's, FSDP2's root hooks)
    run, with and without adapter_names= (a review of 2026-12-03 found the first version of the
    tuner's forward calling .forward, skipping them)."""
    base = tiny_causal_lm("llama")
    model = get_peft_model(copy.deepcopy(base), MissConfig(r=4, target_modules=TARGETS, init_weights=False,
                                                           task_type="CAUSAL_LM"), adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=TARGETS, init_weights=False, task_type="CAUSAL_LM"))
    miss_ext.peft.accelerate(model)
    seen = []
    inner = model.base_model.model
    handles = [inner.register_forward_pre_hook(lambda m, a, k: seen.append("pre"), with_kwargs=True),
               inner.register_forward_hook(lambda m, a, out: seen.append("post"))]
    ids = tokens(2, 5)
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids, adapter_names=["a", "b"])
    for handle in handles:
        handle.remove()
    assert seen == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("arch", ["longformer", "led"])
def test_longformer_attention_is_sequence_first_and_refuses_mixed_rows(arch):
    """Longformer's self-attention (and LED's encoder, built on it) transposes to (sequence, batch,
    features) before calling query/key/value: with as many sequences as (padded) tokens, rows got
    other adapters silently (row "a" off by 0.096 where the adapter's whole effect was 0.099)."""
    import transformers
    torch.manual_seed(0)
    if arch == "longformer":
        config = transformers.LongformerConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, attention_window=4, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=1)
        base, targets = transformers.LongformerModel(config), ["query", "key", "value"]
        kwargs = {}
    else:
        config = transformers.LEDConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, attention_window=4,
            max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, dropout=0.0,
            attention_dropout=0.0, pad_token_id=1)
        base, targets = transformers.LEDModel(config), ["query", "key", "value"]
        kwargs = {"decoder_input_ids": torch.randint(3, 64, (8, 3))}
    base = base.double().eval()
    peft = get_peft_model(base, MissConfig(r=4, target_modules=targets, init_weights=False), adapter_name="a")
    fast = miss_ext.peft.accelerate(peft)
    ids = torch.randint(3, 64, (8, 8))  # as many sequences as tokens: every shape check passes
    with torch.no_grad(), pytest.raises(ValueError, match=rf"mixed batches.*model_type '{arch}'"):
        fast(input_ids=ids, adapter_names=["a"] + ["__base__"] * 7, **kwargs)
    with torch.no_grad():
        want = fast(input_ids=ids, **kwargs).last_hidden_state
        torch.testing.assert_close(fast(input_ids=ids, adapter_names=["a"] * 8, **kwargs).last_hidden_state, want)


def test_base_model_methods_reached_through_the_peft_model_stay_bound_methods_for_their_users():
    """The adapter_names= wrapper of a base-model method reached through the PeftModel keeps what the
    bound method gave: equal on every read, its __self__ / __func__, picklable (a local function
    was none of these, where PEFT's bound method was)."""
    import pickle
    fast = miss_ext.peft.accelerate(get_peft_model(tiny_causal_lm("llama"), MissConfig(r=4, target_modules=["q_proj"])))
    method = fast.get_output_embeddings
    assert method == fast.get_output_embeddings and hash(method) == hash(fast.get_output_embeddings)
    assert method.__self__ is fast.base_model.model
    assert method.__func__ is type(fast.base_model.model).get_output_embeddings
    assert method() is fast.base_model.model.lm_head
    copy_of = pickle.loads(pickle.dumps(fast.get_output_embeddings))
    assert isinstance(copy_of(), torch.nn.Linear)


def test_a_base_model_generate_reached_through_the_tuner_repeats_names_for_the_models_generation_config():
    """peft.base_model.generate(..., adapter_names=) runs the base model's generate through the
    adapter_names= wrapper: the names are repeated for the model's own generation_config (num_beams
    shipped with a checkpoint) as in PeftModel.generate (the wrapper called the generate it had read
    before the call patched it: "adapter_names has 2 entries but the input has 4 sequences")."""
    base = tiny_causal_lm("llama")
    base.generation_config.num_beams = 2
    no_eos(base)
    fast = miss_ext.peft.accelerate(get_peft_model(base, MissConfig(r=4, target_modules=["q_proj"], init_weights=False),
                                                   adapter_name="a"))
    kwargs = dict(input_ids=tokens(batch=2, length=5), max_new_tokens=2, do_sample=False,
                  adapter_names=["a", "__base__"])
    torch.testing.assert_close(fast.base_model.generate(**kwargs), fast.generate(**kwargs), rtol=0, atol=0)


def test_rows_of_adapters_of_different_dtypes_match_each_adapter_alone():
    """The bank of a mixed batch is built in the promoted dtype of the named adapters' blocks: a
    float32 adapter's rows beside a bf16 adapter's are computed in float32, as set_adapter gives
    them (0.0038 off when the bank took the first block's dtype: a mutation audit, 2026-12-03)."""
    from torch import nn
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 32)), MissConfig(r=8, target_modules=["0"],
                                                                        init_weights=False))
    model.add_adapter("b", MissConfig(r=8, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    layer.miss_block["default"].data = layer.miss_block["default"].data.to(torch.bfloat16)
    miss_ext.peft.accelerate(model).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "b"])
        model.set_adapter("b")
        only_b = model(x)
    torch.testing.assert_close(mixed[1], only_b[1], rtol=1e-6, atol=1e-6)


def test_training_with_names_through_a_fullgraph_compiled_inner_model(dynamo_reset):
    """The inner model compiled with fullgraph=True under a names call made in eager mode with
    grad enabled: the layers' checkpoint check (which walks Python frames) stays out of the traced
    graph, and the gradients are eager's (a first version of the check broke the trace: found in
    a read-through, 2026-12-03; so did a check outside the graph in every compiled call, until it
    was kept to graphs traced inside a checkpoint: a review, 2026-12-04)."""
    base = no_eos(tiny_causal_lm("llama"))
    model = trainable_a_b(base)
    ids, names = tokens(3, 5), ["a", "b", "__base__"]
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.base_model.model.model = torch.compile(model.base_model.model.model, backend="aot_eager", fullgraph=True)
    model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    got = {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12, msg=n)
