"""The model-level functions through model wrappers: torch.compile, DataParallel (on the CPU it
calls the module) and DistributedDataParallel on a one-rank gloo group, in this process. A sweep
of every function under every wrapper (2026-12-06) found the cases below; multi-rank DDP and
FSDP2 runs are in tests/test_ddp.py and tests/test_fsdp.py."""
import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from peft import MissConfig, get_peft_model  # noqa: E402

import miss_ext  # noqa: E402
from conftest import assert_unchanged, snapshot  # noqa: E402
from tiny_models import R, tiny_causal_lm, tokens  # noqa: E402


def ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def tiny_t5():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).double().eval()


# DataParallel moves its module to the first GPU where one is visible: there the DDP case checks
# the same lookup.
@pytest.mark.parametrize("wrapper", [
    pytest.param("DataParallel", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                          reason="DataParallel moves the model to the GPU")),
    "DistributedDataParallel"])
def test_mixed_batch_expand_finds_the_encoder_inside_the_wrapper(tmp_path, gloo_world, wrapper):
    """bank_model.mixed_batch asks the model inside DDP / DataParallel for its encoder (they do not
    forward attribute reads, torch.compile's wrapper does): the encoder of a wrapped T5 got the
    repeated ids and refused them."""
    source = tiny_t5()
    torch.manual_seed(1)
    miss_ext.apply_miss(source, ["q", "v"], r=4, init_weights=False)
    miss_ext.save_adapter(source, tmp_path / "a")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    outputs = []
    for wrap in (lambda m: m, nn.DataParallel if wrapper == "DataParallel" else ddp):
        model = miss_ext.load_bank(tiny_t5(), {"a": str(tmp_path / "a")})
        with torch.no_grad(), miss_ext.mixed_batch(wrap(model), ["a", None], expand=2):
            outputs.append(model.generate(input_ids=ids, num_beams=2, max_new_tokens=4, do_sample=False))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)


@pytest.mark.parametrize("call", ["apply_miss", "load_bank"])
def test_a_wrapped_peft_model_is_refused_with_the_same_type_error(gloo_world, call):
    """A PeftModel's TypeError comes before the DDP refusal in apply_miss and load_bank, as in
    apply_bank and load_adapter (they raised DDP's ValueError first)."""
    peft_model = get_peft_model(tiny_causal_lm("llama"), MissConfig(r=R, target_modules=["q_proj"]))
    run = {"apply_miss": lambda m: miss_ext.apply_miss(m, ["v_proj"], r=2),
           "load_bank": lambda m: miss_ext.load_bank(m, {"a": "/nonexistent"})}[call]
    for model in (peft_model, ddp(peft_model)):
        with pytest.raises(TypeError, match="PEFT"):
            run(model)


def test_load_adapter_refuses_to_freeze_what_ddp_trains(tmp_path, gloo_world):
    """adapter_files.load_adapter: with freeze_others=True a load into existing layers of a
    DDP-wrapped model froze parameters DDP registered as trainable; its next training step
    failed in DDP's reducer. Refused now, the model as it was; freeze_others=False loads."""
    source = miss_ext.apply_miss(tiny_causal_lm("llama"), ["q_proj"], r=R, init_weights=False)
    miss_ext.save_adapter(source, tmp_path / "a")
    model = miss_ext.apply_miss(tiny_causal_lm("llama"), ["q_proj"], r=R, freeze_others=False)
    wrapped = ddp(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"DistributedDataParallel, which registered .* as trainable, and "
                                         r"freeze_others=True would freeze them"):
        miss_ext.load_adapter(wrapped, tmp_path / "a")
    assert_unchanged(model, snap)
    miss_ext.load_adapter(wrapped, tmp_path / "a", freeze_others=False)
    ids = tokens()
    for _ in range(2):  # DDP's reducer checks the previous step's gradients at the next one
        wrapped(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.miss_block,
                               source.model.layers[0].self_attn.q_proj.miss_block, rtol=0, atol=0)


def test_ddp_with_find_unused_parameters_loads_and_merges_without_complaint(tmp_path, gloo_world):
    """model.ddp_needs_every_gradient: a DDP built with find_unused_parameters=True trains on when
    a registered parameter stops getting a gradient, so load_adapter's freeze is not refused there
    and merge_and_unload does not warn (a review, 2026-12-06)."""
    source = miss_ext.apply_miss(tiny_causal_lm("llama"), ["q_proj"], r=R, init_weights=False)
    miss_ext.save_adapter(source, tmp_path / "a")
    model = miss_ext.apply_miss(tiny_causal_lm("llama"), ["q_proj"], r=R, freeze_others=False)
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    miss_ext.load_adapter(wrapped, tmp_path / "a")
    ids = tokens()
    for _ in range(2):
        wrapped(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        miss_ext.merge_and_unload(wrapped)
    with torch.no_grad():
        wrapped(input_ids=ids)


def test_reset_parameters_of_a_sharded_random_block_draws_its_shard_of_the_same_values(gloo_world):
    """modules.peft_random_init_ on a DTensor block (FSDP2's usual init: build on meta,
    fully_shard, to_empty, reset_parameters): the shard of the draw a plain layer makes for the
    same seed (the copy of a plain draw into a DTensor raised, a review, 2026-12-06)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
        miss_ext.apply_miss(model, ["0"], r=4, init_weights=False)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model[0].reset_parameters()
    plain = miss_ext.MissLinear(nn.Linear(16, 8), r=4, init_weights=False)
    torch.manual_seed(0)
    plain.reset_parameters()
    assert type(model[0].miss_block).__name__ == "DTensor"
    torch.testing.assert_close(model[0].miss_block.full_tensor(), plain.miss_block.detach(), rtol=0, atol=0)


def test_merge_and_unload_through_ddp_warns_that_the_wrapper_cannot_train(gloo_world):
    """model.merge_and_unload: DDP registered the miss_blocks it removes, so a later training
    step through the wrapper fails in DDP's reducer; it merges (inference is right) and warns."""
    model = miss_ext.apply_miss(tiny_causal_lm("llama"), ["q_proj"], r=R, init_weights=False)
    plain = copy.deepcopy(model)
    wrapped = ddp(model)
    with pytest.warns(UserWarning, match=r"wrapped in DistributedDataParallel, which registered the miss_block"):
        assert miss_ext.merge_and_unload(wrapped) is wrapped
    miss_ext.merge_and_unload(plain)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
