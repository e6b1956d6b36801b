"""A bank of MiSS adapters on a whole model: every targeted linear becomes a `MissBankLinear`, and
one forward (or `generate()`) runs a batch whose sequences each name their own adapter (issue 14).

    model = miss_ext.load_bank(model, {"sql": "adapters/sql", "chat": "adapters/chat"})
    with miss_ext.mixed_batch(model, ["sql", "chat", None]):      # None / "__base__": base model
        out = model.generate(input_ids, max_new_tokens=20)

Slot ids are model-wide: an adapter has the same slot in every bank layer, and a layer its
config does not target holds it as absent (`MissBankLinear.add_absent`, base output there), so
one per-sequence index serves every layer. The names follow PEFT's `adapter_names=` convention
(one entry per sequence, "__base__" for the base model). Adapters come from PEFT adapter
folders, `miss_ext.save_adapter` folders and old Bone folders (`load_bank_adapter`), or are
created fresh and trained (`add_bank_adapter`; a mixed batch trains several at once, each block
getting the gradient of its own rows only) and written back in PEFT's format
(`save_bank_adapter`). The whole bank of a layer is one parameter: an optimizer with momentum or
Adam moments keeps moving the slots a batch does not use, and a slot freed by
remove_bank_adapter keeps its optimizer state for the next adapter there, so train with batches
that hold every trained adapter, and make a fresh optimizer after changing the bank (weight
decay would shrink unused slots too: use none).

What a bank cannot hold: bat adapters (they change the base weight, so rows of different bat
adapters cannot share one base GEMM: TypeError naming them), and files that train something
beside the blocks (modules_to_save, biases): those would have to differ per row (ValueError).
"""
import contextlib
import functools
import sys
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._checkpointing import whole_stack_entry
from .adapter_files import (_check_config_fields, _config_settings, _find_parameter, _selection_problems,
                            adapter_config, base_model_name, check_save_arguments, check_task_type, meta_problem,
                            one_config_settings, read_adapter, warn_non_finite, with_default_targets, write_adapter,
                            KEY_PREFIX)
from .bank import (BASE, MissBankLinear, RowLayout, check_bank_size, check_new_adapter, host_to_device,
                   sequence_first_error)
from .model import (check_module, drop_weight_read_linears, is_ddp, parent_module, peft_hint, refuse_aliased_layers,
                    refuse_ddp_wrapped, refuse_lazy_tensors, refuse_offloaded, refuse_peft_model, second_paths_hint,
                    requires_grad_restorer, undo_each, under_offload_hook, unwrap_model, warn_second_paths, wrapped_model,
                    writes_here)
from ._distributed import is_dtensor, reshard_fsdp
from .base_layers import base_refusal, type_name
from .modules import (MissLinear, check_dropout, check_flag, layers_to_check, load_refusals, refuse_meta,
                      rewrites_load_keys)
from .targets import (ALL_LINEAR, TargetModules, canonical_targets, describe, exact_paths_regex, find_targets,
                      get_module, refuse_bare_parameters, second_paths, set_module, warn_unmatched)

__all__ = ["apply_bank", "bank_layers", "bank_adapter_names", "add_bank_adapter", "load_bank_adapter",
           "load_bank", "save_bank_adapter", "remove_bank_adapter", "mixed_batch"]


# Slot changes (add, load, remove) and mixed_batch's row ids: one at a time, across threads. A
# mixed_batch resolves its names to slot ids and sets them on the layers under it, and a slot
# change checks that no layer holds row ids and changes every layer under it, so neither sees the
# other half done (a row routed to the adapter that took a removed one's slot, or layers left
# disagreeing on their slots). Reentrant: load_bank adds through load_bank_adapter's code.
_BANK_LOCK = threading.RLock()


def _holding_bank_lock(function):
    """Runs a slot change under _BANK_LOCK, its checks included (they read the slots it changes)."""
    @functools.wraps(function)
    def locked(*args, **kwargs):
        with _BANK_LOCK:
            return function(*args, **kwargs)
    return locked


def bank_layers(model: nn.Module) -> List[Tuple[str, MissBankLinear]]:
    """(path, layer) of every MissBankLinear of the model (an nn.Module), in named_modules()
    order; [] when it has none (the model-level helpers raise ValueError there instead)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MissBankLinear)]


def _layers(model: nn.Module, where: str) -> List[Tuple[str, MissBankLinear]]:
    check_module(model, where)
    layers = bank_layers(model)
    if not layers:
        raise ValueError(f"{where}: the model has no MissBankLinear layer (miss_ext.apply_bank or load_bank first)"
                         f"{peft_hint(model)}")
    names = layers[0][1].adapter_names
    for path, layer in layers[1:]:
        if layer.adapter_names != names:
            raise ValueError(f"{where}: the bank layers disagree on their slots ({layers[0][0]}: {names}, {path}: "
                             f"{layer.adapter_names}); change a model's adapters through the miss_ext.bank_model "
                             "functions, not layer by layer")
    return layers


def _model_to_change(model: nn.Module, where: str) -> nn.Module:
    """The model whose bank a function changes: inside a DistributedDataParallel / DataParallel
    wrapper (file paths are the inner model's), with FSDP2 modules resharded first (a forward
    may have left FSDP's gathered copies registered, and a write into them would be lost; a
    sharded bank then refuses slot changes)."""
    model = unwrap_model(model, where)
    reshard_fsdp(model)
    return model


def bank_adapter_names(model: nn.Module) -> List[str]:
    """The adapters in the model's bank (list of str), in slot order. ValueError for a model
    without MissBankLinear layers or whose bank layers disagree on their slots."""
    with _BANK_LOCK:  # not half way through another thread's slot change
        return [n for n in _layers(model, "bank_adapter_names")[0][1].adapter_names if n is not None]


def apply_bank(model: nn.Module, target_modules: TargetModules, capacity: int, max_r: int,
               freeze_others: bool = True) -> nn.Module:
    """Replaces every linear layer `target_modules` selects (PEFT's rule: a list of names, each
    matching a path exactly or as its last dotted components; a string is a regex matched against
    the whole path, so a bare "q_proj" matches only a top-level module of that name; or
    "all-linear") by a MissBankLinear with `capacity` slots of rank up to `max_r` (positive ints:
    TypeError for another type, ValueError for a value < 1), in place; returns the model. The bank
    starts empty. With freeze_others (as PEFT), every other parameter stops requiring grad.
    TypeError when a selected module is not an nn.Linear (as apply_miss), or for a model that is
    no nn.Module or holds PEFT's modules (a PeftModel mixes adapters with adapter_names=). ValueError when nothing
    is selected, a selected module is a bank layer already or is sharded over several ranks (tensor parallelism, FSDP2:
    add the bank first, then shard), or the model is wrapped in DistributedDataParallel (which would
    not reduce the new bank's gradients: apply the bank, then wrap). Also ValueError when a target
    matches the path of a parameter lying in no layer it selects (transformers 5's fused MoE expert
    weights, e.g. `experts.down_proj`: name the layers more precisely, e.g.
    "shared_expert.down_proj"), or a selected layer is offloaded by accelerate (weight on the meta
    device under an `_hf_hook`: its bank would hold no values; load the model without offload). A
    list entry that matches no module while others do gives one UserWarning, and so does a name of
    a module's second path (one module registered twice, `self.b = self.a`: only the path torch
    lists, a, gets the bank layer, b keeps calling the plain layer; as apply_miss)."""
    check_flag(freeze_others, "freeze_others", "apply_bank")
    refuse_peft_model(unwrap_model(model, "apply_bank"), "apply_bank")  # (load_bank checks its own model)
    return _apply_bank(model, target_modules, capacity, max_r, freeze_others, named_by_user=True)


def _apply_bank(model: nn.Module, target_modules: TargetModules, capacity: int, max_r: int,
                freeze_others: bool, named_by_user: bool) -> nn.Module:
    """apply_bank. `named_by_user` False: load_bank's exact paths of the files' blocks (the files'
    keys decide there, as in load_adapter), so no checks of how the names were chosen."""
    refuse_ddp_wrapped(model, "apply_bank")
    # Inside a torch.compile wrapper: the module paths and the recorded settings are the inner
    # model's (save_adapter looks through the wrapper too); the caller gets its own object back.
    outer, model = model, unwrap_model(model, "apply_bank")
    refuse_lazy_tensors(model, "apply_bank")
    # A forward may have left FSDP2's gathered copies registered, which look like plain weights;
    # resharded (local, invisible to the model's results), a sharded base is seen and refused.
    reshard_fsdp(model)
    target_modules = canonical_targets(target_modules)
    if named_by_user:
        refuse_bare_parameters(model, target_modules, "apply_bank: ")
    found = find_targets(model, target_modules, skip_inside=(MissBankLinear, MissLinear))
    seconds = second_paths(model, target_modules) if named_by_user else []
    if not found:
        raise ValueError(f"apply_bank: target_modules={target_modules!r} selects no module of the model"
                         + second_paths_hint(seconds))
    # As apply_miss: a module of another type is a TypeError, one that already has adapters a
    # ValueError.
    banks = [name for name, m in found if isinstance(m, MissBankLinear)]
    if banks:
        raise ValueError(f"apply_bank: these selected modules are bank layers already: {', '.join(banks)}")
    wrong = [f"{name} ({type_name(m)})" for name, m in found if not isinstance(m, nn.Linear)]
    if wrong:
        raise TypeError(f"apply_bank: these selected modules are not nn.Linear layers: {', '.join(wrong)}")
    if target_modules == ALL_LINEAR:
        found = drop_weight_read_linears(model, found, "apply_bank: ", stacklevel=4)
        if not found:
            raise ValueError("apply_bank: target_modules='all-linear' selects only linears whose parent reads the "
                             "weight directly (nn.MultiheadAttention)")
    refused = [f"{name}: {why}" for name, m in found
               if (why := base_refusal(m, "default", parent_module(model, name))) is not None]
    if refused:  # (a base sharded over several ranks; the nn.Linear check above is its first)
        raise ValueError("apply_bank: " + "\n".join(refused))
    refuse_offloaded(model, found, "apply_bank")
    present = bank_layers(model)
    existing = bank_adapter_names(model) if present else []
    if existing:
        raise ValueError(f"apply_bank: the model's bank already holds {existing}; new bank layers would not have "
                         "them. Apply every bank layer before adding adapters")
    if present and (present[0][1].capacity, present[0][1].max_r) != (capacity, max_r):
        raise ValueError(f"apply_bank: the model's bank layers have capacity={present[0][1].capacity}, "
                         f"max_r={present[0][1].max_r}; new ones must match (got capacity={capacity}, max_r={max_r})")
    capacity, max_r = check_bank_size(capacity, max_r)  # before the model changes (the freeze below)
    if named_by_user:
        warn_unmatched(model, target_modules, "apply_bank: ", stacklevel=4)
        warn_second_paths(model, target_modules, seconds, {name for name, _ in found}, prefix="apply_bank: ",
                          stacklevel=4)
    # All or nothing: should building a layer fail (out of memory, an interrupt), the layers
    # replaced so far go back and every parameter gets its requires_grad flag back.
    restore_flags = requires_grad_restorer(model)
    try:
        if freeze_others:
            model.requires_grad_(False)
        for name, module in found:
            layer = MissBankLinear(module, capacity, max_r)
            layer.train(module.training)  # an eval model stays in eval mode (no adapter dropout)
            set_module(model, name, layer)
        _register_load_check(model)
    except BaseException:
        for name, module in found:
            set_module(model, name, module)
        restore_flags()
        raise
    return outer


@_holding_bank_lock
def add_bank_adapter(model: nn.Module, name: str, r: int, mode: str = "default", mini_r: int = 1,
                     dropout: float = 0.0, target_modules: Optional[TargetModules] = None) -> int:
    """A fresh adapter (PEFT's zero init) on the bank layers `target_modules` selects (None: all),
    absent in the others; returns its slot id. Every check runs before any layer changes:
    ValueError for a model without bank layers, a name already in the bank, a full bank, r,
    mini_r or dropout the layers cannot take (r above the bank's max_r, mini_r not dividing
    out_features, ...), or target_modules selecting no bank layer (or modules that are not bank
    layers), or a call inside mixed_batch; TypeError for mode="bat" or a non-int r / mini_r.
    target_modules follows apply_bank's rule."""
    model = _model_to_change(model, "add_bank_adapter")
    layers = _layers(model, "add_bank_adapter")
    paths = [p for p, _ in layers]
    if target_modules is not None:
        chosen = {p for p, _ in find_targets(model, target_modules, skip_inside=(MissBankLinear,))}
        outside = sorted(chosen - set(paths))
        if outside:
            raise ValueError(f"add_bank_adapter: target_modules={target_modules!r} selects modules that are not bank "
                             f"layers: {outside} (apply_bank them first)")
        paths = [p for p in paths if p in chosen]
        if not paths:
            raise ValueError(f"add_bank_adapter: target_modules={target_modules!r} selects no bank layer")
    for path in paths:
        _check_new(get_module(model, path), path, name, r, mode, mini_r, dropout)
    return _add(layers, name, {p: None for p in paths}, r, mode, mini_r, dropout)


def _check_new(layer: MissBankLinear, path: str, name: str, r: int, mode: str, mini_r: int,
               dropout: float) -> Tuple[int, int]:
    """layer.adapter_shape, its ValueError naming the layer's path."""
    try:
        return layer.adapter_shape(name, r, mode, mini_r, dropout)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _add(layers, name: str, blocks: Dict[str, Optional[Tensor]], r: int, mode: str, mini_r: int,
         dropout: float) -> int:
    """Adds the adapter to every bank layer (absent where `blocks` has no entry), at one slot.
    Called holding _BANK_LOCK, after every layer's check."""
    check_new_adapter(layers[0][1].adapter_names, name, "the model's bank")
    _check_all_mutable(layers, f"add adapter {name!r}")
    slot = None
    try:
        for path, layer in layers:
            if path in blocks:
                got = layer.add_adapter(name, r, mode, mini_r, dropout, blocks[path])
            else:
                got = layer.add_absent(name)
            assert slot is None or got == slot, "bank layers out of step"  # _layers checked they agree
            slot = got
    except BaseException:  # out of memory, an interrupt: the layers that took it give it back
        # Found by the name (new to every layer, checked above), not by the calls that returned:
        # an interrupt as a layer's add returns left that layer holding it (a fault-injection
        # sweep, 2026-12-06).
        undo_each([(path, functools.partial(layer.remove_adapter, name)) for path, layer in layers
                   if name in layer.adapter_names], f"add adapter {name!r}")
        raise
    return slot


def _check_all_mutable(layers, what: str) -> None:
    """Every layer's refusal (inside a mixed_batch, a sharded bank) before any layer changes."""
    for path, layer in layers:
        try:
            layer._check_mutable(what)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}; no layer was changed") from None


def _file_problems(model: nn.Module, layers, name: str, config: dict, blocks: Dict[str, Tensor],
                   extras: Dict[str, Tensor]) -> List[str]:
    problems = _check_config_fields(config) + _selection_problems(model, config, blocks,
                                                                  (MissBankLinear, MissLinear))
    mode, r, mini_r, dropout = _config_settings(config)
    if mode == "bat":
        raise TypeError(f"adapter {name!r} is a bat adapter (init_weights='bat'): bat changes the base weight "
                        "itself, so rows of different bat adapters cannot share one base GEMM; serve it with its "
                        "own model (miss_ext.load_adapter) or merge it")
    try:
        dropout = check_dropout(dropout)
    except (ValueError, TypeError):  # TypeError: no number at all (a str in a hand-edited config)
        problems.append(f"miss_dropout={dropout!r} in the config: supported values are numbers in [0, 1)")
        dropout = 0.0  # reported; the per-layer checks below go on
    for path, block in blocks.items():
        layer = get_module(model, path)
        if not isinstance(layer, MissBankLinear):
            problems.append(f"{path}: " + ("no such module in the model" if layer is None else
                                           f"is a {type(layer).__name__}, not a bank layer (apply_bank there first)"))
            continue
        problem = meta_problem(path, layer.parameters())
        if problem is not None:
            problems.append(problem)
            continue
        try:
            expected = _check_new(layer, path, name, r, mode, mini_r, dropout)
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
            continue
        if tuple(block.shape) != expected:
            problems.append(f"{path}: block shape {tuple(block.shape)} in the file, the layer needs {expected} "
                            f"(mode={mode!r}, r={r}, out={layer.out_features})")
        elif not block.is_floating_point() or not bool(torch.isfinite(block.to(layer.bank.dtype)).all()):
            # In the bank's dtype: finite float64 values beyond float32's range would load as inf.
            problems.append(f"{path}: the block is not floating point or holds NaN/inf (in the bank's "
                            f"{layer.bank.dtype})")
    # A bank shares everything but the blocks between rows: per-adapter extras cannot differ per row.
    for key, value in extras.items():
        _, param = _find_parameter(model, key)
        problem = None if param is None else meta_problem(key, [param])
        if problem is not None:
            problems.append(problem)
        elif param is None or tuple(param.shape) != tuple(value.shape) or \
                not torch.equal(value.to(param.device, param.dtype), param.detach()):
            problems.append(f"{key}: the file trains this beside the blocks (modules_to_save or bias), which "
                            "every row of a mixed batch shares; load it with miss_ext.load_adapter instead")
    return problems


def load_bank_adapter(model: nn.Module, name: str, path: str) -> int:
    """Loads a PEFT MiSS adapter folder (PEFT's save_pretrained, `miss_ext.save_adapter`, or an old
    Bone folder) into the model's bank under `name`; returns its slot id. Its blocks go into the
    bank layers at the file's module paths (each keeps the file's r, mode, mini_r and dropout);
    the other bank layers hold it as absent. Every check runs first, and a problem raises
    ValueError listing all of them (bat: TypeError) with the model unchanged; also ValueError for
    a model without bank layers, a name that is taken or not a non-empty string, a full bank, a
    file without blocks or a call inside mixed_batch; FileNotFoundError for a folder without
    adapter_config.json or weights."""
    return _load_read(_model_to_change(model, "load_bank_adapter"), name, path, read_adapter(path))


@_holding_bank_lock
def _load_read(model: nn.Module, name: str, path: str, read: Tuple[dict, Dict[str, Tensor], Dict[str, Tensor]]) -> int:
    """load_bank_adapter with the folder already read (read_adapter's result)."""
    layers = _layers(model, "load_bank_adapter")
    config, blocks, extras = read
    if not blocks:
        raise ValueError(f"{path}: the adapter file has no blocks")
    config = with_default_targets(config, model, path)
    problems = _file_problems(model, layers, name, config, blocks, extras)
    if problems:
        raise ValueError(f"adapter {path!r} does not fit the model's bank; nothing was loaded:\n  " +
                         "\n  ".join(problems))
    mode, r, mini_r, dropout = _config_settings(config)
    return _add(layers, name, blocks, r, mode, mini_r if mode == "mini" else 1, float(dropout))


def load_bank(model: nn.Module, adapters: Mapping[str, str], capacity: Optional[int] = None,
              max_r: Optional[int] = None) -> nn.Module:
    """apply_bank on every module any of the adapter folders `{name: path}` adapts (capacity:
    len(adapters) unless given; max_r: their largest r unless given), then load_bank_adapter each.
    Returns the model, changed in place. All or nothing: TypeError for adapters that is not a
    mapping or a capacity / max_r that is not an int, or a model as apply_bank refuses, ValueError
    for none given, a model that already has bank layers, a config with a
    bad r, more adapters than capacity, or any adapter load_bank_adapter refuses (max_r too small, a file that
    does not fit; TypeError for a bat adapter), FileNotFoundError for a folder or file that does
    not exist, and the model is then as it was."""
    # The files name the inner model's paths: load into the model inside a torch.compile wrapper
    # (a review, 2026-12-06: the wrapper's "_orig_mod." paths met the files' and nothing loaded);
    # a DDP wrapper is refused as apply_bank refuses it. The caller gets its own object back.
    outer, model = model, unwrap_model(model, "load_bank")
    refuse_peft_model(model, "load_bank")  # TypeError first, as apply_bank
    refuse_ddp_wrapped(outer, "load_bank")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"load_bank: adapters must be a mapping {{name: adapter folder}}, got {type(adapters).__name__}")
    if not adapters:
        raise ValueError("load_bank: no adapters given")
    if bank_layers(model):
        raise ValueError("load_bank: the model already has bank layers; add adapters with load_bank_adapter")
    if capacity is not None and not isinstance(capacity, bool) and isinstance(capacity, int) and \
            len(adapters) > capacity:
        raise ValueError(f"load_bank: {len(adapters)} adapters ({', '.join(map(repr, adapters))}) do not fit in "
                         f"capacity={capacity}; give capacity >= {len(adapters)} (nothing was loaded)")
    read = {name: read_adapter(path) for name, path in adapters.items()}
    paths = sorted({p for _, blocks, _ in read.values() for p in blocks})
    ranks = [config.get("r") for config, _, _ in read.values()]
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"load_bank: adapter configs with r={bad[0]!r}; r must be a positive int")
    # All or nothing: if any adapter does not fit, the replaced layers go back and every
    # parameter gets its requires_grad flag back.
    restore_flags = requires_grad_restorer(model)
    checked = {id(module) for module in model.modules() if _has_load_check(module)}
    try:
        _apply_bank(model, exact_paths_regex(paths), len(adapters) if capacity is None else capacity,
                    max(ranks) if max_r is None else max_r, freeze_others=True, named_by_user=False)
        for name, path in adapters.items():
            _load_read(model, name, path, read[name])
    except BaseException:
        for path, layer in bank_layers(model):  # all of them are this call's (checked above)
            set_module(model, path, layer.base_layer)
        restore_flags()
        # Its load check too: left there, it counted as another code's hook for the accelerated
        # PEFT tuner's check of a later PEFT model (a review, 2026-12-06).
        _remove_load_checks(model, checked)
        raise
    return outer


def save_bank_adapter(model: nn.Module, name: str, path: str, task_type: Optional[str] = None,
                      base_model_name_or_path: Optional[str] = None, is_main_process: Optional[bool] = None) -> None:
    """Writes one adapter of the bank as a PEFT MiSS adapter folder (loadable by
    `peft.PeftModel.from_pretrained`, `miss_ext.load_adapter` and load_bank_adapter): the blocks
    of the layers that hold it, with its r, mode, mini_r and dropout. task_type and
    base_model_name_or_path go into the config as save_adapter writes them (the latter defaults to
    the model's `config._name_or_path`). ValueError for a model without bank layers, a name not
    in the bank (the message lists the bank's adapters), or an adapter whose r, mode, mini_r or
    dropout differs between layers (added layer by layer: one PEFT config describes them all, as
    for save_adapter), nothing written; TypeError for a name that is no str.

    A sharded bank (FSDP2: the bank parameter is a DTensor) is gathered first, a collective:
    every rank must call this, and by default the first rank that holds the model writes, as
    save_adapter (also for a model in its DDP wrapper); `is_main_process` overrides that choice
    as in save_adapter."""
    outer = model
    ddp, model = is_ddp(model), unwrap_model(model, "save_bank_adapter")
    check_task_type(task_type, "save_bank_adapter")
    check_save_arguments("save_bank_adapter", base_model_name_or_path, is_main_process)
    # A snapshot under the bank lock: another thread's remove/add/load of this adapter half way
    # through would otherwise give a folder of old and new (or zero) blocks, or a config of
    # neither (found by a review, 2026-12-03). Copies, so that the file is written outside the lock.
    with _BANK_LOCK:
        layers = _layers(model, "save_bank_adapter")
        refuse_aliased_layers(model, layers, "save_bank_adapter")
        refuse_meta("save_bank_adapter", [(f"{p}.bank", layer.bank) for p, layer in layers])
        slot = layers[0][1]._slot(name)
        present = [(p, layer) for p, layer in layers if not layer.absent[slot]]
        if not present:  # (MissBankLinear.add_absent on every layer)
            raise ValueError(f"save_bank_adapter: adapter {name!r} adapts no bank layer of the model (absent in every "
                             "one), so there is no block to save; nothing was written")
        # One MissConfig for every layer: a name added layer by layer (MissBankLinear.add_from,
        # add_adapter) may hold another r, mode, mini_r or dropout in each, and a file written with
        # the first layer's cut the others' blocks to its r (a fuzz review, 2026-12-05: reloaded
        # 1.22 off the bank) or recorded its dropout for all. Refused as save_adapter refuses.
        r, mode, q, dropout = one_config_settings(
            [(p, (int(layer.ranks[slot]), layer.modes[slot],
                  int(layer.periods[slot]) if layer.modes[slot] == "mini" else 1, layer.dropouts[slot]))
             for p, layer in present], f"save_bank_adapter: adapter {name!r}: ")
        sharded = bool(reshard_fsdp(model)) or any(is_dtensor(layer.bank) for _, layer in present)
        tensors = {}
        for p, layer in present:  # every rank gathers, in model order
            bank = layer.bank.detach()
            bank = bank.full_tensor() if is_dtensor(bank) else bank
            block = bank[slot, :r, :int(layer.periods[slot])]
            tensors[f"{KEY_PREFIX}{p}.miss_block"] = block.to("cpu", copy=True).contiguous()
    if is_main_process is None:
        is_main_process = writes_here(sharded or ddp, outer)  # the same blocks on every rank
    if not is_main_process:
        return
    config = adapter_config(r, mode, q, dropout, [p for p, _ in present],
                            task_type=task_type,
                            base_model_name_or_path=base_model_name_or_path or base_model_name(model))
    warn_non_finite(tensors, "save_bank_adapter")
    write_adapter(path, tensors, config)


@_holding_bank_lock
def remove_bank_adapter(model: nn.Module, name: str) -> None:
    """Empties the adapter's slot in every bank layer (the slot can take another adapter; under
    torch.compile this does not recompile, see miss_ext/bank.py "Recompilation"). ValueError,
    changing nothing, for a model without bank layers, a name not in the bank, or a bank layer on
    the meta device (its slot tensors cannot be read: materialise the model first); TypeError for
    a name that is no str."""
    model = _model_to_change(model, "remove_bank_adapter")
    layers = _layers(model, "remove_bank_adapter")
    slot = layers[0][1]._slot(name)  # ValueError naming the known adapters
    _check_all_mutable(layers, f"remove adapter {name!r}")
    meta = [path for path, layer in layers if layer.bank.is_meta or layer.ranks.is_meta]
    if meta:
        raise ValueError(f"remove_bank_adapter: the bank layers {describe(meta, limit=3)} are on the meta device "
                         "(not materialised), so their slots cannot be read; materialise the model first (nothing "
                         "was changed)")
    saved = [(layer, layer._slot_state(slot)) for _, layer in layers]
    try:
        for _, layer in layers:
            layer.remove_adapter(name)
    except BaseException:  # an interrupt part way: every layer holds the adapter again
        for layer, state in saved:
            layer._restore_slot(slot, state)
        raise


def _leave_mixed_batch(layer: MissBankLinear) -> None:
    """What mixed_batch sets on a layer for its batch, cleared (its `_mixed_batch` note stays: the
    checkpoint check compares a recompute with it)."""
    layer.rows = None
    layer.__dict__.pop("_stack_entry", None)  # it holds a frame


def _refuse_load_inside_mixed_batch(model: nn.Module, *args, **kwargs) -> None:
    # A deepcopy or pickle of the model taken inside mixed_batch carries this hook but not the
    # rows (MissBankLinear.__getstate__): it must load as a model outside the context, so the hook
    # looks at the rows rather than at its own presence.
    if all(layer.rows is None for _, layer in bank_layers(model)):
        return
    raise RuntimeError("cannot load a state_dict inside miss_ext.mixed_batch (its rows name the bank's slots); "
                       "nothing was loaded")


def _check_bank_loads_first(model: nn.Module, state_dict, prefix: str, local_metadata, *args) -> None:
    """All or nothing: a bank layer refusing its part of a state_dict (a stale snapshot, another
    shape, a slot description that does not fit) was skipped while torch loaded every other
    module, so the model's bank layers then disagreed on their slots and every bank helper refused
    the model (a random-walk fuzz, 2026-12-06). A load_state_dict pre-hook on the model apply_bank
    or load_bank adapted, which torch runs before any module under it loads: every bank layer
    whose keys the dict holds (under each of its paths) is checked first, RuntimeError naming each
    refusal, nothing of the model loaded (modules outside it, loaded through an outer module, keep
    torch's rule: those before it in the load order have loaded). A load_state_dict of a module
    inside the model (one layer, a block of layers) keeps torch's rule too, and so do layers under
    a module whose load hooks may rewrite keys (modules.rewrites_load_keys), or all of them when
    the model has such hooks itself."""
    if rewrites_load_keys(model):
        return
    layers = layers_to_check(model, prefix, lambda module: isinstance(module, MissBankLinear))
    refusals = load_refusals(layers, state_dict, bool(local_metadata.get("assign_to_params_buffers", False)))
    if refusals:
        where = f" at {prefix.rstrip('.')!r}" if prefix else ""
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}{where}, nothing of it loaded:"
                           "\n\t" + "\n\t".join(refusals))


_check_bank_loads_first._miss_ext_load_hook = True
_refuse_load_inside_mixed_batch._miss_ext_load_hook = True


def _is_load_check(hook) -> bool:
    return getattr(hook, "hook", hook) is _check_bank_loads_first  # torch wraps hooks taking the module


def _has_load_check(module: nn.Module) -> bool:
    return any(map(_is_load_check, module._load_state_dict_pre_hooks.values()))


def _register_load_check(model: nn.Module) -> None:
    """_check_bank_loads_first on `model`, once."""
    if not _has_load_check(model):
        model.register_load_state_dict_pre_hook(_check_bank_loads_first)


def _remove_load_checks(model: nn.Module, keep) -> None:
    """Removes the load checks of the modules of `model` other than those in `keep` (ids)."""
    for module in model.modules():
        if id(module) not in keep:
            for key, hook in list(module._load_state_dict_pre_hooks.items()):
                if _is_load_check(hook):
                    del module._load_state_dict_pre_hooks[key]


def _holders_of(model: nn.Module, paths: List[str]) -> List[nn.Module]:
    """The modules at `paths` and every module above them, the model included, once each."""
    wanted = {""} | {".".join(p.split(".")[:depth]) for p in paths for depth in range(1, p.count(".") + 2)}
    return [module for name, module in model.named_modules() if name in wanted]


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[Optional[str]], expand: int = 1) -> Iterator[None]:
    """Inside, every bank layer of the model runs sequence i of its input with adapter
    adapter_names[i] (None or "__base__": the base model), e.g. for `model(...)` or
    `model.generate(...)`. `expand` repeats each name for generate's num_beams or
    num_return_sequences (which repeat each input sequence that many times; an encoder-decoder's
    encoder keeps the unrepeated names). Run backward inside too when training with gradient
    checkpointing (its recomputation calls the layers again), each batch's backward inside its
    own context (a batch recomputed inside another batch's context would use that context's
    names). Adding, removing or loading adapters (or a state_dict) inside raises ValueError (a
    RuntimeError from load_state_dict) and changes nothing.

    One mixed batch at a time per model: the ids live on the layers (as PEFT's LoRA hooks do), so
    a second mixed_batch on the same layers while one is active (another thread, another
    coroutine of an async server, or nested) would give the first call's running forward the
    second call's rows. It raises RuntimeError instead, changing nothing; serialise the calls (a
    lock) or give each thread its own copy of the model. A plain forward of the model in another
    thread while a mixed batch is active would also see its rows: that cannot be detected.

    Rows are matched by the input's first dimension: a layer sees sequence i as x[i] (PEFT's rule
    too); a model that feeds its linears another layout (sequence-first, tokens regrouped or
    routed to MoE experts) cannot mix adapters: ValueError, when the names differ, for the layouts
    bank.RowLayout recognises; one name for every row runs there whatever each layer sees (each
    layer gets one id for all its rows, so a list of the wrong length is not caught there).

    ValueError names an adapter not in the bank, or a model without bank layers; elsewhere, a
    layer whose input has another number of sequences raises ValueError when called. TypeError for
    adapter_names that is not a list or tuple of str / None (a bare string included);
    ValueError for an expand that is not a positive int. Source: PEFT's adapter_names=
    convention (LoRA's mixed-batch inference)."""
    check_module(model, "mixed_batch")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or \
            not all(n is None or isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str or None), one per sequence, got "
                        f"{adapter_names!r}")
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise ValueError(f"expand must be a positive int, got {expand!r}")
    # An encoder runs once on the unrepeated sequences (generate repeats them for the decoder).
    # Asked of the model inside DDP / DataParallel wrappers, which do not forward attribute reads
    # (torch.compile's does): a wrapped encoder-decoder got the repeated ids (a review, 2026-12-06).
    inner = wrapped_model(model)
    get_encoder = getattr(inner, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) and expand > 1 else None
    in_encoder = set() if encoder is None or encoder is inner else {id(m) for m in encoder.modules()}
    # Layers that see rows other than the sequences in order (RowLayout) cannot route names that
    # differ; one name for every row routes right in any layout, given to each layer as one id for
    # all its rows (their count there is not the batch's).
    layout = RowLayout(model)
    for path, module in model.named_modules():
        layout.see(path, module, isinstance(module, MissBankLinear))
    regrouped = layout.reason
    if regrouped is not None and len({BASE if n is None else n for n in adapter_names}) > 1:
        raise sequence_first_error(regrouped, "mixed_batch")
    # Where the `with` statement runs, for the layers' checkpoint check in training forwards
    # (MissBankLinear._check_recompute): the frames from it up are walked once here, so each layer
    # call walks only its own (bench/bench_checkpoint_check.py, 40 frames above the step: 10.5 us
    # per layer call before, 5.5 after; 4.8-5.0% of a tiny Llama's training step before, 2.4%
    # after). Only from a plain `with` (the caller of contextlib's __enter__); entered otherwise
    # (an ExitStack), the layers walk every frame. Before the ids are set: nothing to undo.
    caller = sys._getframe(1)
    plain_with = caller.f_code is contextlib._GeneratorContextManager.__enter__.__code__ and caller.f_back is not None
    stack_entry = whole_stack_entry(caller.f_back) if plain_with else None
    # Everything this call sets is undone by the `finally` below, which covers it from the first
    # change on: an interrupt (Ctrl-C) part way left some layers with ids, and one between the
    # ids and the hooks left every layer so, the model then in a mixed batch for good (reviews,
    # 2026-12-05 and a fault-injection sweep, 2026-12-06). Only the layers this call gave ids
    # (`ours`): a refusal because another mixed batch is running leaves that one's alone.
    ours, handles = [], []
    try:
        # The names are resolved to slots and the ids set under the lock that slot changes take, so
        # no slot changes in between (a removed adapter's slot taken by another would get its rows).
        with _BANK_LOCK:
            layers = _layers(model, "mixed_batch")
            busy = [path for path, layer in layers if layer.rows is not None]
            if busy:
                raise RuntimeError(f"mixed_batch: the model's bank layers ({describe(busy, limit=2)}) are already "
                                   "in a mixed batch (another thread or coroutine on this model, or an enclosing "
                                   "mixed_batch), whose running forward would get these rows. Run one mixed batch at "
                                   "a time per model (a lock), or give each thread its own copy; nothing was changed")
            # Offloaded after the bank was loaded (apply_bank and load_bank refuse an offloaded model):
            # the ids would go to the meta device the bank sits on between forwards (a crash in the
            # forward, "Tensor on device cpu is not on the expected device meta": a new-user pass,
            # 2026-12-04), and the slot tables the forward reads are the hook's copy, which later
            # adapter changes would not reach.
            offloaded = [path for path, layer in layers if layer.bank.is_meta and under_offload_hook(model, path)]
            if offloaded:
                raise ValueError(f"mixed_batch: the bank layers {describe(offloaded, limit=4)} are offloaded by "
                                 "accelerate (cpu_offload, disk_offload, or a device_map with \"cpu\" or \"disk\" "
                                 "offload): their bank is on the meta device, put in only for each forward by the "
                                 "hook (`_hf_hook`), so the row ids would hold no values and adapter changes would "
                                 "not reach the hook's copy. Serve the bank from a model loaded without offload (a "
                                 "device_map to real devices only), or remove the hooks first (accelerate.hooks."
                                 "remove_hook_from_module(model, recurse=True)); nothing was changed")
            first = layers[0][1]
            unknown = sorted({n for n in adapter_names if n is not None and n != BASE and n not in first.adapter_names},
                             key=str)
            if unknown:
                raise ValueError(f"adapter_names names adapters not in the model's bank: {unknown} (it has "
                                 f"{[n for n in first.adapter_names if n is not None]})")
            unrepeated = first.index_of(adapter_names, device="cpu")  # moved once per device below
            ids = unrepeated.repeat_interleave(expand) if expand > 1 else unrepeated
            slots = unrepeated.tolist()
            if regrouped is not None and len(adapter_names):
                unrepeated = ids = unrepeated[0]  # one id (0-D) for every row of every layer
            per_device: Dict[Tuple[torch.device, bool], Tensor] = {}
            for _, layer in layers:
                where = (layer.bank.device, id(layer) in in_encoder)
                if where not in per_device:
                    per_device[where] = host_to_device(unrepeated if where[1] else ids, where[0])
            # While the ids are set, the layers refuse to change their slots (MissBankLinear.add_adapter...).
            # What the batch routes (its slot ids and expand), so that a layer recomputed by activation
            # checkpointing can tell whether its forward ran in a batch of other rows
            # (MissBankLinear._check_recompute); the same names entered again are the same batch.
            # A slot's generation tells a re-used slot (an adapter removed, another added under any
            # name) from the adapter the forward ran with.
            for _, layer in layers:
                ours.append(layer)  # before its ids: an interrupt between the two is undone too
                layer.rows = per_device[(layer.bank.device, id(layer) in in_encoder)]
                layer.__dict__["_mixed_batch"] = (tuple(slots), tuple(layer.slot_generation(s) for s in slots), expand)
                if stack_entry is not None:
                    layer.__dict__["_stack_entry"] = stack_entry
        # A state_dict load is refused before any module loads, whichever module it is called on: the
        # model, any module holding a bank layer, or a bank layer (a bank layer alone could only refuse
        # its own part, after torch loaded the modules before it).
        for module in _holders_of(model, [path for path, _ in layers]):
            handles.append(module.register_load_state_dict_pre_hook(_refuse_load_inside_mixed_batch))
        yield
    finally:
        # The ids first (a hook left behind is harmless: it looks at the ids), each layer's even
        # through an interrupt (undo_each goes on, then raises it): an interrupt during the exit
        # left the model in a mixed batch for good (a review, 2026-12-06).
        undo_each([("", functools.partial(_leave_mixed_batch, layer)) for layer in ours]
                  + [("", handle.remove) for handle in handles], "mixed_batch")
