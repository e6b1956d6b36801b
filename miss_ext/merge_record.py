"""What a layer's merge record in a state_dict says, when the state_dict outlives a merge or unmerge.

A merged layer's state_dict holds W + dW as base_layer.weight and says so in its record
(MissLinear's "merged", the accelerated PEFT layer's "merged_adapters"), present only while some
adapter is merged when state_dict() runs (PEFT's key set otherwise). A state_dict shares its
tensors with the model, as torch's always does: base_layer.weight there is the layer's own weight
memory, which a later merge or unmerge rewrites in place. A record written once then described the
weight of then beside the weight of now: a state_dict taken merged and loaded after an unmerge
(trl's merge, gather, unmerge pattern of huggingface/trl#2873, or PEFT's disable_adapter(), which
unmerges) dropped dW, and one taken unmerged and loaded after a merge counted it twice, silently
(a review replaying public bug reports, 2026-12-05).

So the record follows the weight it describes:

- A record tensor in a state_dict is rewritten in place (resized: the JSON of merged names has
  its own length) at every later merge or unmerge that writes the weight memory it describes.
  Copied (clone(), torch.save, deepcopy) together with the weight at any time, the two agree. A
  layer whose weight moved to other memory since (model.to(dtype), .cuda()) leaves the records of
  the old memory as they are: that memory keeps what they say.
- Loading reads the record the weight memory holds now where the state_dict's base_layer.weight
  is still a layer's weight memory, unwritten since the layer's last merge, unmerge or load (its
  `_version`): present in the state_dict or not. A write by anyone else (a checkpoint loaded into
  the memory, torch.distributed.checkpoint's in-place fill) makes it unknown again: the key's value,
  or its absence, is read as given.
- A state_dict whose weight is a copy (or memory the layer no longer writes or that was written
  since) beside a record tensor that a merge or unmerge rewrote since state_dict() cannot say which
  weight it holds: refused.
- A record someone else wrote into the record tensor (torch.distributed.checkpoint fills a model's
  own state_dict in place) is read as written.

Not followed: a state_dict taken while unmerged has no record to rewrite, so one copied or saved
after a later merge holds W + dW without a record and loads as unmerged (as PEFT's state_dict
does); a state_dict from a file, or copied entry by entry, says what it said when copied; weights
without storage (meta, fake). State is kept outside the modules (keyed weakly by layer, tensor and
storage), so deepcopy and pickling of models are unaffected. The calls below hold one lock, but a
state_dict() that runs while another thread merges may still see the weight before or after the
write beside the record of the other time, as torch's own state_dict() may see half a step.
"""
import threading
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # never fake: is_fake (microseconds) is asked of subclasses only


def _storage_and_region(t: object) -> Tuple[Optional[torch.UntypedStorage], Optional[tuple]]:
    """storage_of(t) and region_of(t), computed once."""
    t = getattr(t, "_local_tensor", t)
    if (not isinstance(t, Tensor) or t.numel() == 0 or t.is_meta
            or (type(t) not in _PLAIN_TENSORS and is_fake(t))):
        return None, None
    try:
        storage = t.untyped_storage()
        address = storage.data_ptr()  # a wrapper subclass's storage raises here ("invalid python storage")
    except (RuntimeError, NotImplementedError):
        return None, None
    return storage, (t.device, address, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def storage_of(t: object) -> Optional[torch.UntypedStorage]:
    """The storage a tensor views (a sharded one, DTensor, by its local shard; one Python object
    per storage while any tensor on it lives), or None for a non-tensor, an empty, meta or fake
    tensor, or one without storage (a wrapper subclass)."""
    return _storage_and_region(t)[0]


def memory_of(t: object) -> Optional[Tuple[str, int]]:
    """(device, address) of the memory a tensor views (storage_of), or None."""
    storage = storage_of(t)
    return None if storage is None else (str(storage.device), storage.data_ptr())


def region_of(t: object) -> Optional[tuple]:
    """The elements a tensor views: its device, address, offset, sizes and strides (None:
    storage_of's)."""
    return _storage_and_region(t)[1]


def _version_of(t: object) -> Optional[int]:
    """The tensor's version counter (bumped by every in-place write, shared by its detach()ed
    aliases), or None (an inference tensor has none)."""
    try:
        return getattr(t, "_local_tensor", t)._version
    except (RuntimeError, AttributeError):
        return None


class _Cell:
    """One layer's weight memory as the layer last wrote it: the names merged there (`record`),
    the elements (`region`), their version after the write (`version`), and the record tensors
    state_dict() handed out (`handed`: weak references, with what each describes)."""
    __slots__ = ("record", "region", "version", "handed")

    def __init__(self):
        self.record: List[str] = []
        self.region: Optional[tuple] = None
        self.version: Optional[int] = None
        self.handed: List[Tuple[weakref.ref, "_Handed"]] = []


class _Handed:
    """A record tensor in a state_dict: the weight region it describes, its value when handed out
    (`initial`) and as this module last wrote it (`last`)."""
    __slots__ = ("region", "initial", "last")

    def __init__(self, region: tuple, record: List[str]):
        self.region, self.initial, self.last = region, list(record), list(record)


class Loaded(NamedTuple):
    """loaded_record's answer: the record to load with (`record`), or why not (`refusal`)."""
    record: Optional[List[str]] = None
    refusal: Optional[str] = None


_LOCK = threading.RLock()
_CELLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> _Cell
_REGIONS = WeakIdKeyDictionary()  # weight storage -> {region: _Cell}: what that memory holds
_HANDED = WeakIdKeyDictionary()   # record tensor in a state_dict -> _Handed


def _place(cell: _Cell, weight: object, storage: Optional[torch.UntypedStorage], region: Optional[tuple]) -> None:
    """The cell's weight is now `weight` (its storage and region), written by its layer last."""
    cell.version = _version_of(weight)
    if region == cell.region:  # registered when it was placed there (the common case: no registry work)
        return
    cell.region = region
    if region is not None:
        regions = _REGIONS.get(storage)
        if regions is None:
            regions = _REGIONS[storage] = {}
        regions[region] = cell


def hand_out(layer: object, weight: object, record: Callable[[], List[str]], destination: dict, key: str,
             make: Callable[[List[str]], Tensor]) -> None:
    """For a layer's _save_to_state_dict: puts `make(names)` (a new record tensor) under `key` when
    some adapter is merged (`record()`: the merged names), and follows it and the weight memory
    from now on (not while compiling, nor for a weight without storage)."""
    with _LOCK:
        names = list(record())
        storage, region = _storage_and_region(weight)
        if torch.compiler.is_compiling() or region is None:
            if names:
                destination[key] = make(names)
            return
        cell = _CELLS.get(layer)
        if cell is None:
            cell = _CELLS[layer] = _Cell()
        cell.record = names
        _place(cell, weight, storage, region)
        if names:
            with torch.inference_mode(False):  # an inference tensor could not be rewritten outside it
                tensor = make(names)
            destination[key] = tensor
            handed = _HANDED[tensor] = _Handed(region, names)
            cell.handed = [(ref, h) for ref, h in cell.handed if ref() is not None] + [(weakref.ref(tensor), handed)]


def changed(layer: object, weight: object, record: List[str], write: Callable[[Tensor, List[str]], None]) -> None:
    """For a layer, after its merge, unmerge or load wrote `weight` (the names merged there now:
    `record`): rewrites the record tensors its state_dicts hold for that memory. Nothing for a
    layer that never handed one out."""
    with _LOCK:
        cell = _CELLS.get(layer)
        if cell is None or torch.compiler.is_compiling():
            return
        cell.record = list(record)
        _place(cell, weight, *_storage_and_region(weight))
        alive = []
        for ref, handed in cell.handed:
            tensor = ref()
            if tensor is None:
                continue
            if handed.region == cell.region and handed.last != cell.record:
                with torch.no_grad():
                    write(tensor, cell.record)
                handed.last = list(cell.record)
            alive.append((ref, handed))
        cell.handed = alive


def forget(layer: object) -> None:
    """Stops following `layer` (its merges will no longer say so: miss_ext.peft.restore): its
    state_dicts' records keep their values, and its weight memory is no longer read as holding its
    record."""
    with _LOCK:
        cell = _CELLS.pop(layer, None)
        if cell is not None:
            cell.region = cell.version = None
            cell.handed = []


def _holder(weight: Tensor) -> Optional[_Cell]:
    """The cell of the layer whose last write `weight`'s elements hold, unwritten since, or None."""
    storage, region = _storage_and_region(weight)
    regions: Optional[Dict[tuple, _Cell]] = None if storage is None else _REGIONS.get(storage)
    if not regions:
        return None
    cell = regions.get(region)
    if cell is None or cell.region != region or cell.version is None or _version_of(weight) != cell.version:
        return None
    return cell


def loaded_record(state_dict: dict, key: str, weight_key: str, decode: Callable[[Tensor], List[str]]) -> Loaded:
    """What a layer loading `state_dict` takes as its merge record, beside the key's own value
    (which load_merge_record checks in any case): the record the state_dict's base_layer.weight
    holds now where that is a layer's weight memory, a refusal for a copied weight beside a record
    tensor rewritten since, or Loaded() (neither): the key's value, or its absence, as given."""
    with _LOCK:
        record, weight = state_dict.get(key), state_dict.get(weight_key)
        handed = _HANDED.get(record) if isinstance(record, Tensor) else None
        if handed is not None:
            try:
                value = list(decode(record))
            except ValueError:
                value = None
            if value != handed.last:
                return Loaded()  # written since by someone else (a checkpoint loaded into the state_dict)
        holder = _holder(weight) if isinstance(weight, Tensor) else None
        if holder is not None:
            return Loaded(record=list(holder.record))
        if handed is not None and handed.last != handed.initial:
            return Loaded(refusal=(
                "its base_layer.weight is a copy (or memory written since by something other than its layer) but its "
                "merge record is the layer's own, which a merge or unmerge rewrote since state_dict() ran, so it "
                "cannot say whether the weight holds W or W + dW; copy every entry of a state_dict at once "
                "(copy.deepcopy, torch.save), or take a new one"))
        return Loaded()
