"""What a layer's merge record in a state_dict says, when the state_dict outlives a merge or unmerge.

A merged layer's state_dict holds W + dW as base_layer.weight and says so in its record
(MissLinear's "merged", the accelerated PEFT layer's "merged_adapters"). A state_dict shares its
tensors with the model, as torch's always does: base_layer.weight there is the layer's own weight
memory, which a later merge or unmerge rewrites in place. A record written once, when state_dict()
ran, then described the weight of then beside the weight of now: a state_dict taken merged and
loaded after an unmerge (trl's merge, gather, unmerge pattern of huggingface/trl#2873, or PEFT's
disable_adapter(), which unmerges) dropped dW, and one taken unmerged and loaded after a merge
counted it twice, silently (a review replaying public bug reports, 2026-12-05).

So the record follows the weight it describes:

- The record tensor a state_dict holds is rewritten in place at every merge and unmerge of its
  layer, as the weight beside it is: copied (clone(), a cast, torch.save) at any time together
  with the weight, the two agree.
- Loading reads which record the weight memory holds now (`_REGIONS`, updated by the layer at
  every change): a state_dict whose base_layer.weight is still the layer's weight memory is read
  with the layer's record of now, present in it or not (a state_dict taken unmerged has no record
  key: PEFT's key set).
- A state_dict whose weight is a copy or memory the layer no longer writes, beside a record that
  is still the layer's live one and changed since state_dict() (the floating tensors cast, the
  record left as it was, then a merge or unmerge), cannot say which weight it holds: refused.
- A record someone else wrote into the state_dict's record tensor since (torch.distributed.
  checkpoint fills a model's own state_dict in place) is read as written.

Only state_dicts that state_dict() wrote in this process are followed; one from a file or copied
entry by entry says what it said when copied. State is kept outside the modules (keyed weakly by
layer, tensor and storage), so deepcopy and pickling of models are unaffected.
"""
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary


def storage_of(t: object) -> Optional[torch.UntypedStorage]:
    """The storage a tensor views (a sharded one, DTensor, by its local shard; one Python object
    per storage while any tensor on it lives), or None for a non-tensor, an empty, meta or fake
    tensor, or one without storage."""
    t = getattr(t, "_local_tensor", t)
    if not isinstance(t, Tensor) or t.numel() == 0 or t.is_meta or is_fake(t):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def memory_of(t: object) -> Optional[Tuple[str, int]]:
    """(device, address) of the memory a tensor views (storage_of), or None."""
    storage = storage_of(t)
    return None if storage is None else (str(storage.device), storage.data_ptr())


def region_of(t: object) -> Optional[tuple]:
    """The elements a tensor views: its memory, offset, sizes and strides (None: storage_of's)."""
    memory = memory_of(t)
    if memory is None:
        return None
    t = getattr(t, "_local_tensor", t)
    return memory + (t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class _Cell:
    """One layer's merge record as its weight memory holds it: the names merged (`record`), the
    weight elements the layer's merges write (`region`), a change count, and the record tensors
    state_dict() handed out (weak references), rewritten at every change."""
    __slots__ = ("record", "region", "changes", "handed")

    def __init__(self):
        self.record: List[str] = []
        self.region: Optional[tuple] = None
        self.changes = 0
        self.handed: List[weakref.ref] = []


_CELLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> _Cell
_REGIONS = WeakIdKeyDictionary()  # weight storage -> {region: _Cell}: what that memory holds
_HANDED = WeakIdKeyDictionary()   # record tensor in a state_dict -> (_Cell, its changes then)


def _tracking() -> bool:
    return not torch.compiler.is_compiling()


def _place(cell: _Cell, weight: object) -> None:
    cell.region = region_of(weight)
    storage = storage_of(weight)
    if cell.region is not None and storage is not None:
        regions = _REGIONS.get(storage)
        if regions is None:
            regions = _REGIONS[storage] = {}
        regions[cell.region] = cell


def hand_out(layer: object, weight: object, record: List[str], destination: dict, key: str,
             make: Callable[[List[str]], Tensor]) -> None:
    """For a layer's _save_to_state_dict: puts `make(record)` (a new record tensor) under `key`
    when some adapter is merged, and follows it and the weight memory from now on."""
    if not _tracking():
        if record:
            destination[key] = make(record)
        return
    cell = _CELLS.get(layer)
    if cell is None:
        cell = _CELLS[layer] = _Cell()
    cell.record = list(record)
    _place(cell, weight)
    if record:
        with torch.inference_mode(False):  # an inference tensor could not be rewritten outside it
            tensor = make(record)
        destination[key] = tensor
        _HANDED[tensor] = (cell, cell.changes)
        cell.handed = [ref for ref in cell.handed if ref() is not None] + [weakref.ref(tensor)]


def changed(layer: object, weight: object, record: List[str], write: Callable[[Tensor, List[str]], None]) -> None:
    """For a layer, after a merge, unmerge or load changed its record to `record` (its weight
    is `weight`): rewrites the record tensors its state_dicts hold. Nothing for a layer that never
    handed one out."""
    cell = _CELLS.get(layer)
    if cell is None or not _tracking():
        return
    cell.changes += 1
    cell.record = list(record)
    _place(cell, weight)
    alive = []
    for ref in cell.handed:
        tensor = ref()
        if tensor is not None:
            with torch.no_grad():
                write(tensor, record)
            alive.append(ref)
    cell.handed = alive


def forget(layer: object) -> None:
    """Stops following `layer` (its merges will no longer say so: miss_ext.peft.restore): its
    state_dicts' records keep their values, and its weight memory is no longer read as holding its
    record."""
    cell = _CELLS.pop(layer, None)
    if cell is not None:
        cell.region = None
        cell.handed = []


def _holder(weight: object) -> Optional[_Cell]:
    """The cell whose layer's merges write the elements `weight` views, or None."""
    storage = storage_of(weight)
    regions: Optional[Dict[tuple, _Cell]] = None if storage is None else _REGIONS.get(storage)
    if not regions:
        return None
    region = region_of(weight)
    cell = regions.get(region)
    return cell if cell is not None and cell.region == region else None


def loaded_record(state_dict: dict, key: str, weight_key: str, decode: Callable[[Tensor], List[str]]):
    """What a layer loading `state_dict` must take as its merge record, before the key's value:
    ("record", names) where the state_dict's base_layer.weight is a layer's weight memory (its
    record now), ("refuse", why) for a copied weight beside a live record that changed since, or
    None: the key's value (or its absence) as given."""
    record, weight = state_dict.get(key), state_dict.get(weight_key)
    handed = _HANDED.get(record) if isinstance(record, Tensor) else None
    if handed is not None:
        try:
            value = list(decode(record))
        except ValueError:
            value = None
        if value != handed[0].record:
            return None  # written since by someone else (a checkpoint loaded into the state_dict)
    holder = _holder(weight) if isinstance(weight, Tensor) else None
    if holder is not None:
        return ("record", list(holder.record))
    if handed is not None and handed[0].changes != handed[1]:
        return ("refuse", "its base_layer.weight is a copy (or memory the layer no longer writes) but its merge record "
                          "is the layer's own, which a merge or unmerge rewrote since state_dict() ran, so it cannot "
                          "say whether the copy holds W or W + dW; copy every entry of a state_dict at once "
                          "(copy.deepcopy, torch.save), or take a new one")
    return None
