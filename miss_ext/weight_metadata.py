"""`.weight` and `.bias` of an adapted layer (MissLinear, MissBankLinear): the base tensor's
dtype, device and shape, and nothing to compute with.

Why: model code reads a linear's weight for two different reasons.
- To describe it: transformers' T5 family (T5, flan-T5, mT5, UMT5, LongT5, Switch, ...) casts its
  hidden states to `self.wo.weight.dtype` before it calls `self.wo`; about 200 such reads of
  `<layer>.weight.dtype` / `.device` exist across transformers' models. Refusing every read (our
  rule until 2026-12-02: AttributeError) made any adapter on those layers, `"all-linear"`
  included, crash at the first forward, where PEFT works.
- To compute with it instead of calling the layer (nn.MultiheadAttention's out_proj, MobileBERT's
  `torch.cat([..., self.dense.weight])`): the adapter would be bypassed, silently. PEFT's layers
  return the base weight there, and are bypassed.
So reads of what describes a tensor are answered, from a tensor subclass that reports the base
tensor's metadata, and anything else done with it (an op, `.data`, indexing, a conversion)
raises RuntimeError naming the layer. The layer's own forward reads `.base_layer.weight`, never this.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

# What only describes a tensor: answered from the metadata.
_DESCRIBING = (
    Tensor.dtype.__get__, Tensor.device.__get__, Tensor.shape.__get__, Tensor.ndim.__get__,
    Tensor.layout.__get__, Tensor.is_cuda.__get__, Tensor.is_meta.__get__, Tensor.requires_grad.__get__,
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.element_size, Tensor.is_floating_point, Tensor.is_complex,
)


_DATA_GET = Tensor.data.__get__


class BaseTensorMetadata(Tensor):
    """What `layer.weight` / `layer.bias` return for an adapted layer: isinstance of Tensor, with
    the base tensor's dtype, device, shape (and size(), dim(), numel(), ...); any other
    use raises RuntimeError naming the layer and how to get the real tensor (layer.base_layer.<name>)
    or the adapted output (call the layer)."""

    @staticmethod
    def __new__(cls, base: Tensor, where: str, name: str, in_place_data: bool = False,
                hint: str = "") -> "BaseTensorMetadata":
        if type(base) in (Tensor, torch.nn.Parameter):
            # An alias of the base's storage (no copy): paths below torch's Python layer that read
            # memory without asking the subclass (torch.utils.dlpack.to_dlpack) then see the
            # base's values, as PEFT's layers give them, instead of a null pointer (a storage-less
            # tensor there made the consumer's first op crash the process).
            meta = Tensor._make_subclass(cls, base.detach(), False)
        else:
            # DTensor and other subclasses: no storage to alias. A DTensor's shape is the global
            # one and its device the rank's, as the DTensor reports them.
            meta = Tensor._make_wrapper_subclass(cls, base.shape, dtype=base.dtype, device=base.device,
                                                 layout=base.layout, requires_grad=False)
        meta._where, meta._name, meta._hint = where, name, hint
        # in_place_data: `.data` gives the base tensor's data (accelerated PEFT layers, whose parents
        # may edit the weight in place and then call the layer: Gemma3n's AltUp clamps
        # prediction_coefs.weight.data in training, as PEFT's layers let it).
        meta._data_of = base if in_place_data else None
        return meta

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _DESCRIBING:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if func == _DATA_GET and isinstance(args[0], BaseTensorMetadata) and args[0]._data_of is not None:
            return args[0]._data_of.data
        raise RuntimeError(_refusal(args, kwargs, _what(func)))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only past __torch_function__ (torch.compile's tracing, say): refused all the same.
        raise RuntimeError(_refusal(args, kwargs, str(func)))

    def __repr__(self) -> str:
        return (f"BaseTensorMetadata(dtype={self.dtype}, device={self.device}, shape={tuple(self.shape)}; "
                f"{self._where}: .{self._name}, the metadata of .base_layer.{self._name}; computing with it is refused)")


def _what(func) -> str:
    """The refused operation as the user wrote it: `.data` for a property's getter (whose __name__
    is "__get__": a Gemma3n user met "__get__ on it was refused", a model-zoo review, 2026-12-05),
    else the function's name."""
    name = getattr(func, "__name__", str(func))
    if name == "__get__" and hasattr(getattr(func, "__self__", None), "__name__"):
        return f".{func.__self__.__name__}"
    return name


def _refusal(args, kwargs, what: str) -> str:
    found = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, BaseTensorMetadata)]
    where, name, hint = ((found[0]._where, found[0]._name, found[0]._hint) if found
                         else ("an adapted layer", "weight", ""))
    return (f"{where}: .{name} gives the base layer's {name} dtype, device and shape only (as code such as "
            f"transformers' T5 reads them); {what} on it was refused, because computing with an adapted layer's "
            f"{name} instead of calling the layer would bypass the adapter. "
            + (hint or f"Where the model's own forward does this (Mamba's dt_proj, Gemma3n's AltUp coefficients), an "
                       f"adapter on this layer cannot run: leave it out of target_modules (with 'all-linear', name it "
                       f"in exclude_modules). Elsewhere call the layer, or read .base_layer.{name} for the frozen "
                       f"base's tensor"))


class _RefusedMethod:
    """`layer.weight` of an adapted layer whose base exposes weight() as a method (torch.ao's
    quantized linears): not a tensor, as the base's is not; calling it raises RuntimeError, as
    computing with BaseTensorMetadata does."""

    def __init__(self, where: str, name: str, kind: str):
        self._where, self._name, self._kind = where, name, kind

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._where}: .{self._name}() of an adapted layer is refused: its base layer's "
                           f"{self._name} is a {self._kind}, and computing with it instead of calling the layer would "
                           f"bypass the adapter. Call the layer, or use .base_layer.{self._name}()")

    def __repr__(self) -> str:
        return f"<refused {self._kind} .{self._name} of {self._where}; call .base_layer.{self._name}()>"


def base_tensor_attribute(base_layer: Optional[torch.nn.Module], where: str, name: str, in_place_data: bool = False,
                          hint: str = "") -> Optional[Tensor]:
    """layer.<name> (weight or bias) of an adapted layer with base `base_layer`: None where the base
    has None (no bias, as nn.Linear reports it), else the base tensor's metadata; a method there
    (torch.ao's quantized linears) gives a stand-in that refuses to be called. AttributeError
    where the base has no such attribute."""
    if base_layer is None or not hasattr(base_layer, name):
        raise AttributeError(f"{where} has no {name!r} (its base layer has none)")
    base = getattr(base_layer, name)
    if base is None:
        return None
    if not isinstance(base, Tensor):
        if callable(base):
            # torch.ao's quantized linears expose weight() / bias() as methods. Model code asks
            # `isinstance(self.wo.weight, torch.Tensor)` before it casts to the weight's dtype
            # (transformers' T5 family), which works on the quantized base and must work here too
            # (an AttributeError made such a T5 crash at its first forward, where PEFT runs).
            # Calling it would hand out the base weight and bypass the adapter: refused.
            return _RefusedMethod(where, name, type(base).__name__)
        raise AttributeError(f"{where} has no {name!r}: its base layer's is a {type(base).__name__}, not a tensor; "
                             f"read .base_layer.{name}")
    if torch.compiler.is_compiling():
        # torch.compile / torch.export cannot trace the tensor subclass's construction (a graph
        # break, and an error under fullgraph=True). A meta tensor of the same shape and dtype
        # answers the reads (T5's cast compiles with fullgraph=True), and an op mixing it with
        # real tensors fails while tracing ("device meta"), so a bypass stays loud; its .device
        # reads meta there.
        return torch.empty(base.shape, dtype=base.dtype, device="meta")
    return BaseTensorMetadata(base, where, name, in_place_data, hint)


def check_base_tensor_assignment(base_layer: Optional[torch.nn.Module], where: str, name: str, value) -> None:
    """`layer.weight = value` on an adapted layer: allowed (as a no-op) only when value already is
    the base layer's tensor, which is what transformers' tie_weights() does to a tied lm_head that
    holds an adapter (the tie holds through the base layer). Anything else raises AttributeError:
    registering it on the adapted layer would do nothing to its forward (which reads the base
    layer's), and replacing the base tensor here would lose a merged adapter's weights."""
    if base_layer is not None and value is getattr(base_layer, name, None):
        return
    raise AttributeError(f"{where}: setting .{name} on an adapted layer is refused (its forward reads "
                         f".base_layer.{name}, and a merged adapter lives in that tensor); set .base_layer.{name} "
                         "on an unmerged layer, or replace the whole layer")


class BaseTensorAttributes:
    """Mixin of the adapted layers that hold a `base_layer` (MissLinear, MissBankLinear; listed
    before nn.Module in their bases): `.weight` / `.bias` read the base tensor's metadata
    (base_tensor_attribute), and assigning them is checked (check_base_tensor_assignment); PEFT's
    unload refuses them by name (unload_and_optionally_merge_module). `_describe()` names the
    layer in the messages."""

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names: Optional[list] = None):
        """Raises TypeError: PEFT cannot unload this layer. PEFT's merge_and_unload() and unload()
        take every module holding a `base_layer` for one of their own layers, and call this method
        of a layer that has it instead of their own steps. On a PeftModel built over a model that
        already holds miss_ext layers (miss_ext.apply_miss or apply_bank, then get_peft_model)
        they used to call this layer's merge with PEFT's arguments, or a get_base_layer() it lacks,
        and fail part way with a TypeError / AttributeError naming "MissLinear", PEFT's own class
        name (a PEFT interop review, 2026-12-06).
        Decision: refuse rather than merge or drop this adapter inside PEFT's call. It is not one of
        PEFT's adapters, and miss_ext.merge_and_unload merges it with its own checks. The
        accelerated PEFT model (miss_ext.peft) checks this before it changes anything; plain PEFT
        reaches it in its loop, after the PEFT layers before this one."""
        if "miss_block" in self._parameters:  # MissLinear
            way_out = ("miss_ext.merge_and_unload(peft_model.get_base_model()) merges the MissLinear layers into "
                       "their weights")
        else:  # MissBankLinear: several adapters, none to merge, and no miss_ext function unloads a bank
            way_out = ("a bank layer has no merge: save its adapters if needed (miss_ext.save_bank_adapter), then "
                       "put each bank layer's base_layer back in its place")
        raise TypeError(f"{self._describe()} is a miss_ext layer (miss_ext.apply_miss / apply_bank), not a PEFT "
                        "layer: PEFT's merge_and_unload() / unload() cannot remove it. Remove miss_ext's layers "
                        f"first, on the model PEFT wraps: {way_out}")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight", "bias"):
                return base_tensor_attribute(self._modules.get("base_layer"), self._describe(), name)
            raise

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias"):  # transformers' tie_weights() does this
            check_base_tensor_assignment(self._modules.get("base_layer"), self._describe(), name, value)
            return
        super().__setattr__(name, value)

    def _describe(self) -> str:
        return type(self).__name__
