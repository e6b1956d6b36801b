"""DistributedDataParallel training of a tiny Llama with MiSS adapters, and its single-process
reference, for tests/test_ddp.py. The rank function runs in processes spawned by
`dist_util.run_ranks`, so it lives here, in an importable module without pytest.

Dropout keys on rank r: every rank seeds torch's default generator with
`rank_seed(BASE_SEED, r) = BASE_SEED + r` once, after wrapping the model and before the first
step (the convention of `accelerate.utils.set_seed(seed, device_specific=True)`). MissLinear
draws each layer's key with `torch.randint` from that generator, so every rank draws its own
keys, and they are reproducible. The mask is a function of (key, row of the flattened local
input, column), and a rank's local rows start at 0, so the reference runs each rank's
micro-batch as its own forward call with that rank's generator state (kept between steps),
then averages the gradients as DDP does.
"""
import torch

import miss_ext
from tiny_models import MINI_R, R, TARGETS, tiny_causal_lm, tokens

# name: (mode, dropout)
CONFIGS = {
    "default": ("default", 0.0),
    "default-dropout": ("default", 0.2),
    "mini-dropout": ("mini", 0.2),
    "bat": ("bat", 0.0),
}
STEPS = 3
LOCAL_BATCH = 2
SEQ_LEN = 9
LR = 1e-2
BASE_SEED = 1234
DTYPE = torch.float32


def rank_seed(base_seed: int, rank: int) -> int:
    """The seed of rank `rank`'s default generator, hence of its dropout keys."""
    return base_seed + rank


def make_model(mode: str, dropout: float, dtype=DTYPE):
    """Tiny Llama (seeded inside tiny_causal_lm) with random MiSS blocks on every projection.
    The blocks' kaiming init draws from the generator right after that seed, so every process
    builds the same model."""
    model = tiny_causal_lm("llama", dtype=dtype)
    miss_ext.apply_miss(model, TARGETS, r=R, mode=mode, mini_r=MINI_R, dropout=dropout, init_weights=False)
    return model.train()


def global_batches(world_size: int):
    """The global batch of each step: world_size * LOCAL_BATCH sequences; rank r takes rows
    r * LOCAL_BATCH .. (r + 1) * LOCAL_BATCH - 1."""
    return [tokens(batch=world_size * LOCAL_BATCH, length=SEQ_LEN, seed=100 + step) for step in range(STEPS)]


def local_batch(batch, rank: int):
    return batch[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def blocks(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "miss_block" in n}


def block_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "miss_block" in n}


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def ddp_train(rank: int, world_size: int, names, base_seed: int = BASE_SEED):
    """Runs on each rank: for each config name, a DDP-wrapped model trained for STEPS AdamW steps
    on this rank's micro-batches. Returns {name: {"blocks": ..., "grads": the first step's
    all-reduced block gradients, "losses": (STEPS,)}}."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name in names:
        mode, p = CONFIGS[name]
        model = make_model(mode, p)
        ddp = DDP(model)  # broadcasts rank 0's parameters (identical here anyway)
        opt = optimizer(model)
        torch.manual_seed(rank_seed(base_seed, rank))
        losses, first_grads = [], None
        for batch in global_batches(world_size):
            ids = local_batch(batch, rank)
            loss = ddp(input_ids=ids, labels=ids).loss
            loss.backward()  # DDP all-reduces: every grad becomes the mean of the ranks' grads
            if first_grads is None:
                first_grads = block_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        out[name] = {"blocks": blocks(model), "grads": first_grads, "losses": torch.stack(losses)}
    return out


def reference_train(name: str, world_size: int, seeds, chunked: bool = True, dropout=None):
    """The same training in one process on the same global batches. `seeds[r]` seeds rank r's
    generator (its dropout keys). With chunked, each rank's micro-batch is a separate forward
    with rank r's generator state and the gradients are averaged as DDP does (each divided by
    world_size, then summed); without, one forward on the whole global batch (only equal to
    DDP without dropout). `dropout` overrides the config's. Returns {"blocks": ..., "grads": the
    first step's block gradients, "losses": (STEPS, world_size) or (STEPS,)}. The caller's
    generator state is left as it was."""
    mode, p = CONFIGS[name]
    p = p if dropout is None else dropout
    with torch.random.fork_rng(devices=[]):
        model = make_model(mode, p)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = optimizer(model)
        states = []
        for r in range(world_size):
            torch.manual_seed(seeds[r])
            states.append(torch.get_rng_state())
        losses, first_grads = [], None
        for batch in global_batches(world_size):
            if not chunked:
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                losses.append(loss.detach())
            else:
                step_losses, total = [], None
                for r in range(world_size):
                    torch.set_rng_state(states[r])
                    ids = local_batch(batch, r)
                    loss = model(input_ids=ids, labels=ids).loss
                    grads = torch.autograd.grad(loss, params)
                    states[r] = torch.get_rng_state()
                    step_losses.append(loss.detach())
                    scaled = [g / world_size for g in grads]
                    total = scaled if total is None else [a + b for a, b in zip(total, scaled)]
                for q, g in zip(params, total):
                    q.grad = g
                losses.append(torch.stack(step_losses))
            if first_grads is None:
                first_grads = block_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {"blocks": blocks(model), "grads": first_grads, "losses": torch.stack(losses)}


# Accelerated PEFT models trained with adapter_names= under DDP / FSDP2 (tests/test_ddp.py): each
# rank's rows name other adapters. rank r runs rows [2r, 2r + 2) of NAMED_BATCH with NAMES[case][r].
NAMED_CASES = {
    "split": (["a", "a"], ["b", "__base__"]),       # no adapter named on both ranks
    "one-missing": (["a", "b"], ["a", "a"]),        # b on rank 0 only
    "all-base": (["a", "b"], ["__base__", "__base__"]),  # rank 1 runs no adapter at all
}


def named_peft_model(heads: bool = False):
    """Tiny float64 Llama, PEFT adapters "a" and "b" (random blocks, both trainable; with `heads`,
    each with its own trainable copy of lm_head, modules_to_save), accelerated."""
    from peft import MissConfig, get_peft_model
    import miss_ext.peft
    extra = dict(modules_to_save=["lm_head"]) if heads else {}
    model = get_peft_model(tiny_causal_lm("llama", dtype=torch.float64),
                           MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, **extra),
                           adapter_name="a")
    model.add_adapter("b", MissConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, **extra))
    for name, p in model.named_parameters():
        if "miss_block" in name or "modules_to_save" in name:
            p.requires_grad_(True)
    return miss_ext.peft.accelerate(model).train()


def named_batch():
    return torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(1))


def named_loss(model, ids, names):
    return (model(input_ids=ids, adapter_names=names).logits ** 2).mean()


def named_train(rank: int, world_size: int, wrapper: str, case: str, heads: bool = False):
    """One forward/backward of the rank's rows under `wrapper` ("ddp": DistributedDataParallel
    without find_unused_parameters; "fsdp2": fully_shard on each decoder layer and the root);
    "fsdp2-head": also lm_head's modules_to_save wrapper as a unit); returns the blocks' and copies'
    gradients (whole tensors; None for one without)."""
    model = named_peft_model(heads)
    if wrapper == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world_size,))
        if wrapper == "fsdp2-head":  # the modules_to_save wrapper of lm_head a unit of its own
            fully_shard(model.base_model.model.lm_head, mesh=mesh)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    ids = named_batch()[2 * rank:2 * rank + 2]
    named_loss(wrapped, ids, NAMED_CASES[case][rank]).backward()
    grads = {}
    for name, p in model.named_parameters():
        if "miss_block" in name or "modules_to_save" in name:
            g = p.grad
            grads[name.replace("_fsdp_wrapped_module.", "")] = (
                None if g is None else g.full_tensor() if hasattr(g, "full_tensor") else g.detach().clone())
    return grads
