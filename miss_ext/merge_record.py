"""A merge record in a state_dict that outlives a merge or unmerge of its layer.

A merged layer's state_dict holds W + dW as base_layer.weight and says so in its record
(MissLinear's "merged", the accelerated PEFT layer's "merged_adapters"), present only while some
adapter is merged when state_dict() runs (PEFT's key set otherwise). A state_dict shares its
tensors with the model, as torch's always does: base_layer.weight there views the layer's weight
memory, which a later unmerge or merge rewrites in place, while the record said what state_dict()
saw. Loaded, saved or copied after such a change, the two disagreed: a state_dict taken merged and
loaded after an unmerge (trl's merge, gather, unmerge pattern of huggingface/trl#2873, or PEFT's
disable_adapter(), which unmerges) dropped dW, silently (a review replaying public bug reports,
2026-12-05).

No value written into the record can serve every later use: rewritten to follow the weight, it
became wrong in copies that took the weights before the change and the record by reference (a
GPU model's {k: v.cpu()}, a cast of the floating entries), once saved (a second review). So:

- The layer marks the record stale (an invalid value: an empty flag, a JSON number) when it writes
  the memory that the state_dict's base_layer.weight entry views, while that entry is still the
  tensor state_dict() put there (the parameter itself with keep_vars=True), found by identity of
  the entry and of its storage object (share_memory_() moves the address, not the storage; a
  model.to() before the change leaves the old memory, and the record, as they were). A stale
  record, saved or copied, is refused when loaded, naming what happened: never read either way.
- Loaded as it is, such a state_dict is still right: its weight entry is the layer's memory, and the
  layer knows what it last wrote there, so the load takes that (the original case).
- Copies made before the change that copied the record too (copy.deepcopy, torch.save, clone() of
  every entry) keep what they said, which their weights agree with.
- miss_ext.peft.restore marks every record it stops following stale (PEFT's merges do not tell).

Not covered: a state_dict taken while unmerged has no record (PEFT's key set), so one loaded or
copied after a later merge reads W + dW as unmerged, as PEFT's does; a detach()ed alias of a
MissLinear flag keeps its value when the flag is emptied; weights without storage (meta, fake,
wrapper subclasses). State is kept outside the modules (weak references), so deepcopy and pickling
of models are unaffected.
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
    """A record tensor in a state_dict, with the weight entry beside it (weakly), and the names
    merged in that entry's memory as its layer last wrote it (`now`; None once not known)."""
    __slots__ = ("record", "weight", "now", "stale")

    def __init__(self, record: Tensor, weight: Tensor, names: List[str]):
        self.record, self.weight = weakref.ref(record), weakref.ref(weight)
        self.now: Optional[List[str]] = list(names)
        self.stale = False


_LOCK = threading.Lock()
_FOLLOWED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> [_Handed]
_HANDED = WeakIdKeyDictionary()  # record tensor in a state_dict -> _Handed


def new_record(make: Callable[[List[str]], Tensor], names: List[str]) -> Tensor:
    """For a layer's _save_to_state_dict: the record tensor `make(names)`, made outside inference
    mode (an inference tensor could not be marked stale outside it)."""
    with torch.inference_mode(False):
        return make(names)


def follow(layer: object, state_dict: dict, key: str, weight_key: str, names: List[str]) -> None:
    """For a layer's state_dict(), once its base layer's tensors are in `state_dict` too (and for
    a load with assign=True, whose state_dict's weight becomes the layer's): the record under `key`
    (if any; it says `names`) is marked stale by changed() once the layer writes the memory
    `state_dict[weight_key]` views."""
    record, weight = state_dict.get(key), state_dict.get(weight_key)
    if not isinstance(record, Tensor) or torch.compiler.is_compiling() or _plain_view(weight) is None:
        return
    with _LOCK:
        if record in _HANDED:
            return  # already followed (a state_dict() into a destination that held it)
        handed = _HANDED[record] = _Handed(record, weight, names)
        alive = [h for h in _FOLLOWED.get(layer, []) if h.record() is not None and h.weight() is not None]
        _FOLLOWED[layer] = alive + [handed]


def changed(layer: object, weight: object, names: List[str], mark_stale: Callable[[Tensor], None]) -> None:
    """For a layer, after its merge, unmerge or load wrote `weight` (the names merged there now:
    `names`): the records of its state_dicts whose weight entry views that memory no longer say
    what it holds; they are marked stale (`mark_stale(record)`), and what it holds is kept."""
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
                # The state_dict, or its weight entry, is gone: copies made from it took the
                # weight before this change and agree with the record they hold.
                continue
            if handed.now != list(names) and _same_elements(beside, written):
                handed.now = list(names)
                if not handed.stale:
                    with torch.no_grad():
                        mark_stale(record)
                    handed.stale = True
            alive.append(handed)
        _FOLLOWED[layer] = alive


def forget(layer: object, mark_stale: Callable[[Tensor], None]) -> None:
    """Stops following `layer` (miss_ext.peft.restore: PEFT's merges will not say so): the records
    of its state_dicts that still sit beside its weight are marked stale, what their memory holds
    unknown from now on."""
    with _LOCK:
        for handed in _FOLLOWED.pop(layer, []):
            record = handed.record()
            if record is not None and handed.weight() is not None:
                handed.now = None
                if not handed.stale:
                    with torch.no_grad():
                        mark_stale(record)
                    handed.stale = True


def loaded_names(state_dict: dict, key: str, weight_key: str, decode: Callable[[Tensor], List[str]]
                 ) -> Optional[List[str]]:
    """For a layer loading `state_dict`: where its record is one marked stale (`decode` refuses
    it) and its base_layer.weight is still the tensor handed out beside it, the names merged in
    that memory as the layer last wrote it (the state_dict as state_dict() gave it, loaded after a
    merge or unmerge); else None: the record is read (a stale one refused; one written since by
    someone else, torch.distributed.checkpoint filling the state_dict, as written)."""
    record = state_dict.get(key)
    with _LOCK:
        handed = _HANDED.get(record) if isinstance(record, Tensor) else None
        weight = state_dict.get(weight_key)
        if (handed is None or not handed.stale or handed.now is None or weight is None
                or weight is not handed.weight()):
            return None
        now = list(handed.now)
    try:
        decode(record)
    except ValueError:
        return now  # still marked stale
    return None


STALE = ("this record is stale: its layer merged or unmerged the weight beside it after state_dict() ran (a "
         "state_dict's tensors are the model's own), and a copy or save made since may hold either weight; take a "
         "new state_dict, or copy one whole (copy.deepcopy, torch.save, clone() of every entry) before merging or "
         "unmerging")
