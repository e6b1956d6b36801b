"""The merge record in a layer's state_dict follows the weight beside it while that weight is the
layer's own.

A merged layer's state_dict holds W + dW as base_layer.weight and says so in its record
(MissLinear's "merged", the accelerated PEFT layer's "merged_adapters"), present only while some
adapter is merged when state_dict() runs (PEFT's key set otherwise). A state_dict shares its
tensors with the model, as torch's always does: base_layer.weight there views the layer's weight
memory, which a later unmerge or merge rewrites in place. A record written once then described the
weight of then beside the weight of now: a state_dict taken merged and loaded, saved or copied
after an unmerge (trl's merge, gather, unmerge pattern of huggingface/trl#2873, or PEFT's
disable_adapter(), which unmerges) dropped dW, silently (a review replaying public bug reports,
2026-12-05).

So a record tensor state_dict() hands out is rewritten in place (the JSON of merged names resized
to its length) whenever its layer writes the memory that the state_dict's base_layer.weight views:
while that entry is still the tensor state_dict() put there (the layer's parameter with
keep_vars=True), found by identity, and it views the storage, offset and shape the layer writes
(storage objects, not addresses: share_memory_() moves the address, model.to() the storage). A
state_dict copied (clone(), torch.save, deepcopy) at any time then holds a weight and a record that
agree. Loading refuses the one case it cannot tell: a record rewritten since state_dict() beside a
weight that is no longer that tensor (the floating entries copied or cast before a merge or unmerge,
the record kept), which may hold W or W + dW. A record written by someone else (torch.distributed.
checkpoint fills a model's own state_dict in place) is read as written.

Not followed: a state_dict taken while unmerged has no record (PEFT's key set), so one loaded or
copied after a later merge reads its W + dW as unmerged, as PEFT's does; weights without storage
(meta, fake, wrapper subclasses). State is kept outside the modules (weak references), so deepcopy
and pickling of models are unaffected.
"""
import threading
import weakref
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # never fake: is_fake (microseconds) is asked of subclasses only


def _plain_view(t: object) -> Optional[Tensor]:
    """The tensor whose storage `t`'s elements are in (a DTensor's local shard), or None for a
    non-tensor, an empty, meta or fake tensor, or one without real storage (a wrapper subclass)."""
    t = getattr(t, "_local_tensor", t)
    if (not isinstance(t, Tensor) or t.numel() == 0 or t.is_meta
            or (type(t) not in _PLAIN_TENSORS and is_fake(t))):
        return None
    try:
        t.untyped_storage().data_ptr()  # a wrapper subclass's storage raises here ("invalid python storage")
    except (RuntimeError, NotImplementedError):
        return None
    return t


def storage_of(t: object) -> Optional[torch.UntypedStorage]:
    """The storage a tensor views (a sharded one, DTensor, by its local shard; one Python object
    per storage while any tensor on it lives), or None (_plain_view's cases)."""
    t = _plain_view(t)
    return None if t is None else t.untyped_storage()


def memory_of(t: object) -> Optional[Tuple[str, int]]:
    """(device, address) of the memory a tensor views (storage_of), or None."""
    storage = storage_of(t)
    return None if storage is None else (str(storage.device), storage.data_ptr())


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two plain tensors view the same elements of one storage (object identity)."""
    return (a.untyped_storage() is b.untyped_storage() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride())


class _Handed:
    """A record tensor in a state_dict, with the weight entry beside it (weakly), its value when
    handed out (`initial`) and as this module last wrote it (`last`)."""
    __slots__ = ("record", "weight", "initial", "last")

    def __init__(self, record: Tensor, weight: Tensor, names: List[str]):
        self.record, self.weight = weakref.ref(record), weakref.ref(weight)
        self.initial, self.last = list(names), list(names)


_LOCK = threading.Lock()
_FOLLOWED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> [_Handed]
_HANDED = WeakIdKeyDictionary()  # record tensor in a state_dict -> _Handed


def new_record(make: Callable[[List[str]], Tensor], names: List[str]) -> Tensor:
    """For a layer's _save_to_state_dict: the record tensor `make(names)`, made outside inference
    mode (an inference tensor could not be rewritten outside it)."""
    with torch.inference_mode(False):
        return make(names)


def follow(layer: object, state_dict: dict, key: str, weight_key: str, names: List[str]) -> None:
    """For a layer's state_dict(), once its base layer's tensors are in `state_dict` too: the
    record under `key` (if any; it says `names`) is rewritten by changed() while
    `state_dict[weight_key]` views the layer's weight."""
    record, weight = state_dict.get(key), state_dict.get(weight_key)
    if not isinstance(record, Tensor) or torch.compiler.is_compiling() or _plain_view(weight) is None:
        return
    with _LOCK:
        if record in _HANDED:
            return  # a state_dict() into a destination that already held it
        handed = _HANDED[record] = _Handed(record, weight, names)
        alive = [h for h in _FOLLOWED.get(layer, []) if h.record() is not None and h.weight() is not None]
        _FOLLOWED[layer] = alive + [handed]


def changed(layer: object, weight: object, names: List[str], write: Callable[[Tensor, List[str]], None]) -> None:
    """For a layer, after its merge, unmerge or load wrote `weight` (the names merged there now:
    `names`): rewrites the records of its state_dicts whose weight entry views that memory."""
    if torch.compiler.is_compiling():
        return
    written = _plain_view(weight)
    with _LOCK:
        handed_out = _FOLLOWED.get(layer)
        if not handed_out or written is None:
            return
        alive = []
        for handed in handed_out:
            record, beside = handed.record(), _plain_view(handed.weight())
            if record is None or beside is None:
                continue  # the state_dict, or its weight entry, is gone: nothing left to follow
            if handed.last != names and _same_elements(beside, written):
                with torch.no_grad():
                    write(record, list(names))
                handed.last = list(names)
            alive.append(handed)
        _FOLLOWED[layer] = alive


def forget(layer: object) -> None:
    """Stops following `layer`'s state_dicts (its merges will no longer say so:
    miss_ext.peft.restore); their records keep their values."""
    with _LOCK:
        _FOLLOWED.pop(layer, None)


def refusal(state_dict: dict, key: str, weight_key: str, decode: Callable[[Tensor], List[str]]) -> Optional[str]:
    """Why a layer cannot load `state_dict`'s record, or None: a record tensor rewritten since
    state_dict() handed it out, beside a base_layer.weight that is no longer the tensor handed out
    with it (a copy, made before or after the rewrite: nobody can tell which weight it holds)."""
    record = state_dict.get(key)
    with _LOCK:
        handed = _HANDED.get(record) if isinstance(record, Tensor) else None
        if handed is None or handed.last == handed.initial or state_dict.get(weight_key) is handed.weight():
            return None
    try:
        if list(decode(record)) != handed.last:
            return None  # written since by someone else (a checkpoint loaded into the state_dict)
    except ValueError:
        return None  # load_merge_record refuses it by its own check
    return ("its base_layer.weight is no longer the tensor state_dict() put beside this record (a copy or a cast), "
            "and a merge or unmerge rewrote the record since, so it cannot say whether that weight holds W or W + dW; "
            "copy every entry of a state_dict at once (copy.deepcopy, torch.save), or take a new one")
