"""`MissLinear`: a frozen nn.Linear plus one trainable MiSS block, run on `torch.ops.miss`."""
import contextlib
import json
import math
import numbers
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import merge_record, merged_block
from ._distributed import is_dtensor
from .base_layers import (EXACT_LINEAR_SUBCLASSES, base_refusal, check_merge, is_plain_linear,
                          linear_class_override, linear_sizes, read_to_describe, type_name, weight_out_in)
from .ops import new_dropout_key
from .targets import shared_weight_message
from .weight_metadata import BaseTensorAttributes

# _set_merged's "keep what was noted of the block" (merged_block).
_KEEP_NOTE = object()

# The public names (README; the last three live in base_layers); the other functions here are the package's
# internals, used across its modules.
__all__ = ["MissLinear", "EXACT_LINEAR_SUBCLASSES", "is_plain_linear", "linear_class_override"]

# Said wherever an adapter with r > in_features is made or loaded (docs/miss.md, last section):
# PEFT 0.21 raises ValueError for such a layer when it builds it, so the saved files load only here.
PEFT_REFUSES_R_ABOVE_IN = ("PEFT (0.21 and later) refuses r > in_features when it builds a layer, so PEFT cannot load "
                           "such an adapter's files (save_adapter); miss_ext.load_adapter can")

MODES = ("default", "mini", "bat")


# The largest size of a tensor dimension (int64): torch.zeros meets a larger one with an overflow
# TypeError naming nothing (a review, 2026-12-04).
MAX_TENSOR_SIZE = 2 ** 63 - 1


def _check_int(name: str, value: object) -> int:
    """`value` as a Python int: an int or a NumPy integer (numbers.Integral, as nn.Linear and PEFT
    take them; np.int64 was refused, a new-user pass, 2026-12-07); TypeError for anything else,
    a bool included (True is no rank)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def block_shape(mode: str, r: int, mini_r: int, in_features: int, out_features: int, empty_output: bool = False):
    """Shape of miss_block for a mode (PEFT's shapes); raises ValueError on bad sizes.
    `empty_output`: out_features = 0 is allowed in every mode (the bank's ops handle it; the
    default and bat ops of a MissLinear do not)."""
    r = _check_int("r", r)
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got r={r}")
    if r > MAX_TENSOR_SIZE:
        raise ValueError(f"r={r} is above the largest size a tensor dimension holds (2**63 - 1)")
    if mode in ("default", "bat") and out_features == 0 and not empty_output:
        # (r, 0) and (0, r, r) blocks hold nothing, and the ops refuse a 0 period; an empty layer
        # has nothing to adapt. (Mini mode's (r, mini_r) block keeps working on an empty output.)
        raise ValueError(f"{mode} mode needs out_features >= 1, got out_features=0")
    if mode == "default":
        return (r, out_features)
    if mode == "mini":
        mini_r = _check_int("mini_r", mini_r)
        if mini_r <= 0 or out_features % mini_r != 0:
            raise ValueError(f"mini_r={mini_r} must be a positive divisor of out_features={out_features}")
        return (r, mini_r)
    if mode == "bat":
        if in_features % r != 0 or out_features % r != 0:
            raise ValueError(f"bat mode needs in_features and out_features divisible by r; got "
                             f"in_features={in_features}, out_features={out_features}, r={r}")
        return (out_features // r, r, r)
    raise ValueError(f"unknown MiSS mode {mode!r}; expected one of {', '.join(MODES)}")


def is_rate(value: object) -> bool:
    """A real number that is no bool: Python's int and float, NumPy's floats and ints (NumPy's
    bool is no numbers.Real)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_dropout(dropout: object) -> float:
    """The adapter dropout probability as a float. TypeError for no real number (a str, None, a
    bool, a tensor), ValueError outside [0, 1). (A NumPy float was refused as "must be a float in
    [0, 1)" though it was one, and the wrong types got that ValueError too: a new-user pass,
    2026-12-07.)"""
    if not is_rate(dropout):
        raise TypeError(f"dropout must be a float (a Python or NumPy real number), got dropout={dropout!r} "
                        f"({type(dropout).__name__})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got dropout={dropout!r}")
    return float(dropout)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's default (autocast_adapter_dtype=True): half-precision bases get a float32 block, and
    so do quantized (non-floating) weights."""
    # itemsize < 2: the float8 (and smaller) formats, which PEFT's cast_adapter_dtype upcasts too
    # (peft.utils.constants.UPCAST_DTYPES): the miss ops do not compute in them.
    if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point or base_dtype.itemsize < 2:
        return torch.float32
    return base_dtype


def check_flag(value, name: str, where: str) -> None:
    """TypeError unless `value` is a bool (numpy's too): a flag given as a string or None did the
    opposite of what it said ("False" is truthy; a review, 2026-12-05: apply_miss(...,
    freeze_others="False") froze everything, merge_and_unload(model, safe_merge="no") ran a safe
    merge)."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise TypeError(f"{where}: {name} must be True or False, got {name}={value!r}")


def refuse_forward_tangents(where: str, *tensors: Optional[Tensor]) -> None:
    """NotImplementedError when one of `tensors` is a forward-mode dual tensor
    (torch.autograd.forward_ad.make_dual, also a parameter made dual through functional_call) outside
    torch.func transforms. The miss ops' autograd is C++, which has no forward mode: their
    differentiable ops raise torch's "jvp is not implemented for the c++ API of custom Function",
    and an in-place one would drop the tangent (csrc/ops/autograd/not_differentiable.h). Called
    before a dropout key is drawn, so the refusal leaves the RNG as it was, and before the bank's
    choice of its in-place op, with one message for every path. Under torch.func.jvp / jacfwd
    (an interpreter on functorch's stack) the composites in _functorch.py compute the tangents, so
    nothing is refused there. Costs one int comparison outside a forward-AD dual level."""
    if torch.autograd.forward_ad._current_level < 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return
    for t in tensors:
        if t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{where}: forward-mode AD through dual tensors (torch.autograd.forward_ad) is not implemented for the "
                "miss ops, whose autograd is C++; use torch.func.jvp / jacfwd, which run the ops as composites "
                "(README, 'torch.func and higher derivatives')")


def check_before_dropout_key(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
                             in_features: int) -> None:
    """Raises what torch.ops.miss.linear(x, weight, bias, block, ...) raises for a bad x
    (ValueError / TypeError), before the caller draws its dropout key, so that a refused call
    leaves the global RNG as it was (PEFT's base layer raises before its dropout draws). Only
    cheap conditions are looked at (sizes; devices and dtypes outside TorchScript, under autocast
    the dtypes after its casts); when one fails, the op itself, without dropout, raises its own
    message. In TorchScript, which cannot read autocast's state (torch.is_autocast_cpu_enabled()
    crashed a scripted function under autocast, torch 2.14), only the dtype mismatches that no
    autocast setting makes equal are looked at: float64 beside another dtype."""
    # Integer or bool x too: autocast casts floating inputs only, so the op refuses those under it.
    refused = x.dim() == 0 or x.shape[-1] != in_features or not x.is_floating_point()
    float64 = x.dtype == torch.float64  # autocast leaves float64 as it is: it meets only float64
    refused = refused or (weight.dtype == torch.float64) != float64 or (
        bias is not None and (bias.dtype == torch.float64) != float64)
    if not torch.jit.is_scripting():
        refuse_forward_tangents("miss::linear", x, weight, bias, block)
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        to = torch.get_autocast_dtype(x.device.type) if autocast else None
        refused = refused or _saves_an_inference_tensor(x, weight, bias, block, to)
        refused = refused or x.device != weight.device or x.device != block.device or (
            _after_autocast(x, to) != _after_autocast(weight, to)
            or (bias is not None and _after_autocast(bias, to) != _after_autocast(weight, to)))
    if refused:
        y = torch.ops.miss.linear(x, weight, bias, block, 0.0, None)
        # Not reached: the op raises for each condition above. Its result is used all the same:
        # TorchScript drops a call whose result nobody reads (it takes custom ops for pure), and
        # a scripted layer then drew the key before the op refused (a review, 2026-12-04).
        raise RuntimeError(f"miss_ext: miss::linear accepted an input refused before the dropout draw "
                           f"(output {y.shape}); please report this")


def _saves_an_inference_tensor(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor,
                               to: Optional[torch.dtype] = None) -> bool:
    """True when miss::linear's autograd would save an inference tensor for backward, which torch
    refuses ("Inference tensors cannot be saved for backward") after the dropout key was drawn: a
    base built under torch.inference_mode() trained from an x that requires grad (a review,
    2026-12-07: the refused call moved the global RNG; PEFT's base layer raises before its draw).
    It mirrors what linear_autograd.cpp saves: x when the weight needs a gradient, the weight when
    x does, and the block. Dynamo cannot trace is_inference(), and a traced graph holds no
    inference tensor outside inference mode, so it is not asked there."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or weight.requires_grad or block.requires_grad
            or (bias is not None and bias.requires_grad)):
        return False
    def kept(t: Tensor) -> bool:  # autocast hands the op a fresh (normal) copy of a tensor it casts
        return t.is_inference() and _after_autocast(t, to) == t.dtype
    return (weight.requires_grad and kept(x)) or (x.requires_grad and kept(weight)) or kept(block)


def _checked_shape(t: Tensor) -> tuple:
    """t's shape as ints, for a check that raises or does nothing (no traced value depends on it):
    torch.jit.trace hands out sizes as traced tensors, and comparing them warned "the trace might
    be incorrect" on every trace (a new-user pass, 2026-12-06)."""
    if not torch.jit.is_tracing():
        return tuple(t.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(size) for size in t.shape)


def _after_autocast(t: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """t's dtype once autocast(dtype) has cast it (its cached_cast; None: no autocast): float32,
    float16 and bfloat16 become `dtype`; float64 and non-floating tensors stay as they are, so a
    float64 x beside a float32 weight is refused under autocast too (csrc/ops/autocast/
    linear_autocast.cpp) and must be before the dropout key is drawn (a review, 2026-12-04: the
    RNG moved)."""
    return dtype if dtype is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.dtype


def json_tensor(value, min_bytes: int = 0) -> Tensor:
    """`value` as a uint8 tensor of its JSON text: state that must travel in a state_dict, which
    stays all tensors (safetensors, clone()). Padded with trailing spaces (JSON whitespace, which
    tensor_json and any JSON reader skip) to at least `min_bytes` bytes."""
    text = json.dumps(value).encode()
    return torch.frombuffer(bytearray(text.ljust(min_bytes)), dtype=torch.uint8)


def tensor_json(encoded: Tensor):
    """The value json_tensor encoded; ValueError unless a 1-D uint8 tensor of JSON text."""
    if not (isinstance(encoded, Tensor) and encoded.dtype == torch.uint8 and encoded.dim() == 1):
        raise ValueError("expected a 1-D uint8 tensor of JSON text")
    data = encoded.detach().cpu()
    # Through numpy: tolist() made a Python int per byte (7 ms for a 1024-slot bank's padded slot
    # description, read at every state_dict() and load).
    try:
        raw = data.numpy().tobytes()
    except RuntimeError:  # a torch without numpy
        raw = bytes(data.tolist())
    return json.loads(raw.decode())


def non_finite_summary(t: Tensor) -> str:
    """Where a tensor that holds non-finite values holds them, for a safe_merge refusal: how many,
    and the first one with its index ("NaNs detected" alone named neither, for an inf too)."""
    # A byte per element (nonzero() took 16 per bad one: 4x a float32 weight when all are NaN, as
    # after a diverged training run; the error could have come as an out-of-memory instead).
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count == 0:
        return "no non-finite value"
    flat = int(bad.view(-1).to(torch.uint8).argmax())  # the first one
    first = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))
    return f"{count} non-finite value(s) of {t.numel()}, the first {t[first].item()} at {list(first)}"


def refuse_non_tensor(x: object, layer: nn.Module) -> None:
    """TypeError for an input x that is no tensor: a list, None or a NumPy array (which met
    `x.is_nested` first: "AttributeError: 'list' object has no attribute 'is_nested'", found by
    a new-user pass, 2026-12-04), or the proxies of torch.fx.symbolic_trace, which traces through
    the adapted layers (they are not torch.nn modules, its default leaves) with proxies that their
    Python checks cannot read; the errors it met were misleading (a base "returned a Proxy",
    "hooks" for bat). PEFT's layers cannot be traced either."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(f"{layer._describe()}: torch.fx.symbolic_trace cannot trace through an adapted layer (its "
                        "forward reads tensor metadata and branches on it); make it a leaf of your tracer "
                        "(is_leaf_module), or use torch.export / torch.compile, which trace it")
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer._describe()}: x must be a torch.Tensor, got {type(x).__name__}")


def jagged_forward(x: Tensor, forward: Callable[[Tensor], Tensor], where: str) -> Tensor:
    """`forward` (a layer's forward: a function of each row's last dimension) of a nested tensor x
    of torch's jagged layout (torch.nested, layout=torch.jagged: (B, j, ..., in_features), one
    ragged dimension, not the last), run on x's packed values (rows, ..., in_features) and wrapped
    again with x's offsets and lengths: (B, j, ..., out_features), with x's ragged dimension, so it
    adds to other results computed from x (a residual). Why: PEFT's MiSS forward takes such inputs
    (its reshape, sum and matmul are jagged ops) where in_features % r == 0, and nn.Linear does; the
    miss ops take strided tensors only. TypeError for a nested tensor of the strided layout (PEFT
    fails on it too, with torch's internal error), ValueError when the last dimension is ragged."""
    if x.layout != torch.jagged:
        raise TypeError(f"{where}: a nested tensor of layout {x.layout} is not supported; build it with "
                        "layout=torch.jagged (torch.nested.nested_tensor(..., layout=torch.jagged)), or pad it "
                        "(torch.nested.to_padded_tensor)")
    ragged = x._ragged_idx
    if ragged == x.dim() - 1:
        raise ValueError(f"{where}: the nested tensor's last dimension (the features) is ragged, shape "
                         f"{tuple(x.shape)}; a linear layer needs the same in_features for every row")
    packed = x if ragged == 1 else x.transpose(1, ragged)  # the ragged dimension next to the batch
    y = torch.nested.nested_tensor_from_jagged(
        forward(packed.values()), packed.offsets(), lengths=packed.lengths(),
        # The cached extents, if any: computing them later reads the offsets on the host.
        min_seqlen=getattr(packed, "_maybe_min_seqlen", None), max_seqlen=getattr(packed, "_maybe_max_seqlen", None))
    return y if ragged == 1 else y.transpose(1, ragged)


def refuse_nested(x: Tensor, where: str) -> None:
    """TypeError for a nested tensor (torch.nested) where rows are routed per sequence (a bank, a
    mixed batch): the ids name padded sequences, and a jagged tensor's rows are not laid out so."""
    if x.is_nested:
        raise TypeError(f"{where}: a nested tensor (torch.nested) input cannot be routed per sequence; pad it "
                        "(torch.nested.to_padded_tensor) and give one adapter per padded sequence")


def check_base_output(layer: nn.Module, y: object, x: Tensor) -> None:
    """For a base layer that computes its own output (not the fused op): TypeError unless the base
    of `layer` (MissLinear, MissBankLinear, the accelerated PEFT layer) returned a tensor,
    ValueError unless x has layer.in_features columns and y layer.out_features (check_widths).

    - A tensor: an nn.Linear subclass may return more than its output (MoE routers such as
      PhimoeTopKRouter return (logits, weights, ...), and "all-linear" matches them).
    - The widths: the adapter's fold reads x, and its term is tiled over y's columns, so both
      would take any width, and a base that sees or returns a part of the layer gave a wrong sum
      with no error. torch's own tensor-parallel styles aimed at an adapted layer's base_layer
      (parallelize_module(layer, mesh, {"base_layer": ColwiseParallel()})) do that: the base
      returns this rank's columns (column-wise) or takes this rank's columns of x (row-wise),
      while the block is the whole layer's. miss_ext.tensor_parallel shards the adapter with it."""
    where = layer._describe() if hasattr(layer, "_describe") else type(layer).__name__
    if not isinstance(y, Tensor):
        raise TypeError(f"{where}: its base layer {type(layer.base_layer).__name__} returned a "
                        f"{type(y).__name__}, not a tensor; a MiSS adapter adds its term to a linear layer's "
                        "output, so this layer cannot take one (a router that returns several values, say): leave "
                        "it out of target_modules (exclude_modules)")
    check_widths(layer, x, y)


def check_widths(layer: nn.Module, x: Tensor, y: Optional[Tensor] = None) -> None:
    """ValueError unless x has layer.in_features columns and y (when given) layer.out_features:
    the adapter spans the whole layer (check_base_output says why). Skipped under torch.jit.trace,
    which would record the comparison as a constant (and warn); the sizes are static there."""
    if torch.jit.is_tracing():
        return
    if x.dim() == 0 or x.shape[-1] != layer.in_features or (
            y is not None and (y.dim() == 0 or y.shape[-1] != layer.out_features)):
        where = layer._describe() if hasattr(layer, "_describe") else type(layer).__name__
        remedy = ("shard the adapted layer itself with miss_ext.tensor_parallel's MissColwiseParallel / "
                  "MissRowwiseParallel" if isinstance(layer, MissLinear) else
                  "tensor parallelism takes miss_ext.MissLinear layers only (FSDP2 and DDP take this layer)")
        output = "" if y is None else f" and returned {tuple(y.shape)}"
        raise ValueError(
            f"{where}: its base layer {type(layer.base_layer).__name__} took x of shape {tuple(x.shape)}{output}, "
            f"but the adapter spans the whole layer: in_features={layer.in_features}, "
            f"out_features={layer.out_features}. A base that sees or returns a part of the layer (torch's "
            "ColwiseParallel / RowwiseParallel applied to base_layer after the adapter) would get the whole "
            f"layer's adapter term on its part; {remedy} (README, 'Multi-GPU')")


def load_mismatches(module: nn.Module, state_dict: dict, prefix: str, assign: bool = False) -> List[str]:
    """Why tensors of `module` and its submodules cannot load from `state_dict`, one description
    each, names relative to `prefix`: a saved tensor of another shape ("size mismatch for NAME
    (saved shape) (this layer's: shape)"), a saved value that is no tensor, and (unless `assign`,
    load_state_dict(assign=True)) a saved meta tensor into a real one, which has no values to
    copy. torch would skip such a tensor with an error message and load the others, after this
    layer's own part (a merge record, a bank's slots) had loaded: refused for the whole layer
    instead (an atomicity review, 2026-12-03: a meta base weight left a merged flag on an
    unmerged weight). Skipped, as torch's own per-tensor check still applies to them: submodules
    with a load of their own (quantized base layers, say), which decide themselves what they
    take; modules with load_state_dict pre-hooks that may rewrite keys or tensors
    (rewrites_load_keys; on themselves: their subtree), which torch runs after this check; lazy
    parameters; torch's 0-dim-from-(1,) case."""
    found = []

    def visit(sub: nn.Module, sub_prefix: str) -> None:
        if rewrites_load_keys(sub):  # not FSDP2's resharding hook (a review, 2026-12-06)
            return
        persistent = [(n, b) for n, b in sub._buffers.items() if n not in sub._non_persistent_buffers_set]
        for name, t in [*sub._parameters.items(), *persistent]:
            key = sub_prefix + name
            if t is None or key not in state_dict or nn.parameter.is_lazy(t):
                continue
            saved, where = state_dict[key], f"{sub_prefix[len(prefix):]}{name}"
            if not isinstance(saved, Tensor):
                found.append(f"{where}: the state_dict holds a {type(saved).__name__}, not a tensor")
            elif saved.shape != t.shape and not (t.dim() == 0 and tuple(saved.shape) == (1,)):
                found.append(f"size mismatch for {where} {tuple(saved.shape)} (this layer's: {tuple(t.shape)})")
            elif saved.is_meta and not t.is_meta and not assign:
                found.append(f"{where}: the state_dict's tensor is on the meta device, with no values to copy "
                             "(load_state_dict(assign=True) takes meta tensors)")
        for name, child in sub._modules.items():
            if child is not None and type(child)._load_from_state_dict is nn.Module._load_from_state_dict:
                visit(child, f"{sub_prefix}{name}.")

    visit(module, prefix)
    return found


def rewrites_load_keys(module: nn.Module) -> bool:
    """Whether `module` has load_state_dict pre-hooks that may rewrite the keys under it before they
    load (other code's: transformers' Mamba, Mamba2 and ESM, torch's checkpoint_wrapper), so that a
    model-level load check cannot read those keys in advance. Not miss_ext's own hooks (marked
    `_miss_ext_load_hook`), nor FSDP2's `to_sharded_hook` (registered on each module holding
    sharded parameters at its first forward: it reshards them, the keys untouched; a review,
    2026-12-06, found the bank check off after a forward)."""
    for hook in module._load_state_dict_pre_hooks.values():
        function = getattr(hook, "hook", hook)  # torch wraps a hook that takes the module (_WrappedHook)
        if getattr(function, "_miss_ext_load_hook", False):
            continue
        if (getattr(function, "__name__", None) == "to_sharded_hook"
                and getattr(function, "__module__", "").startswith("torch.distributed.fsdp.")):
            continue
        return True
    return False


def layers_to_check(root: nn.Module, key_prefix: str, wanted: Callable[[nn.Module], bool]) -> Dict[str, nn.Module]:
    """For a model-level load check: {key prefix: module} of the modules under `root` (root's keys
    start with `key_prefix`) that `wanted` selects, under each of their paths, except those under
    a module whose load hooks may rewrite keys (rewrites_load_keys), which keep torch's rule."""
    layers, hooked = {}, []  # key prefixes of hooked modules
    for path, module in root.named_modules(remove_duplicate=False):  # a layer under two paths: both
        module_prefix = f"{key_prefix}{path}." if path else key_prefix
        if rewrites_load_keys(module):
            hooked.append(module_prefix)
        if wanted(module) and not any(map(module_prefix.startswith, hooked)):
            layers[module_prefix] = module
    return layers


def load_refusals(layers: Dict[str, nn.Module], state_dict: dict, assign: bool) -> List[str]:
    """For a model-level load check (all or nothing, run before any module loads): "path: why" for
    each of `layers` ({key prefix: a layer with _load_refusal(state_dict, prefix, assign)}) whose
    keys the dict holds and that refuses its part; [] when all would load."""
    touched = {}  # the layers the dict has keys of: each key's prefixes looked up, longest first
    for key in (state_dict if layers else ()):
        end = key.rfind(".")
        while end > 0 and key[:end + 1] not in layers:
            end = key.rfind(".", 0, end)
        if end > 0:
            touched[key[:end + 1]] = layers[key[:end + 1]]
    return [f"{prefix.rstrip('.')}: {why}" for prefix, layer in touched.items()
            if (why := layer._load_refusal(state_dict, prefix, assign)) is not None]


def refuse_layer_load(module: nn.Module, state_dict: dict, prefix: str, strict: bool, missing_keys: list,
                      error_msgs: list, reason: str) -> None:
    """For a layer's _load_from_state_dict: records why nothing of the layer loads, and makes it so.
    torch loads the children (base_layer) after this method from this same dict (a copy torch
    made, not the caller's), so their keys are deleted from it; the children then list them as
    missing under strict loading, and the layer lists its own tensors here."""
    where = prefix.rstrip(".") or "(root)"
    error_msgs.append(f"{type(module).__name__} {where}: {reason}. Nothing of this layer was loaded (so "
                      "strict loading also lists its keys as missing)")
    for name in [name for name in state_dict if name.startswith(prefix)]:
        del state_dict[name]
    if strict:
        missing_keys.extend(prefix + name for name, t in module._parameters.items() if t is not None)


def _mark_flag_stale(flag: Tensor) -> None:
    """MissLinear's merged flag made invalid (no element), so that neither value is read
    (merge_record)."""
    flag.resize_(0)


def load_merge_record(module: nn.Module, state_dict: dict, prefix: str, key: str, current: list, decode,
                      strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list, load,
                      assign: bool = False, unrecorded: Optional[str] = None, check=list) -> None:
    """The load side of a layer's merge record in its state_dict (MissLinear's "merged",
    AcceleratedMissLinear's "merged_adapters"). A merged layer's state_dict holds W + dW as
    base_layer.weight: without the record, a layer loading it would add dW a second time (PEFT's
    state_dict has no record and does exactly that), and a layer merged before the load would
    skip the adapters of an unmerged weight.

    `current` is the module's merged adapters (a list of names; MissLinear: ["miss_block"] or
    []); `decode(value)` turns the saved record into that form or raises ValueError, and
    `check(names)` raises ValueError for names this module cannot take. A state_dict that
    outlived a merge or unmerge of its layer (merge_record) loads with what its weight holds now
    where that weight is the one state_dict() handed out, and its stale record is refused
    otherwise (`decode` raises). After the load
    the record is the saved one, else [] when the state_dict carries the base weight (an unmerged
    one), else unchanged. `unrecorded` (the accelerated PEFT layer): a base weight without a
    record may also be a merged one, so a merged layer refuses it, with this advice. Refused (an
    error message, and nothing of the module loaded): a bad
    record; a record that changes without base_layer.weight; a tensor of the module that cannot
    load (load_mismatches: another shape, no tensor, a meta tensor unless `assign`: torch would
    skip it and load the others, so the layer would hold one checkpoint's base weight with its
    own block, or the new record on the old weight); a block
    loaded alone into an adapter that stays merged (the merged forward skips the block, so it
    would change nothing). `load()` runs nn.Module's own load; the record's key is then not
    "unexpected". Returns the record after the load, or None if refused."""
    refusal, after = merge_record_refusal(module, state_dict, prefix, key, current, decode, assign, unrecorded, check)
    if refusal is not None:
        refuse_layer_load(module, state_dict, prefix, strict, missing_keys, error_msgs, refusal)
        return None
    load()
    if key in unexpected_keys:
        unexpected_keys.remove(key)
    if assign:  # the state_dict's weight becomes the layer's: its record is this layer's to mark stale
        merge_record.follow(module, state_dict, key, prefix + "base_layer.weight", list(after))
    return after


def merge_record_refusal(module: nn.Module, state_dict: dict, prefix: str, key: str, current: list, decode,
                         assign: bool = False, unrecorded: Optional[str] = None,
                         check=list) -> Tuple[Optional[str], list]:
    """(why the module refuses to load from `state_dict`, or None; its merge record after the
    load): load_merge_record's checks (its arguments), with nothing changed. Also run up front by
    a model that checks all its layers before any loads (AcceleratedMissModel)."""
    weight_key = prefix + "base_layer.weight"
    refusal = None
    after = current
    known = merge_record.loaded_names(state_dict, key, weight_key, decode)
    if known is not None:  # the layer's own state_dict, loaded after a merge or unmerge
        try:
            after = check(known)
        except ValueError as e:
            refusal = f"{key!r} (what the weight beside it holds now, {known}): {e}"
    elif key in state_dict:
        try:
            after = check(decode(state_dict[key]))
        except ValueError as e:
            refusal = f"{key!r}: {e}"
    elif weight_key in state_dict:
        after = []
        if unrecorded is not None and current:
            refusal = (f"the state_dict has base_layer.weight but no {key.rpartition('.')[2]!r} record, and this layer "
                       f"is merged ({list(current)}): {unrecorded}")
    if refusal is None and list(after) != list(current) and weight_key not in state_dict:
        # The record changes: only together with the weight it describes.
        refusal = (f"the record says {list(after)} but the module's is {list(current)}, and the state_dict has no "
                   "base_layer.weight to match it")
    if refusal is None:
        mismatched = load_mismatches(module, state_dict, prefix, assign)
        if mismatched:
            refusal = "; ".join(mismatched)
    def has_block(name: str) -> bool:  # MissLinear's "miss_block", or a PEFT layer's "miss_block.<name>"
        return any(k in state_dict for k in (prefix + name, prefix + "miss_block." + name))

    if refusal is None and known is None and after and weight_key in state_dict:
        # A merged weight loaded without the blocks it was merged from (a state_dict filtered of
        # its blocks, strict=False): the forward matched the source's, but an unmerge then took
        # this layer's own blocks out of the source's W + dW, silently (0.40 off the base weight;
        # a checkpoint-interop hunt, 2026-12-07; plain PEFT too).
        without = [name for name in after if not has_block(name)]
        if without:
            # Decision: also for a merged checkpoint loaded in pieces (shard by shard, strict=False),
            # whose blocks came in an earlier piece: nothing tells those blocks from a model's own
            # (a PEFT model's loaded from another folder). Such a load was refused before in one
            # of the two orders (the block alone into the merged layer); now in both, saying how.
            refusal = (f"the state_dict has a merged base_layer.weight (holding the dW of {list(after)}) but not the "
                       f"block(s) of {without}: an unmerge would take this layer's own blocks out of it; load the "
                       "blocks in the same call as the merged weight (a sharded checkpoint: all its shards in one "
                       "dict), or save unmerged")
    if refusal is None:
        alone = [name for name in after if has_block(name)]
        if alone and weight_key not in state_dict:
            refusal = (f"cannot load the block of merged adapter(s) {alone} alone (the merged weight holds the current "
                       "block's dW, which the loaded block would not replace); unmerge first, or load the merged "
                       "base_layer.weight with it")
    return refusal, after


def written_since(t: Tensor) -> Callable[[], bool]:
    """A function saying whether `t` was written in place since this call, read from its version
    counter (bumped by in-place ops, ours in their ADInplaceOrView kernel, after the op returns).
    An inference tensor has no counter: never, for it."""
    try:
        version = t._version
    except RuntimeError:
        return lambda: False
    return lambda: t._version != version


@contextlib.contextmanager
def record_follows_write(weight: Tensor, recorded: Callable[[], bool], record: Callable[[], None]):
    """Around an in-place write of `weight` (a merge or unmerge) followed by the record of what it
    holds: should the block raise after the write and before the record (an interrupt lands as
    the kernel returns: Ctrl-C during a large merge), `record()` runs as it raises, unless
    `recorded()` says it ran, so that the record says what the weight holds. The write is not
    undone: an unmerge restores a weight only up to rounding. The write is seen through the
    weight's version counter (written_since)."""
    written = written_since(weight)
    try:
        yield
    except BaseException:
        if written() and not recorded():
            record()
        raise


def refuse_meta(what: str, named: Iterable[Tuple[str, Tensor]]) -> None:
    """ValueError naming the tensors on the meta device (a model built under torch.device("meta")
    or init_empty_weights and not materialised): they hold no values to save or export. Without
    it, saving failed inside torch ("Cannot copy out of meta tensor", "item() ... meta")."""
    meta = [name for name, t in named if t.is_meta]
    if meta:
        shown = ", ".join(meta[:4]) + (f" and {len(meta) - 4} more" if len(meta) > 4 else "")
        raise ValueError(f"{what}: {shown} are on the meta device (the model is not materialised), so there are no "
                         "values to write; load the weights first")


def allocate_block(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str) -> Tensor:
    """torch.zeros(shape) for an adapter's block or bank; an allocation that fails (a huge r or
    capacity) is raised with the same type (torch.OutOfMemoryError is a RuntimeError) naming
    `what` and the size asked for, rather than the allocator's message alone."""
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except RuntimeError as exc:
        elements = math.prod(shape)
        raise type(exc)(f"{what}: cannot allocate its {tuple(shape)} {dtype} block ({elements} elements, "
                        f"{elements * dtype.itemsize / 2 ** 30:.3g} GiB) on {device}: {exc}") from exc


def peft_random_init_(block: Tensor, base_layer: nn.Module) -> None:
    """PEFT's random init (init_weights=False, the default mode's (r, out) block) of `block`, in
    place, draw for draw: PEFT's update_layer makes the block with torch.zeros (torch's default
    dtype and device) and draws kaiming-uniform there, then casts it to the base layer's dtype
    (_get_base_layer_device_and_dtype: the weight's, or a `compute_dtype` such as bitsandbytes'
    4-bit layers have; a floating one only) and device, and a half-precision block to float32
    (autocast_adapter_dtype). Drawn in the block's own dtype and device instead, the values
    differed under another default dtype (0.56 for float64, whose draws also consume the generator
    differently) or with a half-precision base (PEFT's values are rounded through it), and a CUDA
    layer drew from the CUDA generator where PEFT draws from the CPU's (a probe, 2026-12-06).
    Departures, each where PEFT has no values to give: a block on the meta device gets no draw (and
    takes nothing from the generator); under a default device of "meta" a real block is drawn on
    its own device (PEFT would leave it on meta, holding nothing); a DTensor block (FSDP2, tensor
    parallelism) gets its shard of the same full draw (every rank draws it; no communication), or,
    on a torch whose distribute_tensor cannot skip communication, a draw of its own."""
    if block.is_meta:
        return
    default = torch.empty(0).device  # torch.set_default_device / a `with torch.device(...)` block
    weight = read_to_describe(base_layer, "weight")
    dtype = getattr(base_layer, "compute_dtype", None) if hasattr(base_layer, "compute_dtype") else (
        weight.dtype if isinstance(weight, Tensor) else None)
    with torch.no_grad():
        draw = torch.zeros(block.shape, device=block.device if default.type == "meta" else default)
        nn.init.kaiming_uniform_(draw, a=math.sqrt(5))
        if isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex):
            draw = draw.to(dtype)
        if is_dtensor(block):
            from torch.distributed.tensor import distribute_tensor

            try:
                draw = distribute_tensor(draw.to(block.device), block.device_mesh, block.placements,
                                         src_data_rank=None)
            except TypeError:  # an older distribute_tensor: it would communicate
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                return
        block.copy_(draw)


def block_merge_problem(block: object, weight: object) -> Optional[str]:
    """Why a miss_block cannot be merged into (unmerged from) `weight`, or None: a block that is no
    floating tensor, on the meta device, or on another device than a weight that is a tensor. The
    op refuses these too, but only when the merge reaches that layer (or adapter): checked first,
    a merge of several layers or adapters changes nothing (an atomicity review, 2026-12-03: earlier
    layers were merged, then unmerged up to a rounding)."""
    if not isinstance(block, Tensor) or not block.is_floating_point():
        what = f"dtype {block.dtype}" if isinstance(block, Tensor) else type_name(block)
        return f"its miss_block is not a floating tensor ({what}); nothing to merge"
    if block.is_meta:
        return "its miss_block is on the meta device (not materialised); load the adapter's values first"
    if isinstance(weight, Tensor) and not weight.is_meta and block.device != weight.device:
        return (f"its miss_block is on {block.device} and its weight on {weight.device}; move the layer to one device "
                "first")
    return None


def autocast_mini_block(block: Tensor, x: Tensor, out_features: int) -> Tensor:
    """The block an unfused adapter term `fold(x) @ block` multiplies: under autocast, a mini block
    (r, mini_r) repeated along out first, PEFT's order, so that the repeat's backward sums G's
    out / mini_r copies in the block's float32 (a (rows, mini_r) product tiled afterwards summed
    them in the autocast dtype: 1.2x PEFT's error in dD under bf16, inf under float16 where PEFT's
    sum is finite). Otherwise (no autocast: the same values either way; default blocks) the block
    itself. Shared by MissLinear's unfused path, the accelerated PEFT layer's own terms and tensor
    parallelism's gathered fold."""
    if (block.dim() == 2 and block.shape[1] != out_features and x.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(x.device.type)):
        return block.repeat(1, out_features // block.shape[1])
    return block


class MissLinear(BaseTensorAttributes, nn.Module):
    """MiSS adapter on a frozen `nn.Linear` (or transformers' Conv1D, default and mini modes):
    y = base(x) + fold(dropout(x)) @ tile(miss_block).

    The base module computes what it computes. For a plain nn.Linear (is_plain_linear: no
    subclass with a computation of its own, no hooks, parametrization or tensor-subclass
    weight) the fused `miss.linear` op computes base and adapter together; for anything else
    (QAT or quantized linears, hooks, parametrizations, FSDP-sharded weights, ...) the layer
    calls `base_layer(x)` itself and adds the adapter term with `miss.fold` and `miss.tile_add`
    (PEFT's precision either way). The choice is made at every call, so hooks added later are
    honoured.

    Args:
        base_layer: the layer to adapt (nn.Linear or a subclass); it is frozen and stays
            reachable as `.base_layer`. Its `in_features` / `out_features` give the shapes.
        r: shard size ("rank"); any r >= 1, also r > in_features (see the warning it gives).
        mode: "default" (miss_block (r, out)), "mini" (miss_block (r, mini_r), tiled along out) or
            "bat" (miss_block (out/r, r, r): W' = W + W_ij B_i + B_i per r x r tile; r must divide
            in_features and out_features).
        mini_r: the mini mode's block width; must divide out_features. Read only in the mini
            mode (PEFT's MissConfig also ignores it elsewhere): not checked in the others.
        dropout: dropout probability of the adapter branch's input, in training only. Ignored
            in bat mode (as PEFT), with a warning.
        init_weights: True gives PEFT's zero init (the adapter starts as an exact identity);
            False gives PEFT's random init (kaiming-uniform, draw for draw as PEFT's default mode; PEFT
            draws none in its mini and bat modes, so there it is this package's), useful in tests.

    miss_block: nn.Parameter of the mode's shape on the base weight's device, float32 for fp16,
    bf16, float8 and quantized bases (PEFT's autocast_adapter_dtype), else the base's dtype.
    `.weight` / `.bias` give the base tensors' dtype, device and shape only (metadata: computing
    with them raises RuntimeError naming the layer); the real tensors are `.base_layer.weight` /
    `.base_layer.bias`.

    Raises (nothing is changed: the base is frozen last): TypeError for a base that cannot take
    an adapter (not an nn.Linear, a LazyLinear before its first forward, a complex or bool
    weight, a DTensor weight sharded over several ranks; bat: anything but a plain nn.Linear as
    is_plain_linear defines it), a non-int r (or mini_r in the mini mode; NumPy integers are
    ints here, as in PEFT), a non-bool init_weights, a dropout that is no real number (a str,
    None, a bool, a tensor); ValueError for r < 1, an unknown mode, mini_r not a positive divisor of
    out_features (mini mode), bat with r not dividing in_features and out_features,
    out_features == 0 (default, bat), a dropout outside [0, 1); the allocator's
    error (RuntimeError, torch.OutOfMemoryError), naming
    the block's size, for a block that cannot be allocated. UserWarning for r > in_features and
    for dropout in bat mode.

    Source: PEFT's peft/tuners/miss/layer.py (MissLinear, MissConfig); docs/miss.md.
    """

    _shared_with: List[str]  # class-level, as TorchScript wants for a list that starts empty

    def __init__(self, base_layer: nn.Linear, r: int, mode: str = "default", mini_r: int = 1,
                 dropout: float = 0.0, init_weights: bool = True) -> None:
        super().__init__()
        why = base_refusal(base_layer, mode)
        if why is not None:
            raise TypeError(why)
        dropout = check_dropout(dropout)
        if not isinstance(init_weights, bool):
            raise TypeError(f"init_weights must be True (zero init) or False (random init), got {init_weights!r}; "
                            "PEFT's init_weights='mini'/'bat' are mode='mini'/'bat' here")
        weight = read_to_describe(base_layer, "weight")  # its dtype and device
        # The module's own sizes: a quantized or sharded weight's shape may be packed or local
        # (a Conv1D's, from its (in, out) weight).
        in_features, out_features = linear_sizes(base_layer)
        r = _check_int("r", r)  # a Python int also when given as a NumPy integer (block_shape's first check)
        shape = block_shape(mode, r, mini_r, in_features, out_features)

        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        # The base weight's (out, in) the block was made for: in_features/out_features are public
        # and others set them (transformers' resize_token_embeddings sets an lm_head's out_features).
        self._made_for = (out_features, in_features)
        self.r = r
        self.mode = mode
        self.mini_r = shape[1] if mode == "mini" else out_features
        self.dropout = float(dropout)
        self.merged = False
        # Paths of other holders of the base's weight/bias (tied weights), set by apply_miss and
        # load_adapter: a merge would change them too, so merge refuses while it is non-empty.
        self._shared_with = []
        # What TorchScript's compiled forward uses (no Python introspection there): set when the
        # module is scripted (__prepare_scriptable__).
        self._script_fused = True
        self.miss_block = nn.Parameter(allocate_block(shape, adapter_dtype(weight.dtype), weight.device,
                                                      f"MissLinear(r={r}, mode={mode!r})"))
        self.init_weights = init_weights  # what reset_parameters() does again
        if not init_weights:
            peft_random_init_(self.miss_block, base_layer)
        if mode == "bat" and dropout > 0.0:
            warnings.warn(f"MiSS dropout={dropout} is ignored in bat mode (as in PEFT)", stacklevel=2)
        if r > in_features:
            warnings.warn(
                f"MiSS r={r} > in_features={in_features}: miss_block rows {in_features}..{r - 1} never "
                f"receive a gradient and are dead weight (supported for adapters saved that way). "
                f"{PEFT_REFUSES_R_ABOVE_IN}",
                stacklevel=2,
            )
        # Last: the user's base layer is frozen only once nothing here can fail (an allocation, a
        # warning turned into an error) (an atomicity review, 2026-12-03).
        base_layer.requires_grad_(False)

    @torch.jit.unused
    def _fused(self, base: nn.Module) -> bool:
        return is_plain_linear(base, global_hooks=self.mode != "bat")

    @torch.jit.unused
    def _autocast_block(self, x: Tensor) -> Tensor:
        """The block the unfused path multiplies (autocast_mini_block). A method of its own so that
        TorchScript, which compiles forward's other branch too, skips it (jit.unused)."""
        return autocast_mini_block(self.miss_block, x, self.out_features)

    @torch.jit.unused
    def _tensor_parallel(self) -> bool:
        # Set by miss_ext.tensor_parallel's styles when they shard this layer (issue 12).
        return "_tp_style" in self.__dict__

    @torch.jit.unused
    def _tp_forward(self, x: Tensor) -> Tensor:
        from .tensor_parallel import tp_forward  # issue 12: the forward of a tensor-parallel layer
        return tp_forward(self, x)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling it: record the path the
        # compiled forward takes (it cannot inspect hooks or classes itself). The compiled forward
        # cannot check the base's size either: a base resized after the adapter was added is
        # refused here (scripted, a mini layer returned 12 columns for out_features 8, silently:
        # a review, 2026-12-06).
        fused = self._fused(self.base_layer)
        if fused:
            self._check_base_shape(self.base_layer.weight)
        self._script_fused = fused
        return self

    def forward(self, x: Tensor) -> Tensor:
        """y = base(x) + fold(dropout(x), r) @ tile(miss_block) (bat: x W'^T + b).

        x (..., in_features) in the base weight's dtype (bat: any floating dtype, as PEFT, which
        computes in W''s dtype; miss.bat_linear takes it); returns (..., out_features) in x's dtype
        (PEFT's precision: the adapter term in the block's dtype, one final rounding). Dropout
        only in training, with a fresh key per call. A merged layer returns base(x). On the fused
        path (a plain nn.Linear base) and in bat mode, ValueError / TypeError name a bad shape or
        dtype (from the miss ops); with any other base (hooks, subclass, parametrization) the base
        runs first and raises its own error for a bad x (torch's RuntimeError for nn.Linear).
        RuntimeError for a bat layer whose base has since gained hooks, a parametrization or a
        non-plain weight; TypeError under torch.fx.symbolic_trace, or for a base that returns no
        tensor."""
        base = self.base_layer
        if self.merged:
            return base(x)
        # The base layer and the block are looked up once: each lookup goes through
        # nn.Module.__getattr__ (0.4-0.7 us), and a decode step's time is the calls' host cost
        # (bench/bench_call_overhead.py).
        block = self.miss_block
        if not torch.jit.is_scripting():
            refuse_non_tensor(x, self)
            if x.is_nested:
                return jagged_forward(x, self.forward, self._describe())
            refuse_forward_tangents(self._describe(), x, block)
            if self.training and self.mode != "bat":
                self._check_live_dropout()
            # Tensor parallelism (miss_ext.tensor_parallel, issue 12): a layer sharded by
            # MissColwiseParallel / MissRowwiseParallel gets a DTensor x and runs the miss op on DTensors.
            if self._tensor_parallel():
                return self._tp_forward(x)
        fused = self._script_fused
        if not torch.jit.is_scripting():
            self._check_block_shape(block)
            fused = self._fused(base)
            if fused:
                self._check_base_shape(base.weight)
        if self.mode == "bat":
            if not fused:
                raise RuntimeError("bat mode needs a plain nn.Linear base, and the base layer now has hooks, a "
                                   "parametrization or a non-plain weight (see MissLinear)")
            return torch.ops.miss.bat_linear(x, base.weight, base.bias, block, None)
        p = self.dropout if self.training else 0.0
        key: Optional[Tensor] = None
        if fused:
            weight, bias = base.weight, base.bias
            if p > 0.0:
                check_before_dropout_key(x, weight, bias, block, self.in_features)
                key = new_dropout_key(x.device)
            return torch.ops.miss.linear(x, weight, bias, block, p, key)
        # The base module computes its own output (its forward, hooks, parametrizations,
        # quantized or sharded weights); the adapter term is added to it. PEFT's precision: the
        # term in the block's dtype, the sum rounded once to x's dtype. The base runs before the
        # key is drawn, so an input it refuses leaves the global RNG as it was.
        y = base(x)
        if not torch.jit.is_scripting():
            check_base_output(self, y, x)
            # A dual tensor inside the base (a weight made dual through functional_call) gives y a
            # tangent, which tile_add's C++ autograd cannot carry: refused here, before the key is
            # drawn, as on the fused path (a review, 2026-12-07: torch's "jvp is not implemented"
            # came after the draw).
            refuse_forward_tangents(self._describe(), y)
        if p > 0.0:
            key = new_dropout_key(x.device)
        if torch.jit.is_scripting():
            # TorchScript cannot ask whether autocast is on for x's device (torch.is_autocast_enabled
            # takes no device there, and is_autocast_cpu_enabled crashed a scripted function under
            # autocast): mini repeats its block always, which without autocast gives the same values
            # and gradients (review, 2026-12-03: a scripted layer's dD was inf under float16 autocast).
            block = self.miss_block
            if self.mode == "mini":
                block = self.miss_block.repeat(1, self.out_features // self.mini_r)
        else:
            block = self._autocast_block(x)
        # r from the block, as the fused op reads it (an edited `self.r` cannot desync the paths).
        term = torch.ops.miss.fold(x, self.miss_block.shape[0], p, key, self.miss_block.dtype) @ block
        if y.dtype != x.dtype:
            y = y.to(torch.promote_types(y.dtype, term.dtype))
        return torch.ops.miss.tile_add(y, term, 1.0, 0.0, None).to(x.dtype)

    @torch.jit.unused
    def shape_problem(self) -> Optional[str]:
        """Why the base weight or the block no longer fit this layer (the ValueError its forward and
        merge raise: _check_base_shape, _check_block_shape), or None; for merge_and_unload's checks
        of every layer before any changes."""
        try:
            self._check_base_shape(weight_out_in(self.base_layer))
            self._check_block_shape(self.miss_block)
        except ValueError as exc:
            return str(exc)
        return None

    @torch.jit.unused
    def _check_block_shape(self, block: Tensor) -> None:
        """ValueError when miss_block is no block of the layer's mode: a block swapped in afterwards
        (layer.miss_block = nn.Parameter(...)) or a mode edited. The ops read the mode from the
        block's shape, so a default layer given a narrower block ran and merged as mini, and a
        mode set to "bat" was merged as default (a review, 2026-12-07); save_adapter refused the
        same layer. A mini block's width divides out_features (mini_r is read from the block, as
        its r is); a default block is out_features wide; a bat block is 3-D."""
        out = self._made_for[0] if "_made_for" in self.__dict__ else self.out_features
        mode = self.mode
        shape = _checked_shape(block)
        if mode == "bat":
            fits = len(shape) == 3
        elif mode == "mini":  # (an empty output, out = 0, takes any mini_r)
            fits = len(shape) == 2 and shape[1] > 0 and out % shape[1] == 0
        else:
            fits = len(shape) == 2 and shape[1] == out
        if not fits:
            raise ValueError(f"{self._describe()}: its miss_block has shape {tuple(block.shape)}, which is no "
                             f"{mode!r} block for out_features={out} (default (r, out), mini (r, mini_r) with mini_r "
                             "dividing out, bat (out // r, r, r)): the block or the mode was changed after the adapter "
                             "was added; give it a block of its mode")

    @torch.jit.unused
    def _check_base_shape(self, weight: Tensor) -> None:
        # A base weight resized after the adapter was added (transformers' resize_token_embeddings
        # re-ties an adapted lm_head to the new embedding) no longer fits the block: the op would
        # read the block's width as a mini_r and name a mode the layer does not have.
        made_for = self.__dict__.get("_made_for")
        if made_for is None:
            return
        shape = _checked_shape(weight)
        if shape != tuple(made_for):
            raise ValueError(f"{self._describe()}: its base layer's weight is now {shape}, but the adapter was "
                             f"made for {made_for} (out_features, in_features): the base was resized or replaced "
                             "after the adapter was added (resize_token_embeddings?). Add the adapter after "
                             "resizing, or restore the base's size")

    def _describe(self) -> str:
        where = self.__dict__.get("_layer_path")
        return f"MissLinear{f' at {where!r}' if where else ''}"

    def _check_mergeable(self, unmerge: bool = False) -> None:
        # A shared (tied) weight: a merge would change the other holders too. An unmerge restores
        # them, so it is allowed (refusing it would leave the user stuck with a merged layer).
        if self._shared_with and not unmerge:
            raise ValueError(shared_weight_message(getattr(self, "_layer_path", "this layer"), self._shared_with))
        check_merge(self.base_layer, unmerge)
        why = block_merge_problem(self.miss_block, self.base_layer.weight)
        if why is not None:
            raise ValueError(f"cannot {'unmerge' if unmerge else 'merge'} MissLinear: {why}")
        # As the forward: a base resized or replaced since the adapter was added (the op would read
        # the block as another mode's and tile it over the new rows: a review, 2026-12-07), or a
        # block that is not the layer's mode.
        why = self.shape_problem()
        if why is not None:
            raise ValueError(why)

    @torch.jit.unused
    def _check_live_dropout(self) -> None:
        """Before any key is drawn (the ops refuse a bad rate after the draw, which moved the
        global RNG on a refused call): the constructor checks dropout, a later assignment not
        (`layer.dropout = "0.1"` met a bare "'>' not supported between str and float": a new-user
        pass, 2026-12-04). TypeError for a rate that is no number, ValueError outside [0, 1].
        Deliberately [0, 1] here against the constructor's [0, 1): a rate of 1 set on a live layer
        is nn.Dropout's range and what the ops take (the whole adapter term is dropped, as in
        PEFT), while building a layer at p=1 is refused as an adapter that could never learn."""
        p = self.dropout
        if not is_rate(p):
            raise TypeError(f"{self._describe()}: dropout must be a float in [0, 1], got {type(p).__name__} {p!r} "
                            "(its dropout attribute)")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{self._describe()}: dropout probability p must be in [0, 1], got p={p} (its dropout)")

    @torch.jit.unused
    def reset_parameters(self) -> None:
        """Initialises miss_block again as the constructor did: zeros (init_weights=True, PEFT's
        zero init: the layer computes its base exactly) or PEFT's random init (kaiming-uniform,
        init_weights=False). Only the block: the base layer is a child module with its own
        reset_parameters. Why: a model built on the meta device (torch.device("meta"), FSDP2's
        usual setup) and materialised with to_empty() is initialised by calling reset_parameters()
        on every module that has one; without it the blocks kept uninitialised memory (logits
        0.33-0.49 off the base: a new-user pass, 2026-12-04; PEFT's layers have the same gap).
        RuntimeError for a merged layer (its weight holds the block's update: unmerge first),
        nothing changed."""
        if self.merged:
            raise RuntimeError(f"{self._describe()}: reset_parameters() on a merged layer would leave the block's "
                               "update in the weight; unmerge() first")
        with torch.no_grad():
            if getattr(self, "init_weights", True):
                self.miss_block.zero_()
            else:
                peft_random_init_(self.miss_block, self.base_layer)

    @torch.jit.unused
    def merge(self, safe_merge: bool = False) -> None:
        """W <- W + dW. With safe_merge, the merged weight is built in a copy and checked first:
        non-finite values raise ValueError and leave the weight untouched.

        Refused with ValueError, the weight untouched (base_layers.merge_refusal): a weight shared
        with another module (tied weights: the merge would change that module too), as recorded
        by apply_miss, load_adapter and merge_and_unload(model) (record_shared_weights: a layer
        cannot see its model, so a MissLinear built by hand on a tied weight merges into it and
        changes the other holder too; merge such a model with miss_ext.merge_and_unload, which
        checks); a block the merge cannot use (not floating, on the meta device or another device
        than the weight); a base that
        does not compute exactly F.linear(x, W, b) (an nn.Linear subclass with its own forward, a
        forward hook), whose merged output would differ from the unmerged one; a parametrized,
        tensor-subclass or non-floating weight, which a merge would write into a temporary; an
        inference tensor (made under torch.inference_mode()) outside inference mode; a
        sparse weight, or one whose elements overlap in memory (expanded, stride 0), which it
        cannot write in place; a
        layer under FSDP2 (fully_shard on it or on a module holding it) or whose weight is sharded
        (tensor parallelism): between forwards its weight is a shard, and after a forward that
        left it unsharded it is FSDP's gathered copy, which the next reshard drops with the merge
        (_distributed.fsdp_managed). A layer already merged: UserWarning, nothing done. Source:
        docs/miss.md, "Merging"; PEFT's MissLinear.merge (its NaN message)."""
        check_flag(safe_merge, "safe_merge", f"{self._describe()}.merge")
        # One at a time across threads, with unmerges and state_dict records (merge_record.MERGE_LOCK):
        # two threads merging at once both passed the check below and added dW twice.
        with merge_record.merging():
            if self.merged:
                warnings.warn("MissLinear is already merged; nothing to do")
                return
            self._check_mergeable()
            weight = weight_out_in(self.base_layer)  # a Conv1D's weight transposed: a view, written through
            noted = merged_block.fingerprint(self.miss_block)  # before the weight changes (its allocation may fail)
            with self._flag_follows_weight(weight, True, noted):
                with torch.no_grad():
                    if safe_merge:
                        merged = torch.ops.miss.merge(weight, self.miss_block)
                        if not torch.isfinite(merged).all():
                            raise ValueError(f"NaNs detected in the merged weights ({non_finite_summary(merged)}). The "
                                             "MiSS adapter seems to be broken; the base weight was left unchanged")
                        weight.copy_(merged)
                    else:
                        torch.ops.miss.merge_(weight, self.miss_block)
                self._set_merged(True, noted)

    @torch.jit.unused
    def unmerge(self) -> None:
        """W <- W - dW (bat: W <- (W - B)(I + B)^-1 per tile, after checking every I + B_i is well
        conditioned; ValueError and an untouched weight otherwise): restores the base weight up to
        rounding. Subtracts the dW of the block as it is now (a block changed while merged leaves
        the weight off by the change: a UserWarning where block_changed_since_merge sees it).
        ValueError, too, where the weight cannot be written (a parametrized, tensor-subclass,
        non-floating, sparse, self-overlapping or meta weight, one that is not a parameter or
        buffer of the base, FSDP2, an inference tensor outside inference mode). Not merged:
        UserWarning, nothing done."""
        with merge_record.merging():  # as merge()
            if not self.merged:
                warnings.warn("MissLinear is not merged; nothing to do")
                return
            self._check_mergeable(unmerge=True)
            if self.block_changed_since_merge():
                warnings.warn(f"{self._describe()}: its miss_block changed after the merge (block_changed_since_merge), so "
                              "this unmerge subtracts the dW of the block as it is now, not the dW the weight holds: the "
                              "base weight is left off by the change (as in PEFT). Unmerge before training or loading "
                              "blocks, or restore the base weight from a copy", stacklevel=2)
            weight = weight_out_in(self.base_layer)
            with self._flag_follows_weight(weight, False):
                with torch.no_grad():
                    torch.ops.miss.merge_(weight, self.miss_block, True)
                self._set_merged(False)

    @torch.jit.unused
    def delta_weight(self) -> Tensor:
        """dW (out, in) = merged weight - weight, in the block's dtype (bat: W B + B per tile); a
        Conv1D base's weight, stored (in, out), changes by its transpose.

        Differentiable with respect to the block. Bat computes W_ij B_i + B_i directly, as PEFT's
        get_delta_weight does, rather than W' - W: W' = W (I + B) + B carries a rounding error of
        the size of W (float32 rounding, more with TF32), which would swamp a small W B. A merged bat layer holds
        W' in place of W: W is first restored from it (the unmerge formula, out of place), so the
        result is W B + B up to that rounding; ValueError as for unmerge where I + B_i is
        ill-conditioned."""
        weight = self.base_layer.weight
        block = self.miss_block
        if self.mode == "bat":
            if self.merged:
                with torch.no_grad():
                    weight = torch.ops.miss.merge(weight, block, True)
            # Row block i of W viewed (in, r): each row is one r-wide segment W_ij[a, :].
            blocks, r = block.shape[0], block.shape[1]
            w3 = weight.to(block.dtype).reshape(blocks, self.in_features, r)
            tiles = torch.bmm(w3, block).view(blocks, r, self.in_features // r, r)
            return (tiles + block.view(blocks, r, 1, r)).reshape(self.out_features, self.in_features)
        zeros = torch.zeros(self.out_features, self.in_features, dtype=block.dtype, device=block.device)
        return torch.ops.miss.merge(zeros, block)

    # The merged flag travels in the state_dict, as a bool tensor under "merged", present only
    # while the layer is merged when state_dict() runs, and marked stale by a later merge or
    # unmerge of the weight beside it (merge_record; load_merge_record says why). Absent from an unmerged layer's
    # state_dict, so unmerged state_dicts and older checkpoints load as before; a module without
    # this key (PEFT's, a plain model) refuses it under strict loading, where it would count dW
    # twice. TorchScript-compiled copies do not run these methods.
    MERGED_KEY = "merged"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + self.MERGED_KEY] = merge_record.new_record(lambda: torch.tensor(True))

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """nn.Module's; a later merge or unmerge then marks its flag stale (merge_record). Under the
        merge lock: a merge from another thread between the flag and follow() went unseen."""
        with merge_record.merging():
            out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            merge_record.follow(self, out, prefix + self.MERGED_KEY, prefix + "base_layer.weight", self._record())
        return out

    def _record(self) -> List[str]:
        return ["miss_block"] if self.merged else []

    def _flag_follows_weight(self, weight: Tensor, merged: bool, block_noted: object = None):
        """Around a merge (merged True) or unmerge that writes `weight` in place, then sets the
        flag (record_follows_write): left as it was after an interrupt between the two, a forward
        added dW twice, or none, silently, and a second merge added it again (a fault-injection
        sweep, 2026-12-06). The flag is set first, should _set_merged's records fail too; they
        are set again even where the flag was (_set_merged repeats harmlessly), as an interrupt
        inside _set_merged left the records of earlier state_dicts unmarked (a review)."""
        def record():
            self.merged = merged
            self._set_merged(merged, block_noted)

        return record_follows_write(weight, lambda: False, record)

    def _set_merged(self, merged: bool, block_noted: object = None) -> None:
        """Sets the merged flag; the flags in state_dicts of this layer that no longer say what the
        weight beside them holds are marked stale (merge_record). A merged layer notes
        `block_noted` (merged_block.fingerprint of the block its weight holds; None: unknown;
        _KEEP_NOTE: what it noted before) for block_changed_since_merge."""
        self.merged = merged
        merge_record.changed(self, getattr(self.base_layer, "weight", None), self._record(), _mark_flag_stale)
        if not merged:
            merged_block.forget(self)
        elif block_noted is not _KEEP_NOTE:
            merged_block.note(self, block_noted)

    @torch.jit.unused
    def block_changed_since_merge(self) -> bool:
        """Whether the miss_block's values changed after the merge (an optimizer step on a zero
        gradient with weight decay or momentum, fused or not, a write by hand, through .data too,
        a new Parameter): then the
        merged weight holds the dW of the block as it was, unmerge() subtracts the dW of the block
        as it is (leaving the weight off by the change) and save_adapter writes the moved block.
        Compared by a fingerprint of the values noted at the merge (miss_ext/merged_block.py; one
        host synchronisation). False where not merged, or unknown: after a cast or a device move of
        the block, in a copy (deepcopy, pickle) of a merged layer, after a load of the weight or the
        block without the other, for a block that cannot be read (fake, a tensor subclass). A cast
        to a lower precision and back counts (it rounded the block). Changes below float64
        reordering of the sums pass unseen (merged_block.py says how small); a block non-finite at
        the merge hides later changes. unmerge() and save_adapter warn where it is True
        (a review, 2026-12-05: save_adapter wrote the moved block beside weights holding the old
        one, reloaded 0.40 off, without a word)."""
        return self.merged and merged_block.changed(self, self.miss_block)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        def decode(flag):
            if isinstance(flag, Tensor) and flag.dtype == torch.bool and flag.numel() == 0:
                raise ValueError(merge_record.STALE)  # emptied by _set_merged (merge_record)
            if not (isinstance(flag, Tensor) and flag.dtype == torch.bool and flag.numel() == 1):
                shape = f" {flag.dtype} of shape {tuple(flag.shape)}" if isinstance(flag, Tensor) else ""
                raise ValueError(f"must be a one-element bool tensor (the merged flag), got {type(flag).__name__}{shape}")
            return ["miss_block"] if bool(flag.item()) else []

        # Under the merge lock, as merge(): a load between another thread's state_dict record and
        # its follow() went unseen, as an unmerge did (a review, 2026-12-07).
        with merge_record.merging():
            after = load_merge_record(
                self, state_dict, prefix, prefix + self.MERGED_KEY, ["miss_block"] if self.merged else [], decode,
                strict, missing_keys, unexpected_keys, error_msgs,
                lambda: super(MissLinear, self)._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                                      missing_keys, unexpected_keys, error_msgs),
                assign=local_metadata.get("assign_to_params_buffers", False))
            if after is not None:
                # The block a merged weight holds: the loaded one where the weight was loaded with it;
                # unknown where the weight came without it; a load of neither keeps the note (so a
                # block moved before it still shows; a review, 2026-12-05).
                weight_in, block_in = prefix + "base_layer.weight" in state_dict, prefix + "miss_block" in state_dict
                if not (weight_in or block_in):
                    noted = _KEEP_NOTE
                elif after and weight_in and block_in:
                    noted = merged_block.fingerprint(self.miss_block)
                else:
                    noted = None  # unknown, or not merged (no fingerprint taken)
                self._set_merged(bool(after), noted)

    def extra_repr(self) -> str:
        text = f"r={self.r}, mode={self.mode!r}"
        if self.mode == "mini":
            text += f", mini_r={self.mini_r}"
        if self.dropout and self.mode != "bat":
            text += f", dropout={self.dropout}"
        return text + (", merged" if self.merged else "")
