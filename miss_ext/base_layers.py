"""What an adapter's base layer is: whether calling it is exactly F.linear(x, weight, bias) (so the
fused miss.linear op may replace it and a merge into its weight is exact: is_plain_linear,
linear_class_override), whether it is transformers' Conv1D, its sizes, whether a parent module
reads its tensors instead of calling it, and why an adapter on it (base_refusal) or a merge into
it (merge_refusal) is refused. Shared by MissLinear, the accelerated PEFT layers, banks, tensor
parallelism and the model helpers. The public names (README) are re-exported by miss_ext.modules."""
import contextlib
import functools
import inspect
import io
import os
import re
import textwrap
import tokenize
import weakref
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.modules.module as _module_globals
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn.utils import parametrize

from ._distributed import fsdp_managed, is_dtensor
from .targets import is_conv1d_class

__all__ = ["EXACT_LINEAR_SUBCLASSES", "is_plain_linear", "linear_class_override"]


_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter, FakeTensor, FunctionalTensor)


def _plain_tensor(t: Optional[Tensor]) -> bool:
    """A plain tensor, or the stand-in that tracing puts in its place (torch.export and
    torch.compile swap parameters for fake or functional tensors). A DTensor or a quantized
    tensor subclass is not plain, traced or not."""
    return t is None or type(t) in _PLAIN_TENSOR_TYPES


def type_name(obj: object) -> str:
    """The qualified name of obj's class (of obj itself when it is a class), module.qualname, for
    messages that name a module's or a tensor's type: torch.ao's quantized and dynamic-quantized
    linears, QAT's, and many libraries' classes are all called just "Linear", so the short name
    made "refused: Linear is not an nn.Linear" (found by a review of quantized bases, 2026-12-03).
    Builtins keep their short name ("method", "tuple")."""
    cls = obj if isinstance(obj, type) else type(obj)
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in (None, "builtins") else f"{module}.{name}"


def tensor_problem(t: object, name: str = "weight") -> Optional[str]:
    """Why a base module's `name` (weight or bias) is not a plain tensor, as "its weight is ...",
    or None (also for None): not a tensor at all (torch.ao's quantized linears have a method
    weight() that unpacks a packed weight), or a tensor subclass (torchao's and bitsandbytes'
    quantized weights, DTensor shards). The dtype is the caller's to judge."""
    if t is None or _plain_tensor(t):
        return None
    if not isinstance(t, Tensor):
        hint = (" (torch.ao's quantized linears keep a packed weight and give it from the method weight())"
                if callable(t) else "")
        return f"its {name} is a {type_name(t)}, not a tensor{hint}"
    return (f"its {name} is a {type_name(t)}, a tensor subclass (a quantized or sharded weight), not a plain "
            "tensor")


# Which nn.Linear subclasses count as plain (decided 2026-12-03, after transformers' EsmFoldLinear,
# whose class changes only __init__, was refused for merge as "a subclass with its own forward"
# while PEFT merges it): a subclass computes exactly F.linear(x, weight, bias) when calling it
# runs nn.Linear's own code with the instance's own weight and bias. That holds when every
# attribute through which a class takes part in `module(x)` resolves, along the class's whole MRO
# (mixins after nn.Linear too), to the very object nn.Linear has: forward; nn.Module's call
# machinery (__call__, _wrapped_call_impl, _call_impl, _compiled_call_impl); attribute lookup
# (__getattribute__, __getattr__, which decide what `self.weight` is); `weight` / `bias` as class
# attributes or properties (they would shadow the registered parameters); __torch_function__.
# Whatever else a subclass defines (__init__, reset_parameters, extra_repr, loading hooks) only
# decides the parameters' values, which the checks of the instance (plain floating tensors, no
# parametrization, no hooks) read as they are. Every use of is_plain_linear needs exactly that
# property, so the broader set is right for all of them: the fused miss.linear path and the
# accelerated PEFT layer's fast path replace module(x) with F.linear on the same tensors; bat
# and TP's sharded op compute from weight and bias without calling the module; a merge needs
# module(x; W + dW) == module(x; W) + dW x; MissBankLinear adds in place to a fresh F.linear
# output. FSDP2's fully_shard on the layer itself adds a mixin class but registers forward hooks,
# which keep it non-plain.
_LINEAR_CALL_ATTRIBUTES = ("forward", "__call__", "_wrapped_call_impl", "_call_impl", "_compiled_call_impl",
                           "__getattribute__", "__getattr__", "weight", "bias", "__torch_function__")
_MISSING = object()

# nn.Linear subclasses whose forward is F.linear(x, weight, bias) written out, as read in their
# source, named by module and class so that transformers need not be imported (they must not
# override the other attributes above either). FalconLinear (transformers' Falcon): `x @ weight.T
# (+ bias)`, kept so that its fused kernels can be skipped (PEFT merges into it and runs bat on
# it; refusing both made PEFT's Falcon bat adapters unloadable). Under autocast it adds the bias
# after the bf16 product, where F.linear rounds once: the 1-ulp difference a plain nn.Linear's
# fused path has from PEFT there too. Other subclasses with a forward of their own (QAT,
# quantized, FP8) have their own arithmetic.
EXACT_LINEAR_SUBCLASSES = frozenset({("transformers.models.falcon.modeling_falcon", "FalconLinear")})


def linear_class_override(cls: type) -> Optional[str]:
    """None when calling an instance of `cls` (nn.Linear or a subclass) runs nn.Linear's own
    computation (the comment above _LINEAR_CALL_ATTRIBUTES), else the first attribute that
    differs, as "forward" or "weight (a property)". Not an nn.Linear subclass: "its class"."""
    if cls is nn.Linear:
        return None
    if not issubclass(cls, nn.Linear):
        return "its class"
    exact = (cls.__module__, cls.__qualname__) in EXACT_LINEAR_SUBCLASSES
    for name in _LINEAR_CALL_ATTRIBUTES:
        if name == "forward" and exact:
            continue
        own = getattr(cls, name, _MISSING)
        if own is not getattr(nn.Linear, name, _MISSING):
            return name if callable(own) else f"{name} (a {type_name(own)})"
    return None


def _torch_linear_forward() -> Optional[Callable]:
    """torch's own nn.Linear.forward, or None while it cannot be found. Recognised by its code
    (torch/nn/modules/linear.py), not by __module__ / __qualname__, which a functools.wraps wrapper
    copies: miss_ext imported under such a patch (a profiler, mock.patch) took the wrapper for
    torch's forward, and every nn.Linear stayed non-plain after the patch was removed (a review,
    2026-12-05). Below a wraps wrapper (its __wrapped__) torch's forward is found all the same."""
    try:
        forward = inspect.unwrap(nn.Linear.forward)
    except ValueError:  # a __wrapped__ cycle
        return None
    code = getattr(forward, "__code__", None)
    filename = getattr(code, "co_filename", "").replace("\\", "/")
    if filename.endswith("torch/nn/modules/linear.py") and getattr(forward, "__qualname__", None) == "Linear.forward":
        return forward
    return None  # replaced by a function that hides torch's: found again once it is restored


_TORCH_LINEAR_FORWARD = _torch_linear_forward()


def _forward_is_the_class_own(cls: type) -> bool:
    """False when the class runs nn.Linear's forward and that was replaced at class level
    (nn.Linear.forward = ... by a library, profiler or user code). PEFT calls the base and honours
    such a patch; the fused path would silently skip it (a review found outputs 0.95 off,
    2026-12-02). Like a global hook, it does not concern bat, which never calls the base (as
    PEFT's bat). (Identity tests only: torch.compile traces them to constants.)"""
    global _TORCH_LINEAR_FORWARD
    if _TORCH_LINEAR_FORWARD is None and not torch.compiler.is_compiling():
        _TORCH_LINEAR_FORWARD = _torch_linear_forward()  # miss_ext was imported under a patch
    return cls.forward is _TORCH_LINEAR_FORWARD or cls.forward is not nn.Linear.forward


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
                or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks)


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _own_forward(module: nn.Module) -> bool:
    """Whether `module` carries a forward of its own (an instance attribute: a lambda, a wrapper, a
    bound method). `module.forward` is read first so that torch.compile guards the lookup: it
    does not guard a `vars(module)` test alone, so a forward set after compiling was ignored,
    silently (the fused op kept replacing the base's call: outputs 3.25 off; a compile review,
    2026-12-06). The decision stays on `vars`: Dynamo answers `forward.__func__` and
    `forward.__self__` with other objects than eager's."""
    module.forward  # noqa: B018 (read for torch.compile's guard)
    return "forward" in vars(module)


def _parametrized(module: nn.Module) -> bool:
    """parametrize.is_parametrized(module), answered without its getattr where the module has no
    `parametrizations` anywhere: that getattr raises and catches nn.Module's AttributeError, 0.9 us
    of is_plain_linear's 3 us, which every adapted layer's forward pays (the call's host cost
    decides a decode step: bench/bench_call_overhead.py)."""
    own = vars(module)
    if "parametrizations" not in own["_modules"] and "parametrizations" not in own \
            and not hasattr(type(module), "parametrizations"):
        return False
    return parametrize.is_parametrized(module)


@contextlib.contextmanager
def parametrizations_in_eval(module: nn.Module):
    """Within it, every parametrization under `module` (torch.nn.utils.parametrize) is in eval
    mode; each one's own mode is restored at exit, also on error. Adding an adapter reads a base
    weight to describe it (dtype, device, shape) four to seven times, and each read of a
    spectral_norm weight in training mode ran one power-iteration step on the user's `_u`/`_v`
    buffers: a zero (identity) adapter then changed the layer's output (3e-4 in float64; a
    review, 2026-12-07). PEFT's get_peft_model reads it nine times; we keep the user's state
    instead. In eval mode torch's parametrizations compute the same weight without updating it."""
    held = [(m, m.training) for plist in module.modules()
            if isinstance(plist, parametrize.ParametrizationList) for m in plist.modules()]
    for m, _ in held:
        m.training = False
    try:
        yield
    finally:
        for m, training in held:
            m.training = training


def read_to_describe(module: nn.Module, name: str = "weight") -> object:
    """getattr(module, name, None), read to learn the tensor's dtype, device or shape: a
    parametrized one is computed with its parametrizations in eval mode, which leaves their state
    alone (parametrizations_in_eval)."""
    if not _parametrized(module):
        return getattr(module, name, None)
    with parametrizations_in_eval(module):
        return getattr(module, name, None)


def _tensor_attribute(module: nn.Module, name: str) -> Optional[Tensor]:
    """module.<name> (its weight or bias), from its parameters when it is one, skipping
    nn.Module.__getattr__ (0.4 us a lookup); anything else (a buffer, a plain attribute, a
    property of a subclass) by getattr, as before."""
    own = vars(module)
    params = own["_parameters"]
    # An instance attribute of the same name shadows the parameter for module.<name> (and F.linear).
    return params[name] if name in params and name not in own else getattr(module, name)


def is_plain_linear(module: nn.Module, global_hooks: bool = True) -> bool:
    """True when calling `module(x)` is exactly F.linear(x, module.weight, module.bias): an
    instance of nn.Linear or of a subclass that leaves nn.Linear's computation alone (only its
    __init__, reset_parameters and the like differ, as transformers' EsmFoldLinear; or its forward
    is known to be F.linear written out, EXACT_LINEAR_SUBCLASSES; linear_class_override says what
    is checked and why), no per-instance forward, no hooks of its own or (with global_hooks)
    global ones (forward, pre-forward, backward) or a forward replaced at class level, no
    parametrization, and weight and bias that are plain tensors (not DTensors or quantized tensor
    subclasses) in a floating dtype. Subclasses with a forward of their own (QAT, quantized,
    FP8 linears) and parametrized linears are not plain.

    Only then may the fused miss.linear kernel replace the module's own forward; otherwise the
    adapter runs the module and adds its term to the output (MissLinear.forward). Bat never runs
    the base module (as PEFT's bat), so global hooks (profilers, FlopCounterMode) do not concern
    it: it asks with global_hooks=False. not_plain_reason says in words why a module is not."""
    cls = type(module)
    return ((cls is nn.Linear or linear_class_override(cls) is None)
            and not _own_forward(module)
            and not _own_hooks(module)
            and not (global_hooks and (_global_hooks() or not _forward_is_the_class_own(cls)))
            and not _parametrized(module)
            and _plain_weight_and_bias(module))


def _plain_weight_and_bias(module: nn.Module) -> bool:
    weight = _tensor_attribute(module, "weight")
    return _plain_tensor(weight) and _plain_tensor(_tensor_attribute(module, "bias")) and weight.is_floating_point()


def is_conv1d(module: object) -> bool:
    """Whether `module` is transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc; OpenAI GPT, ...),
    the class itself, not a subclass: a linear layer whose weight is stored transposed, (in, out),
    computing x @ W + b (torch.addmm). MiSS adapts it as the linear it is (the spec counts PEFT's
    refusal of it among the PEFT limitations not to copy). Found by name, so that transformers is
    not imported. A parametrized Conv1D (torch.nn.utils.parametrize swaps its class for a
    ParametrizedConv1D subclass) is one still: its weight stays (in, out). Read by its class alone,
    a Conv1D parametrized after its merge was unmerged with its weight untransposed (a review,
    2026-12-05: a square layer's weight silently 0.67 off)."""
    return _conv1d_class(module) and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2


def _conv1d_class(module: object) -> bool:
    """Whether `module`'s own class, under the classes torch puts over it, is transformers' Conv1D."""
    return is_conv1d_class(_class_under_torch_wrappers(type(module)))


def _class_under_torch_wrappers(cls: type) -> type:
    """`cls` without the subclasses torch makes on the fly around a module's class, which keep its
    computation: parametrize's `Parametrized<cls>` and FSDP2's `FSDP<cls>` (`fully_shard`, with its
    `FSDPModule` mixin), in either order. A Conv1D sharded by fully_shard before apply_miss was
    refused as an unknown `FSDPConv1D` where an nn.Linear was adapted (a review, 2026-12-05), and
    parametrize's own `type_before_parametrizations` answers `FSDPModule` for a parametrized
    module sharded after."""
    for candidate in cls.__mro__:
        module = candidate.__module__
        fsdp2 = module.startswith("torch.distributed.fsdp") and candidate.__name__.startswith("FSDP")
        if module != "torch.nn.utils.parametrize" and not fsdp2:
            return candidate
    return cls


def is_plain_conv1d(module: nn.Module) -> bool:
    """is_plain_linear's test for a Conv1D: calling it is exactly x @ W + b (transformers' own
    Conv1D.forward, no per-instance forward, hooks of its own or global ones, parametrization,
    plain floating tensors), so that a merge into W leaves its output what the unmerged layer
    computed."""
    return (is_conv1d(module) and _conv1d_forward_is_transformers(type(module)) and not _own_forward(module)
            and not _own_hooks(module) and not _global_hooks() and not _parametrized(module)
            and _plain_weight_and_bias(module))


def _conv1d_forward_is_transformers(cls: type) -> bool:
    """Whether Conv1D.forward is still the one transformers defines (its code lives in
    transformers/pytorch_utils.py): one replaced at class level (a library's or a profiler's patch,
    a functools.wraps wrapper) computes something else, and a merge accepted there counted the term
    twice (a review, 2026-12-05: merged outputs 1.7 off), as _forward_is_the_class_own guards
    nn.Linear's."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return (code is not None and code.co_name == "forward"
            and os.path.normpath(code.co_filename).endswith(os.path.join("transformers", "pytorch_utils.py")))


def linear_sizes(base: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of an adapted base: nn.Linear's attributes (its weight may be
    packed or sharded), or a Conv1D's weight shape (in, out)."""
    if is_conv1d(base):
        return int(base.weight.shape[0]), int(base.weight.shape[1])
    return base.in_features, base.out_features


def weight_out_in(base: nn.Module) -> Tensor:
    """The base weight as the (out, in) matrix the miss ops merge into: nn.Linear's weight, or a
    view of a Conv1D's transposed one (in place merges write through it)."""
    return base.weight.t() if is_conv1d(base) else base.weight


def not_plain_reason(module: nn.Module, global_hooks: bool = True) -> Optional[str]:
    """Why is_plain_linear(module, global_hooks) is False, in words for an error message ("its class
    a.B overrides forward", "its weight is a ..."), or None when it is True."""
    if is_plain_linear(module, global_hooks):
        return None
    cls = type(module)
    override = linear_class_override(cls)
    if override == "its class":
        return f"it is a {type_name(cls)}, not an nn.Linear"
    if override is not None:
        return f"its class {type_name(cls)} overrides nn.Linear's {override}"
    if _own_forward(module):
        return "it has a forward of its own (an instance attribute)"
    if _own_hooks(module):
        return "it has forward or backward hooks"
    if global_hooks and _global_hooks():
        return "global module forward or backward hooks are registered"
    if global_hooks and not _forward_is_the_class_own(cls):
        return "nn.Linear.forward was replaced at class level"
    if parametrize.is_parametrized(module):
        return "it is parametrized (torch.nn.utils.parametrize)"
    for name in ("weight", "bias"):
        why = tensor_problem(getattr(module, name), name)
        if why is not None:
            return why
    return f"its weight has dtype {module.weight.dtype} (quantized or not real floating)"


def check_merge(module: nn.Module, unmerge: bool = False, quantized: bool = False) -> None:
    """ValueError with merge_refusal's reason when an adapter cannot be merged into (unmerged from)
    `module`; shared by MissLinear and the accelerated PEFT layer."""
    why = merge_refusal(module, unmerge, quantized)
    if why is not None:
        raise ValueError(f"cannot {'unmerge from' if unmerge else 'merge into'} {type_name(module)}: {why}")


# Modules that read a child linear's .weight/.bias themselves instead of calling it: an adapter
# on such a child would never run (PEFT's layer exposes the base weight there and is bypassed).
WEIGHT_READING_PARENTS = (nn.MultiheadAttention,)
# Modules with an inference fast path that reads a child linear's .weight/.bias instead of calling
# it, taken only when every such tensor is a plain tensor (nn.TransformerEncoderLayer; its slow
# path calls the children). An adapted layer's .weight metadata (a tensor subclass) turns it off.
FAST_PATH_PARENTS = (nn.TransformerEncoderLayer,)


def parent_reads_child_tensors(parent: nn.Module, child: str) -> bool:
    """Whether the code of `parent`'s class (its own and its bases', torch.nn.Module's excepted)
    mentions `self.<child>.weight` or `self.<child>.bias`, or hands `self.<child>` on as a value (a
    call argument, an element, or bound to a name: LayoutLMv3's encoder passes its rel_pos_bias
    layers to a method that indexes their weight): a parent that reads its child's tensors itself,
    to describe them (T5's `self.wo.weight.dtype`) or to compute with them instead of calling the
    child (MobileBERT's LM head, WavLM's and nn.MultiheadAttention's attention, Mamba's dt_proj).
    False where no source is available (a class defined in C or at run time)."""
    return any(pattern.search(source) for source in _class_sources(type(parent)) for pattern in _child_patterns(child))


@functools.lru_cache(maxsize=None)
def _child_patterns(child: str) -> Tuple["re.Pattern[str]", ...]:
    name = re.escape(child)
    return (re.compile(rf"\bself\.{name}\.(weight|bias)\b"),
            re.compile(rf"\bself\.{name}\s*[,)\]}}]"),                        # an argument or element
            re.compile(rf"(?<![=!<>])=\s*self\.{name}[ \t]*(#.*)?$", re.MULTILINE))  # bound to a name


def ancestor_reads_layer_tensors(ancestors: Sequence[nn.Module], path: str) -> bool:
    """Whether the code of an ancestor above the parent (`ancestors`: the modules holding the
    layer at `path`, outermost first, its parent excluded) names `<outer>.<name>.weight` or `.bias`,
    <outer>.<name> being the layer's last two attribute names along `path` (any name for <outer>
    where the parent is a list's element: `for block in self.blocks: block.output.weight`): code
    that reaches a grandchild's tensors (RwkvModel rescales block.attention.output.weight and
    block.feed_forward.value.weight in place on entering eval, which an adapter's term does not
    follow). Code elsewhere (utilities, other objects) is not seen."""
    parts = path.split(".")
    if len(parts) < 2:
        return False
    outer = r"\w+" if parts[-2].isdigit() else re.escape(parts[-2])
    return any(_names_grandchild_tensors(type(a), outer, parts[-1]) for a in ancestors)


# Caches keyed by class, weakly: a class defined again and again (a notebook cell re-run) is
# freed with its last instance (an lru_cache kept every one alive; a review, 2026-12-05).
_GRANDCHILD_TENSORS: "weakref.WeakKeyDictionary[type, dict]" = weakref.WeakKeyDictionary()
_CLASS_SOURCES: "weakref.WeakKeyDictionary[type, Tuple[str, ...]]" = weakref.WeakKeyDictionary()


def _names_grandchild_tensors(cls: type, outer: str, name: str) -> bool:
    known = _GRANDCHILD_TENSORS.setdefault(cls, {})
    if (outer, name) not in known:
        pattern = re.compile(rf"\b{outer}\.{re.escape(name)}\.(weight|bias)\b")
        known[(outer, name)] = any(pattern.search(source) for source in _class_sources(cls))
    return known[(outer, name)]


# Classes whose code is the frameworks' own, not a model's: their sources are long (reading
# transformers' PreTrainedModel and GenerationMixin, PEFT's PeftModel and BaseTuner took 1.4-2.3 s
# on the first accelerate of a process) and they do not compute with a model's layers' weights.
_FRAMEWORK_MODULES = ("torch.", "peft.", "accelerate.", "transformers.modeling_utils", "transformers.generation.",
                      "transformers.integrations.", "transformers.utils.")


def _class_sources(cls: type) -> Tuple[str, ...]:
    """The code of `cls` and its bases (without comments and string literals: docstrings name
    tensors in examples), but nn.Module's, object's and the frameworks' (_FRAMEWORK_MODULES)."""
    if cls in _CLASS_SOURCES:
        return _CLASS_SOURCES[cls]
    _CLASS_SOURCES[cls] = _read_class_sources(cls)
    return _CLASS_SOURCES[cls]


def _read_class_sources(cls: type) -> Tuple[str, ...]:
    sources = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith(_FRAMEWORK_MODULES):
            continue
        try:
            sources.append(_code_only(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source file (C, run-time definitions, a zipped module)
            pass
    return tuple(sources)


def _code_only(source: str) -> str:
    """`source` without its comments and string literals (f-strings' text too on Python 3.12+)."""
    dropped = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline)
                  if t.type not in dropped]
        return tokenize.untokenize(tokens)
    except (tokenize.TokenError, IndentationError, SyntaxError, ValueError):
        return source


def base_refusal(base: nn.Module, mode: str, parent: Optional[nn.Module] = None) -> Optional[str]:
    """Why `base` cannot take a MissLinear of `mode`, or None: the constructor's checks, so that
    apply_miss and load_adapter can run them for every layer before changing anything. `parent`
    (the module holding `base`, when known) is checked for reading the weight directly."""
    conv1d = is_conv1d(base)
    if not isinstance(base, nn.Linear) and not conv1d:
        weight = getattr(base, "weight", None)
        if _conv1d_class(base):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            return f"a transformers Conv1D's weight must be a 2-D (in_features, out_features) tensor, got {shape}"
        return f"MissLinear adapts nn.Linear layers (and transformers' Conv1D), got {type_name(base)}"
    if conv1d and mode == "bat":
        return ("bat mode builds W' = W + W_ij B_i + B_i from an nn.Linear's (out, in) weight and computes x W'^T "
                "itself; transformers' Conv1D (weight stored (in, out)) takes the default and mini modes")
    if any(nn.parameter.is_lazy(t) for t in (read_to_describe(base, "weight"), read_to_describe(base, "bias"))
           if t is not None):
        # nn.LazyLinear before its first forward: in_features is 0 until then, and its parameters
        # refuse every op (the freeze, the shared-weight checks) with torch's generic message.
        return (f"its parameters are not materialised yet ({type(base).__name__} before its first forward: in_features "
                "is unknown); run the model once on a dummy batch first")
    if isinstance(parent, WEIGHT_READING_PARENTS):
        return (f"its parent {type(parent).__name__} reads the layer's weight directly instead of calling it, so an "
                "adapter there would never run")
    weight = read_to_describe(base, "weight")
    if isinstance(weight, Tensor) and (weight.is_complex() or weight.dtype == torch.bool):
        # (Integer weights are quantized ones: their module computes its own output.)
        return f"its weight has dtype {weight.dtype}; MiSS computes in real floating dtypes"
    if is_dtensor(weight) and weight.device_mesh.size() > 1:
        # A one-rank mesh holds the whole weight: nothing to get wrong (and it is how FSDP2 runs
        # in one process).
        return (f"its weight is a DTensor sharded over {weight.device_mesh.size()} ranks: the layer was sharded "
                "(tensor parallelism, or FSDP2's fully_shard) before the adapter was added. Under tensor parallelism "
                "the adapter would see the rank's local x or output beside the whole block; under FSDP2 its block "
                "would be a plain parameter that FSDP neither shards nor reduces, so each rank would train its own "
                "copy. Add MiSS first, then shard (docs/multi_gpu.md; tensor parallelism: MissColwiseParallel / "
                "MissRowwiseParallel)")
    if mode == "bat" and not is_plain_linear(base, global_hooks=False):
        return (f"bat mode builds W' = W + W_ij B_i + B_i from the weight and computes x W'^T itself, so it needs a "
                f"plain nn.Linear base (no subclass forward, hooks, parametrization or quantized/sharded weight); got "
                f"{type_name(base)}, and {not_plain_reason(base, global_hooks=False)}. Use the default or mini mode, "
                "which add their term to the base module's own output")
    return None


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of the strided tensor t share memory. torch's own test for in-place
    writes (torch._debug_has_internal_overlap: 1 = yes, 0 = no) first; where it answers 2, too hard
    to tell (strides that interleave: shape (8, 3) with strides (2, 3) overlaps, (4, 3) with (3, 4)
    does not), which torch's in-place ops let through and which made miss.merge_ write a wrong
    weight silently, the elements' offsets are counted (a rare layout; numel int64s). A
    contiguous tensor (every weight but a view's) is answered first, without torch's test, which
    torch.compile cannot trace (a compiled forward of a merged PEFT model under disable_adapter()
    unmerges: fullgraph=True failed there; a compile review, 2026-12-06)."""
    if t.is_contiguous():
        return False
    has_overlap = getattr(torch, "_debug_has_internal_overlap", None)
    verdict = has_overlap(t) if has_overlap is not None else 2
    if verdict != 2:
        return verdict == 1
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        return True
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    offsets = offsets.flatten()
    return offsets.unique().numel() != offsets.numel()


def merge_refusal(module: nn.Module, unmerge: bool = False, quantized: bool = False) -> Optional[str]:
    """Why an adapter cannot be merged into `module` (unmerged from it, with `unmerge`), or None.

    The weight must be a plain floating tensor that the module reads as is (not parametrized,
    not a DTensor or other tensor subclass, not quantized), or a merge would write into a
    temporary or a shard; and one the merge can write in place: dense and strided (not sparse),
    its elements not overlapping in memory (not an expanded, stride-0 tensor). A merge also needs
    the module to compute exactly F.linear(x, W, b) (is_plain_linear): through a subclass's
    forward (fake quantisation, ...) or a hook, the merged layer's output base(x; W + dW) would
    differ from the unmerged base(x; W) + dW x. An unmerge only needs the weight condition (it
    restores the weight the base had). A `quantized` base (PEFT's quantization backends, whose
    own merge code dequantizes and requantizes) is only checked for FSDP2."""
    if fsdp_managed(module):
        return ("FSDP2 (fully_shard on it or on a module holding it) manages its weight, which is then a shard or "
                "FSDP's gathered copy that the next reshard drops: a merge would be lost or partial. Keep the adapter "
                "unmerged, or merge in a copy of the model loaded without FSDP (e.g. from save_adapter's folder)")
    if quantized:
        return None
    if parametrize.is_parametrized(module, "weight"):
        return ("its weight is parametrized (torch.nn.utils.parametrize), so the merged value would have to go "
                "through the parametrization's inverse; remove it first with "
                "parametrize.remove_parametrizations(layer.base_layer, 'weight') or keep the adapter unmerged")
    weight = getattr(module, "weight", None)
    why = tensor_problem(weight) if weight is not None else "it has no weight tensor"
    if why is not None:
        return (f"{why}, so it cannot be updated in place; keep the adapter unmerged, or gather/dequantize the "
                "weight into a plain nn.Linear first")
    if weight.layout != torch.strided:
        # A sparse weight reached the op, which has no kernel for it (torch's NotImplementedError).
        return (f"its weight has layout {weight.layout}, not a dense strided tensor, so the merge cannot write into "
                "it in place; keep the adapter unmerged, or make the weight dense first (layer.weight = "
                "nn.Parameter(layer.weight.to_dense()))")
    if not weight.is_floating_point():
        kind = "not a real floating dtype" if weight.is_complex() or weight.dtype == torch.bool else "quantized"
        return f"its weight has dtype {weight.dtype} ({kind}): keep the adapter unmerged"
    if not torch.compiler.is_compiling() and weight.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses an in-place write to an inference tensor outside inference mode, but a
        # copy_ (safe_merge's) only after it wrote: the layer then held W + dW, marked unmerged,
        # and every forward added the term twice (a review, 2026-12-07). Not while compiling:
        # Dynamo cannot trace is_inference() (PEFT's forward unmerges under disable_adapter(),
        # inside a compiled forward); the unmerge there is the in-place op, whose own check
        # refuses an inference tensor before it writes.
        return (f"its weight is an inference tensor (made under torch.inference_mode()), which torch lets nothing "
                f"write in place outside inference mode; {'unmerge' if unmerge else 'merge'} under "
                "torch.inference_mode(), or build or load the model outside it")
    if not any(registry.get("weight") is weight for registry in (module._parameters, module._buffers)):
        override = linear_class_override(type(module)) if isinstance(module, nn.Linear) else None
        if override is not None and override.split()[0] in ("weight", "__getattr__", "__getattribute__"):
            return (f"its class {type_name(module)} overrides nn.Linear's {override}, so its .weight is not the "
                    "tensor the module registers and a write into it would be lost")
        # torch.nn.utils.prune and the hook-based weight_norm / spectral_norm keep the values in
        # other tensors (weight_orig, weight_g / weight_v) and recompute .weight before every
        # forward: a write into it (a merge or an unmerge) would be lost at the next call, and the
        # layer's merged flag would then be wrong (dW counted twice or dropped).
        return ("its weight is not a registered parameter or buffer of the module but a tensor recomputed from "
                "others before every forward (torch.nn.utils.prune, the hook-based torch.nn.utils.weight_norm / "
                "spectral_norm), so a write into it would be lost; make it a parameter again first "
                "(prune.remove(layer, 'weight'), torch.nn.utils.remove_weight_norm / remove_spectral_norm)")
    if weight.is_meta:
        return ("its weight is on the meta device (the model is not materialised: init_empty_weights, "
                "torch.device('meta')), so there is no value to merge into; load the weights first")
    if _overlaps_itself(weight):
        # An expanded (stride-0) weight holds one stored value for several entries: the in-place
        # write reached the op and failed in torch ("more than one element of the written-to
        # tensor refers to a single memory location"), or, for interleaving strides that torch's
        # quick test cannot judge, wrote a wrong weight silently.
        return ("its weight's elements overlap in memory (an expanded, stride-0 tensor, say: several entries are one "
                f"stored value; strides {tuple(weight.stride())} for shape {tuple(weight.shape)}), so a merge cannot "
                "give each entry its own value in place; keep the adapter unmerged, or give the layer a weight of its "
                "own first (layer.weight = nn.Parameter(layer.weight.contiguous()))")
    if not unmerge and is_conv1d(module):
        if not is_plain_conv1d(module):
            return ("it does not compute exactly x @ weight + bias (a Conv1D with hooks, a forward of its own or a "
                    "parametrization), so the merged output would differ from the unmerged one; keep the adapter "
                    "unmerged, or remove the hooks first")
        return None
    if not unmerge and not is_plain_linear(module):
        return (f"it does not compute exactly F.linear(x, weight, bias): {not_plain_reason(module)} (QAT and quantized "
                "linears have a forward of their own; a subclass that changes only __init__ or reset_parameters is "
                "plain), so the merged output would differ from the unmerged one; keep the adapter unmerged, or "
                "remove the hooks / convert the module to a plain nn.Linear first")
    return None
