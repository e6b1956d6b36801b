"""FSDP2 (`torch.distributed.fsdp.fully_shard`) training of a tiny Llama with MiSS adapters, and its
single-process references, for tests/test_fsdp.py. The rank functions run in processes spawned
by `dist_util.run_ranks`, so they live here, in an importable module without pytest.

Sharding: `fully_shard` on every decoder layer, then on the root (embeddings, final norm, head).
The frozen base weights and the trainable `miss_block`s are parameters of the decoder layers,
so both are sharded along dim 0 (DTensor, `Shard(0)`), and FSDP all-gathers them in the layer's
pre-forward hook: inside the layer every MissLinear sees a plain nn.Linear with plain
(unsharded) tensors and takes the fused path (recorded by `_PathProbe`).

Data: step s uses the global batch `tokens(WORLD * LOCAL_BATCH, SEQ_LEN, seed=100 + s)`; rank r
takes rows r * LOCAL_BATCH ..; every sequence has the same length (no padding), so the mean of
the ranks' mean losses (FSDP averages the gradients over ranks) is the global batch's mean loss.

Dropout keys on rank r: torch's default generator is seeded with BASE_SEED + r after sharding,
before the first step (accelerate's `set_seed(device_specific=True)` convention), as in
tests/dist_models.py; the reference runs each rank's micro-batch as its own forward from that
rank's generator state.

Mixed precision (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) on a float32
model: FSDP keeps the float32 shards (the optimizer's master weights), all-gathers them cast to
bf16 (the blocks too), computes forward and backward in bf16, casts each rank's gradient to
float32 and averages them in float32. `reference_train(..., precision="bf16", chunked=True)` does
the same in one process.
"""
import copy
import os

import torch

import miss_ext
from tiny_models import MINI_R, R, TARGETS, tiny_causal_lm, tokens

# name: (mode, r, dropout, precision). "fp64": float64 model, no mixed precision; "bf16": float32
# model under MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). r = 3 gives blocks of 3
# rows, which FSDP shards unevenly (2 + 1 rows), and in % r != 0.
CONFIGS = {
    "default": ("default", R, 0.0, "fp64"),
    "mini": ("mini", R, 0.0, "fp64"),
    "bat": ("bat", R, 0.0, "fp64"),
    "default-r3": ("default", 3, 0.0, "fp64"),
    "default-dropout": ("default", R, 0.2, "fp64"),
    "default-bf16": ("default", R, 0.0, "bf16"),
    "mini-bf16": ("mini", R, 0.0, "bf16"),
    "bat-bf16": ("bat", R, 0.0, "bf16"),
}
DCP_MODES = ("default", "bat")
STEPS = 3
DCP_SAVE_AFTER = 2  # DCP test: train 2 steps, checkpoint, train 1 more
LOCAL_BATCH = 2
SEQ_LEN = 9
LR = 1e-2
BASE_SEED = 1234
BLOCK_SEED = 1  # initial blocks (randomize_blocks-like, identical in every process)
OTHER_BLOCK_SEED = 99  # the DCP test's fresh model starts elsewhere, so a load that does nothing shows


def rank_seed(rank: int) -> int:
    return BASE_SEED + rank


def make_model(mode: str, r: int, dropout: float, precision: str, block_seed: int = BLOCK_SEED):
    """Tiny Llama with MiSS on every projection and random non-zero blocks (N(0, 0.05^2), drawn
    from their own generator in model order, so every process builds the same model)."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model = tiny_causal_lm("llama", dtype=dtype)
    miss_ext.apply_miss(model, TARGETS, r=r, mode=mode, mini_r=MINI_R, dropout=dropout)
    gen = torch.Generator().manual_seed(block_seed)
    with torch.no_grad():
        for _, layer in miss_ext.miss_layers(model):
            block = layer.miss_block
            block.copy_(torch.randn(block.shape, generator=gen, dtype=torch.float64) * 0.05)
    return model.train()


def shard(model, world_size: int, precision: str):
    """fully_shard on every decoder layer and on the root, over a 1-D CPU mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": init_device_mesh("cpu", (world_size,))}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def global_batch(world_size: int, step: int):
    return tokens(batch=world_size * LOCAL_BATCH, length=SEQ_LEN, seed=100 + step)


def local_batch(batch, rank: int):
    return batch[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def _full(t):
    """A plain CPU copy of a (possibly DTensor) tensor; collective for a DTensor."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.clone()


def blocks(model):
    """{parameter path: whole block}; collective on a sharded model (call on every rank)."""
    return {n: _full(p) for n, p in model.named_parameters() if "miss_block" in n}


def block_grads(model):
    return {n: _full(p.grad) for n, p in model.named_parameters() if "miss_block" in n}


class _PathProbe:
    """Records, at each MissLinear call, whether the fused path runs and the types the layer sees
    (a forward pre-hook on the MissLinear itself, which does not change its base's plainness)."""

    def __init__(self, model):
        self.seen = set()
        self.handles = [layer.register_forward_pre_hook(self._hook) for _, layer in miss_ext.miss_layers(model)]

    def _hook(self, layer, args):
        self.seen.add((layer._fused(layer.base_layer), type(layer.base_layer.weight).__name__, type(layer.miss_block).__name__,
                       layer.miss_block.dtype))

    def remove(self):
        for h in self.handles:
            h.remove()


def _train_step(model, opt, batch, rank):
    ids = local_batch(batch, rank)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # FSDP reduce-scatters: each block shard's grad is the mean over ranks
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().float()


def fsdp_train(rank: int, world_size: int, names, folder: str):
    """Runs on each rank: for each config, a sharded model trained STEPS AdamW steps on this
    rank's micro-batches. Adapters are saved with miss_ext.save_adapter (default: rank 0 writes)
    into <folder>/<name>/init (before training), <folder>/<name>/trained and
    <folder>/<name>/default<rank>, and with is_main_process=True into <folder>/<name>/own<rank>
    (every rank writes its own copy).

    Returns {name: {"init", "blocks": whole blocks before / after training, "grads": the first
    step's averaged block gradients, "losses": (STEPS,) this rank's losses, "local": {path: (local
    shard shape, placements, is DTensor)} before training, "paths": what the layers saw in the
    first forward (fused?, weight type, block type, block dtype)}}."""
    out = {}
    for name in names:
        mode, r, p, precision = CONFIGS[name]
        model = shard(make_model(mode, r, p, precision), world_size, precision)
        local = {n: (tuple(q.to_local().shape) if hasattr(q, "to_local") else tuple(q.shape),
                     str(getattr(q, "placements", None)), hasattr(q, "to_local"))
                 for n, q in model.named_parameters() if "miss_block" in n}
        init = blocks(model)
        miss_ext.save_adapter(model, os.path.join(folder, name, "init"))
        opt = optimizer(model)
        torch.manual_seed(rank_seed(rank))
        probe = _PathProbe(model)
        losses, first_grads = [], None
        for step in range(STEPS):
            batch = global_batch(world_size, step)
            ids = local_batch(batch, rank)
            loss = model(input_ids=ids, labels=ids).loss
            probe.remove()
            loss.backward()
            if first_grads is None:
                first_grads = block_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        miss_ext.save_adapter(model, os.path.join(folder, name, "trained"))
        # The default (rank 0 writes) and every rank writing, each to a path of its own.
        miss_ext.save_adapter(model, os.path.join(folder, name, f"default{rank}"))
        miss_ext.save_adapter(model, os.path.join(folder, name, f"own{rank}"), is_main_process=True)
        out[name] = {"init": init, "blocks": blocks(model), "grads": first_grads, "losses": torch.stack(losses),
                     "local": local, "paths": sorted(probe.seen, key=str)}
    return out


def reference_train(name: str, world_size: int, precision=None, chunked: bool = False, steps: int = STEPS):
    """The same training in one process on the same global batches. Without `chunked`: one
    forward/backward on the whole global batch. With `chunked`: rank r's micro-batch is its own
    forward, from rank r's generator state (dropout keys), and the gradients are averaged as FSDP
    does (in float32 for bf16: each rank's bf16 gradient is cast to float32, then the mean is
    taken). `precision` overrides the config's ("fp32" runs a bf16 config's float32 model without
    mixed precision). Under "bf16" the model computes in a bf16 copy whose parameters are the
    float32 master parameters cast to bf16 at every step, as FSDP's MixedPrecisionPolicy does.
    Returns {"init", "blocks", "grads" (first step), "losses" ((STEPS,) or (STEPS, world))}.
    The caller's generator state is left as it was."""
    mode, r, p, config_precision = CONFIGS[name]
    precision = precision or config_precision
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks: the same GEMM reduction order
    try:
        with torch.random.fork_rng(devices=[]):
            return _reference_train(mode, r, p, precision, world_size, chunked, steps)
    finally:
        torch.set_num_threads(threads)


def _reference_train(mode, r, p, precision, world_size, chunked, steps):
    master = make_model(mode, r, p, "fp64" if precision == "fp64" else "fp32")
    params = [(n, q) for n, q in master.named_parameters() if q.requires_grad]
    init = {n: q.detach().clone() for n, q in params}
    opt = optimizer(master)
    compute = master
    if precision == "bf16":  # parameters only: FSDP's param_dtype leaves buffers (rotary inv_freq) alone
        compute = copy.deepcopy(master)
        for q in compute.parameters():
            q.data = q.data.to(torch.bfloat16)
    compute_params = dict(compute.named_parameters())
    states = []
    for rank in range(world_size):
        torch.manual_seed(rank_seed(rank))
        states.append(torch.get_rng_state())
    losses, first_grads = [], None
    for step in range(steps):
        batch = global_batch(world_size, step)
        if compute is not master:
            with torch.no_grad():
                for n, q in params:
                    compute_params[n].copy_(q)
        parts = [local_batch(batch, rank) for rank in range(world_size)] if chunked else [batch]
        step_losses, total = [], None
        for rank, ids in enumerate(parts):
            torch.set_rng_state(states[rank])
            loss = compute(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, [compute_params[n] for n, _ in params])
            states[rank] = torch.get_rng_state()
            step_losses.append(loss.detach().float())
            grads = [g.to(q.dtype) / len(parts) for g, (_, q) in zip(grads, params)]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        for (_, q), g in zip(params, total):
            q.grad = g
        if first_grads is None:
            first_grads = {n: q.grad.clone() for n, q in params}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(torch.stack(step_losses) if chunked else step_losses[0])
    return {"init": init, "blocks": {n: q.detach().clone() for n, q in params}, "grads": first_grads,
            "losses": torch.stack(losses)}


def dcp_resume(rank: int, world_size: int, modes, folder: str):
    """Runs on each rank, per mode: train DCP_SAVE_AFTER steps, save the adapter-only state (the
    miss_block parameters and their AdamW state; `ignore_frozen_params=True`) with
    torch.distributed.checkpoint, train one more step -> "A". A fresh sharded model (other initial
    blocks) and optimizer load the checkpoint and train the same step -> "B". A control model
    loads only the model state (fresh optimizer) and trains that step -> "C" (must differ from A,
    or A == B would not show that the optimizer state was restored).

    Returns {mode: {"saved", "loaded", "fresh", "A", "B", "C": whole blocks; "model_keys",
    "optim_state_keys": the checkpoint's keys}}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                           set_model_state_dict, set_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    # The checkpoint has no frozen base weights, so loading it is not strict; the test checks that
    # every block was loaded (the fresh model starts from other blocks).
    load_options = StateDictOptions(ignore_frozen_params=True, strict=False)
    out = {}
    for mode in modes:
        path = os.path.join(folder, f"dcp-{mode}")
        resume_step = global_batch(world_size, DCP_SAVE_AFTER)

        model = shard(make_model(mode, R, 0.0, "fp64"), world_size, "fp64")
        opt = optimizer(model)
        for step in range(DCP_SAVE_AFTER):
            _train_step(model, opt, global_batch(world_size, step), rank)
        msd, osd = get_state_dict(model, opt, options=options)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        saved = blocks(model)
        _train_step(model, opt, resume_step, rank)
        result = {"saved": saved, "A": blocks(model), "model_keys": sorted(msd),
                  "optim_state_keys": sorted(osd["state"])}

        for label, with_optim in (("B", True), ("C", False)):
            fresh = shard(make_model(mode, R, 0.0, "fp64", block_seed=OTHER_BLOCK_SEED), world_size,
                          "fp64")
            fresh_opt = optimizer(fresh)
            if with_optim:
                result["fresh"] = blocks(fresh)
            if with_optim:
                msd, osd = get_state_dict(fresh, fresh_opt, options=options)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=path)
                set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=load_options)
                result["loaded"] = blocks(fresh)
            else:  # the model's state only; the optimizer starts empty
                state = {"model": get_model_state_dict(fresh, options=options)}
                dcp.load(state, checkpoint_id=path)
                set_model_state_dict(fresh, state["model"], options=load_options)
            _train_step(fresh, fresh_opt, resume_step, rank)
            result[label] = blocks(fresh)
        out[mode] = result
    return out


BANK_ADAPTERS = (("a", R, "default", 0.1), ("b", 2, "mini", 0.0))  # name, r, mode, dropout


def _bank_model(adapters):
    model = tiny_causal_lm("llama", dtype=torch.float64)
    miss_ext.apply_bank(model, TARGETS, capacity=3, max_r=R)
    for name, r, mode, p in adapters:
        miss_ext.add_bank_adapter(model, name, r, mode=mode, mini_r=MINI_R, dropout=p)
    return model.train()


def _bank_step(model, opt, batch, rank, seed):
    torch.manual_seed(seed + rank)  # this step's dropout keys, the same in the run and the resumed one
    with miss_ext.mixed_batch(model, [name for name, *_ in BANK_ADAPTERS]):
        x = local_batch(batch, rank)
        model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def bank_dcp_resume(rank: int, world_size: int, folder: str):
    """A sharded bank model (apply_bank; adapters "a" default with dropout and "b" mini with r
    not max_r) trains a step, saves its adapter-only state and the optimizer's with
    torch.distributed.checkpoint, trains one more step -> "A". A sharded bank model built
    again with no adapters (its bank zeros) loads the checkpoint, names and rates included
    (each layer's slot description), and trains the same step -> "B" (a fact-check did this by
    hand, 2026-12-07; docs/multi_gpu.md). Returns {"names", "saved", "loaded", "A", "B"}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    path = os.path.join(folder, "dcp-bank")
    model = _bank_model(BANK_ADAPTERS)
    gen = torch.Generator().manual_seed(BLOCK_SEED)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    model = shard(model, world_size, "fp64")
    opt = optimizer(model)
    _bank_step(model, opt, global_batch(world_size, 0), rank, BASE_SEED)
    msd, osd = get_state_dict(model, opt, options=options)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    trainable = lambda m: {n: _full(p) for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    out = {"saved": trainable(model)}
    _bank_step(model, opt, global_batch(world_size, 1), rank, BASE_SEED + 10)
    out["A"] = trainable(model)

    fresh = shard(_bank_model(()), world_size, "fp64")
    fresh_opt = optimizer(fresh)
    msd, osd = get_state_dict(fresh, fresh_opt, options=options)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    out["names"] = miss_ext.bank_adapter_names(fresh)
    out["loaded"] = trainable(fresh)
    _bank_step(fresh, fresh_opt, global_batch(world_size, 1), rank, BASE_SEED + 10)
    out["B"] = trainable(fresh)
    return out


def save_after_eval_forward(rank: int, world_size: int, folder: str):
    """fully_shard on the root only, bf16 MixedPrecisionPolicy, one forward under no_grad: FSDP2
    does not reshard the root after forward, so the blocks are left as plain bf16 gathered copies.
    save_adapter into <folder>/eval-save/default<rank> (default writer) must still write the whole
    float32 master blocks. Returns what the first block was just before saving: (type name, dtype,
    shape)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model("default", R, 0.0, "fp32")
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)),
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    with torch.no_grad():
        model(input_ids=local_batch(global_batch(world_size, 0), rank))
    block = miss_ext.miss_layers(model)[0][1].miss_block
    before = (type(block).__name__, block.dtype, tuple(block.shape))
    miss_ext.save_adapter(model, os.path.join(folder, "eval-save", f"default{rank}"))
    return before


def load_into_sharded(rank: int, world_size: int, folder: str):
    """load_adapter into an FSDP2-sharded model: the adapter saved from one sharded model (block
    seed 1) is loaded into another (block seed 2), first with the second block's copy failing
    (the undo puts each rank's shard back); returns (gathered blocks of the source, of the target
    before loading, after the failed load, after the load)."""
    from miss_ext import adapter_files

    source = make_model("default", R, 0.0, "fp64", block_seed=1)
    shard(source, world_size, "fp64")
    path = os.path.join(folder, "load-sharded")
    miss_ext.save_adapter(source, path)
    torch.distributed.barrier()  # rank 0 wrote the files
    target = make_model("default", R, 0.0, "fp64", block_seed=2)
    shard(target, world_size, "fp64")
    before = blocks(target)
    real, calls = adapter_files._copy_whole, []

    def second_copy_fails(param, value):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("simulated")
        real(param, value)

    adapter_files._copy_whole = second_copy_fails
    try:
        miss_ext.load_adapter(target, path)
    except RuntimeError:
        pass
    finally:
        adapter_files._copy_whole = real
    failed = blocks(target)
    miss_ext.load_adapter(target, path)
    return blocks(source), before, failed, blocks(target)


def unsharded_and_wrapped(rank: int, world_size: int, folder: str):
    """What a forward without backward leaves unsharded (the root, no reshard after forward), and
    models in wrappers (run after load_into_sharded, whose adapter folder it reuses):
    - load_adapter into the unsharded root, then a training forward and backward: the gathered
      blocks are still the file's (a load into FSDP's gathered copies was lost at the reshard);
    - a layer's merge() and merge_and_unload after an eval forward: refused (ValueError), nothing
      merged or unloaded;
    - apply_miss on an FSDP-sharded base: refused (TypeError);
    - an adapter with modules_to_save (lm_head) loaded into a sharded model: blocks and head;
    - a bank: adding/removing adapters in the sharded bank refused, save_bank_adapter gathers it;
    - DDP: save_adapter(DDP(model)) writes the inner model's paths; apply_miss on it is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    path = os.path.join(folder, "load-sharded")
    source = blocks(make_model("default", R, 0.0, "fp64", block_seed=1))
    target = fully_shard(make_model("default", R, 0.0, "fp64", block_seed=2), mesh=mesh)
    batch = local_batch(global_batch(world_size, 0), rank)
    with torch.no_grad():
        target(input_ids=batch)  # the root stays unsharded
    out["unsharded_type"] = type(miss_ext.miss_layers(target)[0][1].miss_block).__name__
    miss_ext.load_adapter(target, path)
    target(input_ids=batch, labels=batch).loss.backward()
    out["load_gap"] = max((blocks(target)[n] - source[n]).abs().max().item() for n in source)
    with torch.no_grad():
        target(input_ids=batch)
    # A layer's own merge while the root is unsharded: its weight is FSDP's gathered copy, a plain
    # Parameter that the next reshard drops (the merge was lost before the layer looked for FSDP).
    layer = miss_ext.miss_layers(target)[0][1]
    out["layer_weight_type"] = type(layer.base_layer.weight).__name__
    try:
        layer.merge()
        out["layer_merge_error"] = None
    except ValueError as e:
        out["layer_merge_error"] = str(e)
    out["layer_merged"] = layer.merged
    try:
        miss_ext.merge_and_unload(target)
        out["merge_error"] = None
    except ValueError as e:
        out["merge_error"] = str(e)
    out["still_adapted"] = len(miss_ext.miss_layers(target))
    plain = tiny_causal_lm("llama", dtype=torch.float64)
    fully_shard(plain.model.layers[0].self_attn.q_proj, mesh=mesh)
    try:
        miss_ext.apply_miss(plain, ["q_proj"], r=R)
        out["apply_error"] = None
    except TypeError as e:
        out["apply_error"] = str(e)

    # modules_to_save: the head's value in the file goes to each rank's shard of it.
    extras_source = tiny_causal_lm("llama", dtype=torch.float64)
    miss_ext.apply_miss(extras_source, TARGETS, r=R, modules_to_save=["lm_head"], init_weights=False)
    with torch.no_grad():
        extras_source.lm_head.weight.add_(1.0)  # a trained head, different from the target's
    extras_path = os.path.join(folder, "extras")
    miss_ext.save_adapter(extras_source, extras_path)
    torch.distributed.barrier()
    extras_target = make_model("default", R, 0.0, "fp64", block_seed=2)
    for layer in extras_target.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(extras_target, mesh=mesh)
    miss_ext.load_adapter(extras_target, extras_path)
    got, want = blocks(extras_target), blocks(extras_source)
    out["extras_gap"] = max([(got[n] - want[n]).abs().max().item() for n in want] +
                            [(_full(extras_target.lm_head.weight) - extras_source.lm_head.weight).abs().max().item()])

    # A sharded bank.
    bank_model = tiny_causal_lm("llama", dtype=torch.float64)
    miss_ext.apply_bank(bank_model, ["q_proj"], capacity=2, max_r=R)
    miss_ext.add_bank_adapter(bank_model, "a", r=R)
    with torch.no_grad():
        for _, layer in miss_ext.bank_model.bank_layers(bank_model):
            layer.block("a").normal_(generator=torch.Generator().manual_seed(4))
    expected = {p: layer.block("a").detach().clone() for p, layer in miss_ext.bank_model.bank_layers(bank_model)}
    fully_shard(bank_model, mesh=mesh)  # the root only: a forward leaves the bank unsharded
    with torch.no_grad(), miss_ext.mixed_batch(bank_model, ["a"] * batch.shape[0]):
        bank_model(input_ids=batch)
    try:
        miss_ext.remove_bank_adapter(bank_model, "a")
        out["bank_error"] = None
    except ValueError as e:
        out["bank_error"] = str(e)
    bank_path = os.path.join(folder, "bank-a")
    miss_ext.save_bank_adapter(bank_model, "a", bank_path)
    torch.distributed.barrier()
    from safetensors.torch import load_file

    saved = load_file(os.path.join(bank_path, "adapter_model.safetensors"))
    out["bank_gap"] = max((saved[f"base_model.model.{p}.miss_block"] - v).abs().max().item() for p, v in expected.items())

    # DDP.
    wrapped = DDP(make_model("default", R, 0.0, "fp64"))
    miss_ext.save_adapter(wrapped, os.path.join(folder, f"ddp{rank}"))  # by default rank 0 writes
    torch.distributed.barrier()
    out["ddp_wrote"] = os.path.exists(os.path.join(folder, f"ddp{rank}"))
    out["ddp_keys"] = sorted(load_file(os.path.join(folder, "ddp0", "adapter_model.safetensors")))[:1]
    try:
        miss_ext.apply_miss(wrapped, ["lm_head"], r=R)
        out["ddp_apply_error"] = None
    except ValueError as e:
        out["ddp_apply_error"] = str(e)
    miss_ext.load_adapter(wrapped, path)  # existing layers only: allowed
    out["ddp_load_gap"] = max((blocks(wrapped.module)[n] - source[n]).abs().max().item() for n in source)
    try:  # the file trains lm_head, frozen when DDP was built
        miss_ext.load_adapter(wrapped, extras_path)
        out["ddp_extras_error"] = None
    except ValueError as e:
        out["ddp_extras_error"] = str(e)
    miss_ext.export_lora(wrapped, os.path.join(folder, f"ddp-lora{rank}"))
    try:
        miss_ext.apply_bank(DDP(tiny_causal_lm("llama", dtype=torch.float64)), ["q_proj"], capacity=2, max_r=R)
        out["ddp_bank_error"] = None
    except ValueError as e:
        out["ddp_bank_error"] = str(e)
    bank_plain = tiny_causal_lm("llama", dtype=torch.float64)
    miss_ext.apply_bank(bank_plain, TARGETS, capacity=2, max_r=R)
    wrapped_bank = DDP(bank_plain)
    miss_ext.load_bank_adapter(wrapped_bank, "a", path)  # looked through: the file's paths are the inner model's
    miss_ext.save_bank_adapter(wrapped_bank, "a", os.path.join(folder, f"ddp-bank{rank}"))
    torch.distributed.barrier()
    out["ddp_written"] = [os.path.exists(os.path.join(folder, f"{what}{rank}")) for what in ("ddp-lora", "ddp-bank")]
    return out


class _Holder(torch.nn.Module):
    """A module holding the model, as a user's training wrapper does: fully_shard goes on it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


def _read_tensors(path: str):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _file_gap(path_a: str, path_b: str) -> float:
    a, b = _read_tensors(path_a), _read_tensors(path_b)
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def roots_above_and_exports(rank: int, world_size: int, folder: str):
    """Found by a review (2026-12-01): FSDP2 modules a forward left unsharded, and fully_shard
    on a module above the model passed in.
    - apply_miss / apply_bank on a root-only-sharded model after a no_grad forward (its weights
      then FSDP's plain gathered copies): refused like a sharded model (they were accepted, and
      each rank trained its own block);
    - fully_shard on a wrapper holding the model, bf16 MixedPrecisionPolicy, no_grad forward:
      save_adapter(wrapper.lm) writes the float32 master blocks on rank 0 only (it wrote bf16
      copies from every rank), load_adapter(wrapper.lm) reaches the sharded blocks (it was lost);
    - export_lora of a sharded model, and of one left unsharded in bf16: rank 0 writes the same
      file as one process (it raised inside safetensors, or wrote bf16 copies from every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    batch = local_batch(global_batch(world_size, 0), rank)
    out = {}

    plain = fully_shard(tiny_causal_lm("llama", dtype=torch.float32), mesh=mesh)
    with torch.no_grad():
        plain(input_ids=batch)  # the root stays unsharded: plain gathered weights
    for what, call in (("apply_miss", lambda: miss_ext.apply_miss(plain, ["q_proj"], r=R)),
                       ("apply_bank", lambda: miss_ext.apply_bank(plain, ["q_proj"], capacity=2, max_r=R))):
        try:
            call()
            out[what] = None
        except (TypeError, ValueError) as e:
            out[what] = str(e)
    out["still_plain"] = not miss_ext.miss_layers(plain) and not miss_ext.bank_model.bank_layers(plain)

    # Every rank writes the single-process references to its own path (a plain model).
    single = make_model("default", R, 0.0, "fp32", block_seed=1)
    ref_adapter, ref_lora = os.path.join(folder, f"ref-adapter{rank}"), os.path.join(folder, f"ref-lora{rank}")
    miss_ext.save_adapter(single, ref_adapter)
    miss_ext.export_lora(single, ref_lora)

    wrapper = fully_shard(_Holder(make_model("default", R, 0.0, "fp32", block_seed=1)), mesh=mesh, mp_policy=bf16)
    with torch.no_grad():
        wrapper(input_ids=batch)
    out["above_block_dtype"] = miss_ext.miss_layers(wrapper.lm)[0][1].miss_block.dtype
    # Each rank passes its own path: only rank 0's may exist afterwards.
    miss_ext.save_adapter(wrapper.lm, os.path.join(folder, f"above{rank}"))
    with torch.no_grad():
        wrapper(input_ids=batch)
    miss_ext.export_lora(wrapper.lm, os.path.join(folder, f"above-lora{rank}"))
    torch.distributed.barrier()  # rank 0 wrote
    out["above_wrote"] = [os.path.exists(os.path.join(folder, f"{what}{rank}")) for what in ("above", "above-lora")]
    out["above_gap"] = _file_gap(os.path.join(folder, "above0"), ref_adapter)
    out["above_dtypes"] = sorted({str(t.dtype) for t in _read_tensors(os.path.join(folder, "above0")).values()})
    out["above_lora_gap"] = _file_gap(os.path.join(folder, "above-lora0"), ref_lora)

    # load_adapter(wrapper.lm) of other blocks while the wrapper is unsharded reaches the blocks.
    other = make_model("default", R, 0.0, "fp32", block_seed=2)
    other_path = os.path.join(folder, f"other{rank}")
    miss_ext.save_adapter(other, other_path)
    with torch.no_grad():
        wrapper(input_ids=batch)
    miss_ext.load_adapter(wrapper.lm, other_path)
    wrapper(input_ids=batch, labels=batch).loss.backward()
    got, want = blocks(wrapper.lm), blocks(other)
    out["above_load_gap"] = max((got[n] - want[n]).abs().max().item() for n in want)

    sharded = make_model("default", R, 0.0, "fp32", block_seed=1)
    shard(sharded, world_size, "fp32")
    miss_ext.export_lora(sharded, os.path.join(folder, f"sharded-lora{rank}"))
    torch.distributed.barrier()
    out["sharded_lora_wrote"] = os.path.exists(os.path.join(folder, f"sharded-lora{rank}"))
    out["sharded_lora_gap"] = _file_gap(os.path.join(folder, "sharded-lora0"), ref_lora)
    return out


def peft_sharded_save(rank: int, world_size: int, folder: str):
    """A PEFT MiSS model sharded by FSDP2: save_adapter refuses it, naming PEFT's save_pretrained
    and, under FSDP2, the gathered state dict it needs (save_pretrained alone fails there on PEFT's
    side, "invalid python storage"; a review, 2026-12-05); the recipe of the message writes the
    adapter. Returns the message, the written blocks and the blocks before sharding."""
    import miss_ext.peft
    from peft import MissConfig, get_peft_model
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double(),
                           MissConfig(r=3, target_modules=["0", "2"], init_weights=False))
    miss_ext.peft.accelerate(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    mesh = init_device_mesh("cpu", (world_size,))
    for path in ("base_model.model.0", "base_model.model.2"):
        fully_shard(model.get_submodule(path), mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 10, dtype=torch.float64)).sum().backward()
    try:
        miss_ext.save_adapter(model, os.path.join(folder, "peft-miss"))
        message = None
    except (TypeError, ValueError) as e:
        message = f"{type(e).__name__}: {e}"
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  ignore_frozen_params=True))
    model.save_pretrained(os.path.join(folder, "peft-sharded"), state_dict=state, is_main_process=rank == 0)
    torch.distributed.barrier()
    return {"message": message, "written": _read_tensors(os.path.join(folder, "peft-sharded")), "before": before}


def checkpoint_launch(rank: int, world_size: int, modes, folder: str):
    """The second launch of tests/test_fsdp.py: dcp_resume, bank_dcp_resume, save_after_eval_forward,
    load_into_sharded, unsharded_and_wrapped and roots_above_and_exports."""
    return {"dcp": dcp_resume(rank, world_size, modes, folder),
            "bank_dcp": bank_dcp_resume(rank, world_size, folder),
            "eval_save": save_after_eval_forward(rank, world_size, folder),
            "load_sharded": load_into_sharded(rank, world_size, folder),
            "unsharded": unsharded_and_wrapped(rank, world_size, folder),
            "roots_above": roots_above_and_exports(rank, world_size, folder),
            "peft_save": peft_sharded_save(rank, world_size, folder)}


def writers_and_fsdp1(rank: int, world_size: int, folder: str):
    """World 3 (found by a review, 2026-12-03).

    - Who writes a model that some ranks hold: rank 0 alone holds model A in DDP over its own
      group; ranks 1 and 2 hold model B, in DDP over [1, 2] and sharded by FSDP2 over a mesh of
      [1, 2]. Each rank saves to a path of its own, so the paths written show which ranks wrote.
      Before, only global rank 0 ever wrote, so B was written by no one, silently.
    - FSDP1 (FullyShardedDataParallel): each function that reads or changes blocks by path is
      refused by name (save_adapter wrote each rank's flat shard under FSDP1's paths)."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    groups = {0: dist.new_group([0]), 1: dist.new_group([1, 2])}

    def model():
        torch.manual_seed(0)
        return miss_ext.apply_miss(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).double(), ["0", "1"], r=2)

    miss_ext.save_adapter(DistributedDataParallel(model(), process_group=groups[min(rank, 1)]),
                          os.path.join(folder, f"ddp{rank}"))
    if rank:
        miss_ext.save_adapter(fully_shard(model(), mesh=DeviceMesh("cpu", torch.tensor([1, 2]))),
                              os.path.join(folder, f"fully_shard{rank}"))
    dist.barrier()
    written = sorted(name for name in os.listdir(folder) if name.startswith(("ddp", "fully_shard")))

    wrapped = FullyShardedDataParallel(model(), use_orig_params=True, device_id=torch.device("cpu"))
    refusals = {}
    for name, call in {
            "save_adapter": lambda: miss_ext.save_adapter(wrapped, os.path.join(folder, f"fsdp1-{rank}")),
            "export_lora": lambda: miss_ext.export_lora(wrapped, os.path.join(folder, f"lora1-{rank}")),
            "merge_and_unload": lambda: miss_ext.merge_and_unload(wrapped),
            "load_adapter": lambda: miss_ext.load_adapter(wrapped, os.path.join(folder, "ddp0")),
            "apply_miss": lambda: miss_ext.apply_miss(wrapped, ["0"], r=2)}.items():
        try:
            call()
            refusals[name] = None
        except TypeError as e:
            refusals[name] = str(e)
    return dict(written=written, refusals=refusals, left=sorted(os.listdir(folder)))


def bank_load_with_sharded_grads(rank: int, world_size: int):
    """A sharded bank that holds gradients (DTensors) loads the state of a bank whose first two
    slots hold each other's adapters (torch.distributed.checkpoint's set_model_state_dict): the
    slots that changed hands get zero gradients. It crashed in the zeroing ("mixed torch.Tensor
    and DTensor") after layer 0 had loaded, leaving the layers disagreeing (a review, 2026-12-07).
    Returns each bank layer's slot names and the per-slot sums of |grad| of every bank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    model = shard(_bank_model(BANK_ADAPTERS), world_size, "fp64")
    with miss_ext.mixed_batch(model, [name for name, *_ in BANK_ADAPTERS]):
        x = local_batch(global_batch(world_size, 0), rank)
        model(input_ids=x, labels=x).loss.backward()
    other = shard(_bank_model([BANK_ADAPTERS[1], BANK_ADAPTERS[0]]), world_size, "fp64")
    state = get_model_state_dict(other, options=StateDictOptions(ignore_frozen_params=True))
    set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=True, strict=False))
    banks = [m for m in model.modules() if isinstance(m, miss_ext.MissBankLinear)]
    return {"names": [list(m.adapter_names) for m in banks],
            "grad_sums": [m.bank.grad.full_tensor().abs().sum(dim=(1, 2)).tolist() for m in banks]}
