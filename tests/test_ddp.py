"""DistributedDataParallel on 2 CPU gloo ranks: a tiny float32 Llama with MiSS on
q/k/v/o/gate/up/down_proj in every mode (dropout 0.2 in default and mini), three AdamW steps,
against one process on the same global batches (tests/dist_models.py has both loops).

Rank keys: rank r seeds torch's generator with BASE_SEED + r before training (as
`accelerate.utils.set_seed(seed, device_specific=True)` does), so the ranks draw different
dropout keys; the reference reproduces them by running rank r's micro-batch as its own forward
from rank r's generator state and averaging the gradients as DDP does.

float32, as in real training. Tolerances: the gradients agree to float32 rounding (different
thread counts and GEMM shapes). AdamW divides each gradient element by its own running RMS, so a
rounding difference in a near-zero gradient element reaches the block as lr * (relative error);
the blocks are compared with atol 1e-4 (1 % of one lr = 1e-2 step), far below what a wrong mask
or a wrong averaging gives (5e-2 and more, checked below).
"""
import pytest
import torch

pytest.importorskip("transformers")

from dist_models import BASE_SEED, CONFIGS, STEPS, ddp_train, make_model, rank_seed, reference_train  # noqa: E402
from dist_util import run_ranks  # noqa: E402

WORLD = 2
DROPOUT_CONFIGS = [name for name, (_, p) in CONFIGS.items() if p > 0]
BLOCK_TOL = dict(rtol=0.0, atol=1e-4)
GRAD_TOL = dict(rtol=1e-4, atol=1e-7)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
SEEDS = [rank_seed(BASE_SEED, r) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_runs():
    """Every config trained under DDP, all in one launch of 2 ranks (spawning costs seconds)."""
    return run_ranks(ddp_train, world_size=WORLD, args=(list(CONFIGS),), timeout=300)


@pytest.fixture(scope="module")
def references():
    """Single-process runs: chunked per rank with the ranks' seeds (dropout configs), or one
    forward on the whole global batch (no dropout)."""
    return {name: reference_train(name, WORLD, SEEDS, chunked=p > 0) for name, (_, p) in CONFIGS.items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_close_dicts(actual, expected, **tol):
    assert actual.keys() == expected.keys() and len(actual) == 14  # 7 targets x 2 layers
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_end_with_identical_blocks_that_moved(ddp_runs, name):
    rank0, rank1 = ddp_runs[0][name], ddp_runs[1][name]
    assert rank0["blocks"].keys() == rank1["blocks"].keys()
    assert all(torch.equal(rank0["blocks"][k], rank1["blocks"][k]) for k in rank0["blocks"])
    assert all(torch.equal(rank0["grads"][k], rank1["grads"][k]) for k in rank0["grads"])
    # Training happened: three steps of lr 1e-2 move blocks by about 3e-2.
    mode, p = CONFIGS[name]
    init = {n: q.detach() for n, q in make_model(mode, p).named_parameters() if "miss_block" in n}
    assert max_diff(rank0["blocks"], init) > 1e-2
    # The two ranks saw different data.
    assert not torch.allclose(rank0["losses"], rank1["losses"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_single_process(ddp_runs, references, name):
    ref = references[name]
    for rank in range(WORLD):
        run = ddp_runs[rank][name]
        assert run["losses"].shape == (STEPS,)
        assert_close_dicts(run["grads"], ref["grads"], **GRAD_TOL)
        assert_close_dicts(run["blocks"], ref["blocks"], **BLOCK_TOL)
    ddp_losses = torch.stack([ddp_runs[rank][name]["losses"] for rank in range(WORLD)], dim=1)  # (STEPS, WORLD)
    if CONFIGS[name][1] > 0:
        # Each rank's loss is the reference's loss of that rank's micro-batch, with its own mask.
        torch.testing.assert_close(ddp_losses, ref["losses"], **LOSS_TOL)
    else:
        # Global-batch loss = mean of the ranks' losses (every sequence has the same length).
        torch.testing.assert_close(ddp_losses.mean(dim=1), ref["losses"], **LOSS_TOL)


@pytest.mark.parametrize("name", DROPOUT_CONFIGS)
def test_dropout_is_live_and_keys_are_per_rank(ddp_runs, name):
    """The comparison above cannot pass vacuously: without dropout, or with the same keys on
    both ranks, the reference lands far from the DDP result."""
    run = ddp_runs[0][name]
    no_dropout = reference_train(name, WORLD, SEEDS, dropout=0.0)
    assert max_diff(run["blocks"], no_dropout["blocks"]) > 100 * BLOCK_TOL["atol"]
    same_keys = reference_train(name, WORLD, [SEEDS[0]] * WORLD)
    assert max_diff(run["blocks"], same_keys["blocks"]) > 100 * BLOCK_TOL["atol"]
    # Rank 1 drew other masks than rank 0 would have on the same rows: its first-step loss
    # differs from the one its micro-batch gives with rank 0's keys.
    torch.testing.assert_close(same_keys["losses"][0, 0], run["losses"][0], **LOSS_TOL)
    assert (same_keys["losses"][0, 1] - ddp_runs[1][name]["losses"][0]).abs() > 1e-4


def test_dropout_reference_is_not_the_global_batch_run(references, ddp_runs):
    """Why the reference chunks per rank: one forward over the global batch (one generator, one
    key per layer, rank 1's rows at rows 18..35 of the flattened input) draws other masks."""
    name = DROPOUT_CONFIGS[0]
    glued = reference_train(name, WORLD, SEEDS, chunked=False)
    assert max_diff(ddp_runs[0][name]["blocks"], glued["blocks"]) > 100 * BLOCK_TOL["atol"]


@pytest.mark.parametrize("wrapper, case, heads", [
    (wrapper, case, heads) for wrapper in ("ddp", "fsdp2")
    for case, heads in (("split", False), ("one-missing", False), ("all-base", False), ("split", True))
] + [("fsdp2-head", "split", True)])
def test_training_with_adapter_names_when_the_ranks_name_other_adapters(wrapper, case, heads):
    """An accelerated PEFT model trained with adapter_names=, each rank's rows naming its own
    adapters: every block's gradient equals one process's on the whole batch (the mean over the
    ranks' means). FSDP2 paired one rank's gradient of a with the other's of b (both off by the
    gradient's size, silently), or aborted in mismatched collectives; DDP without
    find_unused_parameters stepped with unreduced gradients; a rank of "__base__" rows had no
    graph to backpropagate (a review, 2026-12-07). Every trainable block now gets a gradient on
    every rank of a distributed job (zero where none of its rows name it), and so does every
    trainable modules_to_save copy (`heads`: each adapter's own lm_head)."""
    from dist_models import NAMED_CASES, named_batch, named_loss, named_peft_model, named_train
    reference = named_peft_model(heads)
    named_loss(reference, named_batch(), list(NAMED_CASES[case][0]) + list(NAMED_CASES[case][1])).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if "miss_block" in n or "modules_to_save" in n}
    assert len(expected) == (10 if heads else 8)
    for rank, grads in enumerate(run_ranks(named_train, world_size=WORLD, args=(wrapper, case, heads), timeout=300)):
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert grad is not None, f"rank {rank}: {name} has no gradient"
            torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-15,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")


def test_a_single_process_leaves_unnamed_adapters_without_gradient():
    """Outside a distributed job the adapters no row names keep grad None, so an optimizer skips
    them (momentum and weight decay do not move them)."""
    from dist_models import named_batch, named_loss, named_peft_model
    model = named_peft_model()
    named_loss(model, named_batch(), ["a", "a", "__base__", "a"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "miss_block" in n}
    assert all((g is None) == n.endswith(".b") for n, g in grads.items())
