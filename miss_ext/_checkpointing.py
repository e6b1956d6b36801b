"""Whether a layer's forward runs inside activation checkpointing, which runs it again inside
backward().

Why: per-row adapter names reach a layer for one call (PEFT's `adapter_names=` through hooks,
`miss_ext.mixed_batch` through the bank's row ids). A recompute runs the layer again after that
call, without the names or with another call's, and nothing in its arguments shows it: every row
then silently used the active adapter, or another batch's (helper reviews, 2026-12-03). The
layers ask here at forward time, when the checkpoint is still visible:

- torch.utils.checkpoint's frames: its entry point `checkpoint` (called by checkpoint_sequential,
  torch's checkpoint_wrapper / apply_activation_checkpointing, transformers', FSDP's and
  accelerate's activation checkpointing) and the reentrant form's CheckpointFunction.forward;
- the forward of any other autograd.Function on the stack (a frame whose first argument is the
  Function's context, or a `forward` whose qualified name leads to a Function subclass in its
  module): how reentrant checkpointing outside torch (DeepSpeed, Megatron, fairscale) runs the
  module; an ordinary Function computes on tensors and calls no module (one that runs a module
  with grad and keeps its graph is taken for a checkpoint too: refused, not wrong). A Function
  defined inside a function, with a new-style forward (no ctx), is not seen;
- a non-reentrant checkpoint's saved-tensor hooks (defined in torch/utils/checkpoint.py, any in
  force, not only the innermost), which torch's composable `checkpoint(module)` installs from
  hooks, leaving no frame.

The bank also needs to know, at a recompute, which checkpointed forward it repeats: the forward
leaves a note on the object that stands for its checkpoint (checkpoints_around), which the
recompute finds again (judge_recompute).

A checkpoint around a whole call is not inside it (`entry` below): its recompute repeats the call.
A caller to whom every checkpoint counts, around the call too, walks the frames above the call
once per call instead of at every layer (`whole_stack_entry`).
"""
import sys
import weakref
from typing import Optional

import torch
import torch.utils.checkpoint

_CHECKPOINT_FILE = torch.utils.checkpoint.__file__
_FUNCTION_CONTEXT = torch._C._FunctionBase  # the ctx an autograd.Function's forward receives
# What stands for one non-reentrant torch checkpoint (its saved-tensor hooks' `frame`); an empty
# tuple on a torch without it, which isinstance() matches with nothing (then those checkpoints are
# told apart by the callers' fallback).
_CHECKPOINT_FRAME = getattr(torch.utils.checkpoint, "_CheckpointFrame", ())


def checkpoint_hooks() -> tuple:
    """The pack functions of the non-reentrant checkpoints' saved-tensor hooks in force, innermost
    first. The whole stack of hooks, not only its top: a user's hooks inside the checkpointed
    block (torch.autograd.graph.save_on_cpu, activation offloading) hid the checkpoint's, and its
    recompute went unseen (a review, 2026-12-04). torch shows only the top pair, so the pairs
    are popped and pushed back (thread-local, in the same order; one call when none is in force;
    a push cannot fail here: torch refuses to disable saved-tensor hooks while any are in force)."""
    autograd = torch._C._autograd
    pairs = []
    try:
        while True:
            top = autograd._top_saved_tensors_default_hooks(False)
            if top is None:
                break
            pairs.append(top)
            autograd._pop_saved_tensors_default_hooks()
    finally:
        for pack, unpack in reversed(pairs):
            autograd._push_saved_tensors_default_hooks(pack, unpack)
    return tuple(pack for pack, _ in pairs
                 if getattr(getattr(pack, "__code__", None), "co_filename", None) == _CHECKPOINT_FILE)


# What a frame's code says, per code object (by id; an entry goes when its code object does, so
# code made at run time, notebook cells or generated functions, is not held): _TORCH for
# torch.utils.checkpoint's, _FUNCTION for the forward of an autograd.Function subclass found by
# its qualified name in the frame's module, _CTX for a frame whose first argument is called ctx
# (an old-style Function's forward by convention; its value decides), None for the rest. Reading
# co_varnames or comparing file names on every frame of the stack, at every layer call, cost
# several times the walk itself.
_TORCH, _FUNCTION, _CTX = "torch", "function", "ctx"
_KIND: dict = {}
_REFS: dict = {}
_UNSEEN = object()


def _forward_of_a_function(code, frame) -> bool:
    parts = code.co_qualname.split(".")
    if len(parts) < 2 or parts[-1] != "forward" or "<locals>" in parts:
        return False
    owner = frame.f_globals.get(parts[0])
    for part in parts[1:-1]:
        owner = getattr(owner, part, None)
    return isinstance(owner, type) and issubclass(owner, torch.autograd.Function)


def _kind(code, frame):
    if code.co_filename == _CHECKPOINT_FILE:
        kind = _TORCH
    elif _forward_of_a_function(code, frame):
        kind = _FUNCTION
    elif code.co_argcount and code.co_varnames[0] == "ctx":
        kind = _CTX
    else:
        kind = None
    key = id(code)
    _KIND[key] = kind
    _REFS[key] = weakref.ref(code, lambda _, key=key: (_KIND.pop(key, None), _REFS.pop(key, None)))
    return kind


@torch._dynamo.assume_constant_result
def traced_inside_checkpoint() -> bool:
    """Under torch.compile, called from traced code: whether the code Dynamo traces was called
    inside activation checkpointing entered outside the compiled region (a checkpoint placed
    around a compiled block), which re-runs the compiled graph in backward() with no Python of the
    layers in it. Run for real once, at trace time (the checkpoint's frames and saved-tensor hooks
    are real then; a checkpoint inside the compiled region is traced as a higher-order op and shows
    none), its answer a constant of the graph: the layers check outside the graph (a graph break)
    only where it is True, and graphs without a checkpoint around them stay whole (fullgraph=True
    too). Not guarded: Dynamo serves one graph to every instance of a layer class, so a layer
    compiled outside any checkpoint and another instance run inside a non-reentrant one share a
    graph without the check (a reentrant checkpoint disables grad, which Dynamo guards on)."""
    return inside_checkpoint()


def _code_kind(frame):
    """The cached kind of the frame's code (_TORCH, _FUNCTION, _CTX or None)."""
    code = frame.f_code
    kind = _KIND.get(id(code), _UNSEEN)
    return _kind(code, frame) if kind is _UNSEEN else kind


def _context_value(frame):
    """The frame's argument named ctx if it is an autograd.Function context, else None."""
    ctx = frame.f_locals.get("ctx")
    return ctx if isinstance(ctx, _FUNCTION_CONTEXT) else None


def _frame_context(frame, kind):
    """The autograd.Function context that a frame of code of cached kind `kind` (not None) takes
    as its first argument, named ctx, or None. Asked only of frames whose kind allows it (reading
    co_varnames or f_locals of every frame cost several times the walk itself)."""
    if kind is not _CTX:  # torch's or a Function's frame: a ctx only if it takes one
        code = frame.f_code
        if not (code.co_argcount and code.co_varnames[0] == "ctx"):
            return None
    return _context_value(frame)


def inside_checkpoint(since: Optional[tuple] = None) -> bool:
    """Whether the caller runs inside activation checkpointing (the module docstring says how it
    is seen). `since`, from `entry()` or `whole_stack_entry()` at the start of a call: the frames
    below its `with` frame are walked, and the answer for the frames from it up is the one it
    recorded (entry: none of them counts, a checkpoint around the whole call; whole_stack_entry:
    theirs); checkpoint hooks other than those then in force count. Where that frame is not on the
    caller's stack (another thread, say), every frame is walked."""
    stop, hooks, above, _ = since if since is not None else (None, (), False, None)
    if any(pack not in hooks for pack in checkpoint_hooks()):
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame is stop:
            return above
        kind = _code_kind(frame)
        if kind is _TORCH or kind is _FUNCTION or (kind is _CTX and _context_value(frame) is not None):
            return True
        frame = frame.f_back
    return False


def _walk(frame, stop, contexts: list):
    """Walks from `frame` up to `stop` (excluded) or the end, whatever it meets, appending each
    frame's autograd.Function context to `contexts`. Returns (whether a frame was a checkpoint's,
    as inside_checkpoint judges them; whether `stop` was reached)."""
    inside = False
    while frame is not None:
        if frame is stop:
            return inside, True
        kind = _code_kind(frame)
        if kind is not None:
            ctx = _frame_context(frame, kind)
            if ctx is not None:
                contexts.append(ctx)
            inside = inside or kind is not _CTX or ctx is not None
        frame = frame.f_back
    return inside, False


def entry(frame) -> tuple:
    """What inside_checkpoint(since=...) needs of a call about to run, for a caller to whom a
    checkpoint around the whole call does not count: `frame`, one that stays on the stack while
    the call runs (a forward pre-hook's caller, the model's Module.__call__), and the checkpoint
    hooks in force. Keep it for the call only (it holds a frame)."""
    return frame, checkpoint_hooks(), False, None


def whole_stack_entry(frame) -> tuple:
    """As entry(), for a caller to whom every checkpoint counts, around the call too (the bank's
    note of which batch a recompute repeats): the frames from `frame` up are walked here, once,
    for whether one is a checkpoint's and for the contexts checkpoints_around() lists, and no hook
    is excepted. Keep it for the call only (it holds a frame)."""
    contexts = []
    inside, _ = _walk(frame, None, contexts)
    return frame, (), inside, tuple(contexts)


def _checkpoint_frame(pack):
    """The _CheckpointFrame a non-reentrant checkpoint's pack hook closes over, or None."""
    for cell in getattr(pack, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, _CHECKPOINT_FRAME):
            return value
    return None


def _checkpoint_frames(packs) -> list:
    """The _CheckpointFrame of each non-reentrant checkpoint whose pack hook is in `packs`."""
    return [frame for frame in map(_checkpoint_frame, packs) if frame is not None]


def checkpoints_around(since: Optional[tuple] = None) -> tuple:
    """(whether the caller runs inside activation checkpointing, as inside_checkpoint(since) says;
    the objects that stand for the checkpoints it runs inside, each one that the recompute of that
    checkpoint finds again, judge_recompute, so that a caller can leave a note on it). `since`:
    None or from whole_stack_entry(). The objects: every non-reentrant torch checkpoint in force
    (the `frame` its saved-tensor hooks close over) and the context of every autograd.Function
    frame on the stack that takes one (torch's reentrant CheckpointFunction, other libraries'
    ctx-style recomputes), those above `since`'s frame as whole_stack_entry() found them. Not
    found: a Function with a new-style forward (no ctx). One read of the hooks and one walk, up to
    `since`'s frame: inside_checkpoint() followed by a second read and a walk of the whole stack
    cost 13-20 us per layer forward against 9-12 us (a 2-layer Llama under transformers'
    checkpointing, 29 frames, depth 0 and 40 above the step, CPU, 2026-12-04)."""
    stop, hooks, above, contexts_above = since if since is not None else (None, (), False, ())
    packs = checkpoint_hooks()
    found = _checkpoint_frames(packs)
    frame = sys._getframe(1)
    inside, reached = _walk(frame, stop, found)
    if reached:  # the frames from `stop` up: as whole_stack_entry found them
        inside = inside or above
        found.extend(contexts_above)
    return inside or any(pack not in hooks for pack in packs), found


def _is_torch_checkpoint(found) -> bool:
    return isinstance(found, _CHECKPOINT_FRAME) or \
        getattr(type(found), "_forward_cls", None) is getattr(torch.utils.checkpoint, "CheckpointFunction", ())


def judge_recompute(note_of) -> tuple:
    """Inside backward(), for the caller's recompute: walks the checkpoint recomputes it runs
    inside, innermost first (a non-reentrant torch checkpoint's unpack hook, its `frame`; an
    autograd.Function backward that takes a ctx: torch's reentrant CheckpointFunction or another
    library's), up to the first whose object `note_of(object)` gives a note for. Returns (that
    note or None, whether a torch checkpoint without one was passed, the objects of the
    checkpoints entered inside this recompute: Function forwards below it and every
    non-reentrant checkpoint in force, for the caller to note once judged)."""
    entered = _checkpoint_frames(checkpoint_hooks())
    torch_passed = False
    frame = sys._getframe(1)
    while frame is not None:
        kind = _code_kind(frame)  # None for most frames: nothing more is read of them
        if kind is not None:
            code = frame.f_code
            found = None
            if kind is _TORCH and code.co_name == "unpack_hook":
                found = frame.f_locals.get("frame")
                found = found if isinstance(found, _CHECKPOINT_FRAME) else None
            else:
                ctx = _frame_context(frame, kind)
                if ctx is not None and code.co_name != "backward":
                    entered.append(ctx)
                elif ctx is not None:
                    found = ctx
            if found is not None:
                note = note_of(found)
                if note is not None:
                    return note, torch_passed, entered
                torch_passed = torch_passed or _is_torch_checkpoint(found)
        frame = frame.f_back
    return None, torch_passed, entered
