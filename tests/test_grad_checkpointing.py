"""Gradient (activation) checkpointing with MiSS dropout: the recomputed forward must draw the
same dropout key, hence the same mask, as the original one, or the gradients belong to another
mask than the output.

MissLinear draws its key with `torch.randint` on the data's device (miss_ext.new_dropout_key), and
torch.utils.checkpoint (reentrant and not) saves the CPU generator and the generators of the
inputs' devices before the forward and restores them for the recompute (preserve_rng_state=True,
its default). So checkpointed gradients equal the plain run's with the same seed, bit for bit;
the controls show that a different seed, or a recompute that does not restore the generator
(preserve_rng_state=False), changes them, so the equality is not vacuous.

Layers and stacks: torch.utils.checkpoint.checkpoint directly. Models: transformers'
gradient_checkpointing_enable (deprecated alias in transformers 5.x) and
activation_checkpointing_enable, with use_reentrant True and False, on a tiny float64 Llama with
miss_ext.apply_miss and on an accelerated PEFT MiSS model.
"""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import miss_ext
from conftest import rand
from tiny_models import MINI_R, R, TARGETS, peft_model, tiny_causal_lm, tokens

P = 0.3
MODES = ["default", "mini"]  # bat ignores dropout
ENTRY_POINTS = ["gradient_checkpointing_enable", "activation_checkpointing_enable"]


def layer_or_stack(kind, mode, device):
    """One MissLinear (in 42, out 24: in % r != 0), or a stack of two with a nonlinearity (two
    keys drawn inside one checkpointed region, in the same order in the recompute)."""
    def miss(i, o):
        base = nn.Linear(i, o, dtype=torch.float64, device=device)
        return miss_ext.MissLinear(base, r=R, mode=mode, mini_r=MINI_R, dropout=P, init_weights=False)

    module = miss(42, 24) if kind == "layer" else nn.Sequential(miss(42, 24), nn.Tanh(), miss(24, 12))
    return module.train()


def layer_run(module, x, grad_out, seed, ckpt=None, preserve=True):
    """(output, x.grad, block grads) of one forward/backward from `seed`; ckpt: None (plain) or
    use_reentrant True/False."""
    torch.manual_seed(seed)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if ckpt is None:
        y = module(x)
    else:
        y = checkpoint(module, x, use_reentrant=ckpt, preserve_rng_state=preserve)
    y.backward(grad_out)
    blocks = [p.grad.clone() for n, p in module.named_parameters() if n.endswith("miss_block")]
    return [y.detach(), x.grad] + blocks


def assert_all_equal(a, b, exact=True):
    """Bit for bit (CPU), or within 1e-12 (CUDA: GEMM algorithms are free to differ between runs;
    a different mask changes these gradients by 1e-2 and more)."""
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        diff = (u - v).abs().max().item()
        assert torch.equal(u, v) if exact else diff <= 1e-12, f"tensor {i}: max diff {diff:.3g}"


def assert_grads_differ(a, b):
    """Every gradient (x and each block) differs."""
    for i, (u, v) in enumerate(zip(a[1:], b[1:]), 1):
        assert (u - v).abs().max() > 1e-6, f"gradient {i} did not change"


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["layer", "stack"])
def test_checkpoint_recomputes_the_same_mask(device, kind, mode, reentrant):
    module = layer_or_stack(kind, mode, device)
    x = rand(3, 5, 42, dtype=torch.float64, device=device)
    grad_out = rand(3, 5, 24 if kind == "layer" else 12, dtype=torch.float64, device=device)
    plain = layer_run(module, x, grad_out, seed=11)
    ckpt = layer_run(module, x, grad_out, seed=11, ckpt=reentrant)
    assert_all_equal(ckpt, plain, exact=device == "cpu")
    # Controls: another seed draws another mask (output and every gradient change) ...
    other = layer_run(module, x, grad_out, seed=12)
    assert (other[0] - plain[0]).abs().max() > 1e-6
    assert_grads_differ(other, plain)
    # ... and a recompute that draws a fresh key gives the original output with other gradients.
    fresh = layer_run(module, x, grad_out, seed=11, ckpt=reentrant, preserve=False)
    assert (fresh[0] - plain[0]).abs().max() <= (0.0 if device == "cpu" else 1e-12)
    assert_grads_differ(fresh, plain)


def test_eval_mode_needs_no_rng(device):
    """Without dropout (eval) nothing is drawn: a recompute without restoring the generator is exact."""
    module = layer_or_stack("stack", "default", device).eval()
    x = rand(2, 7, 42, dtype=torch.float64, device=device)
    grad_out = rand(2, 7, 12, dtype=torch.float64, device=device)
    plain = layer_run(module, x, grad_out, seed=5)
    for reentrant in (True, False):
        assert_all_equal(layer_run(module, x, grad_out, seed=6, ckpt=reentrant, preserve=False), plain,
                         exact=device == "cpu")


# ---- transformers models ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def base():
    return tiny_causal_lm("llama")


def adapted(base, flavour, mode, device):
    if flavour == "apply_miss":
        model = miss_ext.apply_miss(copy.deepcopy(base), TARGETS, r=R, mode=mode, mini_r=MINI_R, dropout=P,
                                    init_weights=False)
    else:
        pytest.importorskip("peft")
        from miss_ext.peft import accelerate

        model = accelerate(peft_model(base, mode, dropout=P))
    return model.to(device).train()


def enable(model, entry, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.x
        if entry == "gradient_checkpointing_enable":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def model_run(model, ids, seed):
    """(loss, block grads, calls per MLP) of one training step's forward/backward. The MLPs
    (modules inside the checkpointed decoder-layer forward, not adapted layers, whose path
    hooks would change) run twice per step when checkpointing is on."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = []
    layers = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in layers]
    try:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "miss_block" in n}
    assert len(grads) == 2 * len(TARGETS)
    return loss.detach(), grads, len(calls) / len(layers)


def max_grad_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flavour", ["apply_miss", "peft"])
def test_transformers_checkpointing_matches_plain_gradients(base, device, flavour, mode, entry, reentrant):
    if not hasattr(base, entry):  # activation_checkpointing_enable is transformers 5.2x's new name
        import transformers
        pytest.skip(f"transformers {transformers.__version__} has no {entry}")
    model = adapted(base, flavour, mode, device)
    ids = tokens(batch=2, length=9).to(device)
    loss, grads, calls = model_run(model, ids, seed=21)
    assert calls == 1
    enable(model, entry, {"use_reentrant": reentrant})
    ck_loss, ck_grads, ck_calls = model_run(model, ids, seed=21)
    assert ck_calls == 2  # every layer ran again in the backward: checkpointing is on
    tol = 0.0 if device == "cpu" else 1e-12  # bit for bit on the CPU (see assert_all_equal)
    assert max_grad_diff(ck_grads, grads) <= tol
    assert (ck_loss - loss).abs() <= tol
    # Controls: another seed, or a recompute with a fresh key, changes the gradients.
    _, other, _ = model_run(model, ids, seed=22)
    assert max_grad_diff(other, grads) > 1e-6
    enable(model, entry, {"use_reentrant": reentrant, "preserve_rng_state": False})
    fresh_loss, fresh, fresh_calls = model_run(model, ids, seed=21)
    assert fresh_calls == 2 and (fresh_loss - loss).abs() <= tol
    assert max_grad_diff(fresh, grads) > 1e-6


SAC_CASES = {  # name: (mode, base dtype, MISS_EXT_GEMM, autocast): each path that adds the term in place
    "default": ("default", torch.float64, None, False),     # y.addmm_(s, block)
    "mini": ("mini", torch.float64, None, False),           # tile_add_(y, s @ block)
    "bf16_default": ("default", torch.bfloat16, None, False),  # fp32 block: tile_add_
    "bf16_split": ("default", torch.bfloat16, "split", False),  # addmm_split_
    "autocast": ("default", torch.float32, None, True),     # the autocast kernel's addmm_
}


@pytest.mark.parametrize("saved", ["aten.linear.default", "aten.addmm_.default", "miss.tile_add_.default", "all"])
@pytest.mark.parametrize("case", sorted(SAC_CASES))
def test_selective_checkpointing_gives_the_plain_gradients(device, case, saved, monkeypatch):
    """Selective activation checkpointing (torch.utils.checkpoint's context_fn) with a policy that
    saves an ATen op inside miss.linear's forward: the forward added the adapter term into the
    base GEMM's output in place, below autograd (no version bump), so the cached output got the
    term twice in the recompute (saving aten.linear) or the recomputed one never (saving the
    in-place op): gradients 10-28 off, silently (an autograd-ecosystem review, 2026-12-03). Under
    a dispatch mode the composite now adds out of place (csrc/ops/common/in_place.h)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    mode, dtype, gemm, autocast = SAC_CASES[case]
    if gemm is not None:
        monkeypatch.setenv("MISS_EXT_GEMM", gemm)
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(10, 20, dtype=dtype, device=device), r=R, mode=mode, mini_r=MINI_R,
                                dropout=P, init_weights=False)
    with torch.no_grad():
        layer.miss_block.normal_()
    x = torch.randn(5, 10, dtype=dtype, device=device, requires_grad=True)

    def fn(x):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return layer(x).float().sin()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if saved in ("all", str(op)) else CheckpointPolicy.PREFER_RECOMPUTE

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)  # the same dropout key in both runs
        x.grad = layer.miss_block.grad = None
        y = checkpoint(fn, x, use_reentrant=False,
                       context_fn=functools.partial(create_selective_checkpoint_contexts, policy)) \
            if checkpointed else fn(x)
        y.sum().backward()
        grads.append((y.detach(), x.grad, layer.miss_block.grad))
    # Bit for bit on the CPU (the same BLAS calls, in place or not); on CUDA cuBLAS may pick another
    # kernel for an out-of-place GEMM: dtype tolerances there (the defect was 10-28 off).
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, **exact)
