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
  the memory that the state_dict's base_layer.weight entry viewed, found by the identity of its
  storage object (which every tensor viewing that memory keeps alive: detach()ed aliases of the
  entry too; share_memory_() moves the address, not the storage) and its elements, or of the
  entry (with keep_vars=True the parameter itself, wherever model.to() moves it; a model.to()
  before the change otherwise leaves the old memory, and its record, as they were). A stale
  record, saved or copied, is refused when loaded, naming what happened: never read either way.
- Loaded with a weight that still views that memory (as state_dict() gave it, or aliases of its
  tensors), such a state_dict is still right: the layer knows what it last wrote there, so the load
  takes that (the original case).
- Copies made before the change that copied the record too (copy.deepcopy, torch.save, clone() of
  every entry) keep what they said, which their weights agree with.
- miss_ext.peft.restore marks every record it stops following stale (PEFT's merges do not tell).

Not covered: a state_dict taken while unmerged has no record (PEFT's key set), so one loaded or
copied after a later merge reads W + dW as unmerged, as PEFT's does; a detach()ed alias of a
MissLinear flag keeps its value when the flag is emptied; another process's view of the memory
(a state_dict sent through torch.multiprocessing); weights without storage (meta, fake, wrapper
subclasses). State is kept outside the modules (weak references), so deepcopy and pickling
of models are unaffected.
"""
import contextlib
import itertools
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


# A layer's merges and unmerges (MissLinear's and the accelerated PEFT layer's), and each of its
# state_dict() calls from the record's writing to follow(), one at a time across threads. A merge
# from another thread between a state_dict's record and its follow() left a record that nothing
# marked stale beside a weight that no longer held what it said: loaded, it dropped dW silently
# (a concurrency hunt, 2026-12-07: 126 of 10,446 MissLinear state_dicts); two threads merging one
# MissLinear both passed its "merged?" check and added dW twice (40 of 100 pairs). Loads
# (_load_from_state_dict) take it too. Re-entrant: the accelerated layer's forward unmerges under
# it through unmerge(), which takes it again. Forwards do not take it, nor do merges compiled with
# torch.compile: a lock is not traced, so a compiled merge replays its writes unlocked (README
# "The ops", threads).
MERGE_LOCK = threading.RLock()


def merging():
    """MERGE_LOCK, or no lock while torch.compile traces (a lock is not traceable: a compiled
    merge runs unlocked)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else MERGE_LOCK


def storage_of(t: object) -> Optional[torch.UntypedStorage]:
    """The storage a tensor views (a sharded one, DTensor, by its local shard; one Python object
    per storage while any tensor on it lives), or None (_plain_view's cases)."""
    t = _plain_view(t)
    return None if t is None else t.untyped_storage()


def memory_of(t: object) -> Optional[Tuple[str, int]]:
    """(device, address) of the memory a tensor views (storage_of), or None."""
    storage = storage_of(t)
    return None if storage is None else (str(storage.device), storage.data_ptr())


def _elements(t: Tensor) -> tuple:
    return t.storage_offset(), tuple(t.shape), tuple(t.stride())


class _Handed:
    """A record tensor in a state_dict (weakly), the memory its weight entry viewed (the storage
    object, weakly, and which elements: every tensor viewing it, a detach()ed alias of the entry
    too, keeps the storage object alive and the same), the entry itself (weakly: with
    keep_vars=True a parameter, which model.to() moves to other memory), and the names merged in
    that memory as its layer last wrote it (`now`; None once not known)."""
    __slots__ = ("record", "weight", "storage", "elements", "now", "stale", "written")

    def __init__(self, record: Tensor, weight: Tensor, names: List[str]):
        self.record, self.weight = weakref.ref(record), weakref.ref(weight)
        view = _plain_view(weight)
        self.storage, self.elements = weakref.ref(view.untyped_storage()), _elements(view)
        self.now: Optional[List[str]] = list(names)
        self.stale = False
        self.written = next(_WRITES)  # when `now` was last set: of several followers, the latest wins

    def views(self, t: Tensor) -> bool:
        """Whether plain tensor `t` views the memory this record describes (and if the entry moved
        there, follows it)."""
        entry = _plain_view(self.weight())
        if entry is not None and entry.untyped_storage() is not self.storage():
            self.storage, self.elements = weakref.ref(entry.untyped_storage()), _elements(entry)
        return t.untyped_storage() is self.storage() and _elements(t) == self.elements


_LOCK = threading.Lock()
_WRITES = itertools.count()
_FOLLOWED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> [_Handed]
_HANDED = WeakIdKeyDictionary()  # record tensor in a state_dict -> [_Handed], one per layer following it


def new_record(make: Callable[[], Tensor]) -> Tensor:
    """For a layer's _save_to_state_dict: the record tensor `make()`, made outside inference mode
    (an inference tensor could not be marked stale outside it)."""
    with torch.inference_mode(False):
        return make()


def follow(layer: object, state_dict: dict, key: str, weight_key: str, names: List[str]) -> None:
    """For a layer's state_dict(), once its base layer's tensors are in `state_dict` too (and for
    a load with assign=True, whose state_dict's weight becomes the layer's): the record under `key`
    (if any; it says `names`) is marked stale by changed() once the layer writes the memory
    `state_dict[weight_key]` views."""
    record, weight = state_dict.get(key), state_dict.get(weight_key)
    view = _plain_view(weight)
    if not isinstance(record, Tensor) or torch.compiler.is_compiling() or view is None:
        return
    with _LOCK:
        followers = _HANDED.get(record)
        if followers is None:
            followers = _HANDED[record] = []
        mine = _FOLLOWED.get(layer, [])
        if any(h in mine and h.views(view) for h in followers):
            return  # already followed by this layer for this memory (a state_dict() into a destination that held it)
        handed = _Handed(record, weight, names)
        followers.append(handed)  # another layer's too: a copy sharing the record, loaded with assign=True
        _FOLLOWED[layer] = [h for h in mine if h.record() is not None] + [handed]


def changed(layer: object, weight: object, names: List[str], mark_stale: Callable[[Tensor], None]) -> None:
    """For a layer, after its merge, unmerge or load wrote `weight` (the names merged there now:
    `names`): the records of its state_dicts whose weight entry views that memory no longer say
    what it holds; they are marked stale (`mark_stale(record)`), and what it holds is kept."""
    if torch.compiler.is_compiling():
        return
    written, names = _plain_view(weight), list(names)
    with _LOCK:
        handed_out = _FOLLOWED.get(layer)
        if not handed_out or written is None:
            return
        alive = []
        for handed in handed_out:
            record = handed.record()
            if record is None:
                continue  # no state_dict holds it any more
            if handed.views(written):
                handed.written = next(_WRITES)
                if handed.now != names:
                    handed.now = names
                    _mark_stale(handed, record, mark_stale)
            alive.append(handed)
        _FOLLOWED[layer] = alive


def _mark_stale(handed: _Handed, record: Tensor, mark_stale: Callable[[Tensor], None]) -> None:
    """`mark_stale(record)`, once per record (under _LOCK)."""
    if not handed.stale:
        with torch.no_grad():
            mark_stale(record)
        handed.stale = True


def forget(layer: object, mark_stale: Callable[[Tensor], None]) -> None:
    """Stops following `layer` (miss_ext.peft.restore: PEFT's merges will not say so): the records
    of its state_dicts that still sit beside its weight are marked stale, what their memory holds
    unknown from now on."""
    with _LOCK:
        for handed in _FOLLOWED.pop(layer, []):
            record = handed.record()
            if record is not None:
                handed.now = None
                _mark_stale(handed, record, mark_stale)


def loaded_names(state_dict: dict, key: str, weight_key: str, decode: Callable[[Tensor], List[str]]
                 ) -> Optional[List[str]]:
    """For a layer loading `state_dict`: where its record is one marked stale (`decode` refuses
    it) and its base_layer.weight still views the memory the record described (the state_dict as
    state_dict() gave it, or an alias of its tensors, loaded after a merge or unmerge), the names
    merged there as the layer last wrote it; else None: the record is read (a stale one refused;
    one written since by someone else, torch.distributed.checkpoint filling the state_dict, as
    written)."""
    record, weight = state_dict.get(key), _plain_view(state_dict.get(weight_key))
    with _LOCK:
        followers = _HANDED.get(record, []) if isinstance(record, Tensor) else []
        known = [h for h in followers if h.now is not None and weight is not None and h.views(weight)]
        if not known or not any(h.stale for h in followers):
            return None
        now = list(max(known, key=lambda h: h.written).now)
    try:
        decode(record)
    except ValueError:
        return now  # still marked stale
    return None


STALE = ("this record is stale: its layer merged or unmerged the weight beside it after state_dict() ran (a "
         "state_dict's tensors are the model's own), and a copy or save made since may hold either weight; take a "
         "new state_dict, or copy one whole (copy.deepcopy, torch.save, clone() of every entry) before merging or "
         "unmerging")
