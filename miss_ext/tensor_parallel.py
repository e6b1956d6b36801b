"""Tensor parallelism (torch DTensor / `parallelize_module`) for MiSS layers.

    import miss_ext
    from miss_ext.tensor_parallel import MissColwiseParallel, MissRowwiseParallel
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = miss_ext.apply_miss(model, targets, r=64)        # MiSS first, on the full model
    mesh = init_device_mesh("cuda", (world_size,))
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {"self_attn.q_proj": MissColwiseParallel(), ...,
                                         "self_attn.o_proj": MissRowwiseParallel(), ...})

Two parts:

1. DTensor sharding strategies for the `torch.ops.miss` ops a MissLinear runs (`register_strategies()`, run when
   this module is imported: `import miss_ext.tensor_parallel`, or `miss_ext.tensor_parallel`). DTensor calls them to decide, from the
   placements and global shapes of the arguments, which placements the op can run on locally and
   what the output's placement is; it redistributes the inputs when none fits (for example it
   all-gathers x when a row-wise fold cannot be split). The rules follow from the index maps of the
   ops (`i mod r` for the fold, `o mod mini_r` for mini, r x r tiles for bat):

   - a fold over a column shard is a partial sum of the full fold iff every shard starts at a
     multiple of r, and there is no dropout (the mask is indexed by the global column; a local fold
     would index local columns): output Partial;
   - a tiling along a sharded last dim (mini's period mini_r, default's period out) is the local
     tiling iff every shard starts at a multiple of the period (and no dropout);
   - bat tiles: sharding W on out needs shard starts at multiples of r (block sharded on dim 0 to
     match), on in the same with the block replicated;
   - sharding leading (row) dims of x is always fine without dropout (the mask is indexed by the
     global row too);
   - everything linear in its inputs (tile_add in (out, src), linear's base term) carries Partial.

   They are registered with DTensor's `register_op_strategy` directly rather than with
   `register_sharding`: the latter keys its cache on the int arguments only, so ops without an int
   argument (tile_add, linear) would reuse a decision made for p == 0 when called with p > 0.

2. `MissColwiseParallel` / `MissRowwiseParallel`: torch's `ColwiseParallel` / `RowwiseParallel`
   (same arguments, same input/output layouts, so a plan can mix them with torch's styles) that also
   accept a `miss_ext.MissLinear`. torch's styles only take nn.Linear/nn.Embedding, and a MissLinear
   sharded from outside (parallelizing the nn.Linear and then applying MiSS) cannot work: the
   adapter would see the local x but the full block. So MiSS is applied first, on the full model
   (what save/load_adapter, PEFT and merges see), and the styles shard base and block together:

   | style | base weight | bias | miss_block default | mini | bat |
   |---|---|---|---|---|---|
   | colwise | Shard(0) | Shard(0) | Shard(1) (out >= world, out >= 2) | Replicate (out/world % mini_r == 0; mini_r == out: as default) | Shard(0) (out % (r*world) == 0) |
   | rowwise | Shard(1) | Replicate | Replicate | Replicate | Replicate (in % (r*world) == 0, (out/r) % world == 0) |

   The block is a DTensor Parameter, so optimizers update the shards in place and
   `miss_block.full_tensor()` gives the whole block. Gradients of replicated blocks are
   reduced to Replicate in the backward (a small all-reduce of r x out values), so they are
   identical on every rank and an optimizer step keeps the replicas equal. The layer's forward runs
   `torch.ops.miss.linear` (or `bat_linear`) on the DTensors (modules.MissLinear routes there).
   Row-wise default/mini layers whose shards of in do not start at multiples of r, or that have
   dropout, fold the all-gathered x instead (exact; warned at parallelize time). Sizes that would
   make DTensor all-gather the weight or the block every step (mini and bat in parentheses above)
   are refused at `parallelize_module` time with a ValueError saying why.

Dropout: column-wise layers support it (x is replicated, so the fold and its mask are computed on
the full x; the key must be the same on every rank: it is drawn from each rank's own generator, so
seed every rank the same, as TP needs for any replicated randomness; `MissLinear` checks nothing,
`check_keys=True` on the style compares it across ranks at every call, a debugging aid that
costs two tiny collectives and a host sync per layer). Row-wise layers with dropout:
x is all-gathered for the fold (tp_forward's _rowwise_gathered), which is
correct but costs a (tokens x in) all-gather per layer and step; the style warns.
"""
import functools
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._op_schema import OpSchema, OpStrategy, RuntimeSchemaInfo, TupleStrategy
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import distribute_module

from .base_layers import not_plain_reason, type_name
from .modules import MissLinear, autocast_mini_block, check_flag

__all__ = ["MissColwiseParallel", "MissRowwiseParallel", "register_strategies", "tp_forward", "MIN_TORCH"]

ops = torch.ops.miss
R, P = Replicate(), Partial()


# ---- alignment of shard boundaries -----------------------------------------------------------
def shards_aligned(size: int, period: int, mesh: DeviceMesh) -> bool:
    """True when every shard of a dim of `size`, split over the whole mesh, starts at a multiple
    of `period` (torch.chunk-style shards: ceil(size / n) each, the last one shorter). For a mesh of
    more than one dim the conservative condition size % (period * mesh.size()) == 0."""
    n = mesh.size()
    if n == 1 or period == 1:
        return True
    if mesh.ndim > 1:
        return size % (period * n) == 0
    chunk = -(-size // n)
    return chunk % period == 0 or chunk >= size


def _last(ndim: int) -> Shard:
    return Shard(ndim - 1)


# ---- strategies: each returns [output placements..., placements of the DTensor inputs in order] -
def _fold_rules(mesh, x, r, p=0.0, key=None, dtype=None):
    keyp = [R] if key is not None else []
    rules = [[R, R] + keyp]
    if p == 0.0:
        for d in range(x.ndim - 1):  # rows
            rules.append([Shard(d), Shard(d)] + keyp)
        if shards_aligned(x.shape[-1], r, mesh):
            rules.append([P, _last(x.ndim)] + keyp)
    return rules


def _per_row(out, src) -> bool:
    return len(out.shape) == len(src.shape) and tuple(out.shape[:-1]) == tuple(src.shape[:-1])


def _tile_add_rules(mesh, out, src, alpha=1.0, p=0.0, key=None, inplace=False):
    keyp = [R] if key is not None else []

    def rule(o, s):  # tile_add_ returns nothing: no output placement
        return ([] if inplace else [o]) + [o, s] + keyp

    rules = [rule(R, R), rule(P, P)]  # linear in (out, src) jointly, any mask (same on every rank)
    if p == 0.0:
        nd = out.ndim
        if shards_aligned(out.shape[-1], src.shape[-1], mesh):
            rules.append(rule(_last(nd), R))
        if src.shape[-1] == out.shape[-1]:
            rules.append(rule(_last(nd), _last(src.ndim)))
        if _per_row(out, src):
            for d in range(nd - 1):
                rules.append(rule(Shard(d), Shard(d)))
    return rules


def _linear_rules(mesh, x, weight, bias, block, p=0.0, key=None):
    out_f, in_f = weight.shape
    r = block.shape[0]
    keyp = [R] if key is not None else []

    def rule(y, xp, wp, bp, blk):
        return [y, xp, wp] + ([] if bias is None else [bp]) + [blk] + keyp

    rules = [rule(R, R, R, R, R)]
    nd = x.ndim
    # column-wise: x replicated, out sharded (the fold sees the full x: dropout is fine)
    if block.shape[1] == out_f:
        rules.append(rule(_last(nd), R, Shard(0), Shard(0), Shard(1)))
    elif shards_aligned(out_f, block.shape[1], mesh):  # mini: each shard's tile is the whole block
        rules.append(rule(_last(nd), R, Shard(0), Shard(0), R))
    if p == 0.0:
        # row-wise: x and W sharded on in; the base term and the fold are partial sums
        if shards_aligned(in_f, r, mesh):
            rules.append(rule(P, _last(nd), Shard(1), P, R))
        for d in range(nd - 1):  # rows (sequence / data parallel)
            rules.append(rule(Shard(d), Shard(d), R, R, R))
    return rules


def _bat_out_aligned(out_f: int, r: int, mesh: DeviceMesh) -> bool:
    # W sharded on out and the block on its dim 0 must split at the same tile boundaries
    n = mesh.size()
    return out_f % (r * n) == 0


def _merge_rules(mesh, weight, block, reverse=False, inplace=False):
    out_f, in_f = weight.shape

    def rule(w, blk):
        return ([] if inplace else [w]) + [w, blk]

    rules = [rule(R, R)]
    if block.ndim == 3:  # bat: W'_ij = W_ij (I + B_i) + B_i
        r = block.shape[1]
        if _bat_out_aligned(out_f, r, mesh):
            rules.append(rule(Shard(0), Shard(0)))
        if shards_aligned(in_f, r, mesh):
            rules.append(rule(Shard(1), R))
        return rules
    r, q = block.shape
    if q == out_f:
        rules.append(rule(Shard(0), Shard(1)))
    elif shards_aligned(out_f, q, mesh):
        rules.append(rule(Shard(0), R))
    if shards_aligned(in_f, r, mesh):
        rules.append(rule(Shard(1), R))
    return rules


def _bat_weight_rules(mesh, weight, block, dtype=None):
    return _merge_rules(mesh, weight, block)


def _bat_linear_rules(mesh, x, weight, bias, block, compute_dtype=None):
    out_f, in_f = weight.shape
    r = block.shape[1]

    def rule(y, xp, wp, bp, blk):
        return [y, xp, wp] + ([] if bias is None else [bp]) + [blk]

    nd = x.ndim
    rules = [rule(R, R, R, R, R)]
    if _bat_out_aligned(out_f, r, mesh):
        rules.append(rule(_last(nd), R, Shard(0), Shard(0), Shard(0)))
    if shards_aligned(in_f, r, mesh):
        rules.append(rule(P, _last(nd), Shard(1), P, R))
    for d in range(nd - 1):
        rules.append(rule(Shard(d), Shard(d), R, R, R))
    return rules


def _bat_transform_rules(mesh, w, m, p, *static_args, inplace=False, **static_kwargs):
    # out[o, s*r + b] = sum_k w[o, s*r + k] m[o/r][k][b] + p[o/r][o%r][b] (+ w[o, s*r + b] when
    # residual): linear in (w, p) together either way, so the same rules hold for both.
    out_f, in_f = w.shape
    r = m.shape[1]

    def rule(o, wp, mp, pp):
        return ([] if inplace else [o]) + [wp, mp, pp]

    rules = [rule(R, R, R, R), rule(P, P, R, P)]
    if _bat_out_aligned(out_f, r, mesh):
        rules.append(rule(Shard(0), Shard(0), Shard(0), Shard(0)))
    if shards_aligned(in_f, r, mesh):
        rules.append(rule(Shard(1), Shard(1), R, R))
    return rules


def _spec(arg):
    if isinstance(arg, OpStrategy):
        return arg.strategies[0].output_spec
    if isinstance(arg, TupleStrategy):
        return tuple(_spec(a) for a in arg.children)
    return arg


def _register(op, rules_fn, static_argnum: int, outputs: int = 1, **fixed) -> None:
    def strategy(op_schema: OpSchema):
        mesh = op_schema.get_mesh_from_args()
        args = [_spec(a) for a in op_schema.args_schema]
        kwargs = {k: _spec(v) for k, v in op_schema.kwargs_schema.items()}
        rules = rules_fn(mesh, *args, **kwargs, **fixed)
        return expand_to_full_mesh_op_strategy(mesh, op_schema, rules, input_index=outputs,
                                               inplace_op=op_schema.is_inplace_op())

    # static_argnum: the first argument that is not a tensor; every argument from there on (r, p,
    # alpha, reverse, dtypes) is part of DTensor's cache key, so p > 0 and p == 0 are decided apart.
    DTensor._op_dispatcher.sharding_propagator.register_op_strategy(
        op, strategy, RuntimeSchemaInfo(static_argnum, needs_pytree=True))


_REGISTERED = False


def register_strategies() -> None:
    """Registers the DTensor sharding strategies of the miss ops a sharded MissLinear runs: fold,
    tile_add(_), linear, merge(_), bat_weight, bat_linear, bat_transform(_) (idempotent). The
    bank's ops have none (the styles refuse bank layers)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _register(ops.fold.default, _fold_rules, 1)
    _register(ops.tile_add.default, _tile_add_rules, 2)
    _register(ops.tile_add_.default, _tile_add_rules, 2, outputs=0, inplace=True)
    _register(ops.linear.default, _linear_rules, 4)
    _register(ops.merge.default, _merge_rules, 2)
    _register(ops.merge_.default, _merge_rules, 2, outputs=0, inplace=True)
    _register(ops.bat_weight.default, _bat_weight_rules, 2)
    _register(ops.bat_linear.default, _bat_linear_rules, 4)
    _register(ops.bat_transform.default, _bat_transform_rules, 3)
    _register(ops.bat_transform_.default, _bat_transform_rules, 3, outputs=0, inplace=True)
    _REGISTERED = True


# ---- the layer's forward on DTensors ---------------------------------------------------------
def tp_forward(layer: MissLinear, x: Tensor) -> Tensor:
    """MissLinear.forward for a layer sharded by MissColwiseParallel / MissRowwiseParallel: x,
    the base weight/bias and the block are DTensors, and the miss op runs on them (DTensor picks
    the local computation from the strategies above; the C++ autograd's inner ops do too)."""
    base = layer.base_layer
    block = _replicated_gradient(layer.miss_block)
    if layer.mode == "bat":
        return ops.bat_linear(x, base.weight, base.bias, block, None)
    p = layer.dropout if layer.training else 0.0
    key: Optional[Tensor] = None
    if p > 0.0:
        from .ops import new_dropout_key
        mesh = layer.miss_block.device_mesh
        # Drawn from this rank's generator: the same on every rank when every rank is seeded the same.
        local_key = new_dropout_key(x.device)
        if layer.__dict__.get("_tp_check_keys", False):
            group = mesh.get_group()
            check = local_key.clone()
            dist.broadcast(check, group=group, group_src=0)
            differs = torch.tensor([0 if torch.equal(check, local_key) else 1], device=local_key.device)
            dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=group)  # every rank raises, none hangs
            if differs.item():
                raise RuntimeError("miss_ext tensor parallelism: the dropout key differs between ranks; seed every "
                                   "rank the same (torch.manual_seed) so that the replicated fold sees one mask")
        key = DTensor.from_local(local_key, mesh, [R] * mesh.ndim, run_check=False)
    if layer._tp_style == "rowwise" and (p > 0.0 or not shards_aligned(layer.in_features, layer.r, x.device_mesh)):
        return _rowwise_gathered(layer, block, x, p, key)
    return ops.linear(x, base.weight, base.bias, block, p, key)


def _rowwise_gathered(layer: MissLinear, block: Tensor, x: Tensor, p: float, key: Optional[Tensor]) -> Tensor:
    """A row-wise layer whose fold cannot be split (dropout, or shards of in not starting at
    multiples of r): the base term stays a partial sum of the local shards, the adapter's fold runs
    on the all-gathered x (so its mask and its i mod r see global columns). Same precision as
    MissLinear's unfused path: the term in the block's dtype, one rounding to x's dtype. A 1-D x
    runs as one row (as the ops view it; the dropout mask is row 0's), since DTensor's propagation
    of these ops lost its shape (a tile_add refusal forward, a stride error backward)."""
    if x.dim() == 1:
        return _rowwise_gathered(layer, block, x.unsqueeze(0), p, key).squeeze(0)
    base = layer.base_layer
    mesh = x.device_mesh
    y = torch.nn.functional.linear(x, base.weight, base.bias)  # Partial
    x_full = x.redistribute(mesh, [R] * mesh.ndim)  # all-gather; its backward slices the gradient back
    term = ops.fold(x_full, layer.r, p, key, block.dtype) @ autocast_mini_block(block, x, layer.out_features)
    if y.dtype != x.dtype:
        y = y.to(torch.promote_types(y.dtype, term.dtype))
    return ops.tile_add(y, term, 1.0, 0.0, None).to(x.dtype)


# ---- the parallel styles ---------------------------------------------------------------------
def _colwise_mode(module: MissLinear) -> str:
    """The mode that decides a column-wise layer's block placement: a mini block with mini_r ==
    out_features is (r, out), a default block (the op reads it so: _linear_rules), and is sharded as
    one along out, with no alignment condition (a review, 2026-12-05: it was refused as mini)."""
    return "default" if module.mode == "mini" and module.mini_r == module.out_features else module.mode


def _replicated_gradient(block: Tensor) -> Tensor:
    """The block as the layer's ops use it. A replicated block's gradient comes out of the backward
    as a Partial DTensor (each rank holds its part of the sum); it is reduced to Replicate, so every
    rank holds the same gradient, by a redistribute to the block's own placements: the identity in
    forward (the same local tensor), a Partial -> Replicate all-reduce in backward. Part of the
    autograd graph, it holds under torch.compile, for a frozen block (nothing to reduce), for one
    unfrozen later, and after a conversion (model.float()) replaced the parameter, where a tensor
    hook registered on the parameter when it was sharded did not (it stopped firing, or could not
    be registered on a frozen block)."""
    if not block.requires_grad or not all(pl.is_replicate() for pl in block.placements):
        return block
    return block.redistribute(block.device_mesh, block.placements)


def _distribute_param(module: nn.Module, name: str, mesh: DeviceMesh, placement, src_data_rank) -> None:
    param = getattr(module, name)
    if param is None:
        return
    dparam = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement] * mesh.ndim,
                                            src_data_rank=src_data_rank),
                          requires_grad=param.requires_grad)
    module.register_parameter(name, dparam)


def _refuse_other_adapter_layers(style: str, module: nn.Module) -> None:
    """TypeError for adapter layers the styles cannot shard (a MissBankLinear, PEFT's or an
    accelerated PEFT MiSS layer): torch's style would refuse them as "not nn.Linear", which does not
    say what is supported."""
    from .bank import MissBankLinear
    if isinstance(module, MissBankLinear) or hasattr(module, "miss_block"):
        raise TypeError(f"{style}: cannot shard a {type_name(module)}; the styles shard "
                        "miss_ext.MissLinear layers (a model adapted by miss_ext.apply_miss or load_adapter), "
                        "not PEFT's MiSS layers (accelerated or not) or MissBankLinear")


def _check_miss_layer(style: str, module: MissLinear, mesh: DeviceMesh) -> None:
    from .base_layers import is_plain_linear
    if mesh.ndim != 1:
        raise ValueError(f"{style}: MissLinear layers are sharded over a 1-D tensor-parallel mesh; pass the TP "
                         f"sub-mesh (mesh['tp']), got a {mesh.ndim}-D mesh")
    if module.merged:
        raise ValueError(f"{style}: the MissLinear is merged; unmerge it (or parallelize the merged model's "
                         "nn.Linear layers with torch's own styles)")
    # Before the plain-base check: a sharded layer's base holds DTensors, which that check refuses
    # as "not plain", hiding this reason.
    if "_tp_style" in module.__dict__:
        raise ValueError(f"{style}: this MissLinear is already tensor-parallel ({module._tp_style})")
    if not is_plain_linear(module.base_layer):
        raise TypeError(f"{style}: the MissLinear's base layer must be a plain nn.Linear (no subclass forward, hooks, "
                        f"parametrization or DTensor/quantized weight), got {type_name(module.base_layer)}: "
                        f"{not_plain_reason(module.base_layer)}; "
                        "a hooked or subclassed base would be bypassed by the sharded op")


# The oldest torch the styles were run on. On torch 2.11 (the GPU machines', 2026-11-29) the
# backward of a sharded layer failed in DTensor's view propagation ("Attempted to flatten multiple
# dimensions, with dimension 1 being sharded"); 2.12 and 2.13 were not tried.
MIN_TORCH = (2, 14)


def check_torch_version(style: str) -> None:
    """RuntimeError naming the installed torch when it is older than MIN_TORCH."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if version < MIN_TORCH:
        raise RuntimeError(f"{style}: tensor parallelism of MiSS layers needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
                           f"(tested there); torch {torch.__version__}'s DTensor fails in the backward of a sharded "
                           "layer. Use DDP or FSDP2 with this torch, or a newer torch")


class MissColwiseParallel(ColwiseParallel):
    """torch's ColwiseParallel, also for `miss_ext.MissLinear`: base weight and bias Shard(0),
    miss_block Shard(1) (default mode), Replicate (mini: every shard of out must start at a
    multiple of mini_r) or Shard(0) (bat: out % (r * world) == 0); every mode needs out >= world,
    and default and mini out >= 2 (ValueError otherwise). x is replicated, so dropout works (same
    seed on every rank). Other modules go to torch's style, except the adapter layers it cannot
    shard: a MissBankLinear and PEFT's MiSS layers (accelerated or not) raise TypeError naming the
    class. Keyword arguments: torch's ColwiseParallel's, plus check_keys (compare each training
    call's dropout key across ranks, RuntimeError on every rank where they differ: a debugging aid,
    two tiny collectives and a host sync per layer). Also ValueError for a mesh that is not 1-D, a
    merged layer or one already tensor-parallel; TypeError for a base that is not a plain
    nn.Linear; RuntimeError on torch older than MIN_TORCH (2.14)."""

    def __init__(self, *, check_keys: bool = False, **kwargs) -> None:
        check_flag(check_keys, "check_keys", "MissColwiseParallel")
        super().__init__(**kwargs)
        self.check_keys = check_keys

    def _partition_miss_fn(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:  # distribute_module visits every submodule; the MissLinear ("") handles its base
            return
        base = module.base_layer
        _distribute_param(base, "weight", mesh, Shard(0), self.src_data_rank)
        _distribute_param(base, "bias", mesh, Shard(0), self.src_data_rank)
        placement = {"default": Shard(1), "mini": R, "bat": Shard(0)}[_colwise_mode(module)]
        _distribute_param(module, "miss_block", mesh, placement, self.src_data_rank)
        # A replicated (mini) block's gradient is reduced in tp_forward (_replicated_gradient).

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MissLinear):
            _refuse_other_adapter_layers(type(self).__name__, module)
            return super()._apply(module, device_mesh)
        check_torch_version(type(self).__name__)
        _check_miss_layer(type(self).__name__, module, device_mesh)
        n, out_f, mode = device_mesh.size(), module.out_features, _colwise_mode(module)
        if out_f < n:
            # DTensor cannot view a 3-D input's flattened rows back with an empty shard of out.
            raise ValueError(f"{type(self).__name__}: out_features={out_f} over {n} ranks leaves a rank without an "
                             "output column; shard a layer with out_features >= world")
        if out_f == 1 and mode != "bat":
            # Reached on a 1-rank mesh only (out < world is refused above). DTensor cannot run this
            # layer's sharded size-1 output dimension: float32/float64 fail in the forward's in-place
            # addmm_ (no strategy keeps the size-1 dim sharded), half-precision bases in the
            # backward's views (forward-only inference worked). Refused whole, as on 2+ ranks; bat
            # (Shard(0) tiles, out-of-place) runs, checked forward and backward.
            raise ValueError(f"{type(self).__name__}: out_features=1 cannot be sharded column-wise in "
                             f"{module.mode} mode (on a 1-rank mesh DTensor cannot run a MiSS layer whose sharded "
                             "output dimension has size 1: the forward's in-place update, or for half-precision "
                             "bases the backward's views, fail); use MissRowwiseParallel for this layer, or "
                             "leave it unsharded")
        if mode == "mini" and not shards_aligned(out_f, module.mini_r, device_mesh):
            raise ValueError(f"{type(self).__name__}: mini mode shards out_features={out_f} over {n} ranks, so every "
                             f"shard must start at a multiple of mini_r={module.mini_r} (out/world % mini_r == 0); "
                             "otherwise each shard would need its own phase of the tiled block")
        if module.mode == "bat" and out_f % (module.r * n) != 0:
            raise ValueError(f"{type(self).__name__}: bat mode shards out_features={out_f} over {n} ranks in whole "
                             f"r x r tiles, so out_features must be a multiple of r * world = {module.r * n}")
        module._tp_style = "colwise"
        module._tp_check_keys = self.check_keys
        return distribute_module(
            module, device_mesh, self._partition_miss_fn,
            functools.partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            functools.partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class MissRowwiseParallel(RowwiseParallel):
    """torch's RowwiseParallel, also for `miss_ext.MissLinear`: base weight Shard(1), bias and
    miss_block Replicate. The block's term is computed from the local fold of the local x shard,
    a Partial sum, reduced with the base output by the one all-reduce the layer does anyway; that
    needs every shard of in to start at a multiple of r and no dropout. Otherwise the fold's
    strategy all-gathers x (correct, costs tokens x in per layer and step; warned here).
    Bat needs in % (r * world) == 0 and (out / r) % world == 0 (ValueError otherwise).
    Keyword arguments, check_keys and the other errors: as MissColwiseParallel."""

    def __init__(self, *, check_keys: bool = False, **kwargs) -> None:
        check_flag(check_keys, "check_keys", "MissRowwiseParallel")
        super().__init__(**kwargs)
        self.check_keys = check_keys

    def _partition_miss_fn(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return
        base = module.base_layer
        _distribute_param(base, "weight", mesh, Shard(1), self.src_data_rank)
        _distribute_param(base, "bias", mesh, R, self.src_data_rank)
        _distribute_param(module, "miss_block", mesh, R, self.src_data_rank)  # grad reduced: tp_forward

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, MissLinear):
            _refuse_other_adapter_layers(type(self).__name__, module)
            return super()._apply(module, device_mesh)
        check_torch_version(type(self).__name__)
        style = type(self).__name__
        _check_miss_layer(style, module, device_mesh)
        n, in_f, r = device_mesh.size(), module.in_features, module.r
        if module.mode == "bat":
            if in_f % (r * n) != 0:
                raise ValueError(f"{style}: bat mode shards in_features={in_f} over {n} ranks in whole r x r tiles, so "
                                 f"in_features must be a multiple of r * world = {r * n}")
            if (module.out_features // r) % n != 0:
                # The backward views the in-sharded weight as (out/r, in, r); DTensor's view rules
                # need that first dimension to split evenly over the ranks (found on 2 ranks: out/r
                # odd fails in backward, even works).
                raise ValueError(f"{style}: bat mode needs out_features/r = {module.out_features // r} divisible by "
                                 f"the {n} ranks (its backward views the sharded weight as (out/r, in, r))")
        elif not shards_aligned(in_f, r, device_mesh) or module.dropout > 0.0:
            why = (f"dropout={module.dropout} (its mask is indexed by the global column)" if module.dropout > 0.0
                   else f"in_features={in_f} over {n} ranks gives shards that do not start at multiples of r={r}")
            warnings.warn(f"{style}: {why}, so the fold of a local x shard is not a part of the full fold; x is "
                          "all-gathered for the adapter's fold (correct, but a tokens x in_features all-gather per "
                          "step in training)", stacklevel=3)
        self.desired_input_layouts = (Shard(-1),)
        module._tp_style = "rowwise"
        module._tp_check_keys = self.check_keys
        return distribute_module(
            module, device_mesh, self._partition_miss_fn,
            functools.partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            functools.partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


register_strategies()  # on import: the styles above and any DTensor call of a miss op need them
