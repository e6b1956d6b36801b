"""transformers.Trainer (on accelerate, CPU) trains MiSS models exactly like a hand-written loop,
and what it trained saves and reloads in PEFT's format.

(a) a tiny float64 Llama prepared with miss_ext.apply_miss, (b) a PEFT MiSS model after
miss_ext.peft.accelerate; every mode. The Trainer runs with its default optimizer (AdamW), linear
schedule and gradient clipping, with the hyper-parameters set below; the loop builds
torch.optim.AdamW, transformers.get_scheduler and clip_grad_norm_ itself from the same
TrainingArguments values. Batches come in dataset order (train_sampling_strategy="sequential")
and dropout is 0, so both runs see the same data and compute the same function. Nothing is
saved during training (save_strategy="no"); report_to=[].
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
pytest.importorskip("peft")
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402

import miss_ext  # noqa: E402
from miss_ext.peft import accelerate, is_accelerated  # noqa: E402
from tiny_models import MINI_R, R, TARGETS, peft_model, tiny_causal_lm, tokens  # noqa: E402

MODES = ["default", "mini", "bat"]
STEPS = 4
BATCH = 2
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 on both sides; only the optimizer's kernels may differ


class Sequences(torch.utils.data.Dataset):
    """STEPS * BATCH token sequences, each its own label (the model shifts them)."""

    def __init__(self):
        self.ids = tokens(batch=STEPS * BATCH, length=9, seed=7)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordingTrainer(transformers.Trainer):
    """Keeps each training step's loss as computed (the logged one is rounded)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
        self.losses.append((loss[0] if return_outputs else loss).detach().clone())
        return loss


def training_args(out_dir):
    return transformers.TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.01,
        max_grad_norm=0.5, train_sampling_strategy="sequential", logging_strategy="no", seed=0,
    )


def hand_loop(model, args, dataset):
    """The training loop written out: same batches in order, AdamW with the Trainer's
    hyper-parameters, its scheduler and gradient clipping. Returns the per-step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon, weight_decay=args.weight_decay)
    sched = transformers.get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(STEPS),
                                       num_training_steps=STEPS)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = dataset.ids[step * BATCH:(step + 1) * BATCH]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def blocks(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "miss_block" in n}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_both(model, tmp_path):
    """Trains `model` with the Trainer and a deep copy of it with the hand loop; checks they
    agree (losses, blocks) and that training moved the blocks. Returns the Trainer."""
    start = blocks(model)
    twin = copy.deepcopy(model)
    dataset = Sequences()
    args = training_args(tmp_path / "trainer")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    assert trainer.model is model and trainer.state.global_step == STEPS
    # The Trainer's optimizer is torch's AdamW (fused by default), applying the weight decay to the blocks.
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == args.weight_decay
               for p in g["params"]}
    assert all(id(p) in decayed for n, p in model.named_parameters() if "miss_block" in n)

    loop_losses = hand_loop(twin, args, dataset)
    assert len(trainer.losses) == STEPS
    torch.testing.assert_close(torch.stack(trainer.losses), torch.stack(loop_losses), **TOL)
    trained, looped = blocks(model), blocks(twin)
    assert trained.keys() == looped.keys() == start.keys() and len(trained) == 2 * len(TARGETS)
    for k in trained:
        torch.testing.assert_close(trained[k], looped[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-3  # it trained
    assert not torch.equal(trainer.losses[0], trainer.losses[-1])
    return trainer


@pytest.mark.parametrize("mode", MODES)
def test_trainer_on_apply_miss_model_matches_loop_and_loads_in_peft(mode, tmp_path):
    model = miss_ext.apply_miss(tiny_causal_lm("llama"), TARGETS, r=R, mode=mode, mini_r=MINI_R, init_weights=False)
    train_both(model, tmp_path)

    ids = tokens(batch=2, length=9, seed=8)
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(tiny_causal_lm("llama"), ids))  # the adapter matters
    miss_ext.save_adapter(model, str(tmp_path / "adapter"), task_type="CAUSAL_LM")
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path / "adapter"))
    assert not is_accelerated(loaded)  # PEFT's own code computes these logits
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_on_accelerated_peft_model_matches_loop_and_round_trips(mode, tmp_path):
    model = accelerate(peft_model(tiny_causal_lm("llama"), mode))
    train_both(model, tmp_path)
    assert is_accelerated(model)

    ids = tokens(batch=2, length=9, seed=8)
    expected = logits(model, ids)
    model.save_pretrained(str(tmp_path / "peft"))
    # PEFT loads it ...
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=1e-10, atol=1e-10)
    # ... and so does miss_ext, without PEFT; saved again by miss_ext, PEFT loads the same adapter.
    plain = miss_ext.load_adapter(tiny_causal_lm("llama"), str(tmp_path / "peft"))
    assert len(miss_ext.miss_layers(plain)) == 2 * len(TARGETS)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-10, atol=1e-10)
    miss_ext.save_adapter(plain, str(tmp_path / "again"), task_type="CAUSAL_LM")
    again = PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path / "again"))
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-10, atol=1e-10)
    saved = dict(model.named_parameters())
    for name, p in again.named_parameters():
        if "miss_block" in name:
            assert torch.equal(p, saved[name])  # the blocks survive both trips bit for bit


class SaveMissAdapter(transformers.TrainerCallback):
    """docs/multi_gpu.md's callback: each Trainer checkpoint also gets the adapter in PEFT's format."""

    def on_save(self, args, state, control, model=None, **kwargs):
        miss_ext.save_adapter(model, f"{args.output_dir}/checkpoint-{state.global_step}/adapter",
                              task_type="CAUSAL_LM", is_main_process=state.is_world_process_zero)


def test_trainer_checkpoints_hold_the_whole_model_and_the_callback_adds_the_adapter(tmp_path):
    """What docs/multi_gpu.md says of Trainer's own files: save_model and the checkpoints hold the
    whole model under MissLinear's names (no adapter_config.json: load_adapter and PeftModel
    refuse them), which apply_miss + load_state_dict restores; the callback writes a PEFT folder
    beside every checkpoint."""
    from safetensors.torch import load_file

    model = miss_ext.apply_miss(tiny_causal_lm("llama"), TARGETS, r=R, init_weights=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="steps", save_steps=2,
        disable_tqdm=True, per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-2,
        train_sampling_strategy="sequential", logging_strategy="no", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[SaveMissAdapter()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = tokens(batch=2, length=9, seed=8)
    expected = logits(model, ids)
    for step in (2, STEPS):
        assert (tmp_path / "out" / f"checkpoint-{step}" / "adapter" / "adapter_config.json").is_file()
    adapter = miss_ext.load_adapter(tiny_causal_lm("llama"), str(tmp_path / "out" / f"checkpoint-{STEPS}" / "adapter"))
    torch.testing.assert_close(logits(adapter, ids), expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        miss_ext.load_adapter(tiny_causal_lm("llama"), str(tmp_path / "final"))
    state = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.miss_block" in state
    again = miss_ext.apply_miss(tiny_causal_lm("llama"), TARGETS, r=R)
    again.load_state_dict(state)  # strict: every key of the adapted model, nothing else
    torch.testing.assert_close(logits(again, ids), expected, rtol=1e-10, atol=1e-10)
