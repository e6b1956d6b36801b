"""Which modules of a model an adapter targets: PEFT's matching rules, and module lookup by path."""
import re
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

TargetModules = Union[str, Sequence[str]]

# PEFT's shorthand for "every linear layer except the output head".
ALL_LINEAR = "all-linear"


def matches(target_modules: TargetModules, name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module path; a list matches a
    path equal to one of its entries or ending in "." + entry (so "q_proj" matches
    "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.xq_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def second_paths(model: nn.Module, target_modules: TargetModules) -> List[Tuple[str, str]]:
    """(path, first path) of each module the rule names under a path that is not its first. A
    module registered under two paths (`self.b = self.a`) is listed once by named_modules, under
    its first path, so PEFT's rule (and find_targets) sees only that one, and after an adapter
    replaces it there the second path still calls the plain layer."""
    if target_modules == ALL_LINEAR:
        return []
    first: dict = {}
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        if name and first.setdefault(id(module), name) != name and matches(target_modules, name):
            out.append((name, first[id(module)]))
    return out


def canonical_targets(target_modules: object) -> object:
    """"all-linear" in any case as ALL_LINEAR (PEFT compares it case-insensitively,
    _maybe_include_all_linear_layers; "ALL-LINEAR" was read as a regex here, matching no module: a
    review, 2026-12-05); any other value as it is."""
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        return ALL_LINEAR
    return target_modules


class _PeftDefault:
    """A value default_targets took from PEFT's table, shown as where it came from in messages."""

    model_type = ""

    def __repr__(self) -> str:
        return f"None (PEFT's default for model_type {self.model_type!r}: {super().__repr__()})"


class DefaultTargets(_PeftDefault, list):
    """PEFT's default target list for a model type."""


class DefaultTargetsRegex(_PeftDefault, str):
    """PEFT's default target regex for a model type."""


def is_default(target_modules: object) -> bool:
    """Whether target_modules came from default_targets."""
    return isinstance(target_modules, (DefaultTargets, DefaultTargetsRegex))


def default_targets(model: nn.Module) -> TargetModules:
    """PEFT's default target modules for the model's transformers type, what get_peft_model and
    from_pretrained take for target_modules=None (BaseTuner._prepare_adapter_config with
    TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING), the type read as PEFT reads it
    (BaseTuner.get_model_config: `model.config.to_dict()["model_type"]`, the config class's type;
    a model without a config is PEFT's "custom" type). PEFT's own table and lookup are used, so the
    defaults follow the installed PEFT: ImportError naming the extra without it, ValueError for a
    model type the table lacks (PEFT: "Please specify `target_modules`") or a config PEFT cannot
    read a type from (PEFT: TypeError or KeyError). A list comes back as a DefaultTargets, a regex
    as a DefaultTargetsRegex: their repr says where they came from."""
    from ._optional import require

    require("peft", "peft", "target_modules=None (PEFT's default target modules per model type)")
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import constants

    try:
        model_type = BaseTuner.get_model_config(model)["model_type"]
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"target_modules=None: PEFT reads the default target modules by model.config's model_type, "
                         f"which this model's config ({type(getattr(model, 'config', None)).__name__}) does not give "
                         f"({type(exc).__name__}: {exc}); name the modules") from None
    table = getattr(constants, "TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING", {})
    targets = table.get(model_type) if isinstance(model_type, str) else None
    if targets is None:
        raise ValueError(f"target_modules=None: PEFT has no default target modules for model_type={model_type!r}; "
                         "name the modules (PEFT raises 'Please specify `target_modules` in `peft_config`')")
    found = DefaultTargetsRegex(targets) if isinstance(targets, str) else DefaultTargets(targets)
    found.model_type = model_type
    return found


def check_target_modules(target_modules: object) -> TargetModules:
    """Validates the type: a regex string or a non-empty list/tuple/set of strings ("all-linear"
    in any case is returned as ALL_LINEAR)."""
    target_modules = canonical_targets(target_modules)
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as exc:
                raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
        return target_modules
    if isinstance(target_modules, (list, tuple, set, frozenset)) and not target_modules:
        raise ValueError("target_modules is empty, so it matches no module of the model")
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        bad = [t for t in target_modules if not isinstance(t, str)]
        if bad:
            raise TypeError(f"target_modules entries must be strings, got {bad!r}")
        return sorted(target_modules) if isinstance(target_modules, (set, frozenset)) else list(target_modules)
    raise TypeError(f"target_modules must be a regex string or a non-empty list of module names, "
                    f"got {target_modules!r}")


# transformers 5 stores an MoE layer's experts as fused 3-D parameters of one experts module
# (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not as nn.Linear modules, under the names
# the linears had. A list naming them ("down_proj") then matches only the shared expert's linear
# and the routed experts stay unadapted without a word (PEFT says nothing either): refused instead.
def bare_parameters_named(model: nn.Module, target_modules: TargetModules,
                          keep: Optional[Callable[[str], bool]] = None) -> Dict[str, List[str]]:
    """{entry (the whole regex for a string rule): [parameter paths]} of the parameters whose own
    path the rule matches (PEFT's matching, as for module paths) and that lie inside no module
    the rule matches, when they are fused MoE expert weights: at least 3-D, held by a module
    whose class name says experts (transformers 5's MixtralExperts, Qwen2MoeExperts,
    GptOssExperts, DeepseekV3Experts, ... all end in "Experts"). Other bare parameters are left
    alone, as PEFT leaves them: a name that also matches such a parameter (GraniteSpeech's
    projector.query beside its Q-Former's query linears, nn.MultiheadAttention's in_proj_weight
    under ".*proj.*") still selects its linear layers, and nothing was meant for the parameter.
    `keep(path)` (exclude_modules, layers_to_transform, ...) drops the parameters the other
    selection fields leave out. Empty for "all-linear" (it selects by type, not by name)."""
    target_modules = check_target_modules(target_modules)
    if target_modules == ALL_LINEAR:
        return {}
    named = {name for name, _ in model.named_modules(remove_duplicate=False) if name and matches(target_modules, name)}
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found: Dict[str, List[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        if param.dim() < 3 or not matches(target_modules, path):
            continue
        owner = model.get_submodule(path.rpartition(".")[0])
        if "expert" not in type(owner).__name__.lower():
            continue
        parts = path.split(".")
        if any(".".join(parts[:i]) in named for i in range(1, len(parts))):
            continue  # a parameter of a matched module: that module is the target (or refused as such)
        if keep is not None and not keep(path):
            continue
        for entry in entries:
            if matches(entry if isinstance(target_modules, str) else [entry], path):
                found.setdefault(entry, []).append(path)
    return found


def refuse_bare_parameters(model: nn.Module, target_modules: TargetModules, where: str = "",
                           keep: Optional[Callable[[str], bool]] = None) -> None:
    """ValueError when the rule names bare parameters (bare_parameters_named): each such entry,
    up to four of its parameters, and a more precise name for the linear layers it also matches.
    `where` prefixes the message ("apply_bank: ")."""
    found = bare_parameters_named(model, target_modules, keep)
    if not found:
        return
    target_modules = check_target_modules(target_modules)
    linear = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    problems = []
    for entry, params in found.items():
        rule = entry if isinstance(target_modules, str) else [entry]
        layers = [name for name in linear if matches(rule, name)]
        # The entry's own layers, one path component more specific: "down_proj" on Qwen2-MoE
        # matches the shared expert's linear, whose "shared_expert.down_proj" names it alone.
        if layers:
            advice = (f"name the linear layers more precisely, e.g. {'.'.join(layers[0].split('.')[-2:])!r} (it also "
                      f"matches the linear layers {describe(layers, 4)})")
        else:
            advice = "it matches no linear layer of this model: drop it"
        problems.append(f"{entry!r} matches the parameters {describe(params, 4)}, which lie inside no layer it "
                        f"selects; {advice}")
    raise ValueError(
        f"{where}target_modules={target_modules!r} names bare parameters, not layers: " + "; ".join(problems)
        + ". MiSS adapts linear layers (nn.Linear modules) only, and a parameter cannot hold an adapter: "
        "transformers 5 stores MoE experts as fused 3-D parameters of one experts module (experts.gate_up_proj, "
        "experts.down_proj), so they cannot be adapted, and adapting only the other matches would leave them "
        "silently unadapted. Nothing was changed")


def unmatched_entries(model: nn.Module, target_modules: TargetModules) -> List[str]:
    """The entries of a list target_modules that match no module path of the model (second
    paths of a module included: those have their own warning). [] for a string rule."""
    target_modules = check_target_modules(target_modules)
    if isinstance(target_modules, str):
        return []
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    return [t for t in target_modules if not any(matches([t], name) for name in names)]


def warn_unmatched(model: nn.Module, target_modules: TargetModules, where: str = "", stacklevel: int = 3) -> None:
    """One warning naming the list entries that match nothing, when others do (PEFT ignores them
    silently; a list shared across architectures often has some, so not an error)."""
    unused = unmatched_entries(model, target_modules)
    if unused:
        warnings.warn(f"{where}target_modules entries {unused!r} match no module of the model (PEFT ignores them "
                      "too); only what the other entries select is adapted", stacklevel=stacklevel)


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def find_targets(model: nn.Module, target_modules: TargetModules,
                 skip_inside: Tuple[type, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every module the rule selects, in model order. Modules nested inside an
    instance of `skip_inside` (an adapter layer's own base_layer) are never selected, so applying
    the same rule twice finds the adapter layer itself, not the linear it wraps."""
    target_modules = check_target_modules(target_modules)
    found = []
    skip_prefixes: List[str] = []
    head = _output_head(model) if target_modules == ALL_LINEAR else None
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if skip_inside and isinstance(module, skip_inside):
            skip_prefixes.append(name + ".")
        if target_modules == ALL_LINEAR:
            # As PEFT (isinstance(module, (nn.Linear, Conv1D))): transformers' Conv1D and its
            # subclasses count as linear here (a subclass is then refused by name, as PEFT's MiSS
            # refuses every Conv1D; the class itself is adapted: base_layers.is_conv1d).
            selected = (isinstance(module, (nn.Linear,) + skip_inside) or _is_transformers_conv1d(module)) \
                and module is not head
        else:
            selected = matches(target_modules, name)
        if selected:
            found.append((name, module))
    return found


def is_conv1d_class(cls: type) -> bool:
    """Whether `cls` is transformers.pytorch_utils.Conv1D itself, found by name so that
    transformers is not imported."""
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """isinstance(module, transformers.pytorch_utils.Conv1D), without importing transformers."""
    return any(is_conv1d_class(c) for c in type(module).__mro__)


def _layer_index(path: str, layers_pattern: object) -> Optional[int]:
    """The layer index PEFT reads from a module path for layers_to_transform: the first number
    after a `<pattern>.` component; when layers_pattern is empty, after any component but the
    path's first (PEFT's regex: `layers.1.q_proj` has no index, `model.layers.1.q_proj` has 1)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def peft_selects(config: Mapping, path: str) -> bool:
    """Whether PEFT (0.21, `check_target_module_exists`) puts an adapter on the module at `path`
    for a saved config (a dict with target_modules not None and not "all-linear"):
    exclude_modules (regex or names) and modules_to_save exclude first; a string target_modules
    is a whole-path regex; a list matches names or suffixes and then layers_to_transform (an int
    or a list of layer indices, found with layers_pattern) keeps only those layers."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, path):
            return False
        if not isinstance(exclude, str) and matches(list(exclude), path):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in config.get("modules_to_save") or []):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        # PEFT: a list entry equal to the whole path selects it without the layer filter (so the
        # full paths "all-linear" expands to are never filtered by layers_to_transform).
        return True
    if not matches(list(targets), path):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    index = _layer_index(path, config.get("layers_pattern"))
    if index is None:
        return False
    return index == indexes if isinstance(indexes, int) else index in indexes


# Decision (2026-12-07): PEFT 0.22 matches a modules_to_save entry as a whole trailing part of a
# module path (peft.utils.other._is_valid_match: "norm" is `model.norm`, not `input_layernorm`),
# where 0.17-0.21 matched a plain string suffix (`key.endswith(entry)`). The same config then trains
# other modules under the two releases. apply_miss makes a new adapter, as get_peft_model, which
# always reads by the installed release's rule (a config's peft_version is ignored there): the
# installed peft's rule, else 0.22's. load_adapter reads a file by the rule of the release that
# wrote it (its `peft_version`, which PEFT writes into every adapter_config.json), else the
# installed one's: a file written by PEFT 0.21 with modules_to_save=["norm"] holds trained
# input_layernorm copies, and loads with them trainable, as they were trained (PEFT 0.22's
# from_pretrained loads those values into the model's own modules, frozen: the same outputs).
# miss_ext's own files name the full paths, which both rules read alike (save_adapter checks).
SUFFIX_RULE_BEFORE = (0, 22)


def installed_peft_version() -> Optional[str]:
    """The installed peft's version string (from its package metadata, without importing it), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def matches_by_suffix(peft_version: Optional[str]) -> bool:
    """Whether PEFT release `peft_version` (e.g. "0.21.2", "0.22.0.dev0", "0.21.0@<commit>"; None:
    the installed one, none installed: the newest rule) matches modules_to_save entries as plain
    string suffixes: releases before 0.22. A string that is not a version reads as the newest."""
    if peft_version is None:
        peft_version = installed_peft_version()
    found = re.match(r"\s*(\d+)\.(\d+)", peft_version) if isinstance(peft_version, str) else None
    return found is not None and (int(found[1]), int(found[2])) < SUFFIX_RULE_BEFORE


def matches_entry(path: str, entry: str, by_suffix: bool) -> bool:
    """PEFT's modules_to_save match of one module path and one entry: the path is the entry or
    ends with "." + entry (PEFT 0.22), or with `by_suffix` (before 0.22) ends with it as a string."""
    return path.endswith(entry) if by_suffix else path == entry or path.endswith("." + entry)


def modules_to_save_paths(model: nn.Module, entries: Optional[Sequence[str]], skip_inside: Tuple[type, ...] = (),
                          *, by_suffix: bool, unwrapped: bool = False) -> Tuple[List[str], List[str]]:
    """PEFT's `_set_trainable` rule for `modules_to_save`: every module whose path matches one of
    the entries (matches_entry; `by_suffix`: PEFT 0.17-0.21, see matches_by_suffix, where "norm"
    also picks "input_layernorm"). Modules nested inside an instance of `skip_inside` (an adapter layer's
    base_layer) are not looked at. `unwrapped`: the paths as the model without torch's wrappers
    names them (without_wrapper_names: where PEFT loads a saved file). Returns (the matched paths
    in model order, the entries that matched nothing)."""
    if not entries:
        return [], []
    found: List[str] = []
    used = set()
    skip_prefixes: List[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        if skip_inside and isinstance(module, skip_inside):
            skip_prefixes.append(name + ".")
        if unwrapped:
            name = without_wrapper_names(name)
        hits = [e for e in entries if matches_entry(name, e, by_suffix)]
        if hits:
            used.update(hits)
            if name not in found:
                found.append(name)
    return found, [e for e in entries if e not in used]


# The names torch's wrappers insert into module paths (named_modules) but not into state_dict
# keys: activation checkpointing's checkpoint_wrapper, and FSDP1 (PEFT 0.22's
# utils.integrations._TORCH_WRAPPER_NAMES).
TORCH_WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def without_wrapper_names(path: str) -> str:
    """A module or parameter path without the components torch's wrappers insert
    (TORCH_WRAPPER_NAMES): the path in the unwrapped model, as state_dict keys name it."""
    return ".".join(part for part in path.split(".") if part not in TORCH_WRAPPER_NAMES)


def exact_paths_regex(paths: Sequence[str]) -> str:
    """A target_modules regex selecting exactly these module paths. (A list would not: PEFT also
    matches its entries as suffixes, so "fc" would adapt "sub.fc" too.)"""
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def get_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at a dotted path, or None."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replaces the submodule at a dotted path (the parent keeps its attribute name)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def describe(names: Iterable[str], limit: int = 20) -> str:
    """A short readable list of names for error messages."""
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Shared parameters. A weight can be held by several modules (tied input/output embeddings, one
# nn.Linear registered under two paths, ...) or share memory with another parameter
# (nn.Parameter(other.weight.data), views of one buffer). An adapter on one of them is fine
# unmerged (only that call site's output changes), but merging writes the shared memory and so
# changes every other holder too. These helpers find the other holders by parameter identity
# and by overlapping memory.
# ---------------------------------------------------------------------------------------------
class ParameterPaths:
    """Every parameter of a model with every dotted path it is held under (duplicates included),
    and, by storage, the byte range each one addresses (so that finding the tensors overlapping
    one parameter looks at the parameters of its storage only: comparing every pair took seconds
    on models with hundreds of adapted layers)."""

    def __init__(self, model: Optional[nn.Module] = None, with_buffers: bool = False) -> None:
        self.by_id: Dict[int, List[str]] = {}
        self.by_storage: Dict[object, List[Tuple[str, torch.Tensor, int, int]]] = {}
        if model is not None:
            named = list(model.named_parameters(remove_duplicate=False))
            if with_buffers:  # modules_to_save copy their buffers too (model.extra_buffers)
                named += list(model.named_buffers(remove_duplicate=False))
            for name, param in named:
                self.by_id.setdefault(id(param), []).append(name)
                where = memory_range(param)
                if where is not None:
                    self.by_storage.setdefault(where[0], []).append((name, param, where[1], where[2]))

    def overlapping(self, t: torch.Tensor) -> List[str]:
        """Paths of the other parameters that can address a byte of `t` (same storage,
        overlapping byte ranges), in the model's order."""
        where = memory_range(t)
        if where is None:
            return []
        _, start, end = where
        return [name for name, other, lo, hi in self.by_storage.get(where[0], ())
                if other is not t and start < hi and lo < end]


def memory_range(t: torch.Tensor) -> Optional[Tuple[object, int, int]]:
    """(storage identity, first byte, end byte) of the memory `t` can address, or None for
    tensors without real memory (meta, fake, tensor subclasses)."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.data_ptr() == 0:
        return None
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return (t.device, storage.data_ptr()), start, start + extent * t.element_size()


def parameter_paths(model: nn.Module, with_buffers: bool = False) -> ParameterPaths:
    """The model's parameters (and, with_buffers, its buffers) and the paths they are held under
    (see other_holders)."""
    return ParameterPaths(model, with_buffers)


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """id(module) -> every path under which the model holds that module object ("" for the
    model itself), duplicates included."""
    paths: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def other_holders(paths: "ParameterPaths", params: Iterable[Optional[nn.Parameter]],
                  own: Sequence[str]) -> List[str]:
    """Paths of `params` (e.g. a linear's weight and bias; None entries are skipped), and of
    every other parameter sharing memory with them, that lie outside the module paths `own`:
    the places that would also see a write into them.

    `own` is where the adapted call site lives: [path] for a plain nn.Linear about to be wrapped
    (the same linear also registered elsewhere is then another holder, as it would stay
    unadapted), or every path of the adapter layer once it is in the model."""
    if "" in own or not isinstance(paths, ParameterPaths):  # the model is the layer itself / nothing to look in
        return []
    prefixes = tuple(p + "." for p in own)
    found: List[str] = []

    def add(names: Iterable[str]) -> None:
        found.extend(p for p in names if not p.startswith(prefixes) and p not in found)

    for param in params:
        if param is None:
            continue
        add(paths.by_id.get(id(param), []))
        add(paths.overlapping(param))
    return found


def stored_weight_and_bias(module: nn.Module) -> List[Optional[torch.Tensor]]:
    """The tensors that hold `module`'s weight and bias: the attributes themselves, or for a
    parametrized one (torch.nn.utils.parametrize) its stored originals. Reading a parametrized
    weight computes a new tensor each time, which shares memory with nothing: a weight tied to
    another module's through the original was not seen as shared (a review, 2026-12-05: after
    remove_parametrizations the layer's merge moved the other module's weight, silently)."""
    found: List[Optional[torch.Tensor]] = []
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(module, name):
            plist = module.parametrizations[name]
            found.extend(t for n, t in plist.named_parameters(recurse=False) if n.startswith("original"))
            found.extend(t for n, t in plist.named_buffers(recurse=False) if n.startswith("original"))
        else:
            found.append(getattr(module, name, None))
    return found


def record_sharing(root: nn.Module, layers: Iterable[Tuple[nn.Module, nn.Module]]) -> Dict[str, List[str]]:
    """For each (adapter layer, its base module) under `root`: sets `layer._shared_with` (the other
    holders of the base's weight and bias, [] when not shared; a layer's merge reads it, as it
    cannot see its model) and `layer._layer_path` (for messages). Returns {layer path: holders}
    for the shared ones."""
    # Buffers too: a buffer registered on the base weight's memory (a tied decoder held as a
    # buffer) also sees a merge (a review, 2026-12-05: merged outputs 0.86 off, no warning).
    params, modules = parameter_paths(root, with_buffers=True), module_paths(root)
    shared: Dict[str, List[str]] = {}
    for layer, base in layers:
        own = modules[id(layer)]
        layer._layer_path = own[0] or "the model"
        layer._shared_with = other_holders(params, stored_weight_and_bias(base), own)
        if layer._shared_with:
            shared[own[0]] = layer._shared_with
    return shared


def shared_weight_message(layer: str, shared_with: Sequence[str]) -> str:
    """The error for a merge into a shared base weight: what is shared, with whom, why it is
    refused and the way out. `layer` names the adapter layer (its module path)."""
    return (
        f"cannot merge the MiSS adapter of {layer}: its base layer's parameters are shared with "
        f"{describe(shared_with)} (e.g. tied input/output embeddings), so writing the merged weight would "
        "change those modules too and the merged model would not compute what the unmerged one does. "
        "Nothing was merged. Untie it explicitly first, e.g. "
        f"`base = model.get_submodule({layer!r}).base_layer; base.weight = torch.nn.Parameter("
        "base.weight.detach().clone(), requires_grad=False)` (the same for .bias if it is listed), and for a "
        "transformers model with tied embeddings also set `model.config.tie_word_embeddings = False` "
        "(otherwise transformers ties them again, e.g. in tie_weights() or resize_token_embeddings(), and the "
        "merged head is silently lost; that is also why it is not untied here behind your back); then merge."
    )


def check_selection_fields(target_modules, exclude_modules, layers_to_transform, layers_pattern,
                           modules_to_save) -> None:
    """Types and combinations of PEFT's selection fields (MissConfig.__post_init__ refuses the same):
    TypeError or ValueError naming the field. apply_miss and the adapter-file loaders share it."""
    if exclude_modules is not None:
        if isinstance(exclude_modules, str):
            try:
                re.compile(exclude_modules)
            except re.error as exc:
                raise ValueError(f"exclude_modules={exclude_modules!r} is not a valid regex: {exc}") from None
        elif not (isinstance(exclude_modules, (list, tuple, set, frozenset))
                  and all(isinstance(e, str) for e in exclude_modules)):
            raise TypeError(f"exclude_modules must be a regex string or a list of module names, "
                            f"got {exclude_modules!r}")
    if layers_to_transform is not None:
        ints = list(layers_to_transform) if isinstance(layers_to_transform, (list, tuple)) else [layers_to_transform]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
            raise TypeError(f"layers_to_transform must be an int or a list of ints, got {layers_to_transform!r}")
        if is_default(target_modules) and isinstance(target_modules, str):
            # PEFT's MissConfig checks before the default is filled in, and its matching then ignores
            # the layer filter for a regex: every layer would be adapted, silently.
            raise ValueError(f"layers_to_transform={layers_to_transform!r} with target_modules={target_modules!r}, "
                             "a regex: PEFT would ignore the layer filter and adapt every layer it matches; "
                             "refusing rather than ignoring it. Name the modules, or put the layer numbers into "
                             "the regex")
        if isinstance(target_modules, str):
            raise ValueError(f"layers_to_transform={layers_to_transform!r} cannot be used with a string "
                             f"target_modules={target_modules!r} (a regex or 'all-linear'), as in PEFT's MissConfig; "
                             "give a list of names, or put the layer numbers into the regex")
    if layers_pattern is not None:
        if not (isinstance(layers_pattern, str) or (isinstance(layers_pattern, (list, tuple))
                                                    and all(isinstance(p, str) for p in layers_pattern))):
            raise TypeError(f"layers_pattern must be a string or a list of strings, got {layers_pattern!r}")
        if isinstance(target_modules, str):
            peft_does = ("PEFT would ignore it with a default regex" if is_default(target_modules)
                         else "as in PEFT's MissConfig")
            raise ValueError(f"layers_pattern={layers_pattern!r} cannot be used with a string "
                             f"target_modules={target_modules!r} ({peft_does})")
        if layers_to_transform is None and layers_pattern:
            raise ValueError(f"layers_pattern={layers_pattern!r} only takes effect with layers_to_transform, which "
                             "is None; refusing rather than ignoring it")
    if modules_to_save is not None and not (isinstance(modules_to_save, (list, tuple, set, frozenset))
                                            and all(isinstance(m, str) and m for m in modules_to_save)):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
