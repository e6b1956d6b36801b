"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on 2 CPU gloo ranks: a tiny Llama with MiSS on
q/k/v/o/gate/up/down_proj, `fully_shard` on each decoder layer and on the root, so the frozen
base weights and the trainable miss_blocks are sharded DTensors (dim 0). Three AdamW steps,
compared with one process on the same global batches (tests/fsdp_models.py has both loops).
Everything distributed runs in two launches of 2 ranks (spawning costs seconds): all training
configs, then the checkpoint tests.

float64 runs (default, mini, bat, r = 3 with its uneven 2 + 1 row shards, default with dropout
0.2): gradients, blocks and losses agree with the single process to 1e-12 (float64 rounding of
different reduction orders; measured <= 5e-16). AdamW divides every gradient element by its
own running RMS, so a rounding difference in a near-zero gradient reaches the block as
lr * (relative error); in float64 that stays far below 1e-12. Because AdamW's step hardly
depends on the gradient's scale, a wrong averaging (sum instead of mean over ranks) would not
show in the blocks: the first step's gradients are compared too.

bfloat16 mixed precision (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, float32
model): see test_bf16_mixed_precision_matches_one_process for its two references and tolerances.

Saving: `miss_ext.save_adapter` on every rank gathers the sharded blocks (`DTensor.full_tensor()`,
a collective) and, by default, rank 0 writes (`is_main_process=True` makes every rank write, each
to its own path). It reshards FSDP2 modules first, so a model left unsharded (root-only sharding
after a no_grad forward) saves its float32 master blocks, not bf16 copies.

Distributed checkpointing (`torch.distributed.checkpoint` with the adapter-only state of
`get_state_dict(..., StateDictOptions(ignore_frozen_params=True))`: the blocks and their AdamW
state) resumes to exactly the step an uninterrupted run takes.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import miss_ext  # noqa: E402
from dist_util import run_ranks  # noqa: E402
from fsdp_models import (BANK_ADAPTERS, CONFIGS, DCP_MODES, LR, STEPS, make_model, reference_train)  # noqa: E402

WORLD = 2
N_BLOCKS = 14  # 7 targets x 2 layers
FP64_CONFIGS = [name for name, (*_, precision) in CONFIGS.items() if precision == "fp64"]
BF16_CONFIGS = [name for name, (*_, precision) in CONFIGS.items() if precision == "bf16"]
FP64_TOL = dict(rtol=0.0, atol=1e-12)
BF16_ULP = 2.0 ** -8  # bf16 keeps 8 significant bits: neighbouring values differ by 2^-8 relative
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def fsdp_runs(folder):
    """Every config trained under FSDP2, in one launch of 2 ranks."""
    return run_ranks(__import__("fsdp_models").fsdp_train, world_size=WORLD, args=(list(CONFIGS), folder), timeout=300)


@pytest.fixture(scope="module")
def checkpoint_runs(folder):
    """The DCP runs and the save after an eval forward, in a second launch."""
    return run_ranks(__import__("fsdp_models").checkpoint_launch, world_size=WORLD, args=(DCP_MODES, folder),
                     timeout=300)


_REFERENCES = {}


def reference(name, precision=None, chunked=False):
    """Single-process runs, cached for the module (several tests compare with the same one)."""
    key = (name, precision, chunked)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_train(name, WORLD, precision=precision, chunked=chunked)
    return _REFERENCES[key]


def max_diff(a, b):
    assert a.keys() == b.keys() and len(a) == N_BLOCKS
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def rel_dist(a, b, origin=None):
    """||a - b|| / ||b - origin|| over all blocks (origin: zeros). With origin = the initial
    blocks, this compares the training updates, a - init against b - init."""
    assert a.keys() == b.keys() and len(a) == N_BLOCKS
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt()
    den = sum(((b[k].double() - (0 if origin is None else origin[k].double())) ** 2).sum() for k in a).sqrt()
    return (num / den).item()


def assert_close_dicts(actual, expected, **tol):
    assert actual.keys() == expected.keys() and len(actual) == N_BLOCKS
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Sharding and the layer path
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_blocks_are_sharded_and_the_fused_path_runs_on_gathered_weights(fsdp_runs, name):
    """Every miss_block (also bat's (out/r, r, r) and r = 3's uneven rows) is a DTensor sharded
    along dim 0 across the 2 ranks; in the forward, FSDP's pre-forward hook on the decoder layer
    has put plain unsharded parameters (bf16 under mixed precision) in place, so every MissLinear
    sees a plain nn.Linear and takes the fused op. The ranks end with the same whole blocks, and
    the blocks moved."""
    mode, r, _, precision = CONFIGS[name]
    full = {k: tuple(v.shape) for k, v in fsdp_runs[0][name]["init"].items()}
    assert len(full) == N_BLOCKS
    for rank in range(WORLD):
        local = fsdp_runs[rank][name]["local"]
        assert local.keys() == full.keys()
        for k, (shape, placements, is_dtensor) in local.items():
            rows = full[k][0]
            own = -(-rows // WORLD) if rank == 0 else rows - -(-rows // WORLD)  # torch.chunk's split
            assert is_dtensor and placements == "(Shard(dim=0),)", (k, placements)
            assert shape == (own,) + full[k][1:], (k, rank, shape, full[k])
    expected_dtype = torch.bfloat16 if precision == "bf16" else torch.float64
    for rank in range(WORLD):
        assert fsdp_runs[rank][name]["paths"] == [(True, "Parameter", "Parameter", expected_dtype)]
    first = {k: v for k, v in full.items() if k.startswith("model.layers.0.self_attn.q_proj")}
    assert list(first.values())[0] == {"default": (r, 32), "mini": (r, 4), "bat": (8, r, r)}[mode]
    a, b = fsdp_runs[0][name]["blocks"], fsdp_runs[1][name]["blocks"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max_diff(a, fsdp_runs[0][name]["init"]) > LR  # about STEPS * LR


# ---------------------------------------------------------------------------------------------
# Training against one process
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FP64_CONFIGS)
def test_fp64_training_matches_one_process(fsdp_runs, name):
    """float64: the first step's averaged gradients, the blocks after STEPS AdamW steps and the
    losses equal the single process's on the same global batch to 1e-12. With dropout, the
    reference runs each rank's micro-batch from that rank's generator state (its dropout keys),
    and the whole-batch run (other masks) must differ, or the dropout would not be tested."""
    _, _, p, _ = CONFIGS[name]
    run = fsdp_runs[0][name]
    ref = reference(name, chunked=p > 0)
    assert_close_dicts(run["init"], ref["init"], rtol=0, atol=0)
    assert_close_dicts(run["grads"], ref["grads"], **FP64_TOL)
    assert_close_dicts(run["blocks"], ref["blocks"], **FP64_TOL)
    losses = torch.stack([fsdp_runs[rank][name]["losses"] for rank in range(WORLD)], dim=1)  # (STEPS, WORLD)
    if p > 0:
        torch.testing.assert_close(losses, ref["losses"], rtol=1e-12, atol=0)
        assert max_diff(run["blocks"], reference(name)["blocks"]) > 1e-3
    else:  # equal token counts per rank: the mean of the ranks' mean losses is the global mean
        torch.testing.assert_close(losses.double().mean(1), ref["losses"].double(), rtol=1e-6, atol=0)
    assert losses.shape == (STEPS, WORLD) and max_diff(run["blocks"], run["init"]) > LR


@pytest.mark.parametrize("name", BF16_CONFIGS)
def test_bf16_mixed_precision_matches_one_process(fsdp_runs, name):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on a float32 model, three AdamW
    steps on the float32 shards. Two single-process references on the same global batches:

    1. The same arithmetic: a bf16 copy of the model whose parameters are the float32 master
       parameters cast to bf16 each step, each rank's micro-batch as its own forward/backward,
       the bf16 gradients cast to float32 and averaged. Tolerance: one bf16 rounding, 2^-8
       relative (losses elementwise; gradients and block updates `blocks - init` as relative
       norms over all blocks), so a rounding that comes out differently (another CPU's kernels)
       passes. Measured: bitwise equal.
    2. The exact result, float32 without mixed precision. bf16 errors reach the blocks through
       AdamW's per-element normalisation (a near-zero gradient element whose sign flips under
       rounding moves by up to 2 lr), so no rounding-count bound is useful here; instead
       FSDP's distance from float32 is compared with the spread of an independent bf16 run,
       one process in bf16 on the whole global batch (other GEMM shapes, other rounding):
       FSDP's distance must be at most 1.5x that spread + 2^-8. Measured ratios 0.98 - 1.04
       (update distances 5 - 21 %, mini highest: its 16-element blocks have few elements to
       average over); a broken bf16 path (adapter term lost, block not updated) is at 100 %.
       The first step's loss (before training separates the runs) is within 2^-8 relative of
       float32's (measured <= 1.1e-4)."""
    run = fsdp_runs[0][name]
    losses = torch.stack([fsdp_runs[rank][name]["losses"] for rank in range(WORLD)], dim=1)
    same = reference(name, chunked=True)
    assert_close_dicts(run["init"], same["init"], rtol=0, atol=0)
    torch.testing.assert_close(losses, same["losses"], rtol=BF16_ULP, atol=0)
    assert rel_dist(run["grads"], same["grads"]) <= BF16_ULP
    assert rel_dist(run["blocks"], same["blocks"], run["init"]) <= BF16_ULP

    fp32, bf16_whole = reference(name, precision="fp32"), reference(name)
    for key, origin in (("grads", None), ("blocks", run["init"])):
        spread = rel_dist(bf16_whole[key], fp32[key], origin)
        assert 0 < spread < 0.5, (key, spread)  # the independent bf16 run is itself sane
        assert rel_dist(run[key], fp32[key], origin) <= 1.5 * spread + BF16_ULP, key
    torch.testing.assert_close(losses[0].double().mean(), fp32["losses"][0].double(), rtol=BF16_ULP, atol=0)
    assert max_diff(run["blocks"], run["init"]) > LR


# ---------------------------------------------------------------------------------------------
# save_adapter from the sharded model
# ---------------------------------------------------------------------------------------------
def read(path):
    with open(os.path.join(path, CONFIG)) as f:
        return load_file(os.path.join(path, WEIGHTS)), json.load(f)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_adapter_from_sharded_model_writes_the_full_adapter(fsdp_runs, folder, tmp_path, name):
    """Before training, the sharded model's adapter files equal, bitwise, those one process
    writes for the same (unsharded) model: every key, the whole blocks (not a shard), dtypes
    (float32 master blocks under bf16 mixed precision) and the config. After training, the file
    holds the blocks the ranks gathered, bitwise, with the single process's keys and config."""
    mode, r, p, precision = CONFIGS[name]
    single = make_model(mode, r, p, "fp64" if precision == "fp64" else "fp32")
    miss_ext.save_adapter(single, str(tmp_path / "single"))
    expected_tensors, expected_config = read(str(tmp_path / "single"))
    assert len(expected_tensors) == N_BLOCKS

    tensors, config = read(os.path.join(folder, name, "init"))
    assert config == expected_config
    assert tensors.keys() == expected_tensors.keys()
    for k, v in expected_tensors.items():
        assert tensors[k].dtype == v.dtype and tensors[k].shape == v.shape, k
        assert torch.equal(tensors[k], v), k

    tensors, config = read(os.path.join(folder, name, "trained"))
    assert config == expected_config
    gathered = fsdp_runs[0][name]["blocks"]
    assert tensors.keys() == {f"base_model.model.{k}" for k in gathered}
    for k, v in gathered.items():
        assert torch.equal(tensors[f"base_model.model.{k}"], v), k
    assert max_diff(gathered, fsdp_runs[0][name]["init"]) > LR  # the trained file is not the initial one


def test_save_adapter_on_sharded_model_writes_on_rank_0_unless_told(fsdp_runs, folder):
    """By default only rank 0 writes (every rank gathers); with is_main_process=True every rank
    writes, here each to its own path, the same bytes of tensors."""
    name = "default"
    base = os.path.join(folder, name)
    assert os.path.isfile(os.path.join(base, "default0", WEIGHTS))
    assert not os.path.exists(os.path.join(base, "default1"))
    trained, trained_config = read(os.path.join(base, "trained"))
    for path in ("default0", "own0", "own1"):
        tensors, config = read(os.path.join(base, path))
        assert config == trained_config and tensors.keys() == trained.keys()
        assert all(torch.equal(tensors[k], trained[k]) for k in trained), path


def test_save_adapter_after_eval_forward_writes_the_float32_master_blocks(checkpoint_runs, folder, tmp_path):
    """fully_shard on the root only with a bf16 MixedPrecisionPolicy, then a forward under
    no_grad: FSDP2 leaves the root's parameters unsharded (checked: each block is a plain bf16
    gathered copy). save_adapter reshards first, so rank 0 writes the float32 master blocks,
    bitwise those one process writes, and rank 1 writes nothing."""
    for rank in range(WORLD):
        assert checkpoint_runs[rank]["eval_save"] == ("Parameter", torch.bfloat16, (4, 32))
    single = make_model("default", 4, 0.0, "fp32")
    miss_ext.save_adapter(single, str(tmp_path / "single"))
    expected_tensors, expected_config = read(str(tmp_path / "single"))
    tensors, config = read(os.path.join(folder, "eval-save", "default0"))
    assert config == expected_config and tensors.keys() == expected_tensors.keys()
    for k, v in expected_tensors.items():
        assert v.dtype == torch.float32 and torch.equal(tensors[k], v), k
    assert not os.path.exists(os.path.join(folder, "eval-save", "default1"))


# ---------------------------------------------------------------------------------------------
# Distributed checkpointing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", DCP_MODES)
def test_dcp_adapter_only_checkpoint_resumes_to_the_same_step(checkpoint_runs, mode):
    """Train 2 steps, save the adapter-only state (14 blocks and their AdamW state, no frozen
    base weights) with torch.distributed.checkpoint, train 1 more step -> A. A fresh sharded
    model that starts from other blocks and a fresh optimizer load it and train the same step
    -> B. A == B bitwise, on both ranks. Controls: the load really replaced the fresh blocks
    (loaded == saved != fresh), and without the optimizer state the step differs (C != A)."""
    for rank in range(WORLD):
        run = checkpoint_runs[rank]["dcp"][mode]
        assert len(run["model_keys"]) == N_BLOCKS and all(k.endswith(".miss_block") for k in run["model_keys"])
        assert run["optim_state_keys"] == run["model_keys"]
        assert max_diff(run["fresh"], run["saved"]) > 0.1
        assert_close_dicts(run["loaded"], run["saved"], rtol=0, atol=0)
        assert max_diff(run["A"], run["saved"]) > LR / 2  # the resumed step moved the blocks
        assert_close_dicts(run["B"], run["A"], rtol=0, atol=0)
        assert max_diff(run["C"], run["A"]) > LR / 10


def test_dcp_checkpoint_of_a_sharded_bank_resumes_into_an_empty_bank(checkpoint_runs):
    """fsdp_models.bank_dcp_resume: the empty bank took the adapters' names from the checkpoint,
    loaded the saved blocks, and the resumed step equals the uninterrupted one bitwise (A == B,
    dropout and a mini adapter included). Controls: the bank really changed at the load (an
    empty bank is zeros) and the step moved it."""
    for rank in range(WORLD):
        run = checkpoint_runs[rank]["bank_dcp"]
        assert run["names"] == [name for name, *_ in BANK_ADAPTERS], run["names"]
        assert run["saved"] and all(v.abs().max() > 0.01 for v in run["saved"].values())
        assert_close_dicts(run["loaded"], run["saved"], rtol=0, atol=0)
        assert max_diff(run["A"], run["saved"]) > LR / 2
        assert_close_dicts(run["B"], run["A"], rtol=0, atol=0)


def test_load_adapter_into_a_sharded_model(checkpoint_runs):
    """Each rank keeps its shard of the loaded file: the gathered blocks equal the source's. A
    load that failed part way first left every shard as it was (the undo's DTensor copies)."""
    for rank, run in enumerate(checkpoint_runs):
        source, before, failed, after = run["load_sharded"]
        assert before.keys() == source.keys() == failed.keys() == after.keys() and len(source) == N_BLOCKS
        for name in source:
            assert not torch.equal(before[name], source[name]), f"rank {rank} {name}: nothing to load"
            assert torch.equal(failed[name], before[name]), f"rank {rank} {name}: the failed load changed it"
            assert torch.equal(after[name], source[name]), f"rank {rank} {name}"


def test_a_sharded_peft_model_is_saved_by_the_recipe_save_adapter_names(checkpoint_runs):
    """save_adapter refuses a PEFT model; under FSDP2 its message gives the gathered-state-dict
    call PEFT's save_pretrained needs there, and that call writes the model's blocks."""
    for rank, run in enumerate(checkpoint_runs):
        got = run["peft_save"]
        assert got["message"] is not None and "it is a PEFT model" in got["message"], got["message"]
        assert ("state_dict=get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, "
                "ignore_frozen_params=True)), is_main_process=torch.distributed.get_rank() == 0)") in got["message"]
        written = {k.replace("base_model.model.", ""): v for k, v in got["written"].items()}
        before = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in got["before"].items()}
        assert written.keys() == before.keys() and len(written) == 2, (written.keys(), before.keys())
        for name, value in before.items():
            assert not torch.equal(value, torch.zeros_like(value)) and torch.equal(written[name], value), name


def test_unsharded_models_and_wrappers(checkpoint_runs):
    """fsdp_models.unsharded_and_wrapped: loads reach the sharded parameters even when a forward
    left the root unsharded, a layer's merge() and merge_and_unload refuse layers under FSDP2 (even
while a forward left them holding plain gathered copies), apply_miss refuses sharded layers, modules_to_save
    values reach a sharded head, a sharded bank refuses slot changes and saves whole blocks, and
    DDP wrappers are looked through (and refuse new adapters)."""
    for rank, run in enumerate(checkpoint_runs):
        u = run["unsharded"]
        assert u["unsharded_type"] == "Parameter", u  # the state under test: FSDP's gathered copy
        assert u["load_gap"] == 0.0, (rank, u["load_gap"])
        assert u["layer_weight_type"] == "Parameter", u  # FSDP's gathered copy, not a DTensor
        assert u["layer_merge_error"] is not None and "FSDP2" in u["layer_merge_error"], u
        assert not u["layer_merged"], u
        assert u["merge_error"] is not None and "FSDP2" in u["merge_error"], u
        assert u["still_adapted"] == N_BLOCKS
        assert u["apply_error"] is not None and "sharded over 2 ranks" in u["apply_error"], u
        assert u["extras_gap"] == 0.0, (rank, u["extras_gap"])
        assert u["bank_error"] is not None and "sharded bank" in u["bank_error"], u
        assert u["bank_gap"] == 0.0, (rank, u["bank_gap"])
        assert u["ddp_keys"][0].startswith("base_model.model.model.layers."), u["ddp_keys"]
        assert u["ddp_wrote"] == (rank == 0), (rank, u["ddp_wrote"])
        assert u["ddp_apply_error"] is not None and "DistributedDataParallel" in u["ddp_apply_error"], u
        assert u["ddp_load_gap"] == 0.0, (rank, u["ddp_load_gap"])
        assert u["ddp_extras_error"] is not None and "modules_to_save or biases" in u["ddp_extras_error"], u
        assert u["ddp_bank_error"] is not None and "DistributedDataParallel" in u["ddp_bank_error"], u
        assert u["ddp_written"] == [rank == 0, rank == 0], (rank, u["ddp_written"])


def test_unsharded_roots_and_roots_above_the_model(checkpoint_runs):
    """fsdp_models.roots_above_and_exports: FSDP2's gathered copies are not taken for plain
    weights (apply_miss / apply_bank refuse), a fully_shard wrapper above the model passed in is
    resharded (save_adapter writes float32 masters on rank 0 only, load_adapter reaches the
    blocks), and export_lora gathers sharded blocks (rank 0 writes one process's file)."""
    for rank, run in enumerate(checkpoint_runs):
        u = run["roots_above"]
        assert u["apply_miss"] is not None and "sharded over 2 ranks" in u["apply_miss"], u
        assert u["apply_bank"] is not None and "sharded over 2 ranks" in u["apply_bank"], u
        assert u["still_plain"], u
        assert u["above_block_dtype"] == torch.bfloat16, u  # the state under test: FSDP's bf16 copies
        assert u["above_wrote"] == [rank == 0, rank == 0], (rank, u["above_wrote"])
        assert u["above_gap"] == 0.0 and u["above_dtypes"] == ["torch.float32"], u
        assert u["above_lora_gap"] == 0.0, u
        assert u["above_load_gap"] == 0.0, u
        assert u["sharded_lora_wrote"] == (rank == 0), (rank, u["sharded_lora_wrote"])
        assert u["sharded_lora_gap"] == 0.0, u


def test_the_first_rank_holding_a_model_writes_it_and_fsdp1_is_refused(tmp_path):
    """World 3: see fsdp_models.writers_and_fsdp1."""
    results = run_ranks(__import__("fsdp_models").writers_and_fsdp1, world_size=3, args=(str(tmp_path),), timeout=300)
    for rank, result in enumerate(results):
        # Rank 0 writes model A; rank 1 (not 2) writes model B, in DDP and under FSDP2.
        assert result["written"] == ["ddp0", "ddp1", "fully_shard1"], (rank, result["written"])
        for name, error in result["refusals"].items():
            assert error is not None and error.startswith(f"{name}: the model is wrapped in FSDP1"), (rank, name, error)
        assert not any(n.startswith(("fsdp1-", "lora1-")) for n in result["left"]), (rank, result["left"])


def test_a_sharded_bank_holding_gradients_loads_slots_that_changed_hands():
    """set_model_state_dict of a bank whose slots hold other adapters, onto an FSDP2 bank whose
    gradients are sharded DTensors: it loads, every layer the same, and the slots that changed
    hands have zero gradients (fsdp_models.bank_load_with_sharded_grads)."""
    from fsdp_models import bank_load_with_sharded_grads
    for result in run_ranks(bank_load_with_sharded_grads, world_size=WORLD, timeout=300):
        assert result["names"] and all(names == ["b", "a", None] for names in result["names"])
        for sums in result["grad_sums"]:
            assert sums == [0.0, 0.0, 0.0]
