"""Model-level MiSS without PEFT: put `MissLinear` layers into a model, merge them back out."""
import functools
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._distributed import fsdp_modules, is_dtensor, reshard_fsdp
from .base_layers import (WEIGHT_READING_PARENTS, base_refusal, is_conv1d, linear_sizes, merge_refusal,
                          read_to_describe, type_name, weight_out_in)
from .modules import (PEFT_REFUSES_R_ABOVE_IN, MissLinear, block_merge_problem, block_shape, check_dropout,
                      check_flag, non_finite_summary)
from .targets import (ALL_LINEAR, TargetModules, bare_parameters_named, canonical_targets, check_selection_fields,
                      check_target_modules, default_targets, describe, is_default, find_targets, matches,
                      matches_by_suffix, module_paths, modules_to_save_paths, other_holders, parameter_paths,
                      peft_selects, record_sharing, refuse_bare_parameters, second_paths, set_module,
                      shared_weight_message, stored_weight_and_bias, warn_unmatched)

# The public names (README); the other functions here are the package's internals, used across its modules.
__all__ = ["apply_miss", "merge_and_unload", "miss_layers", "record_shared_weights"]


def parent_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module holding the submodule at `path` (None for the model itself)."""
    if not path:
        return None
    return model.get_submodule(path.rpartition(".")[0])


def same_slot_paths(model: nn.Module, path: str, paths: Optional[Sequence[str]] = None) -> List[str]:
    """The paths (of `paths`, default: every path of the module at `path`) that reach it through
    the same parent object and attribute as `path` (a shared parent, `self.alias = self.enc`):
    replacing the module at `path` replaces it at those too, unlike a second registration of the
    module itself (`self.b = self.a`), which keeps the old object."""
    if not path:
        return [path]
    if paths is None:
        paths = module_paths(model).get(id(model.get_submodule(path)), [path])
    parent, attribute = parent_module(model, path), path.rpartition(".")[2]
    return [p for p in paths if p == path or (p and p.rpartition(".")[2] == attribute
                                              and parent_module(model, p) is parent)]


def refuse_lazy_tensors(model: nn.Module, who: str) -> None:
    """TypeError naming the model's unmaterialised lazy parameters and buffers (nn.LazyLinear & co.
    before their first forward), before anything changes: they refuse every op, the freeze of the
    other parameters included, with torch's generic "uninitialized parameter" message, which used
    to surface after earlier layers had been adapted."""
    lazy = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if nn.parameter.is_lazy(t)]
    if lazy:
        raise TypeError(f"{who}: {describe(lazy, 4)} are not materialised yet (lazy modules such as nn.LazyLinear "
                        "before their first forward: their sizes are unknown); run the model once on a dummy batch "
                        "first")


def drop_weight_read_linears(model: nn.Module, found: List[Tuple[str, nn.Module]], who: str,
                             stacklevel: int) -> List[Tuple[str, nn.Module]]:
    """`found` without the linears whose parent reads their weight directly instead of calling
    them (nn.MultiheadAttention's out_proj), which could never run an adapter: what
    target_modules="all-linear" skips, with a warning naming them (a name refuses them:
    base_refusal)."""
    unusable = [name for name, _ in found if isinstance(parent_module(model, name), WEIGHT_READING_PARENTS)]
    if unusable:
        found = [(name, m) for name, m in found if name not in unusable]
        warnings.warn(f"{who}target_modules='all-linear' skips {describe(unusable)}: their parent reads the weight "
                      "directly (nn.MultiheadAttention), so an adapter there would never run", stacklevel=stacklevel)
    return found


def compiled_inner(model: nn.Module) -> Optional[nn.Module]:
    """The module inside a torch.compile wrapper (OptimizedModule's `_orig_mod`), else None.
    torch._dynamo is only looked up, never imported: a compiled module means it is loaded."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return None


def _wrapper_chain(model: nn.Module) -> List[nn.Module]:
    """The model and every module inside its DistributedDataParallel / DataParallel (`.module`)
    and torch.compile (`_orig_mod`) wrappers, outermost first, in any nesting."""
    chain = [model]
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif (inner := compiled_inner(model)) is not None:
            model = inner
        else:
            return chain
        chain.append(model)


def check_module(model: object, where: str) -> None:
    """TypeError naming `where` unless `model` is a torch.nn.Module (a str or None passed as the
    model failed later with a bare AttributeError from inside miss_ext)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: the model must be a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")


def peft_module(model: nn.Module) -> Optional[str]:
    """"<class> at '<path>'" for the first module of `model` whose class is PEFT's or derives from
    one (a PeftModel, a tuner, PEFT's adapter layers and modules_to_save wrappers, the accelerated
    ones); None when there is none."""
    for path, module in model.named_modules():
        if any(k.__module__.partition(".")[0] == "peft" for k in type(module).__mro__):
            return f"{type(module).__name__} at {path or 'the top'!r}"
    return None


def peft_hint(model: nn.Module, saving: bool = False) -> str:
    """Said beside "no miss_ext layer" when the model is a PEFT model: miss_ext's model functions
    work on miss_ext's own layers; a PEFT model has PEFT's own functions. `saving`: said by a save,
    which names the call PEFT's save_pretrained needs under FSDP2."""
    found = peft_module(model)
    if found is None:
        return ""
    fsdp = ""
    if saving and fsdp_modules(model.modules()):
        # PEFT's save_pretrained reads the sharded parameters' storage under FSDP2 and fails
        # ("invalid python storage"); with the full state dict gathered first it writes the
        # adapter (a review, 2026-12-05).
        # ignore_frozen_params: only the adapter's parameters are gathered, not the frozen base.
        fsdp = ("; under FSDP2, gather the state dict first: model.save_pretrained(path, state_dict="
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, "
                "ignore_frozen_params=True)), is_main_process=torch.distributed.get_rank() == 0), every rank "
                "calling it (torch.distributed.checkpoint.state_dict)")
    return (f" (it is a PEFT model: {found}; use PEFT's own save_pretrained / merge_and_unload / load_adapter, "
            f"adapter_names= for mixed batches, and miss_ext.peft.accelerate(model) for the fast layers{fsdp})")


def refuse_peft_model(model: nn.Module, where: str) -> None:
    """TypeError for a model holding PEFT's modules, given to a function that adds or loads
    miss_ext's own layers: miss_ext layers inside a PeftModel were saved under PEFT's wrapper
    paths (base_model.model....), a file neither PEFT nor load_adapter could load, and layers PEFT
    had adapted were refused as "not an nn.Linear" (a new-user review, 2026-12-03)."""
    found = peft_module(model)
    if found is not None:
        raise TypeError(f"{where}: the model holds PEFT's modules ({found}); miss_ext's model functions add and "
                        "load miss_ext's own layers on a "
                        "model without PEFT's. For a PEFT model use PEFT's own API (add_adapter, load_adapter, "
                        "save_pretrained, adapter_names= for mixed batches) with miss_ext.peft.accelerate(model) "
                        "for the fast layers, or call this on the base model (peft_model.unload() gives it back)")


def holds_transformers_adapters(model: nn.Module) -> bool:
    """True for a transformers model whose PEFT adapters transformers' PeftAdapterMixin added
    (model.add_adapter / model.load_adapter): no PeftModel around it, its adapters' configs in its
    own `peft_config`."""
    return getattr(model, "_hf_peft_config_loaded", False) is True and isinstance(getattr(model, "peft_config", None),
                                                                                  dict)


def unwrap_model(model: nn.Module, where: str) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers: adapter
    files name module paths of the model itself, without a wrapper's "module." or "_orig_mod."
    prefix. TypeError for a model that is no nn.Module, and (refuse_fsdp1) for a model holding
    FSDP1 wrappers, naming `where`."""
    check_module(model, where)
    refuse_fsdp1(model, where)
    return wrapped_model(model)


def wrapped_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers (unwrap_model without its
    checks), for attributes a wrapper does not forward (DDP's and DataParallel's do not)."""
    return _wrapper_chain(model)[-1]


def refuse_fsdp1(model: nn.Module, where: str) -> None:
    """TypeError for a model with FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) wrappers
    in it. FSDP1 holds each wrapped module's parameters as this rank's part of one flat tensor, and
    inserts "_fsdp_wrapped_module." into every module path: save_adapter wrote each rank's flat
    shard under those paths (an unloadable file, written by every rank to one path) and merges
    met 1-D weights. Found by a review (2026-12-03). Training under FSDP1 is not affected (the
    layers' forward and backward see the gathered parameters); the helpers that read or change
    blocks by module path support FSDP2 (fully_shard), DDP and tensor parallelism instead."""
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(f"{where}: the model is wrapped in FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), "
                        "which holds each rank's part of its parameters as flat shards under '_fsdp_wrapped_module.' "
                        "paths; miss_ext reads and writes whole blocks by module path, with FSDP2 "
                        "(torch.distributed.fsdp.fully_shard), DDP or tensor parallelism. Shard the model with "
                        "fully_shard (docs/multi_gpu.md)")


def refuse_ddp_wrapped(model: nn.Module, where: str) -> None:
    """ValueError for a DistributedDataParallel model about to get new parameters: DDP registers
    the parameters to reduce when it is built, so new blocks would train per rank, unreduced."""
    check_module(model, where)
    if is_ddp(model):
        raise ValueError(f"{where}: the model is wrapped in DistributedDataParallel, which registered its parameters "
                         "when it was built: new MiSS blocks would not have their gradients averaged over the ranks. "
                         "Add the adapters first, then wrap the model in DDP (docs/multi_gpu.md)")


def requires_grad_restorer(module: nn.Module) -> Callable[[], None]:
    """A function giving every parameter of `module` the requires_grad flag it has now back (the
    rollbacks of apply_miss, load_adapter, apply_bank, load_bank and the tuner's set_adapter)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]

    def restore():
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


def training_restorer(module: nn.Module) -> Callable[[], None]:
    """A function giving `module` and every submodule the training mode it has now back (the
    tuner's set_adapter rollback: PEFT 0.22's set_adapter(inference_mode=True) puts the new
    adapters' dropout in eval mode, and switching back does not undo that)."""
    modes = [(m, m.training) for m in module.modules()]

    def restore():
        for m, training in modes:
            m.training = training

    return restore


def settings_undos(model: nn.Module) -> List[Tuple[str, Callable[[], None]]]:
    """The undos (for undo_each, which runs them last when given in reverse) of what apply_miss and
    load_adapter change besides modules and values: every parameter's requires_grad flag, the
    record of what trains beside the blocks (record_extras) and each MissLinear's record of the
    holders of its base weight (record_shared_weights), as they are now."""
    restore_flags = requires_grad_restorer(model)
    record = getattr(model, EXTRAS_ATTR, None)
    shared = [(layer, list(layer._shared_with)) for _, layer in miss_layers(model)]

    def restore_record():
        if record is None:
            model.__dict__.pop(EXTRAS_ATTR, None)
        else:
            setattr(model, EXTRAS_ATTR, record)

    def restore_shared():
        for layer, holders in shared:
            layer._shared_with = holders

    return [("", restore_flags), ("", restore_record), ("", restore_shared)]


def undo_each(undos: Sequence[Tuple[str, Callable[[], None]]], where: str) -> None:
    """The rollback of a call that failed part way: runs every (name, undo) in order, going on
    after one fails (the caller then raises its own error), and warns naming those that failed.
    A second interrupt (KeyboardInterrupt) during the rollback does not stop it either: the
    remaining undos run, then it is raised (a review, 2026-12-06: a second Ctrl-C left the
    blocks of a half-loaded adapter in place)."""
    failed, interrupt = [], None
    for name, undo in undos:
        try:
            undo()
        except BaseException as exc:
            failed.append(f"{name or 'the model'} ({exc!r})")
            if not isinstance(exc, Exception) and interrupt is None:
                interrupt = exc
    if failed:
        warnings.warn(f"{where}: could not undo its changes to " + "; ".join(failed), stacklevel=3)
    if interrupt is not None:
        raise interrupt


def is_ddp(model: nn.Module) -> bool:
    """Whether the model is wrapped in DistributedDataParallel, also under torch.compile wrappers."""
    return any(isinstance(m, nn.parallel.DistributedDataParallel) for m in _wrapper_chain(model))


def ddp_needs_every_gradient(model: nn.Module) -> bool:
    """Whether a DistributedDataParallel wrapper around the model expects a gradient for every
    parameter it registered as trainable (find_unused_parameters=False, its default, or
    static_graph=True): a registered parameter that stops getting one (frozen, or gone in a merge)
    makes its next training step fail in its reducer."""
    return any(isinstance(m, nn.parallel.DistributedDataParallel) and
               (not getattr(m, "find_unused_parameters", False) or getattr(m, "static_graph", False))
               for m in _wrapper_chain(model))


def writes_here(shared_by_ranks: bool, model: nn.Module) -> bool:
    """Whether this process writes the files of `model` (as the caller passed it, wrappers and
    all) when the ranks that hold it hold the same blocks (sharded and gathered, or replicated by
    DDP): the first of those ranks only, i.e. rank 0 of its DistributedDataParallel's process
    group and, if parameters are sharded (FSDP2, tensor parallelism: DTensors), the rank at
    coordinate 0 of every dimension of each device mesh they are on; rank 0 of the default group
    when the model tells neither. Every caller when the blocks are not shared by ranks. Data
    parallelism the model does not show (torch's composable replicate(), gradients reduced by
    hand) cannot be seen: there each of its replicas writes, unless is_main_process chooses.

    Not simply rank 0 of the default group: a model held by some ranks only (ranks 1 and 2 of 3,
    a pipeline stage beside data parallelism) was then written by no one, silently (found by a
    review, 2026-12-03)."""
    if not shared_by_ranks:
        return True
    chain = _wrapper_chain(model)
    told = False
    for wrapper in chain:
        if isinstance(wrapper, nn.parallel.DistributedDataParallel):
            told = True
            if torch.distributed.get_rank(wrapper.process_group) != 0:
                return False
    # Every mesh the parameters are on: FSDP2 over a data-parallel mesh beside tensor parallelism
    # over another leaves some parameters (embeddings, norms) on one mesh and the blocks on two.
    meshes = {id(p.device_mesh): p.device_mesh for p in chain[-1].parameters() if is_dtensor(p)}
    for mesh in meshes.values():
        told = True
        coordinate = mesh.get_coordinate()
        if coordinate is None or any(c != 0 for c in coordinate):
            return False
    return told or torch.distributed.get_rank() == 0


def miss_layers(model: nn.Module) -> List[Tuple[str, MissLinear]]:
    """(path, layer) of every `miss_ext.MissLinear` in the model, in model order, each path as
    `model.named_modules()` names it: a wrapper's prefix included (torch.compile's "_orig_mod.",
    DDP's "module."), so that `model.get_submodule(path)` finds the layer. TypeError for a model
    that is no nn.Module."""
    check_module(model, "miss_layers")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MissLinear)]


def refuse_aliased_layers(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]], what: str) -> None:
    """ValueError for adapter layers that the model holds under several paths (a MissLinear
    assigned to a second attribute after apply_miss: `model.l2 = model.l1`), which an adapter file
    cannot describe: it names each block by one module path, and loading it adapts that path
    alone, so the loaded model would not compute what this one does (a review, 2026-12-05: 0.49
    off after a save/load round trip, silently). A base nn.Linear aliased before apply_miss is not
    this case: only the path that was adapted is (warn_shared, README)."""
    paths = module_paths(model)
    aliased = []
    for name, layer in layers:
        held = paths.get(id(layer), [name])
        # Paths through a shared parent (self.alias = self.enc) are the same slot: a load replaces
        # the layer there for both (a review, 2026-12-05: refused at first, wrongly).
        others = [p for p in held if p not in same_slot_paths(model, name, held)]
        if others:
            aliased.append(f"{name!r} (also at {describe(others)})")
    if aliased:
        raise ValueError(f"{what}: adapter layers held under several module paths: {describe(aliased)}. An adapter "
                         "file names each block by one path, and a load adapts that path alone, so the loaded model "
                         "would not compute what this one does; nothing was written. Hold each adapted layer under "
                         "one path to save it")


def freeze_all_but_blocks(model: nn.Module) -> None:
    """Every parameter stops requiring grad except the miss_block of each MissLinear (PEFT's
    get_peft_model freezes the same way); blocks from earlier calls stay trainable, and so do the
    modules_to_save and biases an earlier apply_miss / load_adapter recorded (`trainable_extras`)."""
    blocks = {id(layer.miss_block) for _, layer in miss_layers(model)}
    for p in model.parameters():
        if id(p) not in blocks:
            p.requires_grad_(False)
    mark_extras_trainable(model)


# What a PEFT config trains beside the blocks, recorded on the model by apply_miss / load_adapter so
# that later freezes keep it trainable and save_adapter writes it: {"modules_to_save": [module
# paths], "bias": "none" | "all" | "MiSS_only"}.
EXTRAS_ATTR = "_miss_ext_trainable"
# PEFT's bias values (MissConfig documents "MiSS_only"; BoneConfig "Bone_only"; the same semantic).
# PEFT (0.18 and later, BaseTuner._mark_only_adapters_as_trainable) takes any value ending in
# "_only" as "the adapted layers' biases", and older releases took only lowercase spellings
# ("miss_only" in 0.17's MissModel, "bone_only" in BoneModel), so real adapter folders carry those,
# also after PEFT's scripts/convert-bone-to-miss.py (it copies the config as it is): every such
# value is normalised to "MiSS_only". PEFT's test is case-sensitive ("MISS_ONLY" raises there), and
# so is this one.
BIAS_VALUES = ("none", "all", "MiSS_only")


def trainable_extras(model: nn.Module) -> dict:
    """{"modules_to_save": [paths], "bias": ...} recorded on the model (PEFT's defaults if none).
    ValueError for a recorded path that is no longer a module of the model (the user set
    `model.head = None`, say): apply_miss and load_adapter read the record before they change
    anything, and used to fail on it with a bare AttributeError after swapping layers in (an
    atomicity review, 2026-12-03)."""
    recorded = getattr(model, EXTRAS_ATTR, None) or {}
    if recorded and not any(isinstance(m, MissLinear) for m in model.modules()):
        # Every layer of the adapter that set it was unloaded (merge_and_unload): the record is
        # stale, and the next adapter starts from PEFT's defaults, as after PEFT's merge_and_unload
        # (kept, it made the next adapter train and save the old one's lm_head and biases; a
        # review, 2026-12-05). apply_miss and load_adapter drop it.
        recorded = {}
    paths = list(recorded.get("modules_to_save", []))
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            module = exc
        if not isinstance(module, nn.Module):
            raise ValueError(f"modules_to_save {path!r}, recorded on the model by an earlier apply_miss / load_adapter "
                             f"(trained and saved beside the blocks), is no longer a module of the model ({module}); "
                             f"put a module back at {path!r}, or drop it from the record "
                             f"(model.{EXTRAS_ATTR}['modules_to_save'])")
    return {"modules_to_save": paths, "bias": recorded.get("bias", "none")}


def record_extras(model: nn.Module, recorded: dict, save_paths: List[str], bias: str) -> None:
    """Records on the model what apply_miss / load_adapter now train beside the blocks: the earlier
    record `recorded` (trainable_extras) plus the modules_to_save paths `save_paths` and the bias
    setting `bias` of this call ("none" keeps the recorded one). PEFT's defaults leave no record,
    so a stale one (which trainable_extras ignored) goes."""
    extras = {"modules_to_save": recorded["modules_to_save"] + [p for p in save_paths
                                                                if p not in recorded["modules_to_save"]],
              "bias": bias if bias != "none" else recorded["bias"]}
    if extras != {"modules_to_save": [], "bias": "none"}:
        setattr(model, EXTRAS_ATTR, extras)
    else:
        model.__dict__.pop(EXTRAS_ATTR, None)


def extra_parameters(model: nn.Module, extras: Optional[dict] = None) -> Dict[str, nn.Parameter]:
    """{PEFT file key without "base_model.model.": parameter} of what PEFT trains and saves beside
    the blocks: every parameter of each modules_to_save module, and the biases `bias` names
    ("all": every `.bias` of the model; "MiSS_only": the base biases of the MissLinear layers)."""
    extras = trainable_extras(model) if extras is None else extras
    out: Dict[str, nn.Parameter] = {}
    for path in extras["modules_to_save"]:
        for name, p in model.get_submodule(path).named_parameters():
            out[f"{path}.{name}"] = p
    if extras["bias"] == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                out.setdefault(name, p)
    elif extras["bias"] == "MiSS_only":
        for name, layer in miss_layers(model):
            if layer.base_layer.bias is not None:
                out.setdefault(f"{name}.base_layer.bias" if name else "base_layer.bias", layer.base_layer.bias)
    return out


def extra_buffers(model: nn.Module, extras: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """{PEFT file key without "base_model.model.": buffer} of the persistent buffers of each
    modules_to_save module (a BatchNorm's running_mean, running_var and num_batches_tracked).
    PEFT saves such a module's whole state_dict (get_peft_model_state_dict: every key of its
    trained copy), so they are part of the adapter: its from_pretrained fails on a file without
    them (KeyError), and a load that kept the base model's statistics would give other outputs in
    eval mode (found by a review, 2026-12-04). Non-persistent buffers are in no state_dict and
    not saved; trained biases have no buffers."""
    extras = trainable_extras(model) if extras is None else extras
    return {f"{path}.{name}": buffer for path in extras["modules_to_save"]
            for name, buffer in persistent_buffers(model.get_submodule(path)).items()}


def persistent_buffers(module: nn.Module) -> Dict[str, torch.Tensor]:
    """{name in module.state_dict(): buffer} of the buffers a state_dict holds (every name of a
    buffer held twice; none of the non-persistent ones)."""
    buffers = dict(module.named_buffers(remove_duplicate=False))
    return {name: buffers[name] for name in module.state_dict(keep_vars=True) if name in buffers}


# What PEFT's ModulesToSaveWrapper refuses to wrap (peft/utils/other.py, check_module, 0.21): a
# container is no layer with a forward of its own to copy and train.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def container_problems(model: nn.Module, paths: Sequence[str]) -> List[str]:
    """Problems for the modules_to_save `paths` that are containers (nn.ModuleList, ModuleDict,
    ParameterList, ParameterDict), which PEFT refuses (TypeError in get_peft_model and
    from_pretrained): accepted here, they made an adapter folder PEFT cannot load."""
    problems = []
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, _CONTAINERS):
            first = next(iter(module.named_children()), None)
            inside = (f"name the modules inside it instead (e.g. {path + '.' + first[0]!r})" if first is not None
                      else "name the module that holds it instead")
            problems.append(f"{path}: a {type(module).__name__}, to which PEFT cannot apply modules_to_save (a "
                            f"container, no layer of its own); {inside}")
    return problems


def mark_extras_trainable(model: nn.Module) -> None:
    """The recorded modules_to_save parameters and biases require grad (PEFT's
    _mark_only_adapters_as_trainable and ModulesToSaveWrapper do the same)."""
    for p in extra_parameters(model).values():
        p.requires_grad_(True)


def extras_requires_grad(model: nn.Module, paths: Sequence[str]) -> Dict[int, bool]:
    """{id(parameter): requires_grad} of the parameters of the modules_to_save `paths`."""
    return {id(p): p.requires_grad
            for p in extra_parameters(model, {"modules_to_save": list(paths), "bias": "none"}).values()}


def keep_earlier_frozen(model: nn.Module, paths: Sequence[str], earlier: Dict[int, bool], bias: str) -> None:
    """After a later apply_miss / load_adapter froze and marked (freeze_all_but_blocks,
    mark_extras_trainable): the modules_to_save of earlier calls that this call does not name
    (`paths`, their state `earlier` from extras_requires_grad) and that were frozen stay frozen,
    as earlier blocks do (PEFT's add_adapter leaves other adapters' copies alone). Biases this
    call's `bias` trains are trained."""
    trained = set()
    if bias != "none":
        trained = {id(p) for p in extra_parameters(model, {"modules_to_save": [], "bias": bias}).values()}
    for p in extra_parameters(model, {"modules_to_save": list(paths), "bias": "none"}).values():
        if not earlier.get(id(p), True) and id(p) not in trained:
            p.requires_grad_(False)


def record_shared_weights(model: nn.Module) -> Dict[str, List[str]]:
    """Finds, by parameter identity, which MissLinear layers share a base weight or bias with
    other modules (tied embeddings, a linear also registered under another path, ...).

    Sets `layer._shared_with` on every MissLinear of the model (the other holders' parameter
    paths, [] when not shared; MissLinear.merge reads it, as a layer cannot see its model) and
    returns {layer path: other holders} for the shared ones. Call it again after untying by
    hand so that a layer's own merge() sees the change (merge_and_unload always re-checks)."""
    return record_sharing(model, [(layer, layer.base_layer) for _, layer in miss_layers(model)])


def shared_before_wrapping(model: nn.Module, linears: Sequence[Tuple[str, nn.Module]]) -> Dict[str, List[str]]:
    """{path: other holders} for the base layers about to be wrapped whose weight or bias other
    modules share, found before any change, so that its warning (warn_shared) can come first:
    turned into an error, it then leaves the model as it was."""
    params, held = parameter_paths(model, with_buffers=True), module_paths(model)  # record_sharing
    shared = {}
    for name, module in linears:
        # The paths through a shared parent get the adapter too (same_slot_paths): not other holders.
        holders = other_holders(params, stored_weight_and_bias(module),
                                same_slot_paths(model, name, held.get(id(module), [name])))
        if holders:
            shared[name] = holders
    return shared


def warn_shared(shared: Dict[str, List[str]], stacklevel: int = 3) -> None:
    """One warning at setup for new adapters on shared weights (PEFT warns there too)."""
    if shared:
        where = "; ".join(f"{name} (shared with {describe(holders)})" for name, holders in shared.items())
        warnings.warn(f"MiSS adapter on layers whose base parameters are shared with other modules: {where}. "
                      "Unmerged this is correct (only these layers' outputs change), but merging would also change "
                      "the other modules, so merge and merge_and_unload will refuse until the weight is untied",
                      stacklevel=stacklevel)


def _drop_shared_linears(model: nn.Module, found):
    """"all-linear" must not pick layers that could never be merged: drops the nn.Linear (and
    Conv1D) layers whose weight or bias is also held elsewhere. Returns (kept, {path: other
    holders})."""
    # Linears and Conv1Ds: existing MissLinear layers go on to their own errors.
    skipped = shared_before_wrapping(model, [(n, m) for n, m in found if isinstance(m, nn.Linear) or is_conv1d(m)])
    return [(name, module) for name, module in found if name not in skipped], skipped


def _check_init_weights(init_weights: object) -> None:
    """init_weights is a bool here; PEFT's string values select a mode, which is `mode` here, so a
    string (truthy) would otherwise silently give a zero-initialised default-mode adapter."""
    if not isinstance(init_weights, bool):
        hint = f"; PEFT's init_weights={init_weights!r} is mode={init_weights!r} here" \
            if init_weights in ("bat", "mini") else ""
        raise TypeError(f"init_weights must be True (zeros) or False (random), got init_weights={init_weights!r}{hint}")


def second_paths_hint(seconds: List[Tuple[str, str]]) -> str:
    """The end of a "matches no module" error when the names matched only second paths of modules
    (targets.second_paths), else ""."""
    if not seconds:
        return ""
    # A first path inside an adapter layer is its base, adapted already: naming it would be refused
    # in turn (a review, 2026-12-05).
    inside = [first.endswith(".base_layer") for _, first in seconds]
    where = "; ".join(f"{path} is the base layer of the adapter layer at {first[:-len('.base_layer')]}, adapted already"
                      if base else f"{path} is the module first registered as {first}"
                      for (path, first), base in zip(seconds, inside))
    if all(inside):
        return f": {where} (one module object under two paths)"
    return (f" under the path torch lists it by: {where} (one module object under two paths); name that first path "
            "to adapt it")


def warn_second_paths(model: nn.Module, target_modules, seconds: List[Tuple[str, str]], adapted: set,
                      excluded: Callable[[str], bool] = lambda path: False, prefix: str = "",
                      stacklevel: int = 3) -> None:
    """Says what becomes of each named second path of a module (targets.second_paths), unless
    exclude_modules leaves it out: its first path is not adapted, or the module was registered
    twice (`self.b = self.a`), so only the first path gets the adapter and the second keeps the
    plain layer. Silent where a shared parent holds it (`self.alias = self.enc`): the child is
    replaced inside that parent, so both paths reach the adapter. Shared by apply_miss and
    apply_bank (a review, 2026-12-05: apply_bank left the second path plain without a word)."""
    notes = []
    for path, first in seconds:
        if excluded(path):
            continue
        if first not in adapted:
            notes.append(f"{path} is the module first registered as {first}, which is not adapted (name {first})")
        elif not (parent_module(model, path) is parent_module(model, first)
                  and path.rpartition(".")[2] == first.rpartition(".")[2]):
            notes.append(f"{path} is the module first registered as {first}: only {first} is adapted, {path} keeps "
                         "calling the plain layer")
    if notes:
        warnings.warn(f"{prefix}target_modules={target_modules!r} names second paths of modules (one module object "
                      f"under two paths, listed once by torch): {'; '.join(notes)}", stacklevel=stacklevel)


def _check_targets(found, target_modules, seconds: List[Tuple[str, str]]) -> None:
    """found must be non-empty and hold no adapter layer. `seconds` (targets.second_paths): named
    paths of modules torch lists under another path, named in the error when nothing else matched."""
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matches no module of the model"
                         + second_paths_hint(seconds))
    already = [name for name, m in found if isinstance(m, MissLinear)]
    if already:
        raise ValueError(f"these modules already have a MiSS adapter (miss_ext.MissLinear holds one): "
                         f"{describe(already)}")
    wrong = [f"{name} ({type_name(m)})" for name, m in found if not isinstance(m, nn.Linear) and not is_conv1d(m)]
    if wrong:
        raise TypeError(f"MiSS adapts torch.nn.Linear layers only (and transformers' Conv1D); "
                        f"target_modules={target_modules!r} also matches {describe(wrong)}")


def offload_hook(module: nn.Module) -> bool:
    """Whether accelerate's hook on `module` (`_hf_hook`) offloads its parameters (an
    AlignDevicesHook with offload=True, also inside a SequentialHook): a device_map with "cpu" /
    "disk", cpu_offload, disk_offload. A hook that only moves inputs between devices (offload=False:
    what a multi-device device_map puts on every module) does not; a hook of an unknown kind is
    taken to."""
    def offloads(hook) -> bool:
        if isinstance(getattr(hook, "hooks", None), (list, tuple)):
            return any(offloads(h) for h in hook.hooks)
        return bool(getattr(hook, "offload", True))
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and offloads(hook)


def under_offload_hook(model: nn.Module, path: str) -> bool:
    """Whether the module at `path`, or one of its ancestors, carries an offloading accelerate hook
    (offload_hook)."""
    parts = path.split(".") if path else []
    return any(offload_hook(model.get_submodule(".".join(parts[:i]))) for i in range(len(parts) + 1))


def refuse_offloaded(model: nn.Module, found: Sequence[Tuple[str, nn.Module]], where: str) -> None:
    """ValueError naming the layers of `found` that accelerate offloads (device_map with "cpu" /
    "disk" offload, cpu_offload, disk_offload): weight or bias on the meta device while an
    accelerate hook (`_hf_hook`) on the layer or an ancestor puts the values in only for each
    forward. A new block would be made on the meta device (the base weight's), which the hook
    does not know: it would hold no values, and the forward then adds garbage to the outputs,
    silently. Without such a hook a meta layer is a model still to be materialised (to_empty +
    load_state_dict), whose blocks materialise with it: allowed."""
    offloaded = []
    for name, module in found:
        if not any(isinstance(t, torch.Tensor) and t.is_meta for t in (read_to_describe(module, "weight"),
                                                                       read_to_describe(module, "bias"))):
            continue
        if under_offload_hook(model, name):
            offloaded.append(name or "the model")
    if offloaded:
        raise ValueError(f"{where}: {describe(offloaded, 8)}: the model's parameters here are on the meta device, "
                         "put in only for each forward by accelerate's offload hook (`_hf_hook`: a device_map with "
                         "\"cpu\" or \"disk\" offload), so a new adapter block would be created on the meta device and "
                         "hold no values: offloaded layers cannot hold an adapter. Load the model without offload (a "
                         "device_map to real devices only, e.g. device_map={'': 'cpu'} or 'cuda:0'), then add the "
                         "adapter. Nothing was changed")


def _is_config(value: object) -> bool:
    """A PEFT config object (MissConfig, BoneConfig) or an adapter_config.json dict."""
    return isinstance(value, Mapping) or (hasattr(value, "peft_type") and callable(getattr(value, "to_dict", None)))


def check_bias(bias: object) -> str:
    """PEFT's bias value, normalised (any value ending in "_only", such as "miss_only", "Bone_only"
    or "lora_only", -> "MiSS_only", PEFT's rule); ValueError otherwise."""
    if isinstance(bias, str) and bias in BIAS_VALUES:
        return bias
    if isinstance(bias, str) and bias.endswith("_only"):
        return "MiSS_only"
    raise ValueError(f"bias={bias!r}: expected 'none', 'all' (every bias of the model is trained and saved) or "
                     "'MiSS_only' (the biases of the adapted layers; as in PEFT, any value ending in '_only' "
                     "means the same)")


def saved_whole_problem(new_layers: Sequence[str], recorded: Sequence[str]) -> Optional[str]:
    """The reverse of _plan_modules_to_save's check, across calls: an earlier call's modules_to_save
    is trained and saved whole, so none of the layers an apply_miss or load_adapter call would newly
    adapt may be (or lie inside) one (its weight would be frozen silently, and the saved config would
    name it twice, which neither load_adapter nor PEFT loads). The message, or None."""
    inside = [name for name in new_layers if any(name == p or name.startswith(p + ".") for p in recorded)]
    if not inside:
        return None
    return (f"{describe(inside)}: an earlier apply_miss/load_adapter call recorded {describe(recorded)} as "
            "modules_to_save (trained and saved whole); a module cannot be both adapted and saved whole")


def _plan_modules_to_save(model: nn.Module, modules_to_save, found, by_suffix: bool) -> List[str]:
    """The module paths PEFT would wrap as modules_to_save (by_suffix: targets.matches_by_suffix),
    checked: none may be or hold an adapter layer, be nested in another, or share parameters with
    other modules (PEFT trains a separate copy; training it in place would change the other holder
    too)."""
    paths, unused = modules_to_save_paths(model, list(modules_to_save or []), skip_inside=(MissLinear,),
                                          by_suffix=by_suffix)
    if unused:
        warnings.warn(f"modules_to_save entries {unused!r} match no module of the model (PEFT ignores them too)",
                      stacklevel=3)
    targets = {name for name, _ in found}
    problems = container_problems(model, paths)
    params = parameter_paths(model, with_buffers=True) if paths else None
    for path in paths:
        if any(problem.startswith(f"{path}: ") for problem in problems):
            continue
        module = model.get_submodule(path)
        inner = [f"{path}.{n}" if n else path for n, m in module.named_modules() if isinstance(m, MissLinear)]
        if inner or path in targets:
            problems.append(f"{path}: it is (or holds) a MiSS adapter layer ({describe(inner or [path])}); a module "
                            "cannot be both adapted and saved whole")
            continue
        nested = [p for p in paths if p != path and path.startswith(p + ".")]
        if nested:
            problems.append(f"{path}: nested inside {describe(nested)}, which is saved whole already")
            continue
        # Buffers too: a module held at two paths (a BatchNorm(affine=False) has no parameters)
        # would move the other holder's running statistics as it trains (a review, 2026-12-04).
        holders = other_holders(params, list(module.parameters()) + list(module.buffers()), [path])
        if holders:
            problems.append(f"{path}: its parameters or buffers are shared with {describe(holders)} (e.g. tied "
                            "embeddings); PEFT trains a separate copy, training it here would change those too. "
                            "Untie it first")
    if problems:
        raise ValueError(f"modules_to_save={list(modules_to_save)!r}:\n  " + "\n  ".join(problems))
    return paths


def apply_miss(model: nn.Module, target_modules: Union[TargetModules, Mapping, object, None] = None,
               r: Optional[int] = None, mode: str = "default", mini_r: int = 1, dropout: float = 0.0,
               init_weights: bool = True, freeze_others: bool = True, *,
               exclude_modules: Optional[Union[str, Sequence[str]]] = None,
               layers_to_transform: Optional[Union[int, Sequence[int]]] = None,
               layers_pattern: Optional[Union[str, Sequence[str]]] = None,
               modules_to_save: Optional[Sequence[str]] = None, bias: str = "none") -> nn.Module:
    """Replaces the matching `nn.Linear` layers with `MissLinear` in place and returns the model.

    target_modules follows PEFT: a list of names matching a module path exactly or as its last
    dotted components ("q_proj", "self_attn.q_proj"), a regex string matching the whole path (a
    bare "q_proj" string matches only a module whose whole path is "q_proj"), or "all-linear"
    (every nn.Linear except the output head, i.e. the module `model.get_output_embeddings()`
    returns: a model without that method, such as a plain nn.Module, has all its linears
    adapted, as in PEFT), or None: PEFT's default targets for `model.config.model_type`
    (get_peft_model's table, read from the installed peft; ValueError for a type it lacks or a
    model without a transformers config, ImportError without peft). r: int >= 1 (r > in_features allowed, with a UserWarning); mode
    "default", "mini" or "bat"; mini_r (mode "mini" only): the block's width, (r, mini_r), tiled
    along out_features, which it must divide; default 1, PEFT's MissConfig default, so a mini
    adapter without it has r trainable values per layer; dropout in [0, 1). With freeze_others (the default, as
    PEFT's get_peft_model), every parameter except the miss_block ones (new and earlier) stops
    requiring grad.

    A layer whose weight or bias is also held by another module (tied embeddings, one linear
    under two paths) is adapted if named, with a warning: the unmerged forward is right, but a
    merge would change the other module, so merging it is refused later. "all-linear" skips
    such layers (with a warning naming them).

    Every check runs before anything changes: a target that is not an nn.Linear, or a non-bool
    init_weights, or an r / mini_r that is not an int (or no r at all), raises TypeError; no
    match, a layer that already has an adapter, a bad r / mini_r / dropout value for any layer
    raises ValueError; and the model is left as it was. (mini_r
    outside mode="mini" is ignored, as PEFT ignores it.) Also ValueError, where PEFT goes on
    silently: a target (list entry or regex) that matches the path of a parameter lying in no
    layer it selects, such as transformers 5's fused MoE expert weights (`experts.down_proj` is
    a 3-D parameter, not an nn.Linear; name the layers more precisely, e.g.
    "shared_expert.down_proj"); and a target layer offloaded by accelerate (its weight on the meta
    device, an `_hf_hook` on it or an ancestor: a new block there would hold no values; load the
    model without offload). A list entry that matches no module while others do gives one
    UserWarning naming it (PEFT ignores it silently).

    PEFT's other MissConfig fields, as keywords: exclude_modules (a regex for the whole path or a
    list of names/suffixes), layers_to_transform (an int or a list of layer indices, read from
    the path after `layers_pattern`, or when it is None after any component but the path's first,
    as PEFT: `model.layers.1.q_proj` is layer 1, `layers.1.q_proj` no layer), modules_to_save
    (modules trained and saved whole, as the installed PEFT matches them: from 0.22 a path that is
    an entry or ends with "." + entry, before a path ending with the entry as a string, so "norm"
    also matched every "input_layernorm"; targets.matches_by_suffix) and bias ("none", "all":
    every bias of the model, "MiSS_only": the adapted layers' biases, trained and saved). The
    adapted modules are exactly those get_peft_model adapts.

    Instead of target_modules and the keywords, `apply_miss(model, config)` takes a
    `peft.MissConfig` / `BoneConfig` or the dict of an adapter_config.json: init_weights True /
    False / "mini" / "bat" become init_weights=True / init_weights=False / mode="mini" /
    mode="bat"; miss_dropout is dropout. Only freeze_others may be given with a config. As
    get_peft_model, a config's task_type SEQ_CLS / TOKEN_CLS adds the model's "classifier" /
    "score" / "pre_classifier" head, and QUESTION_ANS its "qa_outputs", to modules_to_save
    (trained and saved whole), and inference_mode=True (what PEFT writes into a saved
    adapter_config.json) leaves the new blocks and those modules frozen and in eval mode (no
    dropout until the next model.train(), as PEFT 0.22): set it False to train. A call decides only for what it adds
    or names: blocks of earlier calls, and modules_to_save of earlier calls that it does not
    name, keep their state (trainable or frozen); a module it names again follows it (one model
    holds one copy, where PEFT keeps one per adapter).

    A model already wrapped in DistributedDataParallel is refused (ValueError): add the adapters
    first, then wrap. Other settings given beside a config raise TypeError, and so does a model
    that is no nn.Module or holds PEFT's modules (a PeftModel: use PEFT's API and
    miss_ext.peft.accelerate there).

    Source: PEFT's get_peft_model / MissConfig (peft/tuners/miss, tuners_utils'
    check_target_module_exists and _maybe_include_all_linear_layers); docs/miss.md.
    """
    check_flag(freeze_others, "freeze_others", "apply_miss")
    # Inside a torch.compile wrapper: the module paths and the recorded settings are the inner
    # model's (save_adapter looks through the wrapper too); the caller gets its own object back.
    # A PeftModel's TypeError first, as apply_bank and load_adapter (a wrapper sweep, 2026-12-06).
    outer, model = model, unwrap_model(model, "apply_miss")
    refuse_peft_model(model, "apply_miss")
    refuse_ddp_wrapped(outer, "apply_miss")
    refuse_lazy_tensors(model, "apply_miss")
    # A forward may have left FSDP2's gathered copies registered, which look like plain weights;
    # resharded (local, invisible to the model's results), a sharded base is seen and refused.
    reshard_fsdp(model)
    inference_mode = False
    # As get_peft_model: modules_to_save by the installed peft's rule, whichever release wrote a
    # config (targets.matches_by_suffix).
    by_suffix = matches_by_suffix(None)
    if _is_config(target_modules):
        given = [k for k, v, default in (("r", r, None), ("mode", mode, "default"), ("mini_r", mini_r, 1),
                                         ("dropout", dropout, 0.0), ("init_weights", init_weights, True),
                                         ("exclude_modules", exclude_modules, None),
                                         ("layers_to_transform", layers_to_transform, None),
                                         ("layers_pattern", layers_pattern, None),
                                         ("modules_to_save", modules_to_save, None), ("bias", bias, "none"))
                 if not (v is default or v == default)]
        if given:
            raise TypeError(f"apply_miss(model, config) takes every setting from the config; also given: "
                            f"{', '.join(given)} (only freeze_others may be given with a config)")
        from .adapter_files import apply_miss_settings

        settings = apply_miss_settings(target_modules)
        (target_modules, r, mode, mini_r, dropout, init_weights, exclude_modules, layers_to_transform,
         layers_pattern, modules_to_save, bias, inference_mode) = (settings[k] for k in (
            "target_modules", "r", "mode", "mini_r", "dropout", "init_weights", "exclude_modules",
            "layers_to_transform", "layers_pattern", "modules_to_save", "bias", "inference_mode"))
        modules_to_save = _with_task_heads(model, modules_to_save, settings["task_type"], by_suffix)
    elif r is None:
        raise TypeError("apply_miss() needs r (or a PEFT MissConfig / adapter_config.json dict instead of "
                        "target_modules)")
    if target_modules is None:
        target_modules = default_targets(model)  # what get_peft_model does
    bias = check_bias(bias)
    target_modules = canonical_targets(target_modules)
    check_selection_fields(target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save)
    found = find_targets(model, target_modules, skip_inside=(MissLinear,))
    selection = {"exclude_modules": (sorted(exclude_modules) if isinstance(exclude_modules, (set, frozenset))
                                     else exclude_modules),
                 "layers_to_transform": (list(layers_to_transform) if isinstance(layers_to_transform, tuple)
                                         else layers_to_transform),
                 "layers_pattern": layers_pattern, "modules_to_save": list(modules_to_save or [])}
    filtered = any(v not in (None, []) for v in selection.values())
    # Parameters the rule names outside any layer it names (fused MoE experts): before "matches no
    # module", which would be the less helpful error when only they match. Those the other fields
    # leave out (exclude_modules, layers_to_transform, ...) are no error: not asked for.
    rule_fields = dict(selection, target_modules=check_target_modules(target_modules))
    refuse_bare_parameters(model, target_modules,
                           keep=(lambda path: peft_selects(rule_fields, path)) if filtered else None)
    if filtered and found:
        # PEFT's matching (check_target_module_exists) for the other fields; "all-linear" is
        # expanded to the linear layers' full paths first, as PEFT does.
        rule = sorted(n for n, _ in found) if target_modules == ALL_LINEAR else target_modules
        rule = sorted(rule) if isinstance(rule, (set, frozenset)) else rule
        kept = [(n, m) for n, m in found if peft_selects(dict(selection, target_modules=rule), n)]
        if not kept:
            raise ValueError(f"target_modules={target_modules!r} matches {describe(n for n, _ in found)}, but "
                             f"exclude_modules / layers_to_transform / layers_pattern / modules_to_save "
                             f"({', '.join(f'{k}={v!r}' for k, v in selection.items() if v not in (None, []))}) "
                             "leave no module to adapt")
        found = kept

    def excluded(path: str) -> bool:  # PEFT's exclude_modules rule: a whole-path regex or names/suffixes
        return bool(exclude_modules) and bool(re.fullmatch(exclude_modules, path) if isinstance(exclude_modules, str)
                                              else matches(list(exclude_modules), path))

    if exclude_modules:
        # Excluding the bare parameters the targets name (fused MoE experts) is what keeps them
        # from the error above: that is a match too.
        named = [n for n, _ in model.named_modules(remove_duplicate=False)]
        named += [p for params in bare_parameters_named(model, target_modules).values() for p in params]
        if not any(n and excluded(n) for n in named):
            warnings.warn(f"exclude_modules={exclude_modules!r} matches no module of the model", stacklevel=2)
    if target_modules == ALL_LINEAR:
        found = drop_weight_read_linears(model, found, "", stacklevel=3)  # as the shared ones below
        found, skipped = _drop_shared_linears(model, found)
        if skipped:
            where = "; ".join(f"{name} (shared with {describe(h)})" for name, h in skipped.items())
            if not found:
                raise ValueError(f"target_modules='all-linear': every nn.Linear of the model shares its parameters "
                                 f"with other modules ({where}); name them explicitly to adapt them anyway")
            warnings.warn(f"target_modules='all-linear' skips layers whose parameters are shared with other modules, "
                          f"as their adapters could never be merged: {where}. Name them explicitly to adapt them "
                          "anyway", stacklevel=2)
    seconds = second_paths(model, target_modules)
    _check_targets(found, target_modules, seconds)
    for name, linear in found:
        # The module's own sizes: a quantized or sharded weight's shape may be packed or local.
        try:
            block_shape(mode, r, mini_r, *linear_sizes(linear))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        why = base_refusal(linear, mode, parent_module(model, name))
        if why is not None:
            raise TypeError(f"{name}: {why}")
    refuse_offloaded(model, found, "apply_miss")
    check_dropout(dropout)
    _check_init_weights(init_weights)
    save_paths = _plan_modules_to_save(model, modules_to_save, found, by_suffix)
    recorded = trainable_extras(model)
    problem = saved_whole_problem([name for name, _ in found], recorded["modules_to_save"])
    if problem is not None:
        raise ValueError(problem)
    if bias != "none" and recorded["bias"] not in ("none", bias):
        raise ValueError(f"bias={bias!r}, but an earlier call on this model set bias={recorded['bias']!r}; one PEFT "
                         "adapter config has one bias value")

    # The warnings come before anything changes: turned into errors, they leave the model as it was.
    dead = [name for name, linear in found if r > linear_sizes(linear)[0]]
    if dead:
        warnings.warn(f"MiSS r={r} exceeds in_features of {describe(dead)}: block rows beyond in_features never "
                      f"receive a gradient and are dead weight. {PEFT_REFUSES_R_ABOVE_IN}", stacklevel=2)
    if mode == "bat" and dropout > 0.0:
        warnings.warn(f"MiSS dropout={dropout} is ignored in bat mode (as in PEFT)", stacklevel=2)
    warn_second_paths(model, target_modules, seconds, {name for name, _ in found}, excluded)
    if not is_default(target_modules):  # PEFT's own default lists name modules of several variants
        warn_unmatched(model, target_modules)
    warn_shared(shared_before_wrapping(model, found))
    # All or nothing: each MissLinear freezes its base, and should a later one fail (its block
    # cannot be allocated) or the call be interrupted while it swaps the layers in, every change
    # is undone (settings_undos; each undo listed before its write: a fault-injection sweep,
    # 2026-12-06, left half the layers swapped and other bases frozen after a Ctrl-C).
    undos = settings_undos(model)
    try:
        with warnings.catch_warnings():
            # One warning per model (above) rather than one per layer for the r > in case.
            warnings.simplefilter("ignore")
            layers = [(name, MissLinear(linear, r, mode, mini_r, dropout, init_weights).train(linear.training))
                      for name, linear in found]  # an eval model stays in eval mode (no adapter dropout)
        for (name, layer), (_, linear) in zip(layers, found):
            undos.append((name, functools.partial(set_module, model, name, linear)))
            set_module(model, name, layer)
        record_shared_weights(model)
        record_extras(model, recorded, save_paths, bias)
        # An earlier call's modules_to_save that this call does not name keep a frozen state (one
        # frozen by an earlier inference_mode call stays frozen); those it names follow this call.
        earlier_paths = [p for p in recorded["modules_to_save"] if p not in save_paths]
        earlier = extras_requires_grad(model, earlier_paths)
        if freeze_others:
            freeze_all_but_blocks(model)
        mark_extras_trainable(model)
        keep_earlier_frozen(model, earlier_paths, earlier, bias)
        if inference_mode:
            # PEFT's get_peft_model freezes the parameters named after the adapter: the new
            # blocks and the modules_to_save copies (`...modules_to_save.default...`), not the
            # biases that bias="all" / "MiSS_only" trains. Only what this call names:
            # modules_to_save of earlier calls that it does not name keep their state (PEFT's
            # add_adapter with inference_mode freezes only the new adapter's parameters).
            saved = extra_parameters(model, {"modules_to_save": save_paths, "bias": "none"})
            for p in [layer.miss_block for _, layer in layers] + list(saved.values()):
                p.requires_grad_(False)
            # PEFT 0.22 also puts them in eval mode (set_training: no adapter dropout, no dropout in
            # a saved head), whatever the model's mode, until the next model.train(); 0.21 left
            # them in the model's mode. 0.22's for every release: a frozen adapter is for inference.
            for path, module in layers + [(p, model.get_submodule(p)) for p in save_paths]:
                undos.append((path, functools.partial(module.train, module.training)))
                module.train(False)
    except BaseException:
        undo_each(list(reversed(undos)), "apply_miss")
        raise
    return outer


# The heads PEFT's task-specific PeftModel classes add to modules_to_save (peft_model.py:
# PeftModelForSequenceClassification / ForTokenClassification / ForQuestionAnswering). PEFT 0.22
# added "pre_classifier" (DistilBERT's randomly initialised head layer), which 0.21's suffix rule
# already picked through "classifier": listed for both, as it changes nothing under the old rule.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score", "pre_classifier"),
               "TOKEN_CLS": ("classifier", "score", "pre_classifier"), "QUESTION_ANS": ("qa_outputs",)}


def _with_task_heads(model: nn.Module, modules_to_save: Optional[Sequence[str]], task_type: object,
                     by_suffix: bool) -> Optional[list]:
    """modules_to_save plus the task's heads that the model has: get_peft_model with a
    SEQ_CLS / TOKEN_CLS / QUESTION_ANS config trains (and saves) its randomly initialised
    classifier head, so apply_miss(model, config) must too. PEFT adds the names blindly and says
    nothing when one matches no module ("classifier" on a Llama), so unmatched ones are dropped
    here rather than warned about, also where a config PEFT saved lists them."""
    heads = _TASK_HEADS.get(task_type, ())
    if not heads:
        return modules_to_save
    _, absent = modules_to_save_paths(model, list(heads), skip_inside=(MissLinear,), by_suffix=by_suffix)
    # PEFT writes the names it added into a saved config's modules_to_save: dropped there too.
    given = [e for e in modules_to_save or [] if e not in absent]
    return given + [h for h in heads if h not in given and h not in absent]


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merges every `MissLinear` into its base weight and puts the plain `nn.Linear` back, in
    place; returns the model. With safe_merge, every merged weight is computed and checked first:
    a non-finite value raises ValueError naming the layer, and nothing is changed.

    A layer whose base weight or bias is shared with another module (tied embeddings, ...) is
    refused with ValueError before anything changes: writing the merged weight would change
    the other module too. The message shows how to untie it first.

    Every layer is merged before any is unloaded; an error inside a merge after those checks (out
    of memory, say) unmerges the layers merged so far and is raised as is, the model still
    holding its MissLinear layers (weights equal to the originals up to the unmerge's rounding:
    one rounding for default/mini, more for bat, growing with the condition number of I + B_i;
    a layer that cannot be unmerged is named in a warning and stays merged).

    Also ValueError, before anything changes, for a layer whose base cannot take a merge
    (base_layers.merge_refusal: hooks, subclass forwards, parametrized, sharded or quantized weights,
    FSDP2) or whose block the merge cannot use (modules.block_merge_problem: not floating, on the
    meta device or another device than the weight). TypeError for a model that is no nn.Module.
    A model without MissLinear layers: UserWarning, returned unchanged; a model that is
    itself a MissLinear: its base layer is returned. The adapter's modules_to_save / bias record
    goes with its last layer (trainable_extras: a later apply_miss starts from PEFT's defaults);
    requires_grad flags stay as they are. Source: PEFT's merge_and_unload; docs/miss.md, "Merging"."""
    check_flag(safe_merge, "safe_merge", "merge_and_unload")
    check_module(model, "merge_and_unload")
    layers = miss_layers(model)
    if not layers:
        warnings.warn(f"merge_and_unload: the model has no miss_ext.MissLinear layer; nothing to do{peft_hint(model)}",
                      stacklevel=2)
        return model
    refuse_fsdp1(model, "merge_and_unload")
    # FSDP2 may hold a layer unsharded (its weight then FSDP's gathered copy, which a merge would
    # write into and FSDP drop): resharded, its weight is the DTensor that merge_refusal refuses.
    reshard_fsdp(model)
    # Re-checked here rather than trusted from setup: the user may have tied or untied since.
    shared = record_shared_weights(model)
    blocked = [name for name, layer in layers if name in shared and not layer.merged]
    if blocked:
        raise ValueError("\n".join(shared_weight_message(name, shared[name]) for name in blocked))
    # Bases a merge cannot go into (hooks, subclass forwards, parametrized, sharded or quantized
    # weights: base_layers.merge_refusal), all checked before any layer changes.
    refused = [f"{name or 'the model'}: {why}" for name, layer in layers
               if not layer.merged and (why := merge_refusal(layer.base_layer) or block_merge_problem(
                   layer.miss_block, layer.base_layer.weight) or layer.shape_problem()) is not None]
    if refused:
        raise ValueError("merge_and_unload: nothing was merged; these layers cannot be merged:\n" + "\n".join(refused))
    if ddp_needs_every_gradient(model):
        # DDP registered the miss_blocks when it was built: unloaded, they never get a gradient, and
        # the next training step through the wrapper fails with a reducer error naming none of this
        # (a wrapper sweep, 2026-12-06). Inference through it, and model.module, are unaffected.
        warnings.warn("merge_and_unload: the model is wrapped in DistributedDataParallel, which registered the "
                      "miss_block parameters this removes: a training step through this wrapper will fail in DDP's "
                      "reducer (it was built with find_unused_parameters=False or static_graph=True). Use it for inference, or wrap model.module in a new DistributedDataParallel to "
                      "train on", stacklevel=2)
    if safe_merge:
        # All or nothing: check every layer's merged weight before writing any. Keeping them all
        # for the write would hold a second copy of every adapted weight; recomputing costs one
        # elementwise pass per layer instead.
        with torch.no_grad():
            for name, layer in layers:
                if layer.merged:
                    continue
                merged = torch.ops.miss.merge(weight_out_in(layer.base_layer), layer.miss_block, False)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights of {name} ({non_finite_summary(merged)}); "
                                     "nothing was merged")
                del merged  # one layer's merged copy alive at a time
    # Every layer is merged before any is unloaded. Should a merge still fail (out of memory, a bad
    # MISS_EXT_* value read only by the kernel), the layers merged so far are unmerged again, so
    # the model keeps its structure and its outputs (weights up to one rounding).
    # Which layers to unmerge is read from their flags, not from the calls that returned: a merge
    # interrupted after its write keeps its layer merged (MissLinear._flag_follows_weight). An
    # interrupt while the layers are unloaded puts them back too (each listed before its write),
    # not half plain layers (a fault-injection sweep, 2026-12-06).
    merged_before = {id(layer) for _, layer in layers if layer.merged}
    put_back = []
    try:
        for name, layer in layers:
            if not layer.merged:
                layer.merge()
        paths = module_paths(model)
        for name, layer in layers:
            if not name:  # the model is the MissLinear itself
                return layer.base_layer
            # Every path the layer is held under: one assigned to a second attribute after
            # apply_miss (model.l2 = model.l1) stayed a merged MissLinear there (miss_layers lists
            # it once).
            for path in paths[id(layer)]:
                put_back.append((path, functools.partial(set_module, model, path, layer)))
                set_module(model, path, layer.base_layer)
    except BaseException:
        undo_each(list(reversed(put_back)) + [(name, layer.unmerge) for name, layer in reversed(layers)
                                              if layer.merged and id(layer) not in merged_before],
                  "merge_and_unload")
        raise
    return model
