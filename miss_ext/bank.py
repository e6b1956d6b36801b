"""Many MiSS adapters on one frozen linear layer, each row of a batch using its own (issue 14).

`MissBankLinear` keeps a bank of adapter blocks in one parameter and computes

    y[t] = base_layer(x)[t] + fold_{r_a}(dropout_a(x[t])) @ tile(block_a),   a = adapter of row t

for a whole mixed batch with one base call and one pass over x: `miss.bank_fold` folds every row at
its own adapter's rank with its own dropout rate (zeros past that rank), and `miss.bank_add` adds
each row's own term (see their schemas in csrc/torch_bindings.cpp). Rows whose index is negative,
or name an adapter that does not adapt this layer (add_absent), get the base output only.

Why not merge: a merged weight serves one adapter. For a batch whose rows all use ONE adapter,
merging it (MissLinear.merge) and calling the plain layer is the fastest inference; the bank is
for batches that mix adapters (or mix adapters with the base model), where no single merged
weight is right.

Bat adapters change the base weight itself (W' = W + W_ij B_i + B_i), so rows of different bat
adapters cannot share one base GEMM: they are refused with a TypeError naming them.

Recompilation: everything forward reads about the adapters is a tensor of fixed shape (the
blocks, ranks, periods, dropout rates and the slot routing table), so under torch.compile adding,
replacing and removing adapters (any r up to max_r, any mode, any dropout rate, present or absent)
and changing block values do not recompile. The one bool forward reads is whether dropout runs:
training with some adapter's rate > 0. So a layer has at most three graphs: eval, training
without dropout, training with dropout; in training, the first adapter with dropout and removing
the last one switch between the last two (each compiled once). Why the bool: with dropout a key
is drawn (new_dropout_key: torch's generator, one per layer and forward), and drawing one when no
rate needs it would change the random stream of a model without dropout and refuse
torch.func.vmap's default randomness="error". This is also why the fold is per row (bank_fold)
rather than one miss.fold per fold width and rate, whose int width and float rate dynamo would
bake into the graph (and did, before).
"""
import contextlib
import dataclasses
import itertools
import numbers
import weakref
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from ._checkpointing import checkpoints_around, judge_recompute, traced_inside_checkpoint
from ._distributed import is_dtensor
from .base_layers import is_plain_linear, read_to_describe, tensor_problem, type_name
from .modules import (MAX_TENSOR_SIZE, MissLinear, adapter_dtype, allocate_block, block_shape, check_base_output,
                      check_dropout, json_tensor, load_mismatches, refuse_forward_tangents, refuse_layer_load,
                      refuse_nested, refuse_non_tensor, tensor_json, written_since)
from .merge_record import memory_of as _memory, storage_of as _storage
from .ops import new_dropout_key
from .weight_metadata import BaseTensorAttributes

# The public names (README); the other functions here are the package's internals, used across its modules.
__all__ = ["MissBankLinear", "TEXT_ONLY_ARGUMENTS"]

BASE = "__base__"  # PEFT's adapter_names value for "the base model only"


def check_new_adapter(names: List[Optional[str]], name: object, where: str = "the bank") -> int:
    """The free slot a new adapter `name` takes among the slot names `names` (None: free).
    ValueError for a bad or taken name, or a full bank."""
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"an adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
    if name in names:
        raise ValueError(f"{where} already has an adapter named {name!r} (slot {names.index(name)})")
    if None not in names:
        raise ValueError(f"{where} is full ({len(names)} slots: {names}); remove an adapter or build a larger bank")
    return names.index(None)


_SLOT_FIELDS = ("adapter_names", "modes", "dropouts", "absent")
# Generations of slot contents (MissBankLinear.slot_generation): unique across layers and copies.
_GENERATIONS = itertools.count(1)
# The attribute a bank layer's checkpointed forward leaves on the object that stands for its
# checkpoint ({layer: batches it ran in}; MissBankLinear._check_recompute).
_BATCH_NOTES = "_miss_ext_bank_batches"


def slot_state_problem(state: object, max_r: int, out_features: int, ranks: List[int],
                       periods: List[int]) -> Optional[str]:
    """Why `state` (MissBankLinear.get_extra_state's dict: each slot's name, mode, dropout rate,
    absent flag) cannot describe a bank whose slots have these ranks and periods, or None. A slot
    description that does not fit would route rows to another adapter, or train one with another
    dropout, silently: every field of every slot is checked, as add_adapter / add_absent /
    remove_adapter leave them."""
    if not isinstance(state, dict) or sorted(state) != sorted(_SLOT_FIELDS):
        return f"the slot description must be a dict with keys {list(_SLOT_FIELDS)}, got {state!r}"
    capacity = len(ranks)
    for field in _SLOT_FIELDS:
        value = state[field]
        if not isinstance(value, list) or len(value) != capacity:
            return (f"its {field} must be a list of one entry per slot ({capacity}), got "
                    f"{len(value) if isinstance(value, list) else type(value).__name__}")
    names = [n for n in state["adapter_names"] if n is not None]
    if len(set(names)) != len(names):
        return f"adapter names appear twice: {state['adapter_names']}"
    for slot, (name, mode, rate, absent) in enumerate(zip(*(state[f] for f in _SLOT_FIELDS))):
        where = f"slot {slot} ({name!r})"
        if not isinstance(absent, bool):
            return f"{where}: absent flag {absent!r} is not a bool"
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            return f"{where}: dropout {rate!r} is not a rate in [0, 1)"
        if name is None or absent:
            if (mode, ranks[slot], rate) != (None, 0, 0) or (name is None and absent):
                return (f"{where}: an {'absent' if absent else 'empty'} slot has mode None, rank 0 and dropout 0, got "
                        f"mode={mode!r}, rank {ranks[slot]}, dropout {rate}{', absent' if absent else ''}")
            continue
        if not isinstance(name, str) or not name or name == BASE:
            return f"{where}: an adapter name must be a non-empty string other than {BASE!r}"
        period_ok = periods[slot] == out_features if mode == "default" else \
            mode == "mini" and 1 <= periods[slot] <= out_features and out_features % periods[slot] == 0
        if not 1 <= ranks[slot] <= max_r or not period_ok:
            return (f"{where}: mode={mode!r} with rank {ranks[slot]} and period {periods[slot]} does not fit a bank "
                    f"of max_r={max_r}, out_features={out_features} (default: period = out_features; mini: a "
                    "divisor of it, at most it)")
    return None


@dataclasses.dataclass(eq=False)
class _Snapshot:
    """A bank layer's state_dict as state_dict() wrote it: the slot description and its tensor's
    version (None for an inference tensor, which cannot be written outside inference mode), the
    ranks and periods then, where the state_dict's ranks and periods lie in memory (the layer's
    own, as in any torch state_dict; by address, so that no tensor is held or weakly referenced),
    and the bank memory in which slot changes have since rewritten a slot the description names
    (MissBankLinear._mark_stale_snapshots)."""
    description: dict
    description_version: Optional[int]
    ranks: List[int]
    periods: List[int]
    memory: Dict[str, Tuple[str, int]]
    rewritten: set = dataclasses.field(default_factory=set)


# A state_dict's slot description (the storage of its _extra_state tensor, which detach() and
# views share) -> _Snapshot, while any tensor on it lives. Keyed by identity.
_SNAPSHOTS = WeakIdKeyDictionary()


def add_bank_terms(y: Tensor, x: Tensor, bank: Tensor, ranks: Tensor, periods: Tensor, index: Tensor,
                   dropouts: Optional[Tensor], inplace: bool) -> Tensor:
    """y plus, for every row t with index[t] >= 0, the MiSS term of the adapter in slot index[t].

    The one place that turns a bank into miss.bank_fold + miss.bank_add calls (MissBankLinear and
    the accelerated PEFT layer's adapter_names= both call it).

    Args:
        y: the base output (..., out); x: the input (..., in), same leading sizes.
        bank, ranks, periods: as miss.bank_add; the bank's r_cap is the fold width.
        index: int64 slot per row, y's leading sizes.
        dropouts: float64 (N,), each slot's dropout rate (training), or None (no dropout). With
            rates, one key is drawn with new_dropout_key(x.device), so torch.manual_seed
            reproduces every row's mask.
        inplace: y may be written in place when autograd does not record (y is the output of a
            plain nn.Linear, which nothing else holds; a hooked or custom base module's output
            might be kept by someone, e.g. an activation cache).
    Returns y with the terms added, in y's dtype. A half-precision bank (a model cast to bf16)
    is used in float32: each row's fold and term are summed in float32 and rounded once (PEFT
    computes a bf16 block's branch in bf16; README, "Precision").
    """
    refuse_forward_tangents("miss::bank_fold / miss::bank_add", x, bank, y)  # before the draw and the in-place choice
    if bank.dtype in (torch.float16, torch.bfloat16):
        bank = bank.float()
    if dropouts is not None:
        _refuse_bad_rows_before_the_draw(index, ranks)
    key = None if dropouts is None else new_dropout_key(x.device)
    s = torch.ops.miss.bank_fold(x, index, ranks, bank.shape[1], dropouts, key, bank.dtype)
    differentiable = torch.is_grad_enabled() and (bank.requires_grad or x.requires_grad or y.requires_grad)
    # The functional op under torch.func transforms too (vmap, grad, ... even under no_grad): the
    # in-place bank_add_ has no batching rule, and a sample's y may not hold a batched bank's term.
    # (Dynamo reports an interpreter while it traces, so torch.compile takes the functional op;
    # functionalization would turn the in-place one into it there anyway.)
    transformed = torch._C._functorch.peek_interpreter_stack() is not None
    # A program recorded by torch.export or torch.jit.trace keeps the op it saw: recorded under
    # no_grad, the in-place one (which has no autograd) refused every later call made with grad
    # enabled, where the bank's parameter requires grad (a review, 2026-12-05). Export
    # functionalizes the in-place op anyway; a traced program allocates one (rows, out) output.
    recorded = _exporting() or torch.jit.is_tracing()
    if differentiable or not inplace or transformed or recorded:
        return torch.ops.miss.bank_add(y, s, bank, ranks, periods, index, True)
    torch.ops.miss.bank_add_(y, s, bank, ranks, periods, index, True)
    return y


def _refuse_bad_rows_before_the_draw(index: Tensor, ranks: Tensor, where: str = "miss: bank_fold",
                                     name: str = "") -> None:
    """On the CPU, the row ids that miss.bank_fold would refuse (an id past the bank, or naming an
    empty slot). Named by their place in `index` when `name` is given (MissBankLinear's
    adapter_index: the op sees it broadcast over each sequence's tokens, and named row 21 of a
    (5, 7) batch for entry 3 of the caller's ids; a review, 2026-12-05), else by their row.
    Refused before the dropout key is drawn: drawing it advances torch's CPU
    generator, and a refused call must leave the user's random stream as it found it (the same
    seed, then the same masks, whether or not a bad batch came in between). The op's own check
    (csrc/ops/common/checks.cpp) comes after the draw, since the key is one of its inputs. On CUDA
    a bad id trips a device-side assertion (reading the ids on the host would synchronise), under
    torch.compile the tracer sees no values, and under torch.func transforms (vmap) the ids may be
    batched, whose values vmap cannot read: all three skip this."""
    if (index.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(index) or index.numel() == 0
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return
    flat = index.reshape(-1)
    slots = ranks.numel()
    past = flat >= slots
    def entry(t: int) -> str:  # index[t] as the caller indexes it: adapter_index[3, 0], or a 0-D index's name
        if not name:
            return f"index[{t}]"
        return f"{name}[{', '.join(str(int(i)) for i in torch.unravel_index(torch.tensor(t), index.shape))}]" \
            if index.dim() else name

    if bool(past.any()):
        t = int(past.nonzero()[0])
        raise ValueError(f"{where} {entry(t)}={int(flat[t])} names no slot of a bank with {slots} slots "
                         "(a negative index means no adapter)")
    used = flat >= 0
    empty = used & (ranks[flat.clamp(min=0)] == 0)  # ranks and ids both on the bank's device
    if bool(empty.any()):
        t = int(empty.nonzero()[0])
        user = entry(t) if name else f"row {t}"
        raise ValueError(f"{where} ranks[{int(flat[t])}]=0 (used by {user}): the slot holds no adapter")


def host_to_device(values: Tensor, device) -> Tensor:
    """A small CPU tensor (row ids, ranks) copied to `device`. To a CUDA device through pinned
    memory with non_blocking=True: a copy from pageable memory is followed by a
    cudaStreamSynchronize, so the host would wait for all the GPU work queued so far, once per
    layer and forward. The pinned block is not reused before the copy has run (torch's caching
    host allocator records the copy on the stream). Fake tensors (torch.compile, export) and other
    devices take a plain copy."""
    device = torch.device(device)
    # Not while a CUDA graph is being captured: a replay would read the pinned block again, which
    # the allocator may have handed out since (the plain copy fails loudly under capture instead).
    if (device.type == "cuda" and not is_fake(values) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()):
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def row_index(index: Tensor, x: Tensor, where: str, names_from: Optional[str] = None) -> Tensor:
    """The per-row slot ids for x (..., in): `index` with x's leading sizes as is, or one id per
    sequence (1-D, x.shape[0] long) broadcast over the other leading sizes (a (batch, seq, in)
    activation of a model run with one adapter name per sequence), or one id (0-D) for every row
    (what mixed_batch gives a model whose layers regroup rows, when every row names the same
    adapter: see RowLayout). ValueError otherwise; `names_from` (e.g. "miss_ext.mixed_batch")
    says where a 1-D index's names came from, for the error to speak of names, not of an index
    the user never made."""
    lead = tuple(x.shape[:-1])
    if tuple(index.shape) == lead:
        return index
    if index.dim() == 0:
        return index.expand(lead)
    if index.dim() == 1 and len(lead) >= 2 and index.shape[0] == lead[0]:
        return index.reshape((lead[0],) + (1,) * (len(lead) - 1)).expand(lead)
    names = index.shape[0] if index.dim() == 1 else 0
    if names_from is not None and names and len(lead) >= 2:
        # "the adapter index has shape (2,)" spoke of an internal tensor to a user who had given
        # 2 names for 3 prompts (a new-user pass, 2026-12-07).
        message = (f"{where} (in_features={x.shape[-1]}): {names_from} was given {names} adapter "
                   f"name{'s' if names != 1 else ''} for an input of {lead[0]} sequences (x has shape "
                   f"{tuple(x.shape)}, sequences along its first dimension); give one name per sequence.")
    else:
        message = (f"{where} (in_features={x.shape[-1]}): the adapter index has shape {tuple(index.shape)}; it "
                   f"needs x's leading sizes {lead}, or one entry per sequence when x is (batch, ..., in_features).")
    # Hints from the shapes alone, so worded as conditions: which case it is, only the caller knows.
    if names and len(lead) >= 2 and lead[0] > names and lead[0] % names == 0:
        # A batch k times the names': what beam search / num_return_sequences make.
        message += (f" x holds {lead[0]} sequences for {names} names: if that is beam search or "
                    "num_return_sequences > 1, repeat each sequence's name (miss_ext.mixed_batch(..., expand=k));"
                    + repeated_batch_hint())
    elif names and len(lead) == 1 and lead[0] > names:
        message += flattened_tokens_hint(x)
    raise ValueError(message)


def repeated_batch_hint() -> str:
    """Said when a (batch, ..., in) x has k times as many sequences as there are names: the cases
    where the model itself made the extra rows, so no list of names given to the model can route
    them (the caller adds what the user can repeat, e.g. beam search's names)."""
    return (" if the model repeats its batch inside (classifier-free guidance: Janus's image generation runs each "
            "prompt twice), run those calls with one adapter (set_adapter, or the same name for every sequence on a "
            "model-level bank), not per-sequence names; if the model regroups each sequence's tokens into several "
            "rows (Swin's attention windows), that layer cannot be routed by sequence: leave it out of the "
            "target_modules of mixed-batch adapters")


# transformers models whose layers see (sequence, batch, features) activations. Rows are matched to
# sequences by x's first dimension, so a batch as long as its sequences passed every shape check
# there and mixed rows up silently (a review of 2026-12-03: FSMT off by 0.37 where the adapter's
# whole effect was 0.39). Longformer's self-attention, and LED's encoder built on it, transpose to
# (sequence, batch, features) before calling query/key/value. Found by the next review (tenth
# session, 2026-12-03; rows off by 1-6 where the adapters' effects were 2-4): Bros (its bbox
# embeddings see (sequence, sequence, batch, features), its relation-extractor heads (sequence,
# batch, features)), Mask2Former's and OneFormer's decoders ((queries, batch, features)),
# BridgeTower's vision tower ((patches, batch, features)).
SEQUENCE_FIRST_MODEL_TYPES = ("fsmt", "xlnet", "longformer", "led", "bros", "mask2former", "oneformer", "bridgetower")


# Config attributes of multimodal transformers models that put image (video, audio) features at
# these tokens' places in the text sequences (RowLayout).
_MODALITY_TOKEN_IDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                       "audio_token_id", "audio_token_index")


# Arguments of a transformers model's forward / generate that carry no image, video or audio: a
# PEFT call (adapter_names=) whose tensors all come by these names runs no vision (audio) tower or
# projector of a multimodal model, so the config rule below does not refuse it
# (RowLayout.reason_for). A list of what is text, not of what is not: an argument of a model or a
# transformers version not listed here is refused (loud), never let through (silent).
TEXT_ONLY_ARGUMENTS = frozenset({
    "input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "cache_position",
    "token_type_ids", "past_key_values", "cache", "logits_to_keep", "decoder_input_ids",
    "decoder_attention_mask", "decoder_position_ids", "decoder_inputs_embeds", "encoder_outputs",
    "head_mask", "decoder_head_mask", "cross_attn_head_mask",
    # Where a sequence's image / video tokens are (0 for text): the Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    # and GLM-4V processors return it for text-only prompts too; it carries no pixels.
    "mm_token_type_ids",
})


# Arguments of generate() that steer decoding and carry no inputs (objects a text-only call passes).
_CONTROL_ARGUMENTS = frozenset({
    "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
    "streamer", "tokenizer", "assistant_tokenizer", "compile_config", "custom_generate", "adapter_names",
})


def other_modality_arguments(args: Sequence[object], kwargs: Dict[str, object]) -> List[str]:
    """The arguments of a forward / generate call that may carry images, video or audio: every
    positional argument holding data ("positional argument i": its name is the callee's) and
    every keyword holding data whose name is neither in TEXT_ONLY_ARGUMENTS nor one of
    generate's control objects. Data is anything but None, a bool, number, str, dtype or device,
    or containers (sequences, mappings, dataclasses) of those only: a tensor, an array, or any
    other object (a processor's BatchFeature is a mapping, searched), so that an image in a
    container this cannot open counts as one (loud), never as text (silent)."""
    def holds_data(value: object, depth: int = 0) -> bool:
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
            return False
        if depth > 16:
            return True
        if isinstance(value, Mapping):
            return any(holds_data(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple, set, frozenset)):
            return any(holds_data(v, depth + 1) for v in value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return any(holds_data(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
        return True
    found = [f"positional argument {i}" for i, value in enumerate(args) if holds_data(value)]
    return found + [name for name, value in kwargs.items()
                    if name not in TEXT_ONLY_ARGUMENTS and name not in _CONTROL_ARGUMENTS and holds_data(value)]


# transformers classes (by name: transformers is optional) whose named children hold layers that see
# rows other than the sequences in order, beyond the config rule above (found by a review of
# 2026-12-03, rows 0.02-0.83 off where the adapters' effects were 0.02-0.66): Kosmos-2 / 2.5 place
# images by a position mask (no image token id) and run the vision side on the images of the whole
# batch; Phi-4-multimodal's embed_tokens_extend encodes audio clips and image crops across the
# batch; CSM's depth decoder trains on the frames gathered from the whole batch (labels); Higgs-Audio
# v2's decoder layers send text and audio tokens, gathered across the batch, to two MLPs.
_REGROUPING_CHILDREN = {
    "Kosmos2Model": ("vision_model", "image_to_text_projection"),
    "Kosmos2ForConditionalGeneration": ("vision_model", "image_to_text_projection"),
    "Kosmos2_5Model": ("vision_model", "image_to_text_projection"),
    "Kosmos2_5ForConditionalGeneration": ("vision_model", "image_to_text_projection"),
    "Phi4MultimodalModel": ("embed_tokens_extend",),
    "CsmForConditionalGeneration": ("depth_decoder",),
    "HiggsAudioV2DecoderLayer": ("mlp", "audio_mlp"),
}


def _is_moe_experts(module: nn.Module, name: str) -> bool:
    """An MoE block's experts (transformers' SwitchTransformersExperts, NllbMoeExperts, ...; or a
    ModuleList/ModuleDict registered as `experts`, as remote-code MoE models build them)."""
    return type(module).__name__.endswith("Experts") or \
        (name == "experts" and isinstance(module, (nn.ModuleList, nn.ModuleDict)))


class RowLayout:
    """Whether a model's layers may see rows other than its sequences in order, which a mixed
    batch cannot route (rows are matched to sequences by x's first dimension). Fed every module of
    the caller's own pass over the model (`see`), then `reason` says why (None when nothing says
    so). What says so:
    - a transformers model of SEQUENCE_FIRST_MODEL_TYPES;
    - an nn.MultiheadAttention built with batch_first=False whose holder (torch's transformer
      layers, CLIP-style residual blocks) holds an adapted layer: its layers see (sequence, batch,
      features);
    - MoE experts (_is_moe_experts) holding an adapted layer: each expert sees the tokens routed
      to it, which can number exactly the batch's sequences (a prompt of a few tokens; every
      decode step) and come in the router's order (NllbMoe lists them by expert slot first), so
      rows got other sequences' adapters silently (review of 2026-12-03: SwitchTransformers rows
      1.4 off, NllbMoe generated other tokens).
    - the vision (audio, video) side of a multimodal model that merges image features into its
      text sequences (a transformers config with a text_config and an image/video/audio token
      id: Llava, LlavaNext, Idefics3, Qwen2-VL, Gemma3, PaliGemma, BLIP-2, ...): every child of it
      but its language model (the child built from config.text_config) and its output embeddings
      holds layers that see images, their tiles or patches, or query tokens, and a sequence may
      hold several images or none: with as many images as sequences, images took other
      sequences' adapters silently (review of 2026-12-03, eleventh session: Llava's row 0 0.28
      off where its adapter's effect was 0.41, generate gave other tokens). Only in a call that
      brings images, video or audio: `reason_for(other_modalities=False)` leaves it out.
    - the children _REGROUPING_CHILDREN names for Kosmos-2 / 2.5, Phi-4-multimodal, CSM and
      Higgs-Audio v2 (their layouts, beside it).
    Other code that regroups rows cannot be seen. A few dict and type checks per module: the pass
    runs on every adapter_names= call and mixed_batch entry."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._why: Optional[str] = None
        # (path, why, modality): adapted layers under path see other rows; modality: only where the
        # call brings images, video or audio (the vision side of a multimodal model)
        self._holders: List[Tuple[str, str, bool]] = []
        self._adapted: List[str] = []
        self._multimodal: Dict[int, bool] = {}  # id(config) -> whether it merges other modalities

    def see(self, path: str, module: nn.Module, adapted: bool) -> None:
        """`module` at `path` in the model; `adapted`: whether it is an adapter layer."""
        if self._why is not None:
            return
        # __dict__, not getattr: nn.Module.__getattr__ raises for every module without one (slow).
        config = module.__dict__.get("config")
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str) and model_type in SEQUENCE_FIRST_MODEL_TYPES:
            self._why = (f"it holds a {type(module).__name__} (model_type {model_type!r}), whose layers see "
                         "(sequence, batch, features) or similar")
        elif isinstance(module, nn.MultiheadAttention) and not module.batch_first:
            holder = path.rpartition(".")[0]
            self._holders.append((holder, f"it holds a {type(self._model.get_submodule(holder)).__name__} (at "
                                          f"{holder!r}) with an nn.MultiheadAttention built with batch_first=False, "
                                          "whose layers see (sequence, batch, features) (leave them out of the "
                                          "adapters' target_modules to mix adapters elsewhere)", False))
        elif _is_moe_experts(module, path.rpartition(".")[2]):
            self._holders.append((path, f"it holds MoE experts ({type(module).__name__} at {path!r}) whose layers see "
                                        "the tokens routed to each expert, in the router's order (leave the experts "
                                        "out of the adapters' target_modules to mix adapters elsewhere)", False))
        elif config is not None and self._merges_modalities(config):
            self._see_multimodal(path, module, config)
        for name in _REGROUPING_CHILDREN.get(type(module).__name__, ()):
            holder = f"{path}.{name}" if path else name
            self._holders.append((holder, f"it holds {holder!r} of a {type(module).__name__}, whose layers see rows "
                                          "gathered across the batch (images, audio clips, frames or tokens of "
                                          "one kind), not the sequences in order (leave them out of the adapters' "
                                          "target_modules to mix adapters elsewhere)", False))
        if adapted:
            self._adapted.append(path)

    def _merges_modalities(self, config: object) -> bool:
        key = id(config)
        if key not in self._multimodal:
            self._multimodal[key] = getattr(config, "text_config", None) is not None and any(
                getattr(config, name, None) is not None for name in _MODALITY_TOKEN_IDS)
        return self._multimodal[key]

    def _see_multimodal(self, path: str, module: nn.Module, config: object) -> None:
        text_config = config.text_config
        try:
            output = module.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            output = None
        for name, child in module.named_children():
            child_config = child.__dict__.get("config")
            # The language model, the output embeddings (they see the sequences' tokens), and the
            # same model's inner module (LlavaForConditionalGeneration.model: seen in its turn).
            if child_config is text_config or child_config is config or child is output:
                continue
            holder = f"{path}.{name}" if path else name
            self._holders.append((holder, f"it holds a {type(child).__name__} (at {holder!r}) beside the language "
                                          f"model of the multimodal {type(module).__name__}, whose layers see "
                                          "images, their tiles or patches (or audio, video), not the sequences: a "
                                          "sequence may hold several images or none (leave the vision tower and "
                                          "projector out of the adapters' target_modules to mix adapters in the "
                                          "language model)", True))

    @property
    def reason(self) -> Optional[str]:
        """Why the model's adapted layers may see rows other than its sequences in order, in any
        call; None when nothing says so."""
        return self.reason_for(other_modalities=True)

    def reason_for(self, other_modalities: bool) -> Optional[str]:
        """`reason`, for a call that brings images, video or audio (other_modalities) or not: the
        vision (audio) side of a multimodal model runs only on those, so a text-only call (the
        PEFT path knows its arguments: other_modality_arguments) leaves those layers out; the
        other rules hold whatever the call brings."""
        if self._why is None:
            for holder, why, modality in self._holders:
                if modality and not other_modalities:
                    continue
                # The holder itself too: a multimodal model's projector may be the adapted linear
                # (BLIP-2's language_projection, Fuyu's vision_embed_tokens).
                if any(holder in ("", path) or path.startswith(holder + ".") for path in self._adapted):
                    return why
        return self._why


def sequence_first_error(why: str, where: str) -> ValueError:
    """The refusal of a mixed batch with different names per row for RowLayout's `reason`."""
    return ValueError(f"{where}: mixed batches need layers that see (batch, ..., features) inputs, one row per "
                      f"sequence in order, and {why}: rows cannot be matched to sequences (where as many rows as "
                      "sequences reach a layer every shape check passes and rows get other adapters, silently). "
                      "Give every row the same adapter in a call instead")


def flattened_tokens_hint(x: Tensor) -> str:
    """Said when a 2-D x has more rows than there are names: what a model that flattens its tokens
    passes (OPT's fc1/fc2; an MoE block's experts and shared expert take
    hidden_states.view(-1, hidden)). Worded as a condition: only the caller knows which case it is."""
    return (f" x is {tuple(x.shape)}: if the model flattens its tokens before this layer (OPT's fc1/fc2, an MoE "
            "block's experts or shared expert take hidden_states.view(-1, hidden)), its rows are not sequences and "
            "cannot be routed by sequence: leave that layer out of the target_modules of mixed-batch adapters "
            "(README: rows are matched by the first dimension, as in PEFT's adapter_names=)")


def _exporting() -> bool:
    """torch.compiler.is_exporting(), except where Dynamo answers it wrongly: torch 2.11's Dynamo
    traces it as True under plain torch.compile (seen in CI's torch 2.11 leg), so there, inside
    Dynamo, it is not trusted. Non-strict torch.export (the default) runs without Dynamo and is
    still detected; a strict export inside mixed_batch on torch < 2.12 is not (README)."""
    if _DYNAMO_IS_EXPORTING_UNRELIABLE and torch.compiler.is_dynamo_compiling():
        return False
    return torch.compiler.is_exporting()


_DYNAMO_IS_EXPORTING_UNRELIABLE = torch.__version__ < (2, 12)  # torch's TorchVersion compares with tuples


def _check_recompute_in_eager(layer: "MissBankLinear") -> None:
    layer._check_recompute()


# Under torch.compile, a training forward (or one with grad) that reads mixed_batch's row ids,
# traced inside a checkpoint entered outside the compiled region, checks its recompute as in
# eager mode, outside the graph: a graph break per such layer call. Why: inside a compiled graph
# no Python of the layer runs, so a checkpoint placed around a compiled block
# (checkpoint_wrapper(compiled_layer), torch.utils.checkpoint(compiled_fn)) re-ran the graph
# inside backward() with the current batch's ids, and a backward in another batch trained the
# wrong adapters, silently (a new-user pass, 2026-12-04: input gradients 1.38 off for gradients
# of 5.85). Only there (_checkpointing.traced_inside_checkpoint): a break in every compiled
# training forward cost whole-model graphs (a review, 2026-12-04: 9 of 68 ops compiled in a toy
# model) and made a checkpoint inside the compiled region, which Dynamo traces with the ids as
# graph inputs (exact), run eagerly. Inference and ids passed as an argument (layer(x,
# adapter_index): the recompute gets the same ids) never break.
_check_recompute_outside_the_graph = torch.compiler.disable(
    _check_recompute_in_eager, reason="miss_ext: a MissBankLinear training forward under miss_ext.mixed_batch, "
    "compiled inside activation checkpointing entered outside the compiled region, checks outside the graph that the "
    "checkpoint does not recompute it in another batch (README, 'Training several adapters in one batch'): compile "
    "the checkpointed module (the checkpoint inside the compiled region), compile without fullgraph=True (a graph "
    "break per bank layer call), or pass the row ids as an argument, layer(x, adapter_index)")


def check_bank_size(capacity: object, max_r: object) -> Tuple[int, int]:
    """(capacity, max_r) as Python ints. TypeError naming capacity or max_r unless each is an int
    or a NumPy integer (not a bool), ValueError unless it is positive, as MissLinear's r
    (apply_bank checks them before it changes the model, too)."""
    for name, value in (("capacity", capacity), ("max_r", max_r)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"MissBankLinear {name} must be a positive int, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"MissBankLinear {name} must be a positive int, got {value!r}")
        if value > MAX_TENSOR_SIZE:
            raise ValueError(f"MissBankLinear {name}={value} is above the largest size a tensor dimension holds "
                             "(2**63 - 1)")
    return int(capacity), int(max_r)


# The slot description's length in a state_dict: at least this many bytes per slot, padded with
# spaces. torch.distributed.checkpoint loads into a state_dict of the same tensor sizes, and the
# JSON's own length changes with every name and rate: a checkpoint loaded into a bank whose slots
# held other names, other rates or none (a model built again to resume) failed inside dcp with
# "Size mismatch" for _extra_state (a review, 2026-12-07). Padded, it loads into any bank of the
# same capacity and max_r while the description fits: names of up to about 150 characters each
# in ASCII (JSON escapes every other character to 6 or 12 bytes; the rest of a slot's entry takes
# at most about 45). A longer description keeps its own length, as every description did before:
# docs/multi_gpu.md shows how dcp loads it (the entries sized from the checkpoint's metadata). The
# cost: 256 bytes a slot, beside the bank's capacity * max_r * out_features elements.
SLOT_DESCRIPTION_BYTES = 256


class MissBankLinear(BaseTensorAttributes, nn.Module):
    """A frozen linear layer with a bank of MiSS adapters, one adapter per row of a batch.

    Args:
        base_layer: the frozen layer (nn.Linear or any module with `weight`, in_features and
            out_features that computes its own output; it is called as a module). It is frozen.
        capacity: number of adapter slots (N), a positive int.
        max_r: the largest r an adapter may have (r_cap), and the width of the per-row fold; a
            positive int.
    TypeError for a capacity or max_r that is not an int, ValueError for one < 1; TypeError for a
    base without weight, in_features or out_features, or whose weight is not a tensor (torch.ao's
    quantized linears, whose weight() is a method).

    Attributes:
        bank: Parameter (capacity, max_r, out_features) in PEFT's adapter dtype (float32 for
            fp16/bf16 bases). Slot a holds its adapter's block in [:r_a, :q_a] (q_a = out_features
            in the default mode, mini_r in the mini mode), zeros elsewhere.
        ranks, periods: int64 tensors (capacity,), r_a and q_a of each slot (0 when empty), in the
            state_dict but not buffers (see _SLOT_TENSORS).
        adapter_names: the slot names, None for an empty slot.

    forward(x, adapter_index=None): x (..., in_features); adapter_index int64 slot ids (from
    `index_of(names)`; negative = base only) with x's leading sizes, or one per sequence
    (x.shape[0],) broadcast over the rest, or one (0-D) for every row; None takes the ids
    `miss_ext.mixed_batch` set for the whole model (`rows`), and raises ValueError outside it.
    Returns (..., out_features) in x's dtype (the base output's, but under autocast, as MissLinear
    and PEFT). Errors: TypeError for an adapter_index that is not an int64 tensor; ValueError for
    an index shape that fits none of these forms, or (CPU) an id past the bank or naming an empty
    slot (on CUDA these trip a device-side assertion in miss.bank_fold). The base layer runs on x
    first, so a bad x (wrong last size or dtype) raises the base's own error (torch's RuntimeError
    for nn.Linear).

    Source: miss_ext/bank.py module docstring (issue 14); each row computes MissLinear's term
    (docs/miss.md, "Default and mini"); the per-row names follow PEFT's adapter_names=.
    """

    def __init__(self, base_layer: nn.Module, capacity: int, max_r: int) -> None:
        super().__init__()
        capacity, max_r = check_bank_size(capacity, max_r)
        weight = read_to_describe(base_layer, "weight")
        if weight is None or not hasattr(base_layer, "in_features") or not hasattr(base_layer, "out_features"):
            raise TypeError(f"MissBankLinear needs an nn.Linear-like base layer (weight, in_features, out_features), "
                            f"got {type_name(base_layer)}")
        if not isinstance(weight, Tensor):
            # Its dtype and device give the bank's. (A tensor subclass, such as a quantized weight,
            # has both: the base computes its own output.)
            raise TypeError(f"MissBankLinear needs a base layer whose weight is a tensor; {type_name(base_layer)}: "
                            f"{tensor_problem(weight)}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.max_r = max_r
        self.bank = nn.Parameter(allocate_block((capacity, max_r, self.out_features), adapter_dtype(weight.dtype),
                                                weight.device, f"MissBankLinear(capacity={capacity}, max_r={max_r})"))
        # Frozen once the allocation went through: a failed construction leaves the user's layer
        # as it was (an atomicity review, 2026-12-03).
        base_layer.requires_grad_(False)
        self._init_slot_tensors(weight.device)
        self._any_dropout = False  # some adapter has a dropout rate > 0 (_sync_slots)
        self.adapter_names: List[Optional[str]] = [None] * capacity
        self.dropouts: List[float] = [0.0] * capacity
        # Each slot's mode ("default" / "mini", None when empty): the block's width alone cannot
        # tell a mini adapter whose mini_r equals out_features from a default one.
        self.modes: List[Optional[str]] = [None] * capacity
        # Slots whose adapter (of the whole model) does not adapt this layer: add_absent.
        self.absent: List[bool] = [False] * capacity
        # The per-row slot ids of the current model call (miss_ext.mixed_batch sets and clears
        # them; never copied or pickled). While they are set the slots cannot change.
        self.rows: Optional[Tensor] = None

    # The slot tensors: each slot's rank and period (saved in the state_dict), and what forward
    # needs about it, rebuilt from the slot lists (_sync_slots): its dropout rate and the slot its
    # rows use (-1 for an absent adapter: base output only). They describe the bank's structure and
    # are not buffers: torch.optim.swa_utils.AveragedModel(use_buffers=True), the usual EMA setup,
    # "averages" every buffer, int64 ones in float32 truncated back, which turned ranks [4, 3, 6, 7]
    # into [4, 2, 5, 6] and routed rows of one adapter to another's block in the EMA copy, silently
    # (training-loop review, 2026-12-02). As plain tensor attributes they are moved by .to() and
    # module casts (_apply), saved and loaded with the state_dict (ranks, periods), and are graph
    # inputs to torch.compile as buffers were (a slot change does not recompile).
    _SLOT_TENSORS = ("ranks", "periods", "_dropouts", "_route")
    _SAVED_SLOT_TENSORS = ("ranks", "periods")

    def _init_slot_tensors(self, device) -> None:
        self.ranks = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        self.periods = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        self._dropouts = torch.zeros(self.capacity, dtype=torch.float64, device=device)
        self._route = torch.arange(self.capacity, dtype=torch.int64, device=device)

    @property
    def capacity(self) -> int:
        """How many adapters the bank holds at most (its slots; the bank's first dimension)."""
        return self.bank.shape[0]

    # ---- the bank -------------------------------------------------------------------------------
    def _check_mutable(self, what: str) -> None:
        # The row ids of a mixed_batch name slots: changing a slot inside it would silently give
        # those rows another adapter. Refused where the change is asked for, so that forward need
        # not compare names (which, under torch.compile, would guard on them and recompile).
        if self.rows is not None:
            raise ValueError(f"MissBankLinear: cannot {what} inside miss_ext.mixed_batch (its rows name the bank's "
                             "slots); change adapters outside it")
        # A sharded bank (FSDP2 shards its slots): indexing a slot of a DTensor gives a new
        # tensor, so writes into it would be lost.
        if is_dtensor(self.bank):
            raise ValueError(f"MissBankLinear: cannot {what} in a sharded bank (a DTensor: FSDP2 or tensor "
                             "parallelism); add and remove adapters before sharding the model")
        # torch refuses writing an inference tensor outside inference mode only after the write.
        if self.bank.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"MissBankLinear: cannot {what}: the bank is an inference tensor (made under "
                             "torch.inference_mode()), which cannot be written outside inference mode; change "
                             "adapters under torch.inference_mode(), or build the bank outside it")

    def adapter_shape(self, name: str, r: int, mode: str = "default", mini_r: int = 1,
                      dropout: float = 0.0) -> Tuple[int, int]:
        """The block shape an adapter with these settings has in this bank: (r, out_features) in
        the default mode, (r, mini_r) in the mini mode. `name` only names the adapter in the
        errors; r, mode, mini_r and dropout as add_adapter's. TypeError for bat or a dropout that
        is no number, ValueError for r > max_r, bad sizes or a dropout outside [0, 1). Changes
        nothing (the model-level functions check every layer with it before any layer changes)."""
        if mode == "bat":
            raise TypeError(f"adapter {name!r} is a bat adapter: bat changes the base weight itself, so rows of "
                            "different bat adapters cannot share one base GEMM; serve it with its own MissLinear "
                            "or merge it")
        shape = block_shape(mode, r, mini_r, self.in_features, self.out_features, empty_output=True)
        if mode == "mini" and mini_r > self.out_features:
            # Only out_features = 0 gets here (every mini_r divides 0): a slot holds its block in
            # (max_r, out_features) of the bank, where (r, mini_r) does not fit (a raw size error
            # with a block, a (r, 0) block and a file load_adapter refuses without; a review, 2026-12-07).
            raise ValueError(f"adapter {name!r}: mini_r={mini_r} is above out_features={self.out_features} of this "
                             "bank layer, whose slots hold a block in out_features columns")
        if r > self.max_r:
            raise ValueError(f"adapter {name!r} has r={r} > max_r={self.max_r} of this bank")
        check_dropout(dropout)
        return shape

    def add_adapter(self, name: str, r: int, mode: str = "default", mini_r: int = 1, dropout: float = 0.0,
                    block: Optional[Tensor] = None) -> int:
        """Puts an adapter into a free slot and returns the slot id. `block` (r, out_features) or
        (r, mini_r), any real floating dtype, is copied in (cast to the bank's dtype); None gives
        PEFT's zero init. Raises ValueError for a bad or taken name, a full bank, r < 1 or r >
        max_r, a mini_r not dividing out_features, a block of another shape, a block on the meta
        device or holding values not finite in the bank's dtype (as load_bank refuses them),
        dropout outside [0, 1), a bank on the meta device, or inside miss_ext.mixed_batch;
        TypeError for bat, a non-int r / mini_r, a dropout that is no number, or a block that is
        no tensor or of a dtype that is not real floating (an integer block was cast, a complex one
        lost its imaginary part)."""
        self._check_mutable(f"add adapter {name!r}")
        shape = self.adapter_shape(name, r, mode, mini_r, dropout)
        if self.bank.is_meta or self.ranks.is_meta:
            # Zero-init adapters were taken here: their rank and period went into meta tensors,
            # kept nowhere, and after to_empty() the layer read uninitialised ranks (garbage
            # routing, a wrong rank in a saved file: found with a new-user pass, 2026-12-04).
            raise ValueError(f"adapter {name!r}: the bank is on the meta device (the model is not materialised), so "
                             "the adapter's rank and block would be kept nowhere; materialise the model first "
                             "(to_empty(), then load the base weights), or load a bank model's state_dict")
        if block is not None and (not isinstance(block, Tensor) or not block.is_floating_point()):
            what = f"a tensor of dtype {block.dtype}" if isinstance(block, Tensor) else type_name(block)
            raise TypeError(f"adapter {name!r}: block must be a real floating tensor, got {what}")
        if block is not None and block.is_meta:
            raise ValueError(f"adapter {name!r}: the block is on the meta device: it has no values to copy in")
        if block is not None and tuple(block.shape) != tuple(shape):
            raise ValueError(f"adapter {name!r}: block shape {tuple(block.shape)} does not match r={r}, mode={mode!r} "
                             f"(expected {tuple(shape)})")
        if block is not None and not bool(torch.isfinite(block.to(self.bank.dtype)).all()):
            raise ValueError(f"adapter {name!r}: the block holds values that are not finite in the bank's "
                             f"{self.bank.dtype} (NaN or inf, or beyond its range)")
        slot = check_new_adapter(self.adapter_names, name)
        with self._slot_kept_on_error(slot):
            with torch.no_grad():
                self.bank[slot].zero_()
                if block is not None:
                    self.bank[slot, :shape[0], :shape[1]].copy_(block)
                self.ranks[slot] = r
                self.periods[slot] = shape[1]
            self.adapter_names[slot] = name
            self.dropouts[slot] = float(dropout)
            self.modes[slot] = mode
            self._sync_slots([slot])
        return slot

    def add_from(self, name: str, layer: MissLinear) -> int:
        """Copies a MissLinear's adapter (block, r, mode, mini_r, dropout) into a free slot; returns
        the slot id. TypeError for a layer that is not a miss_ext.MissLinear or a bat one;
        ValueError for a merged layer, other in/out features, and as add_adapter."""
        if not isinstance(layer, MissLinear):
            raise TypeError(f"add_from takes a miss_ext.MissLinear, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError(f"adapter {name!r}: the MissLinear is merged; unmerge it first")
        if (layer.in_features, layer.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"adapter {name!r}: the MissLinear is {layer.in_features} -> {layer.out_features}, this "
                             f"bank's layer {self.in_features} -> {self.out_features}")
        return self.add_adapter(name, layer.r, layer.mode, layer.mini_r, layer.dropout, layer.miss_block.detach())

    def add_absent(self, name: str) -> int:
        """Registers an adapter of the model that does not adapt this layer (its PEFT config does
        not target it), so that slot ids stay the same in every layer of a model; rows naming it
        get the base output here. Returns the slot id. ValueError for a name that is empty,
        "__base__" or taken, a full bank, or a call inside miss_ext.mixed_batch."""
        self._check_mutable(f"add adapter {name!r}")
        slot = check_new_adapter(self.adapter_names, name)
        with self._slot_kept_on_error(slot):
            self.adapter_names[slot] = name
            self.absent[slot] = True
            self._sync_slots([slot])
        return slot

    def remove_adapter(self, name: str) -> None:
        """Empties the slot of adapter `name` (zeros, rank 0, and a zero gradient in `bank.grad`)
        for another adapter to take; rows must not name it afterwards. ValueError naming the bank's
        adapters for an unknown name, or inside miss_ext.mixed_batch."""
        self._check_mutable(f"remove adapter {name!r}")
        slot = self._slot(name)
        with self._slot_kept_on_error(slot):
            with torch.no_grad():
                self.bank[slot].zero_()
                # The removed adapter's accumulated gradient is no one's: kept, the next adapter
                # in the slot inherited it, and a step moved an adapter that no batch had named (a
                # review, 2026-12-07; unused slots get zero gradients). Optimizer state stays
                # (README: make a fresh optimizer after changing the bank).
                self._zero_slot_grads([slot])
                self.ranks[slot] = 0
                self.periods[slot] = 0
            self.adapter_names[slot] = None
            self.dropouts[slot] = 0.0
            self.modes[slot] = None
            self.absent[slot] = False
            self._sync_slots([slot])

    @contextlib.contextmanager
    def _slot_kept_on_error(self, slot: int):
        """Around the writes of one slot (add_adapter, add_absent, remove_adapter): a failure part
        way (an allocation in _sync_slots, an interrupt) puts the slot back as it was. Without
        it an interrupted remove left the block zeroed under the adapter's name, and its rows got
        the base output silently; an interrupted add left the name in one layer of a model, whose
        other layers then disagreed (a fault-injection sweep, 2026-12-06). Costs a copy of the
        slot's block."""
        state = self._slot_state(slot)
        try:
            yield
        except BaseException:
            self._restore_slot(slot, state)
            raise

    def _slot_state(self, slot: int) -> tuple:
        """Everything remove_adapter clears in `slot` (for remove_bank_adapter's rollback and
        _slot_kept_on_error): copies of the block, its gradient, rank and period (tensors: no host read, and a
        bank on the meta device has none to read) and the slot lists' entries."""
        grad = self.bank.grad
        return (self.bank[slot].detach().clone(), None if grad is None else grad[slot].clone(),
                self.ranks[slot].clone(), self.periods[slot].clone(),
                self.adapter_names[slot], self.dropouts[slot], self.modes[slot], self.absent[slot])

    def _restore_slot(self, slot: int, state: tuple) -> None:
        block, grad, rank, period, name, dropout, mode, absent = state
        with torch.no_grad():
            self.bank[slot].copy_(block)
            if grad is not None and self.bank.grad is not None:
                self.bank.grad[slot].copy_(grad)
            self.ranks[slot] = rank
            self.periods[slot] = period
        self.adapter_names[slot], self.dropouts[slot], self.modes[slot], self.absent[slot] = name, dropout, mode, absent
        self._sync_slots([slot])

    def slot_generation(self, slot: int) -> int:
        """A number that changes whenever `slot` is filled, emptied or reloaded (unique in the
        process): a slot id with its generation names one adapter's stay in the slot, so that a
        checkpointed recompute can tell a re-used slot from the adapter its forward ran with
        (_check_recompute). Writes into the bank's values do not change it."""
        return self.__dict__.get("_generations", {}).get(slot, 0)

    def block(self, name: str) -> Tensor:
        """The adapter's block, a view into the bank: (r, out_features) or (r, mini_r), in the
        bank's dtype. (Of a sharded bank, a DTensor, the slice is a new tensor: writes into it do
        not reach the bank.) ValueError for an unknown name or an absent adapter (add_absent)."""
        slot = self._slot(name)
        if self.absent[slot]:
            raise ValueError(f"adapter {name!r} does not adapt this layer (add_absent): it has no block here")
        return self.bank[slot, :int(self.ranks[slot]), :int(self.periods[slot])]

    def index_of(self, names: Sequence[Optional[str]], device: Optional[torch.device] = None) -> Tensor:
        """Slot ids, int64 of shape (len(names),) on `device` (by default the bank's), for per-row
        adapter names; None or "__base__" gives -1 (base only). ValueError names an unknown
        adapter; TypeError for a bare str (its characters would be read as names), a non-iterable, or
        a name that is no str."""
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise TypeError(f"index_of: names must be a list of adapter names (str, None or '{BASE}' for the base "
                            f"model), one per row; got {names!r}")
        ids = [-1 if name is None or name == BASE else self._slot(name) for name in names]
        return host_to_device(torch.tensor(ids, dtype=torch.int64), self.bank.device if device is None else device)

    def _slot(self, name: str) -> int:
        # None marks an empty slot in adapter_names: it is never an adapter's name (index_of reads it
        # as the base model), so it must not find a free slot here.
        if not isinstance(name, str) or name not in self.adapter_names:
            known = [n for n in self.adapter_names if n is not None]
            if name is not None and not isinstance(name, str):  # remove_bank_adapter(m, ["s"]): "no adapter ['s']"
                raise TypeError(f"an adapter name is a str, got {type(name).__name__} {name!r} (the bank has {known})")
            raise ValueError(f"no adapter named {name!r} in the bank (it has {known})")
        return self.adapter_names.index(name)

    def _sync_slots(self, changed: Optional[Sequence[int]] = None) -> None:
        """The _dropouts and _route buffers from the slot lists (in place: same tensors, so a
        compiled graph reads the new values without a recompile); `changed` (default: every slot)
        get a new generation (slot_generation)."""
        generations = self.__dict__.setdefault("_generations", {})
        generation = next(_GENERATIONS)
        for slot in range(self.capacity) if changed is None else changed:
            generations[slot] = generation
        if changed is None or changed:
            self._mark_stale_snapshots()
        self._any_dropout = any(p > 0.0 for p in self.dropouts)
        with torch.no_grad():
            self._dropouts.copy_(torch.tensor(self.dropouts, dtype=torch.float64))
            self._route.copy_(torch.tensor([-1 if absent else slot for slot, absent in enumerate(self.absent)],
                                           dtype=torch.int64))

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, adapter_index: Optional[Tensor] = None) -> Tensor:
        """Each row of x with its own adapter: see the class docstring, "forward"."""
        refuse_non_tensor(x, self)
        refuse_nested(x, "MissBankLinear")
        names_from = None if adapter_index is not None else "miss_ext.mixed_batch"  # the ids come from names
        if adapter_index is None:
            adapter_index = self.rows
            if adapter_index is None:
                raise ValueError("MissBankLinear: no adapter_index given and no miss_ext.mixed_batch(model, "
                                 "adapter_names) is active; every row must name its adapter (or '__base__')")
            if _exporting() or torch.jit.is_tracing():
                # torch.compile takes the ids as a graph input; torch.export and torch.jit.trace
                # (and the ONNX exporter built on it) make a module attribute a constant of the
                # program, which would route every later call's rows as this one's, silently.
                # (Before the recompute check: a strict export of a training module met its graph
                # break first, whose message does not say why the export cannot work.)
                raise ValueError("MissBankLinear: torch.export or torch.jit.trace inside miss_ext.mixed_batch would "
                                 "record this call's row ids as constants of the program (every later call routed as "
                                 "this one); export or trace a module that passes the ids to the bank layers as an "
                                 "input (layer(x, adapter_index))")
            if not torch.compiler.is_compiling():
                self._check_recompute()
            elif (self.training or torch.is_grad_enabled()) and traced_inside_checkpoint():
                _check_recompute_outside_the_graph(self)
        if not isinstance(adapter_index, Tensor) or adapter_index.dtype != torch.int64:
            got = type(adapter_index).__name__ + (f" {adapter_index.dtype}" if isinstance(adapter_index, Tensor) else "")
            raise TypeError(f"adapter_index must be an int64 tensor of slot ids (MissBankLinear.index_of), got {got}")
        if adapter_index.device != self.bank.device:
            # The routing lookup below would fail inside torch with a message naming no argument
            # (a review, 2026-12-05); the ops name both devices, as here.
            raise ValueError(f"MissBankLinear: adapter_index is on {adapter_index.device}, the bank on "
                             f"{self.bank.device}; move the ids to the bank's device (index_of gives them there)")
        # Rows of absent adapters to -1 (base output). Ids past the bank stay as they are, for
        # bank_fold to refuse by name. Routed before row_index broadcasts one id per sequence over
        # its tokens: a (batch,) lookup instead of a (batch, seq) one on every layer of a prefill.
        if (self.ranks.is_meta or self.periods.is_meta) and not self.bank.is_meta:
            # Never materialised: torch.func.functional_call on a meta copy (torch's ensembling
            # recipe) substitutes parameters and buffers only, and a load with assign=True of a
            # state_dict without them leaves them. torch then failed with "Cannot copy out of meta
            # tensor" (a lifecycle review, 2026-12-06). Raised before anything moves.
            meta = " and ".join(name for name in self._SAVED_SLOT_TENSORS if getattr(self, name).is_meta)
            raise ValueError(f"MissBankLinear: its {meta} {'are' if ' and ' in meta else 'is'} on the meta device "
                             f"and its bank on {self.bank.device}: never materialised or loaded. The slot tensors "
                             "are plain attributes, not parameters or buffers (EMA averaging must not touch them), so "
                             "torch.func.functional_call does not substitute them: call a module on the data's "
                             "device (a copy without .to('meta')); a meta-built bank takes them from a state_dict "
                             "holding them (load_state_dict(..., assign=True)) or from to_empty() + "
                             "reset_parameters()")
        if self._route.device != self.bank.device:
            self._slot_tensors_to(self.bank.device)
        last = self.capacity - 1
        # Through a 1-D view: indexing with a 0-D tensor (one id for every row) reads it on the host
        # (a sync on CUDA, a graph break), and torch 2.11's Inductor cannot lower torch.take of it.
        flat = adapter_index.reshape(-1).clamp(0, last)
        routed = torch.where((adapter_index >= 0) & (adapter_index <= last),
                             self._route[flat].reshape(adapter_index.shape), adapter_index)
        index = row_index(routed, x, "MissBankLinear", names_from)
        y = self.base_layer(x)
        check_base_output(self, y, x)
        try:
            # x's dtype, as MissLinear and PEFT (under autocast the base output is bf16 for fp32 x).
            return add_bank_terms(y, x, self.bank, self.ranks, self.periods, index,
                                  self._dropouts if self.training and self._any_dropout else None,
                                  inplace=is_plain_linear(self.base_layer)).to(x.dtype)
        except ValueError as refused:
            # The ops name a bad id by its row of x: row 21 of a (5, 7) batch for entry 3 of one id
            # per sequence (a review, 2026-12-05). In eager mode on the CPU, named again by its
            # place in adapter_index; only on this path, so a call that passes reads no ids on the
            # host. (Under torch.compile and torch.func transforms the ops' message stays.)
            try:
                _refuse_bad_rows_before_the_draw(routed, self.ranks, "MissBankLinear:", "adapter_index")
            except ValueError as named:
                raise named from refused
            raise

    def _check_recompute(self) -> None:
        """ValueError for a forward that activation checkpointing runs again inside backward() in
        a mixed batch of other rows than the forward it recomputes: the recompute reads the
        current batch's row ids (the layer holds no others), so a loss built in one mixed_batch and
        backpropagated inside a later one with other names (gradient accumulation over
        micro-batches) silently got the later batch's rows in its gradients (found by a review,
        2026-12-03; max error 0.12 for gradients of 0.1 in float64).

        A batch is what it routes (mixed_batch's slot ids with their generations, and expand: the
        same names entered again are the same batch; a slot re-used by another adapter since is
        not, as its recompute would run the new adapter: found by a review, 2026-12-03).

        Exactly, where the checkpoint can be found again (miss_ext/_checkpointing.py,
        checkpoints_around): a forward inside a checkpoint, in training mode or with grad
        enabled (torch's checkpoint_wrapper checkpoints in eval mode too), leaves its batch on the
        object that stands for that checkpoint (torch's reentrant and non-reentrant forms, other
        libraries' ctx-style Functions), and its recompute compares the batch it runs in with that
        note. Each checkpointed forward is judged on its own, and the note goes when the
        graph does. (A first version kept one record per layer and cleared it at every recompute:
        two losses built in one batch, the first backpropagated there, the second inside another
        batch, was let through, silently wrong, as was a second backward (retain_graph) in another
        batch: a mutation audit, 2026-12-04.)

        A recompute of a forward that left no note is refused where it is torch's (an eval-mode
        forward under a reentrant checkpoint: grad disabled, not checked) or in eval mode (the same
        under another library's Function; eval forwards are never recorded). A checkpoint entered inside a
        recompute (nested ones) gets its note there, once the recompute was judged by a note.
        Otherwise (another library's Function with a new-style forward), the per-layer record:
        training-mode forwards outside backward record their batch (inside a checkpoint as
        _checkpointing sees it, in any grad mode, or with grad enabled), and such a recompute
        refuses if a forward of another batch was recorded since the last recompute; it cannot
        tell a dropped graph from a pending one (the message names model.eval() / torch.no_grad()
        for those)."""
        batch = self.__dict__.get("_mixed_batch")
        seen = self.__dict__.setdefault("_forward_batches", [])  # (batch, seen inside a checkpoint)
        if torch._C._current_graph_task_id() == -1:  # a forward, not inside backward()
            if torch.is_inference_mode_enabled() or not (self.training or torch.is_grad_enabled()):
                return
            checkpointed, checkpoints = checkpoints_around(since=self.__dict__.get("_stack_entry"))  # see mixed_batch
            if checkpointed:
                self._note_batch(batch, checkpoints)
            if not self.training:  # an eval-mode forward with grad: the note only, never the record
                return
            if (checkpointed or torch.is_grad_enabled()) and (batch, checkpointed) not in seen:
                seen.append((batch, checkpointed))
                if len(seen) > 16:  # bounded: without checkpointing no recompute ever clears it
                    # The oldest forward not seen inside a checkpoint goes first: dropping one seen
                    # inside one could let its recompute in another batch through.
                    unseen = [i for i, (_, c) in enumerate(seen) if not c]
                    del seen[unseen[0] if unseen else 0]
            return
        # A recompute: judged by the note of the innermost checkpoint that has one for this layer
        # (a checkpoint entered again inside an outer one's recompute got its note there, below).
        noted, torch_recompute, entered = judge_recompute(lambda found: getattr(found, _BATCH_NOTES, {}).get(self))
        if noted is not None:
            wrong = batch not in noted
        elif torch_recompute or (not self.training and torch.is_grad_enabled() and not seen):
            # A recompute of a forward that left no note: one that ran with grad disabled in eval
            # mode (torch's reentrant checkpoint, or another library's Function, as DeepSpeed's),
            # which was not checked (checking every eval forward under no_grad would cost
            # generate() a frame walk per layer and token), or an eval forward in a Function with
            # a new-style forward. Eval forwards are never recorded either, so an empty record
            # cannot judge it: let through, another library's recompute in another batch was
            # silently wrong (a new-user pass, 2026-12-04: 34.7 off for gradients of 33). The mode
            # read is the recompute's: a training forward recorded, then model.eval() before
            # backward, is judged by its record (a review, 2026-12-04). Not caught: an eval forward
            # under another library's Function, then model.train(), then backward in another batch
            # (its forward left nothing to judge by, and generate()'s no_grad forwards must not).
            raise ValueError("MissBankLinear: activation checkpointing is recomputing this layer for a forward whose "
                             "batch could not be checked: an eval-mode forward inside a reentrant checkpoint (torch's "
                             "use_reentrant=True, or another library's autograd.Function such as DeepSpeed's: it runs "
                             "with grad disabled) or inside a Function with a new-style forward. Run it in training "
                             "mode (model.train()), or with torch's checkpoint and use_reentrant=False")
        elif not torch.is_grad_enabled():
            return
        else:
            # Another library's recompute with no note (a new-style Function) could be any
            # Function's backward (a Liger kernel's, say), so every recorded forward counts there.
            wrong = any(b != batch for b, _ in seen)
        seen.clear()
        if wrong:
            raise ValueError("MissBankLinear: this layer is being recomputed inside backward() (activation "
                             "checkpointing) in a miss_ext.mixed_batch of other names than a forward it may "
                             "recompute, or after a slot it used was emptied or re-filled (remove/add/load of an "
                             "adapter, a load_state_dict), whose rows would silently take this batch's adapters. Call "
                             "backward() inside a mixed_batch of its forward's names (for gradient accumulation: one "
                             "backward per micro-batch, inside its context); run forwards whose graph you drop in "
                             "eval mode (model.eval()) or under torch.no_grad()")
        # Checkpoints entered inside this recompute (a nested one's forward, run again) get the note
        # their own recompute looks for; only after a judgement by a note (never the record's).
        if noted is not None:
            self._note_batch(batch, entered)

    def _note_batch(self, batch, checkpoints) -> None:
        """Leaves `batch` on each checkpoint's object (_checkpointing.checkpoints_around)."""
        for checkpoint in checkpoints:
            notes = getattr(checkpoint, _BATCH_NOTES, None)
            if notes is None:
                notes = {}
                try:
                    setattr(checkpoint, _BATCH_NOTES, notes)
                except (AttributeError, TypeError):  # an object that takes no attribute: the record judges
                    continue
            notes.setdefault(self, set()).add(batch)

    def __prepare_scriptable__(self):
        # torch.jit.script compiles forward from its Python source, and the bank's routing (the
        # row ids of mixed_batch, the export check, type checks that name the bad value) is
        # Python that TorchScript cannot compile: without this, the user got a frontend error
        # about a line of this file. torch.jit.script calls this on every submodule of a model,
        # also one its forward never calls (in __jit_ignored_attributes__, say), which is refused
        # too: a refusal when scripting beats one at the first call of a scripted program (a
        # stub raising there would surface in the C++ server, far from the cause).
        raise NotImplementedError(
            "MissBankLinear cannot be compiled by torch.jit.script; torch.jit.trace a module that passes the row "
            "ids as an input (layer(x, adapter_index), under torch.no_grad()), or use torch.export or "
            "torch.compile (README, 'Many adapters in one batch')")

    def __getstate__(self):
        # A copy or pickle taken inside mixed_batch must not keep that call's row ids. Nor the
        # slot generations and recorded batches of _check_recompute: generations are counted per
        # process, so a pickle loaded in another process could see a re-filled slot get the number
        # its old adapter had (a review, 2026-12-03); a copy starts with every slot at generation 0
        # and no recorded forward (its recomputes are its own).
        state = super().__getstate__()
        state["rows"] = None
        for name in ("_generations", "_forward_batches", "_mixed_batch", "_stack_entry", "_snapshots"):
            state.pop(name, None)
        return state

    def _slot_description(self) -> dict:
        return {"adapter_names": self.adapter_names, "modes": self.modes, "dropouts": self.dropouts,
                "absent": self.absent}

    def _mark_stale_snapshots(self) -> None:
        """After the slots changed (an adapter added or removed, a slot description loaded): for
        every state_dict this layer wrote whose description names an adapter in a slot that now
        holds another (or none), the bank memory the change wrote is recorded. A state_dict whose
        bank lies there (the layer's own, as state_dict() gives it, detach()ed, or the Parameter
        itself with keep_vars=True) now holds another adapter's block under that name: loading it,
        into this layer or another, is refused (_stale_snapshot_problem), also if the slot later
        gets its adapter back. One whose bank a cast or move reallocated first, or that holds a
        copy, keeps the blocks of then; slots its description leaves empty or absent do not matter
        (loading it empties them); its ranks and periods are checked when it is loaded."""
        bank = _memory(self.bank)
        if bank is None:
            return
        now = list(zip(self.adapter_names, self.modes, self.absent))
        for snapshot in list(self.__dict__.get("_snapshots", ())):
            then = snapshot.description
            if any(name is not None and not absent and (name, mode, absent) != now[slot]
                   for slot, (name, mode, absent) in enumerate(zip(then["adapter_names"], then["modes"],
                                                                   then["absent"]))):
                snapshot.rewritten.add(bank)

    @staticmethod
    def _stale_snapshot_problem(state_dict, prefix: str) -> Optional[str]:
        """Why `state_dict` is a stale snapshot of a bank layer, or None: one whose slot tensors
        (the layer's own, as state_dict() gives them) were written with other adapters after its
        slot description was taken: its bank by a slot change (_mark_stale_snapshots: its bank lies
        in memory a change rewrote), or its ranks or periods to other values. Not once its
        description was written since
        (torch.distributed.checkpoint's resume writes a checkpoint's description, blocks, ranks and
        periods into the model's own state_dict, consistently). A snapshot copied or written to a
        file after its slots changed cannot be told from a consistent one (README)."""
        extra = state_dict.get(prefix + "_extra_state")
        storage = _storage(extra)
        snapshot = None if storage is None else _SNAPSHOTS.get(storage)
        if snapshot is None or (snapshot.description_version is not None and
                                extra._version != snapshot.description_version):
            return None
        written = ["bank"] if _memory(state_dict.get(prefix + "bank")) in snapshot.rewritten else []
        for name, then in (("ranks", snapshot.ranks), ("periods", snapshot.periods)):
            tensor = state_dict.get(prefix + name)
            place = _memory(tensor)
            if place is not None and place == snapshot.memory.get(name) and tensor.tolist() != then:
                written.append(name)
        if not written:
            return None
        return ("the state_dict is a snapshot taken before adapters were added to or removed from its layer: its "
                f"{' and '.join(written)} (the layer's own tensors: a state_dict shares the module's) "
                f"{'was' if len(written) == 1 else 'were'} since written "
                f"with other adapters, beside the slot description taken then (adapters "
                f"{snapshot.description['adapter_names']}); keep a copy to restore later "
                "(copy.deepcopy(model.state_dict()), or save it to a file at once)")

    def _slot_change_problem(self, state_dict, prefix: str) -> Optional[str]:
        """Why loading `state_dict` would pair slot names, modes, ranks or periods with blocks they
        were not saved with, or None. The slot description (_extra_state), ranks and periods say
        which adapter each slot's block belongs to: a filtered dict (strict=False) that changes
        ranks or periods without the description, or any of them without the others and `bank`,
        is refused (a row naming an adapter would silently get another's block). Loading only
        `bank`, new values for the same slots, stays allowed, as does loading a state_dict that
        changes no slot."""
        if self.ranks.is_meta or self.bank.is_meta:  # nothing materialised: no block to pair wrongly
            return None
        described = prefix + "_extra_state" in state_dict
        changed = []
        if described:
            saved = tensor_json(state_dict[prefix + "_extra_state"])  # parsed and checked by the caller
            own = self._slot_description()
            if saved != own:
                changed.append(f"slot description (adapters {saved['adapter_names']}, modes {saved['modes']}, "
                               f"dropouts {saved['dropouts']}, absent {saved['absent']}; this bank's: adapters "
                               f"{own['adapter_names']}, modes {own['modes']}, dropouts {own['dropouts']}, absent "
                               f"{own['absent']})")
        for name in self._SAVED_SLOT_TENSORS:
            if prefix + name in state_dict:
                loaded, own = state_dict[prefix + name].tolist(), getattr(self, name).tolist()
                if loaded != own:
                    changed.append(f"{name} {loaded} (this bank's: {own})")
        if not changed:
            return None
        what = " and ".join(changed)
        if not described:
            return (f"the state_dict's {what} describe other slots, without the slot description (_extra_state) "
                    "that names their adapters; load the layer's whole state_dict")
        missing = [name for name in ("bank",) + self._SAVED_SLOT_TENSORS if prefix + name not in state_dict]
        if missing:
            return (f"the state_dict would change the {what} without the {' and '.join(missing)} it was saved with "
                    "(a filtered dict); load the layer's whole state_dict")
        return None

    def _load_refusal(self, state_dict, prefix: str, assign: bool) -> Optional[str]:
        """Why this layer refuses its part of `state_dict` (keys under `prefix`; assign: load_state_dict's
        assign=True), or None: its load checks, without loading anything. Also run for every bank
        layer of a model before any of them loads (bank_model's load check)."""
        reason = None
        if self.rows is not None:
            reason = "cannot load a state_dict inside miss_ext.mixed_batch (its rows name the bank's slots)"
        else:
            mismatched = load_mismatches(self, state_dict, prefix, assign)
            # The slot tensors are plain attributes (no parameters or buffers): checked here. Their
            # values are read on the host, so a meta tensor cannot load even with assign=True.
            for name in self._SAVED_SLOT_TENSORS:
                saved = state_dict.get(prefix + name)
                if saved is not None and (not isinstance(saved, Tensor) or saved.is_meta):
                    what = "a meta tensor" if isinstance(saved, Tensor) else f"a {type(saved).__name__}"
                    mismatched.append(f"{name}: the state_dict holds {what}, not the slots' values")
            if mismatched:
                reason = "; ".join(f"{m} (bank: slots, max_r, out_features)" if m.startswith("size mismatch for bank ")
                                   else m for m in mismatched)
        if reason is None:
            reason = self._stale_snapshot_problem(state_dict, prefix)
        if reason is None and prefix + "_extra_state" in state_dict:
            # Checked against the ranks and periods loading with it, before anything loads: torch
            # sets the extra state after the tensors, too late to leave the layer as it was.
            try:
                saved = tensor_json(state_dict[prefix + "_extra_state"])
            except ValueError as exc:
                saved = f"not JSON text in a uint8 tensor ({exc})"
            ranks, periods = (state_dict.get(prefix + name, getattr(self, name)) for name in ("ranks", "periods"))
            if ranks.is_meta or periods.is_meta:
                # A meta-built bank holds no ranks to check the description against (torch's "Cannot
                # copy out of meta tensor" before: a review, 2026-12-06).
                reason = ("the slot description (_extra_state) loads with the ranks and periods it was saved with, "
                          "which the state_dict lacks and this bank, on the meta device, does not hold; load the "
                          "layer's whole state_dict")
            else:
                problem = slot_state_problem(saved, self.max_r, self.out_features, ranks.tolist(), periods.tolist())
                if problem is not None:
                    reason = f"the saved slot description (_extra_state) does not fit: {problem}"
        if reason is None:
            reason = self._slot_change_problem(state_dict, prefix)
        if reason is None:
            for name in self._SAVED_SLOT_TENSORS:
                saved, own = state_dict.get(prefix + name), getattr(self, name)
                if isinstance(saved, Tensor) and saved.shape != own.shape:
                    reason = f"size mismatch for {name}: {tuple(saved.shape)} (this bank's: {tuple(own.shape)})"
        return reason

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A bank of another shape loads nothing of this layer (not the slot names, not the base
        # layer), so a failed load cannot leave slots that claim adapters whose blocks were not
        # loaded, or one checkpoint's base weight beside another's blocks.
        reason = self._load_refusal(state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        if reason is not None:
            refuse_layer_load(self, state_dict, prefix, strict, missing_keys, error_msgs, reason)
            return
        # The slot description as it is, put back should the bank's values not load: torch catches
        # a failed copy (out of memory, a device error), notes it in error_msgs and loads the rest,
        # so the layer took the file's slot names over its old blocks, and rows then ran other
        # adapters' blocks silently after load_state_dict raised (a fault-injection sweep,
        # 2026-12-06).
        saved, errors_before, bank = self._slots_as_they_are(), len(error_msgs), self.bank
        bank_written = written_since(bank)  # (an inference tensor's: by identity only)
        try:
            # ranks and periods first: set_extra_state (inside the call below) checks the slot
            # description against them, as it did when they loaded there as buffers.
            for name in self._SAVED_SLOT_TENSORS:
                key = prefix + name
                if key not in state_dict:
                    if strict:
                        missing_keys.append(key)
                    continue
                with torch.no_grad():
                    if local_metadata.get("assign_to_params_buffers", False):
                        setattr(self, name, state_dict[key].to(torch.int64))
                    else:
                        getattr(self, name).copy_(state_dict[key])
            unexpected_before = len(unexpected_keys)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        except BaseException:
            # An interrupt after torch copied the bank (it sets the description last): the
            # description loads too, so that it says what the bank now holds; before the copy,
            # the old one is put back (a review, 2026-12-06).
            if self.bank is not bank or bank_written():
                if prefix + "_extra_state" in state_dict:
                    self.set_extra_state(state_dict[prefix + "_extra_state"])
            else:
                self._restore_slots(saved)
            raise
        if len(error_msgs) > errors_before:  # the bank (the layer's one tensor of its own) did not load
            self._restore_slots(saved)
        else:
            self._zero_grads_of_changed_slots(saved[1][0])
        # torch's check lists every key of this layer it holds no parameter or buffer for.
        ours = {prefix + name for name in self._SAVED_SLOT_TENSORS}
        unexpected_keys[unexpected_before:] = [key for key in unexpected_keys[unexpected_before:] if key not in ours]

    def _zero_grads_of_changed_slots(self, names_before: List[Optional[str]]) -> None:
        """After a load: the slots that now hold another adapter (or none) get a zero gradient, as
        remove_adapter gives a freed slot. Their accumulated gradient belonged to the adapter
        before, and the next step moved the new one by it (a review, 2026-12-07: a slot emptied by
        load_state_dict then taken by add_bank_adapter). A slot loaded with the same adapter keeps
        its gradient, as load_state_dict leaves any parameter's."""
        self._zero_slot_grads([slot for slot, (before, now) in enumerate(zip(names_before, self.adapter_names))
                               if before != now])

    def _zero_slot_grads(self, slots: List[int]) -> None:
        """Zeroes `slots`' rows of bank.grad (where there is one); of an FSDP2-sharded gradient,
        this rank's rows among them."""
        grad, changed = self.bank.grad, list(slots)
        if grad is None or not changed:
            return
        start = 0
        if is_dtensor(grad):  # FSDP2's sharded gradient: this rank's rows (DTensor has no public offset query)
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
            shape, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
            grad, start = grad.to_local(), offset[0]
            changed = [slot - start for slot in changed if start <= slot < start + shape[0]]
        if changed:
            with torch.no_grad():
                grad[changed] = 0

    def _slots_as_they_are(self) -> tuple:
        """The ranks and periods (the tensors and their values) and the slot lists, for
        _restore_slots."""
        return ([(name, getattr(self, name), getattr(self, name).clone()) for name in self._SAVED_SLOT_TENSORS],
                (list(self.adapter_names), list(self.modes), list(self.dropouts), list(self.absent)))

    def _restore_slots(self, saved: tuple) -> None:
        tensors, lists = saved
        with torch.no_grad():
            for name, tensor, values in tensors:
                setattr(self, name, tensor)
                tensor.copy_(values)
        self.adapter_names, self.modes, self.dropouts, self.absent = lists
        self._sync_slots()

    # The slots' names, modes, dropout rates and absent flags travel in the state_dict (as
    # PyTorch's "extra state"), so that load_state_dict into a fresh bank restores which adapter
    # each slot holds; without them a loaded bank would route every row to the base output. The
    # entry is a uint8 tensor of JSON, so the state_dict stays all tensors (safetensors, clone()).
    def get_extra_state(self) -> Tensor:
        """The slots' names, modes, dropout rates and absent flags, which the state_dict carries
        beside the bank, ranks and periods: a 1-D uint8 tensor of their JSON text (a tensor, not a
        dict: the state_dict stays all tensors, for safetensors and clone()); set_extra_state
        reads it back. Padded with spaces to SLOT_DESCRIPTION_BYTES per slot: see there."""
        return json_tensor(self._slot_description(), min_bytes=SLOT_DESCRIPTION_BYTES * self.capacity)

    def _apply(self, fn, recurse=True):
        # The slot tensors go where the module's tensors go (.to(), .cuda(), to_empty(), ...), as
        # buffers would. Module casts (.float(), .half(), .to(torch.bfloat16)) convert every
        # floating tensor, but bank_fold takes the rates in float64 (the exact values the user
        # gave): back to float64 after a cast. The forward's rates and routing are derived from the
        # slot lists, so they are refilled from them after any conversion (so training with dropout
        # keeps working, and to_empty() leaves no uninitialised memory in them; ranks and periods
        # are state, uninitialised like the bank until load_state_dict, as for any module).
        super()._apply(fn, recurse)
        from_meta = self.ranks.is_meta
        with torch.no_grad():
            for name in self._SLOT_TENSORS:
                setattr(self, name, fn(getattr(self, name)))
            if self._dropouts.dtype != torch.float64:
                self._dropouts = self._dropouts.to(torch.float64)
            if from_meta and not self.ranks.is_meta:
                # Materialised from the meta device (to_empty): the ranks and periods never held
                # values, and no adapter could be added there (add_adapter), so every slot is empty
                # or absent: rank and period 0, not uninitialised memory. A state_dict loaded into
                # the meta layer (slot names, no values) now shows rank 0 for its adapters, which
                # the forward refuses by name, until the state_dict is loaded again.
                self.ranks.zero_()
                self.periods.zero_()
        self._sync_slots(changed=())  # the same adapters, elsewhere
        return self

    def reset_parameters(self) -> None:
        """PEFT's zero init for every slot's block (bank[...] = 0); the slots keep their adapters,
        ranks and modes. Only the bank: the base layer is a child module with its own
        reset_parameters. Why: a model built on the meta device and materialised with to_empty()
        is initialised by calling reset_parameters() on every module that has one; without it the
        bank kept uninitialised memory (a new-user pass, 2026-12-04). A sharded bank (FSDP2's
        DTensor, as in its meta-device setup) zeroes its shard."""
        with torch.no_grad():
            self.bank.zero_()

    def _rebuild_forward_slot_tensors(self, device: torch.device) -> None:
        # The forward's slot tensors (rates, routing), new on `device`, from the slot lists.
        self._dropouts = torch.zeros(self.capacity, dtype=torch.float64, device=device)
        self._route = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        self._sync_slots(changed=())  # the same adapters

    def _slot_tensors_to(self, device: torch.device) -> None:
        # Where the bank went without them: a wrapper that moves a module's parameters and buffers
        # itself, not through _apply (FSDP2's fully_shard, to its mesh's device), or a model built
        # on the meta device and loaded with load_state_dict(assign=True), which assigns ranks and
        # periods but not the forward's tensors (not saved). Those are rebuilt from the slot lists.
        for name in self._SAVED_SLOT_TENSORS:
            tensor = getattr(self, name)
            if not tensor.is_meta:  # never loaded: bank_add refuses the mismatch by name
                setattr(self, name, tensor.to(device))
        self._rebuild_forward_slot_tensors(device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # ranks and periods after the bank and before the slot description, where they stood as
        # buffers (the order of earlier files).
        extra = destination.pop(prefix + "_extra_state", None)
        for name in self._SAVED_SLOT_TENSORS:
            destination[prefix + name] = getattr(self, name)
        if extra is not None:
            destination[prefix + "_extra_state"] = extra
            self._register_snapshot(destination, prefix)

    def _register_snapshot(self, destination, prefix: str) -> None:
        # For _mark_stale_snapshots: not for fake tensors (tracing), a meta layer, or a state_dict
        # without the slot tensors.
        extra = destination.get(prefix + "_extra_state")
        storage = _storage(extra)
        memory = {name: _memory(destination.get(prefix + name)) for name in self._SAVED_SLOT_TENSORS}
        if (torch.compiler.is_compiling() or self.ranks.is_meta or storage is None
                or _memory(destination.get(prefix + "bank")) is None or None in memory.values()):
            return
        snapshot = _Snapshot(tensor_json(extra), None if extra.is_inference() else extra._version,
                             self.ranks.tolist(), self.periods.tolist(), memory)
        _SNAPSHOTS[storage] = snapshot
        self.__dict__.setdefault("_snapshots", weakref.WeakSet()).add(snapshot)

    def __setstate__(self, state) -> None:
        """A whole-module pickle of an earlier version: the slot tensors as buffers (before
        2026-12-02) become attributes; one from before the per-row fold (fold groups, no _route)
        gets the forward's slot tensors rebuilt."""
        super().__setstate__(state)
        for name in ("_group_train", "_group_eval"):
            self._buffers.pop(name, None)
        for name in ("_groups", "_routed"):
            self.__dict__.pop(name, None)
        for name in self._SLOT_TENSORS:
            if name in self._buffers:
                tensor = self._buffers.pop(name)
                self._non_persistent_buffers_set.discard(name)
                setattr(self, name, tensor)
        if "_route" not in self.__dict__:
            self._rebuild_forward_slot_tensors(self.bank.device)

    def set_extra_state(self, encoded: Tensor) -> None:
        """The slot names, modes, dropout rates and absent flags of get_extra_state (load_state_dict
        checks them before anything loads; here again for a direct call). ValueError, changing
        nothing, for a description that does not fit this bank's slots."""
        try:
            state = tensor_json(encoded)
        except ValueError as exc:  # json's JSONDecodeError included
            raise ValueError(f"MissBankLinear.set_extra_state: not a slot description (get_extra_state's uint8 "
                             f"tensor of JSON text): {exc}") from None
        if self.ranks.is_meta:  # torch's bare "Cannot copy out of meta tensor" from tolist() before
            raise ValueError("MissBankLinear.set_extra_state: the layer is on the meta device (not materialised), so "
                             "the slots' ranks loaded nowhere; load the state_dict with assign=True, or materialise "
                             "the model first (to_empty())")
        problem = slot_state_problem(state, self.max_r, self.out_features, self.ranks.tolist(), self.periods.tolist())
        if problem is not None:
            raise ValueError(f"MissBankLinear.set_extra_state: {problem}")
        self.adapter_names, self.modes = list(state["adapter_names"]), list(state["modes"])
        self.dropouts, self.absent = [float(p) for p in state["dropouts"]], [bool(a) for a in state["absent"]]
        self._sync_slots()

    def extra_repr(self) -> str:
        used = [f"{n}(absent)" if self.absent[i] else f"{n}(r={int(self.ranks[i])}, {self.modes[i]})"
                for i, n in enumerate(self.adapter_names) if n]
        return (f"in_features={self.in_features}, out_features={self.out_features}, capacity={self.capacity}, "
                f"max_r={self.max_r}, adapters=[{', '.join(used)}]")
