"""Run an existing PEFT MiSS model on `torch.ops.miss`, in place: `accelerate(peft_model)`.

`accelerate` swaps the class of every `peft.tuners.miss.MissLinear` to `AcceleratedMissLinear`, a
subclass whose forward, merge and unmerge call the miss ops. Nothing else changes: the same
module objects, parameter objects, state-dict keys (plus "merged_adapters" while a layer is
merged: AcceleratedMissLinear.MERGED_KEY), adapter dictionaries and PEFT flags (the class names
show: PEFT's get_layer_status / get_model_status report AcceleratedMissLinear /
AcceleratedMissModel where plain PEFT says MissLinear / MissModel), so
optimizers, checkpoints, `save_pretrained`, `set_adapter`, `disable_adapter()`,
`merge_and_unload()` and `generate()` keep working, and `restore` swaps the class back.

Where PEFT's own behaviour is a bug (docs/miss.md, last section) the accelerated layer follows
the spec's intent instead:
- each adapter keeps its own mode, read from its block's shape (3-D: bat; (r, out): default;
  (r, mini_r): mini). PEFT before 0.22 uses the mode of the layer's first adapter for all of them,
  so a layer mixing bat and default/mini adapters computes garbage or crashes there (0.22 keeps
  each adapter's mode too: _peft_mode);
- active bat adapters are applied to the weight first, in order, then the default/mini terms are
  added; merge does the same (bat adapters first, in the active order whatever order it is
  given; an adapter named twice merges once), so merged and unmerged outputs agree; a merge that
  cannot keep that order (a bat adapter on top of merged default/mini ones, or on top of a merged
  bat adapter the forward applies after it) is refused (ValueError);
- mini merge never rewrites the block (PEFT replaces a half-precision CPU block by its tiled
  (r, out) copy, after which unmerge crashes);
- bat unmerge checks that every I + B_i is well conditioned (ValueError, weight untouched);
- a forward of a layer whose merged adapters are not exactly its active ones (after
  merge_adapter of a subset, or of an inactive adapter) raises ValueError: PEFT computes the
  merged weight alone, silently dropping or adding adapters (huggingface/peft#3756);
- merges and unmerges are all or nothing: every layer's checks (with safe_merge, every merged
  weight) run before any layer changes, a failure after them undoes the call's merges,
  merge_and_unload merges every layer before it unloads any, and set_adapter on a merged model
  unmerges every layer (unmerge_adapter) before it switches any (PEFT unmerges and switches
  layer by layer);
- loads through the PeftModel or its tuner (PeftModel.load_adapter) are all or nothing: every
  layer's load checks run before anything loads (AcceleratedMissModel._load_from_state_dict);
- a bat adapter under another PEFT layer wrapping its layer (a LoRA injected on the same module)
  that is merged already or in the same call (first: its merge goes into the weight bat then
  transforms) is not merged, and PEFT's unload of a model holding miss_ext's own layers is
  refused before anything changes (TypeError naming the layer);
- a refused forward changes no layer (AcceleratedMissModel._check_before_unmerging; not under
  PEFT's disable_adapter(), see there), and a failed add_adapter leaves no block behind, nor do
  earlier failures under the name it adds (AcceleratedMissModel.inject_adapter; accelerate refuses
  a block whose shape says another mode than its config).
Layers whose base is not a plain `nn.Linear` (quantized backends, forward hooks, extra forward
arguments) keep PEFT's forward where PEFT computes every active adapter in its own mode (always
from PEFT 0.22; before, where all are in the layer's first adapter's mode, which that forward
applies to all: otherwise default/mini terms are added here and a bat adapter beside them is
refused); merging into them is refused, but for quantized backends, which
keep PEFT's merge and unmerge code; an unmerge only needs a plain weight, so a layer hooked
after its merge is unmerged here.

Mixed-adapter batches: PEFT's `adapter_names=` (one adapter name per sequence, "__base__" for the
base model) works in `model(...)`, `model.generate(...)` (num_beams / num_return_sequences repeat
the names as generate repeats the sequences) and direct layer calls. PEFT (0.21, 0.22) accepts the
keyword for MiSS and silently applies the active adapter to every row; here each row gets its
own adapter, with its own mode (default and mini may mix on one layer, which PEFT cannot do
even for one adapter at a time) and dropout, through miss.bank_fold + miss.bank_add (see
miss_ext/bank.py). It also works in training (each block gets the gradient of its own rows;
PEFT's LoRA refuses training there). Rows of a layer that lacks the named adapter get that
layer's base output (as PEFT's LoRA); a name no layer has raises ValueError; a bat adapter named
by a row raises TypeError (bat changes the base weight, so rows cannot share one base GEMM); so
do merged adapters (ValueError, as PEFT's LoRA). Each call stacks the named adapters' blocks of
a layer into a small bank (their r x out values: no weight- or activation-sized copy). The
names reach the layers through hooks that last for the call, so a second adapter_names= call of
the same model while one runs (another thread or coroutine, or nested) raises RuntimeError
rather than giving the first call its names; a plain call of the PeftModel (or of its tuner) in
another thread meanwhile runs its active adapter, as the hooks act only inside their own call (not
under torch.compile, which records no calls), and the base model or its layers called directly
from another thread raise RuntimeError (one adapter_names= call at a time per model).

Where PEFT (0.21, 0.22) accepts an argument and silently ignores it, the accelerated model refuses it:
- `alora_offsets=` (a LoRA feature): PEFT's `PeftModel.forward`/`generate` strip it for MiSS;
  here it raises TypeError before anything runs (model.forward, model.generate and direct layer
  calls alike). The tuner (`MissModel`) is swapped to `AcceleratedMissModel` for this;
- merging an adapter whose base weight is shared with another module (tied embeddings): PEFT
  warns and merges, changing the other module; here merge, merge_adapter and merge_and_unload
  raise ValueError before anything changes (see `miss_ext.targets.shared_weight_message`);
- `merge_adapter`/`merge_and_unload(adapter_names=[...])` naming no adapter of the model: PEFT
  merges nothing; here ValueError.
"""
import contextlib
import contextvars
import inspect
import itertools
import json
import math
import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from functools import partial, update_wrapper
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._optional import require_version

# Decision (2026-12-03, raised 2026-12-07): PEFT >= 0.21. Releases before 0.20 lack what the
# accelerated layers read (MissLinear.quantization_backend), so accelerate() swapped the classes
# and every call then crashed; releases before 0.17 have no peft.tuners.miss (Bone only). 0.20.0,
# checked by hand on 2026-12-03, failed 14 of the PEFT tests on 2026-12-07 (bias="*_only" and
# modules_to_save files, r > in, leftover blocks of a failed add_adapter: it saves, loads and
# injects otherwise): not a release CI tests, so refused. CI tests PEFT 0.21 and 0.22. Adapter
# files of any PEFT release, Bone included, load without PEFT (miss_ext.load_adapter).
#
# Decision (2026-12-07): and PEFT < 0.23. This module reads and overrides PEFT's MiSS layer and
# tuner internals, which a new release may change in ways that make an accelerated model compute
# something else than PEFT's without an error: PEFT 0.22.0 (out 2026-12-07) did (each adapter
# keeps its own mode, miss_fn a dict; modules_to_save matches whole path parts; targeted names
# recorded before injection), and 23 tests caught it. Adapted the same day (each point is read
# per installed release: _peft_mode, targets.matches_by_suffix); a release this module has not
# been checked against is refused by name, so the next one is read before it is used.
require_version("peft", "0.21", "peft", "miss_ext.peft",
                "older releases lack the MissLinear attributes the accelerated layers read, or MiSS itself, or "
                "save, load and inject otherwise than the accelerated layers are checked against",
                below="0.23", why_below="miss_ext.peft overrides PEFT's MiSS layer internals and is checked against "
                "PEFT 0.21-0.22; a newer release may change them so that an accelerated model computes something "
                "else, silently")
from peft.tuners.miss import MissLinear as PeftMissLinear  # noqa: E402
from peft.tuners.miss import MissModel  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper  # noqa: E402

from ._checkpointing import entry as checkpoint_entry, inside_checkpoint, traced_inside_checkpoint  # noqa: E402
from ._distributed import is_dtensor  # noqa: E402
from .model import (check_module, holds_transformers_adapters, offload_hook, parent_module,  # noqa: E402
                    requires_grad_restorer, training_restorer, under_offload_hook, undo_each)
from .base_layers import (FAST_PATH_PARENTS, WEIGHT_READING_PARENTS, ancestor_reads_layer_tensors,  # noqa: E402
                          check_merge, is_plain_linear, not_plain_reason, parent_reads_child_tensors, type_name)
from .modules import (autocast_mini_block, block_merge_problem, block_shape, check_base_output,  # noqa: E402
                      check_before_dropout_key, check_widths, jagged_forward, json_tensor, layers_to_check,
                      load_merge_record, load_refusals,
                      merge_record_refusal, non_finite_summary, record_follows_write, refuse_forward_tangents,
                      refuse_nested, rewrites_load_keys, tensor_json)
from .bank import (BASE, add_bank_terms, flattened_tokens_hint, host_to_device, other_modality_arguments,  # noqa: E402
                   repeated_batch_hint, row_index, sequence_first_error, RowLayout)
from . import merge_record  # noqa: E402
from .ops import new_dropout_key  # noqa: E402
from .targets import describe, record_sharing, set_module, shared_weight_message  # noqa: E402
from .weight_metadata import BaseTensorAttributes, base_tensor_attribute  # noqa: E402

__all__ = ["AcceleratedMissLinear", "AcceleratedMissModel", "accelerate", "restore", "is_accelerated"]

# PEFT's per-row forward arguments (PeftModel.special_peft_forward_args) that MiSS refuses, and why.
_PER_ROW_ARGUMENTS = {
    "alora_offsets": "activated LoRA (aLoRA) offsets are a LoRA feature; MiSS has no use for them and PEFT "
                     "(0.21, 0.22) silently ignores them",
}


def refuse_per_row_arguments(kwargs: Dict[str, object], where: str) -> None:
    """TypeError naming each of PEFT's refused per-row arguments that is given (not None) in kwargs."""
    given = [name for name in _PER_ROW_ARGUMENTS if kwargs.get(name) is not None]
    if given:
        raise TypeError(f"{where}: " + "; ".join(f"{name}={kwargs[name]!r} is refused: {_PER_ROW_ARGUMENTS[name]}"
                                                 for name in given))


def check_adapter_names(adapter_names: object, where: str) -> List[str]:
    """PEFT's adapter_names: a list or tuple of adapter names (str), one per sequence."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) or \
            not all(map(isinstance, adapter_names, itertools.repeat(str))):  # map: a row costs ~30 ns
        raise TypeError(f"{where}: adapter_names must be a list of adapter names (str, '{BASE}' for the base "
                        f"model), one per sequence; got {adapter_names!r}")
    return list(adapter_names)


def _expand_size(kwargs: Dict[str, object], default_config: object = None) -> int:
    """How many times generate() repeats each input sequence: num_beams for beam search, else
    num_return_sequences (transformers' _expand_inputs_for_generation), from the keyword
    arguments, else a generation_config given there, else `default_config` (the model's own)."""
    configs = [kwargs.get("generation_config"), default_config]

    def get(name):
        value = kwargs.get(name)
        for config in configs:
            if value is None:
                value = getattr(config, name, None)
        return value

    beams, returned = get("num_beams"), get("num_return_sequences")
    if isinstance(beams, int) and beams > 1:
        return beams
    return returned if isinstance(returned, int) and returned > 1 else 1


def _generate_arguments(method, args: tuple, kwargs: Dict[str, object]) -> Dict[str, object]:
    """generate()'s arguments by name: `kwargs` plus those given by position (transformers'
    generate(inputs, generation_config, ...): a GenerationConfig passed second by position was
    not seen, so its num_beams / num_return_sequences did not repeat the names; a serving
    review, 2026-12-06). `kwargs` alone where `method`'s signature cannot bind `args`."""
    if not args:
        return kwargs
    try:
        bound = inspect.signature(method).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return kwargs
    named = {name: value for name, value in bound.arguments.items()
             if bound.signature.parameters[name].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                              inspect.Parameter.VAR_KEYWORD)}
    return {**named, **kwargs}


def _prompt_count(arguments: Dict[str, object]) -> Optional[int]:
    """How many prompts generate() got (the rows of inputs / input_ids / inputs_embeds), or None."""
    for name in ("inputs", "input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


_NOTHING = object()


def _repeat(names: List[str], times: int) -> List[str]:
    return [n for n in names for _ in range(times)]


# The tuner models running a call with adapter_names= now: its names reach the layers through
# hooks on the model's modules, which any other call of the model running meanwhile would also
# get. A WeakSet, not a flag on the model: a copy taken during a call is not in a call.
# Re-entrant: merge_and_unload holds it across its merge_adapter, which takes it too.
_NAMES_LOCK = threading.RLock()
_NAMES_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# The PEFT model call (forward or generate) running in this context: [tuner, its adapter_names
# (None for a plain call), checked]. Set by AcceleratedMissModel._enable_peft_forward_hooks, which PeftModel's
# forward and generate enter. A layer about to change the model during a forward (PEFT's rule:
# a disabled, merged layer unmerges) first has every other layer checked through it, so that a
# refusal further on cannot leave the model half changed (see _check_before_unmerging).
_MODEL_CALL = contextvars.ContextVar("miss_ext_peft_model_call", default=None)


@contextmanager
def _model_call(model: nn.Module, names: Optional[List[str]]):
    # Dynamo cannot trace a ContextVar's set/reset ("ContextVar mutation not supported"), which
    # broke torch.compile(fullgraph=True) and strict torch.export of the whole PeftModel: under
    # them the call is not recorded, and the layers' per-layer refusals stay as before (a refusal
    # from a compiled graph may come after a disabled merged layer has unmerged).
    if torch.compiler.is_compiling():
        yield None
        return
    record = [model, names, False]  # the last: checked already in this call
    token = _MODEL_CALL.set(record)
    try:
        yield record
    finally:
        _MODEL_CALL.reset(token)


def _plain_call(model: nn.Module):
    """A call of the tuner (its forward, or a base-model method through it) without adapter_names=:
    recorded as a plain model call where this context runs no model call yet (another thread's,
    whose forwards a running names call's hooks must leave alone). Inside a call it is that call's
    own step (PeftModel.forward calls the tuner, PeftModel.generate the base model's generate),
    and nothing changes."""
    if torch.compiler.is_compiling() or _MODEL_CALL.get() is not None:
        return contextlib.nullcontext()
    return _model_call(model, None)


# Merges and unmerges of accelerated layers, one at a time across threads: a forward under
# disable_adapter() unmerges a merged layer (PEFT's rule), and two threads doing that at once
# would both read the same merged adapter and subtract it twice. No lock while torch.compile
# traces. The one lock of MissLinear's merges and of both layers' state_dict records too
# (merge_record.MERGE_LOCK).
_merging = merge_record.merging


class _EveryRow(list):
    """adapter_names for a layer of a model whose layers see rows other than its sequences
    (bank.RowLayout), when every sequence names the same adapter: that one name, for every row of
    the layer's input, however many it has."""


class _CallHolder(dict):
    """What an adapter_names= call's hooks share: its names, the modules it hooked, where it
    started, and its record in _MODEL_CALL ("record"). A copy of the model taken during the call (an
    EMA or debug copy in a hook: deepcopy or pickle) copies the hooks with an inert holder, "done"
    from the start: the copy is no part of the call (a copied holder kept each later forward's
    frame, and a shared one let the copy's forwards replace the call's checkpoint record: the
    call then trained through a checkpoint it must refuse; reviews, 2026-12-05)."""

    def __deepcopy__(self, memo):
        return _inert_holder()

    def __reduce__(self):
        return _inert_holder, ()


def _inert_holder() -> "_CallHolder":
    return _CallHolder(done=True, hooked=set(), names=[], regrouped=False)


def _outside_the_call(holder: "_CallHolder") -> bool:
    """Whether a hook of an adapter_names= call runs outside that call: after it ended, in a copy
    of the model (an inert holder), or in another context (thread, coroutine) or a plain call
    nested in it (the current _MODEL_CALL record is not the call's). Such a forward is no part of
    the call and must neither get its names nor touch its checkpoint record: another thread's
    plain call got the names, silently (a review, 2026-12-05), as did one of the base model or
    its generate called directly. Under torch.compile the call is not recorded (_model_call), so
    only "done" counts there. Eagerly, a hook that runs before the call has its record (the hooks
    are registered first) runs in no part of it: the call's own forwards start after that, and
    another thread's forward in that window got the names (a concurrency hunt, 2026-12-07: 196 of
    6,414 plain calls, up to 8.0 off; direct base-model calls ran with them instead of raising)."""
    if holder.get("done"):
        return True
    if torch.compiler.is_compiling():
        return False
    record = holder.get("record")
    return record is None or _MODEL_CALL.get() is not record


def _model_forward_hook(module, args, holder):
    if _outside_the_call(holder):
        # Another thread's or a copy's forward: its entry would replace the names call's, whose
        # layers then missed a checkpoint around them (a review, 2026-12-05: gradients 30 off).
        return
    # Not under torch.compile: a compiled graph recomputes what it traced, names included, and
    # has no frames to look at.
    grad = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    holder["entry"] = checkpoint_entry(sys._getframe(1)) if grad else None
    # What a compiled layer reads instead (a bool: Dynamo guards on it as a constant, where the
    # entry would have it guard on a frame): an entry was taken, so the model was called eagerly
    # with grad (a reentrant checkpoint inside disables grad for its forward). A model whose own
    # call is compiled takes none: a checkpoint around that call recomputes it with its names
    # (exact), which a check without the entry's frame would refuse.
    holder["eager_entry"] = grad


def _refuse_inside_checkpoint(module, holder) -> None:
    if inside_checkpoint(since=holder["entry"]):
        # The model-level check (_checkpointing) sees transformers' flag; torch's checkpoint, its
        # wrappers and other libraries' show here (miss_ext/_checkpointing.py). Their recompute
        # runs this layer without the names, after the call: every row with the active adapter,
        # silently (_refuse_recompute_without_names caught a layer whose input the checkpoint
        # saved; one fed a tensor made inside the checkpointed block, an MLP's down_proj, trained
        # the wrong adapter: a review, 2026-12-03).
        raise ValueError(f"{type(module).__name__}: adapter_names= cannot be combined with activation checkpointing "
                         "with grad enabled: this layer runs inside a checkpoint (torch.utils.checkpoint, a wrapper built "
                         "on it such as torch's checkpoint_wrapper, or another library's), whose recomputation in "
                         "backward() runs after this call, without the names. Remove the checkpointing, checkpoint "
                         "the whole model call (it is then recomputed with its names), or use miss_ext.load_bank / "
                         "mixed_batch and call backward() inside mixed_batch")


# A layer compiled inside activation checkpointing entered outside the compiled region, in a call
# with adapter_names= and grad (_checkpointing.traced_inside_checkpoint, at trace time): the check
# runs outside the layer's graph, a graph break. Why: such a checkpoint re-ran the graph in
# backward() after the call, without the names (the guard on the names call fails and Dynamo
# traces a graph without them): under a reentrant checkpoint every row took the active adapter,
# silently (a review, 2026-12-04: 25.3 off for gradients of 16.5, the other adapter no gradient);
# a non-reentrant one happened to fail torch's metadata check. A checkpoint inside the compiled
# region is traced with the names (exact) and breaks nothing.
_refuse_inside_checkpoint_outside_the_graph = torch.compiler.disable(
    _refuse_inside_checkpoint, reason="miss_ext: a layer of an accelerated PEFT model called with adapter_names= and "
    "grad enabled, compiled inside activation checkpointing entered outside the compiled region, checks outside the "
    "graph whether the checkpoint would recompute it without the names (README, 'Training several adapters in one "
    "batch'): compile the checkpointed module instead, compile without fullgraph=True, or train mixed batches with a "
    "bank (miss_ext.load_bank / mixed_batch)")


def _plain_model_call_here() -> bool:
    """Whether this context (thread, coroutine) runs a PeftModel call without adapter_names=: a
    call of the model in another thread while an adapter_names= call runs, which the call's
    per-call hooks also reach. Its layers run as in any plain call (a review, 2026-12-05: they got
    the other thread's names, silently). Not known under torch.compile (_model_call records
    nothing there), nor for a layer or the base model called directly, bypassing PeftModel."""
    if torch.compiler.is_compiling():
        return False
    call = _MODEL_CALL.get()
    return call is not None and call[1] is None


def _adapter_names_hook(module, args, kwargs, holder):
    if id(module) not in holder["hooked"] or _outside_the_call(holder):
        # A copy of a hooked module (deepcopy or pickle taken during the call) is not in the call,
        # nor is a call of the model in another thread: either runs as a plain call would.
        return args, kwargs
    if torch.compiler.is_compiling():
        if holder.get("eager_entry") and traced_inside_checkpoint():
            _refuse_inside_checkpoint_outside_the_graph(module, holder)
    elif holder.get("entry") is not None:
        _refuse_inside_checkpoint(module, holder)
    names = holder["names"]
    if holder.get("regrouped") and names:
        if isinstance(module, AcceleratedMissLinear):
            names = _EveryRow(names[:1])
        else:  # PEFT's modules_to_save wrapper: a name per row of its input
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            if isinstance(x, Tensor) and x.dim() >= 2:
                names = [names[0]] * x.shape[0]
    kwargs["adapter_names"] = names
    return args, kwargs


def _checkpointing(model: nn.Module) -> bool:
    """Whether a training forward of `model` would recompute layers in backward (transformers'
    gradient checkpointing: a module with gradient_checkpointing=True in training mode)."""
    return any(getattr(m, "gradient_checkpointing", False) is True and m.training for m in model.modules())


def _to_merge(layer: "AcceleratedMissLinear", adapter_names: Optional[List[str]]) -> List[str]:
    """The adapters a merge of this layer would write (check_adapters_to_merge without warnings),
    each once: a name given twice is merged once (PEFT would add it twice). Merging the active
    adapters (adapter_names None) refuses a repeated one (_refuse_repeated_active)."""
    names = layer._active_blocks() if adapter_names is None else adapter_names
    return [a for a in dict.fromkeys(names) if a in layer.miss_block and a not in layer.merged_adapters]


def _refuse_repeated_active(layer: PeftMissLinear, active: List[str]) -> None:
    """ValueError for an adapter active twice (`base_model.set_adapter(["a", "a"])`, which PEFT takes):
    PEFT's forward applies it twice and its merge adds it twice, while a merge here writes each
    adapter once, so the merged layer silently differed from the unmerged one (0.37 of the logits,
    and every later forward refused as a partial merge: a PEFT API review, 2026-12-05). A repeated
    name is refused, in the forward and in a merge of the active adapters, rather than applied
    twice: it is almost surely a slip (set_adapter(active + [new]) with new active already)."""
    if len(set(active)) != len(active):
        repeated = [a for a in dict.fromkeys(active) if active.count(a) > 1]
        raise ValueError(f"{type(layer).__name__}: adapter(s) {repeated} are active more than once (active adapters "
                         f"{list(layer.active_adapters)}): PEFT would apply and merge each of them that many times; "
                         "miss_ext refuses a repeated active adapter: set_adapter with each name once")


@contextmanager
def _blocks_kept(layer: PeftMissLinear):
    """Puts every block's own tensor back into its parameter after PEFT's delta functions
    (get_delta_weight, get_delta_weight_miss), which replace a half-precision CPU block's .data by
    a copy: mini by its tiled (r, out) copy (spec, "PEFT's known bugs"), the others by equal
    values in new memory (a parameter FSDP or a tied module shares would part from them). PEFT's
    merge, unmerge and forward for the bases that keep its code, its get_additive_delta (0.22)
    and the safe-merge check reach them. Only the blocks PEFT's cast rewrites (CPU, float16 or
    bfloat16; its condition): elsewhere nothing is assigned, as in PEFT, so a compiled forward of a
    base that keeps PEFT's code traces as before."""
    blocks = [(block, block.data) for block in layer.miss_block.values()
              if block.device.type == "cpu" and block.dtype in (torch.float16, torch.bfloat16)]
    try:
        yield
    finally:
        for block, data in blocks:
            block.data = data


def _peft_safe_merge_check(path: str, layer: PeftMissLinear, names: List[str]) -> None:
    """PEFT's MissLinear.merge(safe_merge=True) of `names` (0.21-0.22's loop: each adapter's delta,
    in PEFT's mode for it (_peft_mode), on a copy of the base weight as merged so far, rounded to
    its dtype, then checked), run on a copy without writing anything, for layers that keep PEFT's
    merge code: ValueError naming the layer and the adapter where a merged value would not be
    finite, before any layer of the model is merged."""
    if not names:
        return
    # A plain PEFT layer too (not only accelerated ones, whose delta functions keep the blocks).
    with _blocks_kept(layer):
        with torch.no_grad():
            weight = layer.get_base_weight().clone()
            dtype = weight.dtype
            for name in names:
                if _peft_mode(layer, name) == "bat":
                    weight += layer.get_delta_weight(name, weight)  # in place, in the weight's dtype, as PEFT
                else:
                    weight = layer.get_delta_weight_miss(name, weight)
                # Checked after the cast to the weight's dtype that PEFT's merge then stores (a non-finite
                # value stays one there): a value finite in float32 that overflows a float16 weight (a
                # review, 2026-12-05) would be merged as inf where PEFT's own check looks before that cast.
                weight = weight.to(dtype)
                if not torch.isfinite(weight).all():
                    raise ValueError(f"{path}: NaNs detected in the merged weights ({non_finite_summary(weight)}, "
                                     f"in {dtype}). The adapter {name} seems to be broken; no layer was merged")


def _refuse_shared_merge(layer: PeftMissLinear, names: List[str]) -> None:
    shared = getattr(layer, "_shared_with", None)
    if names and shared:
        raise ValueError(shared_weight_message(getattr(layer, "_layer_path", "this layer"), shared))


def _same_view(a: Optional[Tensor], b: Tensor) -> bool:
    """a and b view the same memory the same way (a checkpoint recomputes on its saved input, or
    on a detached alias of it)."""
    return (a is not None and a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _adapter_of_key(key: str) -> Optional[str]:
    """The adapter a state-dict key of the tuner belongs to (`...miss_block.<name>`,
    `...modules_to_save.<name>.<tensor>`: PEFT's per-adapter tensors), or None for a key every
    adapter's rows use (base weights, trained biases, modules_to_save's original_module)."""
    for field in ("miss_block", "modules_to_save"):
        _, found, tail = key.partition(f".{field}.")
        if not found and key.startswith(f"{field}."):
            found, tail = True, key[len(field) + 1:]
        if found and tail:
            return tail.split(".", 1)[0]
    return None


def _refuse_extra_arguments(where: str, args: tuple, kwargs: dict) -> None:
    """TypeError for extra forward arguments to a plain nn.Linear base, which takes the input only
    (PEFT's bat path would drop them silently)."""
    if args or kwargs:
        raise TypeError(f"{where}: the base layer is an nn.Linear, which takes the input only; got extra arguments "
                        f"{args!r} {kwargs!r}")


def _is_bat(block: Tensor) -> bool:
    return block.dim() == 3


def _peft_init(layer: PeftMissLinear, name: str, default: object = None) -> object:
    """PEFT's MissLinear.miss_fn for adapter `name`, the init_weights PEFT's own forward and merge
    read for it: from PEFT 0.22 the adapter's own (a dict by adapter name), before the layer's
    first adapter's (one value for the layer); `default` where there is none."""
    init = getattr(layer, "miss_fn", default)
    return init.get(name, default) if isinstance(init, dict) else init


def _mode_rule(layer: PeftMissLinear) -> str:
    """Which mode the layer's PEFT applies to an adapter, in words (for messages)."""
    return ("PEFT takes each adapter's own init_weights" if isinstance(getattr(layer, "miss_fn", None), dict) else
            "PEFT before 0.22 takes the layer's first adapter's mode for every adapter")


def _peft_mode(layer: PeftMissLinear, name: str) -> str:
    """The mode PEFT's own forward and merge apply to adapter `name` (_peft_init)."""
    return _init_mode(_peft_init(layer, name))


def _init_mode(init_weights: object) -> str:
    """The mode of PEFT's init_weights value ("bat", "mini"; True / False: the default mode)."""
    return init_weights if init_weights in ("bat", "mini") else "default"


def _runs_in_peft_mode(layer: PeftMissLinear, name: str) -> bool:
    """Whether PEFT's own forward and merge compute adapter `name` in the mode its block's shape
    says, in the mode they take for it (_peft_mode: its own from PEFT 0.22, the layer's first
    adapter's before)."""
    block, mode = layer.miss_block[name], _peft_mode(layer, name)
    if mode == "bat" or _is_bat(block):
        return mode == "bat" and _is_bat(block)
    if mode == "mini":  # PEFT tiles the block out // miss_mini_r[name] times along out
        return layer.miss_mini_r.get(name) == block.shape[1] and layer.out_features % block.shape[1] == 0
    return block.shape[1] == layer.out_features


# What a refused computation with an accelerated layer's weight says to do: the computing code is
# the model's (its parent's), which the user does not edit.
_PARENT_HINT = ("The model's own code (its class source names this layer's weight or hands the layer on: "
                "base_layers.parent_reads_child_tensors, ancestor_reads_layer_tensors) may do so, so an adapter on this "
                "layer cannot run: leave it out of target_modules (PEFT's layer hands out the base weight there and "
                "silently ignores or mis-scales the adapter)")


# PEFT 0.22's LoRA conversion reads a layer's delta through get_additive_delta, which refuses
# (ValueError) while any adapter of the layer is merged; 0.21's read bat's from the weight as it is.
_PEFT_REFUSES_MERGED_DELTA = hasattr(PeftMissLinear, "get_additive_delta")


class AcceleratedMissLinear(PeftMissLinear):
    """PEFT's MissLinear with forward, merge and unmerge on `torch.ops.miss`. Never constructed:
    `accelerate` converts existing PEFT layers by swapping their class."""

    def update_layer(self, adapter_name: str, r: int, config, *args, **kwargs) -> None:
        """PEFT's (add_adapter on an accelerated layer), recording the adapter's init_weights for
        reset_parameters."""
        super().update_layer(adapter_name, r, config, *args, **kwargs)
        self.__dict__.setdefault("_miss_init_weights", {})[adapter_name] = config.init_weights

    def reset_parameters(self) -> None:
        """Initialises every adapter's block again as PEFT's update_layer did: zeros (a truthy
        init_weights: True, "bat", "mini"; the layer then computes its base exactly) or PEFT's
        kaiming-uniform (a falsy one: False). Only the blocks: the base layer is a child module
        with its own reset_parameters. Why: a model built on the meta device (FSDP2's usual setup)
        and materialised with to_empty() is initialised by calling reset_parameters() on every
        module that has one; without it the blocks kept uninitialised memory (NaN logits: a
        lifecycle review, 2026-12-06; PEFT's own layers keep that gap, miss_ext.MissLinear has had
        this since 2026-12-04). An adapter's init_weights comes from its config, recorded by
        accelerate() (from the tuner's peft_config) and by update_layer (add_adapter on an
        accelerated layer), kept across restore(). Where none was recorded (adapters added before
        accelerate() to a model without its PEFT tuner: inject_adapter_in_model), a bat block
        (3-D) is zeros, PEFT's only bat init, and another block takes PEFT's miss_fn: from PEFT
        0.22 the adapter's own init_weights, before the layer's first adapter's. Under the merge lock;
        RuntimeError for a merged layer (its weight holds the blocks' update: unmerge first),
        nothing changed."""
        with _merging():
            if self.merged:
                raise RuntimeError(f"AcceleratedMissLinear: reset_parameters() with {self.merged_adapters} merged "
                                   "would leave their update in the weight; unmerge_adapter() first" + _LAYER_BY_LAYER)
            recorded = self.__dict__.get("_miss_init_weights", {})
            with torch.no_grad():
                for name, block in self.miss_block.items():
                    if name in recorded:
                        random = not recorded[name]
                    else:
                        random = not _is_bat(block) and not _peft_init(self, name, True)
                    if random:
                        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
                    else:
                        block.zero_()

    def get_delta_weight(self, adapter, orig_weight, reverse: bool = False) -> Tensor:
        """PEFT's (bat: the weight's additive update), leaving the block as it is (_blocks_kept)."""
        with _blocks_kept(self):
            return super().get_delta_weight(adapter, orig_weight, reverse)

    def get_delta_weight_miss(self, adapter, orig_weight, reverse: bool = False) -> Tensor:
        """PEFT's (default/mini: the whole merged weight), leaving the block as it is
        (_blocks_kept): PEFT's own rewrites a half-precision CPU mini block to its tiled (r, out)
        copy, a bug the spec lists, which PEFT 0.22's get_additive_delta (a query, for LoRA
        conversion) reaches too: the layer then ran the default mode, save_pretrained wrote a file
        PEFT refuses, and the next optimizer step crashed (an odd-input hunt, 2026-12-07)."""
        with _blocks_kept(self):
            return super().get_delta_weight_miss(adapter, orig_weight, reverse)

    def _fast_path(self) -> bool:
        """The miss ops replace `base_layer(x)` only when that is exactly F.linear(x, W, b)
        (miss_ext.modules.is_plain_linear: no subclass with a computation of its own, no hooks,
        parametrization or tensor-subclass weight)."""
        return self.quantization_backend is None and is_plain_linear(self.base_layer)

    # Where the model's code reads this layer's weight for a path of its own instead of calling
    # the layer (nn.TransformerEncoderLayer's inference fast path, which would run the base
    # weight and silently drop the adapter, as it does for PEFT's layers; a parent or ancestor
    # whose source names the weight), `accelerate` sets this: .weight and .bias then give the base
    # tensors' metadata (as miss_ext.MissLinear always does), a tensor subclass that turns that
    # fast path off, so the parent calls the layer, and refuses computations.
    _base_tensors_as_metadata = False
    _metadata_where = "AcceleratedMissLinear"  # with the layer's path where accelerate sets the flag
    # True on a layer (its __dict__) while a model call with adapter_names= runs: read in forward,
    # so that torch.compile guards on it. The names come through per-call forward pre-hooks, and
    # Dynamo does not guard on hooks (torch._dynamo.config.skip_nnmodule_hook_guards): a graph
    # traced for a plain call was reused by a later call with names, every row then running the
    # active adapter (names, then none, then names: a review of 2026-12-03, 0.51 off).
    _names_call = False

    @property
    def weight(self) -> Tensor:
        """PEFT's: the base layer's weight; where the model's code reads it (a parent's fast path,
        as nn.TransformerEncoderLayer's, or a class source naming it: see accelerate), its
        metadata only (dtype, device, shape, .data; computing with it raises RuntimeError)."""
        if self._base_tensors_as_metadata:
            return base_tensor_attribute(self.get_base_layer(), self._metadata_where, "weight", True, _PARENT_HINT)
        return super().weight

    @property
    def bias(self) -> Optional[Tensor]:
        """As `weight`, for the base layer's bias (None without one)."""
        if self._base_tensors_as_metadata:
            return base_tensor_attribute(self.get_base_layer(), self._metadata_where, "bias", True, _PARENT_HINT)
        return super().bias

    def __getstate__(self):
        # The weak references of _refuse_recompute_without_names cannot be pickled, and a copy's
        # inputs are not this layer's: a copy or pickle starts without them. A copy taken during a
        # call with adapter_names= is not in that call (_names_call).
        state = super().__getstate__()
        state.pop("_inputs_with_names", None)
        state.pop("_names_call", None)
        return state

    def _dropout_p(self, adapter: str) -> float:
        """The adapter's dropout rate in this forward; ValueError for a rate above 1 (nn.Dropout
        checks p when built, not when set later), before any dropout key is drawn, as torch's
        dropout refuses it before drawing (the ops would refuse it after the draw). TypeError for a
        miss_dropout module other than PEFT's nn.Dropout / nn.Identity: the ops draw nn.Dropout's
        mask themselves, so any other module (a subclass, AlphaDropout, a Sequential) was ignored,
        silently (a review, 2026-12-07). A subclass that keeps nn.Dropout's forward is nn.Dropout."""
        dropout = self.miss_dropout[adapter]
        if not (isinstance(dropout, nn.Dropout) and type(dropout).forward is nn.Dropout.forward) \
                and type(dropout) is not nn.Identity:
            raise TypeError(f"{type(self).__name__}: adapter {adapter!r} has miss_dropout {type(dropout).__name__}; "
                            "the accelerated layers apply nn.Dropout(p) (or nn.Identity, no dropout), the modules "
                            "PEFT makes: set one of those, or run PEFT's own code (miss_ext.peft.restore(model))")
        p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        if p > 1.0:
            raise ValueError(f"{type(self).__name__}: adapter {adapter!r} has dropout p={p}, not a probability in "
                             "[0, 1]")
        return p

    def _active_blocks(self) -> List[str]:
        active = [a for a in self.active_adapters if a in self.miss_block]
        _refuse_repeated_active(self, active)
        _refuse_blocks_unlike_their_record(self, active)
        return active

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's; ValueError, nothing changed, for an adapter merged into this layer's base weight:
        its block is what unmerging subtracts. PeftModel.delete_adapter refuses that for the model,
        but transformers' model.delete_adapter (peft.functional.delete_adapter) did not, and a
        later unmerge then left the deleted adapter's delta in the weight silently (a review,
        2026-12-07). Inside that function's loop over a model's layers, every layer of the model is
        checked at its first layer, so that a merge in a later layer refuses before any block is
        gone (layers are merged one by one there: transformers has no model-level merge)."""
        model, names = _functional_delete_call(adapter_name)
        layers = [("", self)] if model is None else [
            (path, m) for path, m in model.named_modules() if isinstance(m, PeftMissLinear)]
        merged = {name: [path or "this layer" for path, m in layers
                         if name in (getattr(m, "merged_adapters", None) or ())] for name in names}
        merged = {name: paths for name, paths in merged.items() if paths}
        if merged:
            raise ValueError(f"{type(self).__name__}: cannot delete " + "; ".join(
                f"adapter {name!r} while it is merged into the base weight of {describe(paths)}"
                for name, paths in merged.items()) + " (a block is what unmerging subtracts): unmerge first (unmerge() "
                "on those layers, or unmerge_adapter()). No MiSS layer's adapter was deleted")
        super().delete_adapter(adapter_name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """PEFT's MissLinear.forward on the miss ops: x (..., in_features) -> (..., out_features)
        in x's dtype; active bat adapters act on the weight first, in order, then the default/mini
        terms are added (docs/miss.md, "Several adapters on one layer"). A base that is not a plain
        nn.Linear (quantized, hooked, subclassed) runs PEFT's own forward, extra arguments too,
        where PEFT computes every active adapter in its own mode (_runs_in_peft_mode: always from
        PEFT 0.22; before, only the layer's first adapter's mode); otherwise default/mini terms are
        added to the base's output here, and a bat adapter beside them raises ValueError
        (_forward_in_own_modes).

        adapter_names= (a list of str, one per sequence, "__base__" for the base): each row with
        its own adapter (miss.bank_fold + miss.bank_add); rows naming an adapter this layer lacks
        get the base output. Errors: TypeError for alora_offsets=, extra arguments to a plain
        nn.Linear base, adapter_names that is not a list of str, or a row naming a bat adapter;
        ValueError for a bat adapter beside adapters of another mode on a base that is not a plain
        nn.Linear, adapter_names of another length than x.shape[0], adapter_names while some
        adapter is merged, a merged layer whose merged adapters are not exactly its active ones
        (huggingface/peft#3756), or a recompute inside backward() (activation checkpointing) of
        an input a call with adapter_names= saw; on a plain nn.Linear base the miss ops' ValueError /
        TypeError for a bad x."""
        refuse_per_row_arguments(kwargs, f"{type(self).__name__}.forward")
        for name in _PER_ROW_ARGUMENTS:  # None means "not given", as at model level
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        adapter_names = kwargs.pop("adapter_names", None)
        if self._names_call and adapter_names is None and not _plain_model_call_here():
            raise RuntimeError(f"{type(self).__name__}.forward: a model call with adapter_names= is running but its "
                               "names did not reach this layer (a compiled graph traced without them, or the base "
                               "model or its layers called directly from another thread while that call runs: call "
                               "the PeftModel, or one call at a time)")
        if isinstance(x, Tensor) and x.is_nested:
            # Run on the packed rows (modules.jagged_forward); one name for every row routes them,
            # per-sequence names do not reach a packed row's sequence.
            if adapter_names is not None and not isinstance(adapter_names, _EveryRow) and not self.disable_adapters:
                refuse_nested(x, f"{type(self).__name__}.forward with adapter_names=")
            if adapter_names is not None:
                kwargs["adapter_names"] = adapter_names
            return jagged_forward(x, lambda rows: self.forward(rows, *args, **kwargs), f"{type(self).__name__}.forward")
        if not torch.compiler.is_compiling():
            self._refuse_recompute_without_names(x, adapter_names)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged and not self.disable_adapters:
            self._refuse_partial_merge()
        if self.merged and self.disable_adapters and not torch.compiler.is_compiling():
            call = _MODEL_CALL.get()
            if call is not None and not call[2]:  # once per call: the next layers' unmerges were checked too
                call[0]._check_before_unmerging(call[1])
                call[2] = True
        if (args or kwargs) and self._fast_path():  # no second is_plain_linear on the common call
            _refuse_extra_arguments(f"{type(self).__name__}.forward", args, kwargs)
        if args or kwargs or not self._fast_path():
            adapted = not self.disable_adapters and not self.merged and bool(self._active_blocks())
            if adapted:
                # PEFT's forward folds any width: a base fed a part of x (torch's RowwiseParallel
                # on base_layer) got the whole layer's term folded from that part, silently.
                check_widths(self, x)
                if not all(_runs_in_peft_mode(self, name) for name in self._active_blocks()):
                    return self._forward_in_own_modes(x, *args, **kwargs)
            result = super().forward(x, *args, **kwargs)
            if adapted and isinstance(result, Tensor):
                # A base returning a part of the output (ColwiseParallel) mostly fails in PEFT's
                # sum, but a part of width 1 broadcasts there: refused after the fact.
                check_widths(self, x, result)
            return result
        previous_dtype = x.dtype
        if self.disable_adapters and self.merged:
            with _merging():
                if self.merged:  # another thread may have unmerged it meanwhile
                    self.unmerge()
        active = [] if self.disable_adapters or self.merged else self._active_blocks()
        if not active:
            return self.base_layer(x).to(previous_dtype)
        return self._forward_on_ops(x, active)

    def _forward_on_ops(self, x: Tensor, active: List[str]) -> Tensor:
        """The forward with `active` adapters on the miss ops, for a plain nn.Linear base (global
        module hooks aside where a bat adapter is active: its path never calls the base)."""
        previous_dtype = x.dtype
        base, blocks = self.base_layer, self.miss_block  # each lookup is nn.Module.__getattr__'s (0.4 us)
        weight, bias = base.weight, base.bias
        _refuse_resized_base(self, weight)
        bats, shards = [], []
        for name in active:
            block = blocks[name]
            if _is_bat(block):
                bats.append(block)
            else:
                shards.append((block, self._dropout_p(name)))
        # The common cases are one fused op each.
        if not bats and len(shards) == 1:
            block, p = shards[0]
            if p > 0.0:
                check_before_dropout_key(x, weight, bias, block, self.in_features)  # a refusal keeps the RNG
            return torch.ops.miss.linear(x, weight, bias, block, p, new_dropout_key(x.device) if p > 0.0 else None)
        if not shards:
            # PEFT's W + delta: in promote(weight, block) (bat_linear's own compute dtype too).
            for block in bats[:-1]:
                weight = torch.ops.miss.bat_weight(weight, block, torch.promote_types(weight.dtype, block.dtype))
            return torch.ops.miss.bat_linear(x, weight, bias, bats[-1], None)
        # Several default/mini adapters, possibly on top of bat ones: PEFT's precision (adapter
        # terms in the block dtype, added to the base result, one final cast).
        if bats:
            for block in bats:
                weight = torch.ops.miss.bat_weight(weight, block, torch.promote_types(weight.dtype, block.dtype))
            result = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        else:
            result = self.base_layer(x)
            check_base_output(self, result, x)
        return self._add_terms(result, x, shards).to(previous_dtype)

    def _add_terms(self, result: Tensor, x: Tensor, shards: List) -> Tensor:
        """result + each default/mini adapter's term, (block, dropout p) in `shards`, in the
        block's dtype (PEFT's precision); out of place."""
        # Before the first draw: a refusal leaves the RNG as it was.
        refuse_forward_tangents(f"{type(self).__name__}.forward", x, *(block for block, _ in shards))
        for block, p in shards:
            folded = torch.ops.miss.fold(x, block.shape[0], p, new_dropout_key(x.device) if p > 0.0 else None, block.dtype)
            term = folded @ autocast_mini_block(block, x, self.out_features)  # repeated first under autocast
            if term.shape[-1] != self.out_features:  # mini: tile (rows, mini_r) along the output axis
                term = term.repeat([1] * (term.dim() - 1) + [self.out_features // term.shape[-1]])
            result = result + term
        return result

    def _forward_in_own_modes(self, x: Tensor, *args, **kwargs) -> Tensor:
        """A base that is not a plain nn.Linear, with active adapters that PEFT's forward would
        compute in another mode than their blocks' (_runs_in_peft_mode: before PEFT 0.22 it takes
        every adapter in the layer's first adapter's mode, so it would crash, or silently run a
        default block as a bat one). Default and mini adapters need only the base's output: the base
        is called (extra arguments too) and each term added in its own mode. A bat adapter needs the
        weight: on a base that is plain but for global module hooks (FlopCounterMode), the ops run it
        (its path never calls the base); otherwise ValueError, before anything runs or any dropout
        key is drawn."""
        active = self._active_blocks()
        bats = [name for name in active if _is_bat(self.miss_block[name])]
        if bats and self.quantization_backend is None and is_plain_linear(self.base_layer, global_hooks=False):
            # A plain base under global module hooks (FlopCounterMode, profilers): the bat path
            # computes from the weight and never calls the base, as PEFT's, so the ops can run it.
            _refuse_extra_arguments(f"{type(self).__name__}.forward", args, kwargs)  # as without the hooks
            return self._forward_on_ops(x, active)
        if bats:
            odd = {name: _peft_mode(self, name) for name in active if not _runs_in_peft_mode(self, name)}
            raise ValueError(
                f"{type(self).__name__}: bat adapter(s) {bats} cannot run with active adapters {active} on this layer: "
                f"its base is not a plain nn.Linear ({type_name(self.base_layer)}: "
                f"{not_plain_reason(self.base_layer, global_hooks=False) or 'a quantization backend'}), so only PEFT's "
                f"own forward can apply a bat adapter, and it would compute {list(odd)} in mode(s) "
                f"{list(odd.values())}, not their blocks' ({_mode_rule(self)}), which would be wrong here; run bat "
                "adapters only with adapters PEFT computes in their own modes (set_adapter)")
        shards = [(self.miss_block[name], self._dropout_p(name)) for name in active]
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        check_widths(self, x, result)
        return self._add_terms(result, x, shards).to(previous_dtype)

    def _refuse_partial_merge(self) -> None:
        """A merged layer computes with its merged weight alone (PEFT's rule), so its output is the
        active adapters' only when exactly they are merged. After merge_adapter(adapter_names=[...])
        naming a subset of them, or an adapter that is not active, PEFT silently drops the active
        unmerged adapters or applies the merged inactive one (huggingface/peft#3756, documented
        there, to change in PEFT 1.0): ValueError here instead. merge_and_unload(adapter_names=...)
        runs no forward, so merging a subset into an unloaded model stays possible."""
        # A merged adapter whose block is gone: neither advice below can work (a review, 2026-12-07).
        _refuse_merged_without_block(self, self.merged_adapters)
        active = self._active_blocks()
        if sorted(active) != sorted(self.merged_adapters):
            raise ValueError(f"{type(self).__name__}: adapters {list(self.merged_adapters)} are merged while "
                             f"{active} are active, so the merged weight alone (PEFT's forward) would not be the "
                             "active adapters' output (PEFT silently computes it anyway: huggingface/peft#3756); "
                             "merge every active adapter, or unmerge_adapter() first" + _LAYER_BY_LAYER)
        self._refuse_merge_order()

    def _refuse_merge_order(self) -> None:
        """ValueError where the merged weight was written in an order the forward does not compute:
        the forward applies every bat adapter to the weight first, in the active order (bat
        updates do not commute with each other, nor with the default/mini updates), then adds the
        default/mini terms. Checked before a merged layer's forward and before merge_and_unload
        keeps its weight."""
        # A merged checkpoint loaded into a model whose active order differs, set_adapter on the
        # layers, or a PEFT merge in another order then accelerate gave the other order's output,
        # silently (0.69 of the logits apart: a PEFT API review, 2026-12-05; PEFT computes it so
        # too). PEFT 0.22 merges a layer's adapters in the active order whatever their modes, so
        # its merge_adapter() of active [default, bat] writes bat(W + dW) where the forward
        # computes bat(W) + dW (0.31 apart; a PEFT 0.22 user trial, 2026-12-07).
        merged = [a for a in self.merged_adapters if a in self.miss_block]
        bats_merged = [a for a in merged if _is_bat(self.miss_block[a])]
        first_shard = next((i for i, a in enumerate(merged) if a not in bats_merged), len(merged))
        late = [a for a in merged[first_shard:] if a in bats_merged]
        if late:
            raise ValueError(f"{type(self).__name__}: adapters {merged} are merged in that order: bat adapter(s) "
                             f"{late} after the default/mini adapter {merged[first_shard]!r}, so the weight holds "
                             "bat(W + dW) where the forward computes bat(W) + dW (PEFT's merge loop writes its "
                             "active order; PEFT silently computes it anyway); unmerge_adapter() and merge again "
                             "with miss_ext, which merges bat adapters first" + _LAYER_BY_LAYER)
        bats_active = [a for a in dict.fromkeys(self.active_adapters) if a in bats_merged]
        if bats_active != [a for a in bats_merged if a in bats_active]:
            raise ValueError(f"{type(self).__name__}: bat adapters {bats_merged} are merged in that order while the "
                             f"active order is {bats_active}; bat updates do not commute, so the merged weight is not "
                             "the active adapters' output (PEFT silently computes it anyway); unmerge_adapter() and "
                             "merge again, or set_adapter in the merged order" + _LAYER_BY_LAYER)

    def _refuse_names_here(self, names: List[str], where: str) -> None:
        """The refusals of a mixed-batch forward that depend on this layer's state, not on its input:
        merged adapters (ValueError) and bat adapters named by a row (TypeError). `names` may hold
        each name once (the forward passes them so)."""
        if self.merged:
            raise ValueError(f"{where}: cannot pass adapter_names while adapters {self.merged_adapters} are merged; "
                             "unmerge_adapter() first" + _LAYER_BY_LAYER)
        blocks = self.miss_block
        bats = [n for n in dict.fromkeys(names) if n in blocks and _is_bat(blocks[n])]
        if bats:
            raise TypeError(f"{where}: adapter_names uses bat adapter(s) {bats}: bat changes the base weight itself, "
                            "so rows of different adapters cannot share one base GEMM; run them in their own batch "
                            "(set_adapter)")

    def _refuse_recompute_without_names(self, x: Tensor, adapter_names: object) -> None:
        """Activation checkpointing recomputes a layer inside backward(), after the model call
        whose adapter_names reached the layers through hooks has returned: the recompute would
        silently run every row with the active adapter, and train it. The model-level check
        (_checkpointing) sees transformers' flag only; torch.utils.checkpoint and its wrappers
        show here: a forward without names, run by the autograd engine, on an input that a
        forward with names saw. Inputs are remembered by weak reference, so only while
        something (a checkpoint) keeps them alive: their memory cannot be another tensor's then."""
        seen = [ref for ref in self.__dict__.get("_inputs_with_names", ()) if ref() is not None]
        if adapter_names is not None:
            # Once per live input: the same tensor passed again (a direct layer loop, T5's
            # encoder_hidden_states at every uncached decoding step) must not grow the list.
            if not any(ref() is x for ref in seen):
                seen.append(weakref.ref(x))
        elif seen and torch._C._current_graph_task_id() != -1 and any(_same_view(ref(), x) for ref in seen):
            raise ValueError(f"{type(self).__name__}: this layer is being recomputed inside backward() (activation "
                             "checkpointing) without the adapter_names= of its forward, so its rows would silently "
                             "use the active adapter: adapter_names= cannot be combined with activation checkpointing "
                             "in training; disable the checkpointing, or use miss_ext.load_bank / mixed_batch and call "
                             "backward() inside mixed_batch")
        self.__dict__["_inputs_with_names"] = seen

    def _mixed_batch_forward(self, x: Tensor, adapter_names: object, *args, **kwargs) -> Tensor:
        """Each sequence i of x with adapter adapter_names[i] (see the module docstring)."""
        where = f"{type(self).__name__}.forward"
        every_row = isinstance(adapter_names, _EveryRow)
        names = check_adapter_names(adapter_names, where)
        if not every_row and (x.dim() < 2 or len(names) != x.shape[0]):
            message = (f"{where}: adapter_names has {_entries(len(names))} but the input has "
                       f"{x.shape[0] if x.dim() else 0} sequences (shape {tuple(x.shape)}); give one per sequence")
            if x.dim() == 2 and x.shape[0] > len(names) > 0:
                message += "." + flattened_tokens_hint(x)  # as MissBankLinear says it (bank.row_index)
            elif x.dim() > 2 and x.shape[0] > len(names) > 0 and x.shape[0] % len(names) == 0:
                # PeftModel.generate already repeats the names for beam search: only the model's own
                # repeats and regroupings are left to say.
                message += ":" + repeated_batch_hint()
            raise ValueError(message)
        unique = list(dict.fromkeys(names))  # each name once: one lookup each below, not one per row
        self._refuse_names_here(unique, where)
        if (args or kwargs) and self._fast_path():
            _refuse_extra_arguments(where, args, kwargs)
        blocks_of = self.miss_block
        used = [n for n in unique if n in blocks_of]  # others: base output here
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        result = _with_unnamed_trainable_blocks(self, result, used)
        if not used:
            return result.to(previous_dtype)
        check_base_output(self, result, x)
        # A bank of the named adapters' blocks, zero-padded to the largest r and width; stacked
        # (differentiably) on every call, as the blocks may be trained in place between calls.
        blocks = [self.miss_block[n] for n in used]
        max_r = max(b.shape[0] for b in blocks)
        max_q = max(b.shape[1] for b in blocks)
        dtype = blocks[0].dtype
        for b in blocks[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        bank = torch.stack([F.pad(b.to(dtype), (0, max_q - b.shape[1], 0, max_r - b.shape[0])) for b in blocks])
        slot_of = {n: i for i, n in enumerate(used)}
        # ranks, periods and the per-row index in one host-to-device copy; the rates as float64.
        k = len(used)
        rows = list(map(slot_of.get, names, itertools.repeat(-1)))
        ints = host_to_device(torch.tensor([b.shape[0] for b in blocks] + [b.shape[1] for b in blocks] + rows,
                                           dtype=torch.int64), bank.device)
        ranks, periods = ints[:k], ints[k:2 * k]
        index = row_index(ints[2 * k] if every_row else ints[2 * k:], x, where)
        # Dropout (training with some p > 0): each adapter its own rate, one key for the call.
        rates = [self._dropout_p(n) for n in used]
        dropouts = host_to_device(torch.tensor(rates, dtype=torch.float64), bank.device) if any(rates) else None
        # In place only into a plain nn.Linear's fresh output (a hooked or quantized base's output
        # may be held elsewhere).
        return add_bank_terms(result, x, bank, ranks, periods, index, dropouts,
                              inplace=self._fast_path()).to(previous_dtype)

    def _merge_plan(self, adapter_names: Optional[List[str]]) -> List[str]:
        """The adapters merge() writes, in the order it writes them, after every check that can
        refuse the merge; ValueError, writing nothing, otherwise. The order is the forward's: bat
        adapters act on the weight first, in the active order (bat updates do not commute), then
        the default/mini terms. A merge that cannot keep that order (a bat on top of a merged
        default/mini adapter, or before an already merged bat that the forward applies after it)
        is refused rather than giving a merged layer that differs from the unmerged one."""
        names = _to_merge(self, adapter_names)
        if not names or self.__dict__.get("_never_runs"):
            return []  # a layer that never runs is not merged (_merge_holding_lock)
        # A shared base weight (tied embeddings): merging would change the other holders too.
        _refuse_shared_merge(self, names)
        # The base must take a merge, as for MissLinear (base_layers.merge_refusal): PEFT's merge code
        # writes base_layer.weight in place, which for a parametrized or sharded weight is a
        # temporary, and through hooks or a subclass forward the merged layer would not compute the
        # unmerged output. Also on the fast path: under FSDP2, after a forward that left the
        # parameters unsharded, the base is a plain nn.Linear holding FSDP's gathered copy, which
        # the next reshard drops. Quantized bases keep PEFT's merge code (it dequantizes and
        # requantizes), except under FSDP2.
        check_merge(self.base_layer, quantized=self.quantization_backend is not None)
        if self.quantization_backend is None:  # (a quantized weight's shape is its packed one)
            _refuse_resized_base(self, self.base_layer.weight)
        for name in names:
            why = block_merge_problem(self.miss_block[name], self.base_layer.weight)
            if why is not None:
                raise ValueError(f"cannot merge adapter {name!r}: {why}")
        if not self._fast_path():
            # PEFT's merge code (kept for such bases) merges in _peft_mode (before PEFT 0.22 every
            # adapter in the layer's first adapter's mode): an adapter of another mode would be
            # merged wrongly, silently.
            odd = [name for name in names if not _runs_in_peft_mode(self, name)]
            if odd:
                raise ValueError(f"cannot merge adapter(s) {odd} into a base that is not a plain nn.Linear "
                                 f"({type_name(self.base_layer)}): such bases keep PEFT's merge code, which would "
                                 f"merge them in mode(s) {[_peft_mode(self, name) for name in odd]}, not their "
                                 f"blocks' ({_mode_rule(self)})")
        position = {a: i for i, a in enumerate(self.active_adapters)}
        # sorted() is stable: bats that are not active keep the caller's order, after the active ones.
        bats = sorted((a for a in names if _is_bat(self.miss_block[a])), key=lambda a: position.get(a, len(position)))
        names = bats + [a for a in names if not _is_bat(self.miss_block[a])]
        merged = [a for a in self.merged_adapters if a in self.miss_block]
        merged_shards = [a for a in merged if not _is_bat(self.miss_block[a])]
        if bats and merged_shards:
            raise ValueError(f"cannot merge bat adapter {bats[0]!r} on top of merged default/mini adapters "
                             f"{merged_shards}: unmerge them first (bat acts on the weight before them)")
        for bat in bats:
            later = [a for a in merged if _is_bat(self.miss_block[a]) and position.get(a, -1) > position.get(bat, -1) >= 0]
            if later:
                raise ValueError(f"cannot merge bat adapter {bat!r} on top of merged bat adapter(s) {later}: the forward "
                                 f"applies {bat!r} first (active adapters {list(self.active_adapters)}) and bat updates "
                                 "do not commute; unmerge first, then merge them together")
        return names

    def _merged_weight(self, names: List[str]) -> Tensor:
        """The weight with `names` merged, in a new tensor; ValueError if a value is not finite."""
        merged = self.base_layer.weight
        for name in names:
            merged = torch.ops.miss.merge(merged, self.miss_block[name], False)
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights ({non_finite_summary(merged)}). The adapter "
                                 f"{name} seems to be broken; the weight was left unchanged")
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """PEFT's MissLinear.merge on the miss ops: merges `adapter_names` (default: the active
        adapters; one named twice merges once) into the base weight, bat adapters first in the
        active order. With safe_merge the merged weight is built in a copy and a non-finite value
        raises ValueError, the weight untouched. ValueError, nothing written, for a base weight
        shared with another module, a base that cannot take a merge (base_layers.merge_refusal), or a
        bat adapter on top of merged default/mini adapters or of a merged bat adapter the forward
        applies after it. Quantized bases keep PEFT's merge code. Source: docs/miss.md, "Merging"."""
        with _merging():  # planned and written as one step (another thread may merge too)
            try:
                self._merge_holding_lock(safe_merge, adapter_names)
            finally:  # a failure half way leaves the adapters merged before it
                _record_changed(self)

    def _merge_holding_lock(self, safe_merge: bool, adapter_names: Optional[List[str]]) -> None:
        if self.__dict__.get("_never_runs"):
            # Its parent (nn.MultiheadAttention) reads the weight instead of calling the layer, so
            # the unmerged adapter never runs (accelerate warned): a merge would make it act, and the
            # merged model differ from the unmerged one (0.44 of the outputs, and disable_adapter()
            # could not undo it: a model-zoo review, 2026-12-05). PEFT merges it.
            names = _to_merge(self, adapter_names)
            if names:
                warnings.warn(f"merge: skipped adapter(s) {names} on {self.__dict__.get('_never_runs')!r}: its parent "
                              "nn.MultiheadAttention reads the layer's weight instead of calling it, so the adapter "
                              "never runs unmerged, and merging it would change the model's output (PEFT merges "
                              "it); leave the layer out of target_modules", stacklevel=3)
            return
        names = self._merge_plan(adapter_names)
        if not self._fast_path():
            return super().merge(safe_merge=safe_merge, adapter_names=names)
        check_adapters_to_merge(self, adapter_names)  # PEFT's warning for adapters merged already
        if not names:
            return
        weight = self.base_layer.weight
        # The record follows each write, also when an interrupt lands between the two
        # (record_follows_write; a fault-injection sweep, 2026-12-06).
        with torch.no_grad():
            if safe_merge:
                merged = self._merged_weight(names)
                count = len(self.merged_adapters)
                with record_follows_write(weight, lambda: len(self.merged_adapters) > count,
                                          lambda: self.merged_adapters.extend(names)):
                    weight.copy_(merged)
                    self.merged_adapters.extend(names)
            else:
                for name in names:  # recorded one by one: a failure half way leaves the record true
                    count = len(self.merged_adapters)
                    with record_follows_write(weight, lambda count=count: len(self.merged_adapters) > count,
                                              lambda name=name: self.merged_adapters.append(name)):
                        torch.ops.miss.merge_(weight, self.miss_block[name], False)
                        self.merged_adapters.append(name)

    def _check_unmerge(self) -> None:
        """Every check unmerge() makes, before it writes: ValueError if a merged bat block's
        I + B_i is singular, ill-conditioned or not finite (the conditioning check of
        miss.merge_(reverse=True), run on an (out, r) stand-in weight so that nothing is written).
        Layers on quantized bases keep PEFT's unmerge code and are not checked here."""
        if self.quantization_backend is not None:
            return
        check_merge(self.base_layer, unmerge=True)  # a plain weight to write (hooks may have come since the merge)
        _refuse_merged_without_block(self, self.merged_adapters)
        _refuse_resized_base(self, self.base_layer.weight)
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in self.merged_adapters:
                block = self.miss_block[name] if name in self.miss_block else None
                if block is not None and _is_bat(block):
                    torch.ops.miss.merge(weight.new_zeros(weight.shape[0], block.shape[1]), block, True)

    def unmerge(self) -> None:
        """PEFT's MissLinear.unmerge on the miss ops: every merged adapter, last merged first (bat:
        W = (W' - B)(I + B)^-1). All or nothing: ValueError, nothing written, where a merged bat
        block's I + B_i is singular, ill-conditioned or not finite, or the weight cannot be
        written. Not merged: UserWarning, nothing done. Quantized bases keep PEFT's code."""
        # An unmerge only needs a plain weight to write (not a plain forward, as a merge does), so
        # a layer merged while plain and hooked since is unmerged here too: PEFT's code (before
        # 0.22) would apply one adapter's mode to all and pop merged_adapters before it computes.
        if self.quantization_backend is not None:
            with _merging():
                try:
                    return super().unmerge()
                finally:
                    _record_changed(self)
        with _merging():
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            # All or nothing: with a bat adapter that cannot be unmerged under a default/mini one,
            # the loop below would otherwise unmerge the latter and stop half way.
            self._check_unmerge()
            _unmerge_down_to(self, 0)


    # The names of the merged adapters, in merge order, travel in the state_dict (a uint8 tensor
    # of JSON under "merged_adapters", present only while some adapter is merged when
    # state_dict() runs, marked stale by later merges: merge_record), as MissLinear's
    # flag does (modules.load_merge_record): a merged layer's state_dict loaded into an unmerged
    # model no longer counts dW twice, which PEFT does. PEFT's adapter files are unchanged (its
    # save filters keys by "miss_"); a PEFT model without this class refuses the key under strict
    # loading.
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's convert_to_lora / save_as_lora ask this of every layer before converting any
        (PeftModel.supports_lora_conversion too, for "default"). Before PEFT 0.22 their MiSS
        converter reads the layer's first adapter's mode (miss_fn) for every adapter, so on a layer
        mixing modes (which runs here, not in that PEFT) it would write factors of the wrong shape
        or values without an error (0.22 reads each adapter's own mode: _runs_in_peft_mode); and for
        bat it takes the delta from the base weight as it is, which holds the merged adapters while
        any are merged (0.22 refuses that itself, with its ValueError, which is left to it). False
        for both, with a UserWarning saying why (convert_to_lora then raises TypeError); True
        otherwise (PEFT's answer).
        miss_ext.export_lora converts default/mini adapters exactly, whatever the layer's others."""
        block = self.miss_block[adapter_name] if adapter_name in self.miss_block else None
        why = None
        if block is not None and not _runs_in_peft_mode(self, adapter_name):
            mode = "bat" if _is_bat(block) else "default" if block.shape[1] == self.out_features else "mini"
            why = (f"adapter {adapter_name!r} is in mode {mode!r} (block {tuple(block.shape)}), and PEFT's converter "
                   f"would convert it in mode {_peft_mode(self, adapter_name)!r} ({_mode_rule(self)}) and write a "
                   f"wrong LoRA file; miss_ext.export_lora(model, path, adapter_name={adapter_name!r}) converts "
                   "default/mini adapters exactly")
        elif block is not None and _is_bat(block) and self.merged_adapters and not _PEFT_REFUSES_MERGED_DELTA:
            # PEFT 0.22's get_additive_delta raises its own ValueError while any adapter is merged.
            why = (f"bat adapter {adapter_name!r}'s delta would be read from the base weight, which holds merged "
                   f"adapters {list(self.merged_adapters)}: unmerge first")
        if why is not None:
            warnings.warn(f"PEFT's LoRA conversion is not supported here: {why}", stacklevel=2)
            return False
        return True

    MERGED_KEY = "merged_adapters"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged_adapters:
            destination[prefix + self.MERGED_KEY] = merge_record.new_record(lambda: json_tensor(list(self.merged_adapters)))

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """nn.Module's; a later merge or unmerge then marks its record stale (merge_record). Under
        the merge lock: a merge from another thread between the record and follow() went unseen."""
        with _merging():
            out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
            merge_record.follow(self, out, prefix + self.MERGED_KEY, prefix + "base_layer.weight",
                                list(self.merged_adapters))
        return out

    @staticmethod
    def _decode_record(encoded) -> list:
        """The adapter names of a saved MERGED_KEY record; ValueError for anything else."""
        try:
            names = tensor_json(encoded)
        except ValueError:  # tensor_json's own, UnicodeDecodeError and JSONDecodeError
            names = None
        if names == _STALE_RECORD:
            raise ValueError(merge_record.STALE)  # written by _mark_record_stale (merge_record)
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
            raise ValueError("must be a 1-D uint8 tensor of a JSON list of distinct adapter names")
        return names

    def _check_record_names(self, names) -> list:
        unknown = [n for n in names if n not in self.miss_block]
        if unknown:
            raise ValueError(f"names adapters {unknown} that this layer does not have ({list(self.miss_block)})")
        return list(names)

    def _load_refusal(self, state_dict, prefix: str, assign: bool) -> Optional[str]:
        """Why this layer would refuse to load from `state_dict` (modules.merge_record_refusal), or
        None; nothing changed."""
        return merge_record_refusal(self, state_dict, prefix, prefix + self.MERGED_KEY, list(self.merged_adapters),
                                    self._decode_record, assign, self.UNRECORDED, self._check_record_names)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with _merging():  # as MissLinear's load
            after = load_merge_record(
                self, state_dict, prefix, prefix + self.MERGED_KEY, list(self.merged_adapters), self._decode_record,
                strict, missing_keys, unexpected_keys, error_msgs,
                lambda: super(AcceleratedMissLinear, self)._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs),
                assign=local_metadata.get("assign_to_params_buffers", False), unrecorded=self.UNRECORDED,
                check=self._check_record_names)
            if after is not None:
                self.merged_adapters = list(after)
                _record_changed(self)

    # A state_dict of this layer written without the record (by plain PEFT, before accelerate or
    # after restore) may hold W + dW (saved merged) or W (saved unmerged): nothing in it tells which.
    # Into an unmerged layer it loads as unmerged (PEFT's rule); into a merged one either reading
    # could be wrong (dW counted twice, or dropped), so it is refused (a review, 2026-12-05: a plain
    # PEFT model's merged checkpoint loaded into the same model merged and accelerated was read as
    # unmerged, logits 0.05 off, silently).
    UNRECORDED = ("a state_dict without the record (this model's own while unmerged, or any written by plain PEFT or "
                  "before accelerate, merged or not) does not say whether its weight is W + dW or W, so loading it "
                  "here would count dW twice or drop it. Saved unmerged: unmerge_adapter() first. Saved merged with "
                  "these adapters: miss_ext.peft.restore(model), load_state_dict, then miss_ext.peft.accelerate(model)")


def _wrapper_merged_first(model: nn.Module, path: str, layer: nn.Module,
                          adapter_names: Optional[List[str]]) -> Optional[str]:
    """The path of a PEFT layer wrapping `layer` (its base_layer chain reaches it: a LoRA injected
    on the same module by peft.inject_adapter_in_model) that is merged already, or that a merge of
    `adapter_names` (None: each layer's active adapters) merges in the same call, or None. PEFT's
    loop merges it first (parents before children), into the weight a bat transform then
    multiplies: bat(W + dW) where the forward computes bat(W) + dW (a PEFT interop review,
    2026-12-06; plain PEFT 0.6 off there). Merged after the bat adapter (another call), it is
    exact: bat(W) + dW."""
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        outer_path = ".".join(parts[:end])
        outer = model.get_submodule(outer_path)
        if not isinstance(outer, BaseTunerLayer):
            continue
        inner = outer
        while inner is not layer and isinstance(getattr(inner, "base_layer", None), nn.Module):
            inner = inner.base_layer
        if inner is not layer:
            continue  # an ancestor that adapts something else (a ParamWrapper of the parent module)
        names = outer.active_adapters if adapter_names is None else adapter_names
        if getattr(outer, "merged", False) or set(names) & outer._get_available_adapters():
            return outer_path
    return None


def _with_unnamed_trainable_blocks(layer: AcceleratedMissLinear, result: Tensor, used: List[str]) -> Tensor:
    """`result` plus an exact zero that depends on every block of the layer that requires grad but
    no row of this batch names, when it is computed for a gradient in a torch.distributed job of
    several ranks; else `result` itself. Each rank's batch names its own adapters, and DDP and
    FSDP2 reduce the gradients of the parameters that have one: FSDP2 paired one rank's gradient
    of adapter a with the other's of b (same shape), silently (a review, 2026-12-07: both off by
    the size of the gradient), or its ranks met in collectives of other sizes and aborted; DDP
    without find_unused_parameters stepped once with unreduced gradients, and a rank whose rows
    were all "__base__" had no graph to run backward on. So every rank gives every trainable
    block a gradient (zero where it names none), as a bank's slots get: an optimizer with momentum
    or weight decay then moves the adapters a step does not name. A single process keeps None
    for them (the optimizer skips them). The zero is an empty slice's sum: exact whatever the
    block holds (NaN included)."""
    if not _distributed_grad():
        return result
    return _plus_exact_zero(result, [block for name, block in layer.miss_block.items()
                                     if name not in used and block.requires_grad])


def _distributed_grad() -> bool:
    """Whether this forward computes for a gradient in a torch.distributed job of several ranks."""
    return torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _plus_exact_zero(result: object, tensors: List[Tensor]) -> object:
    """result + a zero that depends on every tensor of `tensors` (each gets a zero gradient): one add
    of -0.0, the sum of empty slices negated, which leaves every value of result as it is (NaN,
    inf and -0.0 too: x + 0.0 would turn -0.0 into +0.0) whatever the tensors hold. result as it
    is when it is no tensor or `tensors` is empty."""
    # A parameter FSDP2 keeps sharded here (a unit of its own that this call does not run) is
    # left out: adding a DTensor to a plain output fails (a review, 2026-12-07).
    tensors = [t for t in tensors if not is_dtensor(t)]
    if not tensors or not isinstance(result, Tensor):
        return result
    zero = torch.stack([t.reshape(-1)[:0].sum().to(result.dtype) for t in tensors]).sum().neg()
    return result + zero


def _unnamed_copies_hook(module, args, kwargs, output, holder):
    """Forward hook of PeftModel's modules_to_save wrappers during a call with adapter_names= in a
    distributed training job: the trainable copies no row names get a zero gradient, as the
    layers' blocks do (_with_unnamed_trainable_blocks): FSDP2 paired one rank's gradient of
    adapter a's copy with the other's of b's (a review, 2026-12-07), and DDP failed."""
    if id(module) not in holder["hooked"] or _outside_the_call(holder) or not _distributed_grad():
        return None
    copies = getattr(module, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict):
        return None
    named = set(holder["names"] or ())
    return _plus_exact_zero(output, [p for name, copy in copies.items() if name not in named
                                     for p in copy.parameters() if p.requires_grad])


# The advice "unmerge_adapter()" (a PeftModel's) on a model without one: transformers' own adapter
# API has no model-level merge or unmerge (a review, 2026-12-07).
_LAYER_BY_LAYER = (" (a transformers model given its adapters by its add_adapter / load_adapter: unmerge() on each "
                   "MiSS layer)")


def _refuse_resized_base(layer: PeftMissLinear, weight: Tensor) -> None:
    """ValueError when the base weight is no longer (out_features, in_features) of the layer (a base
    swapped or resized after the adapter was added): the ops would read the block as another
    mode's and tile its term over the new rows (a review, 2026-12-07: a base widened from 20 to 40
    outputs got columns 20..39 the adapter term of 0..19, merges too; PEFT's forward fails)."""
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"{type(layer).__name__}: its base layer's weight is now {tuple(weight.shape)}, but the "
                         f"adapters were made for ({layer.out_features}, {layer.in_features}) (out_features, "
                         "in_features): the base was resized or replaced after they were added; restore its size")


def _refuse_merged_without_block(layer: AcceleratedMissLinear, names: List[str]) -> None:
    """ValueError, before anything is written, when one of the merged adapters `names` has no
    block any more (deleted while merged): PEFT's unmerge skips such a name and drops it from
    merged_adapters, so the weight kept its delta and the layer reported itself unmerged (a
    review, 2026-12-07). Nothing can restore that weight but the original."""
    gone = [name for name in names if name not in layer.miss_block]
    if gone:
        raise ValueError(f"{type(layer).__name__}: adapters {gone} are merged into the base weight but their blocks "
                         "were deleted since, so the weight cannot be restored: reload the base weight (or the model) "
                         "and add the adapters again")


def _unmerge_down_to(layer: AcceleratedMissLinear, keep: int) -> None:
    """Unmerges the layer's merged adapters, the last merged first, until `keep` are left (the
    fast path's arithmetic; unmerge() is this down to 0, after its checks)."""
    if len(layer.merged_adapters) <= keep:
        return
    if layer.quantization_backend is not None:
        raise ValueError("a quantized base's merge cannot be undone adapter by adapter")
    with torch.no_grad(), _merging():
        try:
            while len(layer.merged_adapters) > keep:
                name, count = layer.merged_adapters[-1], len(layer.merged_adapters)
                with record_follows_write(layer.base_layer.weight,
                                          lambda count=count: len(layer.merged_adapters) < count,
                                          layer.merged_adapters.pop):
                    if name in layer.miss_block:
                        torch.ops.miss.merge_(layer.base_layer.weight, layer.miss_block[name], True)
                    layer.merged_adapters.pop()
        finally:
            _record_changed(layer)


# What a stale record holds (merge_record): JSON for a number, no list of names, padded with spaces
# to the record's length, so the record keeps its size and storage.
_STALE_RECORD = 0


def _mark_record_stale(tensor: Tensor) -> None:
    tensor.copy_(torch.tensor(list(json.dumps(_STALE_RECORD).encode().ljust(tensor.numel())), dtype=torch.uint8))


def _record_changed(layer: AcceleratedMissLinear) -> None:
    """After the layer's merged adapters changed: records of its state_dicts that no longer say
    what the weight beside them holds are marked stale (merge_record)."""
    merge_record.changed(layer, getattr(layer.base_layer, "weight", None), list(layer.merged_adapters),
                         _mark_record_stale)


def _merge_back(layer: AcceleratedMissLinear, merged: List[str]) -> None:
    """Merges again the adapters of `merged` (the layer's merged_adapters before an unmerge) that
    an interrupted unmerge took off; it unmerges the last merged first, so they are a tail. One
    at a time, in the order they were merged: bat merges do not commute, and a merge of several
    takes the forward's order, which need not be theirs."""
    if layer.merged_adapters != merged[:len(layer.merged_adapters)]:
        return
    for name in merged[len(layer.merged_adapters):]:
        layer.merge(adapter_names=[name])


def _drop_adapter_entries(layer: PeftMissLinear, adapter_name: str) -> None:
    # As PEFT's BaseTunerLayer.delete_adapter, without its choice of a new active adapter: the
    # name is not an adapter of the model (a failed or stale injection).
    for attr in layer.adapter_layer_names + layer.other_param_names:
        if adapter_name in getattr(layer, attr):
            del getattr(layer, attr)[adapter_name]


def _miss_layers(model: nn.Module, cls: type) -> list:
    return [m for m in model.modules() if type(m) is cls]


def record_accelerated_sharing(root: nn.Module) -> Dict[str, List[str]]:
    """Sets `_shared_with` (the other holders' parameter paths, [] if none) and `_layer_path` on
    every accelerated layer under `root`, paths relative to root; returns {path: holders} for the
    shared ones. Merging those layers is refused."""
    return record_sharing(root, [(layer, layer.get_base_layer()) for layer in _miss_layers(root, AcceleratedMissLinear)])


class _WithAdapterNames:
    """`method` of the tuner's base model, taking PEFT's adapter_names= as PeftModel.forward does.
    Otherwise it stands for the bound method: equal to it (on every read), with its __self__ and
    __func__, pickled as the attribute read again (a local function was none of these)."""

    def __init__(self, tuner: "AcceleratedMissModel", name: str, method):
        self._tuner, self._name, self._method = tuner, name, method
        update_wrapper(self, method)

    def __call__(self, *args, **kwargs):
        if "adapter_names" not in kwargs:
            with _plain_call(self._tuner):
                return self._method(*args, **kwargs)
        with self._tuner._enable_peft_forward_hooks(*args, **kwargs):
            kwargs.pop("adapter_names")
            # Read again inside the call: the hooks patch the base model's generate (to repeat the
            # names for its own generation_config), which the method read before would bypass.
            return getattr(self._method.__self__, self._name)(*args, **kwargs)

    @property
    def __self__(self):
        return self._method.__self__

    @property
    def __func__(self):
        return self._method.__func__

    def __eq__(self, other) -> bool:
        return self._method == (other._method if isinstance(other, _WithAdapterNames) else other)

    def __hash__(self) -> int:
        return hash(self._method)

    def __reduce__(self):
        return getattr, (self._tuner, self._name)

    def __repr__(self) -> str:
        return f"<{self._method!r}, taking adapter_names=>"


class AcceleratedMissModel(MissModel):
    """PEFT's MissModel (the tuner inside a PeftModel) that refuses what PEFT 0.21-0.22 would accept
    and ignore or get wrong: per-row arguments, merges into shared weights (checked for the
    whole model before any layer changes), and merges naming no adapter of the model. Never
    constructed: `accelerate` swaps the class."""

    def __getattr__(self, name: str):
        # PEFT's: attributes it lacks come from the base model (PeftModel's come from here). A
        # method of the base model reached this way (CLIP's get_text_features, say) took
        # adapter_names= and passed it into the base model's **kwargs, where it was ignored: every
        # row ran the active adapter, silently (2.49 off for a "__base__" row; a review of
        # 2026-12-03, PEFT's LoRA does the same). Such a method now runs a call with
        # adapter_names= as forward does, the names reaching the layers for the call.
        value = super().__getattr__(name)
        base_model = self.__dict__["_modules"].get("model")
        if inspect.ismethod(value) and not name.startswith("_") and value.__self__ is base_model:
            return _WithAdapterNames(self, name, value)
        return value

    def forward(self, *args, **kwargs):
        """A call of the base model (PEFT's BaseTuner.forward: its hooks run), taking
        adapter_names= as PeftModel.forward does. PEFT's passed the keyword on into the base
        model's **kwargs, where transformers' models ignore it: `peft_model.base_model(ids,
        adapter_names=...)` ran every row with the active adapter, silently (0.33 off on a tiny
        Llama; PEFT's LoRA does the same). The base model itself, called directly, still ignores
        the keyword (README)."""
        if "adapter_names" not in kwargs:
            with _plain_call(self):
                return self.model(*args, **kwargs)
        with self._enable_peft_forward_hooks(*args, **kwargs):
            return self.model(*args, **{k: v for k, v in kwargs.items() if k != "adapter_names"})

    def _check_names_call(self, names: List[str], where: str, args, kwargs) -> Optional[str]:
        """Everything a call with adapter_names= `names` checks before it starts (ValueError /
        TypeError, nothing changed); returns the layout's reason that the layers see rows other
        than the sequences in order (bank.RowLayout), or None."""
        # One pass over the model: the adapters its layers hold, layers left unaccelerated, PEFT's
        # modules_to_save wrappers, and layers that see rows other than the sequences in order
        # (RowLayout): names that differ are refused there, and one name for every row, which
        # routes right in any layout, is given to each layer for all the rows of its input.
        known, not_accelerated, wrappers, layout = set(), [], [], RowLayout(self.model)
        differ = len(set(names)) > 1
        for path, module in self.model.named_modules():
            layout.see(path, module, isinstance(module, PeftMissLinear))
            if isinstance(module, PeftMissLinear):
                known |= set(module.miss_block.keys())
                if type(module) is PeftMissLinear:
                    not_accelerated.append(path)
            elif isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
                wrappers.append((path, module))
        if BASE in known:
            raise ValueError(f"{where}: the model has an adapter named {BASE!r}, which adapter_names uses for the base "
                             "model; rename that adapter")
        unknown = sorted({n for n in names if n != BASE} - known)
        if unknown:
            raise ValueError(f"{where}: adapter_names names adapter(s) no layer has: {unknown} (the model has "
                             f"{sorted(known)})")
        if not_accelerated:
            raise TypeError(f"{where}: adapter_names needs every MiSS layer accelerated; {not_accelerated[:3]} ... "
                            "are not (call miss_ext.peft.accelerate(model) again)")
        # The vision (audio) side of a multimodal model runs only on the images (audio) a call
        # brings: a call with text inputs only may mix adapters adapted there too.
        modality_inputs = other_modality_arguments(args, kwargs)
        sequence_first = layout.reason_for(other_modalities=bool(modality_inputs))
        if sequence_first is not None and differ:
            if layout.reason_for(other_modalities=False) is None:
                sequence_first += (f"; this call brings {describe(modality_inputs, limit=3)}, which may carry "
                                   "images, video or audio (a call whose every argument holding data is a text "
                                   "input passed by keyword: input_ids=, attention_mask=, ... "
                                   "(miss_ext.bank.TEXT_ONLY_ARGUMENTS), runs no vision side and may mix adapters)")
            raise sequence_first_error(sequence_first, where)
        for path, wrapper in wrappers:
            lacking = sorted({n for n in names if n != BASE} - set(wrapper.modules_to_save.keys()))
            if lacking:
                # PEFT's wrapper would fail with a bare KeyError for them.
                raise ValueError(f"{where}: adapter_names uses {lacking}, which have no copy of the "
                                 f"modules_to_save module {path} (trained by {sorted(wrapper.modules_to_save)}); "
                                 "PEFT cannot mix those in one batch")
        if torch.is_grad_enabled() and _checkpointing(self.model):
            # The names reach the layers through hooks that live for this call only, but gradient
            # checkpointing runs the layers again inside backward(), after the call has returned:
            # those rows would silently use the active adapter there.
            raise ValueError(f"{where}: adapter_names= cannot be combined with gradient checkpointing in training "
                             "(its recomputation in backward() runs after this call, without the names); call "
                             "gradient_checkpointing_disable(), or use miss_ext.load_bank / mixed_batch and call "
                             "backward() inside mixed_batch")
        # Every layer's own refusals of these names (merged adapters, bat adapters named by a row)
        # before any layer runs: found by the layer that holds the bat adapter, the call stopped
        # after earlier layers had drawn their dropout keys, moving torch's generator on a refused
        # call (helper review, 2026-12-03).
        self._check_before_unmerging(names)
        return sequence_first

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel.forward/generate enter this with their keyword arguments before running (and
        # strip adapter_names from what reaches the base model): as PEFT's LoRA, hand the names to
        # every adapter layer through forward pre-hooks for the duration of the call.
        where = "PEFT MiSS model forward/generate"
        refuse_per_row_arguments(kwargs, where)
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            with _model_call(self, None):
                yield
            return
        names = check_adapter_names(adapter_names, where)
        # Checked and claimed as one step, under the lock that merges, unmerges, unloads and
        # deletes hold from their own check to their last write: a change from another thread
        # between this call's checks and its claim gave its rows adapters it had not checked (a
        # deleted one's rows got the base output; a review, 2026-12-05).
        with _NAMES_LOCK:
            sequence_first = self._check_names_call(names, where, args, kwargs)
            # The modules to hook, listed under the lock that add_adapter holds while it adds some
            # (a walk of the model outside it raised "dictionary changed size during iteration").
            modules = list(self.model.modules())
            encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
            encoder_modules = list(encoder.modules()) if encoder is not None and encoder is not self.model else []
            if self in _NAMES_ACTIVE:
                raise RuntimeError(f"{where}: another call with adapter_names= is running on this model (another "
                                   "thread or coroutine, or nested), and its per-call hooks would give that call this "
                                   "one's names. Run one adapter_names= call at a time per model (a lock), or give "
                                   "each thread its own copy; nothing was changed")
            _NAMES_ACTIVE.add(self)
            # The adapters the call may use: a load_state_dict of theirs is refused while it runs.
            self.__dict__["_names_call_adapters"] = frozenset(self.peft_config)
        # Each sequence's name, repeated as generate() repeats the sequences (kwargs here; the
        # model's own generation_config is consulted by generate() below).
        holder = _CallHolder(names=_repeat(names, _expand_size(kwargs)), regrouped=sequence_first is not None,
                             hooked=set())  # hooked: ids of the modules hooked for this call
        # PeftModel.generate calls the base model's generate inside this context; only there is
        # the model's own generation_config (num_beams / num_return_sequences shipped with a
        # checkpoint) in force, so the names are repeated for it there, not for a forward call.
        inner = self.model
        saved = inner.__dict__.get("generate", _NOTHING)
        original = getattr(inner, "generate", None)

        def generate(*gen_args, **gen_kwargs):
            if _outside_the_call(holder):  # another thread's call, or after the call (a copy's)
                with _plain_call(self):
                    return original(*gen_args, **gen_kwargs)
            arguments = _generate_arguments(original, gen_args, gen_kwargs)
            times = _expand_size(arguments, getattr(inner, "generation_config", None))
            prompts = _prompt_count(arguments)
            if prompts is not None and prompts != len(names):
                # Before any forward: a layer would count the repeated names against the repeated
                # rows, naming neither what was given nor why (a serving review, 2026-12-06).
                raise ValueError(f"{where}: adapter_names has {_entries(len(names))} but generate() got {prompts} "
                                 f"prompt(s): give one name per prompt; generate() repeats each prompt's name for its "
                                 f"{times} beams / returned sequences itself")
            holder["names"] = _repeat(names, times)
            return original(*gen_args, **gen_kwargs)

        handles, flagged, holders = [], [], [holder]  # holders: the call's and its encoder's
        try:
            # Each forward of the model records where it starts (the layers look for a checkpoint
            # between that frame and themselves) when it runs with grad enabled; generate()'s
            # forwards run under no_grad, where nothing is recomputed. First of the model's
            # pre-hooks: torch's composable checkpoint(model) installs its saved-tensor hooks from
            # one, and its recompute of the model runs after this call, without the names (taken
            # for a checkpoint around the whole call, it was let through: a mutation audit,
            # 2026-12-04).
            handles.append(self.model.register_forward_pre_hook(partial(_model_forward_hook, holder=holder),
                                                                prepend=True))
            for module in modules:
                if isinstance(module, (AcceleratedMissLinear, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(
                        partial(_adapter_names_hook, holder=holder), with_kwargs=True))
                    holder["hooked"].add(id(module))
                if isinstance(module, AuxiliaryTrainingWrapper):
                    # Before FSDP2's post-forward hook (a wrapper sharded as its own unit): its
                    # copies are still unsharded then.
                    handles.append(module.register_forward_hook(partial(_unnamed_copies_hook, holder=holder),
                                                                with_kwargs=True, prepend=True))
                if isinstance(module, AcceleratedMissLinear):
                    module.__dict__["_names_call"] = True  # guarded by torch.compile (see the class)
                    flagged.append(module)
            if encoder_modules:
                # An encoder runs once on the unrepeated inputs (PEFT's LoRA does the same).
                unrepeated = _CallHolder(names=names, regrouped=holder["regrouped"], hooked=set())
                holders.append(unrepeated)
                for module in encoder_modules:
                    if isinstance(module, (AcceleratedMissLinear, AuxiliaryTrainingWrapper)):
                        handles.append(module.register_forward_pre_hook(
                            partial(_adapter_names_hook, holder=unrepeated), with_kwargs=True))
                        unrepeated["hooked"].add(id(module))
                    if isinstance(module, AuxiliaryTrainingWrapper):
                        handles.append(module.register_forward_hook(
                            partial(_unnamed_copies_hook, holder=unrepeated), with_kwargs=True, prepend=True))
            if callable(original):
                inner.__dict__["generate"] = generate
            with _model_call(self, names) as record:
                for one in holders:
                    one["record"] = record
                yield
        finally:
            holder.pop("entry", None)  # a frame: not kept past the call
            # A reference kept to these hooks (a shallow copy of the model taken during the call)
            # does nothing once the call ended (_outside_the_call).
            for one in holders:
                one["done"] = True
            if saved is _NOTHING:
                inner.__dict__.pop("generate", None)
            else:
                inner.__dict__["generate"] = saved
            for handle in handles:
                handle.remove()
            for module in flagged:
                module.__dict__.pop("_names_call", None)
            self.__dict__.pop("_names_call_adapters", None)
            _NAMES_ACTIVE.discard(self)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's inject_adapter (add_adapter, load_adapter), all or nothing for the MiSS layers.
        PEFT 0.21-0.22 adds the adapter layer by layer and, when a later layer refuses it (a bat r or
        a mini_r that does not divide it), PeftModel.add_adapter rolls back peft_config only (0.22
        has also recorded the call's targeted_module_names by then, put back here too): the
        layers changed before keep a zero block under that name, of the default mode's shape, which
        a later add_adapter of the same name on other modules activates. PEFT's forward then fails
        on its shape; the accelerated layers, which read each adapter's mode from its block's shape,
        would run and train it on modules the adapter's config does not target. Here those blocks
        are removed, and the layers the call created replaced by their base layers again, before
        the error propagates.

        PEFT injects new names only (add_adapter refuses a name it has), so a block that already
        carries the name is such a leftover, of a failure before this model was accelerated:
        one the new adapter does not replace (a module its config does not target) is removed
        too, on success or failure."""
        # Under the names lock: a names call starting in another thread walks the model's modules,
        # which this adds to ("dictionary changed size during iteration": a concurrency hunt,
        # 2026-12-07); the call then starts before or after the new adapter, never half way.
        with _NAMES_LOCK:
            config = self.peft_config.get(adapter_name)
            if getattr(config, "bias", "none") != "none":
                # Its trained biases are the base layers' own, which every row of a running call with
                # adapter_names= uses: refused here, before anything is added (load_adapter would add
                # the adapter and only then be refused at its load_state_dict).
                self._refuse_during_names_call(f"adding adapter {adapter_name!r} with bias={config.bias!r}")
            layers = [m for m in model.modules() if isinstance(m, PeftMissLinear)]
            stale = {id(m): m.miss_block[adapter_name] for m in layers if adapter_name in m.miss_block}
            # PEFT 0.22 records the targeted names before it creates any layer: put back too.
            targeted = {attr: list(getattr(self, attr))
                        for attr in ("targeted_module_names", "targeted_parameter_names")
                        if isinstance(getattr(self, attr, None), list)}
            _ADDED_FOR_LOAD.pop(self, None)
            loading = _load_adapter_frame(adapter_name) is not None
            wrappers = {id(m) for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)} if loading else ()
            try:
                result = super().inject_adapter(model, adapter_name, *args, **kwargs)
            except BaseException:
                self._take_back_injection(model, adapter_name, {id(m) for m in layers}, targeted)
                raise
            for layer in layers:
                if id(layer) in stale and layer.miss_block.get(adapter_name) is stale[id(layer)]:
                    _drop_adapter_entries(layer, adapter_name)
            if loading:  # what a refused load takes back (_undo_added_for_load)
                _ADDED_FOR_LOAD[self] = (adapter_name, self.peft_config.get(adapter_name), {id(m) for m in layers},
                                         wrappers, targeted)
            return result

    def _take_back_injection(self, model: nn.Module, adapter_name: str, known: set, targeted: dict) -> None:
        """The layers and targeted names as before an injection of `adapter_name`: a layer it
        created (not in `known`, ids) gives its base layer back, the others drop the adapter's
        entries."""
        for attr, names in targeted.items():
            getattr(self, attr)[:] = names
        for path, layer in list(model.named_modules()):
            if not isinstance(layer, PeftMissLinear):
                continue
            if id(layer) not in known:  # created by the injection: the base layer goes back in its place
                set_module(model, path, layer.get_base_layer())
            else:
                _drop_adapter_entries(layer, adapter_name)

    def _undo_added_for_load(self, added) -> str:
        """After a load this module refused: the adapter PeftModel.load_adapter added for it (its
        add_adapter, before the load) removed again, with the layers and modules_to_save wrappers
        it created (their base modules back in their places) and the targeted names as before;
        what to add to the error ("" where the running load did not add the adapter). PEFT
        0.21-0.22's injection keeps the other parameters' requires_grad and modules' modes."""
        # PeftModel.load_adapter under a new name adds the adapter (at its initial values) before
        # it loads: a refused load left it in the layers, in peft_config and in the modules_to_save
        # wrappers (a checkpoint-interop hunt, 2026-12-07; plain PEFT too). That this call added
        # it: its local peft_config (assigned in PEFT 0.21-0.22 only where it adds the adapter) is
        # the config the injection recorded, and the model's. PEFT's own failures after the
        # add_adapter (a missing weights file, strict_adapter_check) still leave it (README).
        name, config, layers, wrappers, targeted = added
        frame = _load_adapter_frame(name)
        if frame is None or config is None or frame.f_locals.get("peft_config") is not config \
                or self.peft_config.get(name) is not config:
            return ""
        self._take_back_injection(self.model, name, layers, targeted)
        with warnings.catch_warnings():  # its config and modules_to_save copies (the layers hold it no more)
            warnings.simplefilter("ignore")
            self.delete_adapter(name)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper) and id(module) not in wrappers:
                set_module(self.model, path, module.original_module)
        return f"; adapter {name!r}, added by this load_adapter, was removed again"

    def _check_before_unmerging(self, names: Optional[List[str]]) -> None:
        """Called by a disabled, merged layer of this model's running forward before it unmerges
        (PEFT's forward rule), and by an adapter_names= call before any layer runs (a layer that
        refused the names mid-call did so after earlier layers drew dropout keys): the refusals
        that depend only on the layers' state (a partial merge, or merged or bat adapters under
        adapter_names=, on the enabled layers; an unmerge that
        would be refused, on the disabled merged ones) are checked on every layer first, so that
        one of them cannot stop the call after that layer and earlier ones changed their weights.
        Only reached from PeftModel's forward/generate with the tuner's hook entered, which PEFT
        skips under model.disable_adapter(): there every layer is disabled, and a bat unmerge
        refused by a later layer leaves the earlier ones unmerged (their output is the base's
        either way)."""
        where = "PEFT MiSS model forward/generate"
        for path, layer in self.model.named_modules():
            if type(layer) is not AcceleratedMissLinear:
                continue
            try:
                if layer.disable_adapters:
                    if layer.merged:
                        layer._check_unmerge()
                elif names is None:
                    if layer.merged:
                        layer._refuse_partial_merge()
                else:
                    layer._refuse_names_here(names, where)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{path}: {exc}; nothing was run or changed") from exc

    def _check_merge(self, adapter_names: Optional[List[str]], safe_merge: bool) -> None:
        """Every layer's merge checks (AcceleratedMissLinear._merge_plan) and, with safe_merge,
        its merged weight, before PEFT's loop writes any layer: a model-level merge is all or
        nothing. ValueError naming the layer otherwise. The safe_merge check computes each merged
        weight twice (here, then in the layer's merge) rather than holding a copy of every
        adapted weight."""
        if isinstance(adapter_names, str):
            # PEFT's check_adapters_to_merge says this, after the first layer; here before any check
            # reads the str as a list of one-letter names (a review, 2026-12-05).
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        if adapter_names is not None:
            unknown = [a for a in adapter_names if a not in self.peft_config]
            if unknown:
                raise ValueError(f"adapter_names={adapter_names!r}: {unknown} name no adapter of this model "
                                 f"(it has {list(self.peft_config)}); nothing was merged")
        record_accelerated_sharing(self.model)  # re-checked: the user may have untied since accelerate()
        for path, layer in self.model.named_modules():
            if type(layer) is PeftMissLinear:
                # A plain PEFT layer beside accelerated ones (add_adapter on new modules without a
                # second accelerate, README): PEFT's merge, checked on a copy with safe_merge. Its NaN
                # left the layers merged before it (a PEFT API review, 2026-12-05).
                if safe_merge:
                    names = [a for a in (layer.active_adapters if adapter_names is None else adapter_names)
                             if a in layer.miss_block and a not in layer.merged_adapters]
                    _peft_safe_merge_check(path, layer, names)
                continue
            if type(layer) is not AcceleratedMissLinear:
                continue
            try:
                if layer.merged:  # merged in an order the forward does not compute: kept by merge_and_unload
                    layer._refuse_merge_order()
                names = layer._merge_plan(adapter_names)
                bats = [name for name in names if _is_bat(layer.miss_block[name])]
                # Active bat adapters this call leaves unmerged: their forward transforms the weight
                # a wrapper's merge writes into (a review, 2026-12-06: a LoRA merged alone over one).
                live = [name for name in layer.active_adapters if name in layer.miss_block and name not in names
                        and name not in layer.merged_adapters and _is_bat(layer.miss_block[name])]
                wrapper = _wrapper_merged_first(self.model, path, layer, adapter_names) if bats or live else None
                if wrapper is not None:
                    outer = type_name(self.model.get_submodule(wrapper))
                    if bats:
                        raise ValueError(f"bat adapter(s) {bats} cannot be merged under {outer} at {wrapper!r}, which "
                                         "wraps this layer and is merged first (or already): its merge goes into the "
                                         "same weight, and the bat transform does not commute with it")
                    raise ValueError(f"{outer} at {wrapper!r} wraps this layer, whose active bat adapter(s) {live} are "
                                     "not merged: its merge goes into the weight their transform reads, so the "
                                     "merged model would compute bat(W + dW) where the forward computes bat(W) + "
                                     f"dW; merge {live} first (merge_adapter(adapter_names={live!r}))")
                if safe_merge and names:
                    if layer._fast_path():
                        with torch.no_grad():
                            layer._merged_weight(names)
                    else:
                        _peft_safe_merge_check(path, layer, names)  # quantized bases keep PEFT's merge code
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}; no layer was merged") from exc

    @contextmanager
    def _undo_merges_on_error(self):
        """Should a layer's merge fail after every check passed (out of memory, a bad MISS_EXT_*
        value read only by a kernel), the merges this call made are undone before the error
        propagates (weights equal to the originals up to the unmerge's rounding); a layer that
        cannot be undone (a quantized base, an ill-conditioned bat block) is named in a warning."""
        layers = [(path, layer, len(layer.merged_adapters)) for path, layer in self.model.named_modules()
                  if type(layer) is AcceleratedMissLinear]
        try:
            yield
        except BaseException:
            undo_each([(path, partial(_unmerge_down_to, layer, before)) for path, layer, before in reversed(layers)],
                      "merge_adapter")
            raise

    def _refuse_during_names_call(self, what: str) -> None:
        # A call with adapter_names= checks its names and the layers' merge state when it starts:
        # an adapter deleted, merged, unmerged or unloaded while it runs (from another thread, or
        # a hook) would give its rows the old adapters in the layers before and others after.
        if self in _NAMES_ACTIVE:
            raise RuntimeError(f"{what}: a call with adapter_names= is running on this model, whose rows would use "
                               "the old adapters in some layers and the new state in others; change the adapters "
                               "between calls (nothing was changed)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # PeftModel.load_adapter under an existing name and set_peft_model_state_dict load the new
        # blocks with load_state_dict, which reaches this module (the layers' parent) before any
        # layer: refused here during a call with adapter_names=, as delete_adapter is (a re-load
        # gave a running call's rows the old adapter in some layers and the new one in others).
        # Only for adapters the running call may use: load_adapter under a new name adds the
        # adapter (add_adapter, allowed: no running row names it) and then loads its values here,
        # which a refusal would leave at their initial values.
        # Anything else (trainable biases of bias="all", base weights, modules_to_save's original
        # module) is used by every running row, so it is refused too (review, 2026-12-03).
        if self in _NAMES_ACTIVE:
            running = self.__dict__.get("_names_call_adapters", frozenset())
            owners = {key[len(prefix):]: _adapter_of_key(key[len(prefix):]) for key in state_dict
                      if key.startswith(prefix)}
            touched = {key if owner is None else owner for key, owner in owners.items()
                       if owner is None or owner in running}
            if touched:
                # PeftModel.load_adapter added the adapter it loads (add_adapter) before this load:
                # one added since the call started is removed again, so that the refusal leaves the
                # model as it was (a review found it left at its initial values, 2026-12-03).
                added = sorted({owner for owner in owners.values()
                                if owner is not None and owner not in running and owner in self.peft_config})
                for name in added:
                    super().delete_adapter(name)
                self._refuse_during_names_call(f"load_state_dict of {describe(sorted(touched))} (PeftModel.load_adapter, "
                                               "set_peft_model_state_dict; only another adapter's blocks may load"
                                               + (f"; adapter(s) {added}, added for this load, were removed again"
                                                  if added else "") + ")")
        # All or nothing: a layer refusing its part (a merged adapter's block loaded alone, a bad
        # merge record, another shape) was skipped while torch loaded every other module, so
        # PeftModel.load_adapter left the model a mix of two checkpoints (a PEFT API review,
        # 2026-12-06). Every accelerated layer's checks run first, on the same dict; torch reaches
        # this module before any of its layers (load_state_dict of the layers' model or of one
        # layer keeps torch's rule: the others load, the refusal is raised at the end).
        # A layer under a module with load_state_dict pre-hooks, which may rewrite its keys before
        # it loads (transformers' Mamba and ESM; a review, 2026-12-06: a transposing hook's load
        # was refused), keeps torch's rule, and so does everything under this module's own hooks
        # (they run in nn.Module's load, after this check).
        assign = bool(args) and bool(args[0].get("assign_to_params_buffers", False))
        layers = {} if rewrites_load_keys(self) else layers_to_check(
            self.model, f"{prefix}model.", lambda module: type(module) is AcceleratedMissLinear)
        refusals = load_refusals(layers, state_dict, assign)
        added = _ADDED_FOR_LOAD.pop(self, None)
        if refusals:
            note = self._undo_added_for_load(added) if added is not None else ""
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}, nothing loaded{note}:\n\t"
                               + "\n\t".join(refusals))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """PEFT's set_adapter (the active adapter or adapters); ValueError, nothing changed, for a
        name that is not an adapter of this model. PEFT's tuner took any name (PeftModel.set_adapter
        checks, the tuner did not), and the layers then ran the base model alone, silently (an
        atomicity review, 2026-12-03). A merged model is unmerged first, all or nothing
        (unmerge_adapter: ValueError naming the layer, nothing changed), with PEFT's warning."""
        # Read once: a generator was used up here and PEFT then set the spent generator as every
        # layer's active adapter, which ran the base model (a review, 2026-12-05).
        adapter_name = _listed(adapter_name, f"set_adapter: adapter_name must be an adapter name or a list of them, "
                                             f"got {adapter_name!r}")
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"set_adapter: {unknown} name no adapter of this model (it has {list(self.peft_config)}); "
                             "nothing was changed")
        with _NAMES_LOCK:  # from the unmerge to the switch (merge_adapter)
            merged = [(path, layer, list(layer.merged_adapters)) for path, layer in self.model.named_modules()
                      if type(layer) is AcceleratedMissLinear and layer.merged]
            if not merged:
                super().set_adapter(adapter_name, inference_mode=inference_mode)
                return
            # PEFT's set_adapter unmerges and switches layer by layer: an unmerge refused part way
            # (an ill-conditioned bat block) left the earlier layers switched and unmerged, the
            # later ones merged, the tuner on the old adapter, and the next forward mixing them (a
            # review, 2026-12-05). So every layer is unmerged first, all or nothing, after the
            # checks PEFT's switch makes (modules_to_save / trainable tokens: one adapter at a
            # time, at least one), and merged back should the switch still fail.
            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):
                    module.check_set_adapter(adapter_name)
            for _ in merged:  # PEFT warns once per merged layer
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.",
                              stacklevel=2)
            with warnings.catch_warnings():
                # unmerge_adapter's unmerge() of the layers that were not merged (PEFT's loop only
                # unmerges merged ones here).
                warnings.filterwarnings("ignore", message="Already unmerged. Nothing to do.")
                self.unmerge_adapter()
            active, restore_flags, restore_modes = (self.active_adapter, requires_grad_restorer(self.model),
                                                    training_restorer(self.model))
            try:
                super().set_adapter(adapter_name, inference_mode=inference_mode)
            except BaseException:
                # Back to the old adapter (layers and modules_to_save wrappers, which PEFT's loop may
                # have switched part way, with their requires_grad), then merged again: merged
                # layers with another active adapter would refuse every forward (a review, 2026-12-05).
                undo_each([("set_adapter", partial(self._switch_back, active, restore_flags, restore_modes))]
                          + [(path, partial(_merge_back, layer, before)) for path, layer, before in merged],
                          "set_adapter")
                raise

    def _switch_back(self, active, restore_flags: Callable[[], None], restore_modes: Callable[[], None]) -> None:
        """After a set_adapter that failed part way: PEFT's switch to `active` again, and every
        parameter's requires_grad and every module's training mode as they were (PEFT's switch
        sets the adapters' flags, and PEFT 0.22's with inference_mode=True their dropout's mode;
        model.requires_grad_restorer, model.training_restorer)."""
        super().set_adapter(active)
        restore_flags()
        restore_modes()

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's delete_adapter; RuntimeError, nothing changed, while a call with adapter_names=
        runs on this model."""
        with _NAMES_LOCK:  # no names call starts until the adapter is gone
            self._refuse_during_names_call(f"delete_adapter({adapter_name!r})")
            super().delete_adapter(adapter_name)

    def merge_adapter(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's merge_adapter, all or nothing: every layer's merge checks (and with safe_merge its
        merged weight) run before any layer changes; ValueError naming the layer otherwise, or for
        adapter_names naming no adapter of the model. A failure after the checks undoes this call's
        merges. RuntimeError while a call with adapter_names= runs."""
        # Held from the check to the last write: a names call starting in between (another
        # thread) passed its merge check and then met merged layers part way (a review,
        # 2026-12-05). Names calls hold the lock only to check and claim, so they wait, not deadlock.
        adapter_names = _listed(adapter_names)
        with _NAMES_LOCK:
            self._refuse_during_names_call("merge_adapter")
            self._check_merge(adapter_names, safe_merge)
            with self._undo_merges_on_error():
                super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's unmerge_adapter, all or nothing: every layer's unmerge checks run first
        (ValueError naming the layer, nothing unmerged); a failure after them merges back the
        layers unmerged so far. RuntimeError while a call with adapter_names= runs."""
        # All or nothing, as merge_adapter: every layer's unmerge checks before any layer changes,
        # and should a layer's unmerge fail after them (out of memory, an interrupt), the layers
        # unmerged so far are merged again before the error propagates.
        with _NAMES_LOCK:  # from the check to the last write (merge_adapter)
            self._refuse_during_names_call("unmerge_adapter")
            layers = []
            for path, layer in self.model.named_modules():
                if type(layer) is AcceleratedMissLinear and layer.merged:
                    try:
                        layer._check_unmerge()
                    except ValueError as exc:
                        raise ValueError(f"{path}: {exc} No layer was unmerged.") from exc
                    layers.append((path, layer, list(layer.merged_adapters)))
            try:
                super().unmerge_adapter()
            except BaseException:
                undo_each([(path, partial(_merge_back, layer, before)) for path, layer, before in layers],
                          "unmerge_adapter")
                raise

    def _unload_and_optionally_merge(self, *args, **kwargs):
        with _NAMES_LOCK:  # from the check to the last write (merge_adapter)
            return self._unload_and_optionally_merge_holding_lock(*args, **kwargs)

    def _unload_and_optionally_merge_holding_lock(self, *args, **kwargs):
        bound = inspect.signature(MissModel._unload_and_optionally_merge).bind(self, *args, **kwargs)
        bound.apply_defaults()
        if "adapter_names" in bound.arguments:  # read once (a generator), for the merge and PEFT's loop alike
            bound.arguments["adapter_names"] = _listed(bound.arguments["adapter_names"])
            args, kwargs = bound.args[1:], bound.kwargs
        self._refuse_during_names_call("merge_and_unload" if bound.arguments.get("merge") else "unload")
        # miss_ext's own layers in the model (apply_miss / apply_bank before get_peft_model), which
        # PEFT's loop would take for its own: TypeError naming the first, before anything changes
        # (PEFT's loop reaches it after unloading the layers before it).
        tuners = [path for path, module in self.model.named_modules() if isinstance(module, BaseTunerLayer)]
        for path, module in self.model.named_modules():
            if isinstance(module, BaseTensorAttributes) and not any(path.startswith(t + ".") for t in tuners):
                module.unload_and_optionally_merge_module()
        if bound.arguments.get("merge"):
            names = bound.arguments.get("adapter_names")
            if names:
                # PEFT 0.22's own check, before anything is merged: two named adapters with copies
                # of one modules_to_save module cannot both be kept (ValueError). Its loop makes
                # it after our merge below, which left every layer merged then (a PEFT 0.22
                # review, 2026-12-07). Made for 0.21 too, whose unload keeps the active adapter's
                # copy whatever adapters are named.
                for module in self.model.modules():
                    if isinstance(module, ModulesToSaveWrapper):
                        module.check_set_adapter(names)
            # Every layer is merged (all or nothing, see merge_adapter) before any is unloaded;
            # PEFT's loop would merge and unload layer by layer. Its own merge calls then find
            # the adapters merged already.
            self.merge_adapter(names, bool(bound.arguments.get("safe_merge")))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already following adapters were merged")
                # PEFT 0.21's check_adapters_to_merge says this when every adapter is merged (the
                # case here: merge_adapter above merged them all).
                warnings.filterwarnings("ignore", message="All adapters are already merged")
                # merge_adapter above named the layers whose adapters never run; PEFT's loop would again.
                warnings.filterwarnings("ignore", message="merge: skipped adapter")
                return _unload_aliases(super()._unload_and_optionally_merge(*args, **kwargs))
        return _unload_aliases(super()._unload_and_optionally_merge(*args, **kwargs))


# tuner -> what its last injection under PeftModel.load_adapter changed (AcceleratedMissModel.
# inject_adapter, _undo_added_for_load); outside the module, which deepcopy and pickle copy.
_ADDED_FOR_LOAD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _functional_delete_call(adapter_name: str) -> tuple:
    """(model, names) of a peft.tuners.tuners_utils.delete_adapter(model, …) call running in this
    thread (peft.functional.delete_adapter, which deletes layer by layer), found by its code
    object, with every name of the transformers model.delete_adapter([...]) call around it (it
    deletes name by name); (None, [adapter_name]) outside one."""
    from peft.tuners import tuners_utils
    codes = {getattr(getattr(tuners_utils, "delete_adapter", None), "__code__", None)}
    mixin = sys.modules.get("transformers.integrations.peft")
    outer = getattr(getattr(getattr(mixin, "PeftAdapterMixin", None), "delete_adapter", None), "__code__", None)
    model, names = None, [adapter_name]
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes and model is None:
            found = frame.f_locals.get("model")
            model = found if isinstance(found, nn.Module) else None
        elif outer is not None and frame.f_code is outer and model is not None:
            listed = frame.f_locals.get("adapter_names")
            if isinstance(listed, list) and adapter_name in listed:
                names = list(dict.fromkeys(listed))
            break
        frame = frame.f_back
    return model, names


def _load_adapter_frame(adapter_name: str):
    """The frame of a PeftModel.load_adapter(…, adapter_name) call running in this thread (its code
    object, not its name), or None."""
    code = PeftModel.load_adapter.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and frame.f_locals.get("adapter_name") == adapter_name:
            return frame
        frame = frame.f_back
    return None


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _listed(names, error: Optional[str] = None):
    """`names` as a list when it is an iterable other than a str (None, a str and a list as they
    are; TypeError `error` for a non-iterable): a generator was read up by the all-or-nothing
    check, and PEFT's merge loop then merged nothing, silently (a review, 2026-12-05; PEFT's own
    loop merges the first layer only). A str adapter_names is PEFT's TypeError (_check_merge)."""
    if names is None or isinstance(names, (str, list)):
        return names
    try:
        return list(names)
    except TypeError:
        raise TypeError(error or f"adapter_names should be a list of strings, got {names!r}.") from None


def _unload_aliases(model: nn.Module) -> nn.Module:
    """After PEFT's unload: the MiSS layers still in the model go back to their base layers. PEFT
    replaces each layer at the first path named_modules() gives, so a layer also held under a
    second path (assigned there after get_peft_model: model.l2 = model.l1) stayed there, merged or
    not, a tuner layer in the "unloaded" model (a review, 2026-12-05). Its merge, when asked for,
    is already in its base layer (the same object)."""
    if isinstance(model, nn.Module):
        for path, module in list(model.named_modules(remove_duplicate=False)):
            if path and isinstance(module, PeftMissLinear):
                set_module(model, path, module.get_base_layer())
    return model


def _block_shapes(init_weights, r: int, mini_r: int, layer: PeftMissLinear) -> Optional[tuple]:
    """The block shape PEFT's update_layer gives an adapter of these settings on `layer`
    (modules.block_shape), or None where it refuses them (a bat r or a mini_r that does not divide
    the layer's sizes: no block of PEFT's is of such an adapter)."""
    try:
        return block_shape(_init_mode(init_weights), r, mini_r, layer.in_features, layer.out_features,
                           empty_output=True)
    except ValueError:
        return None


def _config_block_shapes(config, layer: PeftMissLinear, name: str) -> tuple:
    """The block shapes adapter `name`'s `config` gives it on `layer` (_block_shapes), and for mini
    also (r, out) where the layer recorded the config's mini_r: PEFT's merge of a half-precision
    block on the CPU writes the block back tiled to (r, out) (it keeps the adapter's output;
    accelerate puts the (r, mini_r) block back: _untile_mini_blocks). A default leftover of that
    shape recorded its own config's mini_r (1 unless set)."""
    shape = _block_shapes(config.init_weights, config.r, config.mini_r, layer)
    if config.init_weights == "mini" and layer.miss_mini_r.get(name) == config.mini_r:
        return (shape, (config.r, layer.out_features))
    return (shape,)


def _refuse_blocks_unlike_their_record(layer: PeftMissLinear, active: List[str]) -> None:
    """ValueError when an active adapter's block does not have the shape PEFT recorded for it on
    this layer (from PEFT 0.22, which keeps each adapter's init_weights in miss_fn, with miss_r
    and miss_mini_r): a leftover of an add_adapter that PEFT refused part way. Its update_layer
    records the adapter and makes an (r, out) block before it checks a bat or mini shape, and
    transformers' model.add_adapter (PEFT's inject_adapter_in_model) keeps what was added. PEFT's
    forward then fails; ours read the mode from the block and ran and trained the leftover as
    a default adapter (a review, 2026-12-07). A dict lookup per active adapter."""
    modes = layer.__dict__.get("miss_fn")
    if not isinstance(modes, dict):
        return
    for name in active:
        init, r = modes.get(name), layer.miss_r.get(name)
        if init is None or r is None:
            continue
        shape = tuple(layer.miss_block[name].shape)
        if shape != _block_shapes(init, r, layer.miss_mini_r.get(name, 1), layer):
            raise ValueError(f"{type(layer).__name__}: adapter {name!r} holds a block of shape {shape}, which is not "
                             f"the one PEFT recorded for it (init_weights={init!r}, r={r}): a leftover of an "
                             "add_adapter that PEFT refused part way (delete_adapter(name) removes every layer's "
                             "block of that adapter; then add it again), or a block or miss_r changed since it was "
                             "added (put back a block of the recorded shape)")


def _untile_mini_blocks(model: nn.Module) -> None:
    """Puts back the (r, mini_r) block of each mini adapter whose block PEFT's merge rewrote to its
    tiled (r, out) copy (a half-precision block merged on the CPU by PEFT before accelerate; the
    spec's "PEFT's known bugs"). The accelerated layers read an adapter's mode from its block's
    shape, so such a block ran and trained as a default adapter after the unmerge, losing the
    mini structure at the first step, and save_pretrained wrote a file neither PEFT nor
    load_adapter loads (a review, 2026-12-07). The tiled copy repeats the block exactly, so its
    first mini_r columns are the block; a gradient is summed over the copies, the mini block's
    own. The Parameter stays the same object (an optimizer holding it keeps it). ValueError,
    before anything changes, for such a block that no longer repeats exactly."""
    tiled = []
    owners = _innermost_tuners(model)
    for at, layer in model.named_modules():
        if not isinstance(layer, PeftMissLinear):
            continue
        holder, path = owners.get(layer, (None, at))
        for name, block in layer.miss_block.items():
            config = None if holder is None else holder.peft_config.get(name)
            if config is not None:
                init, r, mini_r = config.init_weights, config.r, config.mini_r
                if layer.miss_mini_r.get(name) != mini_r:
                    continue
            else:  # no tuner above the layer (the inner model of a PeftModel): PEFT 0.22's own records
                modes = layer.__dict__.get("miss_fn")  # (0.21's one mode per layer says nothing per adapter)
                init = modes.get(name) if isinstance(modes, dict) else None
                r, mini_r = layer.miss_r.get(name), layer.miss_mini_r.get(name)
            out = layer.out_features
            if init != "mini" or r is None or mini_r is None or mini_r == out or tuple(block.shape) != (r, out):
                continue
            if out % mini_r != 0 or (not block.is_meta
                                     and not torch.equal(block, block[:, :mini_r].repeat(1, out // mini_r))):
                raise ValueError(f"accelerate: {path} ({name!r}) holds a ({r}, {out}) block for a mini adapter of "
                                 f"mini_r={mini_r} that is not the tiled copy PEFT's merge writes: a leftover of an "
                                 "add_adapter that PEFT refused part way (its update_layer makes an (r, out) block "
                                 "before it checks mini_r), or a block changed since. delete_adapter(name) removes "
                                 "every layer's block of that adapter; then add or load it again. Nothing was changed")
            tiled.append((block, r, mini_r, out))
    with torch.no_grad():
        for block, r, mini_r, out in tiled:
            grad = block.grad
            block.data = block.data[:, :mini_r].clone()
            if grad is not None:
                block.grad = grad.reshape(r, out // mini_r, mini_r).sum(1)


def _innermost_tuners(model: nn.Module) -> dict:
    """{PEFT MiSS layer: (the innermost holder of its adapters' configs above it, its path there)}:
    a MissModel / AcceleratedMissModel, or a transformers model given PEFT adapters by its
    add_adapter / load_adapter (PeftAdapterMixin: no tuner, the configs in its own peft_config;
    a review, 2026-12-07). A tuner nested inside another (a submodule made a PeftModel before the
    whole) has its own peft_config, whose adapter names (PEFT's "default") may be the outer one's
    too."""
    owner = {}
    for holder in model.modules():  # outer first
        if type(holder) in (MissModel, AcceleratedMissModel):
            inner = holder.model
        elif holds_transformers_adapters(holder):
            inner = holder
        else:
            continue
        for path, layer in inner.named_modules():
            if isinstance(layer, PeftMissLinear):
                owner[layer] = (holder, path)
    return owner


def _refuse_blocks_unlike_their_config(model: nn.Module) -> None:
    """The accelerated layers read each adapter's mode from its block's shape (3-D: bat; fewer
    columns than out_features: mini) and its r from the block. A block whose shape is not one its
    adapter's config gives (another mode, r or mini_r) is a leftover of a failed add_adapter in
    PEFT 0.21-0.22 (see AcceleratedMissModel.inject_adapter), which the name's next add_adapter
    activated. PEFT's forward fails on another mode; another r it runs and trains, and its
    from_pretrained then drops the block without a word; ours would run and train either (a
    mini-shaped leftover under a default config ran as mini, a review found, 2026-12-07).
    ValueError naming the layers before anything changes."""
    stray = []
    for layer, (tuner, path) in _innermost_tuners(model).items():
        for name, block in layer.miss_block.items():
            config = tuner.peft_config.get(name)
            if config is not None and tuple(block.shape) not in _config_block_shapes(config, layer, name):
                stray.append(f"{path} ({name!r}: block {tuple(block.shape)}, config r={config.r}, "
                             + (f"mini_r={config.mini_r}, " if config.init_weights == "mini" else "")
                             + f"init_weights={config.init_weights!r})")
    if stray:
        raise ValueError(f"accelerate: {describe(stray)} hold a block whose shape is not one its adapter's config "
                         "gives (another mode, r or mini_r): a leftover of a failed add_adapter (PEFT 0.21-0.22 keeps "
                         "the blocks it added to earlier layers when a later one refuses the adapter), which PEFT's "
                         "forward cannot run or its from_pretrained drops; delete_adapter(name) removes every layer's "
                         "block of that adapter, then add it again. Nothing was changed")


def _refuse_offloaded_blocks(model: nn.Module, named) -> None:
    """ValueError naming the layers whose blocks are on the meta device under accelerate's offload
    hook (`_hf_hook` on the layer, its base or an ancestor: a device_map with "disk" or "cpu"
    offload, cpu_offload). get_peft_model on such a model makes the blocks on the base weight's
    device, meta, and no hook ever fills them: PEFT's forward then adds uninitialised memory to the
    outputs, different on every call (0.6 off on a tiny Llama, found by a review, 2026-12-03),
    and ours would too. PeftModel.from_pretrained loads the blocks with their values: accepted.
    A meta block without such a hook is a model still to be materialised: accepted, as
    apply_miss (model.refuse_offloaded) does."""
    offloaded = []
    for path, layer in named:
        blocks = [name for name, block in layer.miss_block.items() if block.is_meta]
        if not blocks:
            continue
        if under_offload_hook(model, path) or offload_hook(layer.base_layer):
            offloaded.append(f"{path} ({', '.join(blocks)})")
    if offloaded:
        raise ValueError(f"accelerate: {describe(offloaded, 8)}: these adapter blocks are on the meta device in layers "
                         "that accelerate offloads (`_hf_hook`: a device_map with \"disk\" or \"cpu\" offload), so they "
                         "hold no values and the forward would add uninitialised memory to the outputs (PEFT's too). "
                         "Save the adapter from a model without offload, then load it with PeftModel.from_pretrained onto "
                         "a model dispatched by a device_map (accelerate's dispatch_model, or transformers' "
                         "from_pretrained(device_map=...)), which loads the blocks' values. Under accelerate's "
                         "whole-model cpu_offload / disk_offload the blocks stay on the meta device whether the adapter "
                         "is loaded before or after the offload (PEFT's forward is wrong there too): use a device_map. "
                         "Nothing was changed")


def accelerate(model: nn.Module) -> nn.Module:
    """Makes every PEFT MiSS layer of the model run on the miss ops, in place; returns the model.
    Raises ValueError if the model has no PEFT MissLinear layer (accelerated or not). Also swaps
    PEFT's MissModel tuner (if the model holds one) to AcceleratedMissModel, and records which
    layers' base weights are shared with other modules (their merge is refused); calling it
    again refreshes that record. A layer whose parent's code reads its .weight/.bias (or hands the
    layer on, or an ancestor's code names it: base_layers.parent_reads_child_tensors and
    ancestor_reads_layer_tensors) gives their metadata only (computing with it raises
    RuntimeError: it would bypass the adapter, which PEFT does silently). UserWarning for adapters
    that never run (on nn.MultiheadAttention.out_proj) and for a model holding PEFT MiSS layers
    without their tuner (adapter_names= will not reach them). Source: PEFT's MissLinear / MissModel
    (peft/tuners/miss); where they differ: the module docstring and docs/miss.md, last section."""
    check_module(model, "accelerate")
    named = [(path, m) for path, m in model.named_modules() if type(m) is PeftMissLinear]
    if not named and not _miss_layers(model, AcceleratedMissLinear):
        raise ValueError("accelerate: the model has no peft.tuners.miss.MissLinear layer")
    _refuse_blocks_unlike_their_config(model)
    _refuse_offloaded_blocks(model, named)
    parents = {path: parent_module(model, path) for path, _ in named}
    never_run = [path for path, parent in parents.items() if isinstance(parent, WEIGHT_READING_PARENTS)]
    if never_run:
        warnings.warn(f"accelerate: the adapters on {describe(never_run)} never run: their parent "
                      "nn.MultiheadAttention reads the layer's weight directly instead of calling it, so its output is "
                      "the base model's, in PEFT as here (miss_ext.apply_miss and load_adapter refuse such layers); "
                      "merges skip them here, where PEFT's merge makes them act",
                      stacklevel=2)
    # Warned before any class changes: turned into an error, it leaves the model as it was.
    if named and not _miss_layers(model, MissModel) and not _miss_layers(model, AcceleratedMissModel):
        where = ("its adapters were added by transformers' add_adapter / load_adapter"
                 if holds_transformers_adapters(model) else "it is the inner model of a PeftModel?")
        warnings.warn(f"accelerate: this model holds PEFT MiSS layers but not their PEFT tuner ({where}). The layers "
                      "run on the miss ops, but adapter_names= will not reach them (PEFT 0.21-0.22 ignores it for "
                      "MiSS): for mixed batches, accelerate a PeftModel (peft.PeftModel.from_pretrained / "
                      "get_peft_model) or use a bank (miss_ext.load_bank)",
                      stacklevel=2)
    _untile_mini_blocks(model)  # after the warnings (an error, nothing changed): it raises first, or changes blocks
    for path, layer in named:
        layer.__class__ = AcceleratedMissLinear
        if path in never_run:
            layer._never_runs = path  # its merges are skipped (AcceleratedMissLinear._merge_holding_lock)
        parent = parents[path]
        # A layer whose tensors the code of its parent (or of an ancestor further up) reads gets
        # their metadata there (as MissLinear always gives): describing reads (T5's dtype cast)
        # work, the fast path of nn.TransformerEncoderLayer turns off, and code computing with the
        # tensor instead of calling the layer (MobileBERT's LM head, WavLM's attention, LayoutLMv3's
        # relative position lookup, RWKV's rescaling) raises RuntimeError, where PEFT's layers hand
        # out the base weight and the adapter silently does nothing or is scaled wrongly (and
        # merge_and_unload then changed the outputs). nn.MultiheadAttention keeps the warning above.
        parts = path.split(".")
        if isinstance(parent, FAST_PATH_PARENTS) or (
                parent is not None and not isinstance(parent, WEIGHT_READING_PARENTS)
                and (parent_reads_child_tensors(parent, parts[-1]) or ancestor_reads_layer_tensors(
                    [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1)], path))):
            layer._base_tensors_as_metadata = True
            layer._metadata_where = f"{type(layer).__name__} at {path!r}"
    tuners = _miss_layers(model, MissModel)
    for tuner in tuners:
        tuner.__class__ = AcceleratedMissModel
    for tuner in _miss_layers(model, AcceleratedMissModel):  # each adapter's init, for reset_parameters
        for layer in _miss_layers(tuner.model, AcceleratedMissLinear):
            recorded = layer.__dict__.setdefault("_miss_init_weights", {})
            for name in layer.miss_block:
                if name in tuner.peft_config:
                    recorded[name] = tuner.peft_config[name].init_weights
    # Paths as in the base model ("lm_head", "model.embed_tokens.weight") where there is a tuner.
    record_accelerated_sharing(model)
    for tuner in _miss_layers(model, AcceleratedMissModel):
        record_accelerated_sharing(tuner.model)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undoes `accelerate`: the layers and the tuner run PEFT's own code again. Returns the model
    (a model without accelerated layers is returned unchanged). TypeError for a model that is no
    nn.Module; ValueError, changing nothing, where a layer has an adapter merged or active that
    PEFT's code would compute in another mode than its own (_runs_in_peft_mode: adapters of
    several modes on one layer under PEFT before 0.22, whose forward, merge and unmerge take every
    adapter in the layer's first adapter's mode, so a restored layer with such an adapter merged
    could no longer be unmerged, its base weight lost, and one active would compute a wrong term
    silently; found by a new-user review, 2026-12-03. PEFT 0.22 keeps each adapter's mode, and
    restores them all). Such an adapter inactive and unmerged is restored as PEFT itself holds it."""
    check_module(model, "restore")
    others = [(path, name) for path, layer in model.named_modules() if type(layer) is AcceleratedMissLinear
              for name in layer.miss_block
              if (name in layer.merged_adapters or name in layer.active_adapters)
              and not _runs_in_peft_mode(layer, name)]
    if others:
        raise ValueError(f"restore: {describe([f'{path}: {name}' for path, name in others], limit=3)} "
                         f"{'is an adapter' if len(others) == 1 else 'are adapters'} merged or active in another "
                         "mode than the layer's first one, which PEFT's own code computes in that first mode (wrong "
                         "terms, and a merge it cannot unmerge); unmerge_adapter() and set_adapter() to adapters of "
                         "the first mode (or delete_adapter them), or keep the model accelerated. Nothing was "
                         "changed")
    for layer in _miss_layers(model, AcceleratedMissLinear):
        layer.__class__ = PeftMissLinear
        merge_record.forget(layer, _mark_record_stale)  # PEFT's merges do not tell it
        layer.__dict__.pop("_base_tensors_as_metadata", None)
        layer.__dict__.pop("_metadata_where", None)
    for tuner in _miss_layers(model, AcceleratedMissModel):
        tuner.__class__ = MissModel
    return model


def is_accelerated(model: nn.Module) -> bool:
    """True when every PEFT MiSS layer of the model is accelerated (and there is at least one), and
    so is every PEFT MiSS tuner in it (a PeftModel's base_model). TypeError for a model that is no
    nn.Module."""
    # The tuner too: after accelerate(peft_model.get_base_model()) (which warns) the layers were
    # accelerated but PeftModel's adapter_names= never reached them, every row silently running
    # the active adapter, and this said True (a PEFT 0.22 user trial, 2026-12-07).
    check_module(model, "is_accelerated")
    return (bool(_miss_layers(model, AcceleratedMissLinear)) and not _miss_layers(model, PeftMissLinear)
            and not _miss_layers(model, MissModel))
