"""Which modules of a model an adapter targets: PEFT's matching rules, and module lookup by path."""
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

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


def check_target_modules(target_modules: object) -> TargetModules:
    """Validates the type: a regex string or a non-empty list/tuple/set of strings."""
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
            # As PEFT: transformers' Conv1D counts as linear here (and is then refused by name).
            selected = (isinstance(module, (nn.Linear,) + skip_inside) or type(module).__name__ == "Conv1D") \
                and module is not head
        else:
            selected = matches(target_modules, name)
        if selected:
            found.append((name, module))
    return found


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
