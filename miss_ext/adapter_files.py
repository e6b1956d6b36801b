"""PEFT's MiSS adapter files, read and written without PEFT.

A PEFT adapter directory holds `adapter_config.json` (`"peft_type": "MISS"`, r, mini_r,
init_weights, miss_dropout, target_modules, ...) and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.miss_block` (adapter name stripped). Old Bone checkpoints say
`"peft_type": "BONE"` and `.bone_block`; the math is the same. (Older PEFT releases wrote
`adapter_model.bin` instead of safetensors; it is read too, with `torch.load(weights_only=True)`.)
"""
import functools
import json
import os
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .bank import MissBankLinear
from .model import (check_bias, container_problems, ddp_needs_every_gradient, extra_buffers, extra_parameters,
                    extras_requires_grad, freeze_all_but_blocks, is_ddp, keep_earlier_frozen, mark_extras_trainable,
                    miss_layers, parent_module, peft_hint, persistent_buffers, record_extras, record_shared_weights,
                    refuse_ddp_wrapped, refuse_aliased_layers, refuse_lazy_tensors, refuse_peft_model,
                    saved_whole_problem, settings_undos, shared_before_wrapping, trainable_extras, undo_each,
                    unwrap_model, warn_shared, writes_here)
from ._distributed import is_dtensor, reshard_fsdp
from .base_layers import base_refusal, is_conv1d, linear_sizes, read_to_describe, type_name
from .modules import (PEFT_REFUSES_R_ABOVE_IN, MissLinear, adapter_dtype, block_shape, check_dropout, check_flag,
                      refuse_meta)
from .targets import (ALL_LINEAR, check_selection_fields, default_targets, describe, exact_paths_regex, find_targets, get_module,
                      matches_by_suffix, matches_entry, memory_range, modules_to_save_paths, other_holders,
                      parameter_paths, peft_selects, set_module, without_wrapper_names)

# The public names (README); the other functions here are the package's internals, used across its modules.
__all__ = ["load_adapter", "save_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# peft_type -> the parameter name in its keys.
BLOCK_NAMES = {"MISS": "miss_block", "BONE": "bone_block"}
# PEFT's init_weights value <-> our mode.
_INIT_OF_MODE = {"default": True, "mini": "mini", "bat": "bat"}
# Every adapter_config.json field of PEFT 0.21's MissConfig (and BoneConfig). Each is either
# acted on here as PEFT acts on it, or cannot change what is loaded (task_type picks a PeftModel
# subclass, inference_mode freezes for training, the rest are provenance). A field outside this
# list (rank_pattern, alpha_pattern, a newer PEFT's option, ...) with a non-empty value is refused
# rather than ignored, as PEFT might load something else because of it.
_CONFIG_FIELDS = {
    "peft_type", "r", "mini_r", "init_weights", "miss_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "bias", "modules_to_save", "task_type", "base_model_name_or_path",
    "revision", "inference_mode", "auto_mapping", "peft_version",
}
_INIT_WEIGHTS = {"MISS": (True, False, "bat", "mini"), "BONE": (True, False, "bat")}
# The fields that decide which modules PEFT gives an adapter when it loads the file.
_SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


# PEFT's TaskType values (0.21), for a PEFT without them importable; PEFT's own list is used when
# it is installed.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def check_task_type(task_type: object, where: str) -> None:
    """ValueError unless task_type is None or one of PEFT's TaskType values: PEFT's loader refuses
    any other ("Invalid task type"), so a file written with it would fail there, later."""
    if task_type is None:
        return
    try:
        from peft import TaskType

        known = tuple(t.value for t in TaskType)
    except ImportError:
        known = _TASK_TYPES
    if not isinstance(task_type, str) or task_type not in known:
        raise ValueError(f"{where}: task_type must be None or one of PEFT's task types {list(known)}, got "
                         f"{task_type!r}")


def mode_of_init_weights(init_weights: object) -> str:
    """PEFT's init_weights ("bat", "mini", True, False) -> "bat", "mini" or "default"."""
    return init_weights if init_weights in ("bat", "mini") else "default"


def _config_settings(config: dict) -> Tuple[str, object, object, object]:
    """(mode, r, mini_r, dropout) as the config states them (Bone configs have no mini_r or
    dropout); checked against the model by _plan."""
    mode = mode_of_init_weights(config.get("init_weights", True))
    return mode, config.get("r"), config.get("mini_r", 1), config.get("miss_dropout", 0.0) or 0.0


def config_dict(config: object) -> dict:
    """A PEFT config object (MissConfig, BoneConfig: `to_dict()`) or an adapter_config.json dict as
    a plain dict: peft_type as its string ("MISS"), sets as sorted lists."""
    if isinstance(config, Mapping):
        out = dict(config)
    else:
        out = dict(config.to_dict())
    out.setdefault("peft_type", "MISS")
    peft_type = out["peft_type"]
    out["peft_type"] = str(getattr(peft_type, "value", peft_type))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(out.get(key), (set, frozenset)):
            out[key] = sorted(out[key])
    return out


def apply_miss_settings(config: object) -> dict:
    """apply_miss's keyword arguments for a PEFT MissConfig / BoneConfig or adapter_config.json
    dict (PEFT's defaults for missing fields), plus its inference_mode and task_type. A field
    PEFT 0.21's config does not have, or an unknown init_weights or bias value, raises ValueError
    naming it. target_modules None stays None (apply_miss then takes PEFT's default for the model)."""
    config = config_dict(config)
    if config["peft_type"] not in BLOCK_NAMES:
        raise ValueError(f"peft_type={config['peft_type']!r} is not a MiSS config (expected 'MISS' or 'BONE')")
    problems = _check_config_fields(config)
    if problems:
        raise ValueError("this config cannot be applied as PEFT would apply it:\n  " + "\n  ".join(problems))
    init_weights = config.get("init_weights", True)
    mode = mode_of_init_weights(init_weights)
    return {
        "target_modules": config["target_modules"], "r": config.get("r", 64), "mode": mode,
        "mini_r": config.get("mini_r", 1) if mode == "mini" else 1,
        "dropout": config.get("miss_dropout", 0.0) or 0.0,
        "init_weights": init_weights if isinstance(init_weights, bool) else True,
        "exclude_modules": config.get("exclude_modules"), "layers_to_transform": config.get("layers_to_transform"),
        "layers_pattern": config.get("layers_pattern"), "modules_to_save": config.get("modules_to_save"),
        "bias": config.get("bias", "none"),
        "inference_mode": bool(config.get("inference_mode", False)),
        "task_type": config.get("task_type"),
    }


def _layer_settings(layer: MissLinear) -> Tuple[int, str, int, float]:
    return layer.r, layer.mode, (layer.mini_r if layer.mode == "mini" else 1), layer.dropout


def _refuse_blocks_unlike_their_settings(layers) -> None:
    """ValueError naming the layers whose miss_block has another shape than their r, mode and
    mini_r give: a block assigned after construction (layer.miss_block = nn.Parameter(...)). The
    layer computes with the block's own r (the ops read it from the shape), the file would record
    the settings', and load_adapter and PEFT refuse it (a review, 2026-12-07)."""
    bad = []
    for name, layer in layers:
        r, mode, mini_r, _ = _layer_settings(layer)
        expected = block_shape(mode, r, mini_r, layer.in_features, layer.out_features)
        if tuple(layer.miss_block.shape) != tuple(expected):
            bad.append(f"{name or 'the model'} (miss_block {tuple(layer.miss_block.shape)}, its r={layer.r}, "
                       f"mode={layer.mode!r}" + (f", mini_r={layer.mini_r}" if layer.mode == "mini" else "")
                       + f" give {tuple(expected)})")
    if bad:
        raise ValueError(f"save_adapter: nothing was written: {describe(bad)} hold a miss_block of another shape than "
                         "their settings and sizes give (a block assigned after the layer was made, or in_features / "
                         "out_features changed since?), which a file could not describe; build the layer with the "
                         "block's r, mode and mini_r (MissLinear(base, r=...)) and copy the block in")


def _uniform_settings(layers) -> Tuple[int, str, int, float]:
    """One MissConfig describes every layer of a PEFT adapter, so the layers must agree."""
    return one_config_settings([(name, _layer_settings(layer)) for name, layer in layers])


def one_config_settings(named_settings, where: str = "") -> Tuple[int, str, int, float]:
    """The (r, mode, mini_r, dropout) that every (path, settings) pair (at least one: the callers
    refuse an adapter without layers first) shares, for the one MissConfig of a saved adapter;
    ValueError listing each group of paths when they differ
    (save_adapter's MissLinear layers, save_bank_adapter's slots: a file written with the first
    layer's settings would cut the other layers' blocks to its r, or record its dropout for all).
    `where` begins the message."""
    groups: Dict[Tuple, List[str]] = {}
    for name, settings in named_settings:
        groups.setdefault(tuple(settings), []).append(name)
    if len(groups) > 1:
        text = "; ".join(f"r={s[0]}, mode={s[1]!r}, mini_r={s[2]}, dropout={s[3]}: {', '.join(n)}"
                         for s, n in groups.items())
        raise ValueError(f"{where}a PEFT MiSS adapter has one r, mode, mini_r and dropout for all layers; this model "
                         f"mixes {text}")
    return next(iter(groups))


def check_save_arguments(where: str, base_model_name_or_path: object, is_main_process: object) -> None:
    """save_adapter's and save_bank_adapter's options (a review, 2026-12-05): is_main_process None
    or a bool (0 or "" silently wrote nothing, "no" wrote), base_model_name_or_path None, a str or
    an os.PathLike (an int or NaN went into the config, NaN as JSON that strict parsers refuse)."""
    if is_main_process is not None:
        check_flag(is_main_process, "is_main_process", where)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, (str, os.PathLike)):
        raise TypeError(f"{where}: base_model_name_or_path must be None, a str or an os.PathLike, got "
                        f"{type(base_model_name_or_path).__name__} {base_model_name_or_path!r}")


def base_model_name(model: nn.Module) -> Optional[str]:
    """The base model's name or path that an adapter config records (PEFT's
    base_model_name_or_path): a transformers model's `config._name_or_path`, or None."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def folder_path(path: object) -> str:
    """`path` as a str, for a str or os.PathLike of one; TypeError naming it otherwise (bytes made
    the save create the folder and only then fail joining it with str names; None failed inside
    os with a message naming no argument: a review, 2026-12-05)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"path must be a folder path (str or os.PathLike of str), got {type(path).__name__} {path!r}")
    return text


def write_adapter(path: str, tensors: Dict[str, Tensor], config: dict) -> None:
    """Writes a PEFT adapter directory (adapter_model.safetensors and adapter_config.json) so that
    no failure or interruption leaves a folder whose config and weights come from different saves.

    The config is serialised first (TypeError naming the fields JSON cannot hold, writing
    nothing). Both files are then written under temporary names in the folder, so a full disk or
    an error fails before anything old is touched: the earlier adapter stays whole and the
    temporaries are removed. Only then is the old adapter_config.json removed, the weights
    renamed into place (a stale adapter_model.bin of an earlier save removed) and the config
    renamed into place last. An interruption within those renames leaves a folder without a
    config, which every loader (load_adapter, PEFT's from_pretrained) refuses, rather than new
    weights beside an old config or old weights beside a new one. A file (not a folder) at
    `path` raises FileExistsError, a folder at one of the file names IsADirectoryError (nothing
    written); links at the file names are replaced, not written through."""
    from safetensors.torch import save_file

    path = folder_path(path)
    try:
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        bad = sorted(key for key, value in config.items() if not _json_serialisable(value))
        raise TypeError(f"adapter config fields {bad} cannot be written to {CONFIG_NAME} ({exc}); nothing was "
                        "written") from None
    if os.path.exists(path) and not os.path.isdir(path):
        # makedirs' bare "[Errno 17] File exists" did not say that a folder was wanted (a new-user pass, 2026-12-05).
        raise FileExistsError(f"cannot write the adapter to {path!r}: that is a file, and an adapter is a folder "
                              f"({CONFIG_NAME} and {WEIGHTS_NAME}); name a folder. Nothing was written")
    os.makedirs(path, exist_ok=True)
    # A folder (not a link) under a name the save replaces or removes would fail the save halfway,
    # after the old config was removed: refused before anything is written.
    in_the_way = [name for name in (WEIGHTS_NAME, CONFIG_NAME, LEGACY_WEIGHTS_NAME)
                  if os.path.isdir(os.path.join(path, name)) and not os.path.islink(os.path.join(path, name))]
    if in_the_way:
        raise IsADirectoryError(f"cannot write the adapter to {path!r}: {in_the_way} there "
                                f"{'is a folder' if len(in_the_way) == 1 else 'are folders'}, where the save puts or "
                                "removes a file; remove or rename it. Nothing was written")

    def write_config(target: str) -> None:
        with open(target, "w") as f:
            f.write(text)

    # A name of its own per call (two threads saving into one folder must not share it), created by
    # the writer itself so that the file gets the usual permissions (mkstemp's are 0600).
    token = uuid.uuid4().hex
    temporaries = {name: os.path.join(path, f".{name}.{token}.tmp") for name in (WEIGHTS_NAME, CONFIG_NAME)}
    try:
        save_file(tensors, temporaries[WEIGHTS_NAME], metadata={"format": "pt"})
        write_config(temporaries[CONFIG_NAME])
        # Nothing old has changed so far. From here on the folder has no config until the last
        # rename: an interruption leaves it refused by every loader, never a mixed pair.
        Path(path, CONFIG_NAME).unlink(missing_ok=True)  # another save of the folder may have removed it
        os.replace(temporaries[WEIGHTS_NAME], os.path.join(path, WEIGHTS_NAME))
        # An earlier save's other-format weights (older PEFT wrote adapter_model.bin) belong to
        # the adapter being replaced; a loader that prefers them must not find them beside this config.
        Path(path, LEGACY_WEIGHTS_NAME).unlink(missing_ok=True)
        os.replace(temporaries[CONFIG_NAME], os.path.join(path, CONFIG_NAME))
    finally:
        for temporary in temporaries.values():
            Path(temporary).unlink(missing_ok=True)


def _json_serialisable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _copy_whole(param: Tensor, value: Tensor) -> None:
    """param <- value, the whole tensor from a file. A DTensor parameter (FSDP2, tensor parallel)
    keeps this rank's shard of it: every rank holds the whole file, so distribute_tensor with
    src_data_rank=None takes the shard locally, with no communication."""
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(value)


def full_block(block: Tensor) -> Tensor:
    """The whole block as a plain contiguous CPU tensor. A DTensor (FSDP2 `fully_shard`, tensor
    parallel) holds only this rank's shard: it is gathered with `full_tensor()`, a collective over
    its device mesh that every rank of the mesh must join."""
    block = block.detach()
    if is_dtensor(block):
        block = block.full_tensor()
    return block.cpu().contiguous()


def adapter_config(r: int, mode: str, mini_r: int, dropout: float, paths: List[str], bias: str = "none",
                   modules_to_save: Optional[List[str]] = None, task_type: Optional[str] = None,
                   base_model_name_or_path: Optional[str] = None, random_init: bool = False) -> dict:
    """PEFT's adapter_config.json for a MiSS adapter on exactly the modules at `paths`.
    `random_init`: the default-mode adapter was made with init_weights=False, which the config
    then says (PEFT writes it; a config reused with get_peft_model or apply_miss makes a random
    adapter again; a spec audit, 2026-12-05: True was written)."""
    return {
        "peft_type": "MISS",
        "r": r,
        "mini_r": mini_r,
        "init_weights": False if random_init and mode == "default" else _INIT_OF_MODE[mode],
        "miss_dropout": dropout,
        "target_modules": exact_paths_regex(paths),
        "exclude_modules": None,
        # target_modules already states exactly the adapted paths (what target_modules,
        # exclude_modules and layers_to_transform selected), and PEFT refuses layers_* beside a
        # regex, so those stay None.
        "bias": bias,
        "modules_to_save": modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "task_type": task_type,
        # A pathlib.Path is as good a name as a str (PEFT reads the folder either way).
        "base_model_name_or_path": (os.fspath(base_model_name_or_path)
                                    if isinstance(base_model_name_or_path, os.PathLike) else base_model_name_or_path),
        "inference_mode": True,
        "revision": None,
    }


def save_adapter(model: nn.Module, path: str, task_type: Optional[str] = None,
                 base_model_name_or_path: Optional[str] = None, is_main_process: Optional[bool] = None) -> None:
    """Writes the model's MissLinear adapters in PEFT's format into the directory `path`, so
    `peft.PeftModel.from_pretrained(base_model, path)` loads them. task_type (e.g. "CAUSAL_LM";
    ValueError for a value that is not one of PEFT's TaskType names, which PEFT refuses at load)
    is written into the config; PEFT then builds the matching PeftModel subclass.
    base_model_name_or_path is written into the config for PEFT (which loads that base when asked
    to); default: the model's `config._name_or_path` (transformers models), else none.

    Sharded models (FSDP2 `fully_shard`: each miss_block is a DTensor holding one shard): every
    rank must call save_adapter, as the whole blocks are gathered collectively
    (`DTensor.full_tensor()` over the blocks' device mesh); the file then holds the whole adapter,
    the same as one process writes for the unsharded model. FSDP2 modules are resharded first
    (`reshard()`, local), so a model left unsharded by a forward without backward also saves
    its float32 master blocks, not the bf16 copies of a mixed-precision policy. By default only
    the first rank that holds the model writes (the ranks would otherwise write the same files
    at once): rank 0 of its DDP process group, at coordinate 0 of each device mesh of its
    parameters (miss_ext.model.writes_here), rank 0 of the default group when neither applies;
    `is_main_process=True` on every rank makes each write, e.g. to its own path, False skips
    writing. The other ranks return when their part of the gather is done: synchronise
    (`dist.barrier()`) before another rank reads the files. A model without DTensor blocks or
    FSDP2 modules is saved as before, nothing collective, by every caller unless
    `is_main_process=False` (a model passed in its DDP wrapper: rank 0 of its group only, see
    below; the unwrapped model under DDP: call it on one rank).

    ValueError, writing nothing, for a model without MissLinear layers or with layers of
    different r, mode, mini_r or dropout (one PEFT config holds one of each). UserWarning for
    layers on transformers' Conv1D (PEFT's MiSS refuses them, so only load_adapter reads such a
    folder). UserWarning naming
    the parameters that require grad but are not saved (anything beyond the blocks,
    modules_to_save and the trained biases: PEFT's format has no place for them). A model in a
    DistributedDataParallel / DataParallel / torch.compile wrapper is saved as the model inside it
    (paths without the wrapper's "module." / "_orig_mod."); under DistributedDataParallel only
    rank 0 of its process group writes by default, as for a sharded model (every rank holds the
    same blocks)."""
    outer = model
    ddp, model = is_ddp(model), unwrap_model(model, "save_adapter")
    check_task_type(task_type, "save_adapter")
    check_save_arguments("save_adapter", base_model_name_or_path, is_main_process)
    layers = miss_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: the model has no miss_ext.MissLinear layer{peft_hint(model, saving=True)}"
                         + (" (it has MissBankLinear layers: save_bank_adapter saves one of their adapters)"
                            if any(isinstance(m, MissBankLinear) for m in model.modules()) else ""))
    # What PEFT trains and saves beside the blocks (apply_miss / load_adapter recorded it):
    # modules_to_save under their own parameter names, with their persistent buffers (a
    # BatchNorm's statistics, extra_buffers), and the biases of bias="all"/"MiSS_only".
    extras = trainable_extras(model)
    saved_extras, saved_buffers = extra_parameters(model, extras), extra_buffers(model, extras)
    refuse_aliased_layers(model, layers, "save_adapter")
    refuse_meta("save_adapter", [(f"{name}.miss_block", layer.miss_block) for name, layer in layers]
                + list(saved_extras.items()) + list(saved_buffers.items()))
    _refuse_blocks_unlike_their_settings(layers)
    r, mode, mini_r, dropout = _uniform_settings(layers)
    # The float32 master blocks, not the gathered bf16 copies a forward may have left (reshard_fsdp).
    fsdp = reshard_fsdp(model)
    # Every rank gathers, in model order (the same collectives in the same order on each rank).
    sharded = bool(fsdp) or any(is_dtensor(layer.miss_block) for _, layer in layers)
    # torch's activation-checkpointing wrapper (checkpoint_wrapper, apply_activation_checkpointing)
    # puts "_checkpoint_wrapped_module" into the paths of the modules inside it, not into their
    # state_dict keys, and PEFT 0.22's files leave it out (remove_torch_wrapper_names). Written with
    # it, the file named paths the unwrapped model lacks, and PEFT's from_pretrained there skipped
    # those layers without an error (outputs 0.67 off: a PEFT 0.22 review, 2026-12-07).
    written = without_wrapper_names
    if len({written(name) for name, _ in layers}) != len(layers):
        raise ValueError(f"save_adapter: {describe([name for name, _ in layers])} name the same paths without torch's "
                         "wrapper names; nothing was written")
    tensors = {f"{KEY_PREFIX}{written(name)}.miss_block": full_block(layer.miss_block) for name, layer in layers}
    save_paths = extras["modules_to_save"]
    written_paths = [written(p) for p in save_paths]
    if save_paths:
        # PEFT finds them again on the base model (unwrapped), by its rule (targets.matches_by_suffix:
        # the file names no PEFT release, so any may read it); under both rules it must find exactly these.
        for by_suffix in (False, True):
            again, _ = modules_to_save_paths(model, written_paths, skip_inside=(MissLinear,), by_suffix=by_suffix,
                                             unwrapped=True)
            if sorted(again) != sorted(written_paths):
                raise ValueError(f"save_adapter: modules_to_save={written_paths!r} would make PEFT also save "
                                 f"{describe(sorted(set(again) - set(written_paths)))} (it matches "
                                 f"{'by plain suffix before 0.22' if by_suffix else 'trailing path components'})")
        containers = container_problems(model, save_paths)
        if containers:
            raise ValueError("save_adapter: PEFT could not load this adapter, nothing was written: "
                             + "; ".join(containers))
    tensors.update({f"{KEY_PREFIX}{written(key)}": full_block(t)
                    for key, t in {**saved_extras, **saved_buffers}.items()})
    tensors = _unaliased(tensors)
    if is_main_process is None:
        is_main_process = writes_here(sharded or ddp, outer)
    if not is_main_process:
        return
    warn_unsaved_trainables(model, [p for _, layer in layers for p in block_sources(layer)]
                             + list(saved_extras.values()))
    warn_non_finite(tensors, "save_adapter")
    moved = [name for name, layer in layers if layer.block_changed_since_merge()]
    if moved:
        # A warning, not a refusal: the current blocks may be what the user means to keep; there
        # is no copy of the blocks the merged weights hold (README, "unmerge()").
        warnings.warn(f"save_adapter: the miss_blocks of {describe(moved)} changed after their merge "
                      "(MissLinear.block_changed_since_merge): the file holds the blocks as they are now, while those "
                      "layers' weights hold the dW of the blocks at merge time, so the saved adapter is not the one "
                      "the model computes with", stacklevel=2)
    conv1d = [name for name, layer in layers if is_conv1d(layer.base_layer)]
    if conv1d:
        warnings.warn(f"save_adapter: {describe(conv1d)} adapt transformers' Conv1D layers, which PEFT's MiSS refuses "
                      "(TypeError), so PeftModel.from_pretrained cannot load this adapter; miss_ext.load_adapter "
                      "can", stacklevel=2)
    config = adapter_config(r, mode, mini_r, dropout, [written(name) for name, _ in layers], bias=extras["bias"],
                            modules_to_save=written_paths or None, task_type=task_type,
                            base_model_name_or_path=base_model_name_or_path or base_model_name(model),
                            random_init=all(layer.__dict__.get("init_weights") is False for _, layer in layers))
    write_adapter(path, tensors, config)


def _unaliased(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """`tensors` with a copy of each one whose memory an earlier one already holds: safetensors
    refuses tensors that share memory, and a modules_to_save module may hold one buffer under two
    names (both are saved, as PEFT's save_pretrained does; a review, 2026-12-04)."""
    seen, out = set(), {}
    for key, t in tensors.items():
        where = memory_range(t)
        if where is not None and where[0] in seen:
            t = t.clone()
        elif where is not None:
            seen.add(where[0])
        out[key] = t
    return out


def warn_non_finite(tensors: Dict[str, Tensor], who: str) -> None:
    """A file's tensors with NaN or inf are written anyway (a diverged run may be worth keeping to
    look at), but said, naming them: load_adapter refuses such a file, and every output of such a
    layer is non-finite."""
    broken = [key[len(KEY_PREFIX):] for key, t in tensors.items()
              if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        verb = "holds" if len(broken) == 1 else "hold"
        warnings.warn(f"{who}: {describe(broken)} {verb} non-finite values (NaN or inf): training diverged? "
                      "(load_adapter refuses non-finite blocks)", stacklevel=3)


def block_sources(layer: MissLinear) -> List[Tensor]:
    """The parameters a layer's saved block is made of: miss_block itself, or, where a
    parametrization computes it (weight_norm, register_parametrization), the parametrization's
    originals and its own parameters, which the saved (computed) block holds."""
    if parametrize.is_parametrized(layer, "miss_block"):
        return list(layer.parametrizations["miss_block"].parameters())
    return [layer.miss_block]


def warn_unsaved_trainables(model: nn.Module, saved: List[Tensor], who: str = "save_adapter") -> None:
    """Warns naming the parameters that require grad but are not in the file: PEFT's format holds
    the blocks, modules_to_save and the trained biases only (export_lora's LoRA file the blocks
    only), so anything else a user trains (apply_miss(freeze_others=False), a requires_grad_ set by
    hand) would be lost without a word, and the reloaded model would differ from the trained one.
    A warning rather than an error: such parameters may be trainable without having been trained
    (a freshly built model under freeze_others=False)."""
    saved_ids = {id(p) for p in saved}
    unsaved = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in saved_ids]
    if not unsaved:
        return
    if who == "export_lora":
        holds = "a LoRA file exported from MiSS holds the blocks (as lora_A / lora_B) only. Save them yourself"
    else:
        holds = ("a MiSS adapter file holds the miss_blocks, the modules_to_save and the trained biases only. Name "
                 "their modules in apply_miss(modules_to_save=...) to save them with the adapter, save them yourself")
    warnings.warn(f"{who}: {describe(unsaved)} require grad but are not saved: {holds} (model.state_dict()), or "
                  "freeze them (requires_grad_(False)) if they are not trained", stacklevel=3)


def read_adapter(path: str,
                 model: Optional[nn.Module] = None) -> Tuple[dict, Dict[str, Tensor], Dict[str, Tensor]]:
    """(config, {module path: block}, {parameter path: tensor}) of a PEFT MiSS or Bone adapter
    directory. The last holds what PEFT saves beside the blocks: `modules_to_save` copies (e.g. a
    classifier head, `<path>.weight`) and trained biases (`bias="all"`/`"MiSS_only"`,
    `<layer>.base_layer.bias`).

    Other adapters' blocks, which PEFT 0.14-0.19 wrote into each adapter's file of a model holding
    several (`<module path>.miss_block.<adapter name>`, `.bone_block.<name>` in a Bone file), are
    left out with a UserWarning counting them, as PEFT's from_pretrained ignores them: no parameter
    of its model has such a name (PEFT 0.21 loads one named after the adapter it loads into,
    e.g. "default", over the file's own block; the warning says so). Only keys of exactly that
    form are left out: with `model` given, one that names a parameter of the model is kept (PEFT
    would load it into that parameter); without it, one that the config's modules_to_save or bias
    could have saved is kept.

    FileNotFoundError for a folder without the config or the weights; ValueError naming the file
    for a config that is not a JSON object or weights that are not a dict of tensors (truncated,
    corrupted, empty), the reader's exception chained; TypeError for a path that is no str or
    os.PathLike."""
    path = folder_path(path)
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        weights = [name for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if os.path.isfile(os.path.join(path, name))]
        hint = (f" ({weights[0]} is there: a save into this folder that did not complete removes the config "
                "until the new weights are in place; save again)") if weights else ""
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}{hint}")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a truncated or binary file
        raise ValueError(f"{config_file}: not a JSON adapter config (truncated or corrupted?): {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: holds a JSON {type(config).__name__}, not an object of config fields")
    peft_type = config.get("peft_type")
    if peft_type not in BLOCK_NAMES:
        raise ValueError(f"{config_file}: peft_type={peft_type!r} is not a MiSS adapter (expected 'MISS' or 'BONE')")
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file) and os.path.isfile(os.path.join(path, LEGACY_WEIGHTS_NAME)):
        weights_file = os.path.join(path, LEGACY_WEIGHTS_NAME)
    elif not os.path.isfile(weights_file):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path!r}")
    raw = _read_weights(weights_file)
    suffix = "." + BLOCK_NAMES[peft_type]
    blocks, extras, unexpected, others = {}, {}, [], []
    for key, value in raw.items():
        if not key.startswith(KEY_PREFIX):
            unexpected.append(key)
        elif key.endswith(suffix):
            blocks[key[len(KEY_PREFIX):-len(suffix)]] = value
        elif _other_adapters_block(key[len(KEY_PREFIX):], suffix, config, model):
            others.append(key[len(KEY_PREFIX):])
        else:
            extras[key[len(KEY_PREFIX):]] = value
    if unexpected:
        raise ValueError(f"{path}: keys outside the base model ({KEY_PREFIX}...): " + ", ".join(unexpected))
    # The other type's blocks: a config whose peft_type was edited by hand without renaming the
    # keys (PEFT 0.21 has no BONE type). PEFT itself then loads no block at all, with a
    # missing-keys warning only; here they would read as "no blocks" or as unknown parameters.
    for other_type, other_name in BLOCK_NAMES.items():
        mismatched = [key for key in extras if key.endswith("." + other_name)]
        if other_type != peft_type and mismatched:
            raise ValueError(f"{path}: its config says peft_type={peft_type!r}, whose blocks are named '{suffix[1:]}', "
                             f"but the file holds {len(mismatched)} '{other_name}' block(s) ({describe(mismatched)}), "
                             f"as a {other_type} adapter does: a config edited by hand? PEFT's "
                             "scripts/convert-bone-to-miss.py converts a Bone adapter's config and keys together")
    if others:
        names = sorted({key.rpartition(".")[2] for key in others})
        # PEFT 0.21 maps a key ending in the name it loads under onto that adapter's parameter, so
        # there a stale ".default" block replaces the file's own one (or fails on its shape).
        peft_021 = (" (PEFT 0.21's from_pretrained loads a block named 'default' over the file's own one unless "
                    "given another adapter_name; save the adapter again to drop them)") if "default" in names else ""
        warnings.warn(f"{path}: ignored {len(others)} block(s) of other adapters ({', '.join(map(repr, names))}: "
                      f"{describe(others)}): PEFT before 0.20 saved the blocks of every adapter of a model holding "
                      "several into each adapter's file, under keys with the adapter's name left in; PEFT ignores "
                      f"them when loading{peft_021}", stacklevel=3)
    return config, blocks, extras


def _read_weights(weights_file: str) -> Dict[str, Tensor]:
    """{key: tensor} of adapter_model.safetensors, or of adapter_model.bin (torch.load with
    weights_only=True). ValueError naming the file for one that cannot be read as such (truncated,
    corrupted, empty, or not a dict of tensors), the reader's exception chained; OSError (a file
    that cannot be read at all) as it comes."""
    try:
        if weights_file.endswith(".safetensors"):
            from safetensors.torch import load_file
            raw = load_file(weights_file)
        else:
            raw = torch.load(weights_file, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 -- SafetensorError, UnpicklingError, RuntimeError, EOFError, ...
        guess = " (truncated or corrupted?)" if weights_file.endswith(".safetensors") else ""
        raise ValueError(f"{weights_file}: cannot be read as adapter weights{guess}: {type(exc).__name__}: "
                         f"{exc}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError(f"{weights_file}: holds a {type(raw).__name__}, not a dict of tensors by key")
    bad = [repr(key) for key, value in raw.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise ValueError(f"{weights_file}: not a dict of tensors by key: {describe(bad)} hold something else")
    return dict(raw)


def _other_adapters_block(key: str, suffix: str, config: dict, model: Optional[nn.Module]) -> bool:
    """Whether `key` (without KEY_PREFIX) is another adapter's block as PEFT 0.14-0.19 saved it,
    `<module path><suffix>.<adapter name>`, and no real part of this adapter (see read_adapter)."""
    head, _, name = key.rpartition(".")
    if not name or not head.endswith(suffix) or len(head) == len(suffix):
        return False
    if model is not None:
        return _find_parameter(model, key)[1] is None
    if config.get("bias", "none") != "none" and "bias" in name:
        return False  # PEFT's bias="all" saves every key holding "bias"
    parts = head.split(".")
    modules = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    entries = [e for e in config.get("modules_to_save") or [] if isinstance(e, str)]
    by_suffix = matches_by_suffix(config.get("peft_version"))
    return not any(matches_entry(m, e, by_suffix) for e in entries for m in modules)


def meta_problem(path: str, tensors) -> Optional[str]:
    """A problem when any of `tensors` is on the meta device (a model built under
    torch.device("meta"), init_empty_weights, low_cpu_mem_usage) or None. A file's values copied
    into a meta tensor are kept nowhere (copy_ into meta does nothing), and a later to_empty()
    would leave uninitialised memory where the adapter was expected: refused, not ignored."""
    if any(t.is_meta for t in tensors):
        return (f"{path}: the model's parameters here are on the meta device (not materialised), so the file's "
                "values would be kept nowhere; materialise the model first (to_empty() and load its weights, or "
                "from_pretrained), then load the adapter")
    return None


def inference_problem(path: str, tensors) -> Optional[str]:
    """A problem when any of `tensors`, which a load would write, is an inference tensor (the model
    was built or loaded under torch.inference_mode()) and inference mode is off: torch refuses
    that write only after making it, which would leave a half-loaded model."""
    if torch.is_inference_mode_enabled() or not any(t.is_inference() for t in tensors):
        return None
    return (f"{path}: an inference tensor (made under torch.inference_mode()), which cannot be written outside "
            "inference mode; load under torch.inference_mode(), or build the model outside it")


def _find_parameter(model: nn.Module, path: str) -> Tuple[Optional[str], Optional[Tensor]]:
    """(its path in the model, the parameter or persistent buffer) a saved `<path>` names, or
    (None, None); `<layer>.base_layer.<name>` also resolves to `<layer>.<name>` of a plain layer
    about to be wrapped (it becomes the wrapper's base_layer). Buffers: PEFT saves those of a
    modules_to_save module (model.extra_buffers) and loads every key the model's state_dict has;
    a non-persistent buffer is in no state_dict, so a file cannot name it."""
    for candidate in (path, path.replace(".base_layer.", ".")):
        try:
            return candidate, model.get_parameter(candidate)
        except AttributeError:
            pass
        owner_path, _, name = candidate.rpartition(".")
        owner = get_module(model, owner_path) if owner_path else model
        buffer = persistent_buffers(owner).get(name) if owner is not None else None
        if buffer is not None:
            return candidate, buffer
    return None, None


def _peft_wrapper_copies(extras: Dict[str, Tensor], save_paths: List[str]) -> Tuple[Dict[str, Tensor], List[str]]:
    """(extras without them, problems): PEFT's own copies of a modules_to_save module's tensors
    under its wrapper's names. With bias="all" (every key holding "bias") or save_embedding_layers
    (every key of an embedding-named module) PEFT also saves `<module>.modules_to_save.[<adapter>.]
    <name>` (the trained copy, again) and `<module>.original_module.<name>` (the untouched
    original) beside `<module>.<name>`, and loads that file itself. The trained copy must equal
    `<module>.<name>` (else the file is ambiguous: a problem); the original is not kept, as this
    loader trains the module in place (there is no separate original to restore)."""
    kept, problems = dict(extras), []
    for key, value in extras.items():
        found = [(module, kind, key[len(module) + len(kind) + 2:]) for module in save_paths
                 for kind in ("modules_to_save", "original_module") if key.startswith(f"{module}.{kind}.")]
        if not found:
            continue
        module, kind, rest = max(found, key=lambda f: len(f[0]))  # the innermost module
        del kept[key]
        if kind == "original_module":
            continue
        plain = f"{module}.{rest}"
        if plain not in extras and "." in rest and f"{module}.{rest.split('.', 1)[1]}" in extras:
            plain = f"{module}.{rest.split('.', 1)[1]}"  # the key held the adapter name
        if plain not in extras:
            kept[plain] = value
        elif not torch.equal(extras[plain], value):
            problems.append(f"{key}: PEFT's copy of {plain} differs from {plain} in the same file")
    return kept, problems


def _plan_extras(model: nn.Module, extras: Dict[str, Tensor]) -> Tuple[List[str], list]:
    """Checks the non-block tensors against the model; returns (problems, [(param, value)]).
    Which of them then train is PEFT's rule, applied by load_adapter through the recorded
    modules_to_save and bias (model.mark_extras_trainable): PEFT's save_embedding_layers copies
    (`embed_tokens.weight`, `lm_head.weight`, after a resize_token_embeddings) and a target's
    `<layer>.base_layer.weight` are loaded but stay frozen, as PEFT does not train them."""
    problems, plan = [], []
    params = parameter_paths(model, with_buffers=True) if extras else {}
    for path, value in extras.items():
        resolved, param = _find_parameter(model, path)
        if param is None:
            problems.append(f"{path}: no such parameter (or persistent buffer) in the model")
            continue
        what = "parameter" if isinstance(param, nn.Parameter) else "buffer"
        problem = meta_problem(path, [param]) or inference_problem(path, [param])
        if problem is not None:
            problems.append(problem)
            continue
        if tuple(param.shape) != tuple(value.shape):
            problems.append(f"{path}: shape {tuple(value.shape)} in the file, the model's is {tuple(param.shape)}")
            continue
        # As the blocks: a value copy_ would cast silently (complex to real drops the imaginary
        # part, integers into a float parameter are no trained values) or that is not finite in
        # the parameter's dtype (an atomicity review, 2026-12-03: NaN loaded silently).
        if (param.is_floating_point() and not value.is_floating_point()) or (
                not param.is_floating_point() and value.dtype != param.dtype):
            # (an integer or bool buffer, a BatchNorm's num_batches_tracked: only its own dtype
            # copies without a cast that truncates or wraps)
            problems.append(f"{path}: dtype {value.dtype} in the file, the model's {what} is {param.dtype}")
            continue
        if param.is_floating_point() and not bool(torch.isfinite(value.to(param.dtype)).all()):
            problems.append(f"{path}: the file's value holds non-finite values (NaN or inf) in {param.dtype}")
            continue
        # Writing a tied parameter (e.g. a modules_to_save lm_head tied to the input embeddings)
        # or a shared buffer would silently change its other holders; PEFT trains (and loads
        # into) a separate copy of such a module.
        # The same values (PEFT saves a tied lm_head's unchanged base weight) change nothing.
        shared = other_holders(params, [param], [resolved.rpartition(".")[0]])
        if shared and torch.equal(value.to(param.device, param.dtype), param.detach()):
            continue
        if shared:
            problems.append(f"{path}: this {what} is shared with {describe(shared)}, so loading the file's "
                            f"(different) value would change those modules too; untie it first (give the module its "
                            f"own {'torch.nn.Parameter' if what == 'parameter' else 'buffer tensor'})")
            continue
        plan.append((param, value))
    return problems, plan


def with_default_targets(config: dict, model: nn.Module, path: str) -> dict:
    """The config, with PEFT's default target modules for the model's type where its
    target_modules is None, as PEFT's from_pretrained resolves them (targets.default_targets);
    its ValueError names the folder."""
    if config.get("target_modules") is not None:
        return config
    try:
        return dict(config, target_modules=default_targets(model))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (or write them into its {CONFIG_NAME})") from None


def _check_config_fields(config: dict) -> List[str]:
    """Problems with config fields that would make PEFT load something other than what this
    loader loads: unknown non-empty fields, unknown init_weights / bias values."""
    peft_type = config["peft_type"]
    problems = [f"{key}={value!r}: not a field of PEFT 0.21's {peft_type} config; refusing rather than ignoring it"
                for key, value in config.items() if key not in _CONFIG_FIELDS and value not in (None, "", [], {})]
    init_weights, allowed = config.get("init_weights", True), _INIT_WEIGHTS[peft_type]
    # `is` for the bools: 1 == True in Python, but 1 is not one of PEFT's documented values.
    if not any(init_weights is v or (isinstance(v, str) and init_weights == v) for v in allowed):
        problems.append(f"init_weights={init_weights!r}: expected one of {', '.join(map(repr, allowed))}")
    try:
        check_bias(config.get("bias", "none"))  # PEFT's rule, also for Bone files ("Bone_only", "bone_only")
    except ValueError as exc:
        problems.append(str(exc))
    selection = _selection_field_problem(config)
    if selection is not None:
        problems.append(selection)
    return problems


def _selection_field_problem(config: dict) -> Optional[str]:
    """What apply_miss (and PEFT's config) refuses in the selection fields, a layer filter beside a
    regex say (targets.check_selection_fields' message), or None."""
    try:
        check_selection_fields(*(config.get(k) for k in _SELECTION_FIELDS))
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _selection_problems(model: nn.Module, config: dict, blocks: Dict[str, Tensor],
                        adapter_layers: Tuple[type, ...] = (MissLinear,)) -> List[str]:
    """PEFT puts adapters on the modules its config selects (target_modules, exclude_modules,
    layers_to_transform, layers_pattern, modules_to_save) and loads the file's blocks into those
    only. This loader goes by the file's keys, so the two must agree: a block the config does not
    select (PEFT would ignore it) or a selected module without a block (PEFT would give it a
    freshly initialised adapter) is a problem."""
    targets = config.get("target_modules")
    if targets is None or _selection_field_problem(config) is not None:
        return []  # reported by _check_config_fields
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # PEFT expands the shorthand to the linear layers' names (head excluded), then filters.
        linear = sorted(name for name, _ in find_targets(model, ALL_LINEAR, skip_inside=adapter_layers))
        selected = {name for name in linear if peft_selects(dict(config, target_modules=linear), name)}
    else:
        selected = set()
        skip: List[str] = []
        for name, module in model.named_modules():
            if not name or name.startswith(tuple(skip)):
                continue
            if isinstance(module, adapter_layers):  # its base_layer is not a separate target
                skip.append(name + ".")
            if peft_selects(config, name):
                selected.add(name)
    fields = ", ".join(f"{k}={config.get(k)!r}" for k in _SELECTION_FIELDS if config.get(k) not in (None, [], ""))
    problems = [f"{path}: the file has a block here, but the config ({fields}) does not select this module, so PEFT "
                "would not load it" for path in blocks if path not in selected and get_module(model, path) is not None]
    problems += [f"{path}: the config ({fields}) selects this module, so PEFT would give it a new adapter, but the "
                 "file has no block for it" for path in sorted(selected - set(blocks))]
    return problems


def _plan(model: nn.Module, config: dict, blocks: Dict[str, Tensor]) -> Tuple[List[str], list]:
    """Checks every block against the model; returns (problems, [(path, module, block)])."""
    mode, r, mini_r, dropout = _config_settings(config)
    problems, plan = [], []
    try:
        check_dropout(dropout)
    except (ValueError, TypeError):  # TypeError: no number at all (a str in a hand-edited config)
        problems.append(f"miss_dropout={dropout!r} in the config: supported values are numbers in [0, 1)")
    for path, block in blocks.items():
        module = get_module(model, path)
        if module is None:
            problems.append(f"{path}: no such module in the model")
            continue
        linear = module.base_layer if isinstance(module, MissLinear) else module
        problem = meta_problem(path, module.parameters())
        if problem is not None:
            problems.append(problem)
            continue
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            # (The MissLinear's base when quantize_dynamic replaced it after the adapter was added.)
            what = f"its base layer is a {type_name(linear)}" if linear is not module else f"is a {type_name(module)}"
            problems.append(f"{path}: {what}, not an nn.Linear")
            continue
        if not isinstance(module, MissLinear):
            why = base_refusal(module, mode, parent_module(model, path))
            if why is not None:
                problems.append(f"{path}: {why}")
                continue
        # The module's own sizes: a quantized or sharded weight's shape may be packed or local.
        in_features, out_features = linear_sizes(linear)
        try:
            expected = block_shape(mode, r, mini_r, in_features, out_features)
        except (ValueError, TypeError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        if tuple(block.shape) != expected:
            problems.append(f"{path}: block shape {tuple(block.shape)} in the file, the model needs {expected} "
                            f"(mode={mode!r}, r={r}, in={in_features}, out={out_features})")
            continue
        if isinstance(module, MissLinear):
            if module.mode != mode or tuple(module.miss_block.shape) != expected:
                problems.append(f"{path}: the model's MissLinear has mode={module.mode!r}, block shape "
                                f"{tuple(module.miss_block.shape)}; the file has mode={mode!r}, shape {expected}")
                continue
            if module.merged:
                problems.append(f"{path}: the model's MissLinear is merged; unmerge it before loading")
                continue
            problem = inference_problem(f"{path}.miss_block", [module.miss_block])
            if problem is not None:
                problems.append(problem)
                continue
        if not block.is_floating_point():
            problems.append(f"{path}: block dtype {block.dtype} is not floating point")
            continue
        # One pass, in the dtype the block loads into: a NaN or inf block makes every output of the
        # layer non-finite (a broken file), and float64 values beyond float32's range, finite in
        # the file, would load as inf. The file's own values are read again only to say which.
        weight = module.miss_block if isinstance(module, MissLinear) else read_to_describe(module, "weight")
        target = weight.dtype if isinstance(module, MissLinear) else \
            adapter_dtype(weight.dtype) if isinstance(weight, Tensor) else torch.float32
        if not bool(torch.isfinite(block.to(target)).all()):
            problems.append(f"{path}: the block holds values beyond the range of {target}, the dtype it loads into "
                            "(they would become inf)" if bool(torch.isfinite(block).all())
                            else f"{path}: the block holds non-finite values (NaN or inf)")
            continue
        plan.append((path, module, block))
    missing = [name for name, _ in miss_layers(model) if name not in blocks]
    problems += [f"{name}: the model has a MissLinear here, the file has no block for it" for name in missing]
    return problems, plan


def _new_layer(base: nn.Module, r: int, mode: str, mini_r: int, dropout: float) -> MissLinear:
    """load_adapter's new MissLinear on `base`, in base's training mode (loaded into an eval model:
    no adapter dropout, as PEFT's from_pretrained evals). Its block is overwritten by the file's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_adapter warns once for all layers
        return MissLinear(base, r, mode, mini_r, dropout).train(base.training)


def _saved_copy(param: Tensor) -> Tensor:
    """A copy of param's values for an undo: in host memory (a load near the device's capacity
    should not fail for its backups), except a DTensor's, which stays a DTensor on its mesh (this
    rank's shard, in device memory)."""
    with torch.no_grad():
        return param.detach().clone() if is_dtensor(param) else param.detach().to("cpu", copy=True)


def _restore_values(param: Tensor, saved: Tensor) -> None:
    with torch.no_grad():
        param.copy_(saved)


def _restore_layer(layer: MissLinear, dropout: float, init_weights: bool, block: Tensor) -> None:
    layer.dropout, layer.init_weights = dropout, init_weights
    _restore_values(layer.miss_block, block)


def load_adapter(model: nn.Module, path: str, freeze_others: bool = True) -> nn.Module:
    """Loads a PEFT MiSS (or old Bone) adapter directory into the model, in place, and returns it.

    Plain nn.Linear layers at the file's paths become MissLinear layers; existing MissLinear
    layers get the file's values in their own miss_block parameters (same objects, so optimizers
    keep working) and the file's miss_dropout (mode, r and mini_r must match). Other tensors
    PEFT saves with the blocks (`modules_to_save` copies, trained biases) are copied into the
    model's parameters of those names and stay trainable; its save_embedding_layers copies
    (embed_tokens / lm_head weights) are copied and stay frozen, as PEFT does not train them.
    Other adapters' blocks in a folder PEFT 0.14-0.19 saved from a model holding several
    (`<path>.miss_block.<adapter name>`) are ignored, as PEFT ignores them, with a UserWarning
    counting them (read_adapter).

    The config is checked too: the modules it selects (target_modules, exclude_modules,
    layers_to_transform, layers_pattern, modules_to_save) must be exactly the file's blocks, as
    PEFT would load only those; a field this loader does not know (rank_pattern, ...) with a
    non-empty value, an unknown init_weights / bias value, or a combination PEFT's config refuses
    (layers_to_transform beside a regex target_modules) is refused rather than ignored. A
    value for a parameter shared with another module (a tied lm_head in modules_to_save) is
    refused, as writing it would change the other module; a new adapter on a shared weight
    warns (merging it will be refused).

    Every check runs first: a key, field, module or shape that does not fit raises ValueError
    listing every difference, and the model is left as it was (TypeError for a model that is no
    nn.Module or holds PEFT's modules: a PeftModel has PEFT's load_adapter). An error while it
    writes (torch.OutOfMemoryError for a new block, an interrupt) is raised after every change is
    undone; the undo keeps a copy of the values it overwrites (in host memory; a DTensor's on its
    mesh). With freeze_others (the
    default, as PEFT), the remaining parameters stop requiring grad.

    A DistributedDataParallel / DataParallel wrapper is looked through (the file's paths are the
    inner model's); into a DDP-wrapped model only existing MissLinear layers, and extras the
    model already trains, can be loaded (ValueError otherwise: DDP would not reduce the
    gradients of parameters that start training after it was built), and freeze_others may not
    freeze a parameter it trains (ValueError, the model as it was: DDP would expect its gradient). FileNotFoundError for a
    folder without adapter_config.json or adapter weights; ValueError naming the file for one
    that cannot be read (a config that is not a JSON object, weights that are not a dict of
    tensors: truncated, corrupted, empty). Source: PEFT's
    PeftModel.from_pretrained / set_peft_model_state_dict; docs/miss.md, "Files".
    """
    check_flag(freeze_others, "freeze_others", "load_adapter")
    wrapped, model = model, unwrap_model(model, "load_adapter")
    refuse_peft_model(model, "load_adapter")
    refuse_lazy_tensors(model, "load_adapter")
    config, blocks, extras = read_adapter(path, model)
    if not blocks:
        raise ValueError(f"{path}: the adapter file has no blocks")
    config = with_default_targets(config, model, path)
    reshard_fsdp(model)  # write into the sharded parameters, not copies FSDP would drop at its next reshard
    problems = _check_config_fields(config) + _selection_problems(model, config, blocks)
    block_problems, plan = _plan(model, config, blocks)
    # What the file trains beside the blocks (PEFT's rule: the modules_to_save modules, the biases
    # `bias` names), recorded below so that later freezes keep it trainable and save_adapter
    # writes it again.
    # (by the rule of the PEFT release that wrote the file: targets.matches_by_suffix)
    save_paths, _ = modules_to_save_paths(model, list(config.get("modules_to_save") or []), skip_inside=(MissLinear,),
                                          by_suffix=matches_by_suffix(config.get("peft_version")))
    extras, copy_problems = _peft_wrapper_copies(extras, save_paths)
    copy_problems = container_problems(model, save_paths) + copy_problems
    extra_problems, extra_plan = _plan_extras(model, extras)
    if wrapped is not model and any(not isinstance(module, MissLinear) for _, module, _ in plan):
        refuse_ddp_wrapped(wrapped, "load_adapter")  # it could only fill layers that exist
    problems += block_problems + copy_problems + extra_problems
    recorded = trainable_extras(model)
    earlier_saved = [p for p in recorded["modules_to_save"] if p not in save_paths]
    whole = saved_whole_problem([name for name, module, _ in plan if not isinstance(module, MissLinear)],
                                earlier_saved)
    if whole is not None:
        problems.append(whole)
    if problems:
        raise ValueError(f"adapter {path!r} does not fit the model; nothing was loaded:\n  " + "\n  ".join(problems))
    bias = check_bias(config.get("bias", "none"))
    if wrapped is not model and any(not p.requires_grad for p in extra_parameters(
            model, {"modules_to_save": save_paths, "bias": bias}).values()):
        refuse_ddp_wrapped(wrapped, "load_adapter (the file trains modules_to_save or biases the model has frozen)")
    mode, r, mini_r, dropout = _config_settings(config)
    # The warnings come before anything changes: turned into errors, they leave the model as it was.
    # A modules_to_save module's values the file lacks keep the model's own (PEFT's from_pretrained
    # raises KeyError there): said, as a file saved by miss_ext before 2026-12-04 lacks the
    # buffers (a BatchNorm's running statistics), which then stay the base model's.
    selected = {"modules_to_save": save_paths, "bias": "none"}
    absent = [key for key in list(extra_parameters(model, selected)) + list(extra_buffers(model, selected))
              if key not in extras]
    if absent:
        warnings.warn(f"{path}: the file has no value for {describe(absent)} of its modules_to_save, which keep "
                      "the model's own values (PEFT's from_pretrained refuses such a file; miss_ext's save_adapter "
                      "before 2026-12-04 did not save a modules_to_save module's buffers)", stacklevel=2)
    dead = [name for name, module, _ in plan if r > linear_sizes(module)[0]]
    if dead:
        warnings.warn(f"adapter r={r} exceeds in_features of {', '.join(dead)}: those block rows are dead weight. "
                      f"{PEFT_REFUSES_R_ABOVE_IN}", stacklevel=2)
    warn_shared(shared_before_wrapping(model, [(name, module) for name, module, _ in plan
                                               if not isinstance(module, MissLinear)]))
    # All or nothing, as apply_miss: the new layers are made first (their blocks are this call's
    # allocations), then every write keeps its undo, so that a failure part way (out of memory,
    # an interrupt) leaves the model as it was (a docstring audit, 2026-12-06: the layers before
    # the failing one kept the file's blocks, their bases frozen).
    # Each undo is listed before its write: an interrupt between the write and the next line is
    # undone too (a fault-injection sweep, 2026-12-06). They run in reverse order.
    undos = settings_undos(model)
    try:
        made = {name: _new_layer(module, r, mode, mini_r, dropout) for name, module, _ in plan
                if not isinstance(module, MissLinear)}
        for name, module, block in plan:
            if name in made:
                undos.append((name, functools.partial(set_module, model, name, module)))
                set_module(model, name, made[name])
                module = made[name]
            else:
                undos.append((name, functools.partial(_restore_layer, module, module.dropout, module.init_weights,
                                                      _saved_copy(module.miss_block))))
                # The file's dropout is part of the adapter it describes, as for a new layer: a
                # layer that kept its own would train the loaded adapter with another dropout,
                # silently.
                module.dropout = dropout
            # So is its init_weights=False (a default-mode adapter made random), as PEFT's layers
            # keep their config: save_adapter writes it again, reset_parameters() draws a random
            # block. (The block itself is the file's, copied below.)
            module.init_weights = config.get("init_weights", True) is not False
            _copy_whole(module.miss_block, block)
        for param, value in extra_plan:
            undos.append(("", functools.partial(_restore_values, param, _saved_copy(param))))
            _copy_whole(param, value)
        record_extras(model, recorded, save_paths, bias)
        if freeze_others:
            # As apply_miss: earlier modules_to_save this file does not list keep a frozen state.
            earlier_paths = [p for p in recorded["modules_to_save"] if p not in save_paths]
            earlier = extras_requires_grad(model, earlier_paths)
            trained = {name for name, param in model.named_parameters() if param.requires_grad}
            freeze_all_but_blocks(model)
            mark_extras_trainable(model)
            keep_earlier_frozen(model, earlier_paths, earlier, bias)
            frozen = sorted(name for name, param in model.named_parameters()
                            if name in trained and not param.requires_grad)
            if frozen and ddp_needs_every_gradient(wrapped):
                # DDP expects a gradient for each parameter it registered as trainable: the next
                # training step would fail in its reducer (a wrapper sweep, 2026-12-06). Undone below.
                raise ValueError(f"load_adapter: the model is wrapped in DistributedDataParallel, which registered "
                                 f"{describe(frozen)} as trainable, and freeze_others=True would freeze them (its "
                                 "next training step would fail: it was built with find_unused_parameters=False or "
                                 "static_graph=True); nothing was loaded. Pass freeze_others=False, or load before "
                                 "wrapping the model")
        else:
            # What this file trains beside the blocks trains (a base frozen by the user would
            # otherwise keep the head the file records frozen: saved, never trained); nothing else
            # changes.
            for param in extra_parameters(model, {"modules_to_save": save_paths, "bias": bias}).values():
                param.requires_grad_(True)
        record_shared_weights(model)
    except BaseException:
        undo_each(list(reversed(undos)), "load_adapter")
        raise
    return wrapped
